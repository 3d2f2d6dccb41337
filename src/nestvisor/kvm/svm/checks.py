"""VMRUN consistency checks on the cached vmcb12 (KVM nested_vmcb_check_controls and
nested_vmcb_check_save in arch/x86/kvm/svm/nested.c; APM 15.5.1 "Canonicalization and
Consistency Checks").

One `cc` line per rule, in KVM's order; the first failure comes back as a `CheckFailure`. On
VMRUN a failure is #VMEXIT(SVM_EXIT_ERR), on KVM_SET_NESTED_STATE it is -EINVAL. KVM checks
the save area first (nested_svm_check_cached_vmcb12).
"""

from __future__ import annotations

from collections.abc import Callable

from ...arch import svm as S
from ...arch.x86 import CR0_CD, CR0_NW, CR0_PE, CR0_PG, CR4_PAE, EFER_LME, EFER_SVME
from ..nested_checks import CheckFailure, cc, run
from .vmcb import VmcbCtrlCached, VmcbSaveCached

# KVM nested_svm_event_inj_valid_exept: the vectors of defined exceptions (#DE #DB #BP #OF #BR
# #UD #NM #DF #TS #NP #SS #GP #PF #MF #AC #MC #XM #HV #SX). #CP (21) is valid only with SHSTK
# and #VC (29) only with SEV-ES, which the vCPU does not offer; NMI (2) and reserved vectors
# are never valid.
_EVTINJ_EXCEPTIONS = frozenset((0, 1, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14, 16, 17, 18, 19, 28, 30))
_EVTINJ_TYPES = frozenset((S.EVTINJ_TYPE_INTR, S.EVTINJ_TYPE_NMI, S.EVTINJ_TYPE_EXEPT, S.EVTINJ_TYPE_SOFT))


def _legal_gpa(gpa: int, maxphyaddr: int) -> bool:
    """KVM kvm_vcpu_is_legal_gpa: no bit at or above MAXPHYADDR."""
    return not gpa >> maxphyaddr


def _bitmap_pa_valid(pa: int, size: int, maxphyaddr: int) -> bool:
    """KVM nested_svm_check_bitmap_pa: bits 11:0 are ignored; the whole map is a legal GPA."""
    addr = (pa + 0xFFF) & ~0xFFF
    return _legal_gpa(addr, maxphyaddr) and _legal_gpa(addr + size - 1, maxphyaddr)


def _controls(c: VmcbCtrlCached, maxphyaddr: int, npt_enabled: bool) -> None:
    src = "nested_vmcb_check_controls"
    np = bool(c.nested_ctl & S.NESTED_CTL_NP_ENABLE)
    cc(not c.intercept(S.INTERCEPT["VMRUN"]), "the VMRUN intercept is set", src, intercept_word4=c.intercepts[4])
    cc(c.asid == 0, "ASID is not 0", src)
    cc(np and not npt_enabled, "nested paging needs NPT in L0", src, nested_ctl=c.nested_ctl)
    cc(np and not _legal_gpa(c.nested_cr3, maxphyaddr), "nested_cr3 is a legal GPA under nested paging",
       src, nested_cr3=c.nested_cr3)
    cc(not _bitmap_pa_valid(c.msrpm_base_pa, S.MSRPM_SIZE, maxphyaddr), "the MSRPM lies below MAXPHYADDR",
       "nested_svm_check_bitmap_pa", msrpm_base_pa=c.msrpm_base_pa)
    cc(not _bitmap_pa_valid(c.iopm_base_pa, S.IOPM_SIZE, maxphyaddr), "the IOPM lies below MAXPHYADDR",
       "nested_svm_check_bitmap_pa", iopm_base_pa=c.iopm_base_pa)
    cc(bool(c.int_ctl & S.V_NMI_ENABLE_MASK) and not c.intercept(S.INTERCEPT["NMI"]),
       "V_NMI_ENABLE needs the NMI intercept", src, int_ctl=c.int_ctl)
    inj, kind = c.event_inj, c.event_inj & S.EVTINJ_TYPE_MASK
    valid = bool(inj & S.EVTINJ_VALID)
    cc(valid and kind not in _EVTINJ_TYPES, "EVENTINJ type is INTR, NMI, exception or software interrupt",
       "nested_svm_check_event_inj", event_inj=inj)
    cc(valid and kind == S.EVTINJ_TYPE_EXEPT and (inj & S.EVTINJ_VEC_MASK) not in _EVTINJ_EXCEPTIONS,
       "EVENTINJ exception vector is a defined exception", "nested_svm_check_event_inj", event_inj=inj)


