"""Unit tests for exception/interrupt delivery (SDM chapter 6) over a bytearray-backed memory."""

from __future__ import annotations

import struct

import pytest

from nestvisor.arch.x86 import (
    CR0_ET,
    CR0_PE,
    CR0_PG,
    CR4_PAE,
    EFER_LMA,
    EFER_LME,
    EFER_NXE,
    PTE_P,
    PTE_PS,
    PTE_RW,
    PTE_US,
    RFLAGS_AC,
    RFLAGS_RF,
    RFLAGS_TF,
    RFLAGS_VM,
)
from nestvisor.cpu.delivery import (
    DeliveryUnsupported,
    EventKind,
    TripleFault,
    deliver,
    deliver_with_escalation,
)
from nestvisor.cpu.faults import GuestFault, PageFault
from nestvisor.cpu.paging import LinearMemory
from nestvisor.cpu.state import (
    SEG_P,
    ArchState,
    DescTable,
    Segment,
    real_mode_segment,
)

HW = EventKind.HARDWARE_EXCEPTION
EXT_INT = EventKind.EXTERNAL_INTERRUPT
SOFT_INT = EventKind.SOFTWARE_INTERRUPT
GDT, IDT, TSS = 0x1000, 0x2000, 0x3000


class FakeMem:
    """Guest-physical memory: unmapped reads give 0xff, unmapped writes are dropped."""

    def __init__(self, size: int = 0x40000) -> None:
        self.buf = bytearray(size)

    def read(self, gpa: int, size: int) -> bytes:
        return bytes(self.buf[gpa + i] if gpa + i < len(self.buf) else 0xFF for i in range(size))

    def write(self, gpa: int, data: bytes) -> None:
        for i, b in enumerate(data):
            if gpa + i < len(self.buf):
                self.buf[gpa + i] = b

    def put(self, gpa: int, data: bytes) -> None:
        self.buf[gpa:gpa + len(data)] = data

    def u16s(self, gpa: int, n: int) -> list[int]:
        return list(struct.unpack_from(f"<{n}H", self.buf, gpa))

    def u32s(self, gpa: int, n: int) -> list[int]:
        return list(struct.unpack_from(f"<{n}I", self.buf, gpa))

    def u64s(self, gpa: int, n: int) -> list[int]:
        return list(struct.unpack_from(f"<{n}Q", self.buf, gpa))


def attrs(seg_type: int, dpl: int = 0, s: int = 1, p: int = 1, l: int = 0, db: int = 1,  # noqa: E741
          g: int = 1) -> int:
    """Descriptor high-dword attribute bits (Segment.flags layout)."""
    return (seg_type << 8) | (s << 12) | (dpl << 13) | (p << 15) | (l << 21) | (db << 22) | (g << 23)


def desc(base: int, limit: int, flags: int) -> bytes:
    lo = (limit & 0xFFFF) | ((base & 0xFFFF) << 16)
    hi = ((base >> 16) & 0xFF) | (limit & 0xF0000) | (base & 0xFF000000) | flags
    return struct.pack("<II", lo, hi)


def gate32(offset: int, sel: int, gtype: int = 0xE, dpl: int = 0, p: int = 1, s: int = 0) -> bytes:
    lo = (offset & 0xFFFF) | (sel << 16)
    hi = (offset & 0xFFFF0000) | (gtype << 8) | (s << 12) | (dpl << 13) | (p << 15)
    return struct.pack("<II", lo, hi)


def gate64(offset: int, sel: int, gtype: int = 0xE, dpl: int = 0, ist: int = 0, p: int = 1) -> bytes:
    lo = (offset & 0xFFFF) | (sel << 16)
    hi = (offset & 0xFFFF0000) | ist | (gtype << 8) | (dpl << 13) | (p << 15)
    return struct.pack("<IIII", lo, hi, (offset >> 32) & 0xFFFFFFFF, 0)


