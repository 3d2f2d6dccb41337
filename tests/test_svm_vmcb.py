"""The SVM data layer: the VMCB layout pinned to the APM / KVM's asm/svm.h, the Vmcb image,
KVM's caches of vmcb12 and the VMRUN consistency checks (one negative test per rule, each
from a valid default with one change)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import random
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nestvisor.arch import svm as S
from nestvisor.kvm.svm import checks
from nestvisor.kvm.svm.checks import check_controls, check_cr3, check_save
from nestvisor.kvm.svm.vmcb import (
    Vmcb,
    VmcbCtrlCached,
    VmcbSaveCached,
    VmcbSeg,
    copy_control_to_cache,
    copy_save_to_cache,
)

# struct vmcb_control_area (kvm-nested-abi.md 8.1): name -> (offset, size)
CONTROL_LAYOUT = {
    "intercept_cr": (0x000, 4), "intercept_dr": (0x004, 4), "intercept_exceptions": (0x008, 4),
    "intercept_word3": (0x00C, 4), "intercept_word4": (0x010, 4), "intercept_word5": (0x014, 4),
    "reserved_0x18": (0x018, 36), "pause_filter_thresh": (0x03C, 2), "pause_filter_count": (0x03E, 2),
    "iopm_base_pa": (0x040, 8), "msrpm_base_pa": (0x048, 8), "tsc_offset": (0x050, 8),
    "asid": (0x058, 4), "tlb_ctl": (0x05C, 1), "erap_ctl": (0x05D, 1), "reserved_0x5e": (0x05E, 2),
    "int_ctl": (0x060, 4), "int_vector": (0x064, 4), "int_state": (0x068, 4),
    "reserved_0x6c": (0x06C, 4), "exit_code": (0x070, 8), "exit_info_1": (0x078, 8),
    "exit_info_2": (0x080, 8), "exit_int_info": (0x088, 4), "exit_int_info_err": (0x08C, 4),
    "nested_ctl": (0x090, 8), "avic_vapic_bar": (0x098, 8), "ghcb_gpa": (0x0A0, 8),
    "event_inj": (0x0A8, 4), "event_inj_err": (0x0AC, 4), "nested_cr3": (0x0B0, 8),
    "virt_ext": (0x0B8, 8), "clean": (0x0C0, 4), "reserved_0xc4": (0x0C4, 4), "next_rip": (0x0C8, 8),
    "insn_len": (0x0D0, 1), "insn_bytes": (0x0D1, 15), "avic_backing_page": (0x0E0, 8),
    "reserved_0xe8": (0x0E8, 8), "avic_logical_id": (0x0F0, 8), "avic_physical_id": (0x0F8, 8),
    "reserved_0x100": (0x100, 8), "vmsa_pa": (0x108, 8), "reserved_0x110": (0x110, 16),
    "bus_lock_counter": (0x120, 2), "reserved_0x122": (0x122, 22), "allowed_sev_features": (0x138, 8),
    "guest_sev_features": (0x140, 8), "reserved_0x148": (0x148, 664), "reserved_sw": (0x3E0, 32),
}
# struct vmcb_save_area (8.2), offsets from the save area's start
SAVE_LAYOUT = {
    "es": (0x000, 16), "cs": (0x010, 16), "ss": (0x020, 16), "ds": (0x030, 16), "fs": (0x040, 16),
    "gs": (0x050, 16), "gdtr": (0x060, 16), "ldtr": (0x070, 16), "idtr": (0x080, 16), "tr": (0x090, 16),
    "reserved_0xa0": (0x0A0, 42), "vmpl": (0x0CA, 1), "cpl": (0x0CB, 1), "reserved_0xcc": (0x0CC, 4),
    "efer": (0x0D0, 8), "reserved_0xd8": (0x0D8, 112), "cr4": (0x148, 8), "cr3": (0x150, 8),
    "cr0": (0x158, 8), "dr7": (0x160, 8), "dr6": (0x168, 8), "rflags": (0x170, 8), "rip": (0x178, 8),
    "reserved_0x180": (0x180, 88), "rsp": (0x1D8, 8), "s_cet": (0x1E0, 8), "ssp": (0x1E8, 8),
    "isst_addr": (0x1F0, 8), "rax": (0x1F8, 8), "star": (0x200, 8), "lstar": (0x208, 8),
    "cstar": (0x210, 8), "sfmask": (0x218, 8), "kernel_gs_base": (0x220, 8), "sysenter_cs": (0x228, 8),
    "sysenter_esp": (0x230, 8), "sysenter_eip": (0x238, 8), "cr2": (0x240, 8),
    "reserved_0x248": (0x248, 32), "g_pat": (0x268, 8), "dbgctl": (0x270, 8), "br_from": (0x278, 8),
    "br_to": (0x280, 8), "last_excp_from": (0x288, 8), "last_excp_to": (0x290, 8),
    "reserved_0x298": (0x298, 72), "spec_ctrl": (0x2E0, 8),
}
MAXPHYADDR = 36


# ---- layout ------------------------------------------------------------------------------------

def test_control_offsets_pinned():
    assert {n: (o, s) for n, o, s in S.CONTROL_FIELDS} == CONTROL_LAYOUT


def test_save_offsets_pinned():
    assert {n: (o, s) for n, o, s in S.SAVE_FIELDS} == SAVE_LAYOUT


@pytest.mark.parametrize("fields, size", [(S.CONTROL_FIELDS, 1024), (S.SAVE_FIELDS, 744)])
def test_areas_are_tiled_without_overlap(fields, size):
    """Every byte belongs to exactly one field (reserved space is named): no overlap, no gap."""
    at = 0
    for name, off, n in sorted(fields, key=lambda f: f[1]):
        assert off == at, name
        at = off + n
    assert at == size


def test_sizes():
    assert (S.CONTROL_SIZE, S.SAVE_OFFSET, S.SAVE_SIZE, S.VMCB_SIZE) == (1024, 0x400, 744, 4096)
    assert S.SAVE_OFFSET + S.SAVE_SIZE <= S.VMCB_SIZE
    assert [n for n, _, _ in S.SEG_FIELDS] == ["selector", "attrib", "limit", "base"]
    assert sum(n for _, _, n in S.SEG_FIELDS) == S.SEG_SIZE == 16


# ---- intercepts and exit codes -------------------------------------------------------------------

def test_intercept_bits_pinned():
    """kvm-nested-abi.md 8.5."""
    expect = {"CR0_READ": 0, "CR3_READ": 3, "CR8_READ": 8, "CR0_WRITE": 16, "CR8_WRITE": 24, "DR0_READ": 32,
              "DR7_WRITE": 55, "EXCEPTION_BASE": 64, "EXCEPTION_14": 78, "INTR": 96, "NMI": 97, "SMI": 98,
              "INIT": 99, "VINTR": 100, "SELECTIVE_CR0": 101, "STORE_IDTR": 102, "LOAD_TR": 109, "RDTSC": 110,
              "RDPMC": 111, "PUSHF": 112, "POPF": 113, "CPUID": 114, "RSM": 115, "IRET": 116, "INTn": 117,
              "INVD": 118, "PAUSE": 119, "HLT": 120, "INVLPG": 121, "INVLPGA": 122, "IOIO_PROT": 123,
              "MSR_PROT": 124, "TASK_SWITCH": 125, "FERR_FREEZE": 126, "SHUTDOWN": 127, "VMRUN": 128,
              "VMMCALL": 129, "VMLOAD": 130, "VMSAVE": 131, "STGI": 132, "CLGI": 133, "SKINIT": 134,
              "RDTSCP": 135, "ICEBP": 136, "WBINVD": 137, "MONITOR": 138, "MWAIT": 139, "MWAIT_COND": 140,
              "XSETBV": 141, "RDPRU": 142, "TRAP_EFER_WRITE": 143, "TRAP_CR0_WRITE": 144,
              "TRAP_CR8_WRITE": 152, "INVLPGB": 160, "INVLPGB_ILLEGAL": 161, "INVPCID": 162, "MCOMMIT": 163,
              "TLBSYNC": 164, "BUSLOCK": 165, "IDLE_HLT": 166}
    assert {k: S.INTERCEPT[k] for k in expect} == expect
    assert max(S.INTERCEPT.values()) < 32 * S.MAX_INTERCEPT
    names = {v: k for k, v in S.INTERCEPT.items() if k != "EXCEPTION_BASE"}
    assert len(names) == len(S.INTERCEPT) - 1            # one name per bit, but the alias


def test_exit_codes_pinned():
    """kvm-nested-abi.md 8.6 (uapi/asm/svm.h)."""
    expect = {"CR0_READ": 0, "CR3_READ": 3, "CR0_WRITE": 0x10, "DR0_READ": 0x20, "DR7_WRITE": 0x37,
              "EXCP_BASE": 0x40, "LAST_EXCP": 0x5F, "INTR": 0x60, "NMI": 0x61, "SMI": 0x62, "INIT": 0x63,
              "VINTR": 0x64, "CR0_SEL_WRITE": 0x65, "IDTR_READ": 0x66, "TR_WRITE": 0x6D, "RDTSC": 0x6E,
              "CPUID": 0x72, "SWINT": 0x75, "HLT": 0x78, "IOIO": 0x7B, "MSR": 0x7C, "SHUTDOWN": 0x7F,
              "VMRUN": 0x80, "VMMCALL": 0x81, "VMLOAD": 0x82, "VMSAVE": 0x83, "STGI": 0x84, "CLGI": 0x85,
              "SKINIT": 0x86, "RDTSCP": 0x87, "XSETBV": 0x8D, "RDPRU": 0x8E, "EFER_WRITE_TRAP": 0x8F,
              "CR0_WRITE_TRAP": 0x90, "CR15_WRITE_TRAP": 0x9F, "INVLPGB": 0xA0, "INVPCID": 0xA2,
              "BUS_LOCK": 0xA5, "IDLE_HLT": 0xA6, "NPF": 0x400, "AVIC_INCOMPLETE_IPI": 0x401,
              "AVIC_UNACCELERATED_ACCESS": 0x402, "VMGEXIT": 0x403, "SW": 0xF0000000,
              "ERR": 0xFFFFFFFFFFFFFFFF}
    assert {k: S.EXIT[k] for k in expect} == expect


def test_intercept_driven_exit_code_is_the_intercept_bit():
    """The key identity of 8.5: exit code == intercept bit, so vmcb12_is_intercept(exit_code)."""
    bit_names = {v: k for k, v in S.INTERCEPT.items()}
    for name, code in S.EXIT.items():
        if code < 0x40 or 0x60 <= code <= 0xA6:
            assert code in bit_names, name
    for name in ("CR3_READ", "DR6_WRITE", "CPUID", "HLT", "VMRUN", "INVPCID", "IDLE_HLT"):
        assert S.EXIT[name] == S.INTERCEPT[name]


def test_exit_names_are_kvm_trace_names():
    n = S.EXIT_NAMES
    assert n[S.EXIT["CR3_READ"]] == "read_cr3" and n[S.EXIT["DR7_WRITE"]] == "write_dr7"
    assert n[S.EXIT["EXCP_BASE"] + 14] == "PF excp" and n[S.EXIT["EXCP_BASE"] + 19] == "XF excp"
    assert (n[0x60], n[0x72], n[0x7B], n[0x81], n[0x400]) == ("interrupt", "cpuid", "io", "hypercall", "npf")
    assert n[S.EXIT["ERR"]] == "invalid_guest_state" and n[S.EXIT["IDLE_HLT"]] == "idle-halt"
    assert S.EXIT["EXCP_BASE"] + 2 not in n                 # KVM prints the codes it does not name in hex
    assert set(n) <= set(S.EXIT.values()) | set(range(0x40, 0x60))
    assert len(set(n.values())) == len(n)


def test_bit_formats():
    assert S.V_IRQ_INJECTION_BITS_MASK == 0x001F0100
    assert (S.V_IRQ_MASK, S.V_GIF_MASK, S.V_INTR_MASKING_MASK, S.V_GIF_ENABLE_MASK, S.V_NMI_ENABLE_MASK) == \
        (0x100, 0x200, 0x01000000, 0x02000000, 0x04000000)
    assert S.EVTINJ_RESERVED_BITS == 0x7FFFF000
    assert (S.EVTINJ_TYPE_NMI, S.EVTINJ_TYPE_EXEPT, S.EVTINJ_TYPE_SOFT) == (0x200, 0x300, 0x400)
    assert (S.IOIO_SIZE, S.IOIO_ASIZE) == ({1: 0x10, 2: 0x20, 4: 0x40}, {2: 0x80, 4: 0x100, 8: 0x200})
    assert (S.MSR_VM_CR, S.MSR_VM_HSAVE_PA, S.VM_CR_VALID_MASK) == (0xC0010114, 0xC0010117, 0x1F)


@pytest.mark.parametrize("msr, bit", [(0, 0), (0x1FFF, 0x3FFE), (0xC0000080, 2048 * 8 + 0x100),
                                      (0xC0011FFF, 4096 * 8 + 0x3FFE), (0x2000, None), (0xC0002000, None),
                                      (0xC0012000, None), (0x40000000, None)])
def test_msrpm_bit_nr(msr, bit):
    assert S.msrpm_bit_nr(msr) == bit


# ---- the Vmcb image ------------------------------------------------------------------------------

_INT_FIELDS = [("control", n, o, s) for n, (o, s) in CONTROL_LAYOUT.items()] + \
    [("save", n, S.SAVE_OFFSET + o, s) for n, (o, s) in SAVE_LAYOUT.items() if s != 16] + \
    [("seg", n, S.SAVE_OFFSET + SAVE_LAYOUT[n][0], 16) for n in S.SEGMENTS]
# a value: all zeros, all ones, or random bits drawn from a seed (fields go up to 664 bytes)
_VALUE = st.one_of(st.just(0), st.just(-1), st.integers(1, 2**32))


def _value(kind: int, bits: int) -> int:
    return 0 if kind == 0 else (1 << bits) - 1 if kind == -1 else random.Random(kind).getrandbits(bits)


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**32), writes=st.lists(st.tuples(st.sampled_from(_INT_FIELDS), _VALUE), max_size=12))
def test_vmcb_round_trip(seed, writes):
    """Each write lands in its field's bytes only, and reads back; the other bytes stay."""
    base = random.Random(seed).randbytes(S.VMCB_SIZE)
    v, model = Vmcb(base), bytearray(base)
    for (area, name, off, size), kind in writes:
        if area == "seg":
            value = (_value(kind, 16), _value(kind + 1, 16), _value(kind + 2, 32), _value(kind + 3, 64))
            v.set_seg(name, *value)
            model[off:off + 16] = b"".join(x.to_bytes(n, "little") for x, n in zip(value, (2, 2, 4, 8), strict=True))
            assert v.seg(name) == VmcbSeg(*value)
        else:
            value = _value(kind, 8 * size)
            getattr(v, f"set_{area}")(name, value)
            model[off:off + size] = value.to_bytes(size, "little")
            assert getattr(v, area)(name) == value
        assert v.data == model


