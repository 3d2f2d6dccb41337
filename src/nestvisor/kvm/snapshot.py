"""A vCPU's and a VM's state as data: what KVM's ioctls give, in KVM's save and load order,
plus the little engine state nestvisor's determinism needs.

The order is KVM's selftests' (tools/testing/selftests/kvm/lib/x86/processor.c):

* vcpu_save_state: complete pending I/O, VCPU_EVENTS, MP_STATE, REGS, XSAVE, XCRS, SREGS,
  NESTED_STATE (with KVM_CAP_NESTED_STATE), MSRS (the KVM_GET_MSR_INDEX_LIST list),
  DEBUGREGS; nestvisor adds LAPIC (QEMU's kvm_get_apic) and its engine state.
* vcpu_load_state: SREGS, MSRS, XCRS, XSAVE, VCPU_EVENTS, MP_STATE, DEBUGREGS, REGS,
  NESTED_STATE. Nested state goes last because KVM_SET_NESTED_STATE judges the blob against
  the vCPU as it is: EFER.SVME (svm_set_nested_state refuses guest mode without it), the
  SMM state from VCPU_EVENTS (vmx/svm_set_nested_state refuse guest mode in SMM), and L1's
  EFER.LMA for the vmcs12 host-state checks (nested_vmx_check_host_state). LAPIC is loaded
  after SREGS and MSRS (IA32_APIC_BASE and the TSC must be in place: kvm_apic_set_state).

In guest mode REGS, SREGS, XSAVE and the MSRs are L2's, as KVM reports them; L1's state
travels inside the nested-state blob (vmcs12 host area, vmcb01 save area).
"""

from __future__ import annotations

import errno
import mmap
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ..arch import msr as M
from ..cpu import fpu
from ..cpu.context import HF2_NMI
from .errors import KvmError, einval
from .lapic import LapicState
from .vcpu import DebugRegs, Regs, Sregs, VcpuEvents
from .xsave import Xcrs

if TYPE_CHECKING:
    from .kvm import Kvm
    from .vcpu import Vcpu
    from .vm import Vm

PAGE = 0x1000
_ZERO_PAGE = bytes(PAGE)
_CHUNK = 0x100000
_ZERO_CHUNK = bytes(_CHUNK)


@dataclass
class LapicTimer:
    """The local APIC's time state beyond the 1 KiB page (see lapic.LapicState): KVM_SET_LAPIC
    restarts the timer from TMCCT, whose resolution is one divided bus tick and which cannot
    say whether a one-shot already fired, so an exact resume needs these."""

    timer_armed: bool | None = None
    timer_remaining_ns: int = 0
    tsc_deadline: int = 0
    esr_pending: int = 0


@dataclass
class L1Context:
    """What nestvisor keeps per execution context but the CPU keeps once for L1 and L2, and
    that neither the nested-state blob nor the nested exit reloads: while L2 runs, L1's
    context still holds its own. The architecture shares x87/SSE, XCR0 and NMI blocking
    between L1 and L2; EFER and PAT without the exit controls that load them are what the
    nested exit code takes from the L1 context. (In guest mode the ioctls report L2's.)"""

    fxsave: bytes
    xcr0: int
    efer: int
    pat: int
    nmi_blocked: bool


@dataclass
class EngineState:
    """nestvisor state that no KVM ioctl carries and that the rest of the run depends on."""

    clock: int   # the instruction clock: TSC, APIC timer and preemption timer derive from it
    ext_interrupts: list[int] = field(default_factory=list)   # KVM_GET_VCPU_EVENTS shows the first only
    exception_payload: int | None = None   # CR2 of a pending #PF (KVM_VCPUEVENT_VALID_PAYLOAD is not offered)
    init_pending: bool = False   # INIT and SIPI latched by the APIC, not yet accepted
    sipi_pending: int | None = None
    mov_ss_end: int = -1         # blocking by MOV SS vs by STI (events only say "a shadow")
    lapic_timer: LapicTimer = field(default_factory=LapicTimer)
    l1: L1Context | None = None  # only while L2 runs


@dataclass
class VcpuState:
    """Everything a migration needs of one vCPU (KVM's kvm_x86_state, plus `lapic` and
    `engine`), in save order."""

    vcpu_id: int
    events: VcpuEvents
    mp_state: int
    regs: Regs
    xsave: bytes
    xcrs: Xcrs
    sregs: Sregs
    nested_state: bytes | None
    msrs: dict[int, int]
    debugregs: DebugRegs
    lapic: bytes
    engine: EngineState