FLAT = 0xFFFFF
CODE0 = attrs(0xA)                   # 0x08 ring-0 32-bit code, not yet accessed
DATA0 = attrs(0x2)                   # 0x10 ring-0 data, not yet accessed
CODE3 = attrs(0xB, dpl=3)            # 0x18
DATA3 = attrs(0x3, dpl=3)            # 0x20
GDT_ROWS = {
    0x08: desc(0, FLAT, CODE0),
    0x10: desc(0, FLAT, DATA0),
    0x18: desc(0, FLAT, CODE3),
    0x20: desc(0, FLAT, DATA3),
    0x28: desc(TSS, 0x67, attrs(0xB, s=0, g=0, db=0)),
    0x30: desc(0, FLAT, attrs(0xB, l=1, db=0)),            # 64-bit ring-0 code
    0x38: desc(0, FLAT, attrs(0xB, dpl=3, l=1, db=0)),     # 64-bit ring-3 code
    0x40: desc(0, FLAT, attrs(0x1)),                       # read-only data
    0x48: desc(0, FLAT, attrs(0xB, p=0)),                  # code, not present
    0x50: desc(0x100000, 0xFFF, attrs(0xB, g=0)),          # code with a 4 KiB limit
    0x58: desc(0, 0xFFF, attrs(0x3, g=0, db=0)),           # 16-bit data, limit 0xFFF
    0x60: desc(0, FLAT, attrs(0xF)),                       # conforming code, DPL 0
    0x68: desc(0, FLAT, attrs(0xB, dpl=1)),                # ring-1 code
    0x70: desc(0, FLAT, attrs(0x3, p=0)),                  # data, not present
    0x78: desc(0, 0xFFF, attrs(0x7, g=0, db=0)),           # 16-bit expand-down data
}


def make_mem() -> FakeMem:
    m = FakeMem()
    for sel, row in GDT_ROWS.items():
        m.put(GDT + sel, row)
    return m


def gdt_hi(m: FakeMem, sel: int) -> int:
    return m.u32s(GDT + sel + 4, 1)[0]


def seg(sel: int, base: int = 0, limit: int = 0xFFFFFFFF, flags: int = DATA0 | 0x100) -> Segment:
    return Segment(sel, base, limit, flags)


def fault(fn, *args, **kw) -> GuestFault:
    with pytest.raises(GuestFault) as info:
        fn(*args, **kw)
    return info.value


# ======================================================================== real mode
def real_state(**kw) -> ArchState:
    st = ArchState(rip=0x0100, rsp=0x12340000, rflags=0x0302 | RFLAGS_AC, cr0=CR0_ET,
                   idt=DescTable(0, 0x3FF))
    st.cs = real_mode_segment(0x0700, code=True)
    st.ss = real_mode_segment(0x0000)
    for k, v in kw.items():
        setattr(st, k, v)
    return st


def test_real_mode_int_n_pushes_flags_cs_ip_with_sp_wrap() -> None:
    m = FakeMem()
    m.put(0x10 * 4, struct.pack("<HH", 0x1234, 0xC000))
    st = real_state()
    new = deliver(st, m, 0x10, kind=SOFT_INT, insn_len=2)
    assert m.u16s(0xFFFA, 3) == [0x0102, 0x0700, 0x0302]  # IP, CS, FLAGS
    assert new.rsp == 0x1234FFFA  # only SP changes
    assert (new.cs.selector, new.cs.base, new.cs.limit) == (0xC000, 0xC0000, 0xFFFF)
    assert new.rip == 0x1234
    assert new.rflags == 0x2  # IF, TF, AC cleared
    assert st.rip == 0x0100 and st.rsp == 0x12340000  # input untouched


def test_real_mode_exception_pushes_no_error_code() -> None:
    m = FakeMem()
    m.put(13 * 4, struct.pack("<HH", 0x0050, 0x0060))
    st = real_state(rsp=0x2000, rflags=0x0202)
    new = deliver(st, m, 13, kind=HW, error_code=0x18)
    assert new.rsp == 0x1FFA
    assert m.u16s(0x1FFA, 3) == [0x0100, 0x0700, 0x0202]
    assert (new.cs.selector, new.cs.base, new.rip) == (0x0060, 0x600, 0x0050)


def test_real_mode_vector_beyond_ivt_limit_is_gp_and_escalates_to_triple_fault() -> None:
    m = FakeMem()
    st = real_state(idt=DescTable(0, 0x1F))  # vectors 0..7 only
    f = fault(deliver, st, m, 0x10, kind=EXT_INT)
    assert f.vector == 13
    res = deliver_with_escalation(st, m, 0x10, EXT_INT)
    assert isinstance(res, TripleFault)
    assert res.vectors == (0x10, 13, 8, 13)