def test_vmcb_values_are_truncated_to_the_field():
    v = Vmcb()
    v.set_control("exit_code", -1)
    v.set_control("tlb_ctl", 0x1FF)
    assert v.control("exit_code") == 2**64 - 1 and v.control("tlb_ctl") == 0xFF and v.data[0x5D] == 0


def test_vmcb_size_is_checked():
    with pytest.raises(ValueError):
        Vmcb(bytes(100))


def test_vmcb_intercepts():
    v = Vmcb()
    for name in ("CR8_WRITE", "EXCEPTION_14", "VMRUN", "IDLE_HLT"):
        v.set_intercept(S.INTERCEPT[name])
    assert v.intercepts() == (1 << 24, 0, 1 << 14, 0, 1, 1 << 6)
    assert v.control("intercept_word4") == 1 and v.intercept(S.INTERCEPT["VMRUN"])
    v.set_intercept(S.INTERCEPT["VMRUN"], False)
    assert not v.intercept(S.INTERCEPT["VMRUN"]) and v.intercepts()[4] == 0


# ---- the caches ----------------------------------------------------------------------------------

_ALL_FEATURES = {"has_xsave": True, "has_rdtscp": True, "has_invpcid": True, "has_npt": True,
                 "has_skinit": True, "has_rdpru": True}


