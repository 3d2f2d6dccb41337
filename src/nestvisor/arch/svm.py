"""SVM facts: the VMCB layout, intercept bits, exit codes, int_ctl and EVENTINJ formats, the
permission maps, CPUID Fn8000_000A features and the SVM MSRs (AMD APM vol. 2 chapter 15 and
appendix B; Linux arch/x86/include/asm/svm.h and uapi/asm/svm.h).

Names are KVM's. Two choices of ours: the six 32-bit intercept words are named by their pre-5.10
KVM names (`intercept_cr`, `intercept_dr`, `intercept_exceptions`, `intercept_word3..5`; KVM now
declares them as `u32 intercepts[6]`), and `exit_code` is one u64 at 0x70 as the newest KVM
treats it (mainline splits it into exit_code and exit_code_hi). Reserved space is named by its
offset (`reserved_0x18`), as KVM names the save area's.
"""

from __future__ import annotations

VMCB_SIZE = 0x1000
CONTROL_SIZE = 0x400
SAVE_OFFSET = 0x400          # the save area follows the control area
SAVE_SIZE = 0x2E8

# struct vmcb_control_area (APM appendix B table B-1; asm/svm.h): (name, offset, size in bytes)
CONTROL_FIELDS: tuple[tuple[str, int, int], ...] = (
    ("intercept_cr", 0x000, 4),           # intercepts[0]: bits 15:0 CRn read, 31:16 CRn write
    ("intercept_dr", 0x004, 4),           # intercepts[1]: bits 15:0 DRn read, 31:16 DRn write
    ("intercept_exceptions", 0x008, 4),   # intercepts[2]: bit v = exception vector v
    ("intercept_word3", 0x00C, 4),        # intercepts[3]
    ("intercept_word4", 0x010, 4),        # intercepts[4]
    ("intercept_word5", 0x014, 4),        # intercepts[5]
    ("reserved_0x18", 0x018, 36),
    ("pause_filter_thresh", 0x03C, 2),
    ("pause_filter_count", 0x03E, 2),
    ("iopm_base_pa", 0x040, 8),
    ("msrpm_base_pa", 0x048, 8),
    ("tsc_offset", 0x050, 8),
    ("asid", 0x058, 4),
    ("tlb_ctl", 0x05C, 1),
    ("erap_ctl", 0x05D, 1),               # newer KVM; before it, part of reserved_2
    ("reserved_0x5e", 0x05E, 2),
    ("int_ctl", 0x060, 4),
    ("int_vector", 0x064, 4),
    ("int_state", 0x068, 4),
    ("reserved_0x6c", 0x06C, 4),
    ("exit_code", 0x070, 8),              # mainline: exit_code (u32) and exit_code_hi (u32)
    ("exit_info_1", 0x078, 8),
    ("exit_info_2", 0x080, 8),
    ("exit_int_info", 0x088, 4),
    ("exit_int_info_err", 0x08C, 4),
    ("nested_ctl", 0x090, 8),             # newer KVM: misc_ctl
    ("avic_vapic_bar", 0x098, 8),
    ("ghcb_gpa", 0x0A0, 8),
    ("event_inj", 0x0A8, 4),
    ("event_inj_err", 0x0AC, 4),
    ("nested_cr3", 0x0B0, 8),
    ("virt_ext", 0x0B8, 8),               # newer KVM: misc_ctl2
    ("clean", 0x0C0, 4),
    ("reserved_0xc4", 0x0C4, 4),
    ("next_rip", 0x0C8, 8),
    ("insn_len", 0x0D0, 1),
    ("insn_bytes", 0x0D1, 15),
    ("avic_backing_page", 0x0E0, 8),
    ("reserved_0xe8", 0x0E8, 8),
    ("avic_logical_id", 0x0F0, 8),
    ("avic_physical_id", 0x0F8, 8),
    ("reserved_0x100", 0x100, 8),
    ("vmsa_pa", 0x108, 8),
    ("reserved_0x110", 0x110, 16),
    ("bus_lock_counter", 0x120, 2),
    ("reserved_0x122", 0x122, 22),
    ("allowed_sev_features", 0x138, 8),
    ("guest_sev_features", 0x140, 8),
    ("reserved_0x148", 0x148, 664),
    ("reserved_sw", 0x3E0, 32),           # for the hypervisor's use (Hyper-V's enlightened VMCB)
)
INTERCEPT_WORDS = ("intercept_cr", "intercept_dr", "intercept_exceptions",
                   "intercept_word3", "intercept_word4", "intercept_word5")