# ======================================================================== 32-bit protected mode
def pm_state(cpl: int = 0, **kw) -> ArchState:
    st = ArchState(
        rip=0x401000, rsp=0x7000, rflags=0x202, cr0=CR0_PE | CR0_ET,
        gdt=DescTable(GDT, 0x7F), idt=DescTable(IDT, 0x7FF),
        tr=Segment(0x28, TSS, 0x67, SEG_P | (0xB << 8)),
    )
    if cpl == 3:
        st.cs = seg(0x1B, flags=CODE3 | 0x100)
        st.ss = seg(0x23, flags=DATA3 | 0x100)
        st.rsp = 0x6000
    else:
        st.cs = seg(0x08, flags=CODE0 | 0x100)
        st.ss = seg(0x10, flags=DATA0 | 0x100)
    for k, v in kw.items():
        setattr(st, k, v)
    return st


def pm_mem() -> FakeMem:
    m = make_mem()
    m.put(TSS + 4, struct.pack("<IH", 0x9000, 0x10))  # ESP0, SS0
    return m


def test_pm32_same_privilege_fault_with_error_code() -> None:
    m = pm_mem()
    m.put(IDT + 13 * 8, gate32(0x500000, 0x08, 0xE))
    st = pm_state(rflags=0x202 | RFLAGS_TF)
    new = deliver(st, m, 13, kind=HW, error_code=0x1234)
    assert new.rsp == 0x7000 - 16
    # error code, EIP, CS, EFLAGS (RF set in the image of a fault: SDM 17.3.1.1)
    assert m.u32s(0x7000 - 16, 4) == [0x1234, 0x401000, 0x08, 0x302 | RFLAGS_RF]
    assert new.rip == 0x500000
    assert new.rflags == 0x2
    assert (new.cs.selector, new.cs.base, new.cs.limit, new.cs.flags) == (0x08, 0, 0xFFFFFFFF, CODE0 | 0x100)
    assert gdt_hi(m, 0x08) & 0x100  # accessed bit set in the GDT
    assert new.ss == st.ss and new.cpl == 0


def test_pm32_trap_gate_keeps_if_and_interrupt_pushes_no_rf() -> None:
    m = pm_mem()
    m.put(IDT + 0x30 * 8, gate32(0x500000, 0x08, 0xF))
    new = deliver(pm_state(), m, 0x30, kind=EXT_INT)
    assert m.u32s(0x7000 - 12, 3) == [0x401000, 0x08, 0x202]
    assert new.rflags == 0x202


def test_pm32_ring3_to_ring0_through_tss() -> None:
    m = pm_mem()
    m.put(IDT + 0x80 * 8, gate32(0x500000, 0x08, 0xF, dpl=3))
    new = deliver(pm_state(cpl=3), m, 0x80, kind=SOFT_INT, insn_len=2)
    assert new.rsp == 0x9000 - 20
    assert m.u32s(0x9000 - 20, 5) == [0x401002, 0x1B, 0x202, 0x6000, 0x23]
    assert (new.ss.selector, new.ss.flags, new.ss.limit) == (0x10, DATA0 | 0x100, 0xFFFFFFFF)
    assert new.cs.selector == 0x08 and new.cpl == 0
    assert gdt_hi(m, 0x10) & 0x100 and gdt_hi(m, 0x08) & 0x100


def test_pm32_int_n_gate_dpl_check_and_int1_bypass() -> None:
    m = pm_mem()
    m.put(IDT + 0x80 * 8, gate32(0x500000, 0x08, 0xE, dpl=0))
    m.put(IDT + 1 * 8, gate32(0x500000, 0x08, 0xE, dpl=0))
    m.put(IDT + 3 * 8, gate32(0x500000, 0x08, 0xE, dpl=0))
    f = fault(deliver, pm_state(cpl=3), m, 0x80, kind=SOFT_INT, insn_len=2)
    assert (f.vector, f.error_code) == (13, 0x80 * 8 + 2)
    f = fault(deliver, pm_state(cpl=3), m, 3, kind=EventKind.SOFTWARE_EXCEPTION, insn_len=1)
    assert (f.vector, f.error_code) == (13, 3 * 8 + 2)
    new = deliver(pm_state(cpl=3), m, 1, kind=EventKind.PRIVILEGED_SOFTWARE_EXCEPTION, insn_len=1)
    assert new.rip == 0x500000 and m.u32s(0x9000 - 20, 1) == [0x401001]
    # Hardware events ignore the gate DPL too.
    new = deliver(pm_state(cpl=3), m, 0x80, kind=EXT_INT)
    assert new.cpl == 0


