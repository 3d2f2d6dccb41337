"""Local APIC facts: register offsets, bit fields, MSRs and per-register access rules.

Names follow Linux's arch/x86/include/asm/apicdef.h (the names KVM's lapic.c uses).
Behaviour lives in nestvisor.kvm.lapic; this module is data only and imports nothing.
Sources: Intel SDM vol. 3A chapter 11 ("Advanced Programmable Interrupt Controller",
chapter 10 in older editions) and KVM arch/x86/kvm/lapic.c.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# --- register page --------------------------------------------------------------------

APIC_DEFAULT_PHYS_BASE = 0xFEE00000
LAPIC_MMIO_LENGTH = 0x1000  # KVM LAPIC_MMIO_LENGTH: one 4 KiB page is decoded
KVM_APIC_REG_SIZE = 0x400  # KVM kvm_lapic_state.regs: the first 1 KiB holds every register

APIC_ID = 0x20
APIC_LVR = 0x30
APIC_TASKPRI = 0x80
APIC_ARBPRI = 0x90
APIC_PROCPRI = 0xA0
APIC_EOI = 0xB0
APIC_RRR = 0xC0
APIC_LDR = 0xD0
APIC_DFR = 0xE0
APIC_SPIV = 0xF0
APIC_ISR = 0x100  # 8 registers, 0x100..0x170
APIC_TMR = 0x180  # 8 registers, 0x180..0x1F0
APIC_IRR = 0x200  # 8 registers, 0x200..0x270
APIC_ESR = 0x280
APIC_LVTCMCI = 0x2F0
APIC_ICR = 0x300
APIC_ICR2 = 0x310
APIC_LVTT = 0x320
APIC_LVTTHMR = 0x330
APIC_LVTPC = 0x340
APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_LVTERR = 0x370
APIC_TMICT = 0x380
APIC_TMCCT = 0x390
APIC_TDCR = 0x3E0
APIC_SELF_IPI = 0x3F0  # x2APIC only (SDM 11.12.11)

APIC_ISR_NR = 8  # 256 vectors / 32 bits per register

# --- version register (KVM kvm_apic_set_version) ---------------------------------------

APIC_VERSION = 0x14  # "14 is the version for Xeon and Pentium" (KVM APIC_VERSION)
APIC_LVR_DIRECTED_EOI = (
    1 << 24
)  # EOI-broadcast suppression; not advertised (KVM: only without in-kernel IOAPIC)
KVM_APIC_MAX_NR_LVT_ENTRIES = 7  # timer, thermal, perf, LINT0, LINT1, error, CMCI
APIC_NR_LVT = 6  # KVM without MCG_CMCI_P: LVT_CMCI is absent


def apic_lvr_value(nr_lvt: int = APIC_NR_LVT) -> int:
    """LVR = version | (max LVT index) << 16 (KVM kvm_apic_set_version)."""
    return APIC_VERSION | ((nr_lvt - 1) << 16)


APIC_LVR_VALUE = apic_lvr_value()  # 0x50014

# --- IA32_APIC_BASE and related MSRs (SDM 11.4.4, 11.12.1) ----------------------------------

MSR_IA32_APICBASE = 0x1B
MSR_IA32_APICBASE_BSP = 1 << 8
MSR_IA32_APICBASE_EXTD = 1 << 10  # X2APIC_ENABLE in KVM
MSR_IA32_APICBASE_ENABLE = 1 << 11
MSR_IA32_APICBASE_BASE = 0xFFFFF << 12  # bits 12.. up to MAXPHYADDR
APIC_BASE_LOW_RESERVED = 0x2FF  # bits 0-7 and 9 (KVM kvm_apic_set_base)

MSR_IA32_TSC_DEADLINE = 0x6E0

X2APIC_MSR_BASE = 0x800  # APIC_BASE_MSR: msr = 0x800 + (offset >> 4) (SDM 11.12.1.2)
X2APIC_MSR_LAST = 0x8FF


def x2apic_msr(offset: int) -> int:
    """x2APIC MSR index of the register at xAPIC MMIO `offset`."""
    return X2APIC_MSR_BASE + (offset >> 4)


def x2apic_offset(msr: int) -> int:
    """xAPIC MMIO offset of x2APIC MSR `msr` (KVM: reg = (msr - APIC_BASE_MSR) << 4)."""
    return (msr - X2APIC_MSR_BASE) << 4


# LAPIC modes as KVM's enum lapic_mode: the EN and EXTD bits of IA32_APIC_BASE.
LAPIC_MODE_DISABLED = 0
LAPIC_MODE_INVALID = MSR_IA32_APICBASE_EXTD  # EXTD without EN (SDM 11.12.5)
LAPIC_MODE_XAPIC = MSR_IA32_APICBASE_ENABLE
LAPIC_MODE_X2APIC = MSR_IA32_APICBASE_ENABLE | MSR_IA32_APICBASE_EXTD

# --- LVT and ICR bit fields (SDM 11.5.1, 11.6.1) -------------------------------------------

APIC_VECTOR_MASK = 0xFF
APIC_MODE_MASK = 0x700  # delivery mode, bits 10:8
APIC_DM_FIXED = 0x000
APIC_DM_LOWEST = 0x100
APIC_DM_SMI = 0x200
APIC_DM_REMRD = 0x300
APIC_DM_NMI = 0x400
APIC_DM_INIT = 0x500
APIC_DM_STARTUP = 0x600
APIC_DM_EXTINT = 0x700

DELIVERY_MODE_NAMES = {
    APIC_DM_FIXED: "fixed",
    APIC_DM_LOWEST: "lowest-priority",
    APIC_DM_SMI: "SMI",
    APIC_DM_REMRD: "remote-read",
    APIC_DM_NMI: "NMI",
    APIC_DM_INIT: "INIT",
    APIC_DM_STARTUP: "start-up",
    APIC_DM_EXTINT: "ExtINT",
}

APIC_DEST_PHYSICAL = 0x000
APIC_DEST_LOGICAL = 0x800  # ICR bit 11
APIC_ICR_BUSY = 0x1000  # ICR delivery status (bit 12); also LVT "send pending"
APIC_SEND_PENDING = 0x1000
APIC_INPUT_POLARITY = 0x2000
APIC_LVT_REMOTE_IRR = 0x4000
APIC_INT_ASSERT = 0x4000  # ICR level bit 14
APIC_INT_LEVELTRIG = 0x8000  # ICR/LVT trigger mode bit 15
APIC_LVT_LEVEL_TRIGGER = 0x8000
APIC_LVT_MASKED = 0x10000

APIC_SHORT_MASK = 0xC0000  # destination shorthand, bits 19:18
APIC_DEST_NOSHORT = 0x00000
APIC_DEST_SELF = 0x40000
APIC_DEST_ALLINC = 0x80000
APIC_DEST_ALLBUT = 0xC0000

SHORTHAND_NAMES = {
    APIC_DEST_NOSHORT: "none",
    APIC_DEST_SELF: "self",
    APIC_DEST_ALLINC: "all-including-self",
    APIC_DEST_ALLBUT: "all-excluding-self",
}

XAPIC_DEST_SHIFT = 24  # ICR2 bits 31:24 hold the xAPIC destination (GET_XAPIC_DEST_FIELD)
APIC_BROADCAST = 0xFF
X2APIC_BROADCAST = 0xFFFFFFFF

# x2APIC ICR bits that must be zero (KVM X2APIC_ICR_RESERVED_BITS: 31:20, 17:16, 13).
X2APIC_ICR_RESERVED_BITS = (0xFFF << 20) | (0x3 << 16) | (1 << 13)

# --- LVT timer modes (SDM 11.5.4) -----------------------------------------------------------

APIC_LVT_TIMER_SHIFT = 17
APIC_LVT_TIMER_ONESHOT = 0 << APIC_LVT_TIMER_SHIFT
APIC_LVT_TIMER_PERIODIC = 1 << APIC_LVT_TIMER_SHIFT
APIC_LVT_TIMER_TSCDEADLINE = 2 << APIC_LVT_TIMER_SHIFT
APIC_LVT_TIMER_MASK = 3 << APIC_LVT_TIMER_SHIFT  # mode 3 is reserved

TIMER_MODE_NAMES = {0: "one-shot", 1: "periodic", 2: "TSC-deadline"}

# Divide configuration register: TDCR bits 0,1,3 -> divisor (SDM 11.5.4, Figure 11-10).
APIC_TDCR_MASK = 0xB
TDCR_DIVISOR = {
    0b0000: 2,
    0b0001: 4,
    0b0010: 8,
    0b0011: 16,
    0b1000: 32,
    0b1001: 64,
    0b1010: 128,
    0b1011: 1,
}

APIC_BUS_CYCLE_NS = 1  # spec: APIC bus clock is 1 GHz (KVM APIC_BUS_CYCLE_NS_DEFAULT = 1)

# --- LVT write masks (KVM apic_lvt_mask) --------------------------------------------------

LVT_MASK = APIC_LVT_MASKED | APIC_SEND_PENDING | APIC_VECTOR_MASK
LINT_MASK = (
    LVT_MASK | APIC_MODE_MASK | APIC_INPUT_POLARITY | APIC_LVT_REMOTE_IRR | APIC_LVT_LEVEL_TRIGGER
)

# LVT index order as KVM's enum lapic_lvt_entry / APIC_LVTx(i).
LVT_REGISTERS = (
    APIC_LVTT,
    APIC_LVTTHMR,
    APIC_LVTPC,
    APIC_LVT0,
    APIC_LVT1,
    APIC_LVTERR,
    APIC_LVTCMCI,
)

LVT_WRITE_MASK = {
    APIC_LVTT: LVT_MASK,  # plus the timer-mode mask, which depends on TSC-deadline support
    APIC_LVTTHMR: LVT_MASK | APIC_MODE_MASK,
    APIC_LVTPC: LVT_MASK | APIC_MODE_MASK,
    APIC_LVT0: LINT_MASK,
    APIC_LVT1: LINT_MASK,
    APIC_LVTERR: LVT_MASK,
    APIC_LVTCMCI: LVT_MASK | APIC_MODE_MASK,
}

# --- spurious-interrupt vector register (SDM 11.9) ------------------------------------------

APIC_SPIV_VECTOR_MASK = 0xFF
APIC_SPIV_APIC_ENABLED = 1 << 8
APIC_SPIV_FOCUS_DISABLED = 1 << 9
APIC_SPIV_DIRECTED_EOI = 1 << 12
APIC_SPIV_WRITE_MASK = 0x3FF  # KVM: directed-EOI bit only when LVR advertises it
APIC_SPIV_RESET = 0xFF

# --- destination format / logical destination (SDM 11.6.2.2) ---------------------------------

APIC_DFR_FLAT = 0xFFFFFFFF
APIC_DFR_CLUSTER = 0x0FFFFFFF
APIC_DFR_MODEL_MASK = 0xF0000000  # bits 27:0 read as ones (KVM: val | 0x0FFFFFFF)
APIC_LDR_MASK = 0xFF000000  # xAPIC logical ID, bits 31:24


def x2apic_ldr(x2apic_id: int) -> int:
    """x2APIC LDR derived from the ID: cluster in 31:16, one bit in 15:0 (SDM 11.12.10.2)."""
    return ((x2apic_id >> 4) << 16) | (1 << (x2apic_id & 0xF))


# --- error status register bits (SDM 11.5.3) -------------------------------------------------

APIC_ESR_SEND_CS = 1 << 0
APIC_ESR_RECV_CS = 1 << 1
APIC_ESR_SEND_ACC = 1 << 2
APIC_ESR_RECV_ACC = 1 << 3
APIC_ESR_REDIRECTABLE_IPI = 1 << 4
APIC_ESR_SEND_ILLEGAL_VECTOR = 1 << 5
APIC_ESR_RECV_ILLEGAL_VECTOR = 1 << 6
APIC_ESR_ILLEGAL_REGISTER = 1 << 7

APIC_ILLEGAL_VECTOR_LIMIT = 16  # vectors 0-15 are illegal for fixed/lowest (SDM 11.5.2)

# --- CR8 (SDM 11.8.6.1) -----------------------------------------------------------------------

CR8_RESERVED_BITS = ~0xF  # KVM CR8_RESERVED_BITS

# --- per-register access rules -------------------------------------------------------------


@dataclass(frozen=True)
class ApicRegister:
    """One row: where a register is, who may read/write it in which mode, and the bits kept.

    `count` > 1 for the 256-bit IRR/ISR/TMR groups. `write_mask` is the mask of bits a
    write stores (None when the write has a side effect only, or the rule is in code).
    xAPIC reads of non-readable registers return 0; x2APIC accesses that are not allowed
    raise #GP (KVM kvm_lapic_readable_reg_mask, kvm_lapic_reg_write).
    """

    name: str
    offset: int
    xapic_read: bool
    xapic_write: bool
    x2apic_read: bool
    x2apic_write: bool
    write_mask: int | None = None
    count: int = 1


APIC_REGISTERS: tuple[ApicRegister, ...] = (
    ApicRegister("ID", APIC_ID, True, True, True, False, 0xFF000000),
    ApicRegister("LVR", APIC_LVR, True, False, True, False),
    ApicRegister("TASKPRI", APIC_TASKPRI, True, True, True, True, 0xFF),
    ApicRegister("ARBPRI", APIC_ARBPRI, True, False, False, False),
    ApicRegister("PROCPRI", APIC_PROCPRI, True, False, True, False),
    ApicRegister("EOI", APIC_EOI, False, True, False, True),
    ApicRegister("RRR", APIC_RRR, False, False, False, False),
    ApicRegister("LDR", APIC_LDR, True, True, True, False, APIC_LDR_MASK),
    ApicRegister("DFR", APIC_DFR, True, True, False, False, APIC_DFR_MODEL_MASK),
    ApicRegister("SPIV", APIC_SPIV, True, True, True, True, APIC_SPIV_WRITE_MASK),
    ApicRegister("ISR", APIC_ISR, True, False, True, False, count=APIC_ISR_NR),
    ApicRegister("TMR", APIC_TMR, True, False, True, False, count=APIC_ISR_NR),
    ApicRegister("IRR", APIC_IRR, True, False, True, False, count=APIC_ISR_NR),
    ApicRegister("ESR", APIC_ESR, True, True, True, True),
    ApicRegister("LVTCMCI", APIC_LVTCMCI, True, True, True, True, LVT_WRITE_MASK[APIC_LVTCMCI]),
    ApicRegister("ICR", APIC_ICR, True, True, True, True),
    ApicRegister("ICR2", APIC_ICR2, True, True, False, False, 0xFF000000),
    ApicRegister("LVTT", APIC_LVTT, True, True, True, True, LVT_WRITE_MASK[APIC_LVTT]),
    ApicRegister("LVTTHMR", APIC_LVTTHMR, True, True, True, True, LVT_WRITE_MASK[APIC_LVTTHMR]),
    ApicRegister("LVTPC", APIC_LVTPC, True, True, True, True, LVT_WRITE_MASK[APIC_LVTPC]),
    ApicRegister("LVT0", APIC_LVT0, True, True, True, True, LVT_WRITE_MASK[APIC_LVT0]),
    ApicRegister("LVT1", APIC_LVT1, True, True, True, True, LVT_WRITE_MASK[APIC_LVT1]),
    ApicRegister("LVTERR", APIC_LVTERR, True, True, True, True, LVT_WRITE_MASK[APIC_LVTERR]),
    ApicRegister("TMICT", APIC_TMICT, True, True, True, True, 0xFFFFFFFF),
    ApicRegister("TMCCT", APIC_TMCCT, True, False, True, False),
    ApicRegister("TDCR", APIC_TDCR, True, True, True, True, APIC_TDCR_MASK),
    ApicRegister("SELF_IPI", APIC_SELF_IPI, False, False, False, True, APIC_VECTOR_MASK),
)

# offset (16-byte aligned) -> row; the IRR/ISR/TMR groups appear once per 32-bit register.
APIC_REGISTER_AT: dict[int, ApicRegister] = {
    reg.offset + 0x10 * i: reg for reg in APIC_REGISTERS for i in range(reg.count)
}


def _reg_bitmap(pred: Callable[[ApicRegister], bool]) -> int:
    """Bitmap with bit (offset >> 4) set for each register satisfying pred (KVM APIC_REG_MASK)."""
    mask = 0
    for offset, reg in APIC_REGISTER_AT.items():
        if pred(reg):
            mask |= 1 << (offset >> 4)
    return mask


# KVM kvm_lapic_readable_reg_mask(), with and without x2APIC. LVTCMCI is removed at run
# time when the APIC has only 6 LVT entries.
XAPIC_READABLE = _reg_bitmap(lambda r: r.xapic_read)
X2APIC_READABLE = _reg_bitmap(lambda r: r.x2apic_read)
XAPIC_WRITABLE = _reg_bitmap(lambda r: r.xapic_write)
X2APIC_WRITABLE = _reg_bitmap(lambda r: r.x2apic_write)


def apic_reg_bit(offset: int) -> int:
    """KVM APIC_REG_MASK(reg): the bit for `offset` in the readable/writable bitmaps."""
    return 1 << (offset >> 4)