# struct vmcb_seg (APM appendix B table B-2): (name, offset, size) inside the 16 bytes
SEG_FIELDS: tuple[tuple[str, int, int], ...] = (
    ("selector", 0, 2), ("attrib", 2, 2), ("limit", 4, 4), ("base", 8, 8),
)
SEG_SIZE = 16
SEGMENTS = ("es", "cs", "ss", "ds", "fs", "gs", "gdtr", "ldtr", "idtr", "tr")

# struct vmcb_save_area, legacy and SEV-MEM layout (APM table B-2; asm/svm.h): (name, offset
# from SAVE_OFFSET, size); the ten segments are vmcb_seg rows of SEG_SIZE bytes
SAVE_FIELDS: tuple[tuple[str, int, int], ...] = (
    *((seg, 0x10 * i, SEG_SIZE) for i, seg in enumerate(SEGMENTS)),
    ("reserved_0xa0", 0x0A0, 42),
    ("vmpl", 0x0CA, 1),
    ("cpl", 0x0CB, 1),
    ("reserved_0xcc", 0x0CC, 4),
    ("efer", 0x0D0, 8),
    ("reserved_0xd8", 0x0D8, 112),
    ("cr4", 0x148, 8),
    ("cr3", 0x150, 8),
    ("cr0", 0x158, 8),
    ("dr7", 0x160, 8),
    ("dr6", 0x168, 8),
    ("rflags", 0x170, 8),
    ("rip", 0x178, 8),
    ("reserved_0x180", 0x180, 88),
    ("rsp", 0x1D8, 8),
    ("s_cet", 0x1E0, 8),
    ("ssp", 0x1E8, 8),
    ("isst_addr", 0x1F0, 8),
    ("rax", 0x1F8, 8),
    ("star", 0x200, 8),
    ("lstar", 0x208, 8),
    ("cstar", 0x210, 8),
    ("sfmask", 0x218, 8),
    ("kernel_gs_base", 0x220, 8),
    ("sysenter_cs", 0x228, 8),
    ("sysenter_esp", 0x230, 8),
    ("sysenter_eip", 0x238, 8),
    ("cr2", 0x240, 8),
    ("reserved_0x248", 0x248, 32),
    ("g_pat", 0x268, 8),
    ("dbgctl", 0x270, 8),
    ("br_from", 0x278, 8),
    ("br_to", 0x280, 8),
    ("last_excp_from", 0x288, 8),
    ("last_excp_to", 0x290, 8),
    ("reserved_0x298", 0x298, 72),
    ("spec_ctrl", 0x2E0, 8),
)

# name -> (offset, size); CONTROL offsets are from the VMCB's start, SAVE offsets from SAVE_OFFSET
CONTROL = {name: (off, size) for name, off, size in CONTROL_FIELDS}
SAVE = {name: (off, size) for name, off, size in SAVE_FIELDS}

# vmcb_seg.attrib (APM 15.5.1: descriptor bits 47:40 and 55:52; asm/svm.h SVM_SELECTOR_*)
SVM_SELECTOR_TYPE_MASK = 0xF
SVM_SELECTOR_S_MASK = 1 << 4
SVM_SELECTOR_DPL_SHIFT = 5
SVM_SELECTOR_DPL_MASK = 3 << 5
SVM_SELECTOR_P_MASK = 1 << 7
SVM_SELECTOR_AVL_MASK = 1 << 8
SVM_SELECTOR_L_MASK = 1 << 9
SVM_SELECTOR_DB_MASK = 1 << 10
SVM_SELECTOR_G_MASK = 1 << 11

# Intercept bit numbers: bit = 32 * word + bit in word (APM 15.9-15.14 and table B-1; KVM's
# intercept enum in asm/svm.h without its INTERCEPT_ prefix). KVM names only CR0/3/4/8 and
# DR0-7; the APM defines all sixteen of each.
_WORD3 = ("INTR", "NMI", "SMI", "INIT", "VINTR", "SELECTIVE_CR0", "STORE_IDTR", "STORE_GDTR",
          "STORE_LDTR", "STORE_TR", "LOAD_IDTR", "LOAD_GDTR", "LOAD_LDTR", "LOAD_TR", "RDTSC",
          "RDPMC", "PUSHF", "POPF", "CPUID", "RSM", "IRET", "INTn", "INVD", "PAUSE", "HLT",
          "INVLPG", "INVLPGA", "IOIO_PROT", "MSR_PROT", "TASK_SWITCH", "FERR_FREEZE", "SHUTDOWN")