def test_pm32_idt_limit_not_present_and_bad_type() -> None:
    m = pm_mem()
    st = pm_state(idt=DescTable(IDT, 0xFF))
    assert fault(deliver, st, m, 0x40, kind=EXT_INT).error_code == 0x40 * 8 + 3
    assert fault(deliver, st, m, 0x40, kind=SOFT_INT).error_code == 0x40 * 8 + 2
    m.put(IDT + 6 * 8, gate32(0x500000, 0x08, 0xE, p=0))
    f = fault(deliver, pm_state(), m, 6, kind=HW)
    assert (f.vector, f.error_code) == (11, 6 * 8 + 3)
    m.put(IDT + 0x21 * 8, gate32(0x500000, 0x08, 0xE, p=0))
    assert fault(deliver, pm_state(), m, 0x21, kind=SOFT_INT).error_code == 0x21 * 8 + 2
    m.put(IDT + 7 * 8, gate32(0x500000, 0x08, 0xC))  # call gate
    f = fault(deliver, pm_state(), m, 7, kind=HW)
    assert (f.vector, f.error_code) == (13, 7 * 8 + 3)
    m.put(IDT + 9 * 8, gate32(0x500000, 0x08, 0xE, s=1))  # S=1: not a gate
    assert fault(deliver, pm_state(), m, 9, kind=HW).error_code == 9 * 8 + 3


def test_pm32_task_gate_is_unsupported() -> None:
    m = pm_mem()
    m.put(IDT + 8 * 8, gate32(0, 0x28, 0x5))
    with pytest.raises(DeliveryUnsupported):
        deliver(pm_state(), m, 8, kind=HW, error_code=0)


@pytest.mark.parametrize(("sel", "vector", "ec"), [
    (0x00, 13, 0x1),      # NULL selector: #GP(EXT)
    (0x03, 13, 0x1),      # NULL with RPL
    (0x10, 13, 0x11),     # data segment
    (0x48, 11, 0x49),     # not present
    (0x100, 13, 0x101),   # beyond the GDT limit
    (0x0C, 13, 0x0D),     # LDT (TI=1) beyond an empty LDT
    (0x18, 13, 0x19),     # DPL 3 > CPL 0
])
def test_pm32_bad_target_code_segment(sel: int, vector: int, ec: int) -> None:
    m = pm_mem()
    m.put(IDT + 6 * 8, gate32(0x500000, sel, 0xE))
    st = pm_state(ldt=Segment(0, 0, 0, SEG_P | (2 << 8)))
    f = fault(deliver, st, m, 6, kind=HW)
    assert (f.vector, f.error_code) == (vector, ec)


@pytest.mark.parametrize(("tss_ss", "tr_limit", "vector", "ec"), [
    (0x00, 0x67, 10, 0x1),   # NULL SS0: #TS(EXT)
    (0x13, 0x67, 10, 0x11),  # RPL != new CPL
    (0x40, 0x67, 10, 0x41),  # read-only data
    (0x08, 0x67, 10, 0x09),  # code segment
    (0x20, 0x67, 10, 0x21),  # DPL 3 data with RPL 0
    (0x70, 0x67, 12, 0x71),  # not present: #SS
    (0x10, 0x08, 10, 0x29),  # TSS too short: #TS(TR selector + EXT)
])
def test_pm32_bad_tss_stack(tss_ss: int, tr_limit: int, vector: int, ec: int) -> None:
    m = pm_mem()
    m.put(TSS + 8, struct.pack("<H", tss_ss))
    m.put(IDT + 0x30 * 8, gate32(0x500000, 0x08, 0xE))
    st = pm_state(cpl=3)
    st.tr.limit = tr_limit
    f = fault(deliver, st, m, 0x30, kind=EXT_INT)
    assert (f.vector, f.error_code) == (vector, ec)