def _vmcb12() -> Vmcb:
    """A vmcb12 that passes every check: VMRUN intercepted, ASID 1, nested paging on."""
    v = Vmcb()
    v.set_intercept(S.INTERCEPT["VMRUN"])
    v.set_control("asid", 1)
    v.set_control("iopm_base_pa", 0x10000)
    v.set_control("msrpm_base_pa", 0x20000)
    v.set_control("nested_ctl", S.NESTED_CTL_NP_ENABLE)
    v.set_control("nested_cr3", 0x3000)
    v.set_save("efer", (1 << 12) | (1 << 10) | (1 << 8))     # SVME LMA LME
    v.set_save("cr0", 0x80000011)                          # PG ET PE
    v.set_save("cr4", 1 << 5)                              # PAE
    v.set_save("cr3", 0x4000)
    v.set_save("dr6", 0xFFFF0FF0)
    v.set_save("dr7", 0x400)
    v.set_save("rflags", 2)
    v.set_seg("cs", 8, 0xA9B, 0xFFFFFFFF, 0)               # 64-bit code: L, not D
    return v


def _ctl(**changes: int) -> VmcbCtrlCached:
    return dataclasses.replace(copy_control_to_cache(_vmcb12(), **_ALL_FEATURES), **changes)


def _save(**changes: object) -> VmcbSaveCached:
    return dataclasses.replace(copy_save_to_cache(_vmcb12()), **changes)


