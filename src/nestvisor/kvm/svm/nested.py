"""Nested SVM: the L0's side of L1's VMRUN, KVM's arch/x86/kvm/svm/nested.c.

vmcb12 lives in L1's memory. At VMRUN its control and save areas are copied into KVM's caches
(`VmcbCtrlCached`, `VmcbSaveCached`), checked, and L2 is built from the caches only, so L1
rewriting vmcb12 while L2 runs changes nothing until the next VMRUN. L1's state stays in its
own execution context (vmcb01) while L2 runs in a second one (vmcb02). At #VMEXIT the
fields the CPU writes go back to vmcb12 and the int_ctl bits are split as KVM splits them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ...arch import msr as M
from ...arch import svm as S
from ...arch.x86 import CR0_PG, EFER_LMA, RFLAGS_IF
from ...cpu.context import HF_INHIBIT_IRQ
from ...cpu.decode import Insn, Op
from ...cpu.engine import DREGS, ExecContext
from ...cpu.faults import gp, ud
from ...cpu.npt import Npt, NptFault
from ...cpu.state import ArchState, DescTable, Segment
from ...cpu.tdp import TdpFault
from ...state.nested_state import NestedState
from ..nested_checks import CheckFailure
from ..requests import REQ_GET_NESTED_STATE_PAGES
from . import state as svm_state
from .checks import check_controls, check_cr3, check_save
from .vmcb import Vmcb, VmcbCtrlCached, VmcbSaveCached, copy_control_to_cache, copy_save_to_cache

if TYPE_CHECKING:
    from ..vcpu import Vcpu

EFER_SVME = 1 << 12
# What VMLOAD/VMSAVE move (APM vol. 2 "VMLOAD"): FS, GS, TR, LDTR with their hidden state and
# these MSRs; VMRUN and #VMEXIT leave all of them alone.
_VMLOAD_MSRS = (("kernel_gs_base", M.KERNEL_GS_BASE), ("star", M.STAR), ("lstar", M.LSTAR),
                ("cstar", M.CSTAR), ("sfmask", M.SFMASK), ("sysenter_cs", M.IA32_SYSENTER_CS),
                ("sysenter_esp", M.IA32_SYSENTER_ESP), ("sysenter_eip", M.IA32_SYSENTER_EIP))
_VMLOAD_SEGS = (("fs", "fs"), ("gs", "gs"), ("tr", "tr"), ("ldtr", "ldt"))
# Registers VMRUN/#VMEXIT do not switch: they pass from one context to the other
_SHARED_CPU_MSRS = tuple(index for _, index in _VMLOAD_MSRS)

# Intercept bit of each trapped instruction in L2 (APM Table 15-7; exit code = bit number)
_INSN_INTERCEPT = {
    Op.CPUID: "CPUID", Op.HLT: "HLT", Op.INVLPG: "INVLPG", Op.RDTSC: "RDTSC", Op.RDTSCP: "RDTSCP",
    Op.PAUSE: "PAUSE", Op.WBINVD: "WBINVD", Op.INVD: "INVD", Op.XSETBV: "XSETBV",
    Op.VMRUN: "VMRUN", Op.VMMCALL: "VMMCALL", Op.VMLOAD: "VMLOAD", Op.VMSAVE: "VMSAVE",
    Op.STGI: "STGI", Op.CLGI: "CLGI", Op.SKINIT: "SKINIT", Op.INVLPGA: "INVLPGA", Op.RSM: "RSM",
}


@dataclass(slots=True)
class SvmExit:
    """A nested #VMEXIT waiting to be performed (APM 15.6)."""

    code: int
    info_1: int = 0
    info_2: int = 0
    int_info: int = 0
    int_info_err: int = 0
    next_rip: int | None = None


def segment_from_vmcb(selector: int, attrib: int, limit: int, base: int) -> Segment:
    """APM 15.5.1: the VMCB's 12-bit attribute is the descriptor's bits 8-15 and 20-23."""
    return Segment(selector, base, limit, ((attrib & 0xFF) << 8) | ((attrib >> 8) & 0xF) << 20)


def _canonical(addr: int) -> int:
    """Sign-extend bit 47 (4-level paging's canonical form, SDM 3.3.7.1)."""
    return (addr & ((1 << 48) - 1)) | (((1 << 16) - 1) << 48 if addr >> 47 & 1 else 0)


def attrib_from_segment(s: Segment) -> int:
    return ((s.flags >> 8) & 0xFF) | ((s.flags >> 20) & 0xF) << 8