def test_pm32_stack_limits() -> None:
    m = pm_mem()
    m.put(IDT + 13 * 8, gate32(0x500000, 0x08, 0xE))
    small = Segment(0x58, 0, 0xFFF, attrs(0x3, g=0, db=0))
    f = fault(deliver, pm_state(ss=small, rsp=0x2008), m, 13, kind=HW, error_code=0)
    assert (f.vector, f.error_code) == (12, 1)
    assert deliver(pm_state(ss=small, rsp=0x1000), m, 13, kind=HW, error_code=0).rsp == 0xFF0
    # 16-bit stack: SP wraps inside the segment and ESP's upper half is kept.
    wide = Segment(0x58, 0, 0xFFFF, attrs(0x3, g=0, db=0))
    new = deliver(pm_state(ss=wide, rsp=0xABCD0004), m, 13, kind=HW, error_code=0x77)
    assert new.rsp == 0xABCDFFF4
    assert m.u32s(0x0000, 1) == [0x202 | RFLAGS_RF]
    assert m.u32s(0xFFF4, 3) == [0x77, 0x401000, 0x08]
    # Expand-down: valid offsets are (limit, 0xFFFF].
    down = Segment(0x78, 0, 0x7FFF, attrs(0x7, g=0, db=0))
    assert deliver(pm_state(ss=down, rsp=0x8010), m, 13, kind=HW, error_code=0).rsp == 0x8000
    f = fault(deliver, pm_state(ss=down, rsp=0x8008), m, 13, kind=HW, error_code=0)
    assert (f.vector, f.error_code) == (12, 1)


def test_pm32_eip_beyond_code_limit() -> None:
    m = pm_mem()
    m.put(IDT + 13 * 8, gate32(0x1000, 0x50, 0xE))
    f = fault(deliver, pm_state(), m, 13, kind=HW, error_code=0)
    assert (f.vector, f.error_code) == (13, 1)
    m.put(IDT + 13 * 8, gate32(0xFFF, 0x50, 0xE))
    new = deliver(pm_state(), m, 13, kind=HW, error_code=0)
    assert (new.cs.base, new.cs.limit, new.rip) == (0x100000, 0xFFF, 0xFFF)


def test_pm32_16bit_gate_pushes_words() -> None:
    m = pm_mem()
    m.put(IDT + 0x30 * 8, gate32(0x12345678, 0x08, 0x6))
    new = deliver(pm_state(), m, 0x30, kind=EXT_INT)
    assert new.rsp == 0x7000 - 6
    assert m.u16s(0x7000 - 6, 3) == [0x1000, 0x08, 0x202]
    assert new.rip == 0x5678
    assert new.rflags == 0x2


def test_pm32_conforming_target_stays_at_cpl3() -> None:
    m = pm_mem()
    m.put(IDT + 0x30 * 8, gate32(0x500000, 0x60, 0xE))
    new = deliver(pm_state(cpl=3), m, 0x30, kind=EXT_INT)
    assert new.rsp == 0x6000 - 12
    assert m.u32s(0x6000 - 12, 3) == [0x401000, 0x1B, 0x202]
    assert new.cs.selector == 0x63 and new.cpl == 3 and new.ss.selector == 0x23


def vm86_state() -> ArchState:
    st = pm_state(rflags=0x202 | RFLAGS_VM, rip=0x0123, rsp=0xFFFF0100)
    st.cs = real_mode_segment(0x1234, code=True)
    st.ss = real_mode_segment(0x2000)
    st.ds, st.es = real_mode_segment(0x3000), real_mode_segment(0x4000)
    st.fs, st.gs = real_mode_segment(0x5000), real_mode_segment(0x6000)
    return st


def test_vm86_exception_to_ring0_saves_and_nulls_segments() -> None:
    m = pm_mem()
    m.put(IDT + 13 * 8, gate32(0x500000, 0x08, 0xE))
    st = vm86_state()
    assert st.cpl == 3
    new = deliver(st, m, 13, kind=HW, error_code=0)
    assert new.rsp == 0x9000 - 40
    assert m.u32s(0x9000 - 40, 10) == [
        0, 0x0123, 0x1234, 0x20202 | RFLAGS_RF, 0xFFFF0100, 0x2000, 0x4000, 0x3000, 0x5000, 0x6000]
    assert new.rflags == 0x2 and not new.vm86 and new.cpl == 0
    assert all(getattr(new, s) == Segment(0, 0, 0, 0) for s in ("ds", "es", "fs", "gs"))
    assert new.cs.selector == 0x08 and new.ss.selector == 0x10