def test_control_cache_copies_every_field():
    v = Vmcb()
    values = {}
    for i, f in enumerate(dataclasses.fields(VmcbCtrlCached)):
        if f.name != "intercepts":
            size = CONTROL_LAYOUT[f.name][1]
            values[f.name] = (0x0102030405060708 * (i + 1)) & ((1 << (8 * size)) - 1)
            v.set_control(f.name, values[f.name])
    for i, word in enumerate(S.INTERCEPT_WORDS):
        v.set_control(word, 0x11111111 * (i + 1))
    c = copy_control_to_cache(v, **_ALL_FEATURES)
    sanitized = {"iopm_base_pa": ~0xFFF, "msrpm_base_pa": ~0xFFF, "tlb_ctl": 7, "int_vector": 0xFF,
                 "int_state": 1, "event_inj": ~S.EVTINJ_RESERVED_BITS}
    for name, value in values.items():
        assert getattr(c, name) == value & sanitized.get(name, -1), name
    assert c.intercepts == tuple(0x11111111 * (i + 1) for i in range(6))


@pytest.mark.parametrize("feature, intercept", [("has_xsave", "XSETBV"), ("has_invpcid", "INVPCID"),
                                                ("has_rdtscp", "RDTSCP"), ("has_skinit", "SKINIT"),
                                                ("has_rdpru", "RDPRU")])