@dataclass
class SlotImage:
    """A memory slot and its contents as runs of non-zero pages (offset, bytes)."""

    slot: int
    guest_phys_addr: int
    memory_size: int
    flags: int
    runs: list[tuple[int, bytes]] = field(default_factory=list)


@dataclass
class VmSnapshot:
    """A whole VM: the CPU profile it was created with, memory, VM-level settings, vCPUs in
    creation order (the APIC bus's delivery order) with their CPUID tables."""

    profile: str
    features: dict[str, bool]
    slots: list[SlotImage]
    vcpus: list[VcpuState]
    cpuid: list[list[tuple[int, int, int, int, int, int]]]
    nested_pages_at_set: bool = False
    svm_state_format: str = "svm"


# ---- one vCPU --------------------------------------------------------------------------------

def save_vcpu(v: Vcpu) -> VcpuState:
    """Vcpu.save_state: KVM's vcpu_save_state order (module docstring)."""
    v.complete_io()
    events = v.get_vcpu_events()
    mp_state = v.get_mp_state()
    regs = v.get_regs()
    xsave = v.get_xsave()
    xcrs = v.get_xcrs()
    sregs = v.get_sregs()
    nested_state = v.get_nested_state() if v.nested is not None else None
    index_list = v.vm.kvm.get_msr_index_list()
    msrs = v.get_msrs(index_list)
    if len(msrs) != len(index_list):
        # KVM selftests assert KVM_GET_MSRS read the whole list
        raise KvmError(errno.EINVAL, f"KVM_GET_MSRS stopped at MSR {index_list[len(msrs)]:#x} of the index list")
    debugregs = v.get_debugregs()
    lapic = v.lapic.snapshot()
    return VcpuState(v.vcpu_id, events, mp_state, regs, xsave, xcrs, sregs, nested_state, msrs, debugregs,
                     lapic.regs, _engine_state(v, lapic))


def _engine_state(v: Vcpu, lapic: LapicState) -> EngineState:
    nested = v.nested
    l1 = None
    if nested is not None and nested.guest_mode:
        ctx = v.ctx01
        l1 = L1Context(fpu.read_fxsave(ctx), fpu.read_xcr0(ctx), ctx.cpu_msr(M.EFER), ctx.cpu_msr(M.IA32_PAT),
                       bool(ctx.hflags2() & HF2_NMI))
    return EngineState(
        clock=v.clock, ext_interrupts=list(v.ext_interrupts), exception_payload=v.exception_payload,
        init_pending=v.init_pending, sipi_pending=v.sipi_pending, mov_ss_end=v._mov_ss_end,
        lapic_timer=LapicTimer(lapic.timer_armed, lapic.timer_remaining_ns, lapic.tsc_deadline, lapic.esr_pending),
        l1=l1,
    )


def load_vcpu(v: Vcpu, s: VcpuState) -> None:
    """Vcpu.load_state: KVM's vcpu_load_state order (module docstring). The clock comes
    first: the TSC (IA32_TSC sets an offset from it), the APIC timer and the preemption
    timer deadline are all loaded relative to it."""
    if s.vcpu_id != v.vcpu_id:
        raise einval(f"the state is vCPU {s.vcpu_id}'s, this is vCPU {v.vcpu_id}")
    if (s.nested_state is None) != (v.nested is None):
        raise einval("the state's nested state does not match this vCPU's profile (KVM_CAP_NESTED_STATE)")
    v.clock = s.engine.clock
    v.set_sregs(s.sregs)
    n = v.set_msrs(s.msrs)
    if n != len(s.msrs):
        # KVM selftests assert KVM_SET_MSRS wrote the whole list
        raise einval(f"KVM_SET_MSRS stopped at MSR {list(s.msrs)[n]:#x} (kvm_set_msr_common refused it)")
    t = s.engine.lapic_timer
    v.set_lapic(LapicState(s.lapic, t.timer_armed, t.timer_remaining_ns, t.tsc_deadline, t.esr_pending))
    v.set_xcrs(s.xcrs)
    v.set_xsave(s.xsave)
    v.set_vcpu_events(s.events)
    v.set_mp_state(s.mp_state)
    v.set_debugregs(s.debugregs)
    v.set_regs(s.regs)
    if s.nested_state is not None:
        v.set_nested_state(s.nested_state)
    _load_engine_state(v, s.engine)