def test_vm86_int_n_needs_iopl3_and_ring0_handler() -> None:
    m = pm_mem()
    m.put(IDT + 0x21 * 8, gate32(0x500000, 0x68, 0xE, dpl=3))
    f = fault(deliver, vm86_state(), m, 0x21, kind=SOFT_INT, insn_len=2)
    assert (f.vector, f.error_code) == (13, 0)
    st = vm86_state()
    st.rflags |= 3 << 12
    f = fault(deliver, st, m, 0x21, kind=SOFT_INT, insn_len=2)
    assert (f.vector, f.error_code) == (13, 0x68)


def paged32_mem() -> FakeMem:
    """32-bit paging: identity 4 MiB of supervisor pages except the stack page 0x6000."""
    m = pm_mem()
    m.put(0x20000, struct.pack("<I", 0x21000 | PTE_P | PTE_RW))
    for i in range(0x40):
        if i != 6:
            m.put(0x21000 + 4 * i, struct.pack("<I", (i << 12) | PTE_P | PTE_RW))
    return m


def test_pm32_stack_page_fault_propagates() -> None:
    m = paged32_mem()
    m.put(IDT + 0x30 * 8, gate32(0x500000, 0x08, 0xE))
    st = pm_state(cr0=CR0_PE | CR0_PG, cr3=0x20000)
    with pytest.raises(PageFault) as info:
        deliver(st, m, 0x30, kind=EXT_INT)
    assert (info.value.linear, info.value.error_code) == (0x6FFC, 0x2)
    st.rsp = 0x8000
    new = deliver(st, LinearMemory(m, st), 0x30, kind=EXT_INT)  # a LinearMemory is accepted
    assert new.rsp == 0x8000 - 12


def test_error_code_only_for_hardware_exceptions() -> None:
    with pytest.raises(ValueError):
        deliver(pm_state(), pm_mem(), 13, kind=SOFT_INT, error_code=0)


# ======================================================================== IA-32e mode
PML4, PDPT, PD = 0x10000, 0x11000, 0x12000
LONG_CR0 = CR0_PE | CR0_ET | CR0_PG
CODE64 = attrs(0xB, l=1, db=0)


def long_mem() -> FakeMem:
    """Identity map of 16 MiB with 2 MiB user pages, except 0x01000000.. (PD[8]) absent."""
    m = make_mem()
    m.put(PML4, struct.pack("<Q", PDPT | PTE_P | PTE_RW | PTE_US))
    m.put(PDPT, struct.pack("<Q", PD | PTE_P | PTE_RW | PTE_US))
    for i in range(8):
        m.put(PD + 8 * i, struct.pack("<Q", (i << 21) | PTE_PS | PTE_P | PTE_RW | PTE_US))
    m.put(TSS + 4, struct.pack("<Q", 0x9008))     # RSP0 (misaligned on purpose)
    m.put(TSS + 36, struct.pack("<Q", 0xA000))    # IST1
    m.put(TSS + 44, struct.pack("<Q", 0x01000100))  # IST2: unmapped
    return m


def long_state(cpl: int = 0, **kw) -> ArchState:
    st = ArchState(
        rip=0x401000, rsp=0x7FF8, rflags=0x202, cr0=LONG_CR0, cr3=PML4, cr4=CR4_PAE,
        efer=EFER_LME | EFER_LMA | EFER_NXE,
        gdt=DescTable(GDT, 0x7F), idt=DescTable(IDT, 0xFFF),
        tr=Segment(0x28, TSS, 0x67, SEG_P | (0xB << 8)),
    )
    if cpl == 3:
        st.cs = seg(0x3B, flags=attrs(0xB, dpl=3, l=1, db=0))
        st.ss = seg(0x23, flags=DATA3 | 0x100)
        st.rsp = 0x7000
    else:
        st.cs = seg(0x30, flags=CODE64)
        st.ss = seg(0x10, flags=DATA0 | 0x100)
    for k, v in kw.items():
        setattr(st, k, v)
    return st


def test_long_same_privilege_aligns_and_pushes_ss_rsp() -> None:
    m = long_mem()
    m.put(IDT + 14 * 16, gate64(0xFFFFFFFF80200000, 0x30))
    st = long_state()
    new = deliver(st, m, 14, kind=HW, error_code=0x2)
    assert new.rsp == 0x7FF0 - 48
    assert m.u64s(0x7FF0 - 48, 6) == [0x2, 0x401000, 0x30, 0x202 | RFLAGS_RF, 0x7FF8, 0x10]
    assert new.rip == 0xFFFFFFFF80200000
    assert new.rflags == 0x2 and new.ss == st.ss
    assert (new.cs.selector, new.cs.flags) == (0x30, CODE64)
    assert new.code_bits == 64


