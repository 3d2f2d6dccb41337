"""MSR emulation for RDMSR/WRMSR and KVM_GET/SET_MSRS, following KVM's kvm_{get,set}_msr_common.

Each MSR is a row of `MsrTable`: who holds the value (the substrate CPU, the vCPU, the local
APIC) and the rule its writes must satisfy. An MSR with no row, or whose feature the CPUID
does not advertise, raises #GP as KVM does with ignore_msrs=0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..arch import msr as M
from ..arch import svm as S
from ..arch import vmx as V
from ..cpu.faults import GuestFault, gp

if TYPE_CHECKING:
    from .vcpu import Vcpu

# IA32_PAT memory types allowed in each byte (SDM 11.12.2): UC WC WT WP WB UC-
_PAT_TYPES = frozenset((0, 1, 4, 5, 6, 7))
# MTRR memory types (SDM 11.11.2.1)
_MTRR_TYPES = frozenset((0, 1, 4, 5, 6))
PAT_RESET = 0x0007040600070406
EFER_SCE, EFER_LME, EFER_LMA, EFER_NXE, EFER_SVME = 1 << 0, 1 << 8, 1 << 10, 1 << 11, 1 << 12
FEATURE_CONTROL_LOCKED = 1 << 0
MTRR_VAR_COUNT = 8
MTRRCAP = 0x500 | MTRR_VAR_COUNT  # KVM: fixed-range + WC supported, 8 variable ranges


def canonical(value: int, bits: int = 48) -> bool:
    """SDM 3.3.7.1: bits 63..bits-1 are all equal."""
    top = value >> (bits - 1)
    return top == 0 or top == (1 << (65 - bits)) - 1


@dataclass(frozen=True)
class MsrRow:
    name: str
    read: Callable[[Vcpu], int]
    write: Callable[[Vcpu, int, bool], None] | None   # (vcpu, value, host_initiated); None = read-only
    feature: str | None = None                        # CPUID feature the MSR needs


def _cpu_msr(index: int, check: Callable[[int], bool] | None = None, name: str = "", feature: str | None = None) -> MsrRow:
    """An MSR the substrate CPU uses natively: its value lives in unicorn's CPU state."""

    def rd(v: Vcpu) -> int:
        return v.ctx.cpu_msr(index)

    def wr(v: Vcpu, value: int, host: bool) -> None:
        if check is not None and not check(value):
            raise gp()
        v.ctx.set_cpu_msr(index, value)

    return MsrRow(name or hex(index), rd, wr, feature)


def _stored(name: str, default: int = 0, check: Callable[[int], bool] | None = None, feature: str | None = None) -> MsrRow:
    """An MSR that only holds a value in the vCPU."""

    def rd(v: Vcpu) -> int:
        return v.msr_values.get(name, default)

    def wr(v: Vcpu, value: int, host: bool) -> None:
        if check is not None and not check(value):
            raise gp()
        v.msr_values[name] = value

    return MsrRow(name, rd, wr, feature)


def _pat_ok(value: int) -> bool:
    # KVM kvm_pat_valid: every byte a valid memory type
    return all((value >> (8 * i)) & 0xFF in _PAT_TYPES for i in range(8))


def efer_valid(v: Vcpu, value: int) -> bool:
    """KVM kvm_valid_efer: only the bits of features the guest has."""
    allowed = EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE | (EFER_SVME if v.profile.has("svm") else 0)
    if value & ~allowed:
        return False
    if not v.profile.has("lm") and value & (EFER_LME | EFER_LMA):
        return False
    return v.profile.has("nx") or not value & EFER_NXE


def _efer_read(v: Vcpu) -> int:
    # EFER.SVME lives beside the substrate's EFER (nested SVM)
    nested = v.nested
    return v.ctx.cpu_msr(M.EFER) | (EFER_SVME if nested is not None and nested.svme else 0)


