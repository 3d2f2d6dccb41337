"""svm-v2: a second nested-state format for SVM that carries everything a restore needs.

KVM's SVM format (KVM_STATE_NESTED_FORMAT_SVM) carries vmcb12's control area and vmcb01's
save area (L1's state); L2's registers travel separately through KVM_GET/SET_REGS and SREGS.
svm-v2 puts the vmcb12 save area (L2's state) in the same blob, beside L1's save area and L1's
guest-visible CR0/CR3/CR4/EFER, so restoring it is exactly a nested VMRUN from that vmcb12 on
top of that L1 state. It keeps the 128-byte kvm_nested_state header shape (flags, format and
size at 0, hdr.svm's vmcb_pa and gpat at 8 and 16), so the generic KVM_SET_NESTED_STATE checks
(`GENERIC_RULES`) apply to it unchanged. Layout, numbers and the versioning rule:
docs/nested-state-svm-v2.md.

    >>> v2 = kvm_to_v2(bytes.fromhex("00010100") + (128).to_bytes(4, "little") + bytes(120), b"")
    >>> len(v2), v2[2:4].hex(), version(v2)
    (128, '564e', 1)
    >>> v2_to_kvm(v2)[0][:8].hex()
    '0001010080000000'
"""

from __future__ import annotations

import errno
import struct

from ..arch import kvm_uapi as U
from ..arch import svm as S
from .nested_state import (
    HEADER,
    HEADER_SIZE,
    SVM_CONTROL_OFFSET,
    SVM_MAX_SIZE,
    SVM_RULES,
    SVM_SAVE_OFFSET,
    NestedState,
    Rule,
)

# Outside KVM's numbering (0 VMX, 1 SVM, allocated upwards) so no future KVM format can collide
# with it; its bytes spell "VN" in a little-endian dump and it reads "NV" (nestvisor) as a word.
KVM_STATE_NESTED_FORMAT_SVM_V2 = 0x4E56
VERSION = 1

# hdr.svm_v2, after hdr.svm's vmcb_pa (8) and gpat (16): version, control area size, save area size
V2_HDR_OFFSET = 24
V2_HDR = struct.Struct("<IHH")
V2_RESERVED_OFFSET = V2_HDR_OFFSET + V2_HDR.size       # header bytes 32..127: zero in version 1

CONTROL_OFFSET = HEADER_SIZE                           # vmcb12 control area
VMCB12_SAVE_OFFSET = CONTROL_OFFSET + S.CONTROL_SIZE   # vmcb12 save area (L2's state)
VMCB01_SAVE_OFFSET = VMCB12_SAVE_OFFSET + S.SAVE_SIZE  # vmcb01 save area (L1's state)
L1_REGS_OFFSET = VMCB01_SAVE_OFFSET + S.SAVE_SIZE      # L1's guest-visible control registers
L1_REGS = struct.Struct("<QQQQ")
L1_REGS_NAMES = ("cr0", "cr3", "cr4", "efer")
V2_SIZE = L1_REGS_OFFSET + L1_REGS.size

assert V2_HDR.size == 8 and S.SAVE_SIZE == 744
assert (VMCB12_SAVE_OFFSET, VMCB01_SAVE_OFFSET, L1_REGS_OFFSET, V2_SIZE) == (1152, 1896, 2640, 2672)
# KVM's SVM blob: the vmcb12 page after the save area is zero (svm_get_nested_state's clear_user)
KVM_TAIL_OFFSET = SVM_SAVE_OFFSET + S.SAVE_SIZE


def version(blob: bytes) -> int:
    """hdr.svm_v2.version of a blob of at least 128 bytes."""
    return int(V2_HDR.unpack_from(blob, V2_HDR_OFFSET)[0])


def area_sizes(blob: bytes) -> tuple[int, int]:
    """hdr.svm_v2's (control area size, save area size)."""
    _, control, save = V2_HDR.unpack_from(blob, V2_HDR_OFFSET)
    return control, save


def l1_regs(blob: bytes) -> dict[str, int]:
    """L1's guest-visible CR0, CR3, CR4 and EFER of a full svm-v2 blob."""
    return dict(zip(L1_REGS_NAMES, L1_REGS.unpack_from(blob, L1_REGS_OFFSET), strict=True))


def _fail(path: str, why: str) -> ValueError:
    return ValueError(f"{path}: {why}")


def _save_cr(save: bytes, name: str) -> int:
    off, size = S.SAVE[name]
    return int.from_bytes(save[off:off + size], "little")


def _header(flags: int, fmt: int, size: int, vmcb_pa: int, gpat: int, v2: bool) -> bytearray:
    out = bytearray(HEADER_SIZE)
    HEADER.pack_into(out, 0, flags, fmt, size)
    struct.pack_into("<QQ", out, 8, vmcb_pa, gpat)
    if v2:
        V2_HDR.pack_into(out, V2_HDR_OFFSET, VERSION, S.CONTROL_SIZE, S.SAVE_SIZE)
    return out


