"""A vCPU: KVM_RUN and the per-vCPU ioctls, over one execution context.

The run loop follows KVM's vcpu_enter_guest: accept pending APIC events, inject the
highest-priority event that may be delivered, enter the guest for a budget of
instructions, then handle the exit in the kernel when it can and return to userspace
(the caller of run()) when it must.
"""

from __future__ import annotations

import errno
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ..arch import apic as A
from ..arch import cpuid as F
from ..arch import kvm_uapi as U
from ..arch import msr as M
from ..arch.x86 import EFER_SVME
from ..cpu import fpu
from ..cpu import native as N
from ..cpu.context import HF2_NMI, HF_INHIBIT_IRQ
from ..cpu.decode import SVM_OPS, VMX_OPS, Insn, Op, decode
from ..cpu.delivery import DeliveryUnsupported, EventKind, TripleFault, deliver_with_escalation
from ..cpu.engine import DREGS, GPRS, TOP, ExecContext, Stop
from ..cpu.faults import GuestFault, gp, ud
from ..cpu.paging import LinearMemory
from ..cpu.state import ArchState, DescTable, Segment, real_mode_segment
from ..cpu.tdp import ACCESS_FETCH, TdpFault
from ..state import nested_state as NS
from . import msr as msrs
from . import xsave as XS
from .errors import KvmError, einval
from .exits import Exit, InternalError, IoExit, MmioExit
from .hypercall import HYPERCALL_OPCODES, emulate_hypercall
from .lapic import Lapic, LapicState
from .requests import REQ_GET_NESTED_STATE_PAGES
from .svm.nested import NestedSvm
from .vm import APIC_MMIO
from .vmx.nested import ExitInfo, NestedVmx

if TYPE_CHECKING:
    from .snapshot import VcpuState

INFINITY = 1 << 62
# While an interrupt waits for RFLAGS.IF or the end of an interrupt shadow, the guest runs in
# slices this long so the window is seen promptly (there is no interrupt-window hook).
WINDOW_SLICE = 64
CR0_PE, CR0_NW, CR0_CD, CR0_PG = 1, 1 << 29, 1 << 30, 1 << 31
CR0_KNOWN = 0xE005003F   # PE MP EM TS ET NE WP AM NW CD PG (KVM CR0_RESERVED_BITS complement)
CR4_PAE, CR4_PCIDE, CR4_OSXSAVE, CR4_TSD, CR4_DE, CR4_LA57 = 1 << 5, 1 << 17, 1 << 18, 1 << 2, 1 << 3, 1 << 12
EFER_LME, EFER_LMA = 1 << 8, 1 << 10
RFLAGS_IF, RFLAGS_DF, RFLAGS_VM = 1 << 9, 1 << 10, 1 << 17

# CR4 bits and the CPUID feature that makes each legal (KVM __cr4_reserved_bits).
_CR4_FEATURE_BITS = {
    0: "vme", 1: "vme", 2: None, 3: None, 4: None, 5: None, 6: None, 7: None, 8: None, 9: None,
    10: None, 11: "umip", 12: "la57", 13: "vmx", 14: "smx", 16: "fsgsbase", 17: "pcid",
    18: "xsave", 20: "smep", 21: "smap", 22: "pku",
}


@dataclass
class Regs:
    """struct kvm_regs."""

    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = 2


# Regs field order as GPR numbers 0..15 (RAX RCX RDX RBX RSP RBP RSI RDI R8..R15)
_GPR_NAMES = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
              "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


@dataclass
class KvmSegment:
    """struct kvm_segment."""

    base: int = 0
    limit: int = 0xFFFF
    selector: int = 0
    type: int = 3
    present: int = 1
    dpl: int = 0
    db: int = 0
    s: int = 1
    l: int = 0  # noqa: E741 - KVM's name
    g: int = 0
    avl: int = 0
    unusable: int = 0

    @classmethod
    def from_segment(cls, s: Segment) -> KvmSegment:
        return cls(s.base, s.limit, s.selector, s.type, s.present, s.dpl, s.db, s.s, s.l, s.g, s.avl,
                   int(not s.present))

    def to_segment(self) -> Segment:
        flags = (self.type << 8) | (self.s << 12) | (self.dpl << 13) | (self.present << 15) \
            | (self.avl << 20) | (self.l << 21) | (self.db << 22) | (self.g << 23)
        if self.unusable:
            flags &= ~(1 << 15)
        return Segment(self.selector, self.base, self.limit, flags)


@dataclass
class KvmDtable:
    base: int = 0
    limit: int = 0xFFFF


@dataclass
class Sregs:
    """struct kvm_sregs."""

    cs: KvmSegment = field(default_factory=KvmSegment)
    ds: KvmSegment = field(default_factory=KvmSegment)
    es: KvmSegment = field(default_factory=KvmSegment)
    fs: KvmSegment = field(default_factory=KvmSegment)
    gs: KvmSegment = field(default_factory=KvmSegment)
    ss: KvmSegment = field(default_factory=KvmSegment)
    tr: KvmSegment = field(default_factory=KvmSegment)
    ldt: KvmSegment = field(default_factory=KvmSegment)
    gdt: KvmDtable = field(default_factory=KvmDtable)
    idt: KvmDtable = field(default_factory=KvmDtable)
    cr0: int = 0
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    apic_base: int = 0
    interrupt_bitmap: tuple[int, int, int, int] = (0, 0, 0, 0)


@dataclass
class VcpuEvents:
    """struct kvm_vcpu_events (the fields nestvisor models)."""

    exception_injected: int = 0
    exception_nr: int = 0
    exception_has_error_code: int = 0
    exception_pending: int = 0
    exception_error_code: int = 0
    interrupt_injected: int = 0
    interrupt_nr: int = 0
    interrupt_soft: int = 0
    interrupt_shadow: int = 0
    nmi_injected: int = 0
    nmi_pending: int = 0
    nmi_masked: int = 0
    sipi_vector: int = 0
    flags: int = 0
    triple_fault_pending: int = 0


@dataclass
class DebugRegs:
    """struct kvm_debugregs."""

    db: tuple[int, int, int, int] = (0, 0, 0, 0)
    dr6: int = 0xFFFF0FF0
    dr7: int = 0x400
    flags: int = 0


@dataclass
class _Completion:
    """What the next run() must finish for an exit that went to userspace."""

    kind: str            # "in", "ins", "mmio"
    insn: Insn | None
    exit: Exit


