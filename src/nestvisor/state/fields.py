"""Every field of a nested-state blob by name: the header, vmcs12 (and the shadow vmcs12), or
vmcb12's control area and the save areas, for KVM's VMX and SVM formats and svm-v2.

Only the areas the blob holds are decoded (an area is there when both the header's `size` and
the blob's length cover it), so a header-only blob gives the header fields alone. Names come
from the arch tables (`arch.vmcs.FIELDS`, `arch.svm.CONTROL_FIELDS`/`SAVE_FIELDS`); a field of
1, 2, 4 or 8 bytes is an int, a wider one (reserved space, insn_bytes) is bytes. Display is the
caller's.

    >>> blob = bytes.fromhex("00000000") + (128).to_bytes(4, "little") + b"\\xff" * 16 + bytes(104)
    >>> [(f.path, hex(f.value)) for f in decode(blob)][3:5]
    [('hdr.vmx.vmxon_pa', '0xffffffffffffffff'), ('hdr.vmx.vmcs12_pa', '0xffffffffffffffff')]
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from ..arch import kvm_uapi as U
from ..arch import svm as S
from ..arch import vmcs as V
from . import svm_v2 as V2
from .nested_state import (
    HEADER_SIZE,
    SVM_CONTROL_OFFSET,
    SVM_SAVE_OFFSET,
    VMCS12_STRUCT_SIZE,
    VMX_SHADOW_OFFSET,
    VMX_VMCS12_OFFSET,
    NestedState,
)

FORMATS = {U.KVM_STATE_NESTED_FORMAT_VMX: "vmx", U.KVM_STATE_NESTED_FORMAT_SVM: "svm",
           V2.KVM_STATE_NESTED_FORMAT_SVM_V2: "svm-v2"}

Value = int | bytes


@dataclass(frozen=True)
class Field:
    area: str      # "header", "vmcs12", "shadow_vmcs12", "vmcb12.control", "vmcb12.save", "vmcb01.save", "l1"
    name: str      # the member name inside the area ("hdr.vmx.vmcs12_pa", "guest_rip", "cs.selector")
    offset: int    # in the blob
    size: int
    value: Value

    @property
    def path(self) -> str:
        return self.name if self.area == "header" else f"{self.area}.{self.name}"


# (name, offset, size) rows of each part, offsets relative to the part
_Rows = tuple[tuple[str, int, int], ...]

HEADER_ROWS: _Rows = (("flags", 0, 2), ("format", 2, 2), ("size", 4, 4))
VMX_HDR_ROWS: _Rows = (("hdr.vmx.vmxon_pa", 8, 8), ("hdr.vmx.vmcs12_pa", 16, 8), ("hdr.vmx.smm.flags", 24, 2),
                       ("hdr.vmx.pad", 26, 2), ("hdr.vmx.flags", 28, 4),
                       ("hdr.vmx.preemption_timer_deadline", 32, 8))
SVM_HDR_ROWS: _Rows = (("hdr.svm.vmcb_pa", 8, 8), ("hdr.svm.gpat", 16, 8))
V2_HDR_ROWS: _Rows = (*SVM_HDR_ROWS, ("hdr.svm_v2.version", 24, 4), ("hdr.svm_v2.control_size", 28, 2),
                      ("hdr.svm_v2.save_size", 30, 2))
# struct vmcs12's words before the fields (vmcs_hdr: revision_id in bits 30:0, shadow_vmcs in
# bit 31; abort; launch_state), then the field table
VMCS12_ROWS: _Rows = (("hdr", V.OFF_REVISION, 4), ("abort", V.OFF_ABORT, 4),
                      ("launch_state", V.OFF_LAUNCH_STATE, 4),
                      *sorted(((f.name, f.offset, f.size) for f in V.FIELDS), key=lambda r: r[1]))
CONTROL_ROWS: _Rows = S.CONTROL_FIELDS
SAVE_ROWS: _Rows = tuple(
    row for name, off, size in S.SAVE_FIELDS
    for row in ([(f"{name}.{sub}", off + o, s) for sub, o, s in S.SEG_FIELDS] if name in S.SEGMENTS
                else [(name, off, size)]))
L1_ROWS: _Rows = tuple((name, 8 * i, 8) for i, name in enumerate(V2.L1_REGS_NAMES))

# the data areas of each format: (area, blob offset, bytes the area needs to be there, rows)
_Area = tuple[str, int, int, _Rows]
_AREAS: dict[int, tuple[_Area, ...]] = {
    # KVM SET reads sizeof(struct vmcs12) = 998 bytes of each: that is what must be there
    U.KVM_STATE_NESTED_FORMAT_VMX: (("vmcs12", VMX_VMCS12_OFFSET, VMCS12_STRUCT_SIZE, VMCS12_ROWS),
                                    ("shadow_vmcs12", VMX_SHADOW_OFFSET, VMCS12_STRUCT_SIZE, VMCS12_ROWS)),
    # KVM's SVM save area is vmcb01's (L1's state), not vmcb12's
    U.KVM_STATE_NESTED_FORMAT_SVM: (("vmcb12.control", SVM_CONTROL_OFFSET, S.CONTROL_SIZE, CONTROL_ROWS),
                                    ("vmcb01.save", SVM_SAVE_OFFSET, S.SAVE_SIZE, SAVE_ROWS)),
    V2.KVM_STATE_NESTED_FORMAT_SVM_V2: (("vmcb12.control", V2.CONTROL_OFFSET, S.CONTROL_SIZE, CONTROL_ROWS),
                                        ("vmcb12.save", V2.VMCB12_SAVE_OFFSET, S.SAVE_SIZE, SAVE_ROWS),
                                        ("vmcb01.save", V2.VMCB01_SAVE_OFFSET, S.SAVE_SIZE, SAVE_ROWS),
                                        ("l1", V2.L1_REGS_OFFSET, V2.L1_REGS.size, L1_ROWS)),
}
_HDR_ROWS = {U.KVM_STATE_NESTED_FORMAT_VMX: VMX_HDR_ROWS, U.KVM_STATE_NESTED_FORMAT_SVM: SVM_HDR_ROWS,
             V2.KVM_STATE_NESTED_FORMAT_SVM_V2: V2_HDR_ROWS}


def check_blob(blob: bytes) -> NestedState:
    """The decoded header; ValueError with one sentence when the blob cannot be read as a
    nested state: shorter than the header or than its `size`, a `size` smaller than the header,
    or a format nobody defines."""
    if len(blob) < HEADER_SIZE:
        raise ValueError(f"truncated: {len(blob)} bytes, the kvm_nested_state header alone is {HEADER_SIZE}")
    ns = NestedState.decode(blob)
    if ns.format not in FORMATS:
        known = ", ".join(f"{n} ({v:#x})" for v, n in FORMATS.items())
        raise ValueError(f"format: {ns.format:#x} is none of {known}")
    if ns.size > len(blob):
        raise ValueError(f"truncated: size says {ns.size} bytes, the blob has {len(blob)}")
    if ns.size < HEADER_SIZE:
        raise ValueError(f"size: {ns.size} is smaller than the {HEADER_SIZE}-byte header")
    return ns


def _value(blob: bytes, offset: int, size: int) -> Value:
    raw = blob[offset:offset + size]
    return int.from_bytes(raw, "little") if size in (1, 2, 4, 8) else bytes(raw)


def _fields(blob: bytes, area: str, base: int, rows: _Rows) -> Iterator[Field]:
    for name, off, size in rows:
        yield Field(area, name, base + off, size, _value(blob, base + off, size))


def areas(ns: NestedState, length: int) -> list[_Area]:
    """The data areas of `ns`'s format that its size and the blob's `length` both cover."""
    end = min(ns.size, length)
    return [a for a in _AREAS.get(ns.format, ()) if a[1] + a[2] <= end]


def layout(blob: bytes) -> list[tuple[str, int, int]]:
    """(area, offset, size) of the header and of each area the blob holds."""
    ns = check_blob(blob)
    return [("header", 0, HEADER_SIZE)] + [(a, base, size) for a, base, size, _ in areas(ns, len(blob))]


def decode(blob: bytes) -> list[Field]:
    """Every field of the blob, header first, then each area present in layout order."""
    ns = check_blob(blob)
    out = list(_fields(blob, "header", 0, HEADER_ROWS + _HDR_ROWS[ns.format]))
    for area, base, _, rows in areas(ns, len(blob)):
        out.extend(_fields(blob, area, base, rows))
    return out


def by_path(blob: bytes) -> dict[str, Value]:
    """decode() as a dict, path -> value (the shape `diff` compares)."""
    return {f.path: f.value for f in decode(blob)}


def diff(a: bytes, b: bytes) -> list[tuple[str, Value | None, Value | None]]:
    """(path, old, new) for every field whose value differs, None where the field is only in
    one blob (an area one of them lacks, or another format's header)."""
    old, new = by_path(a), by_path(b)
    paths = list(old) + [p for p in new if p not in old]
    return [(p, old.get(p), new.get(p)) for p in paths if old.get(p) != new.get(p)]