_WORD4 = ("VMRUN", "VMMCALL", "VMLOAD", "VMSAVE", "STGI", "CLGI", "SKINIT", "RDTSCP", "ICEBP",
          "WBINVD", "MONITOR", "MWAIT", "MWAIT_COND", "XSETBV", "RDPRU", "TRAP_EFER_WRITE",
          *(f"TRAP_CR{n}_WRITE" for n in range(16)))
_WORD5 = ("INVLPGB", "INVLPGB_ILLEGAL", "INVPCID", "MCOMMIT", "TLBSYNC", "BUSLOCK", "IDLE_HLT")

INTERCEPT: dict[str, int] = {
    **{f"CR{n}_READ": n for n in range(16)},
    **{f"CR{n}_WRITE": 16 + n for n in range(16)},
    **{f"DR{n}_READ": 32 + n for n in range(16)},
    **{f"DR{n}_WRITE": 48 + n for n in range(16)},
    "EXCEPTION_BASE": 64,                 # KVM INTERCEPT_EXCEPTION_OFFSET
    **{f"EXCEPTION_{v}": 64 + v for v in range(32)},
    **{name: 96 + i for i, name in enumerate(_WORD3)},
    **{name: 128 + i for i, name in enumerate(_WORD4)},
    **{name: 160 + i for i, name in enumerate(_WORD5)},
}
MAX_INTERCEPT = 6                         # intercept words

# Exit codes (APM appendix C; uapi/asm/svm.h SVM_EXIT_* without the prefix). CR/DR accesses are
# named like their intercepts ("CR3_READ"; uapi: READ_CR3): every intercept-driven exit code
# equals its intercept bit number.
_EXITS_0X60 = ("INTR", "NMI", "SMI", "INIT", "VINTR", "CR0_SEL_WRITE", "IDTR_READ", "GDTR_READ",
               "LDTR_READ", "TR_READ", "IDTR_WRITE", "GDTR_WRITE", "LDTR_WRITE", "TR_WRITE",
               "RDTSC", "RDPMC", "PUSHF", "POPF", "CPUID", "RSM", "IRET", "SWINT", "INVD", "PAUSE",
               "HLT", "INVLPG", "INVLPGA", "IOIO", "MSR", "TASK_SWITCH", "FERR_FREEZE", "SHUTDOWN",
               "VMRUN", "VMMCALL", "VMLOAD", "VMSAVE", "STGI", "CLGI", "SKINIT", "RDTSCP", "ICEBP",
               "WBINVD", "MONITOR", "MWAIT", "MWAIT_COND", "XSETBV", "RDPRU", "EFER_WRITE_TRAP",
               *(f"CR{n}_WRITE_TRAP" for n in range(16)),
               "INVLPGB", "INVLPGB_ILLEGAL", "INVPCID", "MCOMMIT", "TLBSYNC", "BUS_LOCK", "IDLE_HLT")

EXIT: dict[str, int] = {
    **{f"CR{n}_READ": n for n in range(16)},
    **{f"CR{n}_WRITE": 0x10 + n for n in range(16)},
    **{f"DR{n}_READ": 0x20 + n for n in range(16)},
    **{f"DR{n}_WRITE": 0x30 + n for n in range(16)},
    "EXCP_BASE": 0x40,                    # 0x40 + vector
    "LAST_EXCP": 0x5F,
    **{name: 0x60 + i for i, name in enumerate(_EXITS_0X60)},
    "NPF": 0x400,
    "AVIC_INCOMPLETE_IPI": 0x401,
    "AVIC_UNACCELERATED_ACCESS": 0x402,
    "VMGEXIT": 0x403,
    "SW": 0xF0000000,                     # KVM-internal (forcing L2 out for SMM)
    "ERR": 0xFFFFFFFFFFFFFFFF,            # VMEXIT_INVALID, -1 as a u64
}

# KVM's trace names (uapi/asm/svm.h SVM_EXIT_REASONS, newest): the exit codes KVM names; it
# prints the others in hex. The SEV-ES VMGEXIT software events are not VMCB exit codes.
_EXCP_TRACE = {0: "DE", 1: "DB", 3: "BP", 4: "OF", 5: "BR", 6: "UD", 7: "NM", 8: "DF", 10: "TS",
               11: "NP", 12: "SS", 13: "GP", 14: "PF", 16: "MF", 17: "AC", 18: "MC", 19: "XF"}
