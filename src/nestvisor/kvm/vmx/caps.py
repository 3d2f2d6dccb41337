"""The VMX capability MSRs L1 reads (KVM nested_vmx_setup_ctls_msrs), advertising exactly the
controls nestvisor implements (DESIGN decision 7)."""

from __future__ import annotations

from dataclasses import dataclass

from ...arch import vmcs as V
from ...arch import vmx as X

# Controls whose exits, loads and saves nestvisor implements, beyond the default1 bits.
PIN_SUPPORTED = X.PIN_EXT_INTR_MASK | X.PIN_NMI_EXITING | X.PIN_VIRTUAL_NMIS | X.PIN_PREEMPTION_TIMER
CPU_SUPPORTED = (X.CPU_INTR_WINDOW | X.CPU_NMI_WINDOW | X.CPU_USE_TSC_OFFSETTING | X.CPU_HLT_EXITING | X.CPU_INVLPG_EXITING
                 | X.CPU_RDTSC_EXITING | X.CPU_CR3_LOAD_EXITING | X.CPU_CR3_STORE_EXITING
                 | X.CPU_CR8_LOAD_EXITING | X.CPU_CR8_STORE_EXITING | X.CPU_MOV_DR_EXITING
                 | X.CPU_UNCOND_IO_EXITING | X.CPU_USE_IO_BITMAPS | X.CPU_USE_MSR_BITMAPS
                 | X.CPU_PAUSE_EXITING | X.CPU_ACTIVATE_SECONDARY)
SEC_SUPPORTED = (X.SEC_EPT | X.SEC_RDTSCP | X.SEC_VPID | X.SEC_WBINVD_EXITING | X.SEC_UNRESTRICTED_GUEST
                 | X.SEC_SHADOW_VMCS)
# The EPT walk nestvisor implements (4 levels, UC/WB roots, 2M/1G pages, execute-only, A/D
# flags) and every INVEPT/INVVPID type (KVM nested_vmx_setup_ctls_msrs: ept_caps, vpid_caps)
EPT_VPID_SUPPORTED = (X.EPT_CAP_EXECUTE_ONLY | X.EPT_CAP_WALK_LENGTH_4 | X.EPT_CAP_MEMTYPE_UC
                      | X.EPT_CAP_MEMTYPE_WB | X.EPT_CAP_2M_PAGES | X.EPT_CAP_1G_PAGES | X.EPT_CAP_INVEPT
                      | X.EPT_CAP_AD | X.EPT_CAP_INVEPT_SINGLE_CONTEXT | X.EPT_CAP_INVEPT_ALL_CONTEXT
                      | X.VPID_CAP_INVVPID | X.VPID_CAP_INVVPID_INDIVIDUAL_ADDR | X.VPID_CAP_INVVPID_SINGLE_CONTEXT
                      | X.VPID_CAP_INVVPID_ALL_CONTEXT | X.VPID_CAP_INVVPID_SINGLE_CONTEXT_RETAINING_GLOBALS)
EXIT_SUPPORTED = (X.EXIT_HOST_ADDR_SPACE_SIZE | X.EXIT_ACK_INTR_ON_EXIT | X.EXIT_SAVE_IA32_PAT
                  | X.EXIT_LOAD_IA32_PAT | X.EXIT_SAVE_IA32_EFER | X.EXIT_LOAD_IA32_EFER
                  | X.EXIT_SAVE_PREEMPTION_TIMER)
# The preemption timer counts down once every 2^rate TSC ticks (SDM 26.5.1; KVM's emulated
# rate, VMX_MISC_EMULATED_PREEMPTION_TIMER_RATE).
PREEMPTION_TIMER_RATE = 5
ENTRY_SUPPORTED = X.ENTRY_IA32E_MODE | X.ENTRY_LOAD_IA32_PAT | X.ENTRY_LOAD_IA32_EFER

CR0_FIXED0 = 0x80000021   # PE, NE, PG (SDM A.7; KVM VMXON_CR0_ALWAYSON)
CR4_FIXED0 = 0x2000       # VMXE (SDM A.8; KVM VMXON_CR4_ALWAYSON)


@dataclass(frozen=True)
class Ctls:
    """A control MSR: bits that must be 1 (low) and bits that may be 1 (high), SDM A.3."""

    low: int
    high: int

    def value(self) -> int:
        return self.low | (self.high << 32)

    def allows(self, ctl: int) -> bool:
        """KVM fixed_bits_valid / vmx_control_verify."""
        return (ctl & self.high) | self.low == ctl