def test_long_ring3_to_ring0_loads_null_ss() -> None:
    m = long_mem()
    m.put(IDT + 0x20 * 16, gate64(0x500000, 0x30))
    new = deliver(long_state(cpl=3), m, 0x20, kind=EXT_INT)
    assert new.rsp == 0x9000 - 40
    assert m.u64s(0x9000 - 40, 5) == [0x401000, 0x3B, 0x202, 0x7000, 0x23]
    assert (new.ss.selector, new.ss.base, new.ss.flags) == (0, 0, 0)
    assert new.cpl == 0 and new.cs.selector == 0x30
    assert gdt_hi(m, 0x30) & 0x100


def test_long_int_n_from_ring3() -> None:
    m = long_mem()
    m.put(IDT + 0x80 * 16, gate64(0x500000, 0x30, 0xF, dpl=3))
    new = deliver(long_state(cpl=3), m, 0x80, kind=SOFT_INT, insn_len=2)
    assert m.u64s(0x9000 - 40, 5) == [0x401002, 0x3B, 0x202, 0x7000, 0x23]
    assert new.rflags == 0x202  # trap gate
    m.put(IDT + 0x81 * 16, gate64(0x500000, 0x30, 0xE, dpl=0))
    f = fault(deliver, long_state(cpl=3), m, 0x81, kind=SOFT_INT, insn_len=2)
    assert (f.vector, f.error_code) == (13, 0x81 * 8 + 2)


def test_long_ist_used_even_without_privilege_change() -> None:
    m = long_mem()
    m.put(IDT + 2 * 16, gate64(0x500000, 0x30, ist=1))
    new = deliver(long_state(), m, 2, kind=EventKind.NMI)
    assert new.rsp == 0xA000 - 40
    assert m.u64s(0xA000 - 40, 5) == [0x401000, 0x30, 0x202, 0x7FF8, 0x10]


def test_long_gate_and_target_checks() -> None:
    m = long_mem()
    m.put(IDT + 6 * 16, gate64(0x500000, 0x30, 0x6))  # 16-bit interrupt gate: invalid
    assert fault(deliver, long_state(), m, 6, kind=HW).error_code == 6 * 8 + 3
    m.put(IDT + 7 * 16, gate64(0x500000, 0x08))       # 32-bit code target
    f = fault(deliver, long_state(), m, 7, kind=HW)
    assert (f.vector, f.error_code) == (13, 0x09)
    m.put(IDT + 5 * 16, gate64(0x0000800000000000, 0x30))
    f = fault(deliver, long_state(), m, 5, kind=HW)
    assert (f.vector, f.error_code) == (13, 1)
    st = long_state(idt=DescTable(IDT, 0x3FF))
    assert fault(deliver, st, m, 0x40, kind=EXT_INT).error_code == 0x40 * 8 + 3
    m.put(IDT + 0x3F * 16, gate64(0x500000, 0x30))
    st = long_state(idt=DescTable(IDT, 0x3FE))  # gate's last byte beyond the limit
    assert fault(deliver, st, m, 0x3F, kind=EXT_INT).error_code == 0x3F * 8 + 3


def test_long_tss_limit() -> None:
    m = long_mem()
    m.put(IDT + 2 * 16, gate64(0x500000, 0x30, ist=1))
    st = long_state()
    st.tr.limit = 0x2B  # IST1 ends at 0x2B
    assert deliver(st, m, 2, kind=EventKind.NMI).rsp == 0xA000 - 40
    st.tr.limit = 0x2A
    f = fault(deliver, st, m, 2, kind=EventKind.NMI)
    assert (f.vector, f.error_code) == (10, 0x29)


def test_long_non_canonical_stack_is_ss() -> None:
    m = long_mem()
    m.put(IDT + 0x20 * 16, gate64(0x500000, 0x30))
    f = fault(deliver, long_state(rsp=0x0000800000000010), m, 0x20, kind=EXT_INT)
    assert (f.vector, f.error_code) == (12, 1)


