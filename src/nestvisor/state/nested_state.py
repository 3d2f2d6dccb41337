"""struct kvm_nested_state as bytes, and the rules KVM_SET_NESTED_STATE applies to it.

One declaration per part (precompiled `struct.Struct`s at fixed offsets): the 128-byte
header (flags, format, size and the vendor header), the VMX data (vmcs12 at 128, the shadow
vmcs12 at 4224) and the SVM data (vmcb12's control area at 128, its save area at 1152).
`NestedState.decode` keeps the blob's bytes, so padding and unknown bytes round-trip
unchanged; `encode` writes the fields back over them.

The rules are data: one `Rule` per row of KVM's checks (kvm_arch_vcpu_ioctl, then
vmx_set_nested_state or svm_set_nested_state), in KVM's order, each a predicate over the
blob and the facts of the vCPU it is loaded into (`VcpuFacts`). `first_violation` is what
SET reports; `violations` lists every rule a blob breaks (`nestvisor state validate`). The
rules that need the VMCS/VMCB entry checks live beside those checks in `kvm/`; these are the
ones a blob can be judged by on its own. Facts: shared/reference/kvm-nested-abi.md §1, §4,
§10.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ..arch import kvm_uapi as U
from ..arch import svm as S
from ..arch import vmcs as V
from ..arch import vmx as X

HEADER_SIZE = 128
HEADER = struct.Struct("<HHI")        # flags (u16), format (u16), size (u32)
VMX_HDR = struct.Struct("<QQHHIQ")    # vmxon_pa, vmcs12_pa, smm.flags, pad, flags, preemption_timer_deadline
SVM_HDR = struct.Struct("<QQ")        # vmcb_pa, gpat
HDR_OFFSET = 8
VMX_VMCS12_OFFSET = HEADER_SIZE
VMX_SHADOW_OFFSET = HEADER_SIZE + U.KVM_STATE_NESTED_VMX_VMCS_SIZE
VMX_MAX_SIZE = HEADER_SIZE + 2 * U.KVM_STATE_NESTED_VMX_VMCS_SIZE
SVM_CONTROL_OFFSET = HEADER_SIZE
SVM_SAVE_OFFSET = HEADER_SIZE + S.SAVE_OFFSET
SVM_MAX_SIZE = HEADER_SIZE + U.KVM_STATE_NESTED_SVM_VMCB_SIZE
# sizeof(struct vmcs12) as SET copies it: the thresholds 1126 and 5222 follow from it
VMCS12_STRUCT_SIZE = 998
INVALID_GPA = 0xFFFFFFFFFFFFFFFF

assert HEADER_SIZE == 128 and VMX_HDR.size == 32 and SVM_HDR.size == 16
assert VMX_MAX_SIZE == 8320 and SVM_MAX_SIZE == 4224 and VMX_SHADOW_OFFSET == 4224
assert S.CONTROL_SIZE == 1024 and SVM_SAVE_OFFSET == 1152

# kvm_arch_vcpu_ioctl(KVM_SET_NESTED_STATE): the flags any vendor may see
GENERIC_FLAGS = (U.KVM_STATE_NESTED_RUN_PENDING | U.KVM_STATE_NESTED_GUEST_MODE | U.KVM_STATE_NESTED_EVMCS
                 | U.KVM_STATE_NESTED_MTF_PENDING | U.KVM_STATE_NESTED_GIF_SET)
SVM_FLAGS = U.KVM_STATE_NESTED_GUEST_MODE | U.KVM_STATE_NESTED_RUN_PENDING | U.KVM_STATE_NESTED_GIF_SET
SMM_FLAGS = U.KVM_STATE_NESTED_SMM_GUEST_MODE | U.KVM_STATE_NESTED_SMM_VMXON

FORMAT_NAMES = {U.KVM_STATE_NESTED_FORMAT_VMX: "vmx", U.KVM_STATE_NESTED_FORMAT_SVM: "svm"}
FLAG_NAMES = {U.KVM_STATE_NESTED_GUEST_MODE: "GUEST_MODE", U.KVM_STATE_NESTED_RUN_PENDING: "RUN_PENDING",
              U.KVM_STATE_NESTED_EVMCS: "EVMCS", U.KVM_STATE_NESTED_MTF_PENDING: "MTF_PENDING",
              U.KVM_STATE_NESTED_GIF_SET: "GIF_SET"}


@dataclass
class NestedState:
    """A decoded struct kvm_nested_state; `raw` is the blob it came from (or zeros)."""

    flags: int = 0
    format: int = U.KVM_STATE_NESTED_FORMAT_VMX
    size: int = HEADER_SIZE
    # hdr.vmx
    vmxon_pa: int = INVALID_GPA
    vmcs12_pa: int = INVALID_GPA
    smm_flags: int = 0
    vmx_pad: int = 0
    vmx_flags: int = 0
    preemption_timer_deadline: int = 0
    # hdr.svm (the same bytes as hdr.vmx: a union)
    raw: bytes = field(default=bytes(HEADER_SIZE), repr=False)

    @classmethod
    def decode(cls, blob: bytes | bytearray | memoryview) -> NestedState:
        """The header's fields; `blob` must hold at least the 128-byte header."""
        raw = bytes(blob)
        if len(raw) < HEADER_SIZE:
            raise ValueError(f"kvm_nested_state: {len(raw)} bytes, the header alone is {HEADER_SIZE}")
        flags, fmt, size = HEADER.unpack_from(raw, 0)
        vmxon, vmcs12, smm, pad, vflags, deadline = VMX_HDR.unpack_from(raw, HDR_OFFSET)
        return cls(flags, fmt, size, vmxon, vmcs12, smm, pad, vflags, deadline, raw)

    def encode(self) -> bytes:
        """The blob: `raw` with the header fields written over it, `size` bytes long."""
        out = bytearray(self.raw[:self.size].ljust(self.size, b"\0"))
        HEADER.pack_into(out, 0, self.flags, self.format, self.size)
        VMX_HDR.pack_into(out, HDR_OFFSET, self.vmxon_pa, self.vmcs12_pa, self.smm_flags, self.vmx_pad,
                          self.vmx_flags, self.preemption_timer_deadline)
        return bytes(out)

    # hdr.svm shares the union's first bytes with hdr.vmx
    @property
    def vmcb_pa(self) -> int:
        return self.vmxon_pa

    @vmcb_pa.setter
    def vmcb_pa(self, value: int) -> None:
        self.vmxon_pa = value

    @property
    def gpat(self) -> int:
        return self.vmcs12_pa

    @gpat.setter
    def gpat(self, value: int) -> None:
        self.vmcs12_pa = value

    def data(self, offset: int, size: int) -> bytes:
        """`size` bytes of the data area at blob `offset`, zero-filled past the end."""
        return self.raw[offset:offset + size].ljust(size, b"\0")

    def with_data(self, offset: int, data: bytes) -> NestedState:
        raw = bytearray(self.raw.ljust(offset + len(data), b"\0"))
        raw[offset:offset + len(data)] = data
        return replace(self, raw=bytes(raw))

    def flag_names(self) -> list[str]:
        return [name for bit, name in FLAG_NAMES.items() if self.flags & bit] + \
            ([f"{self.flags & ~GENERIC_FLAGS:#x}"] if self.flags & ~GENERIC_FLAGS else [])