EXIT_NAMES: dict[int, str] = {
    **{EXIT[f"CR{n}_READ"]: f"read_cr{n}" for n in (0, 2, 3, 4, 8)},
    **{EXIT[f"CR{n}_WRITE"]: f"write_cr{n}" for n in (0, 2, 3, 4, 8)},
    **{EXIT[f"DR{n}_READ"]: f"read_dr{n}" for n in range(8)},
    **{EXIT[f"DR{n}_WRITE"]: f"write_dr{n}" for n in range(8)},
    **{EXIT["EXCP_BASE"] + v: f"{mn} excp" for v, mn in _EXCP_TRACE.items()},
    EXIT["INTR"]: "interrupt", EXIT["NMI"]: "nmi", EXIT["SMI"]: "smi", EXIT["INIT"]: "init",
    EXIT["VINTR"]: "vintr", EXIT["CR0_SEL_WRITE"]: "cr0_sel_write",
    EXIT["IDTR_READ"]: "read_idtr", EXIT["GDTR_READ"]: "read_gdtr", EXIT["LDTR_READ"]: "read_ldtr",
    EXIT["TR_READ"]: "read_rt", EXIT["IDTR_WRITE"]: "write_idtr", EXIT["GDTR_WRITE"]: "write_gdtr",
    EXIT["LDTR_WRITE"]: "write_ldtr", EXIT["TR_WRITE"]: "write_rt",
    **{EXIT[name]: name.lower() for name in (
        "RDTSC", "RDPMC", "PUSHF", "POPF", "CPUID", "RSM", "IRET", "SWINT", "INVD", "PAUSE", "HLT",
        "INVLPG", "INVLPGA", "MSR", "TASK_SWITCH", "FERR_FREEZE", "SHUTDOWN", "VMRUN", "VMLOAD",
        "VMSAVE", "STGI", "CLGI", "SKINIT", "RDTSCP", "ICEBP", "WBINVD", "MONITOR", "MWAIT",
        "XSETBV", "INVPCID", "NPF", "AVIC_INCOMPLETE_IPI", "AVIC_UNACCELERATED_ACCESS", "VMGEXIT")},
    EXIT["IOIO"]: "io", EXIT["VMMCALL"]: "hypercall",
    EXIT["EFER_WRITE_TRAP"]: "write_efer_trap",
    **{EXIT[f"CR{n}_WRITE_TRAP"]: f"write_cr{n}_trap" for n in (0, 4, 8)},
    EXIT["BUS_LOCK"]: "buslock", EXIT["IDLE_HLT"]: "idle-halt",
    EXIT["ERR"]: "invalid_guest_state",
}

# tlb_ctl (APM 15.16.1)
TLB_CONTROL_DO_NOTHING = 0
TLB_CONTROL_FLUSH_ALL_ASID = 1
TLB_CONTROL_FLUSH_ASID = 3
TLB_CONTROL_FLUSH_ASID_LOCAL = 7
TLB_CONTROL_MASK = 7

# int_ctl (APM 15.21.1 and table B-1; asm/svm.h)
V_TPR_MASK = 0x0F
V_IRQ_SHIFT = 8
V_IRQ_MASK = 1 << 8
V_GIF_MASK = 1 << 9
V_NMI_PENDING_MASK = 1 << 11
V_NMI_BLOCKING_MASK = 1 << 12
V_INTR_PRIO_SHIFT = 16
V_INTR_PRIO_MASK = 0xF << 16
V_IGN_TPR_MASK = 1 << 20
V_IRQ_INJECTION_BITS_MASK = V_IRQ_MASK | V_INTR_PRIO_MASK | V_IGN_TPR_MASK
V_INTR_MASKING_MASK = 1 << 24
V_GIF_ENABLE_MASK = 1 << 25
V_NMI_ENABLE_MASK = 1 << 26
X2APIC_MODE_MASK = 1 << 30
AVIC_ENABLE_MASK = 1 << 31

SVM_INT_VECTOR_MASK = 0xFF                # int_vector: bits 7:0
SVM_INTERRUPT_SHADOW_MASK = 1 << 0        # int_state
SVM_GUEST_INTERRUPT_MASK = 1 << 1

# EVENTINJ and EXITINTINFO (APM 15.20 figure 15-4; asm/svm.h SVM_EVTINJ_*)
EVTINJ_VEC_MASK = 0xFF
EVTINJ_TYPE_SHIFT = 8
EVTINJ_TYPE_MASK = 7 << 8
EVTINJ_TYPE_INTR = 0 << 8
EVTINJ_TYPE_NMI = 2 << 8
EVTINJ_TYPE_EXEPT = 3 << 8
EVTINJ_TYPE_SOFT = 4 << 8
EVTINJ_VALID_ERR = 1 << 11
EVTINJ_VALID = 1 << 31
EVTINJ_RESERVED_BITS = 0xFFFFFFFF & ~(EVTINJ_VEC_MASK | EVTINJ_TYPE_MASK | EVTINJ_VALID_ERR | EVTINJ_VALID)