def test_control_cache_clears_intercepts_of_missing_features(feature, intercept):
    v = _vmcb12()
    for name in ("XSETBV", "INVPCID", "RDTSCP", "SKINIT", "RDPRU", "CPUID"):
        v.set_intercept(S.INTERCEPT[name])
    c = copy_control_to_cache(v, **{**_ALL_FEATURES, feature: False})
    assert not c.intercept(S.INTERCEPT[intercept])
    kept = {"XSETBV", "INVPCID", "RDTSCP", "SKINIT", "RDPRU", "CPUID", "VMRUN"} - {intercept}
    assert all(c.intercept(S.INTERCEPT[n]) for n in kept)
    assert v.intercept(S.INTERCEPT[intercept])             # vmcb12 itself is untouched


def test_control_cache_sanitizes_values():
    v = _vmcb12()
    for name, value in (("iopm_base_pa", 0x10FFF), ("msrpm_base_pa", 0x20ABC), ("tlb_ctl", 0xFB),
                        ("int_vector", 0x1234), ("int_state", 3), ("event_inj", 0xFFFFFFFF),
                        ("nested_ctl", 0x7)):
        v.set_control(name, value)
    c = copy_control_to_cache(v, **{**_ALL_FEATURES, "has_npt": False})
    assert (c.iopm_base_pa, c.msrpm_base_pa, c.tlb_ctl, c.int_vector, c.int_state) == (0x10000, 0x20000, 3, 0x34, 1)
    assert c.event_inj == 0x80000FFF
    assert c.nested_ctl == 0x6                             # NP_ENABLE cleared without NPT, the rest kept
    assert copy_control_to_cache(v, **_ALL_FEATURES).nested_ctl == 0x7