@dataclass(frozen=True)
class VcpuFacts:
    """What the rules need from the vCPU a blob is loaded into (its CPUID and current state)."""

    has_vmx: bool = False
    has_svm: bool = False
    maxphyaddr: int = 40
    in_smm: bool = False
    efer_svme: bool = False
    cr0: int = 0x60000010      # the reset value (SDM 10.1.1 Table 10-1)


@dataclass(frozen=True)
class Rule:
    name: str        # what is wrong, with the field path
    source: str      # KVM function
    errno: int
    broken: Callable[[NestedState, VcpuFacts], bool]


@dataclass(frozen=True)
class Violation:
    rule: Rule

    @property
    def errno(self) -> int:
        return self.rule.errno

    def __str__(self) -> str:
        return f"{self.rule.name} ({self.rule.source})"


def page_address_valid(gpa: int, maxphyaddr: int) -> bool:
    """KVM page_address_valid: 4 KiB aligned and below MAXPHYADDR."""
    return not gpa & 0xFFF and not gpa >> maxphyaddr


def _revision(raw: bytes) -> int:
    # KVM compares the 31-bit revision_id bitfield: the shadow bit is not part of it
    return int.from_bytes(raw[:4], "little") & ~V.SHADOW_VMCS_BIT


def _vmcs12_u(ns: NestedState, name: str, base: int = VMX_VMCS12_OFFSET) -> int:
    f = V.BY_NAME[name]
    return int.from_bytes(ns.data(base + f.offset, f.size), "little")