def _load_engine_state(v: Vcpu, e: EngineState) -> None:
    v.ext_interrupts = list(e.ext_interrupts)
    v.exception_payload = e.exception_payload
    v.init_pending, v.sipi_pending = e.init_pending, e.sipi_pending
    v._mov_ss_end = e.mov_ss_end
    nested = v.nested
    if e.l1 is None:
        return
    if nested is None or not nested.guest_mode:
        raise einval("engine.l1 is L1's context while L2 runs, but the nested state is not in guest mode")
    ctx = v.ctx01
    fpu.write_fxsave(ctx, e.l1.fxsave)
    fpu.write_xcr0(ctx, e.l1.xcr0)
    ctx.set_state(replace(ctx.get_state(), efer=e.l1.efer))
    ctx.set_cpu_msr(M.IA32_PAT, e.l1.pat)
    ctx.patch_hflags(set2=HF2_NMI if e.l1.nmi_blocked else 0, clear2=0 if e.l1.nmi_blocked else HF2_NMI)


# ---- a VM ------------------------------------------------------------------------------------

def _slot_runs(host: mmap.mmap, size: int) -> list[tuple[int, bytes]]:
    """The slot's non-zero pages, adjacent ones merged (an all-zero page is a fresh slot's).
    Whole zero chunks are skipped first: most of a guest's RAM is never touched."""
    runs: list[tuple[int, bytes]] = []
    start = None
    for chunk in range(0, size, _CHUNK):
        end = min(chunk + _CHUNK, size)
        if start is None and host[chunk:end] == _ZERO_CHUNK[:end - chunk]:
            continue
        for off in range(chunk, end, PAGE):
            nonzero = host[off:off + PAGE] != _ZERO_PAGE
            if nonzero and start is None:
                start = off
            elif not nonzero and start is not None:
                runs.append((start, host[start:off]))
                start = None
    if start is not None:
        runs.append((start, host[start:size]))
    return runs


def snapshot_vm(vm: Vm) -> VmSnapshot:
    """Vm.snapshot: memory, every vCPU's state (save order), the VM-level settings. The
    local APICs are per vCPU; the APIC bus itself holds no state beyond its members."""
    profile = vm.kvm.profile
    vcpus = [save_vcpu(v) for v in vm.vcpus.values()]
    slots = [SlotImage(s.slot, s.guest_phys_addr, s.memory_size, s.flags, _slot_runs(s.host, s.memory_size))
             for s in vm.slots.values()]
    cpuid = [[(leaf, sub, *row) for (leaf, sub), row in sorted(v.cpuid.items())] for v in vm.vcpus.values()]
    return VmSnapshot(profile.name, dict(profile.features), slots, vcpus, cpuid,
                      vm.nested_pages_at_set, vm.svm_state_format)


def restore_vm(kvm: Kvm, snap: VmSnapshot) -> Vm:
    """Kvm.restore_vm: a new VM with the snapshot's memory and vCPUs (created in the same
    order, CPUID set before any state as a VMM does, then each vCPU's load order)."""
    from .kvm import CpuidEntry

    profile = kvm.profile
    if snap.profile != profile.name or snap.features != profile.features:
        raise einval(f"the snapshot's CPU is profile {snap.profile!r} {snap.features}, this Kvm's is "
                     f"{profile.name!r} {profile.features}")
    if len(snap.cpuid) != len(snap.vcpus):
        raise einval("the snapshot has a CPUID table per vCPU")
    vm = kvm.create_vm()
    vm.nested_pages_at_set = snap.nested_pages_at_set
    vm.svm_state_format = snap.svm_state_format
    for img in snap.slots:
        vm.set_user_memory_region(img.slot, img.guest_phys_addr, img.memory_size, img.flags)
        host = vm.slots[img.slot].host
        for off, data in img.runs:
            if off < 0 or off + len(data) > img.memory_size:
                raise einval(f"slot {img.slot}: a run at {off:#x} of {len(data)} bytes is outside the slot")
            host[off:off + len(data)] = data
    for state, table in zip(snap.vcpus, snap.cpuid, strict=True):
        v = vm.create_vcpu(state.vcpu_id)
        entries = {(leaf, sub): tuple(row) for leaf, sub, *row in table}
        if entries != v.cpuid:
            v.set_cpuid2([CpuidEntry(leaf, sub, 0, *row) for (leaf, sub), row in entries.items()])
        v.load_state(state)
    return vm