def _efer_write(v: Vcpu, value: int, host: bool) -> None:
    # KVM set_efer / kvm_valid_efer
    if not efer_valid(v, value):
        raise gp()
    nested = v.nested
    if v.profile.has("svm") and nested is not None:
        nested.set_svme(bool(value & EFER_SVME))   # KVM svm_set_efer
        value &= ~EFER_SVME
    old = v.ctx.cpu_msr(M.EFER)
    cr0 = v.ctx.reg_cr(0)
    if not host and cr0 & (1 << 31) and (old ^ value) & EFER_LME:
        # KVM set_efer: LME cannot change while paging is enabled
        raise gp()
    if host:
        v.set_efer_host(value)
        return
    v.ctx.set_cpu_msr(M.EFER, (value & ~EFER_LMA) | (old & EFER_LMA))
    if (old ^ value) & EFER_NXE:
        v.ctx.flush_tlb()


def _vm_cr_write(v: Vcpu, value: int, host: bool) -> None:
    # KVM svm_set_vm_cr: bits 4:0 only; LOCK and SVMDIS stay once SVMDIS is set, and SVMDIS
    # cannot be set while EFER.SVME is
    nested = v.nested
    if value & ~S.VM_CR_VALID_MASK:
        raise gp()
    change = S.VM_CR_VALID_MASK
    if nested.vm_cr & S.VM_CR_SVMDIS:
        change &= ~(S.VM_CR_LOCK | S.VM_CR_SVMDIS)
    new = (nested.vm_cr & ~change) | (value & change)
    if new & S.VM_CR_SVMDIS and nested.svme:
        raise gp()
    nested.vm_cr = new


def _hsave_pa_write(v: Vcpu, value: int, host: bool) -> None:
    # KVM svm_set_msr(MSR_VM_HSAVE_PA): page aligned and a legal address (APM 15.30.4)
    if value & 0xFFF or value >> v.profile.maxphyaddr:
        raise gp()
    v.nested.hsave_pa = value


def _tsc_write(v: Vcpu, value: int, host: bool) -> None:
    # SDM 17.17.3: a write to IA32_TSC adds the same delta to IA32_TSC_ADJUST
    delta = value - v.tsc()
    v.tsc_offset += delta
    if not host:
        v.msr_values["TSC_ADJUST"] = (v.msr_values.get("TSC_ADJUST", 0) + delta) & 0xFFFFFFFFFFFFFFFF


def _tsc_adjust_write(v: Vcpu, value: int, host: bool) -> None:
    # SDM 17.17.3: a write to IA32_TSC_ADJUST moves the TSC by the same delta
    old = v.msr_values.get("TSC_ADJUST", 0)
    if not host:
        v.tsc_offset += value - old
    v.msr_values["TSC_ADJUST"] = value


def _feature_control_write(v: Vcpu, value: int, host: bool) -> None:
    # KVM vmx_set_msr: #GP once locked, and on bits the CPU does not support
    cur = v.msr_values.get("FEATURE_CONTROL", 0)
    valid = FEATURE_CONTROL_LOCKED | ((1 << 1) | (1 << 2) if v.profile.has("vmx") else 0)
    if value & ~valid or (cur & FEATURE_CONTROL_LOCKED and not host):
        raise gp()
    v.msr_values["FEATURE_CONTROL"] = value


def _debugctl_write(v: Vcpu, value: int, host: bool) -> None:
    # KVM vmx_set_msr: without LBR virtualization BTF and LBR are dropped silently (the
    # register reads 0); any other bit is #GP
    if value & ~0x3:
        raise gp()


def _mtrr_def_type_ok(value: int) -> bool:
    # SDM 11.11.2.1: type in bits 7:0, FE bit 10, E bit 11; the rest reserved
    return not value & ~0xCFF and (value & 0xFF) in _MTRR_TYPES


def _mtrr_fixed_ok(value: int) -> bool:
    return all((value >> (8 * i)) & 0xFF in _MTRR_TYPES for i in range(8))


def _apic_base_write(v: Vcpu, value: int, host: bool) -> None:
    v.lapic.set_apic_base(value, host_initiated=host)