def test_long_stack_page_fault() -> None:
    m = long_mem()
    m.put(IDT + 0x20 * 16, gate64(0x500000, 0x30))
    with pytest.raises(PageFault) as info:
        deliver(long_state(rsp=0x01000108), m, 0x20, kind=EXT_INT)
    assert (info.value.linear, info.value.error_code) == (0x010000F8, 0x2)


# ======================================================================== escalation
def test_contributory_twice_becomes_double_fault() -> None:
    m = long_mem()
    m.put(IDT + 8 * 16, gate64(0x600000, 0x30, ist=1))  # #GP gate empty (type 0) → #GP
    st = long_state()
    new = deliver_with_escalation(st, m, 13, HW, 0x10)
    assert isinstance(new, ArchState)
    assert new.rip == 0x600000 and new.rsp == 0xA000 - 48
    assert m.u64s(0xA000 - 48, 6) == [0, 0x401000, 0x30, 0x202, 0x7FF8, 0x10]  # #DF: abort, no RF


def test_benign_then_contributory_is_serial() -> None:
    m = long_mem()
    m.put(IDT + 6 * 16, gate64(0x500000, 0x30, p=0))  # #UD gate not present → #NP
    m.put(IDT + 11 * 16, gate64(0x600000, 0x30, ist=1))
    new = deliver_with_escalation(long_state(), m, 6, HW)
    assert isinstance(new, ArchState) and new.rip == 0x600000
    assert m.u64s(0xA000 - 48, 2) == [6 * 8 + 3, 0x401000]


def test_page_fault_during_interrupt_delivery_sets_cr2() -> None:
    m = long_mem()
    m.put(IDT + 0x20 * 16, gate64(0x500000, 0x30, ist=2))  # IST2 stack not mapped
    m.put(IDT + 14 * 16, gate64(0x700000, 0x30, ist=1))
    st = long_state()
    new = deliver_with_escalation(st, m, 0x20, EXT_INT)
    assert isinstance(new, ArchState)
    assert new.cr2 == 0x010000F8 and st.cr2 == 0
    assert new.rip == 0x700000
    assert m.u64s(0xA000 - 48, 6) == [0x2, 0x401000, 0x30, 0x202 | RFLAGS_RF, 0x7FF8, 0x10]


def test_contributory_then_page_fault_is_serial() -> None:
    m = long_mem()
    m.put(TSS + 4, struct.pack("<Q", 0x01000100))  # RSP0 unmapped
    m.put(IDT + 13 * 16, gate64(0x500000, 0x30))
    m.put(IDT + 14 * 16, gate64(0x700000, 0x30, ist=1))
    new = deliver_with_escalation(long_state(cpl=3), m, 13, HW, 0)
    assert isinstance(new, ArchState)
    assert (new.rip, new.cr2, new.cpl) == (0x700000, 0x010000F8, 0)
    assert m.u64s(0xA000 - 48, 6) == [0x2, 0x401000, 0x3B, 0x202 | RFLAGS_RF, 0x7000, 0x23]


def test_page_fault_then_page_fault_is_double_fault() -> None:
    m = long_mem()
    m.put(IDT + 14 * 16, gate64(0x700000, 0x30))  # same stack, which is unmapped
    m.put(IDT + 8 * 16, gate64(0x600000, 0x30, ist=1))
    st = long_state(rsp=0x01000200, cr2=0x1234)
    new = deliver_with_escalation(st, m, 14, HW, 0x0)
    assert isinstance(new, ArchState)
    assert (new.rip, new.cr2) == (0x600000, 0x010001F8)
    assert m.u64s(0xA000 - 48, 6) == [0, 0x401000, 0x30, 0x202, 0x01000200, 0x10]


def test_page_fault_then_contributory_is_double_fault_and_then_triple() -> None:
    m = long_mem()
    new = deliver_with_escalation(long_state(cr2=0x55), m, 14, HW, 0x4)  # empty IDT → #GP
    assert isinstance(new, TripleFault)
    assert new.vectors == (14, 8, 13)
    assert new.state.cr2 == 0x55


def test_fault_in_double_fault_is_triple_fault() -> None:
    m = pm_mem()
    m.put(IDT + 8 * 8, gate32(0x500000, 0x48, 0xE))  # #DF handler CS not present
    res = deliver_with_escalation(pm_state(), m, 13, HW, 0)
    assert isinstance(res, TripleFault)
    assert res.vectors == (13, 8, 11)