class Vcpu:
    """KVM_CREATE_VCPU's result. Create it with Vm.create_vcpu()."""

    def __init__(self, vm, vcpu_id: int) -> None:  # noqa: ANN001 - Vm (import cycle)
        self.vm = vm
        self.vcpu_id = vcpu_id
        self.profile = vm.kvm.profile
        self.cpuid: dict[tuple[int, int], tuple[int, int, int, int]] = dict(self.profile.table())
        self._cpuid_max_basic = self.cpuid[(0, 0)][0]
        self._cpuid_max_ext = self.cpuid[(0x80000000, 0)][0]
        self._apic_mmio = APIC_MMIO
        self.ctx = self.ctx01 = self.new_context()
        self.lapic = Lapic(vcpu_id, self, vm.apic_bus)
        self._sync_lapic_caps()
        self.clock = 0
        self.run_until = INFINITY
        self.msr_values: dict[str, int] = {}
        self.mp_state = U.KVM_MP_STATE_RUNNABLE if vcpu_id == 0 else U.KVM_MP_STATE_UNINITIALIZED
        self.pending_exception: tuple[int, int | None] | None = None
        self.exception_payload: int | None = None   # #PF address for CR2 (KVM's exception payload)
        self._nmi_pending = 0
        self.ext_interrupts: list[int] = []
        self.init_pending = False
        self.sipi_pending: int | None = None
        self.sipi_vector = 0
        self.has_run = False
        self.stats: Counter[str] = Counter()
        self._completion: _Completion | None = None
        self._outside: Insn | None = None
        self._running = False
        self._pause_yield = False
        self.idle_slice = False   # the last run() only waited: halted, or spinning on PAUSE
        self._host_writes = -1
        self._vmcs_event: tuple[int, EventKind, int | None, int] | None = None
        self._injecting: tuple[int, EventKind, int] | None = None   # vector, kind, CR2 before
        self._lapic_loads: tuple = ()   # what _load_lapic last gave the hooks
        self._run_flags: tuple = ()     # the switches _step last gave them
        self._vmx_abort = False
        self._mov_ss_end = -1
        self.efer_svme = False   # L1's EFER.SVME (nested SVM keeps it out of the substrate)
        self.requests: set[str] = set()   # KVM_REQ_* work before the next entry (kvm/requests.py)
        self.nested: NestedVmx | NestedSvm | None = \
            NestedVmx(self) if self._feature("vmx") else NestedSvm(self) if self._feature("svm") else None
        self._reset(init=False)

    # ---- execution contexts (L1 and, with nested VMX, L2) ---------------------------------

    def new_context(self) -> ExecContext:
        """An execution context with the VM's memory and this vCPU's APIC page mapped."""
        ctx = ExecContext(self.vm.phys, self)
        for s in self.vm.slots.values():
            ctx.map_ram(s.guest_phys_addr, s.memory_size, s.host_addr)
        ctx.map_apic(self._apic_mmio, self._apic_mmio_read, self._apic_mmio_write)
        return ctx

    def contexts(self) -> list[ExecContext]:
        nested = self.nested
        return [self.ctx01] if nested is None or nested.ctx02 is None else [self.ctx01, nested.ctx02]

    def switch_context(self, ctx: ExecContext) -> None:
        """Run `ctx` from now on (a nested VM entry or exit); the x87/SSE state and XCR0 go
        with the vCPU, as neither VMX nor SVM switches them."""
        if ctx is not self.ctx:
            fpu.share(self.ctx, ctx)
        self.ctx = ctx

    def halt_in_guest(self) -> None:
        self.mp_state = U.KVM_MP_STATE_HALTED

    def halted_in_guest(self) -> bool:
        return self.mp_state == U.KVM_MP_STATE_HALTED

    def inject_from_vmcs(self, vector: int, kind: int, error_code: int | None, insn_len: int) -> None:
        """Deliver an event from a VM-entry interruption-information field (SDM 27.6) before L2
        runs its first instruction."""
        self._vmcs_event = (vector, _VMCS_EVENT_KIND[kind], error_code, insn_len)

    def queue_exception(self, vector: int, error_code: int | None = None) -> None:
        """Make `vector` the pending exception (delivered, or routed to L1, before the next
        instruction)."""
        self.pending_exception = (vector, error_code)
        self.exception_payload = None

    def vmx_abort(self) -> None:
        """SDM 28.7: a VMX abort shuts the logical processor down (KVM: a triple fault)."""
        self._vmx_abort = True

    def cr4_fixed1(self) -> int:
        """The CR4 bits this vCPU's CPUID makes legal (KVM's cr4 reserved bits, complemented)."""
        bits = 0
        for bit, feat in _CR4_FEATURE_BITS.items():
            if feat is None or (feat != "vme" and self._feature(feat)):
                bits |= 1 << bit
        return bits

    # ---- ApicHost ----------------------------------------------------------------------

    def now(self) -> int:
        """Virtual ns: the vCPU clock, including the instructions the slice in progress has
        retired before the current one."""
        return self.clock + (self.ctx.clock() if self._running else 0)

    @property
    def tsc_offset(self) -> int:
        return self.lapic.tsc_offset

    @tsc_offset.setter
    def tsc_offset(self, value: int) -> None:
        self.lapic.tsc_offset = value   # one TSC for RDTSC, IA32_TSC and the TSC-deadline timer
        if self._running:
            self._load_tsc()

    def _load_tsc(self) -> None:
        """Give the trap hook this run's TSC base and say whether it may answer RDTSC alone
        (not with CR4.TSD, which depends on CPL, nor when L1 intercepts L2's RDTSC)."""
        nested = self.nested
        base = self.clock + self.tsc_offset
        fast = not self.ctx.reg_cr(4) & CR4_TSD
        if nested is not None and nested.guest_mode:
            base += nested.l2_tsc_offset
            fast = fast and not nested.rdtsc_exiting()
        self.ctx.set_tsc(base, fast)

    def _load_lapic(self) -> None:
        """What the hooks may answer for the LAPIC in the run that starts or goes on, outside
        guest mode (where L1 may intercept the MSRs or map the page elsewhere): TMCCT while
        the timer counts down (a guest polling it for a deadline reads it a million times),
        and ICR writes that send this vCPU an NMI (KVM's fastpath for ICR writes) while the
        destination names this APIC alone and no timer event is due."""
        lapic = self.lapic
        t = self.ctx.trap
        t.clock_base = self.clock
        if self._running:
            # the timer moved during the run: the run must stop at its new deadline
            deadline = self.next_deadline()
            if deadline is not None:
                t.budget = min(t.budget, max(0, deadline - self.clock))
        ctx = self.ctx
        if not self._outside_guest() or not lapic.hw_enabled:
            loads: tuple = (ctx, 0, None, 0, 0, 0)
        else:
            countdown = lapic.countdown()
            expiry = lapic.expiry()
            quiet = TOP if expiry is None else max(expiry, 0)
            x2 = lapic.x2apic_mode
            if x2:
                icr = (1, 0, lapic.x2apic_id) if self.vm.apic_bus.all_x2apic() else (0, 0)
            elif self.vm.apic_bus.xapic_id_unique(lapic):
                icr = (0, 1, lapic.xapic_id, lapic.get_reg(A.APIC_ICR) | lapic.get_reg(A.APIC_ICR2) << 32)
            else:
                icr = (0, 0)
            loads = (ctx, 0 if countdown is None else N.NV_TMCCT_MSR if x2 else N.NV_TMCCT_MMIO, countdown, quiet, *icr)
        if loads == self._lapic_loads:
            return   # what this context's hooks hold already (the clock base aside)
        self._lapic_loads = loads
        _, where, countdown, t.lapic_quiet_until, t.icr_self_nmi, t.xapic_self_nmi = loads[:6]
        ctx.set_tmcct(where, self.clock, *(countdown or (0, 0, 1)))
        if t.icr_self_nmi:
            t.x2apic_id = loads[6]
        elif t.xapic_self_nmi:
            t.xapic_id, t.icr_value = loads[6:]

    def _sync_icr(self) -> None:
        """The ICR value the hooks took (icr_self_nmi, xapic_self_nmi) into the LAPIC's registers."""
        t = self.ctx.trap
        if t.icr_written:
            t.icr_written = 0
            self.lapic.set_icr(t.icr_value)

    def kick(self) -> None:
        if self._running:
            self.ctx.request_stop()
            return
        # An event for a vCPU that is not running came from the one that is (an IPI): the
        # target takes it in its turn of the round, and the scheduler makes the rounds short
        # while vCPUs interrupt each other (Machine: IPI_QUANTUM_NS). The sender goes on:
        # ending its slice at every IPI (a directed yield) split IPI bursts into slices and
        # cost more than it saved.
        self.vm.kicks += 1

    @property
    def nmi_pending(self) -> int:
        """NMIs latched and not yet delivered (KVM's nmi_pending). During a run in which the
        trap hook takes them itself (`_native_nmis`) they wait in its nv_trap."""
        return self._nmi_pending + self.ctx.trap.nmi_pending

    @nmi_pending.setter
    def nmi_pending(self, value: int) -> None:
        self.ctx.trap.nmi_pending = 0
        self._nmi_pending = value

    def _native_nmis(self) -> bool:
        """Whether the coming run's hook may deliver NMIs: outside guest mode (where L1 may
        intercept them) and with GIF set."""
        return self._outside_guest() and (self.nested is None or self.nested.gif)

    def _outside_guest(self) -> bool:
        """L1 (or no nesting) runs: the hooks may answer for the CPU and the LAPIC, since no L1
        intercepts what happens and no second level translates."""
        nested = self.nested
        return self.ctx.tdp is None and (nested is None or not nested.guest_mode)

    def deliver_nmi(self) -> None:
        # KVM process_nmi: two NMIs may be pending, but only one while an NMI is being handled
        limit = 1 if self.ctx.hflags2() & HF2_NMI else 2
        t = self.ctx.trap
        if self._running and t.nmi_native:
            t.nmi_pending = min(t.nmi_pending + 1, limit)   # taken at the next block start: no stop
            return
        self.nmi_pending = min(self.nmi_pending + 1, limit)
        self.kick()

    def deliver_init(self) -> None:
        self.init_pending = True
        self.kick()

    def deliver_sipi(self, vector: int) -> None:
        self.sipi_pending = vector
        self.kick()

    def tsc(self) -> int:
        """IA32_TSC: 1 GHz on the virtual clock."""
        return (self.now() + self.tsc_offset) & 0xFFFFFFFFFFFFFFFF

    def next_deadline(self) -> int | None:
        deadline = self.lapic.next_deadline()
        nested = self.nested
        if nested is not None and nested.preemption_deadline is not None:
            if deadline is None or nested.preemption_deadline < deadline:
                deadline = nested.preemption_deadline
        return deadline

    # ---- reset / INIT ------------------------------------------------------------------

    def _reset(self, init: bool) -> None:
        """Power-on or INIT state (SDM 9.1.1, Table 9-1)."""
        st = ArchState()
        st.cs = Segment(0xF000, 0xFFFF0000, 0xFFFF, (1 << 15) | (1 << 12) | (0xB << 8))
        self.ctx.set_state(st)
        self.ctx.set_gprs([0] * 16)
        self.ctx.set_gpr(2, self.cpuid[(1, 0)][0])   # EDX = CPUID.1:EAX (family/model/stepping)
        self.ctx.set_reg(DREGS[4], 0xFFFF0FF0)
        self.ctx.set_reg(DREGS[5], 0x400)
        self.ctx.set_cpu_msr(M.IA32_PAT, msrs.PAT_RESET)
        self.pending_exception = None
        self.ctx.patch_hflags(clear_mask=HF_INHIBIT_IRQ, clear2=HF2_NMI)
        if not init:
            self.lapic.reset(init_event=False)

    def _accept_apic_events(self) -> None:
        """KVM kvm_apic_accept_events: INIT resets the vCPU, SIPI starts a waiting AP."""
        if self.init_pending:
            self.init_pending = False
            self._reset(init=True)
            self.lapic.reset(init_event=True)
            self.nmi_pending = 0
            self.mp_state = U.KVM_MP_STATE_RUNNABLE if self.lapic.is_bsp else U.KVM_MP_STATE_INIT_RECEIVED
        if self.sipi_pending is not None:
            vector, self.sipi_pending = self.sipi_pending, None
            if self.mp_state == U.KVM_MP_STATE_INIT_RECEIVED:
                # SDM 9.4.4: the AP starts in real mode at vector << 12
                self.sipi_vector = vector
                st = self.ctx.get_state()
                st.cs = real_mode_segment(vector << 8, code=True)
                st.rip = 0
                self.ctx.set_state(st)
                self.mp_state = U.KVM_MP_STATE_RUNNABLE

    # ---- KVM_RUN -----------------------------------------------------------------------

    def run(self) -> Exit:
        """KVM_RUN: run until an exit userspace must handle; KVM_EXIT_INTR ends a time slice."""
        self.has_run = True
        self.idle_slice = True
        if self._host_writes != self.vm.host_writes:
            self._host_writes = self.vm.host_writes
            self.ctx.flush_code()
        if self._completion is not None:
            self._complete_userspace()
        if REQ_GET_NESTED_STATE_PAGES in self.requests:
            self.requests.discard(REQ_GET_NESTED_STATE_PAGES)
            if self.nested is not None and not self.nested.get_nested_state_pages():
                # KVM vcpu_enter_guest: get_nested_state_pages failed
                return Exit(U.KVM_EXIT_INTERNAL_ERROR, internal=InternalError(
                    U.KVM_INTERNAL_ERROR_EMULATION, "a page vmcs12/vmcb12 uses is not in guest memory "
                    "(get_nested_state_pages after KVM_SET_NESTED_STATE)"))
        while True:
            ex = self._step()
            if ex is not None:
                self.stats[_EXIT_NAMES.get(ex.reason) or ex.name] += 1
                if ex.reason not in (U.KVM_EXIT_INTR, U.KVM_EXIT_HLT):
                    self.idle_slice = False
                return ex

    def _step(self) -> Exit | None:
        if self._vmx_abort:
            self._vmx_abort = False
            return Exit(U.KVM_EXIT_SHUTDOWN, extra={"vmx_abort": True})
        self._accept_apic_events()
        if self.mp_state != U.KVM_MP_STATE_RUNNABLE:
            return self._idle()
        self.lapic.update_timer(self.clock)
        if self.clock >= self.run_until:
            # the slice is over: events are taken when the next one starts (a nested entry
            # still pending its event is KVM's nested_run_pending, KVM_STATE_NESTED_RUN_PENDING)
            return Exit(U.KVM_EXIT_INTR)
        ex = self._inject_events()
        if ex is not None:
            return ex
        if self.mp_state != U.KVM_MP_STATE_RUNNABLE:
            return None
        nested = self.nested
        if nested is not None and nested.guest_mode and (
                (nested.intr_window_exiting() or nested.virq_pending())
                and self.ctx.rflags & RFLAGS_IF and self.ctx.hflags() & HF_INHIBIT_IRQ
                or nested.nmi_window_exiting() and (self.ctx.hflags() & HF_INHIBIT_IRQ or self.ctx.hflags2() & HF2_NMI)):
            # SDM 26.7.5, 26.7.6: the window opens after the one instruction the STI/MOV SS
            # shadow covers, or (NMI window) after the IRET that ends virtual-NMI blocking
            return self._step_one()
        limit = self.run_until
        deadline = self.next_deadline()
        if deadline is not None and deadline < limit:
            limit = deadline
        budget = max(1, limit - self.clock)
        self.idle_slice = False
        ctx = self.ctx
        t = ctx.trap
        native = self._native_nmis()
        irq = self._interrupt_pending()
        # the run's switches, written to the hooks only when they change
        flags = (ctx, native, len(self.vm.vcpus) > 1 and self._outside_guest(),
                 bool(irq or self._sti_watch_nested()))
        if flags != self._run_flags:
            self._run_flags = flags
            _, t.nmi_native, t.pause_yield, t.sti_watch = flags
        nmi_first = None   # CR2, when the run's first block is to take an NMI
        if native and self._nmi_pending:
            t.nmi_pending, self._nmi_pending = self._nmi_pending, 0
            if not ctx.hflags2() & HF2_NMI and not ctx.hflags() & HF_INHIBIT_IRQ:
                nmi_first = ctx.reg_cr(2)
        if irq or self._nmi_pending:
            budget = min(budget, WINDOW_SLICE)
        hard = TOP
        if nested is not None and nested.preemption_deadline is not None and nested.preemption_deadline > self.clock:
            # SDM 26.5.1.3: the timer's VM exit comes before any instruction retires after it reaches 0
            hard = nested.preemption_deadline - self.clock
        self._load_tsc()
        self._load_lapic()
        self._running = True
        try:
            stop = ctx.run(budget, hard)
        finally:
            self._running = False
            self.clock += ctx.retired
            if t.attention:
                self._collect(t)
        if t.inject:
            return self._inject_refused()
        if nmi_first is not None and stop == Stop.EXCEPTION and not ctx.retired and self._nmi_pending \
                and not ctx.hflags2() & HF2_NMI:
            return self._nmi_refused(nmi_first)
        return self._handle_stop(stop)

    def _collect(self, t: N.NvTrap) -> None:
        """What the run's hooks left for Python: NMIs taken or still pending, ICR writes."""
        if t.nmi_taken:
            self.stats["deliver_2"] += t.nmi_taken
            t.nmi_taken = 0
        if t.nmi_pending:
            self._nmi_pending += t.nmi_pending
            t.nmi_pending = 0
        self._sync_icr()
        if t.icr_fast:
            self.stats["WRMSR"] += t.icr_fast
            t.icr_fast = 0
        t.attention = 0

    def _nmi_refused(self, cr2: int) -> Exit | None:
        """As _inject_refused, for an NMI the hook was to take at the run's first block."""
        self.ctx.exception = None
        self.ctx.set_reg_cr(2, cr2)
        self._nmi_pending -= 1
        ex = self._deliver_emulated(2, EventKind.NMI, None)
        self.ctx.patch_hflags(set2=HF2_NMI)   # SDM 6.7.1
        return ex

    def _inject_refused(self) -> Exit | None:
        """The run meant to take an event faulted fetching its first instruction before the
        hook could deliver it: that fault comes after the event (SDM 6.9), so the fault is
        dropped (CR2 restored) and the event delivered in Python; the fetch faults again
        when the handler returns."""
        assert self._injecting is not None
        vector, kind, cr2 = self._injecting
        self.ctx.trap.inject = 0
        self.ctx.exception = None
        self.ctx.set_reg_cr(2, cr2)
        return self._deliver_emulated(vector, kind, None)

    def _idle(self) -> Exit | None:
        """Halted or waiting for SIPI: let virtual time pass until something can wake us."""
        self.lapic.update_timer(self.clock)
        if self.mp_state == U.KVM_MP_STATE_HALTED and self._wake_event():
            nested = self.nested
            # an event L1 intercepts exits with L2 still halted: vmcs12 records activity HLT
            if nested is None or not nested.guest_mode or not self._nested_events(nested):
                self.mp_state = U.KVM_MP_STATE_RUNNABLE
            return None
        deadline = self.next_deadline()
        if deadline is not None and deadline <= self.run_until:
            self.clock = max(self.clock, deadline)
            return None
        if self.clock < self.run_until and self.run_until < INFINITY:
            self.clock = self.run_until
        if deadline is not None:
            return Exit(U.KVM_EXIT_INTR)
        return Exit(U.KVM_EXIT_HLT)

    def _interrupt_pending(self) -> bool:
        return bool(self.ext_interrupts) or self.lapic.pending_vector() is not None

    def _wake_event(self) -> bool:
        """KVM kvm_arch_vcpu_runnable: an NMI, or an interrupt that RFLAGS.IF allows (or that
        exits from L2 to L1 whatever L2's RFLAGS.IF)."""
        if self.nmi_pending or self.init_pending or self.sipi_pending is not None:
            return True
        nested = self.nested
        if nested is not None and nested.guest_mode and (
                nested.preemption_timer_expired() or (nested.exits_on_intr() and self._interrupt_pending())):
            return True
        return self._interrupt_pending() and bool(self.ctx.rflags & RFLAGS_IF)

    def _event_waiting(self) -> bool:
        return bool(self.nmi_pending) or self._interrupt_pending()

    def _inject_events(self) -> Exit | None:
        """KVM kvm_check_and_inject_events: exception, then NMI, then interrupt."""
        if self._vmcs_event is not None:
            vector, kind, ec, n = self._vmcs_event
            self._vmcs_event = None
            if kind == EventKind.NMI:
                self.ctx.patch_hflags(set2=HF2_NMI)
            return self._deliver_then_nested_events(vector, kind, ec, n)
        nested = self.nested
        if nested is not None and nested.guest_mode and self._nested_events(nested):
            return None
        if self.pending_exception is not None:
            vector, ec = self.pending_exception
            self.pending_exception = None
            payload, self.exception_payload = self.exception_payload, None
            return self._deliver_then_nested_events(vector, EventKind.HARDWARE_EXCEPTION, ec, cr2=payload)
        if isinstance(nested, NestedSvm) and nested.guest_mode and self.ctx.rflags & RFLAGS_IF \
                and not self.ctx.hflags() & HF_INHIBIT_IRQ and nested.gif:
            vector = nested.virtual_interrupt()   # APM 15.21.4: V_IRQ from vmcb12
            if vector is not None:
                return self._deliver(vector, EventKind.EXTERNAL_INTERRUPT, None)
        if not self.nmi_pending and not self._interrupt_pending():
            return None
        if nested is not None and not nested.gif:
            return None   # APM 15.17: GIF = 0 holds interrupts and NMIs
        hf = self.ctx.hflags()
        if hf & HF_INHIBIT_IRQ:
            return None
        if self.nmi_pending and not self.ctx.hflags2() & HF2_NMI:
            if self._native_nmis():
                return None   # the run's first block takes it (nv_block_hook), before any interrupt
            self.nmi_pending -= 1
            ex = self._deliver(2, EventKind.NMI, None)
            # SDM 6.7.1: NMIs are blocked until the next IRET (which clears this natively)
            self.ctx.patch_hflags(set2=HF2_NMI)
            return ex
        # APM 15.21.1: under V_INTR_MASKING L1's RFLAGS.IF masks physical interrupts in L2 too
        if self.ctx.rflags & RFLAGS_IF and (nested is None or not nested.guest_mode or nested.physical_if()):
            if self.ext_interrupts:
                vector = self.ext_interrupts.pop(0)
            else:
                vector = self.lapic.pending_vector()
                if vector is None:
                    return None
                self.lapic.ack_interrupt(vector)
            return self._deliver(vector, EventKind.EXTERNAL_INTERRUPT, None)
        return None

    def _deliver_then_nested_events(self, vector: int, kind: EventKind, error_code: int | None,
                                    insn_len: int = 0, cr2: int | None = None) -> Exit | None:
        """Deliver an event; in L2, an exit L1 wants may already be due at the handler's first
        instruction (an interrupt window, a preemption timer of 0)."""
        ex = self._deliver(vector, kind, error_code, insn_len, cr2=cr2)
        nested = self.nested
        if ex is None and nested is not None and nested.guest_mode:
            self._nested_events(nested)
        return ex

    def _nested_events(self, nested: NestedVmx) -> bool:
        """KVM vmx_check_nested_events: an event L1 intercepts becomes a nested VM exit
        (exception, preemption timer, NMI, external interrupt, interrupt window, in order)."""
        e: ExitInfo | None = None
        if self.pending_exception is not None:
            vector, ec = self.pending_exception
            e = nested.exception_exit(vector, ec, self.exception_payload)
            if e is not None:
                self.pending_exception = None
                self.exception_payload = None
        elif nested.preemption_timer_expired():
            e = nested.event_exit("PREEMPTION_TIMER")   # SDM 26.5.1: below exceptions, above NMIs and interrupts
        elif not nested.gif:
            pass   # APM 15.17: GIF = 0 holds interrupts and NMIs, intercepted or not
        elif self.nmi_pending and nested.exits_on_nmi():
            # KVM vmx_nmi_blocked / svm_nmi_blocked: an NMI L1 intercepts is never blocked in L2
            if nested.nmi_exit_delivers:
                self.nmi_pending -= 1
            e = nested.event_exit("NMI")
        elif nested.nmi_window_exiting() and not self.ctx.hflags2() & HF2_NMI \
                and not self.ctx.hflags() & HF_INHIBIT_IRQ:
            e = nested.event_exit("NMI_WINDOW")   # SDM 26.7.6: no virtual-NMI and no MOV SS/STI blocking
        elif nested.exits_on_intr() and self._interrupt_pending() and nested.physical_if():
            vector = None
            if nested.ack_intr_on_exit():
                # SDM 28.2.1: "acknowledge interrupt on exit" takes the vector into the exit information
                if self.ext_interrupts:
                    vector = self.ext_interrupts.pop(0)
                else:
                    vector = self.lapic.pending_vector() or 0
                    self.lapic.ack_interrupt(vector)
            e = nested.event_exit("INTR", vector)
        elif nested.intr_window_exiting() and self.ctx.rflags & RFLAGS_IF and not self.ctx.hflags() & HF_INHIBIT_IRQ:
            e = nested.event_exit("INTR_WINDOW")
        if e is None:
            return False
        nested.vmexit(e)
        if self.mp_state == U.KVM_MP_STATE_HALTED:
            self.mp_state = U.KVM_MP_STATE_RUNNABLE
        return True

    def _deliver(self, vector: int, kind: EventKind, error_code: int | None, insn_len: int = 0,
                 cr2: int | None = None) -> Exit | None:
        if kind in _NATIVE_KINDS and self._outside_guest():
            # an NMI or interrupt outside guest mode: the CPU model delivers it at the first
            # block of the run _step starts next (nv_block_hook; what an interrupt costs
            # decides how fast IPIs go); a fault while delivering ends that run
            self.ctx.trap.inject = vector + 1
            self._injecting = (vector, kind, self.ctx.reg_cr(2))
            self.stats[f"deliver_{vector}"] += 1
            if self.mp_state == U.KVM_MP_STATE_HALTED:
                self.mp_state = U.KVM_MP_STATE_RUNNABLE
            return None
        return self._deliver_emulated(vector, kind, error_code, insn_len, cr2)

    def _deliver_emulated(self, vector: int, kind: EventKind, error_code: int | None, insn_len: int = 0,
                          cr2: int | None = None) -> Exit | None:
        """Deliver an event through the IVT/IDT in Python (delivery.py): exceptions, software
        interrupts, event injection, and anything in guest mode."""
        st = self.ctx.get_state()
        if cr2 is not None:
            st.cr2 = cr2   # SDM 4.7: #PF loads CR2 with the faulting linear address
        try:
            mem = self.vm.phys if self.ctx.tdp is None else self.linear(st)
            new = deliver_with_escalation(st, mem, vector, kind, error_code, insn_len)
        except TdpFault as f:
            # delivery in L2 touched memory L1's EPT/NPT refuses (the IDT, the stack): exit to L1
            self._tdp_exit(f)
            return None
        except DeliveryUnsupported as e:
            return Exit(U.KVM_EXIT_INTERNAL_ERROR, internal=InternalError(U.KVM_INTERNAL_ERROR_DELIVERY_EV, str(e)))
        if isinstance(new, TripleFault):
            nested = self.nested
            if nested is not None and nested.guest_mode:
                nested.vmexit(nested.event_exit("TRIPLE_FAULT"))   # a triple fault in L2 always exits to L1
                return None
            # SDM 6.15: shutdown; KVM reports it as KVM_EXIT_SHUTDOWN
            self.stats["triple_fault"] += 1
            return Exit(U.KVM_EXIT_SHUTDOWN, extra={"vectors": new.vectors})
        self.stats[f"deliver_{vector}"] += 1
        self.ctx.set_state(new)
        self.ctx.patch_hflags(clear_mask=HF_INHIBIT_IRQ)
        if self.mp_state == U.KVM_MP_STATE_HALTED:
            self.mp_state = U.KVM_MP_STATE_RUNNABLE
        return None

    def _pause_exit(self) -> Exit | None:
        """Pause-loop exit: the spinning vCPU gives up the rest of its slice; its time still
        passes (KVM handle_pause -> kvm_vcpu_on_spin), up to the next timer."""
        deadline = self.next_deadline()
        if deadline is not None and deadline < self.run_until:
            self.clock = max(self.clock, deadline)   # the timer fires within this slice
            return None
        self.clock = max(self.clock, self.run_until)
        self.idle_slice = True
        return Exit(U.KVM_EXIT_INTR)

    def _handle_stop(self, stop: Stop) -> Exit | None:
        if stop == Stop.PAUSE:
            self.stats["PAUSE"] += 1
            return self._pause_exit()
        if stop == Stop.BUDGET:
            return None
        if stop == Stop.TRAP:
            nested = self.nested
            if nested is not None and nested.pending is not None:
                e, nested.pending = nested.pending, None
                nested.vmexit(e)
                return None
            if self._pause_yield:
                self._pause_yield = False
                return self._pause_exit()
            insn, self._outside = self._outside, None
            if insn is None:
                return None
            self.stats[insn.op.name] += 1
            ctx = self.ctx
            # it retires here, one tick of the instruction clock, before what its emulation runs
            self.clock += 1
            try:
                ex = self._emulate_outside(insn)
            except GuestFault as f:
                self.clock -= 1   # a fault: it did not retire
                self._queue_fault(f)
                return None
            # the emulated instruction retired, which ends an STI/MOV SS shadow (SDM 6.8.3);
            # a VM entry or exit loaded a new shadow state into another context
            if insn.op != Op.STI and self.ctx is ctx and self.ctx.hflags() & HF_INHIBIT_IRQ:
                self.ctx.patch_hflags(clear_mask=HF_INHIBIT_IRQ)
            return ex
        if stop == Stop.EXCEPTION:
            return self._handle_exception()
        if stop == Stop.UNMAPPED:
            return self._mmio_exit()
        if stop == Stop.TDP:
            return self._tdp_exit(self.ctx.tlb_fault)
        # a HLT the site scan missed ran natively; RIP is already past it
        self.mp_state = U.KVM_MP_STATE_HALTED
        return None

    def _tdp_exit(self, f: TdpFault | None) -> None:
        """An L2 access L1's EPT or NPT refused (SDM 29.3.3, APM 15.25.6): a nested exit,
        exact to the byte where the instruction tells the address."""
        nested = self.nested
        assert f is not None and nested is not None and nested.guest_mode
        if f.linear is not None:
            # unicorn asks for the page; the instruction at RIP tells the byte
            exact = self.ctx.access_address(f.linear, fetch=bool(f.access & ACCESS_FETCH))
            if f.translated:
                f.gpa += exact - f.linear
            f.linear = exact
        nested.vmexit(nested.tdp_exit(f))

    def _handle_exception(self) -> Exit | None:
        e = self.ctx.exception
        assert e is not None
        self.stats[f"exception_{e.vector}"] += 1
        if not e.software:
            if e.vector == 6:
                handled, ex = self._ud_instruction()
                if handled:
                    return ex
            self.pending_exception = (e.vector, e.error_code)
            self.exception_payload = e.cr2
            return None
        # The substrate leaves RIP after the instruction: INT3 (CC), INTO (CE) and INT1 (F1) are
        # one byte and raise vectors 3, 4 and 1; anything else is INT n (CD ib, two bytes).
        last = self.ctx.read_code(e.next_rip - 1, 1)
        op = last[0] if last and _ONE_BYTE_INT.get(last[0]) == e.vector else 0xCD
        rip = e.next_rip - (1 if op != 0xCD else 2)
        self.ctx.rip = rip
        # SDM 6.4.2 / INT n pseudocode: INT3 and INTO are software exceptions, INT1 privileged
        kind = {0xCC: EventKind.SOFTWARE_EXCEPTION, 0xCE: EventKind.SOFTWARE_EXCEPTION,
                0xF1: EventKind.PRIVILEGED_SOFTWARE_EXCEPTION}.get(op, EventKind.SOFTWARE_INTERRUPT)
        nested = self.nested
        if nested is not None and nested.guest_mode and kind != EventKind.SOFTWARE_INTERRUPT:
            # SDM 25.2: INT3, INTO and INT1 are exceptions for the exception bitmap (INT n is not)
            exit_info = nested.exception_exit(e.vector, None, None, privileged=op == 0xF1)
            if exit_info is not None:
                exit_info.insn_len = max(0, e.next_rip - rip)
                nested.vmexit(exit_info)
                return None
        return self._deliver(e.vector, kind, None, max(0, e.next_rip - rip))

    def _ud_instruction(self) -> tuple[bool, Exit | None]:
        """#UD from an instruction the substrate lacks: VMX instructions (nested VMX, or an exit
        to L1 from L2) and VMCALL/VMMCALL hypercalls."""
        nested = self.nested
        if nested is not None:
            code = self.ctx.read_code(self.ctx.rip, 15)
            insn = decode(code, self.ctx.code_bits())
            if insn is not None and insn.op in VMX_OPS:
                if nested.guest_mode:
                    nested.vmexit(nested.insn_exit(insn))
                    return True, None
                if insn.op != Op.VMCALL:
                    self.clock += 1   # it retires: one tick of the instruction clock
                    try:
                        nested.emulate(insn)
                    except GuestFault as f:
                        self.clock -= 1
                        self._queue_fault(f)
                    return True, None
            elif isinstance(nested, NestedSvm) and nested.guest_mode and insn is not None \
                    and insn.op == Op.RSM and nested.wants_insn(insn):
                nested.vmexit(nested.insn_exit(insn))   # APM 15.9: the RSM intercept comes before its #UD
                return True, None
            elif nested.guest_mode:
                return False, None   # e.g. VMMCALL on an Intel CPU: L2's #UD, which L1 may intercept
        return self._hypercall(), None

    def _hypercall(self) -> bool:
        """#UD from VMCALL/VMMCALL: a KVM hypercall (KVM handle_vmcall / vmmcall_interception)."""
        rip = self.ctx.rip
        if self.ctx.read_code(rip, 3) not in HYPERCALL_OPCODES:
            return False
        hf = self.ctx.hflags()
        emulate_hypercall(self, bool(hf & (1 << 15)), hf & 3)
        self.ctx.rip = rip + 3
        self.clock += 1   # it retired: one tick of the instruction clock
        return True

    def _queue_fault(self, f: GuestFault) -> None:
        self.pending_exception = (f.vector, f.error_code)
        self.exception_payload = getattr(f, "linear", None)

    # ---- traps ---------------------------------------------------------------------------

    def on_trap(self, insn: Insn, rip: int) -> int:
        """Called from the trap hook, inside emulation, at a trapped instruction."""
        if insn.op in VMX_OPS:
            return self._vmx_trap(insn)
        if insn.op in SVM_OPS:
            return self._svm_trap(insn)
        nested = self.nested
        if nested is not None and nested.guest_mode:
            try:
                e = nested.l2_trap(insn, rip)
            except GuestFault as f:
                self._queue_fault(f)
                return N.NV_STOP_BEFORE
            if e is not None:
                nested.pending = e
                return N.NV_STOP_BEFORE
        handler = _IN_HOOK.get(insn.op)
        try:
            if handler is not None:
                action = handler(self, insn, rip)
                if action is not None:
                    self.stats[insn.op.name] += 1
                    return action
            self._outside = insn
            return N.NV_STOP_BEFORE
        except GuestFault as f:
            self._queue_fault(f)
            return N.NV_STOP_BEFORE

    def _vmx_trap(self, insn: Insn) -> int:
        """A VMX instruction at a trap site (VMREAD, VMWRITE and the 0F 01 group; the others
        arrive as #UD, see _ud_instruction)."""
        nested = self.nested
        if nested is None or (insn.op == Op.VMCALL and not nested.guest_mode):
            return N.NV_CONTINUE   # #UD, or a hypercall: the substrate raises #UD for both
        if nested.guest_mode:
            if insn.op in _VMX_IN_HOOK and not nested.l1_wants_vmrw(insn):
                return self._vmx_in_hook(nested, insn)   # VMCS shadowing: no exit
            nested.pending = nested.insn_exit(insn)
            return N.NV_STOP_BEFORE
        if insn.op in _VMX_IN_HOOK:
            return self._vmx_in_hook(nested, insn)
        self._outside = insn
        return N.NV_STOP_BEFORE

    def _svm_trap(self, insn: Insn) -> int:
        """An SVM instruction at its site (0F 01 D8..DF). Without nested SVM, or with EFER.SVME
        clear, the substrate's #UD stands; VMMCALL in L1 is a hypercall (the #UD path)."""
        nested = self.nested
        if not isinstance(nested, NestedSvm) or insn.op == Op.VMMCALL and not nested.guest_mode:
            return N.NV_CONTINUE
        if nested.guest_mode:
            if nested.wants_insn(insn):
                nested.pending = nested.insn_exit(insn)
                return N.NV_STOP_BEFORE
            if insn.op in (Op.VMMCALL, Op.VMRUN):
                return N.NV_CONTINUE   # L2's #UD (VMRUN is always intercepted, by the checks)
        elif insn.op in _SVM_IN_HOOK:
            try:
                nested.emulate(insn)   # GIF, or a read of the state and a VMCB write: safe inside the run
            except GuestFault as f:
                self._queue_fault(f)
                return N.NV_STOP_BEFORE
            self.stats[insn.op.name] += 1
            # STGI: GIF may now let a held interrupt or NMI through; the run stops to take it
            return N.NV_HANDLED_STOP if insn.op == Op.STGI and self._event_waiting() else N.NV_HANDLED
        self._outside = insn
        return N.NV_STOP_BEFORE

    def _vmx_in_hook(self, nested: NestedVmx, insn: Insn) -> int:
        try:
            nested.emulate(insn)   # touches a vmcs12 image and GPRs only: safe inside the run
        except GuestFault as f:
            self._queue_fault(f)
            return N.NV_STOP_BEFORE
        return N.NV_HANDLED

    def _cpl(self) -> int:
        return self.ctx.hflags() & 3

    @staticmethod
    def _skip(insn: Insn) -> int:
        return N.NV_SKIP | insn.length   # the hook moves RIP past it

    def _cpuid(self, insn: Insn, rip: int) -> int:
        leaf, sub = self.ctx.read_batch(_RAX_RCX)
        a, b, c, d = self.cpuid_query(leaf & 0xFFFFFFFF, sub & 0xFFFFFFFF)
        self.ctx.write_batch(_RAX_RBX_RCX_RDX, (a, b, c, d))
        return N.NV_SKIP | insn.length

    def cpuid_query(self, leaf: int, sub: int) -> tuple[int, int, int, int]:
        """CPUID as this vCPU answers it (KVM kvm_cpuid), with the per-vCPU dynamic bits."""
        if leaf > (self._cpuid_max_ext if leaf >= 0x80000000 else self._cpuid_max_basic):
            # KVM get_out_of_range_cpuid_entry: Intel answers with the highest basic leaf, AMD with zeros
            if self.cpuid.get((0, 0), (0,))[1:] == F.VENDOR_AMD:
                return (0, 0, 0, 0)
            leaf = self._cpuid_max_basic
        key = (leaf, sub) if (leaf, sub) in self.cpuid else (leaf, 0)
        if key not in self.cpuid or (sub and (leaf, sub) not in self.cpuid and (leaf, 1) in self.cpuid):
            return (0, 0, 0, 0)
        a, b, c, d = self.cpuid[key]
        if leaf == 1:
            b = (b & 0x00FFFFFF) | ((self.vcpu_id & 0xFF) << 24)   # the initial APIC ID
            if self.ctx.reg_cr(4) & CR4_OSXSAVE:
                c |= 1 << 27
            if not self.lapic.hw_enabled:
                d &= ~(1 << 9)   # KVM: CPUID.1:EDX.APIC follows IA32_APIC_BASE.EN
        elif leaf in (0xB, 0x1F):
            d = self.vcpu_id
        return a, b, c, d

    def _rdtsc(self, insn: Insn, rip: int) -> int:
        if self.ctx.reg_cr(4) & CR4_TSD and self._cpl() > 0:
            raise gp()   # SDM RDTSC: #GP(0) if CR4.TSD and CPL > 0
        t = self.tsc()
        if self.nested is not None and self.nested.guest_mode:
            t = (t + self.nested.l2_tsc_offset) & 0xFFFFFFFFFFFFFFFF   # SDM 26.3: TSC offsetting
        if insn.op == Op.RDTSCP:
            self.ctx.set_gpr(1, self.msr_values.get("TSC_AUX", 0))
        elif self.ctx.trap.fast_tsc:
            self.ctx.fast_rdtsc(rip, insn.length)   # the next runs of this site stay in C
        self.ctx.write_batch(_RAX_RDX, (t & 0xFFFFFFFF, t >> 32))
        return N.NV_SKIP | insn.length

    def _rdmsr(self, insn: Insn, rip: int) -> int:
        if self._cpl() > 0:
            raise gp()   # SDM RDMSR: #GP(0) if CPL > 0
        index = self.ctx.gpr(1) & 0xFFFFFFFF
        if A.X2APIC_MSR_BASE <= index <= A.X2APIC_MSR_LAST:
            self._sync_icr()   # an ICR the hook took this run
        value = msrs.get_msr(self, index)
        if index == _X2APIC_TMCCT:
            self.ctx.fast_rdmsr(rip, insn.length)   # a timer poll: the next reads stay in C
        self.ctx.write_batch(_RAX_RDX, (value & 0xFFFFFFFF, value >> 32))
        return N.NV_SKIP | insn.length

    def _wrmsr(self, insn: Insn, rip: int) -> int | None:
        if self._cpl() > 0:
            raise gp()   # SDM WRMSR: #GP(0) if CPL > 0
        index, eax, edx = self.ctx.read_batch(_RCX_RAX_RDX)
        index &= 0xFFFFFFFF
        if index in (M.EFER, M.IA32_APIC_BASE):
            return None   # these change hidden state or the memory map: emulated outside the run
        if A.X2APIC_MSR_BASE <= index <= A.X2APIC_MSR_LAST:
            self._sync_icr()   # an ICR the hook took this run
        msrs.set_msr(self, index, (eax & 0xFFFFFFFF) | ((edx & 0xFFFFFFFF) << 32))
        if index == _X2APIC_ICR:
            self.ctx.fast_wrmsr(rip, insn.length)   # an IPI sender: self-NMIs stay in C
        elif index in _TIMER_MSRS:
            self._load_lapic()
        return N.NV_SKIP | insn.length

    def _mov_from_cr(self, insn: Insn, rip: int) -> int:
        if insn.crn not in (0, 2, 3, 4, 8):
            raise ud()   # SDM MOV CR: #UD for CR1, CR5-7, CR9-15
        if self._cpl() > 0:
            raise gp()
        value = self.lapic.get_cr8() if insn.crn == 8 else self.ctx.reg_cr(insn.crn)
        if self.nested is not None and self.nested.guest_mode:
            value = self.nested.cr_read_value(insn.crn, value)   # SDM 26.3: CR read shadows
        bits = 64 if self.ctx.hflags() & (1 << 15) else 32
        self.ctx.set_gpr(insn.reg, value & ((1 << bits) - 1))
        return self._skip(insn)

    def _mov_to_cr(self, insn: Insn, rip: int) -> int | None:
        if insn.crn not in (0, 2, 3, 4, 8):
            raise ud()
        if self._cpl() > 0:
            raise gp()
        long_code = bool(self.ctx.hflags() & (1 << 15))
        value = self.ctx.gpr(insn.reg)
        if not long_code:
            value &= 0xFFFFFFFF
        if insn.crn == 8:
            if value & ~0xF:
                raise gp()   # KVM kvm_set_cr8: bits 63:4 reserved
            nested = self.nested
            if nested is not None and nested.guest_mode and nested.virtual_tpr():
                nested.v_tpr = value   # APM 15.21.1: with V_INTR_MASKING, L2's CR8 is V_TPR
                self.kick()   # APM 15.21.4: a V_IRQ above the new V_TPR is taken next
                return self._skip(insn)
            self.lapic.set_cr8(value)
            self.kick()
            return self._skip(insn)
        if insn.crn == 2:
            self.ctx.set_reg_cr(2, value)
            return self._skip(insn)
        if insn.crn == 3:
            self._check_cr3(value)
            self.ctx.set_reg_cr(3, value & ~(1 << 63))
            self._paging_reloaded()
            return self._skip(insn)
        return None   # CR0/CR4 can change the mode: emulated outside the run

    def _check_cr3(self, value: int) -> None:
        efer = self.ctx.cpu_msr(M.EFER)
        if efer & EFER_LMA:
            # KVM kvm_set_cr3: bits above MAXPHYADDR are reserved (bit 63 is the PCID no-flush bit)
            if (value & ~(1 << 63)) >> self.profile.maxphyaddr:
                raise gp()

    def _mov_dr(self, insn: Insn, rip: int) -> int:
        if self._cpl() > 0:
            raise gp()   # SDM MOV DR: #GP(0) if CPL > 0
        n = insn.crn
        cr4 = self.ctx.reg_cr(4)
        if n in (4, 5):
            if cr4 & CR4_DE:
                raise ud()   # SDM: DR4/DR5 are reserved when CR4.DE = 1
            n += 2
        if n > 7:
            raise ud()
        rid = DREGS[n] if n < 4 else DREGS[4 + (n - 6)]
        if insn.op == Op.MOV_FROM_DR:
            self.ctx.set_gpr(insn.reg, self.ctx.reg(rid))
        else:
            value = self.ctx.gpr(insn.reg)
            if n >= 6 and value >> 32:
                raise gp()   # SDM: #GP(0) writing 1 into bits 63:32 of DR6/DR7
            self.ctx.set_reg(rid, value)
        return self._skip(insn)

    def _invlpg(self, insn: Insn, rip: int) -> int:
        if self._cpl() > 0:
            raise gp()
        self.ctx.flush_tlb()   # our per-page site records follow the mapping; unicorn runs INVLPG itself
        return N.NV_CONTINUE

    def _native(self, insn: Insn, rip: int) -> int:
        return N.NV_CONTINUE

    def _sti(self, insn: Insn, rip: int) -> int | None:
        # With an interrupt waiting (or L1 asking for interrupt-window exits), the window STI
        # opens can be one instruction long (sti; nop; cli): STI is then emulated outside so
        # the event lands right after it.
        if self._sti_watch():
            if not self.ctx.rflags & RFLAGS_IF:   # STI sets a shadow only when IF was 0
                return None
        else:
            self.ctx.passive_sti(rip)   # the hook lets it run natively while nothing waits
        return N.NV_CONTINUE

    def _sti_watch(self) -> bool:
        """Whether an STI must be emulated: an interrupt waits, or L1 wants interrupt-window
        exits from L2."""
        return self._interrupt_pending() or self._sti_watch_nested()

    def _sti_watch_nested(self) -> bool:
        nested = self.nested
        return nested is not None and nested.guest_mode and (nested.intr_window_exiting() or nested.virq_pending())

    def _mov_ss(self, insn: Insn, rip: int) -> int:
        # The substrate keeps one interrupt-shadow flag; where a MOV SS shadow ends is noted
        # so VM entry can tell blocking by MOV SS from blocking by STI (SDM 26.1 / 27.1)
        self._mov_ss_end = rip + insn.length
        return N.NV_CONTINUE

    def mov_ss_blocking(self) -> bool:
        """Blocking by MOV SS (or POP SS) holds at the current instruction."""
        return bool(self.ctx.hflags() & HF_INHIBIT_IRQ) and self._mov_ss_end == self.ctx.rip

    def _pause(self, insn: Insn, rip: int) -> int:
        if len(self.vm.vcpus) == 1:
            # alone on the machine: nobody to yield to, and the run must not depend on where
            # the caller ends its time slices
            return N.NV_CONTINUE
        self._pause_yield = True
        self.ctx.fast_pause(rip, insn.length)   # the next ones stop the run from C
        self.ctx.rip = rip + insn.length
        return N.NV_HANDLED_STOP

    # ---- traps emulated outside the run ------------------------------------------------

    def _emulate_outside(self, insn: Insn) -> Exit | None:
        op = insn.op
        if op == Op.HLT:
            if self._cpl() > 0:
                raise gp()
            self.ctx.rip = self.ctx.rip + insn.length
            if not self._wake_event():
                self.mp_state = U.KVM_MP_STATE_HALTED
            return None
        if op in (Op.IN, Op.OUT, Op.INS, Op.OUTS):
            return self._pio(insn)
        if op == Op.STI:
            return self._emulate_sti(insn)
        if op in VMX_OPS and isinstance(self.nested, NestedVmx) or op in SVM_OPS and isinstance(self.nested, NestedSvm):
            self.nested.emulate(insn)
            return None
        if op == Op.MOV_TO_CR:
            self._set_cr(insn.crn, self._cr_operand(insn))
            self.ctx.rip = self.ctx.rip + insn.length
            return None
        if op == Op.WRMSR:
            if self._cpl() > 0:
                raise gp()
            value = (self.ctx.gpr(0) & 0xFFFFFFFF) | ((self.ctx.gpr(2) & 0xFFFFFFFF) << 32)
            msrs.set_msr(self, self.ctx.gpr(1) & 0xFFFFFFFF, value)
            self.remap_apic()
            self.ctx.rip = self.ctx.rip + insn.length
            return None
        return Exit(U.KVM_EXIT_INTERNAL_ERROR, internal=InternalError(U.KVM_INTERNAL_ERROR_EMULATION, f"no emulation for {op.name}"))

    def _step_one(self) -> Exit | None:
        """Run exactly one instruction; the interrupt shadow ends with it."""
        stop = self.ctx.step()
        self.clock += self.ctx.retired
        if self.ctx.hflags() & HF_INHIBIT_IRQ:
            self.ctx.patch_hflags(clear_mask=HF_INHIBIT_IRQ)
        return self._handle_stop(stop)

    def _emulate_sti(self, insn: Insn) -> Exit | None:
        """SDM STI: IF = 1 with blocking by STI for one instruction; that instruction runs
        here, so a waiting interrupt is taken right after it."""
        st_flags = self.ctx.rflags
        if self.ctx.reg_cr(0) & CR0_PE and not st_flags & RFLAGS_VM and self._cpl() > (st_flags >> 12) & 3:
            raise gp()   # SDM STI: CPL > IOPL (without VME/PVI, which are not advertised)
        self.ctx.rflags = st_flags | RFLAGS_IF
        self.ctx.rip = self.ctx.rip + insn.length
        self.ctx.patch_hflags(set_mask=HF_INHIBIT_IRQ)
        return self._step_one()

    def _cr_operand(self, insn: Insn) -> int:
        value = self.ctx.gpr(insn.reg)
        return value if self.ctx.hflags() & (1 << 15) else value & 0xFFFFFFFF

    def _set_cr(self, crn: int, value: int) -> None:
        """MOV to CR0/CR4 with KVM's checks (kvm_set_cr0, kvm_set_cr4)."""
        st = self.ctx.get_state()
        nested = self.nested
        if nested is not None and nested.guest_mode:
            value = nested.cr_write_value(crn, value, st.cr0 if crn == 0 else st.cr4)
        elif nested is not None and nested.vmxon:
            # SDM 24.8: in VMX operation CR0 and CR4 keep their IA32_VMX_CRx_FIXED bits
            if not (nested.cr0_valid(value) if crn == 0 else nested.cr4_valid(value)):
                raise gp()
        if crn == 0:
            if value >> 32:
                raise gp()
            value = (value | 0x10) & CR0_KNOWN   # ET is hardwired; reserved bits are ignored
            if value & CR0_NW and not value & CR0_CD:
                raise gp()
            if value & CR0_PG and not value & CR0_PE:
                raise gp()
            if value & CR0_PG and not st.cr0 & CR0_PG and st.efer & EFER_LME:
                if not st.cr4 & CR4_PAE or st.cs.l:
                    raise gp()   # SDM 10.8.5: long mode needs PAE, and not from a 64-bit CS
            if not value & CR0_PG and st.cr4 & CR4_PCIDE:
                raise gp()
            st.cr0 = value
            st.efer = (st.efer | EFER_LMA) if (value & CR0_PG and st.efer & EFER_LME) else (st.efer & ~EFER_LMA)
        else:
            self._check_cr4(st, value)
            st.cr4 = value
        self.ctx.set_state(st)
        self._paging_reloaded()

    def _paging_reloaded(self) -> None:
        """MOV to CR0/CR3/CR4: drop cached translations; with PAE paging the PDPTE registers
        are reloaded from memory (SDM 4.4.1), which the walk under EPT then reads."""
        if self.ctx.tdp is not None:
            self.ctx.tdp.pdptes = None
        self.ctx.flush_tlb()

    def cr4_valid(self, value: int) -> bool:
        """KVM kvm_is_valid_cr4: no reserved bit and no bit of a feature the guest lacks (VME
        is never offered)."""
        for bit in range(64):
            if value >> bit & 1:
                feat = _CR4_FEATURE_BITS.get(bit, "vme")
                if feat == "vme" or (feat is not None and not self._feature(feat)):
                    return False
        return True

    def efer_valid(self, value: int) -> bool:
        return msrs.efer_valid(self, value)

    def _check_cr4(self, st: ArchState, value: int) -> None:
        # KVM kvm_set_cr4
        if not self.cr4_valid(value):
            raise gp()
        if st.efer & EFER_LMA:
            if not value & CR4_PAE:
                raise gp()   # SDM: clearing PAE in IA-32e mode
            if (value ^ st.cr4) & CR4_LA57:
                raise gp()
        if value & CR4_PCIDE and not st.cr4 & CR4_PCIDE:
            if not st.efer & EFER_LMA or st.cr3 & 0xFFF:
                raise gp()

    def _feature(self, name: str) -> bool:
        if name not in F.FEATURES:
            return False
        leaf, reg, bit = F.FEATURES[name]
        row = self.cpuid.get((leaf, 0))
        return bool(row and row[F.REG_INDEX[reg]] >> bit & 1)

    def set_efer_host(self, value: int) -> None:
        st = self.ctx.get_state()
        st.efer = value
        self.ctx.set_state(st)

    # ---- port I/O ------------------------------------------------------------------------

    def _pio(self, insn: Insn) -> Exit | None:
        port = insn.port if insn.port is not None else self.ctx.gpr(2) & 0xFFFF
        size = insn.size
        is_in = insn.op in (Op.IN, Op.INS)
        if insn.op in (Op.INS, Op.OUTS):
            if insn.rep and self._rep_count(insn) == 0:
                self.ctx.rip = self.ctx.rip + insn.length
                return None
        if insn.op == Op.OUT:
            data = bytearray((self.ctx.gpr(0) & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
            self.ctx.rip = self.ctx.rip + insn.length
            return Exit(U.KVM_EXIT_IO, io=IoExit(U.KVM_EXIT_IO_OUT, size, port, 1, data))
        if insn.op == Op.OUTS:
            st = self.ctx.get_state()
            seg = (st.es, st.cs, st.ss, st.ds, st.fs, st.gs)[insn.seg]
            mask = (1 << (8 * insn.addr_size)) - 1
            rsi = self.ctx.gpr(6)
            data = bytearray(self.linear(st).read((seg.base + (rsi & mask)) & 0xFFFFFFFFFFFFFFFF, size))
            self._string_advance(insn, 6, rsi, mask)
            return Exit(U.KVM_EXIT_IO, io=IoExit(U.KVM_EXIT_IO_OUT, size, port, 1, data))
        ex = Exit(U.KVM_EXIT_IO, io=IoExit(U.KVM_EXIT_IO_IN, size, port, 1, bytearray(size)))
        self._completion = _Completion("in" if insn.op == Op.IN else "ins", insn, ex)
        assert is_in
        return ex

    def _rep_count(self, insn: Insn) -> int:
        mask = (1 << (8 * insn.addr_size)) - 1
        return self.ctx.gpr(1) & mask

    def _string_advance(self, insn: Insn, reg: int, value: int, mask: int) -> None:
        step = -insn.size if self.ctx.rflags & RFLAGS_DF else insn.size
        self.ctx.set_gpr(reg, (value & ~mask) | ((value + step) & mask))
        if insn.rep:
            rcx = self.ctx.gpr(1)
            left = ((rcx & mask) - 1) & mask
            self.ctx.set_gpr(1, (rcx & ~mask) | left)
            if left:
                return   # the instruction runs again for the next element
        self.ctx.rip = self.ctx.rip + insn.length

    def linear(self, st: ArchState) -> LinearMemory:
        """Guest-linear memory under the paging state `st` (string I/O, VMX operands)."""
        tdp = self.ctx.tdp
        if tdp is None:
            return LinearMemory(self.vm.phys, st, maxphyaddr=self.profile.maxphyaddr)
        return LinearMemory(tdp.data(), st, maxphyaddr=self.profile.maxphyaddr, walk=tdp.walker)

    def _complete_userspace(self) -> None:
        c, self._completion = self._completion, None
        assert c is not None
        if c.kind == "in":
            io = c.exit.io
            value = int.from_bytes(io.data[:io.size], "little")
            if io.size == 4:
                self.ctx.set_gpr(0, value)   # a 32-bit destination zero-extends (SDM 3.4.1.1)
            else:
                mask = (1 << (8 * io.size)) - 1
                self.ctx.set_gpr(0, (self.ctx.gpr(0) & ~mask) | value)
            self.ctx.rip = self.ctx.rip + c.insn.length
        elif c.kind == "ins":
            st = self.ctx.get_state()
            mask = (1 << (8 * c.insn.addr_size)) - 1
            rdi = self.ctx.gpr(7)
            try:
                self.linear(st).write((st.es.base + (rdi & mask)) & 0xFFFFFFFFFFFFFFFF, bytes(c.exit.io.data[:c.insn.size]))
            except GuestFault as f:
                self._queue_fault(f)
                return
            self._string_advance(c.insn, 7, rdi, mask)
        elif c.kind == "mmio":
            self._complete_mmio(c.exit.mmio)

    # ---- MMIO to unbacked guest-physical addresses -------------------------------------

    def _mmio_exit(self) -> Exit:
        u = self.ctx.unmapped
        assert u is not None
        if u.fetch:
            return Exit(U.KVM_EXIT_INTERNAL_ERROR, internal=InternalError(
                U.KVM_INTERNAL_ERROR_EMULATION, f"instruction fetch from unbacked guest-physical {u.gpa:#x}"))
        data = bytearray(u.value.to_bytes(8, "little")[:u.size]) if u.is_write else bytearray(u.size)
        ex = Exit(U.KVM_EXIT_MMIO, mmio=MmioExit(u.gpa, data, u.size, u.is_write))
        self._completion = _Completion("mmio", None, ex)
        return ex

    def _complete_mmio(self, mmio: MmioExit) -> None:
        """Re-execute the access against a scratch page holding what userspace supplied."""
        page = mmio.phys_addr & ~0xFFF
        self.ctx.uc.mem_map(page, 0x1000)
        try:
            if not mmio.is_write:
                self.ctx.uc.mem_write(mmio.phys_addr, bytes(mmio.data[:mmio.len]))
            self._running = True
            try:
                stop = self.ctx.step()
            finally:
                self._running = False
                self.clock += self.ctx.retired
        finally:
            self.ctx.unmap(page, 0x1000)
            self.ctx.flush_tlb()
        self._handle_stop(stop)

    # ---- APIC MMIO --------------------------------------------------------------------

    def remap_apic(self) -> None:
        """Follow IA32_APIC_BASE: the xAPIC page moves with the base address (SDM 11.4.5)."""
        base = self.lapic.base_address
        if base == self._apic_mmio or self.vm.phys.find(base) is not None:
            return
        for ctx in self.contexts():
            ctx.unmap(self._apic_mmio, 0x1000)
            ctx.map_apic(base, self._apic_mmio_read, self._apic_mmio_write)
            ctx.flush_tlb()
        self._apic_mmio = base

    def _apic_mmio_read(self, offset: int, size: int) -> int:
        if not self.lapic.hw_enabled or self.lapic.x2apic_mode:
            return (1 << (8 * size)) - 1   # the xAPIC window is off: unassigned memory
        self._sync_icr()
        return self.lapic.mmio_read(offset, size)

    def _apic_mmio_write(self, offset: int, size: int, value: int) -> None:
        if not self.lapic.hw_enabled or self.lapic.x2apic_mode:
            return
        self._sync_icr()
        self.lapic.mmio_write(offset, size, value)   # it kicks when an event became deliverable
        if self._running:
            self._load_lapic()   # the timer, the ID or the ICR may have changed

    # ---- the per-vCPU ioctls --------------------------------------------------------------

    def get_regs(self) -> Regs:
        """KVM_GET_REGS."""
        g = self.ctx.gprs()
        r = Regs(**{n: g[i] for i, n in enumerate(_GPR_NAMES)})
        r.rip = self.ctx.rip
        r.rflags = self.ctx.rflags
        return r

    def set_regs(self, regs: Regs) -> None:
        """KVM_SET_REGS."""
        self.ctx.set_gprs([getattr(regs, n) for n in _GPR_NAMES])
        self.ctx.rflags = regs.rflags | 2
        self.ctx.rip = regs.rip

    def get_sregs(self) -> Sregs:
        """KVM_GET_SREGS."""
        st = self.ctx.get_state()
        bitmap = [0, 0, 0, 0]
        for v in self.ext_interrupts[:1]:
            bitmap[v // 64] |= 1 << (v % 64)
        return Sregs(
            **{n: KvmSegment.from_segment(getattr(st, n)) for n in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")},
            gdt=KvmDtable(st.gdt.base, st.gdt.limit), idt=KvmDtable(st.idt.base, st.idt.limit),
            cr0=st.cr0, cr2=st.cr2, cr3=st.cr3, cr4=st.cr4, cr8=self.lapic.get_cr8(),
            efer=st.efer | (EFER_SVME if self.nested is not None and self.nested.svme else 0),
            apic_base=self.lapic.get_apic_base(), interrupt_bitmap=tuple(bitmap),
        )

    def set_sregs(self, s: Sregs) -> None:
        """KVM_SET_SREGS, with KVM's kvm_is_valid_sregs checks (EINVAL leaves state unchanged)."""
        if s.cr0 >> 32 or (s.cr0 & CR0_PG and not s.cr0 & CR0_PE) or (s.cr0 & CR0_NW and not s.cr0 & CR0_CD):
            raise einval(f"cr0 {s.cr0:#x} is invalid (kvm_is_valid_cr0)")
        if s.efer & EFER_LMA and not s.efer & EFER_LME:
            raise einval("EFER.LMA without EFER.LME (kvm_is_valid_sregs)")
        if s.cr0 & CR0_PG and s.efer & EFER_LME and not s.cr4 & CR4_PAE:
            raise einval("long mode paging without CR4.PAE (kvm_is_valid_sregs)")
        if bool(s.efer & EFER_LMA) != bool(s.cr0 & CR0_PG and s.efer & EFER_LME):
            raise einval("EFER.LMA must equal CR0.PG && EFER.LME (kvm_is_valid_sregs)")
        if s.cr8 & ~0xF:
            raise einval("cr8 has bits above 3 (kvm_set_cr8)")
        if not self.efer_valid(s.efer):
            raise einval(f"efer {s.efer:#x} has bits this CPU does not support (kvm_valid_efer)")
        st = self.ctx.get_state()
        try:
            self._check_cr4(replace(st, efer=s.efer, cr4=0), s.cr4)
        except GuestFault:
            raise einval(f"cr4 {s.cr4:#x} has bits this CPU does not support (kvm_is_valid_cr4)") from None
        new = replace(
            st, **{n: getattr(s, n).to_segment() for n in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")},
            gdt=DescTable(s.gdt.base, s.gdt.limit), idt=DescTable(s.idt.base, s.idt.limit),
            cr0=s.cr0, cr2=s.cr2, cr3=s.cr3, cr4=s.cr4, efer=s.efer & ~EFER_SVME,
        )
        try:
            self.lapic.set_apic_base(s.apic_base, host_initiated=True)
        except GuestFault:
            raise einval(f"apic_base {s.apic_base:#x} is invalid (kvm_set_apic_base)") from None
        self.remap_apic()
        if self.nested is not None and self.profile.has("svm"):
            self.nested.set_svme(bool(s.efer & EFER_SVME))
        self.ctx.set_state(new)
        self.ctx.flush_tlb()
        self.lapic.set_cr8(s.cr8)
        for i, word in enumerate(s.interrupt_bitmap):
            for b in range(64):
                if word >> b & 1:
                    self.ext_interrupts.append(i * 64 + b)

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """KVM_GET_MSRS: the values of the MSRs that could be read (KVM stops at the first failure)."""
        out: dict[int, int] = {}
        for i in indices:
            try:
                out[i] = msrs.get_msr(self, i)
            except GuestFault:
                break
        return out

    def set_msrs(self, values: dict[int, int]) -> int:
        """KVM_SET_MSRS: host-initiated writes in order; returns how many succeeded."""
        n = 0
        for i, v in values.items():
            try:
                msrs.set_msr(self, i, v, host_initiated=True)
            except GuestFault:
                break
            n += 1
        return n

    def get_vcpu_events(self) -> VcpuEvents:
        """KVM_GET_VCPU_EVENTS."""
        ev = VcpuEvents(flags=U.KVM_VCPUEVENT_VALID_NMI_PENDING | U.KVM_VCPUEVENT_VALID_SHADOW | U.KVM_VCPUEVENT_VALID_SIPI_VECTOR)
        if self.pending_exception is not None:
            ev.exception_pending = 1
            ev.exception_nr, ec = self.pending_exception
            ev.exception_has_error_code = int(ec is not None)
            ev.exception_error_code = ec or 0
        if self.ext_interrupts:
            ev.interrupt_injected = 1
            ev.interrupt_nr = self.ext_interrupts[0]
        ev.interrupt_shadow = U.KVM_X86_SHADOW_INT_STI if self.ctx.hflags() & HF_INHIBIT_IRQ else 0
        ev.nmi_pending = self.nmi_pending
        ev.nmi_masked = int(bool(self.ctx.hflags2() & HF2_NMI))
        ev.sipi_vector = self.sipi_vector
        return ev

    def set_vcpu_events(self, ev: VcpuEvents) -> None:
        """KVM_SET_VCPU_EVENTS (KVM's checks: vectors below 32 for exceptions, no unknown flags)."""
        known = (U.KVM_VCPUEVENT_VALID_NMI_PENDING | U.KVM_VCPUEVENT_VALID_SIPI_VECTOR | U.KVM_VCPUEVENT_VALID_SHADOW
                 | U.KVM_VCPUEVENT_VALID_SMM | U.KVM_VCPUEVENT_VALID_PAYLOAD | U.KVM_VCPUEVENT_VALID_TRIPLE_FAULT)
        if ev.flags & ~known:
            raise einval(f"flags {ev.flags:#x} has unknown bits (kvm_vcpu_ioctl_x86_set_vcpu_events)")
        if (ev.exception_injected or ev.exception_pending) and (ev.exception_nr > 31 or ev.exception_nr in (2,)):
            raise einval(f"exception vector {ev.exception_nr} is not an exception (kvm_vcpu_ioctl_x86_set_vcpu_events)")
        if ev.exception_injected or ev.exception_pending:
            self.pending_exception = (ev.exception_nr, ev.exception_error_code if ev.exception_has_error_code else None)
        else:
            self.pending_exception = None
        self.ext_interrupts = [ev.interrupt_nr] if ev.interrupt_injected else []
        if ev.flags & U.KVM_VCPUEVENT_VALID_NMI_PENDING:
            self.nmi_pending = ev.nmi_pending
        if ev.flags & U.KVM_VCPUEVENT_VALID_SHADOW:
            if ev.interrupt_shadow:
                self.ctx.patch_hflags(set_mask=HF_INHIBIT_IRQ)
            else:
                self.ctx.patch_hflags(clear_mask=HF_INHIBIT_IRQ)
        if ev.nmi_masked:
            self.ctx.patch_hflags(set2=HF2_NMI)
        else:
            self.ctx.patch_hflags(clear2=HF2_NMI)
        if ev.flags & U.KVM_VCPUEVENT_VALID_SIPI_VECTOR:
            self.sipi_vector = ev.sipi_vector

    def get_mp_state(self) -> int:
        """KVM_GET_MP_STATE."""
        self._accept_apic_events()
        return self.mp_state

    def set_mp_state(self, state: int) -> None:
        """KVM_SET_MP_STATE."""
        valid = (U.KVM_MP_STATE_RUNNABLE, U.KVM_MP_STATE_UNINITIALIZED, U.KVM_MP_STATE_INIT_RECEIVED,
                 U.KVM_MP_STATE_HALTED, U.KVM_MP_STATE_SIPI_RECEIVED)
        if state not in valid:
            raise einval(f"mp_state {state} is not supported on x86 (kvm_arch_vcpu_ioctl_set_mpstate)")
        if state == U.KVM_MP_STATE_SIPI_RECEIVED:
            # KVM: a pending SIPI becomes INIT_RECEIVED plus the SIPI event
            self.mp_state = U.KVM_MP_STATE_INIT_RECEIVED
            self.sipi_pending = self.sipi_vector
            return
        self.mp_state = state

    def set_cpuid2(self, entries: list) -> None:
        """KVM_SET_CPUID2. After the first KVM_RUN only an identical table is accepted (kvm_set_cpuid)."""
        table = {(e.function, e.index): (e.eax, e.ebx, e.ecx, e.edx) for e in entries}
        if (0, 0) not in table:
            raise einval("the table has no leaf 0")
        if self.has_run and table != self.cpuid:
            raise KvmError(errno.EINVAL, "KVM_SET_CPUID2 after KVM_RUN must not change the table (kvm_set_cpuid)")
        self.cpuid = table
        self._cpuid_max_basic = table[(0, 0)][0]
        self._cpuid_max_ext = table.get((0x80000000, 0), (0,))[0]
        self._sync_lapic_caps()
        # KVM: nested VMX follows CPUID.1:ECX.VMX (its CR4_FIXED1 the CR4 features), nested
        # SVM CPUID 0x80000001:ECX.SVM
        self.nested = NestedVmx(self) if self._feature("vmx") else NestedSvm(self) if self._feature("svm") else None

    def _sync_lapic_caps(self) -> None:
        """The APIC follows CPUID (KVM kvm_vcpu_after_set_cpuid): x2APIC, TSC-deadline, MAXPHYADDR."""
        self.lapic.x2apic_supported = self._feature("x2apic")
        self.lapic.tsc_deadline_supported = self._feature("tsc-deadline")
        row = self.cpuid.get((0x80000008, 0))
        if row:
            self.lapic.maxphyaddr = row[0] & 0xFF

    def interrupt(self, vector: int) -> None:
        """Queue an external interrupt (an ExtINT-style line, as KVM_INTERRUPT does for a userspace PIC)."""
        if not 0 <= vector <= 255:
            raise einval(f"vector {vector} is out of range (KVM_INTERRUPT: irq < 256)")
        self.ext_interrupts.append(vector)

    def nmi(self) -> None:
        """KVM_NMI."""
        self.deliver_nmi()

    def entry_event_pending(self) -> bool:
        """The event of the last nested VM entry is not delivered yet (KVM nested_run_pending)."""
        return self._vmcs_event is not None

    def clear_entry_event(self) -> None:
        self._vmcs_event = None

    def get_nested_state(self, buffer_size: int | None = None) -> bytes:
        """KVM_GET_NESTED_STATE: struct kvm_nested_state as KVM lays it out. `buffer_size` is
        the caller's `size` field (None: large enough); when it is smaller than the state,
        KvmError E2BIG, whose `needed` is the size to ask for (KVM writes it back to `size`).

        >>> import nestvisor
        >>> vcpu = nestvisor.Kvm(profile="vmx").create_vm().create_vcpu(0)
        >>> len(vcpu.get_nested_state())   # VMX off: the 128-byte header alone
        128
        """
        if self.nested is None:
            raise einval("this vCPU's profile has neither VMX nor SVM (no nested state ops)")
        r = self.nested.get_state(TOP if buffer_size is None else buffer_size)
        if isinstance(r, int):
            err = KvmError(errno.E2BIG, f"the nested state needs {r} bytes, the buffer has {buffer_size} "
                                        "(kvm_arch_vcpu_ioctl KVM_GET_NESTED_STATE)")
            err.needed = r
            raise err
        return r

    def set_nested_state(self, blob: bytes | bytearray | memoryview) -> None:
        """KVM_SET_NESTED_STATE with every rule KVM applies, in KVM's order and with KVM's
        errno; a rejected blob leaves the vCPU exactly as it was. In guest mode it enters L2
        as a nested VM entry does; the pages hanging off vmcs12/vmcb12 are mapped at the next
        run() unless `vm.nested_pages_at_set`.

        >>> import nestvisor
        >>> vcpu = nestvisor.Kvm(profile="vmx").create_vm().create_vcpu(0)
        >>> vcpu.set_nested_state(b"\\0" * 64)
        Traceback (most recent call last):
        ...
        nestvisor.kvm.errors.KvmError: [EFAULT] the blob has 64 bytes, less than the 128-byte header (kvm_arch_vcpu_ioctl: copy_from_user of the header)
        """
        if self.nested is None:
            raise einval("this vCPU's profile has neither VMX nor SVM (no nested state ops)")
        if len(blob) < NS.HEADER_SIZE:
            raise KvmError(errno.EFAULT, f"the blob has {len(blob)} bytes, less than the 128-byte header "
                                         "(kvm_arch_vcpu_ioctl: copy_from_user of the header)")
        ns = NS.NestedState.decode(blob)
        if ns.size > len(blob):
            raise KvmError(errno.EFAULT, f"size: the header says {ns.size} bytes, the blob has {len(blob)} "
                                         "(copy_from_user in vmx/svm_set_nested_state)")
        bad = NS.first_violation(NS.GENERIC_RULES, ns, NS.VcpuFacts())
        if bad is not None:
            raise KvmError(bad.errno, str(bad))
        self.nested.set_state(ns)

    def get_debugregs(self) -> DebugRegs:
        """KVM_GET_DEBUGREGS."""
        return DebugRegs(tuple(self.ctx.reg(DREGS[i]) for i in range(4)), self.ctx.reg(DREGS[4]), self.ctx.reg(DREGS[5]))

    def set_debugregs(self, d: DebugRegs) -> None:
        """KVM_SET_DEBUGREGS (KVM: EINVAL when DR6 or DR7 has bits 63:32 set, or flags are set)."""
        if d.flags:
            raise einval("flags must be zero (kvm_vcpu_ioctl_x86_set_debugregs)")
        if d.dr6 >> 32 or d.dr7 >> 32:
            raise einval("dr6/dr7 bits 63:32 must be zero (kvm_vcpu_ioctl_x86_set_debugregs)")
        for i in range(4):
            self.ctx.set_reg(DREGS[i], d.db[i])
        self.ctx.set_reg(DREGS[4], d.dr6)
        self.ctx.set_reg(DREGS[5], d.dr7)

    # ---- whole-vCPU state: LAPIC, XSAVE, XCRS, complete I/O, save_state / load_state ---------

    def get_lapic(self) -> bytes:
        """KVM_GET_LAPIC: struct kvm_lapic_state, the 1 KiB APIC register page (TMCCT holds
        the current count, the x2APIC ID is 32 bits wide: KVM_X2APIC_API_USE_32BIT_IDS).

        >>> import nestvisor
        >>> vcpu = nestvisor.Kvm().create_vm().create_vcpu(0)
        >>> len(vcpu.get_lapic())
        1024
        """
        return self.lapic.snapshot().regs

    def set_lapic(self, state: bytes | bytearray | LapicState) -> None:
        """KVM_SET_LAPIC; IA32_APIC_BASE must be set first (KVM: SREGS/MSRS before LAPIC).
        Bare bytes restart the timer from TMCCT as KVM does; a LapicState (what save_state
        keeps) resumes it exactly where it stood.

        >>> import nestvisor
        >>> vcpu = nestvisor.Kvm().create_vm().create_vcpu(0)
        >>> vcpu.set_lapic(vcpu.get_lapic())
        """
        regs = state.regs if isinstance(state, LapicState) else bytes(state)
        if len(regs) != A.KVM_APIC_REG_SIZE:
            raise einval(f"kvm_lapic_state is {A.KVM_APIC_REG_SIZE} bytes, not {len(regs)} (struct kvm_lapic_state)")
        if self.lapic.x2apic_mode and int.from_bytes(regs[A.APIC_ID:A.APIC_ID + 4], "little") != self.lapic.x2apic_id:
            raise einval("in x2APIC mode the APIC ID must be the vCPU's x2APIC ID (kvm_apic_state_fixup)")
        self.lapic.restore(state if isinstance(state, LapicState) else regs)

    def get_xsave(self) -> bytes:
        """KVM_GET_XSAVE: struct kvm_xsave, 4096 bytes: the FXSAVE legacy region (x87, MXCSR,
        XMM0-15) and the XSAVE header (kvm/xsave.py).

        >>> import nestvisor
        >>> vcpu = nestvisor.Kvm().create_vm().create_vcpu(0)
        >>> len(vcpu.get_xsave())
        4096
        """
        return XS.encode(fpu.read_fxsave(self.ctx))

    def set_xsave(self, blob: bytes | bytearray | memoryview) -> None:
        """KVM_SET_XSAVE, EINVAL on a header or MXCSR KVM refuses (copy_uabi_to_xstate).

        >>> import nestvisor
        >>> vcpu = nestvisor.Kvm().create_vm().create_vcpu(0)
        >>> vcpu.set_xsave(vcpu.get_xsave())
        """
        fpu.write_fxsave(self.ctx, XS.decode(blob, XS.supported_xcr0(self.cpuid)))

    def get_xcrs(self) -> XS.Xcrs:
        """KVM_GET_XCRS: XCR0 only, as in KVM.

        >>> import nestvisor
        >>> nestvisor.Kvm().create_vm().create_vcpu(0).get_xcrs().xcrs[0] & 1
        1
        """
        return XS.Xcrs({XS.XCR_XFEATURE_ENABLED_MASK: fpu.read_xcr0(self.ctx)})

    def set_xcrs(self, xcrs: XS.Xcrs) -> None:
        """KVM_SET_XCRS with __kvm_set_xcr's rules (EINVAL).

        >>> import nestvisor
        >>> from nestvisor.kvm.xsave import Xcrs
        >>> nestvisor.Kvm().create_vm().create_vcpu(0).set_xcrs(Xcrs({0: 2}))
        Traceback (most recent call last):
        ...
        nestvisor.kvm.errors.KvmError: [EINVAL] xcr0 0x2: bit 0 (x87) must be set (__kvm_set_xcr)
        """
        xcr0 = XS.check_xcrs(xcrs, XS.supported_xcr0(self.cpuid))
        if xcr0 is not None:
            fpu.write_xcr0(self.ctx, xcr0)

    def complete_io(self) -> None:
        """KVM_RUN with immediate_exit = 1 after an I/O or MMIO exit: finish the instruction
        with the data userspace supplied and run nothing more (the selftests'
        vcpu_run_complete_io, the first step of vcpu_save_state)."""
        if self._completion is not None:
            self._complete_userspace()

    def save_state(self) -> VcpuState:
        """KVM's save order: complete pending I/O, VCPU_EVENTS, MP_STATE, REGS, XSAVE, XCRS,
        SREGS, NESTED_STATE (with nested VMX/SVM), MSRS (KVM_GET_MSR_INDEX_LIST), DEBUGREGS,
        then LAPIC and nestvisor's engine state (clock, queued events, L1's context while L2
        runs). kvm/snapshot.py says why each piece is there.

        >>> import nestvisor
        >>> vcpu = nestvisor.Kvm().create_vm().create_vcpu(0)
        >>> state = vcpu.save_state()
        >>> fresh = nestvisor.Kvm().create_vm().create_vcpu(0)
        >>> fresh.load_state(state)
        >>> fresh.get_regs() == vcpu.get_regs()
        True
        """
        from .snapshot import save_vcpu
        return save_vcpu(self)

    def load_state(self, state: VcpuState) -> None:
        """KVM's load order: SREGS, MSRS, (LAPIC), XCRS, XSAVE, VCPU_EVENTS, MP_STATE,
        DEBUGREGS, REGS, NESTED_STATE last, because KVM_SET_NESTED_STATE checks the blob
        against the vCPU as loaded: EFER.SVME must be set for SVM guest mode, SMM state
        (from VCPU_EVENTS) must be known, L1's EFER.LMA decides the vmcs12 host-state checks.
        The engine clock is loaded before all of them (the TSC and the timers are relative
        to it). A piece KVM refuses raises KvmError with KVM's errno. Example: save_state."""
        from .snapshot import load_vcpu
        load_vcpu(self, state)


_RAX_RCX = (GPRS[0], GPRS[1])
_RCX_RAX_RDX = (GPRS[1], GPRS[0], GPRS[2])
_RAX_RDX = (GPRS[0], GPRS[2])
_RAX_RBX_RCX_RDX = (GPRS[0], GPRS[3], GPRS[1], GPRS[2])

# one-byte software exceptions and their vectors: INT3, INTO, INT1
_ONE_BYTE_INT = {0xCC: 3, 0xCE: 4, 0xF1: 1}
_EXIT_NAMES = U.EXIT_NAMES
_X2APIC_TMCCT = A.X2APIC_MSR_BASE + (A.APIC_TMCCT >> 4)   # SDM 11.12.1.2
_X2APIC_ICR = A.X2APIC_MSR_BASE + (A.APIC_ICR >> 4)
# the MSRs whose writes move the timer (the hooks' LAPIC answers reload)
_TIMER_MSRS = frozenset([A.X2APIC_MSR_BASE + (r >> 4) for r in (A.APIC_LVTT, A.APIC_TMICT, A.APIC_TDCR)]
                        + [M.IA32_TSC, M.IA32_TSC_ADJUST, M.IA32_TSC_DEADLINE])
# events the CPU model can deliver itself (ExecContext.deliver_interrupt): no error code, no
# instruction length, nothing of VMX/SVM event injection
_NATIVE_KINDS = frozenset((EventKind.NMI, EventKind.EXTERNAL_INTERRUPT))

# VMX instructions emulated inside the run (no context switch, no guest-physical writes)
_VMX_IN_HOOK = frozenset((Op.VMREAD, Op.VMWRITE))
# SVM instructions of L1 emulated inside the run: they change no segment or paging state
# (VMLOAD and VMRUN do, and stop the run)
_SVM_IN_HOOK = frozenset((Op.CLGI, Op.STGI, Op.VMSAVE))

# VM-entry interruption types (SDM 25.8.3) as delivery kinds
_VMCS_EVENT_KIND = {0: EventKind.EXTERNAL_INTERRUPT, 2: EventKind.NMI, 3: EventKind.HARDWARE_EXCEPTION,
                    4: EventKind.SOFTWARE_INTERRUPT, 5: EventKind.PRIVILEGED_SOFTWARE_EXCEPTION,
                    6: EventKind.SOFTWARE_EXCEPTION}

# Traps handled inside emulation (fast); the rest stop the run and are emulated outside.
_IN_HOOK = {
    Op.CPUID: Vcpu._cpuid,
    Op.RDTSC: Vcpu._rdtsc,
    Op.RDTSCP: Vcpu._rdtsc,
    Op.RDMSR: Vcpu._rdmsr,
    Op.WRMSR: Vcpu._wrmsr,
    Op.MOV_FROM_CR: Vcpu._mov_from_cr,
    Op.MOV_TO_CR: Vcpu._mov_to_cr,
    Op.MOV_FROM_DR: Vcpu._mov_dr,
    Op.MOV_TO_DR: Vcpu._mov_dr,
    Op.INVLPG: Vcpu._invlpg,
    Op.PAUSE: Vcpu._pause,
    Op.STI: Vcpu._sti,
    Op.MOV_SS: Vcpu._mov_ss,
    Op.CLTS: Vcpu._native,
    Op.LMSW: Vcpu._native,
    Op.XSETBV: Vcpu._native,
    Op.INVD: Vcpu._native,     # KVM emulates INVD as WBINVD: a no-op here (no caches)
    Op.WBINVD: Vcpu._native,
}