def _x2apic_row(index: int) -> MsrRow:
    """An x2APIC register (the LAPIC refuses it outside x2APIC mode, KVM kvm_x2apic_msr_*)."""
    return MsrRow(f"X2APIC_{index:#x}", lambda v: v.lapic.msr_read(index),
                  lambda v, x, h: v.lapic.msr_write(index, x))


def _vmx_cap_read(index: int) -> Callable[[Vcpu], int]:
    def rd(v: Vcpu) -> int:
        if v.nested is None:
            raise gp()   # KVM vmx_get_msr: the VMX MSRs exist only with nested VMX in CPUID
        return v.nested.caps.msrs()[index]
    return rd


def _tsc_aux_ok(value: int) -> bool:
    return value >> 32 == 0   # KVM: bits 63:32 are reserved


def _build_table() -> dict[int, MsrRow]:
    t: dict[int, MsrRow] = {
        M.IA32_TSC: MsrRow("TSC", lambda v: v.tsc(), _tsc_write),
        M.IA32_TSC_ADJUST: MsrRow("TSC_ADJUST", lambda v: v.msr_values.get("TSC_ADJUST", 0), _tsc_adjust_write, "tsc-adjust"),
        M.IA32_APIC_BASE: MsrRow("APIC_BASE", lambda v: v.lapic.get_apic_base(), _apic_base_write),
        M.IA32_FEATURE_CONTROL: MsrRow("FEATURE_CONTROL", lambda v: v.msr_values.get("FEATURE_CONTROL", 0), _feature_control_write, "vmx"),
        M.IA32_PLATFORM_ID: MsrRow("PLATFORM_ID", lambda v: 0, None),
        M.IA32_BIOS_SIGN_ID: _stored("BIOS_SIGN_ID"),
        M.IA32_MTRRCAP: MsrRow("MTRRCAP", lambda v: MTRRCAP, None, "mtrr"),
        M.IA32_MTRR_DEF_TYPE: _stored("MTRR_DEF_TYPE", 0, _mtrr_def_type_ok, "mtrr"),
        M.IA32_SYSENTER_CS: _cpu_msr(M.IA32_SYSENTER_CS, None, "SYSENTER_CS"),
        M.IA32_SYSENTER_ESP: _cpu_msr(M.IA32_SYSENTER_ESP, canonical, "SYSENTER_ESP"),
        M.IA32_SYSENTER_EIP: _cpu_msr(M.IA32_SYSENTER_EIP, canonical, "SYSENTER_EIP"),
        M.IA32_MCG_CAP: MsrRow("MCG_CAP", lambda v: 0, None),
        M.IA32_MCG_STATUS: _stored("MCG_STATUS"),
        # KVM's reset value: PEBS and BTS unavailable
        M.IA32_MISC_ENABLE: _stored("MISC_ENABLE", (1 << 11) | (1 << 12)),
        M.IA32_DEBUGCTL: MsrRow("DEBUGCTL", lambda v: 0, _debugctl_write),
        M.IA32_PAT: _cpu_msr(M.IA32_PAT, _pat_ok, "PAT", "pat"),
        M.EFER: MsrRow("EFER", _efer_read, _efer_write),
        S.MSR_VM_CR: MsrRow("VM_CR", lambda v: v.nested.vm_cr, _vm_cr_write, "svm"),
        S.MSR_VM_HSAVE_PA: MsrRow("VM_HSAVE_PA", lambda v: v.nested.hsave_pa, _hsave_pa_write, "svm"),
        M.STAR: _cpu_msr(M.STAR, None, "STAR", "syscall"),
        M.LSTAR: _cpu_msr(M.LSTAR, canonical, "LSTAR", "lm"),
        M.CSTAR: _cpu_msr(M.CSTAR, canonical, "CSTAR", "lm"),
        M.SFMASK: _cpu_msr(M.SFMASK, lambda x: x >> 32 == 0, "SFMASK", "lm"),
        M.FS_BASE: _cpu_msr(M.FS_BASE, canonical, "FS_BASE", "lm"),
        M.GS_BASE: _cpu_msr(M.GS_BASE, canonical, "GS_BASE", "lm"),
        M.KERNEL_GS_BASE: _cpu_msr(M.KERNEL_GS_BASE, canonical, "KERNEL_GS_BASE", "lm"),
        M.IA32_TSC_AUX: _stored("TSC_AUX", 0, _tsc_aux_ok, "rdtscp"),
        M.IA32_TSC_DEADLINE: MsrRow("TSC_DEADLINE", lambda v: v.lapic.tsc_deadline, lambda v, x, h: v.lapic.set_tsc_deadline(x), "tsc-deadline"),
    }
    # KVM kvm_get_msr_common / kvm_set_msr_common without a vPMU: the legacy AMD counters
    # and event selects read 0 and ignore writes
    for index in range(M.MSR_K7_EVNTSEL0, M.MSR_K7_PERFCTR3 + 1):
        t[index] = MsrRow(f"K7_PERF_{index:#x}", lambda v: 0, lambda v, x, h: None)
    for index in range(V.IA32_VMX_BASIC, V.IA32_VMX_VMFUNC + 1):
        t[index] = MsrRow(f"VMX_{index:#x}", _vmx_cap_read(index), None, "vmx")
    for i in range(MTRR_VAR_COUNT):
        # SDM 11.11.2.3: PHYSBASE type in 7:0 and address; PHYSMASK valid bit 11 and address
        t[M.IA32_MTRR_PHYSBASE0 + 2 * i] = _stored(f"MTRR_PHYSBASE{i}", 0, lambda x: (x & 0xFF) in _MTRR_TYPES and not x & 0xF00, "mtrr")
        t[M.IA32_MTRR_PHYSBASE0 + 2 * i + 1] = _stored(f"MTRR_PHYSMASK{i}", 0, lambda x: not x & 0x7FF, "mtrr")
    for idx in (M.IA32_MTRR_FIX64K_00000, M.IA32_MTRR_FIX16K_80000, M.IA32_MTRR_FIX16K_A0000,
                *range(M.IA32_MTRR_FIX4K_C0000, M.IA32_MTRR_FIX4K_F8000 + 1)):
        t[idx] = _stored(f"MTRR_FIX_{idx:#x}", 0, _mtrr_fixed_ok, "mtrr")
    return t