def vmcs12_shadowing(ns: NestedState) -> bool:
    """vmcs12 enables VMCS shadowing with a link pointer (the shadow vmcs12 travels too)."""
    cpu = _vmcs12_u(ns, "cpu_based_vm_exec_control")
    sec = _vmcs12_u(ns, "secondary_vm_exec_control") if cpu & X.CPU_ACTIVATE_SECONDARY else 0
    return bool(sec & X.SEC_SHADOW_VMCS) and _vmcs12_u(ns, "vmcs_link_pointer") != INVALID_GPA


_GM, _RP = U.KVM_STATE_NESTED_GUEST_MODE, U.KVM_STATE_NESTED_RUN_PENDING
_SMM_GM, _SMM_VMXON = U.KVM_STATE_NESTED_SMM_GUEST_MODE, U.KVM_STATE_NESTED_SMM_VMXON
_EINVAL = errno.EINVAL

# kvm_arch_vcpu_ioctl(KVM_SET_NESTED_STATE), before the vendor code (§1.6)
GENERIC_RULES = (
    Rule("size: smaller than the 128-byte header", "kvm_arch_vcpu_ioctl", _EINVAL,
         lambda ns, f: ns.size < HEADER_SIZE),
    Rule("flags: bits outside RUN_PENDING|GUEST_MODE|EVMCS|MTF_PENDING|GIF_SET", "kvm_arch_vcpu_ioctl", _EINVAL,
         lambda ns, f: bool(ns.flags & ~GENERIC_FLAGS)),
    Rule("flags: RUN_PENDING without GUEST_MODE", "kvm_arch_vcpu_ioctl", _EINVAL,
         lambda ns, f: bool(ns.flags & _RP) and not ns.flags & _GM),
)


def _vmx_on(ns: NestedState) -> bool:
    return ns.vmxon_pa != INVALID_GPA


def _vmx_needs_vmcs12(ns: NestedState) -> bool:
    """Rows 12-13: the blob claims a current VMCS (so the vmcs12 data must be there)."""
    return _vmx_on(ns) and (bool(ns.flags & (_GM | U.KVM_STATE_NESTED_EVMCS)) or ns.vmcs12_pa != INVALID_GPA)


def _vmx_has_vmcs12(ns: NestedState) -> bool:
    return _vmx_on(ns) and ns.size >= HEADER_SIZE + VMCS12_STRUCT_SIZE and ns.vmcs12_pa != INVALID_GPA


def _vmx_has_shadow(ns: NestedState) -> bool:
    return _vmx_has_vmcs12(ns) and bool(ns.flags & _GM) and vmcs12_shadowing(ns)