@dataclass(frozen=True)
class VmxCaps:
    pin: Ctls
    true_pin: Ctls
    proc: Ctls
    true_proc: Ctls
    proc2: Ctls
    exit: Ctls
    true_exit: Ctls
    entry: Ctls
    true_entry: Ctls
    misc: int
    cr0_fixed0: int
    cr0_fixed1: int
    cr4_fixed0: int
    cr4_fixed1: int
    vmcs_enum: int
    ept_vpid: int
    vmfunc: int

    @property
    def basic(self) -> int:
        """SDM A.1: revision, region size, WB memory type, TRUE controls."""
        return V.VMCS12_REVISION | (V.VMCS12_SIZE << 32) | X.BASIC_MEM_TYPE_WB | X.BASIC_TRUE_CTLS

    def msrs(self) -> dict[int, int]:
        return {
            X.IA32_VMX_BASIC: self.basic,
            X.IA32_VMX_PINBASED_CTLS: self.pin.value(),
            X.IA32_VMX_PROCBASED_CTLS: self.proc.value(),
            X.IA32_VMX_EXIT_CTLS: self.exit.value(),
            X.IA32_VMX_ENTRY_CTLS: self.entry.value(),
            X.IA32_VMX_MISC: self.misc,
            X.IA32_VMX_CR0_FIXED0: self.cr0_fixed0,
            X.IA32_VMX_CR0_FIXED1: self.cr0_fixed1,
            X.IA32_VMX_CR4_FIXED0: self.cr4_fixed0,
            X.IA32_VMX_CR4_FIXED1: self.cr4_fixed1,
            X.IA32_VMX_VMCS_ENUM: self.vmcs_enum,
            X.IA32_VMX_PROCBASED_CTLS2: self.proc2.value(),
            X.IA32_VMX_EPT_VPID_CAP: self.ept_vpid,
            X.IA32_VMX_TRUE_PINBASED_CTLS: self.true_pin.value(),
            X.IA32_VMX_TRUE_PROCBASED_CTLS: self.true_proc.value(),
            X.IA32_VMX_TRUE_EXIT_CTLS: self.true_exit.value(),
            X.IA32_VMX_TRUE_ENTRY_CTLS: self.true_entry.value(),
            X.IA32_VMX_VMFUNC: self.vmfunc,
        }


def nested_vmx_caps(cr4_fixed1: int) -> VmxCaps:
    """The capability MSRs for a vCPU whose legal CR4 bits are `cr4_fixed1`."""
    # The TRUE MSRs let default1 bits be 0 (SDM A.2); KVM clears the same ones.
    true_proc_low = X.CPU_DEFAULT1 & ~(X.CPU_CR3_LOAD_EXITING | X.CPU_CR3_STORE_EXITING)
    return VmxCaps(
        pin=Ctls(X.PIN_DEFAULT1, X.PIN_DEFAULT1 | PIN_SUPPORTED),
        true_pin=Ctls(X.PIN_DEFAULT1, X.PIN_DEFAULT1 | PIN_SUPPORTED),
        proc=Ctls(X.CPU_DEFAULT1, X.CPU_DEFAULT1 | CPU_SUPPORTED),
        true_proc=Ctls(true_proc_low, X.CPU_DEFAULT1 | CPU_SUPPORTED),
        proc2=Ctls(0, SEC_SUPPORTED),
        exit=Ctls(X.EXIT_DEFAULT1, X.EXIT_DEFAULT1 | EXIT_SUPPORTED),
        true_exit=Ctls(X.EXIT_DEFAULT1 & ~X.EXIT_SAVE_DEBUG_CONTROLS, X.EXIT_DEFAULT1 | EXIT_SUPPORTED),
        entry=Ctls(X.ENTRY_DEFAULT1, X.ENTRY_DEFAULT1 | ENTRY_SUPPORTED),
        true_entry=Ctls(X.ENTRY_DEFAULT1 & ~X.ENTRY_LOAD_DEBUG_CONTROLS, X.ENTRY_DEFAULT1 | ENTRY_SUPPORTED),
        misc=PREEMPTION_TIMER_RATE | X.MISC_SAVE_EFER_LMA | X.MISC_ACTIVITY_HLT | X.MISC_VMWRITE_SHADOW_RO_FIELDS,
        cr0_fixed0=CR0_FIXED0,
        cr0_fixed1=0xFFFFFFFF,
        cr4_fixed0=CR4_FIXED0,
        cr4_fixed1=cr4_fixed1,
        vmcs_enum=V.vmcs_enum(),
        ept_vpid=EPT_VPID_SUPPORTED,
        vmfunc=0,
    )