def kvm_to_v2(kvm_blob: bytes, l2_save: bytes) -> bytes:
    """svm-v2 from KVM's SVM blob and L2's 744-byte save area (the vCPU's current state, APM
    layout; ignored when the blob is the header alone). KVM's save area is vmcb01's, whose
    CR0/CR3/CR4/EFER slots hold L1's guest-visible values (nested_svm_vmrun writes them there
    before entering L2), so both v2 L1 areas come from it. Bytes KVM's GET always writes as
    zero (hdr after gpat, the vmcb12 page after the save area) must be zero: v2 has no room
    for them, and the conversion is exact only because they are.
    """
    ns = NestedState.decode(kvm_blob)
    if ns.format != U.KVM_STATE_NESTED_FORMAT_SVM:
        raise _fail("format", f"{ns.format:#x} is not KVM_STATE_NESTED_FORMAT_SVM (1)")
    if ns.size != len(kvm_blob):
        raise _fail("size", f"{ns.size} but the blob has {len(kvm_blob)} bytes")
    if ns.size not in (HEADER_SIZE, SVM_MAX_SIZE):
        raise _fail("size", f"{ns.size} is neither the header alone (128) nor header and vmcb12 (4224)")
    if any(kvm_blob[V2_HDR_OFFSET:HEADER_SIZE]):
        raise _fail("hdr.svm", "bytes 24..127 are not zero (KVM's GET writes zeros there)")
    if ns.size == HEADER_SIZE:
        return bytes(_header(ns.flags, KVM_STATE_NESTED_FORMAT_SVM_V2, HEADER_SIZE, ns.vmcb_pa, ns.gpat, True))
    if any(kvm_blob[KVM_TAIL_OFFSET:]):
        raise _fail("data.svm.vmcb12", f"bytes {KVM_TAIL_OFFSET}..{SVM_MAX_SIZE - 1} after the save area "
                    "are not zero (KVM's GET clears them)")
    if len(l2_save) != S.SAVE_SIZE:
        raise _fail("l2_save", f"{len(l2_save)} bytes, the APM save area is {S.SAVE_SIZE}")
    out = _header(ns.flags, KVM_STATE_NESTED_FORMAT_SVM_V2, V2_SIZE, ns.vmcb_pa, ns.gpat, True)
    l1_save = kvm_blob[SVM_SAVE_OFFSET:KVM_TAIL_OFFSET]
    out += kvm_blob[SVM_CONTROL_OFFSET:SVM_SAVE_OFFSET] + l2_save + l1_save
    out += L1_REGS.pack(*(_save_cr(l1_save, name) for name in L1_REGS_NAMES))
    return bytes(out)


def check_layout(v2_blob: bytes) -> None:
    """ValueError naming the field unless the blob has svm-v2's version-1 layout."""
    if len(v2_blob) < HEADER_SIZE:
        raise _fail("size", f"{len(v2_blob)} bytes, the header alone is {HEADER_SIZE}")
    ns = NestedState.decode(v2_blob)
    if ns.format != KVM_STATE_NESTED_FORMAT_SVM_V2:
        raise _fail("format", f"{ns.format:#x} is not svm-v2 ({KVM_STATE_NESTED_FORMAT_SVM_V2:#x})")
    if version(v2_blob) != VERSION:
        raise _fail("hdr.svm_v2.version", f"{version(v2_blob)}; this reader knows version {VERSION} only")
    if area_sizes(v2_blob) != (S.CONTROL_SIZE, S.SAVE_SIZE):
        raise _fail("hdr.svm_v2", f"area sizes {area_sizes(v2_blob)}, expected ({S.CONTROL_SIZE}, {S.SAVE_SIZE})")
    if any(v2_blob[V2_RESERVED_OFFSET:HEADER_SIZE]):
        raise _fail("hdr.svm_v2", f"reserved bytes {V2_RESERVED_OFFSET}..127 are not zero")
    if ns.size != len(v2_blob):
        raise _fail("size", f"{ns.size} but the blob has {len(v2_blob)} bytes")
    if ns.size not in (HEADER_SIZE, V2_SIZE):
        raise _fail("size", f"{ns.size} is neither the header alone (128) nor the full layout ({V2_SIZE})")


def v2_to_kvm(v2_blob: bytes) -> tuple[bytes, bytes]:
    """KVM's SVM blob and L2's save area (b"" for a header-only blob) from svm-v2. KVM's save
    area gets vmcb01's save area with L1's guest-visible CR0/CR3/CR4/EFER in its slots, which
    is what KVM's GET would have written; vmcb01's own values of those four are not in KVM's
    format. So kvm_to_v2(v2_to_kvm(b)) == b exactly when they equal the guest-visible ones,
    and v2_to_kvm(kvm_to_v2(k, s)) == (k, s) always.
    """
    check_layout(v2_blob)
    ns = NestedState.decode(v2_blob)
    if ns.size == HEADER_SIZE:
        return bytes(_header(ns.flags, U.KVM_STATE_NESTED_FORMAT_SVM, HEADER_SIZE, ns.vmcb_pa, ns.gpat, False)), b""
    out = _header(ns.flags, U.KVM_STATE_NESTED_FORMAT_SVM, SVM_MAX_SIZE, ns.vmcb_pa, ns.gpat, False)
    save = bytearray(v2_blob[VMCB01_SAVE_OFFSET:L1_REGS_OFFSET])
    for name, value in l1_regs(v2_blob).items():
        off, size = S.SAVE[name]
        save[off:off + size] = value.to_bytes(size, "little")
    out += v2_blob[CONTROL_OFFSET:VMCB12_SAVE_OFFSET] + save
    out += bytes(SVM_MAX_SIZE - len(out))
    return bytes(out), v2_blob[VMCB12_SAVE_OFFSET:VMCB01_SAVE_OFFSET]