# vmx_set_nested_state, rows 1-19 of §4 (the entry checks, rows 21-23, are kvm/vmx's)
VMX_RULES = (
    Rule("format: not KVM_STATE_NESTED_FORMAT_VMX", "vmx_set_nested_state", _EINVAL,
         lambda ns, f: ns.format != U.KVM_STATE_NESTED_FORMAT_VMX),
    Rule("hdr.vmx.smm.flags: set without VMXON (vmxon_pa is -1)", "vmx_set_nested_state", _EINVAL,
         lambda ns, f: not _vmx_on(ns) and ns.smm_flags != 0),
    Rule("hdr.vmx.vmcs12_pa: set without VMXON (vmxon_pa is -1)", "vmx_set_nested_state", _EINVAL,
         lambda ns, f: not _vmx_on(ns) and ns.vmcs12_pa != INVALID_GPA),
    Rule("flags: nested flags without VMXON (vmxon_pa is -1)", "vmx_set_nested_state", _EINVAL,
         lambda ns, f: not _vmx_on(ns) and bool(ns.flags & ~U.KVM_STATE_NESTED_EVMCS)),
    Rule("hdr.vmx.vmxon_pa: the vCPU's CPUID has no VMX", "vmx_set_nested_state", _EINVAL,
         lambda ns, f: _vmx_on(ns) and not f.has_vmx),
    Rule("hdr.vmx.vmxon_pa: not page aligned or beyond MAXPHYADDR", "vmx_set_nested_state", _EINVAL,
         lambda ns, f: _vmx_on(ns) and not page_address_valid(ns.vmxon_pa, f.maxphyaddr)),
    Rule("hdr.vmx.smm.flags: SMM_GUEST_MODE together with flags GUEST_MODE", "vmx_set_nested_state", _EINVAL,
         lambda ns, f: bool(ns.smm_flags & _SMM_GM) and bool(ns.flags & _GM)),
    Rule("hdr.vmx.smm.flags: bits outside SMM_GUEST_MODE|SMM_VMXON", "vmx_set_nested_state", _EINVAL,
         lambda ns, f: bool(ns.smm_flags & ~SMM_FLAGS)),
    Rule("hdr.vmx.flags: bits outside PREEMPTION_TIMER_DEADLINE", "vmx_set_nested_state", _EINVAL,
         lambda ns, f: bool(ns.vmx_flags & ~U.KVM_STATE_VMX_PREEMPTION_TIMER_DEADLINE)),
    Rule("flags: GUEST_MODE or RUN_PENDING while the vCPU is in SMM", "vmx_set_nested_state", _EINVAL,
         lambda ns, f: f.in_smm and bool(ns.flags & (_GM | _RP))),
    Rule("hdr.vmx.smm.flags: set while the vCPU is not in SMM", "vmx_set_nested_state", _EINVAL,
         lambda ns, f: not f.in_smm and ns.smm_flags != 0),
    Rule("hdr.vmx.smm.flags: SMM_GUEST_MODE without SMM_VMXON", "vmx_set_nested_state", _EINVAL,
         lambda ns, f: bool(ns.smm_flags & _SMM_GM) and not ns.smm_flags & _SMM_VMXON),
    Rule("flags: EVMCS, and enlightened VMCS is not enabled", "vmx_set_nested_state", _EINVAL,
         lambda ns, f: bool(ns.flags & U.KVM_STATE_NESTED_EVMCS)),
    Rule("size: no room for vmcs12 (128 + 998 bytes) with GUEST_MODE, EVMCS or a vmcs12_pa",
         "vmx_set_nested_state", _EINVAL,
         lambda ns, f: _vmx_needs_vmcs12(ns) and ns.size < HEADER_SIZE + VMCS12_STRUCT_SIZE),
    Rule("hdr.vmx.vmcs12_pa: equal to vmxon_pa, or not page aligned or beyond MAXPHYADDR",
         "vmx_set_nested_state", _EINVAL,
         lambda ns, f: _vmx_has_vmcs12(ns) and (ns.vmcs12_pa == ns.vmxon_pa
                                               or not page_address_valid(ns.vmcs12_pa, f.maxphyaddr))),
    Rule("hdr.vmx.vmcs12_pa: -1 in a blob that carries vmcs12 data", "vmx_set_nested_state", _EINVAL,
         lambda ns, f: _vmx_on(ns) and ns.size >= HEADER_SIZE + VMCS12_STRUCT_SIZE and ns.vmcs12_pa == INVALID_GPA),
    Rule("data.vmx.vmcs12: revision_id is not 0x11e57ed0", "vmx_set_nested_state", _EINVAL,
         lambda ns, f: _vmx_has_vmcs12(ns) and _revision(ns.data(VMX_VMCS12_OFFSET, 4)) != V.VMCS12_REVISION),
    Rule("size: no room for the shadow vmcs12 (128 + 4096 + 998 bytes) that vmcs12 enables",
         "vmx_set_nested_state", _EINVAL,
         lambda ns, f: _vmx_has_shadow(ns) and ns.size < VMX_SHADOW_OFFSET + VMCS12_STRUCT_SIZE),
    Rule("data.vmx.shadow_vmcs12: revision_id is not 0x11e57ed0 or the shadow-VMCS bit is clear",
         "vmx_set_nested_state", _EINVAL,
         lambda ns, f: _vmx_has_shadow(ns) and ns.size >= VMX_SHADOW_OFFSET + VMCS12_STRUCT_SIZE
         and (_revision(ns.data(VMX_SHADOW_OFFSET, 4)) != V.VMCS12_REVISION
              or not int.from_bytes(ns.data(VMX_SHADOW_OFFSET, 4), "little") & V.SHADOW_VMCS_BIT)),
)