MSR_TABLE: dict[int, MsrRow] = _build_table()
# not in KVM_GET_MSR_INDEX_LIST (KVM saves the LAPIC with KVM_GET_LAPIC)
X2APIC_TABLE: dict[int, MsrRow] = {i: _x2apic_row(i) for i in range(M.X2APIC_FIRST, M.X2APIC_LAST + 1)}


def _row(v: Vcpu, index: int) -> MsrRow:
    row = X2APIC_TABLE.get(index)
    if row is not None:
        return row
    row = MSR_TABLE.get(index)
    if row is None or (row.feature is not None and not v.profile.has(row.feature)):
        raise gp()
    return row


def get_msr(v: Vcpu, index: int) -> int:
    """RDMSR semantics: the value, or GuestFault(#GP) as KVM injects it."""
    return _row(v, index).read(v) & 0xFFFFFFFFFFFFFFFF


def set_msr(v: Vcpu, index: int, value: int, host_initiated: bool = False) -> None:
    """WRMSR semantics: GuestFault(#GP) on a read-only MSR or a value the rule refuses."""
    row = _row(v, index)
    if row.write is None:
        raise gp()
    row.write(v, value & 0xFFFFFFFFFFFFFFFF, host_initiated)


def msr_list() -> list[int]:
    """KVM_GET_MSR_INDEX_LIST."""
    return sorted(MSR_TABLE)


__all__ = ["GuestFault", "MSR_TABLE", "get_msr", "set_msr", "msr_list", "canonical"]
