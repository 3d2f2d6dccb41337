"""x86 architectural facts as data: control-register bits, EFER, RFLAGS, exceptions, gates.

Names follow the SDM (Intel 64 and IA-32 Architectures Software Developer's Manual, Vol. 3).
This module imports nothing from nestvisor (DESIGN: arch imports nothing).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

# --- CR0 (SDM 2.5 "Control Registers") -------------------------------------------------
CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_EM = 1 << 2
CR0_TS = 1 << 3
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_AM = 1 << 18
CR0_NW = 1 << 29
CR0_CD = 1 << 30
CR0_PG = 1 << 31

# --- CR4 (SDM 2.5) -----------------------------------------------------------------------
CR4_VME = 1 << 0
CR4_PVI = 1 << 1
CR4_TSD = 1 << 2
CR4_DE = 1 << 3
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_MCE = 1 << 6
CR4_PGE = 1 << 7
CR4_PCE = 1 << 8
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
CR4_UMIP = 1 << 11
CR4_LA57 = 1 << 12
CR4_VMXE = 1 << 13
CR4_SMXE = 1 << 14
CR4_FSGSBASE = 1 << 16
CR4_PCIDE = 1 << 17
CR4_OSXSAVE = 1 << 18
CR4_KL = 1 << 19
CR4_SMEP = 1 << 20
CR4_SMAP = 1 << 21
CR4_PKE = 1 << 22
CR4_CET = 1 << 23
CR4_PKS = 1 << 24
CR4_UINTR = 1 << 25
CR4_LAM_SUP = 1 << 28

# --- IA32_EFER (SDM 2.2.1 "Extended Feature Enable Register"; AMD APM 3.1.7) -------------
EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11
EFER_SVME = 1 << 12
EFER_LMSLE = 1 << 13
EFER_FFXSR = 1 << 14
EFER_TCE = 1 << 15

# --- RFLAGS (SDM Vol. 1 3.4.3) -----------------------------------------------------------
RFLAGS_CF = 1 << 0
RFLAGS_FIXED = 1 << 1  # always 1
RFLAGS_PF = 1 << 2
RFLAGS_AF = 1 << 4
RFLAGS_ZF = 1 << 6
RFLAGS_SF = 1 << 7
RFLAGS_TF = 1 << 8
RFLAGS_IF = 1 << 9
RFLAGS_DF = 1 << 10
RFLAGS_OF = 1 << 11
RFLAGS_IOPL_SHIFT = 12
RFLAGS_IOPL = 3 << RFLAGS_IOPL_SHIFT
RFLAGS_NT = 1 << 14
RFLAGS_RF = 1 << 16
RFLAGS_VM = 1 << 17
RFLAGS_AC = 1 << 18
RFLAGS_VIF = 1 << 19
RFLAGS_VIP = 1 << 20
RFLAGS_ID = 1 << 21

# --- Paging-structure entry bits (SDM 4.3-4.5, Tables 4-4 .. 4-20) ------------------------
PTE_P = 1 << 0
PTE_RW = 1 << 1
PTE_US = 1 << 2
PTE_PWT = 1 << 3
PTE_PCD = 1 << 4
PTE_A = 1 << 5
PTE_D = 1 << 6
PTE_PS = 1 << 7
PTE_PAT_4K = 1 << 7
PTE_G = 1 << 8
PTE_PAT_LARGE = 1 << 12
PTE_XD = 1 << 63

# --- Page-fault error code (SDM 4.7 "Page-Fault Exceptions", Figure 4-12) -----------------
PFERR_P = 1 << 0
PFERR_W = 1 << 1
PFERR_U = 1 << 2
PFERR_RSVD = 1 << 3
PFERR_I = 1 << 4
PFERR_PK = 1 << 5
PFERR_SS = 1 << 6
PFERR_SGX = 1 << 15
# AMD nested page faults (KVM PFERR_GUEST_FINAL_MASK / PFERR_GUEST_PAGE_MASK, APM 15.25.6):
# the fault was on the final guest-physical address, or on a guest page-table access
PFERR_GUEST_FINAL = 1 << 32
PFERR_GUEST_PAGE = 1 << 33

# --- Selector error code (SDM 6.13 "Error Code", Figure 6-6) ------------------------------
ERR_EXT = 1 << 0
ERR_IDT = 1 << 1
ERR_TI = 1 << 2

# --- Segment selector (SDM 3.4.2) ---------------------------------------------------------
SEL_RPL_MASK = 3
SEL_TI = 1 << 2
SEL_INDEX_MASK = 0xFFF8
# Segment register numbers, as ModRM's Sreg field and the VMX instruction information encode them
SREG_ES, SREG_CS, SREG_SS, SREG_DS, SREG_FS, SREG_GS = range(6)

# --- System descriptor / gate types, S = 0 (SDM 3.5 Table 3-2) ----------------------------
# Legacy (32-bit) meanings; in IA-32e mode only the 64-bit types (LDT, TSS, call/int/trap) exist.
SYS_TSS16_AVAIL = 0x1
SYS_LDT = 0x2
SYS_TSS16_BUSY = 0x3
GATE_CALL16 = 0x4
GATE_TASK = 0x5
GATE_INT16 = 0x6
GATE_TRAP16 = 0x7
SYS_TSS32_AVAIL = 0x9
SYS_TSS32_BUSY = 0xB
GATE_CALL32 = 0xC
GATE_INT32 = 0xE
GATE_TRAP32 = 0xF
# IA-32e mode (SDM 3.5 Table 3-2, IA-32e column): 0xE/0xF are the 64-bit interrupt/trap gates.
GATE_INT64 = 0xE
GATE_TRAP64 = 0xF

# IDT gate types valid for interrupt delivery (SDM 6.11 legacy, 6.14.1 IA-32e).
IDT_GATE_TYPES_LEGACY = frozenset({GATE_TASK, GATE_INT16, GATE_TRAP16, GATE_INT32, GATE_TRAP32})
IDT_GATE_TYPES_IA32E = frozenset({GATE_INT64, GATE_TRAP64})
INTERRUPT_GATE_TYPES = frozenset({GATE_INT16, GATE_INT32})  # these clear RFLAGS.IF (SDM 6.12.1.3)

# Code/data segment type bits, S = 1 (SDM 3.4.5.1 Table 3-1).
SEG_TYPE_ACCESSED = 0x1
SEG_TYPE_WRITABLE = 0x2  # data
SEG_TYPE_READABLE = 0x2  # code
SEG_TYPE_EXPAND_DOWN = 0x4  # data
SEG_TYPE_CONFORMING = 0x4  # code
SEG_TYPE_CODE = 0x8

# --- VMX/KVM event (interruption) types (SDM 25.8.3 "VM-Entry Controls for Event Injection") ---
INTR_TYPE_EXT_INTR = 0
INTR_TYPE_NMI = 2
INTR_TYPE_HARD_EXCEPTION = 3
INTR_TYPE_SOFT_INTR = 4
INTR_TYPE_PRIV_SW_EXCEPTION = 5
INTR_TYPE_SOFT_EXCEPTION = 6


# --- Exceptions (SDM 6.15 "Exception and Interrupt Reference", Tables 6-1, 6-4) -------------
class ExceptionClass(enum.Enum):
    """Class used by the double-fault rules (SDM 6.15 Table 6-4, Table 6-5)."""

    BENIGN = "benign"
    CONTRIBUTORY = "contributory"
    PAGE_FAULT = "page-fault"
    DOUBLE_FAULT = "double-fault"


class ExceptionType(enum.Enum):
    """Fault, trap or abort (SDM 6.5)."""

    FAULT = "fault"
    TRAP = "trap"
    FAULT_OR_TRAP = "fault/trap"  # #DB: depends on the condition (SDM 17.3)
    ABORT = "abort"
    INTERRUPT = "interrupt"  # NMI and user-defined vectors


@dataclass(frozen=True)
class ExceptionInfo:
    vector: int
    mnemonic: str
    error_code: bool  # pushes an error code in protected mode
    klass: ExceptionClass
    type: ExceptionType
    reserved: bool = False


_B, _C, _PF, _DF = (
    ExceptionClass.BENIGN, ExceptionClass.CONTRIBUTORY, ExceptionClass.PAGE_FAULT,
    ExceptionClass.DOUBLE_FAULT,
)
_F, _T, _FT, _A, _I = (
    ExceptionType.FAULT, ExceptionType.TRAP, ExceptionType.FAULT_OR_TRAP, ExceptionType.ABORT,
    ExceptionType.INTERRUPT,
)

# SDM 6.15; #CP is contributory per Table 6-4. 29 (#VC) and 30 (#SX) are AMD (APM 8.2).
EXCEPTIONS: tuple[ExceptionInfo, ...] = (
    ExceptionInfo(0, "#DE", False, _C, _F),
    ExceptionInfo(1, "#DB", False, _B, _FT),
    ExceptionInfo(2, "NMI", False, _B, _I),
    ExceptionInfo(3, "#BP", False, _B, _T),
    ExceptionInfo(4, "#OF", False, _B, _T),
    ExceptionInfo(5, "#BR", False, _B, _F),
    ExceptionInfo(6, "#UD", False, _B, _F),
    ExceptionInfo(7, "#NM", False, _B, _F),
    ExceptionInfo(8, "#DF", True, _DF, _A),
    ExceptionInfo(9, "CSO", False, _B, _A),  # coprocessor segment overrun, reserved since i486
    ExceptionInfo(10, "#TS", True, _C, _F),
    ExceptionInfo(11, "#NP", True, _C, _F),
    ExceptionInfo(12, "#SS", True, _C, _F),
    ExceptionInfo(13, "#GP", True, _C, _F),
    ExceptionInfo(14, "#PF", True, _PF, _F),
    ExceptionInfo(15, "reserved15", False, _B, _F, reserved=True),
    ExceptionInfo(16, "#MF", False, _B, _F),
    ExceptionInfo(17, "#AC", True, _B, _F),
    ExceptionInfo(18, "#MC", False, _B, _A),
    ExceptionInfo(19, "#XM", False, _B, _F),
    ExceptionInfo(20, "#VE", False, _B, _F),
    ExceptionInfo(21, "#CP", True, _C, _F),
    *(ExceptionInfo(v, f"reserved{v}", False, _B, _F, reserved=True) for v in range(22, 29)),
    ExceptionInfo(29, "#VC", True, _B, _F),
    ExceptionInfo(30, "#SX", True, _B, _F),
    ExceptionInfo(31, "reserved31", False, _B, _F, reserved=True),
)
assert all(e.vector == i for i, e in enumerate(EXCEPTIONS))

DE_VECTOR, DB_VECTOR, NMI_VECTOR, BP_VECTOR, OF_VECTOR = 0, 1, 2, 3, 4
BR_VECTOR, UD_VECTOR, NM_VECTOR, DF_VECTOR = 5, 6, 7, 8
TS_VECTOR, NP_VECTOR, SS_VECTOR, GP_VECTOR, PF_VECTOR = 10, 11, 12, 13, 14
MF_VECTOR, AC_VECTOR, MC_VECTOR, XM_VECTOR, VE_VECTOR, CP_VECTOR = 16, 17, 18, 19, 20, 21

_USER_VECTOR_INFO = {v: ExceptionInfo(v, f"INT{v:#04x}", False, _B, _I) for v in range(32, 256)}


def exception_info(vector: int) -> ExceptionInfo:
    """The table row for `vector`; 32..255 are user-defined interrupts (benign, no error code)."""
    if 0 <= vector < 32:
        return EXCEPTIONS[vector]
    if vector in _USER_VECTOR_INFO:
        return _USER_VECTOR_INFO[vector]
    raise ValueError(f"vector {vector} is not in 0..255")


def exception_has_error_code(vector: int) -> bool:
    return 0 <= vector < 32 and EXCEPTIONS[vector].error_code
