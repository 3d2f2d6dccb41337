"""vmcb12 as a 4 KiB image in the APM layout, and KVM's caches of its control and save areas
(arch/x86/kvm/svm/svm.h vmcb_ctrl_area_cached / vmcb_save_area_cached).

At VMRUN, KVM copies the fields it uses from vmcb12 into the caches, checks the caches and
builds vmcb02 from them only, so L1 rewriting vmcb12 while L2 runs changes nothing until the
next VMRUN.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

from ...arch import svm as S

_INT = {1: struct.Struct("<B"), 2: struct.Struct("<H"), 4: struct.Struct("<I"), 8: struct.Struct("<Q")}
_SEG = struct.Struct("<HHIQ")
_INTERCEPTS = struct.Struct(f"<{S.MAX_INTERCEPT}I")
# save field name -> (offset from the VMCB's start, size); segments are read with seg()
_SAVE = {name: (S.SAVE_OFFSET + off, size) for name, (off, size) in S.SAVE.items() if name not in S.SEGMENTS}
_SEGS = {name: S.SAVE_OFFSET + S.SAVE[name][0] for name in S.SEGMENTS}


class VmcbSeg(NamedTuple):
    """struct vmcb_seg (APM table B-2)."""

    selector: int
    attrib: int
    limit: int
    base: int


def _read(data: bytearray, offset: int, size: int) -> int:
    s = _INT.get(size)
    return s.unpack_from(data, offset)[0] if s else int.from_bytes(data[offset:offset + size], "little")


def _write(data: bytearray, offset: int, size: int, value: int) -> None:
    value &= (1 << (8 * size)) - 1
    s = _INT.get(size)
    if s:
        s.pack_into(data, offset, value)
    else:
        data[offset:offset + size] = value.to_bytes(size, "little")


class Vmcb:
    """A VMCB image; every field is an unsigned little-endian integer of its size, read and
    written by its KVM name (`arch.svm.CONTROL_FIELDS`, `arch.svm.SAVE_FIELDS`), the ten
    segments as `VmcbSeg` tuples.

    >>> v = Vmcb()
    >>> v.set_control("exit_code", -1)
    >>> hex(v.control("exit_code")), v.data[0x70:0x78] == b"\\xff" * 8
    ('0xffffffffffffffff', True)
    >>> v.set_seg("cs", 0x8, 0xA9B, 0xFFFFFFFF, 0)
    >>> v.seg("cs").attrib == 0xA9B, v.intercept(S.INTERCEPT["VMRUN"])
    (True, False)
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes | bytearray | None = None) -> None:
        if data is not None and len(data) != S.VMCB_SIZE:
            raise ValueError(f"a VMCB is {S.VMCB_SIZE} bytes, not {len(data)}")
        self.data = bytearray(data) if data is not None else bytearray(S.VMCB_SIZE)

    def control(self, name: str) -> int:
        return _read(self.data, *S.CONTROL[name])

    def set_control(self, name: str, value: int) -> None:
        _write(self.data, *S.CONTROL[name], value)

    def save(self, name: str) -> int:
        return _read(self.data, *_SAVE[name])

    def set_save(self, name: str, value: int) -> None:
        _write(self.data, *_SAVE[name], value)

    def seg(self, name: str) -> VmcbSeg:
        return VmcbSeg(*_SEG.unpack_from(self.data, _SEGS[name]))

    def set_seg(self, name: str, selector: int, attrib: int, limit: int, base: int) -> None:
        _SEG.pack_into(self.data, _SEGS[name], selector & 0xFFFF, attrib & 0xFFFF, limit & 0xFFFFFFFF,
                       base & 0xFFFFFFFFFFFFFFFF)

    def intercepts(self) -> tuple[int, ...]:
        """The six intercept words (KVM's intercepts[MAX_INTERCEPT])."""
        return _INTERCEPTS.unpack_from(self.data, 0)

    def intercept(self, bit: int) -> bool:
        """KVM vmcb_is_intercept: `bit` is an `arch.svm.INTERCEPT` number."""
        return bool(self.data[bit >> 3] >> (bit & 7) & 1)

    def set_intercept(self, bit: int, on: bool = True) -> None:
        """KVM vmcb_set_intercept / vmcb_clr_intercept."""
        if on:
            self.data[bit >> 3] |= 1 << (bit & 7)
        else:
            self.data[bit >> 3] &= ~(1 << (bit & 7)) & 0xFF