def _u(ns: NestedState, offset: int, size: int = 8) -> int:
    return int.from_bytes(ns.data(offset, size), "little")


def _full(ns: NestedState) -> bool:
    return ns.size >= V2_SIZE


def _guest(ns: NestedState) -> bool:
    return bool(ns.flags & _GM)


_EINVAL, _GM = errno.EINVAL, U.KVM_STATE_NESTED_GUEST_MODE
_CR0_PE, _CR0_NW, _CR0_CD, _CR0_PG = 1, 1 << 29, 1 << 30, 1 << 31
_EFER_SVME = 1 << 12
_RFLAGS_VM = 1 << 17
_L1_CR0 = L1_REGS_OFFSET
_L1_EFER = L1_REGS_OFFSET + 24
_L1_RFLAGS = VMCB01_SAVE_OFFSET + S.SAVE["rflags"][0]
_L2_CR0 = VMCB12_SAVE_OFFSET + S.SAVE["cr0"][0]

# What nestvisor's SET of an svm-v2 blob checks after GENERIC_RULES, in this order: the layout
# first (a reader must not interpret bytes of a layout it does not know), then
# svm_set_nested_state's rules on the same fields, reading L2's CR0 from the blob where KVM reads
# the vCPU's. The VMCB entry checks (nested_vmcb_check_controls/_save) are kvm/svm's.
SVM_V2_RULES = (
    Rule("format: not svm-v2 (0x4e56)", "svm-v2 (svm_set_nested_state)", _EINVAL,
         lambda ns, f: ns.format != KVM_STATE_NESTED_FORMAT_SVM_V2),
    Rule("hdr.svm_v2.version: not 1 (a newer version may carry state this reader cannot restore)",
         "svm-v2", _EINVAL,
         lambda ns, f: _u(ns, V2_HDR_OFFSET, 4) != VERSION),
    Rule("hdr.svm_v2.control_size: not the 1024-byte VMCB control area", "svm-v2", _EINVAL,
         lambda ns, f: _u(ns, V2_HDR_OFFSET + 4, 2) != S.CONTROL_SIZE),
    Rule("hdr.svm_v2.save_size: not the 744-byte APM save area", "svm-v2", _EINVAL,
         lambda ns, f: _u(ns, V2_HDR_OFFSET + 6, 2) != S.SAVE_SIZE),
    Rule("hdr.svm_v2: reserved bytes 32..127 are not zero", "svm-v2", _EINVAL,
         lambda ns, f: any(ns.data(V2_RESERVED_OFFSET, HEADER_SIZE - V2_RESERVED_OFFSET))),
    Rule(f"size: neither the header alone (128) nor the full layout ({V2_SIZE})", "svm-v2", _EINVAL,
         lambda ns, f: ns.size not in (HEADER_SIZE, V2_SIZE)),
    *SVM_RULES[1:4],   # KVM's flags rules, unchanged: flags, EFER.SVME, SMM
    Rule("size: GUEST_MODE without the vmcb12 and L1 areas", "svm_set_nested_state", _EINVAL,
         lambda ns, f: _guest(ns) and not _full(ns)),
    SVM_RULES[4],      # hdr.svm.vmcb_pa, where KVM's format has it
    Rule("data.vmcb12.save.cr0 (L2's): NW=1 with CD=0", "svm_set_nested_state", _EINVAL,
         lambda ns, f: _guest(ns) and _full(ns) and bool(_u(ns, _L2_CR0) & _CR0_NW)
         and not _u(ns, _L2_CR0) & _CR0_CD),
    Rule("data.l1.cr0 (L1's guest-visible): PG or PE clear", "svm_set_nested_state", _EINVAL,
         lambda ns, f: _guest(ns) and _full(ns) and _u(ns, _L1_CR0) & (_CR0_PG | _CR0_PE) != _CR0_PG | _CR0_PE),
    Rule("data.vmcb01.save.rflags (L1's): VM set", "svm_set_nested_state", _EINVAL,
         lambda ns, f: _guest(ns) and _full(ns) and bool(_u(ns, _L1_RFLAGS) & _RFLAGS_VM)),
    Rule("data.l1.efer (L1's guest-visible): SVME clear", "nested_vmcb_check_save", _EINVAL,
         lambda ns, f: _guest(ns) and _full(ns) and not _u(ns, _L1_EFER) & _EFER_SVME),
)