def _svm_guest(ns: NestedState) -> bool:
    return bool(ns.flags & _GM)


def svm_save_u(ns: NestedState, name: str) -> int:
    off, size = S.SAVE[name]
    return int.from_bytes(ns.data(SVM_SAVE_OFFSET + off, size), "little")


def svm_control_u(ns: NestedState, name: str) -> int:
    off, size = S.CONTROL[name]
    return int.from_bytes(ns.data(SVM_CONTROL_OFFSET + off, size), "little")


_CR0_PE, _CR0_NW, _CR0_CD, _CR0_PG = 1, 1 << 29, 1 << 30, 1 << 31
_RFLAGS_VM = 1 << 17

# svm_set_nested_state, rows 1-12 of §10.2 that need no VMCB checks (10 and 12's
# nested_vmcb_check_controls/_save are kvm/svm's)
SVM_RULES = (
    Rule("format: not KVM_STATE_NESTED_FORMAT_SVM", "svm_set_nested_state", _EINVAL,
         lambda ns, f: ns.format != U.KVM_STATE_NESTED_FORMAT_SVM),
    Rule("flags: bits outside GUEST_MODE|RUN_PENDING|GIF_SET", "svm_set_nested_state", _EINVAL,
         lambda ns, f: bool(ns.flags & ~SVM_FLAGS)),
    Rule("flags: other than 0 or GIF_SET while the vCPU's EFER.SVME is 0", "svm_set_nested_state", _EINVAL,
         lambda ns, f: not f.efer_svme and ns.flags not in (0, U.KVM_STATE_NESTED_GIF_SET)),
    Rule("flags: GUEST_MODE while the vCPU is in SMM", "svm_set_nested_state", _EINVAL,
         lambda ns, f: f.in_smm and _svm_guest(ns)),
    Rule("hdr.svm.vmcb_pa: not page aligned or beyond MAXPHYADDR", "svm_set_nested_state", _EINVAL,
         lambda ns, f: _svm_guest(ns) and not page_address_valid(ns.vmcb_pa, f.maxphyaddr)),
    Rule("size: no room for the 4096-byte vmcb12 with GUEST_MODE", "svm_set_nested_state", _EINVAL,
         lambda ns, f: _svm_guest(ns) and ns.size < SVM_MAX_SIZE),
)

# after nested_vmcb_check_controls (row 10), rows 11-12 of §10.2
SVM_STATE_RULES = (
    Rule("the vCPU's current CR0 (L2's) has NW=1 with CD=0", "svm_set_nested_state", _EINVAL,
         lambda ns, f: _svm_guest(ns) and bool(f.cr0 & _CR0_NW) and not f.cr0 & _CR0_CD),
    Rule("data.svm.save (L1's state): CR0.PG or CR0.PE clear, or RFLAGS.VM set", "svm_set_nested_state", _EINVAL,
         lambda ns, f: _svm_guest(ns) and (not svm_save_u(ns, "cr0") & _CR0_PG or not svm_save_u(ns, "cr0") & _CR0_PE
                                          or bool(svm_save_u(ns, "rflags") & _RFLAGS_VM))),
)


def violations(rules: tuple[Rule, ...], ns: NestedState, facts: VcpuFacts) -> list[Violation]:
    """Every rule of `rules` the blob breaks, in order."""
    return [Violation(r) for r in rules if r.broken(ns, facts)]


def first_violation(rules: tuple[Rule, ...], ns: NestedState, facts: VcpuFacts) -> Violation | None:
    """The rule KVM's SET stops at, or None."""
    for r in rules:
        if r.broken(ns, facts):
            return Violation(r)
    return None