@dataclass(slots=True)
class VmcbCtrlCached:
    """KVM struct vmcb_ctrl_area_cached: the vmcb12 control fields KVM uses, sanitized.

    Left out: bus_lock_rip (KVM's own bookkeeping, never read from vmcb12) and
    hv_enlightenments (copied only for Hyper-V's enlightened VMCB, which is not offered).
    exit_code is one u64 (mainline: exit_code and exit_code_hi).
    """

    intercepts: tuple[int, ...] = (0,) * S.MAX_INTERCEPT
    pause_filter_thresh: int = 0
    pause_filter_count: int = 0
    iopm_base_pa: int = 0
    msrpm_base_pa: int = 0
    tsc_offset: int = 0
    asid: int = 0
    tlb_ctl: int = 0
    erap_ctl: int = 0
    int_ctl: int = 0
    int_vector: int = 0
    int_state: int = 0
    exit_code: int = 0
    exit_info_1: int = 0
    exit_info_2: int = 0
    exit_int_info: int = 0
    exit_int_info_err: int = 0
    nested_ctl: int = 0
    event_inj: int = 0
    event_inj_err: int = 0
    next_rip: int = 0
    nested_cr3: int = 0
    virt_ext: int = 0
    clean: int = 0

    def intercept(self, bit: int) -> bool:
        """KVM vmcb12_is_intercept."""
        return bool(self.intercepts[bit >> 5] >> (bit & 31) & 1)


@dataclass(slots=True)
class VmcbSaveCached:
    """KVM struct vmcb_save_area_cached in its newer form, from which vmcb02 is built.

    Mainline caches only efer, cr4, cr3, cr0, dr7 and dr6 (the checked fields). The newest KVM
    also caches s_cet, ssp, isst_addr and the LBR registers; they are left out as the vCPU
    offers neither SHSTK nor LBRV.
    """

    efer: int = 0
    cr4: int = 0
    cr3: int = 0
    cr0: int = 0
    dr7: int = 0
    dr6: int = 0
    es: VmcbSeg = VmcbSeg(0, 0, 0, 0)
    cs: VmcbSeg = VmcbSeg(0, 0, 0, 0)
    ss: VmcbSeg = VmcbSeg(0, 0, 0, 0)
    ds: VmcbSeg = VmcbSeg(0, 0, 0, 0)
    gdtr: VmcbSeg = VmcbSeg(0, 0, 0, 0)
    idtr: VmcbSeg = VmcbSeg(0, 0, 0, 0)
    cpl: int = 0
    rflags: int = 0
    rip: int = 0
    rsp: int = 0
    rax: int = 0
    cr2: int = 0
    g_pat: int = 0


# KVM __nested_svm_sanitize_intercept: intercepts of instructions the guest lacks are cleared
_SANITIZED_INTERCEPTS = ("XSETBV", "INVPCID", "RDTSCP", "SKINIT", "RDPRU")