def test_save_cache_copies_its_fields():
    v = Vmcb()
    ints = [f.name for f in dataclasses.fields(VmcbSaveCached) if f.name not in S.SEGMENTS]
    for i, name in enumerate(ints):
        v.set_save(name, (i + 1) * 0x0101010101010101 & ((1 << (8 * SAVE_LAYOUT[name][1])) - 1))
    for i, seg in enumerate(S.SEGMENTS):
        v.set_seg(seg, i, 0x100 + i, 0x1000 + i, 0x10000 + i)
    s = copy_save_to_cache(v)
    assert all(getattr(s, n) == v.save(n) for n in ints)
    assert all(getattr(s, n) == v.seg(n) for n in ("es", "cs", "ss", "ds", "gdtr", "idtr"))


def test_caches_are_snapshots():
    """L1 rewriting vmcb12 after VMRUN changes nothing in what L2 is built from."""
    v = _vmcb12()
    c, s = copy_control_to_cache(v, **_ALL_FEATURES), copy_save_to_cache(v)
    v.set_control("asid", 0)
    v.set_intercept(S.INTERCEPT["VMRUN"], False)
    v.set_save("rip", 0xDEAD)
    v.set_seg("cs", 0, 0, 0, 0)
    assert c == _ctl() and s == _save()


# ---- the VMRUN checks ----------------------------------------------------------------------------

def _cr4_valid(cr4: int) -> bool:
    return not cr4 & (1 << 13)                             # VMXE: not on an AMD vCPU


def _efer_valid(efer: int) -> bool:
    return not efer & ~0x1D01                              # SCE LME LMA NXE SVME


def _check_controls(c: VmcbCtrlCached, npt_enabled: bool = True):
    return check_controls(c, MAXPHYADDR, npt_enabled)


def _check_save(s: VmcbSaveCached):
    return check_save(s, MAXPHYADDR, _cr4_valid, _efer_valid)


def test_valid_defaults_pass():
    assert _check_controls(_ctl()) is None
    assert _check_save(_save()) is None


_D = _ctl()
_V = _save()
_VMRUN = S.INTERCEPT["VMRUN"]
CASES: list[tuple[str, Callable[[], object]]] = [
    ("the VMRUN intercept is set",
     lambda: _check_controls(_ctl(intercepts=(*_D.intercepts[:4], _D.intercepts[4] & ~1, _D.intercepts[5])))),
    ("ASID is not 0", lambda: _check_controls(_ctl(asid=0))),
    ("nested paging needs NPT in L0", lambda: _check_controls(_ctl(), npt_enabled=False)),
    ("nested_cr3 is a legal GPA under nested paging", lambda: _check_controls(_ctl(nested_cr3=1 << MAXPHYADDR))),
    ("the MSRPM lies below MAXPHYADDR", lambda: _check_controls(_ctl(msrpm_base_pa=(1 << MAXPHYADDR) - 0x1000))),
    ("the IOPM lies below MAXPHYADDR", lambda: _check_controls(_ctl(iopm_base_pa=(1 << MAXPHYADDR) - 0x2000))),
    ("V_NMI_ENABLE needs the NMI intercept", lambda: _check_controls(_ctl(int_ctl=S.V_NMI_ENABLE_MASK))),
    ("EVENTINJ type is INTR, NMI, exception or software interrupt",
     lambda: _check_controls(_ctl(event_inj=S.EVTINJ_VALID | (1 << S.EVTINJ_TYPE_SHIFT) | 0x20))),
    ("EVENTINJ exception vector is a defined exception",
     lambda: _check_controls(_ctl(event_inj=S.EVTINJ_VALID | S.EVTINJ_TYPE_EXEPT | 2))),
    ("EFER.SVME is set", lambda: _check_save(_save(efer=_V.efer & ~(1 << 12)))),
    ("CR0.NW is 0 when CR0.CD is 0", lambda: _check_save(_save(cr0=_V.cr0 | (1 << 29)))),
    ("CR0 bits 63:32 are 0", lambda: _check_save(_save(cr0=_V.cr0 | (1 << 32)))),
    ("DR6 bits 63:32 are 0", lambda: _check_save(_save(dr6=_V.dr6 | (1 << 40)))),
    ("DR7 bits 63:32 are 0", lambda: _check_save(_save(dr7=_V.dr7 | (1 << 63)))),
    ("long-mode paging needs CR4.PAE", lambda: _check_save(_save(cr4=0))),
    ("long-mode paging needs CR0.PE", lambda: _check_save(_save(cr0=_V.cr0 & ~1))),
    ("CR3 is a legal GPA under long-mode paging", lambda: _check_save(_save(cr3=1 << MAXPHYADDR))),
    ("CS.L and CS.D are not both set under long-mode paging",
     lambda: _check_save(_save(cs=_V.cs._replace(attrib=_V.cs.attrib | S.SVM_SELECTOR_DB_MASK)))),
    ("CR4 is valid for the vCPU", lambda: _check_save(_save(cr4=_V.cr4 | (1 << 13)))),
    ("EFER is valid for the vCPU", lambda: _check_save(_save(efer=_V.efer | (1 << 20)))),
    ("CR3 is a legal GPA", lambda: check_cr3(_save(cr3=1 << MAXPHYADDR, efer=0), MAXPHYADDR, False, _no_memory)),
    ("PAE PDPTEs have no reserved bits set",
     lambda: check_cr3(_save(cr3=0x1000, efer=_V.efer & ~(1 << 8)), MAXPHYADDR, False, lambda pa: 1 | (1 << 1))),
]