# nested_ctl (misc_ctl) and virt_ext (misc_ctl2) (APM table B-1)
NESTED_CTL_NP_ENABLE = 1 << 0
NESTED_CTL_SEV_ENABLE = 1 << 1
NESTED_CTL_SEV_ES_ENABLE = 1 << 2
VIRT_EXT_LBR_CTL_ENABLE = 1 << 0
VIRT_EXT_V_VMLOAD_VMSAVE_ENABLE = 1 << 1

SVM_CR0_SELECTIVE_MASK = (1 << 3) | (1 << 1)   # CR0.TS | CR0.MP: the selective CR0 write intercept ignores them

# I/O and MSR permission maps (APM 15.10.1, 15.11): 12 KiB with one bit per port; 8 KiB with
# two bits per MSR (read, then write) in three 2 KiB ranges of 0x2000 MSRs each
IOPM_SIZE = 0x3000
MSRPM_SIZE = 0x2000
MSRPM_RANGES: tuple[tuple[int, int], ...] = ((0x00000000, 0), (0xC0000000, 2048), (0xC0010000, 4096))
MSRPM_MSRS_PER_RANGE = 0x2000
MSRPM_BITS_PER_MSR = 2


def msrpm_bit_nr(msr: int) -> int | None:
    """KVM svm_msrpm_bit_nr: the MSRPM bit that intercepts reads of `msr` (writes: the next
    bit); None for an MSR outside the three ranges, which the MSRPM does not cover.

    >>> msrpm_bit_nr(0xC0000080) == 2048 * 8 + 0x80 * 2
    True
    """
    for first, byte in MSRPM_RANGES:
        if first <= msr < first + MSRPM_MSRS_PER_RANGE:
            return byte * 8 + (msr - first) * MSRPM_BITS_PER_MSR
    return None


# SVM_EXIT_IOIO exit_info_1 (APM 15.10.2 figure 15-2; asm/svm.h SVM_IOIO_*)
IOIO_TYPE_IN = 1 << 0
IOIO_STR = 1 << 2
IOIO_REP = 1 << 3
IOIO_SIZE_SHIFT = 4
IOIO_SZ8 = 1 << 4
IOIO_SZ16 = 1 << 5
IOIO_SZ32 = 1 << 6
IOIO_SIZE_MASK = 7 << 4
IOIO_ASIZE_SHIFT = 7
IOIO_A16 = 1 << 7
IOIO_A32 = 1 << 8
IOIO_A64 = 1 << 9
IOIO_ASIZE_MASK = 7 << 7
IOIO_SEG_SHIFT = 10                       # bits 12:10, the segment of OUTS (ES=0 ... GS=5)
IOIO_SEG_MASK = 7 << 10
IOIO_PORT_SHIFT = 16
IOIO_SIZE = {1: IOIO_SZ8, 2: IOIO_SZ16, 4: IOIO_SZ32}    # operand size in bytes -> bit
IOIO_ASIZE = {2: IOIO_A16, 4: IOIO_A32, 8: IOIO_A64}     # address size in bytes -> bit

# CPUID Fn8000_000A EDX: SVM features (APM vol. 3 appendix E.4.9; cpufeatures.h word 15)
SVM_CPUID_FUNC = 0x8000000A
SVM_FEATURE_NPT = 0
SVM_FEATURE_LBRV = 1
SVM_FEATURE_SVML = 2
SVM_FEATURE_NRIPS = 3
SVM_FEATURE_TSC_RATE = 4
SVM_FEATURE_VMCB_CLEAN = 5
SVM_FEATURE_FLUSH_ASID = 6
SVM_FEATURE_DECODE_ASSISTS = 7
SVM_FEATURE_PAUSE_FILTER = 10
SVM_FEATURE_PFTHRESHOLD = 12
SVM_FEATURE_AVIC = 13
SVM_FEATURE_V_VMSAVE_VMLOAD = 15
SVM_FEATURE_VGIF = 16
SVM_FEATURE_X2AVIC = 18
SVM_FEATURE_V_SPEC_CTRL = 20
SVM_FEATURE_VNMI = 25
SVM_FEATURE_SVME_ADDR_CHK = 28

# SVM MSRs (APM 15.30; msr-index.h)
MSR_VM_CR = 0xC0010114
MSR_VM_HSAVE_PA = 0xC0010117
VM_CR_DPD = 1 << 0
VM_CR_R_INIT = 1 << 1
VM_CR_DIS_A20M = 1 << 2
VM_CR_LOCK = 1 << 3
VM_CR_SVMDIS = 1 << 4
VM_CR_VALID_MASK = 0x1F