def copy_control_to_cache(v: Vmcb, *, has_xsave: bool, has_rdtscp: bool, has_invpcid: bool,
                          has_npt: bool, has_skinit: bool, has_rdpru: bool) -> VmcbCtrlCached:
    """KVM __nested_copy_vmcb_control_to_cache (newest): the intercepts with those of the
    instructions the guest lacks cleared (XSETBV without XSAVE, INVPCID, RDTSCP, SKINIT, RDPRU
    without the feature of the same name), iopm_base_pa and msrpm_base_pa with bits 11:0
    cleared, tlb_ctl masked with TLB_CONTROL_MASK, int_vector with bits 7:0, int_state with the
    interrupt shadow bit, event_inj without its reserved bits, nested_ctl without NP_ENABLE if
    the guest lacks NPT; the other fields as they are.
    """
    has = {"XSETBV": has_xsave, "INVPCID": has_invpcid, "RDTSCP": has_rdtscp, "SKINIT": has_skinit,
           "RDPRU": has_rdpru}
    words = list(v.intercepts())
    for name in _SANITIZED_INTERCEPTS:
        if not has[name]:
            bit = S.INTERCEPT[name]
            words[bit >> 5] &= ~(1 << (bit & 31))
    nested_ctl = v.control("nested_ctl")
    if not has_npt:
        nested_ctl &= ~S.NESTED_CTL_NP_ENABLE
    c = v.control
    return VmcbCtrlCached(
        intercepts=tuple(words),
        pause_filter_thresh=c("pause_filter_thresh"),
        pause_filter_count=c("pause_filter_count"),
        iopm_base_pa=c("iopm_base_pa") & ~0xFFF,
        msrpm_base_pa=c("msrpm_base_pa") & ~0xFFF,
        tsc_offset=c("tsc_offset"),
        asid=c("asid"),
        tlb_ctl=c("tlb_ctl") & S.TLB_CONTROL_MASK,
        erap_ctl=c("erap_ctl"),
        int_ctl=c("int_ctl"),
        int_vector=c("int_vector") & S.SVM_INT_VECTOR_MASK,
        int_state=c("int_state") & S.SVM_INTERRUPT_SHADOW_MASK,
        exit_code=c("exit_code"),
        exit_info_1=c("exit_info_1"),
        exit_info_2=c("exit_info_2"),
        exit_int_info=c("exit_int_info"),
        exit_int_info_err=c("exit_int_info_err"),
        nested_ctl=nested_ctl,
        event_inj=c("event_inj") & ~S.EVTINJ_RESERVED_BITS,
        event_inj_err=c("event_inj_err"),
        next_rip=c("next_rip"),
        nested_cr3=c("nested_cr3"),
        virt_ext=c("virt_ext"),
        clean=c("clean"),
    )


def copy_save_to_cache(v: Vmcb) -> VmcbSaveCached:
    """KVM __nested_copy_vmcb_save_to_cache (newest, without the CET and LBR fields)."""
    s = v.save
    return VmcbSaveCached(
        efer=s("efer"), cr4=s("cr4"), cr3=s("cr3"), cr0=s("cr0"), dr7=s("dr7"), dr6=s("dr6"),
        es=v.seg("es"), cs=v.seg("cs"), ss=v.seg("ss"), ds=v.seg("ds"), gdtr=v.seg("gdtr"),
        idtr=v.seg("idtr"), cpl=s("cpl"), rflags=s("rflags"), rip=s("rip"), rsp=s("rsp"),
        rax=s("rax"), cr2=s("cr2"), g_pat=s("g_pat"))


def control_from_cache(c: VmcbCtrlCached) -> Vmcb:
    """KVM nested_copy_vmcb_cache_to_control: a zeroed control area with the cached fields
    (what svm_get_nested_state writes; clean stays 0)."""
    v = Vmcb()
    for name, word in zip(S.INTERCEPT_WORDS, c.intercepts, strict=True):
        v.set_control(name, word)
    for name in ("pause_filter_thresh", "pause_filter_count", "iopm_base_pa", "msrpm_base_pa", "tsc_offset",
                 "asid", "tlb_ctl", "erap_ctl", "int_ctl", "int_vector", "int_state", "exit_code",
                 "exit_info_1", "exit_info_2", "exit_int_info", "exit_int_info_err", "nested_ctl",
                 "event_inj", "event_inj_err", "next_rip", "nested_cr3", "virt_ext"):
        v.set_control(name, getattr(c, name))
    return v