def _no_memory(pa: int) -> int | None:
    return None


def test_pdptes_are_not_read_under_npt_or_long_mode():
    assert check_cr3(_save(cr3=0x1000), MAXPHYADDR, False, _no_memory) is None          # long mode
    assert check_cr3(_save(cr3=0x1000, efer=0), MAXPHYADDR, True, _no_memory) is None   # NPT


@pytest.mark.parametrize("rule, run", CASES, ids=[name for name, _ in CASES])
def test_rule_rejects_one_change(rule, run):
    failure = run()
    assert failure is not None and failure.name == rule
    assert failure.source and str(failure).startswith(rule)


def test_every_rule_has_a_negative_test():
    """Each `cc(...)` rule in kvm/svm/checks.py is one of CASES (and the other way round)."""
    tree = ast.parse(inspect.getsource(checks))
    rules = {node.args[1].value for node in ast.walk(tree)
             if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "cc"}
    assert rules == {name for name, _ in CASES}


@pytest.mark.parametrize("event_inj", [
    0, 0x7FF,                                              # not valid: the rest is ignored
    S.EVTINJ_VALID | S.EVTINJ_TYPE_INTR | 0x20, S.EVTINJ_VALID | S.EVTINJ_TYPE_NMI | 2,
    S.EVTINJ_VALID | S.EVTINJ_TYPE_SOFT | 0x80, S.EVTINJ_VALID | S.EVTINJ_TYPE_EXEPT | S.EVTINJ_VALID_ERR | 14,
    S.EVTINJ_VALID | S.EVTINJ_TYPE_EXEPT | 28, S.EVTINJ_VALID | S.EVTINJ_TYPE_EXEPT | 30,
])
def test_valid_event_injections_pass(event_inj):
    assert _check_controls(_ctl(event_inj=event_inj)) is None


@pytest.mark.parametrize("vector", [2, 9, 15, 20, 21, 22, 29, 31])
def test_undefined_exception_vectors_are_rejected(vector):
    f = _check_controls(_ctl(event_inj=S.EVTINJ_VALID | S.EVTINJ_TYPE_EXEPT | vector))
    assert f is not None and f.name == "EVENTINJ exception vector is a defined exception"


def test_bitmap_boundaries():
    top = 1 << MAXPHYADDR
    assert _check_controls(_ctl(msrpm_base_pa=top - S.MSRPM_SIZE, iopm_base_pa=top - S.IOPM_SIZE)) is None
    # bits 11:0 of the addresses are ignored (PAGE_ALIGN rounds up, as KVM does on uncached values)
    f = _check_controls(_ctl(msrpm_base_pa=top - S.MSRPM_SIZE + 1))
    assert f is not None and f.name == "the MSRPM lies below MAXPHYADDR"


def test_long_mode_rules_need_long_mode_paging():
    """Without EFER.LME and CR0.PG, neither PAE nor CR3 nor CS.L/D is checked."""
    s = _save(efer=1 << 12, cr0=0x11, cr4=0, cr3=1 << MAXPHYADDR,
              cs=VmcbSeg(8, S.SVM_SELECTOR_L_MASK | S.SVM_SELECTOR_DB_MASK, 0, 0))
    assert _check_save(s) is None


def test_npt_rules_need_nested_paging():
    assert _check_controls(_ctl(nested_ctl=0, nested_cr3=1 << 63), npt_enabled=False) is None