def _save(s: VmcbSaveCached, maxphyaddr: int, cr4_valid: Callable[[int], bool],
          efer_valid: Callable[[int], bool]) -> None:
    src = "nested_vmcb_check_save"
    cc(not s.efer & EFER_SVME, "EFER.SVME is set", src, efer=s.efer)
    cc(not s.cr0 & CR0_CD and bool(s.cr0 & CR0_NW), "CR0.NW is 0 when CR0.CD is 0", src, cr0=s.cr0)
    cc(bool(s.cr0 >> 32), "CR0 bits 63:32 are 0", src, cr0=s.cr0)
    cc(bool(s.dr6 >> 32), "DR6 bits 63:32 are 0", "kvm_dr6_valid", dr6=s.dr6)
    cc(bool(s.dr7 >> 32), "DR7 bits 63:32 are 0", "kvm_dr7_valid", dr7=s.dr7)
    if s.efer & EFER_LME and s.cr0 & CR0_PG:
        cc(not s.cr4 & CR4_PAE, "long-mode paging needs CR4.PAE", src, cr4=s.cr4)
        cc(not s.cr0 & CR0_PE, "long-mode paging needs CR0.PE", src, cr0=s.cr0)
        cc(not _legal_gpa(s.cr3, maxphyaddr), "CR3 is a legal GPA under long-mode paging", "kvm_vcpu_is_legal_cr3",
           cr3=s.cr3)
        cc(bool(s.cs.attrib & S.SVM_SELECTOR_L_MASK) and bool(s.cs.attrib & S.SVM_SELECTOR_DB_MASK),
           "CS.L and CS.D are not both set under long-mode paging", src, cs_attrib=s.cs.attrib)
    cc(not cr4_valid(s.cr4), "CR4 is valid for the vCPU", "__kvm_is_valid_cr4", cr4=s.cr4)
    cc(not efer_valid(s.efer), "EFER is valid for the vCPU", "kvm_valid_efer", efer=s.efer)


def check_cr3(s: VmcbSaveCached, maxphyaddr: int, npt: bool,
              read_u64: Callable[[int], int | None]) -> CheckFailure | None:
    """KVM nested_svm_load_cr3, which fails VMRUN with SVM_EXIT_ERR too: a legal CR3 in every
    paging mode, and without NPT, PAE paging's PDPTEs free of reserved bits (SDM 4.4.1)."""
    return run(_cr3, s, maxphyaddr, npt, read_u64)


def _cr3(s: VmcbSaveCached, maxphyaddr: int, npt: bool, read_u64: Callable[[int], int | None]) -> None:
    src = "nested_svm_load_cr3"
    cc(not _legal_gpa(s.cr3, maxphyaddr), "CR3 is a legal GPA", src, cr3=s.cr3)
    if npt or not s.cr0 & CR0_PG or not s.cr4 & CR4_PAE or s.efer & EFER_LME:
        return
    reserved = (((1 << 64) - 1) >> maxphyaddr << maxphyaddr) | 0x1E6   # 63:MAXPHYADDR, 8:5, 2:1
    for i in range(4):
        pdpte = read_u64((s.cr3 & 0xFFFFFFE0) + 8 * i)
        cc(pdpte is None or bool(pdpte & 1 and pdpte & reserved), "PAE PDPTEs have no reserved bits set",
           "load_pdptrs", index=i, pdpte=pdpte or 0)


def check_controls(c: VmcbCtrlCached, maxphyaddr: int, npt_enabled: bool) -> CheckFailure | None:
    """KVM nested_vmcb_check_controls on the cached control area; `npt_enabled` is L0's NPT
    (mainline's rule; the newest KVM clears NP_ENABLE in the cache instead when the guest lacks
    NPT, see copy_control_to_cache)."""
    return run(_controls, c, maxphyaddr, npt_enabled)


def check_save(s: VmcbSaveCached, maxphyaddr: int, cr4_valid: Callable[[int], bool],
               efer_valid: Callable[[int], bool]) -> CheckFailure | None:
    """KVM nested_vmcb_check_save on the cached save area; `cr4_valid` and `efer_valid` are the
    vCPU's kvm_is_valid_cr4 and kvm_valid_efer. The g_pat rule of the newest KVM applies only
    when L2 has its own PAT (KVM_X86_QUIRK_NESTED_SVM_SHARED_PAT disabled) and is not here."""
    return run(_save, s, maxphyaddr, cr4_valid, efer_valid)