class NestedSvm:
    """KVM's struct svm_nested_state for one vCPU."""

    nmi_exit_delivers = False   # APM 15.13.2: an intercepted NMI stays pending for L1 (taken at STGI)

    def __init__(self, vcpu: Vcpu) -> None:
        self.v = vcpu
        self.vmxon = False            # the VMX-only protocol members, never set here
        self.preemption_deadline: int | None = None
        self.hsave_pa = 0
        self.vm_cr = 0
        self.gif = True
        self.guest_mode = False
        self.vmcb12_pa = 0
        self.ctl: VmcbCtrlCached | None = None
        self.save: VmcbSaveCached | None = None
        self.ctx02: ExecContext | None = None
        self.pending: SvmExit | None = None
        self.l2_tsc_offset = 0
        self.eager_sync = False
        self._l1_rip = 0              # where L1 resumes after #VMEXIT (vmcb01.save.rip)
        self._l1_rax = 0
        self._l1_rflags = 0
        self._l2_svme = True          # L2's EFER.SVME as vmcb12 set it (hidden from the substrate)
        self.v_tpr = 0                # L2's CR8 under V_INTR_MASKING (int_ctl.V_TPR)
        self.stats: Counter[str] = Counter()

    @property
    def maxphyaddr(self) -> int:
        return self.v.profile.maxphyaddr

    def _trace(self, event: str, **fields: object) -> None:
        self.v.vm.trace(event, vcpu=self.v.vcpu_id, **fields)

    def _intercepted(self, name: str) -> bool:
        assert self.ctl is not None
        bit = S.INTERCEPT[name]
        return bool(self.ctl.intercepts[bit // 32] >> (bit % 32) & 1)

    # ---- EFER.SVME, VM_CR, VM_HSAVE_PA ---------------------------------------------------------

    @property
    def svme(self) -> bool:
        """EFER.SVME as the running level sees it; the substrate's EFER never has it, so
        unicorn's own SVM code cannot run."""
        return self._l2_svme if self.guest_mode else bool(self.v.efer_svme)

    def set_svme(self, on: bool) -> None:
        """KVM svm_set_efer: clearing SVME leaves nested operation and sets GIF."""
        if self.guest_mode:
            self._l2_svme = on
            return
        self.v.efer_svme = on
        if not on:
            self.gif = True

    # ---- SVM instructions --------------------------------------------------------------------

    def emulate(self, insn: Insn) -> None:
        """An SVM instruction in L1 (APM vol. 3); GuestFault for #UD/#GP."""
        op = insn.op
        if op == Op.SKINIT:
            raise ud()   # not advertised (CPUID Fn8000_0001_ECX.SKINIT = 0): KVM skinit_interception
        if op == Op.VMMCALL:
            raise ud()   # reaches the hypercall path before this (vcpu._ud_instruction)
        self._check_permissions()
        if op == Op.VMRUN:
            return self._vmrun(insn)
        if op in (Op.VMLOAD, Op.VMSAVE):
            pa = self._rax_address()
            vmcb = Vmcb(self.v.vm.phys.read(pa, S.VMCB_SIZE))
            if op == Op.VMLOAD:
                self._vmload(vmcb, self.v.ctx)
            else:
                self._vmsave(vmcb, self.v.ctx)
                self.v.vm.phys.write(pa, bytes(vmcb.data))
        elif op == Op.STGI:
            self.gif = True   # APM "STGI"; a waiting interrupt is taken next (vcpu checks gif)
        elif op == Op.CLGI:
            self.gif = False
        elif op == Op.INVLPGA:
            self.v.ctx.flush_tlb()   # APM "INVLPGA": one ASID's mapping; flushing all is allowed
        self.v.ctx.rip = self.v.ctx.rip + insn.length

    def _check_permissions(self) -> None:
        """KVM nested_svm_check_permissions: #UD without EFER.SVME or without paging,
        #GP(0) at CPL > 0."""
        ctx = self.v.ctx
        if not self.svme or not ctx.reg_cr(0) & CR0_PG:
            raise ud()   # KVM: EFER.SVME and is_paging()
        if ctx.hflags() & 3:   # CPL
            raise gp()

    def _rax_address(self) -> int:
        """The VMCB address in rAX (APM "VMRUN"): page aligned and inside MAXPHYADDR, else #GP."""
        rax = self.v.ctx.gpr(0)
        if not self.v.ctx.hflags() & (1 << 15):
            rax &= 0xFFFFFFFF
        if rax & 0xFFF or rax >> self.maxphyaddr or self.v.vm.phys.find(rax) is None:
            raise gp()
        return rax

    def _read_u64(self, pa: int) -> int | None:
        if self.v.vm.phys.find(pa) is None:
            return None
        return int.from_bytes(self.v.vm.phys.read(pa, 8), "little")

    @staticmethod
    def _vmload(vmcb: Vmcb, ctx: ExecContext) -> None:
        """APM "VMLOAD"; the segment bases and KernelGSBase are loaded canonical (sign-extended
        from bit 47), as the CPU loads them."""
        st = ctx.get_state()
        for vname, sname in _VMLOAD_SEGS:
            sel, attrib, limit, base = vmcb.seg(vname)
            setattr(st, sname, segment_from_vmcb(sel, attrib, limit, _canonical(base)))
        ctx.set_state(st)
        for name, index in _VMLOAD_MSRS:
            value = vmcb.save(name)
            ctx.set_cpu_msr(index, _canonical(value) if name == "kernel_gs_base" else value)

    @staticmethod
    def _vmsave(vmcb: Vmcb, ctx: ExecContext) -> None:
        st = ctx.get_state()
        for vname, sname in _VMLOAD_SEGS:
            s = getattr(st, sname)
            vmcb.set_seg(vname, s.selector, attrib_from_segment(s), s.limit, s.base)
        for name, index in _VMLOAD_MSRS:
            vmcb.set_save(name, ctx.cpu_msr(index))

    # ---- VMRUN -------------------------------------------------------------------------------

    def _vmrun(self, insn: Insn) -> None:
        """KVM nested_svm_vmrun: cache vmcb12, check the caches, enter L2 (APM 15.5)."""
        if not self.hsave_pa:
            raise gp()   # KVM nested_svm_vmrun: no host save area (VM_HSAVE_PA = 0) is #GP(0)
        pa = self._rax_address()
        vmcb12 = Vmcb(self.v.vm.phys.read(pa, S.VMCB_SIZE))
        has = self.v.profile.has
        ctl = copy_control_to_cache(vmcb12, has_xsave=has("xsave"), has_rdtscp=has("rdtscp"), has_invpcid=False,
                                    has_npt=True, has_skinit=False, has_rdpru=False)
        save = copy_save_to_cache(vmcb12)
        self.v.ctx.rip = self.v.ctx.rip + insn.length
        failure = check_save(save, self.maxphyaddr, self.v.cr4_valid, self.v.efer_valid) \
            or check_controls(ctl, self.maxphyaddr, npt_enabled=True) \
            or check_cr3(save, self.maxphyaddr, bool(ctl.nested_ctl & S.NESTED_CTL_NP_ENABLE), self._read_u64)
        if failure is not None:
            # KVM nested_svm_vmrun: vmcb12 gets SVM_EXIT_ERR and L1 continues after VMRUN
            self._trace("kvm_nested_vmenter_failed", check=failure.name, source=failure.source,
                        values=failure.values)
            self.stats["vmrun_failed"] += 1
            vmcb12.set_control("exit_code", S.EXIT["ERR"])
            vmcb12.set_control("exit_info_1", 0)
            vmcb12.set_control("exit_info_2", 0)
            off = S.CONTROL["exit_code"][0]   # exit_code, exit_info_1, exit_info_2
            self.v.vm.phys.write(pa + off, bytes(vmcb12.data[off:off + 24]))
            return
        self._trace("kvm_nested_vmenter", rip=save.rip, vmcb=pa, nested_rip=save.rip,
                    int_ctl=ctl.int_ctl, event_inj=ctl.event_inj, npt=bool(ctl.nested_ctl & S.NESTED_CTL_NP_ENABLE))
        self.vmcb12_pa = pa
        self.ctl, self.save = ctl, save
        self.stats["vmruns"] += 1
        self._enter_guest_mode()

    def _l2_context(self) -> ExecContext:
        if self.ctx02 is None:
            self.ctx02 = self.v.new_context()
        return self.ctx02

    def _enter_guest_mode(self) -> None:
        """KVM enter_svm_guest_mode: vmcb02 from vmcb01 and the caches (nested_vmcb02_prepare_
        control / _save)."""
        ctl, save = self.ctl, self.save
        assert ctl is not None and save is not None
        l1 = self.v.ctx
        l2 = self._l2_context()
        self._l1_rip, self._l1_rax, self._l1_rflags = l1.rip, l1.gpr(0), l1.rflags
        l1_st = l1.get_state()
        st = ArchState(
            rip=save.rip, rsp=save.rsp, rflags=save.rflags | 2,
            es=segment_from_vmcb(*save.es), cs=segment_from_vmcb(*save.cs),
            ss=segment_from_vmcb(*save.ss), ds=segment_from_vmcb(*save.ds),
            fs=l1_st.fs, gs=l1_st.gs, tr=l1_st.tr, ldt=l1_st.ldt,
            gdt=DescTable(save.gdtr[3], save.gdtr[2]), idt=DescTable(save.idtr[3], save.idtr[2]),
            cr0=save.cr0, cr2=save.cr2, cr3=save.cr3, cr4=save.cr4,
            efer=save.efer & ~EFER_SVME)
        if st.cr0 & CR0_PG and st.efer & (1 << 8):
            st.efer |= EFER_LMA
            if st.cs.l:
                st.cs.base = 0   # APM 4.12.2: 64-bit mode ignores the CS base (the substrate adds it to RIP)
        # KVM nested_vmcb02_prepare_save: CPL from the cache (the SS.DPL of a VMCB may differ)
        st.ss.flags = (st.ss.flags & ~(3 << 13)) | ((save.cpl & 3) << 13)
        l2.set_state(st)
        gprs = l1.gprs()
        gprs[0], gprs[4] = save.rax, save.rsp
        l2.set_gprs(gprs)
        for index in _SHARED_CPU_MSRS:
            l2.set_cpu_msr(index, l1.cpu_msr(index))
        l2.set_cpu_msr(M.IA32_PAT, l1.cpu_msr(M.IA32_PAT))
        for i in range(4):
            l2.set_reg(DREGS[i], l1.reg(DREGS[i]))
        l2.set_reg(DREGS[4], save.dr6)
        l2.set_reg(DREGS[5], save.dr7)
        shadow = ctl.int_state & S.SVM_INTERRUPT_SHADOW_MASK
        l2.patch_hflags(set_mask=HF_INHIBIT_IRQ if shadow else 0, clear_mask=0 if shadow else HF_INHIBIT_IRQ)
        self._l2_svme = bool(save.efer & EFER_SVME)
        self._prepare_control(l1_st, l2)

    def _prepare_control(self, l1_st: ArchState, l2: ExecContext) -> None:
        """KVM nested_vmcb02_prepare_control, and into L2: the nested MMU, V_TPR, the TSC
        offset, GIF, then EVENTINJ."""
        ctl = self.ctl
        assert ctl is not None
        # KVM nested_svm_init_mmu_context: with NP_ENABLE, L2's guest-physical addresses go
        # through L1's nested page tables (APM 15.25); else L2 shares L1's
        npt = None
        if ctl.nested_ctl & S.NESTED_CTL_NP_ENABLE:
            npt = Npt(self.v.vm.phys, ctl.nested_cr3, l1_st.cr4, l1_st.efer, self.maxphyaddr)
        l2.use_tdp(npt)
        l2.flush_tlb()
        self.v_tpr = ctl.int_ctl & S.V_TPR_MASK
        self.l2_tsc_offset = ctl.tsc_offset
        self.gif = True   # APM 15.17: VMRUN sets GIF; #VMEXIT clears it
        self.guest_mode = True
        self.v.switch_context(l2)
        # APM 15.20: EVENTINJ is delivered before L2's first instruction
        inj = ctl.event_inj
        if inj & S.EVTINJ_VALID:
            kind = (inj >> S.EVTINJ_TYPE_SHIFT) & 7
            ec = ctl.event_inj_err if inj & S.EVTINJ_VALID_ERR else None
            self.v.inject_from_vmcs(inj & S.EVTINJ_VEC_MASK, kind, ec, 0)

    # ---- nested state (kvm/svm/state.py) ------------------------------------------------------

    def get_state(self, user_size: int) -> bytes | int:
        return svm_state.get_nested_state(self, user_size)

    def set_state(self, ns: NestedState) -> None:
        svm_state.set_nested_state(self, ns)

    def trace_failed(self, failure: CheckFailure) -> None:
        self._trace("kvm_nested_vmenter_failed", check=failure.name, source=failure.source, values=failure.values)

    def read_u64(self, pa: int) -> int | None:
        return self._read_u64(pa)

    def sync_control_for_save(self) -> None:
        """KVM nested_sync_control_from_vmcb02: the fields the CPU writes while L2 runs go
        into the cache: V_TPR, V_IRQ (already there), EVENTINJ once delivered."""
        ctl = self.ctl
        assert ctl is not None
        ctl.int_ctl = (ctl.int_ctl & ~S.V_TPR_MASK) | (self.v_tpr & S.V_TPR_MASK)
        if not self.v.entry_event_pending():
            ctl.event_inj = ctl.event_inj_err = 0

    @staticmethod
    def _save_area(ctx: ExecContext, rip: int, rax: int, rflags: int, svme: bool) -> Vmcb:
        """A VMCB whose save area holds `ctx`'s state (APM appendix B layout)."""
        st = ctx.get_state()
        v = Vmcb()
        for name in ("es", "cs", "ss", "ds", "fs", "gs", "tr"):
            s = getattr(st, name)
            v.set_seg(name, s.selector, attrib_from_segment(s), s.limit, s.base)
        v.set_seg("ldtr", st.ldt.selector, attrib_from_segment(st.ldt), st.ldt.limit, st.ldt.base)
        v.set_seg("gdtr", 0, 0, st.gdt.limit, st.gdt.base)
        v.set_seg("idtr", 0, 0, st.idt.limit, st.idt.base)
        for name, value in (("efer", st.efer | (EFER_SVME if svme else 0)), ("cr0", st.cr0),
                            ("cr2", st.cr2), ("cr3", st.cr3), ("cr4", st.cr4), ("rflags", rflags),
                            ("rip", rip), ("rsp", ctx.gpr(4)), ("rax", rax),
                            ("dr6", ctx.reg(DREGS[4])), ("dr7", ctx.reg(DREGS[5])), ("cpl", st.cpl),
                            ("g_pat", ctx.cpu_msr(M.IA32_PAT))):
            v.set_save(name, value)
        return v

    def vmcb01_save(self) -> bytes:
        """vmcb01 as a VMCB image whose save area is L1's state as VMRUN left it (KVM keeps
        it in vmcb01 while L2 runs; here it is the L1 context with VMRUN's RIP/RAX/RFLAGS)."""
        v = self._save_area(self.v.ctx01, self._l1_rip, self._l1_rax, self._l1_rflags, bool(self.v.efer_svme))
        v.set_save("cpl", 0)
        return bytes(v.data)

    def l2_save_area(self) -> bytes:
        """L2's current state as a 744-byte save area (what #VMEXIT would write to vmcb12)."""
        l2 = self.ctx02
        assert l2 is not None
        v = self._save_area(l2, l2.rip, l2.gpr(0), l2.rflags, self._l2_svme)
        return bytes(v.data[S.SAVE_OFFSET:S.SAVE_OFFSET + S.SAVE_SIZE])

    def vmrun_from_state(self, vmcb_pa: int, l1: Vmcb, ctl: VmcbCtrlCached, save: VmcbSaveCached,
                         gif: bool, run_pending: bool) -> None:
        """svm-v2's commit: L1's state from its save area (svm_copy_vmrun_state's fields), then
        the VMRUN path from the checked caches, exactly as L1's VMRUN would enter L2."""
        self.leave_nested()
        self._copy_vmrun_state(l1)
        self.vmcb12_pa, self.ctl, self.save = vmcb_pa, ctl, save
        self._enter_guest_mode()
        self._entered_from_state(gif, run_pending)

    def _copy_vmrun_state(self, vmcb: Vmcb) -> ArchState:
        """KVM svm_copy_vmrun_state into vmcb01: L1's segments ES-DS, GDTR/IDTR, CR0/3/4,
        EFER, RFLAGS, RIP, RSP, RAX from a save area; the rest of L1's context stays."""
        ctx = self.v.ctx01
        s = copy_save_to_cache(vmcb)
        st = replace(ctx.get_state(), es=segment_from_vmcb(*s.es), cs=segment_from_vmcb(*s.cs),
                     ss=segment_from_vmcb(*s.ss), ds=segment_from_vmcb(*s.ds),
                     gdt=DescTable(s.gdtr[3], s.gdtr[2]), idt=DescTable(s.idtr[3], s.idtr[2]),
                     cr0=s.cr0, cr3=s.cr3, cr4=s.cr4, efer=s.efer & ~EFER_SVME,
                     rip=s.rip, rsp=s.rsp, rflags=s.rflags | 2)
        if st.cr0 & CR0_PG and st.efer & (1 << 8):
            st.efer |= EFER_LMA
        ctx.set_state(st)
        ctx.set_gpr(0, s.rax)
        ctx.set_gpr(4, s.rsp)
        self.v.efer_svme = bool(s.efer & EFER_SVME)
        return st

    def _entered_from_state(self, gif: bool, run_pending: bool) -> None:
        """After SET entered L2: GIF from the blob, the entry's EVENTINJ only if the entry
        was still pending, the nested pages at the first run."""
        self.gif = gif
        if not run_pending:
            self.v.clear_entry_event()
        self._request_pages()

    def enter_from_state(self, vmcb_pa: int, ctl: VmcbCtrlCached, blob: Vmcb, gif: bool, run_pending: bool) -> None:
        """svm_set_nested_state's commit: L2 keeps the vCPU's current state (vmcb01's save
        area becomes vmcb02's), L1 gets the blob's (svm_copy_vmrun_state), the control cache
        the blob's control area, then nested_vmcb02_prepare_control; the MSRPM and IOPM are
        checked at the first run (KVM_REQ_GET_NESTED_STATE_PAGES) unless
        `vm.nested_pages_at_set`."""
        l1 = self.v.ctx01
        l2 = self._l2_context()
        if self.guest_mode:
            self.leave_nested()   # L2 keeps running on its own state (KVM: vmcb02 is kept)
        else:
            cur = l1.get_state()
            l2.set_state(cur)
            l2.set_gprs(l1.gprs())
            for index in (*_SHARED_CPU_MSRS, M.IA32_PAT):
                l2.set_cpu_msr(index, l1.cpu_msr(index))
            for i in range(6):
                l2.set_reg(DREGS[i], l1.reg(DREGS[i]))
            shadow = l1.hflags() & HF_INHIBIT_IRQ
            l2.patch_hflags(set_mask=shadow, clear_mask=0 if shadow else HF_INHIBIT_IRQ)
            self._l2_svme = bool(self.v.efer_svme)
        st = self._copy_vmrun_state(blob)
        self._l1_rip, self._l1_rax, self._l1_rflags = st.rip, l1.gpr(0), st.rflags
        self.vmcb12_pa, self.ctl, self.save = vmcb_pa, ctl, None
        self._prepare_control(st, l2)
        self._entered_from_state(gif, run_pending)

    def _request_pages(self) -> None:
        """KVM_REQ_GET_NESTED_STATE_PAGES (with `vm.nested_pages_at_set` SET checked them)."""
        if not self.v.vm.nested_pages_at_set:
            self.v.requests.add(REQ_GET_NESTED_STATE_PAGES)

    def missing_pages(self, ctl: VmcbCtrlCached | None = None) -> str | None:
        """KVM svm_get_nested_state_pages (nested_svm_merge_msrpm): the first permission map
        the intercepts of `ctl` (default: the cache) use that guest memory does not back."""
        ctl = ctl or self.ctl
        assert ctl is not None
        maps = []
        if ctl.intercept(S.INTERCEPT["MSR_PROT"]):
            maps.append(("msrpm_base_pa", ctl.msrpm_base_pa, S.MSRPM_SIZE))
        if ctl.intercept(S.INTERCEPT["IOIO_PROT"]):
            maps.append(("iopm_base_pa", ctl.iopm_base_pa, S.IOPM_SIZE))
        for name, base, size in maps:
            if any(self.v.vm.phys.find(base + off) is None for off in range(0, size, 0x1000)):
                return name
        return None

    def get_nested_state_pages(self) -> bool:
        return not self.guest_mode or self.missing_pages() is None

    # ---- #VMEXIT -------------------------------------------------------------------------------

    def vmexit(self, e: SvmExit) -> None:
        """KVM nested_svm_vmexit: write what the CPU writes into vmcb12, restore L1 from vmcb01
        (APM 15.6); GIF becomes 0."""
        ctl = self.ctl
        assert ctl is not None and self.ctx02 is not None
        l2 = self.ctx02
        st = l2.get_state()
        pa = self.vmcb12_pa
        vmcb12 = Vmcb(self.v.vm.phys.read(pa, S.VMCB_SIZE))
        for name in ("es", "cs", "ss", "ds"):
            s = getattr(st, name)
            vmcb12.set_seg(name, s.selector, attrib_from_segment(s), s.limit, s.base)
        vmcb12.set_seg("gdtr", 0, 0, st.gdt.limit, st.gdt.base)
        vmcb12.set_seg("idtr", 0, 0, st.idt.limit, st.idt.base)
        gprs = l2.gprs()
        for name, value in (("efer", st.efer | (EFER_SVME if self._l2_svme else 0)), ("cr0", st.cr0),
                            ("cr3", st.cr3), ("cr2", st.cr2), ("cr4", st.cr4), ("rflags", st.rflags),
                            ("rip", st.rip), ("rsp", st.rsp), ("rax", gprs[0]),
                            ("dr7", l2.reg(DREGS[5])), ("dr6", l2.reg(DREGS[4])), ("cpl", st.cpl)):
            vmcb12.set_save(name, value)
        # nested_sync_control_from_vmcb02: V_TPR (L2's TPR) and a V_IRQ not yet taken
        mask = S.V_TPR_MASK | S.V_IRQ_MASK
        int_ctl = (ctl.int_ctl & ~mask) | (self.v_tpr & S.V_TPR_MASK) | (ctl.int_ctl & S.V_IRQ_MASK)
        vmcb12.set_control("int_ctl", int_ctl)
        vmcb12.set_control("int_state", S.SVM_INTERRUPT_SHADOW_MASK if l2.hflags() & HF_INHIBIT_IRQ else 0)
        vmcb12.set_control("exit_code", e.code)
        vmcb12.set_control("exit_info_1", e.info_1)
        vmcb12.set_control("exit_info_2", e.info_2)
        vmcb12.set_control("exit_int_info", e.int_info)
        vmcb12.set_control("exit_int_info_err", e.int_info_err)
        vmcb12.set_control("event_inj", 0)
        vmcb12.set_control("event_inj_err", 0)
        vmcb12.set_control("next_rip", e.next_rip if e.next_rip is not None else 0)
        self.v.vm.phys.write(pa, bytes(vmcb12.data))
        self.stats["exits"] += 1
        self.stats[f"exit_{S.EXIT_NAMES.get(e.code, hex(e.code))}"] += 1
        self._trace("kvm_nested_vmexit", exit_code=e.code, rip=st.rip, info1=e.info_1, info2=e.info_2,
                    int_info=e.int_info)
        self._leave_guest_mode(gprs)

    def _leave_guest_mode(self, l2_gprs: list[int]) -> None:
        """KVM nested_svm_vmexit, the vmcb01 half: L1's segments, control registers and
        RFLAGS/RIP/RSP/RAX as VMRUN left them; DR7 = 0x400, CPL 0, GIF 0."""
        l1, l2 = self.v.ctx01, self.ctx02
        assert l2 is not None
        l2_st = l2.get_state()
        st = l1.get_state()
        st.fs, st.gs, st.tr, st.ldt = l2_st.fs, l2_st.gs, l2_st.tr, l2_st.ldt
        st.cr2 = l2_st.cr2
        st.rip, st.rflags = self._l1_rip, self._l1_rflags
        l1.set_state(st)
        gprs = list(l2_gprs)
        gprs[0], gprs[4] = self._l1_rax, st.rsp
        l1.set_gprs(gprs)
        for index in _SHARED_CPU_MSRS:
            l1.set_cpu_msr(index, l2.cpu_msr(index))
        for i in range(4):
            l1.set_reg(DREGS[i], l2.reg(DREGS[i]))
        l1.set_reg(DREGS[5], 0x400)
        l1.patch_hflags(clear_mask=HF_INHIBIT_IRQ)
        self.gif = False
        self.guest_mode = False
        self.l2_tsc_offset = 0
        self.v.requests.discard(REQ_GET_NESTED_STATE_PAGES)   # KVM: a nested #VMEXIT cancels it
        self.v.switch_context(l1)

    def leave_nested(self) -> None:
        """KVM svm_leave_nested: drop L2 without a #VMEXIT (EFER.SVME cleared, reset,
        KVM_SET_NESTED_STATE); GIF = 1 and the nested-state-pages request is cancelled."""
        if self.guest_mode:
            assert self.ctx02 is not None
            self._leave_guest_mode(self.ctx02.gprs())
        self.v.requests.discard(REQ_GET_NESTED_STATE_PAGES)
        self.gif = True

    # ---- which exits L1 wants (nested_svm_exit_handled / nested_svm_intercept) ----------------

    def l2_trap(self, insn: Insn, rip: int) -> SvmExit | None:
        """A trapped instruction in L2: the #VMEXIT L1 wants, or None (L0 handles it)."""
        op = insn.op
        next_rip = rip + insn.length
        if op in (Op.RDMSR, Op.WRMSR):
            return self._msr_exit(op == Op.WRMSR, next_rip)
        if op in (Op.IN, Op.OUT, Op.INS, Op.OUTS):
            return self._io_exit(insn, next_rip)
        if op in (Op.MOV_TO_CR, Op.MOV_FROM_CR, Op.CLTS, Op.LMSW):
            return self._cr_exit(insn, next_rip)
        if op in (Op.MOV_TO_DR, Op.MOV_FROM_DR):
            name = f"DR{insn.crn}_{'WRITE' if op == Op.MOV_TO_DR else 'READ'}"
            return SvmExit(S.EXIT[name], next_rip=next_rip) if self._intercepted(name) else None
        name = _INSN_INTERCEPT.get(op)
        if name is None or not self._intercepted(name):
            return None
        info_1 = 0
        if op == Op.INVLPGA:
            info_1 = self.v.ctx.gpr(1) & 0xFFFFFFFF   # APM: ASID in ECX
        return SvmExit(S.EXIT[name], info_1, next_rip=next_rip)

    def insn_exit(self, insn: Insn) -> SvmExit:
        """An SVM instruction in L2 that L1 intercepts (VMRUN always is, by the checks)."""
        return SvmExit(S.EXIT[_INSN_INTERCEPT[insn.op]], next_rip=self.v.ctx.rip + insn.length)

    def wants_insn(self, insn: Insn) -> bool:
        return self._intercepted(_INSN_INTERCEPT[insn.op])

    def _msr_exit(self, write: bool, next_rip: int) -> SvmExit | None:
        """KVM nested_svm_exit_handled_msr: two bits per MSR in the MSRPM (APM 15.11)."""
        assert self.ctl is not None
        if not self._intercepted("MSR_PROT"):
            return None
        index = self.v.ctx.gpr(1) & 0xFFFFFFFF
        e = SvmExit(S.EXIT["MSR"], int(write), next_rip=next_rip)
        nr = S.msrpm_bit_nr(index)
        if nr is None:
            return e
        try:
            byte = self.v.vm.phys.read(self.ctl.msrpm_base_pa + nr // 8, 1)[0]
        except (ValueError, KeyError, IndexError):
            return e
        return e if byte >> (nr % 8 + int(write)) & 1 else None

    def _io_exit(self, insn: Insn, next_rip: int) -> SvmExit | None:
        """KVM nested_svm_intercept_ioio: one bit per port in the IOPM; exit_info_1 per APM
        15.10.2 and exit_info_2 the next RIP."""
        assert self.ctl is not None
        if not self._intercepted("IOIO_PROT"):
            return None
        port = insn.port if insn.port is not None else self.v.ctx.gpr(2) & 0xFFFF
        wanted = False
        for p in range(port, port + insn.size):
            try:
                byte = self.v.vm.phys.read(self.ctl.iopm_base_pa + p // 8, 1)[0]
            except (ValueError, KeyError, IndexError):
                wanted = True
                break
            if byte >> (p & 7) & 1:
                wanted = True
                break
        if not wanted:
            return None
        info = (port << S.IOIO_PORT_SHIFT) | S.IOIO_SIZE[insn.size] \
            | (S.IOIO_ASIZE[insn.addr_size] if insn.op in (Op.INS, Op.OUTS) else S.IOIO_ASIZE[8]) \
            | (S.IOIO_TYPE_IN if insn.op in (Op.IN, Op.INS) else 0) \
            | (S.IOIO_STR if insn.op in (Op.INS, Op.OUTS) else 0) | (S.IOIO_REP if insn.rep else 0) \
            | (insn.seg << S.IOIO_SEG_SHIFT if insn.op == Op.OUTS else 0)
        return SvmExit(S.EXIT["IOIO"], info, next_rip, next_rip=next_rip)

    def _cr_exit(self, insn: Insn, next_rip: int) -> SvmExit | None:
        """CR read/write intercepts (APM 15.9); LMSW and CLTS are CR0 writes, and the
        selective CR0 write intercept catches writes changing bits other than TS and MP."""
        op = insn.op
        n = 0 if op in (Op.CLTS, Op.LMSW) else insn.crn
        if op == Op.MOV_FROM_CR:
            name = f"CR{n}_READ"
            return SvmExit(S.EXIT[name], next_rip=next_rip) if self._intercepted(name) else None
        if self._intercepted(f"CR{n}_WRITE"):
            return SvmExit(S.EXIT[f"CR{n}_WRITE"], next_rip=next_rip)
        if n == 0 and op != Op.CLTS and self._intercepted("SELECTIVE_CR0"):
            old = self.v.ctx.reg_cr(0)
            if op == Op.LMSW:
                # APM 15.9.2: LMSW is caught when it changes any of CR0[3:0], MP and TS included
                # (it cannot clear PE); a memory operand is taken as a change
                if insn.mem is not None:
                    return SvmExit(S.EXIT["CR0_SEL_WRITE"], next_rip=next_rip)
                changed = (old ^ (self.v.ctx.gpr(insn.reg) | (old & 1))) & 0xF
            else:
                changed = (old ^ self.v.ctx.gpr(insn.reg)) & ~S.SVM_CR0_SELECTIVE_MASK
            if changed:
                return SvmExit(S.EXIT["CR0_SEL_WRITE"], next_rip=next_rip)
        return None

    def exception_exit(self, vector: int, error_code: int | None, payload: int | None,
                       privileged: bool = False) -> SvmExit | None:
        """Exception intercepts (APM 15.12): exit_info_1 the error code, exit_info_2 CR2 for
        #PF."""
        if not self._intercepted(f"EXCEPTION_{vector}"):
            return None
        return SvmExit(S.EXIT["EXCP_BASE"] + vector, error_code or 0, (payload or 0) if vector == 14 else 0)

    def tdp_exit(self, f: TdpFault) -> SvmExit:
        """APM 15.25.6: #VMEXIT(NPF), exit_info_1 the fault's error code, exit_info_2 the
        guest-physical address."""
        assert isinstance(f, NptFault)
        return SvmExit(S.EXIT["NPF"], f.error_code, f.gpa)

    def event_exit(self, kind: str, vector: int | None = None) -> SvmExit | None:
        """The exit for an event L1 intercepts: "NMI", "INTR", "INTR_WINDOW" (VINTR),
        "TRIPLE_FAULT" (SHUTDOWN)."""
        name = {"NMI": "NMI", "INTR": "INTR", "INTR_WINDOW": "VINTR", "TRIPLE_FAULT": "SHUTDOWN"}[kind]
        if kind == "INTR":
            self._trace("kvm_nested_intr_vmexit", rip=self.v.ctx.rip)   # KVM nested_svm_intr
        return SvmExit(S.EXIT[name])

    # ---- event intercepts and GIF --------------------------------------------------------------

    def exits_on_intr(self) -> bool:
        return self._intercepted("INTR")

    def exits_on_nmi(self) -> bool:
        return self._intercepted("NMI")

    def intr_window_exiting(self) -> bool:
        assert self.ctl is not None
        return bool(self.ctl.int_ctl & S.V_IRQ_MASK) and self._intercepted("VINTR")

    def nmi_window_exiting(self) -> bool:
        return False   # no virtual NMIs (V_NMI) advertised

    def ack_intr_on_exit(self) -> bool:
        return False   # APM 15.13.1: the interrupt stays pending in the APIC

    def rdtsc_exiting(self) -> bool:
        return self._intercepted("RDTSC")

    def preemption_timer_expired(self) -> bool:
        return False

    def physical_if(self) -> bool:
        """Whether a physical interrupt may be taken in L2 (APM 15.21.1): with V_INTR_MASKING
        L1's RFLAGS.IF (saved at VMRUN) decides, else L2's own."""
        assert self.ctl is not None
        if self.ctl.int_ctl & S.V_INTR_MASKING_MASK:
            return bool(self._l1_rflags & RFLAGS_IF)
        return bool(self.v.ctx.rflags & RFLAGS_IF)

    def virq_pending(self) -> bool:
        assert self.ctl is not None
        return bool(self.ctl.int_ctl & S.V_IRQ_MASK)

    def virtual_interrupt(self) -> int | None:
        """A V_IRQ L2 can take now (APM 15.21.4): its vector, once, when no VINTR intercept
        claims the window."""
        ctl = self.ctl
        assert ctl is not None
        if not ctl.int_ctl & S.V_IRQ_MASK or self._intercepted("VINTR"):
            return None
        # APM 15.21.4: taken when its priority is above V_TPR, unless V_IGN_TPR
        prio = (ctl.int_ctl & S.V_INTR_PRIO_MASK) >> S.V_INTR_PRIO_SHIFT
        if not ctl.int_ctl & S.V_IGN_TPR_MASK and prio <= self.v_tpr:
            return None
        ctl.int_ctl &= ~S.V_IRQ_MASK
        return ctl.int_vector & 0xFF

    def virtual_tpr(self) -> bool:
        assert self.ctl is not None
        return bool(self.ctl.int_ctl & S.V_INTR_MASKING_MASK)

    def cr_read_value(self, crn: int, real: int) -> int:
        return self.v_tpr if crn == 8 and self.virtual_tpr() else real

    def cr_write_value(self, crn: int, value: int, real: int) -> int:
        return value


__all__ = ["NestedSvm", "SvmExit"]
