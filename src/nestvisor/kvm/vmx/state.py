"""KVM_GET/SET_NESTED_STATE for nested VMX (KVM vmx_get_nested_state, vmx_set_nested_state).

GET syncs vmcs02 -> vmcs12 as KVM does (all of it in guest mode, the rare fields when they
are stale) and copies the 4 KiB vmcs12 image, plus the shadow vmcs12 in guest mode. SET
judges the blob by every rule before it changes anything (the header rules of
`state.nested_state`, then the entry checks), so a rejected blob leaves the vCPU as it was;
KVM itself leaves nested operation first, which a caller cannot observe as anything but a
failed SET. Loading guest mode enters L2 through the VM-entry code (`enter_guest_mode`) as
KVM's nested_vmx_enter_non_root_mode(from_vmentry=false) does: no MSR-load list, no event
injection unless the entry was still pending, and the pages hanging off vmcs12 are checked
at the first run (`get_nested_state_pages`).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from ...arch import kvm_uapi as U
from ...arch import vmcs as V
from ...state import nested_state as NS
from ..errors import KvmError
from .caps import PREEMPTION_TIMER_RATE
from .checks import check_controls, check_guest_state, check_host_state
from .vmcs12 import Vmcs12

if TYPE_CHECKING:
    from .nested import NestedVmx

INVALID = NS.INVALID_GPA
EFER_LMA = 1 << 10


def get_nested_state(n: NestedVmx, user_size: int) -> bytes | int:
    """KVM vmx_get_nested_state: the blob, or the size it needs when `user_size` is smaller."""
    v = n.v
    ns = NS.NestedState(format=U.KVM_STATE_NESTED_FORMAT_VMX, size=NS.HEADER_SIZE)
    v12 = n.vmcs12
    shadow = None
    if v.profile.has("vmx") and n.vmxon:
        ns.vmxon_pa, ns.vmcs12_pa = n.vmxon_ptr, n.current_vmptr
        if v12 is not None:
            ns.size += U.KVM_STATE_NESTED_VMX_VMCS_SIZE
            if n.guest_mode and n.shadow12 is not None:
                shadow = n.shadow12
                ns.size += U.KVM_STATE_NESTED_VMX_VMCS_SIZE
        if n.guest_mode:
            ns.flags |= U.KVM_STATE_NESTED_GUEST_MODE
            if v.entry_event_pending():
                ns.flags |= U.KVM_STATE_NESTED_RUN_PENDING
            if n.preemption_deadline is not None:
                # KVM vmx_calc_preemption_timer_value: the deadline in L1 TSC units >> the rate
                ns.vmx_flags |= U.KVM_STATE_VMX_PREEMPTION_TIMER_DEADLINE
                ns.preemption_timer_deadline = (n.preemption_deadline + v.tsc_offset) >> PREEMPTION_TIMER_RATE
    if user_size < ns.size:
        return ns.size
    if v12 is None or not n.vmxon:
        return ns.encode()
    # KVM: in guest mode the full sync and the rare one, else the rare one if it is stale
    if n.guest_mode:
        n.sync_for_save()
    elif n.need_rare_sync:
        n.sync_rare()
    ns = ns.with_data(NS.VMX_VMCS12_OFFSET, bytes(v12.data))
    if shadow is not None:
        ns = ns.with_data(NS.VMX_SHADOW_OFFSET, bytes(shadow.data))
    return ns.encode()


def _facts(n: NestedVmx) -> NS.VcpuFacts:
    return NS.VcpuFacts(has_vmx=n.v.profile.has("vmx"), maxphyaddr=n.maxphyaddr, in_smm=False)


def set_nested_state(n: NestedVmx, ns: NS.NestedState) -> None:
    """KVM vmx_set_nested_state, every rule before any change; KvmError when one fails."""
    bad = NS.first_violation(NS.VMX_RULES, ns, _facts(n))
    if bad is not None:
        raise KvmError(bad.errno, str(bad))
    v12 = shadow = None
    if ns.vmxon_pa != INVALID and ns.size >= NS.HEADER_SIZE + NS.VMCS12_STRUCT_SIZE:
        # KVM copies sizeof(struct vmcs12) bytes into a zeroed page
        v12 = Vmcs12(ns.data(NS.VMX_VMCS12_OFFSET, NS.VMCS12_STRUCT_SIZE).ljust(V.VMCS12_SIZE, b"\0"))
    guest = bool(ns.flags & U.KVM_STATE_NESTED_GUEST_MODE)
    if guest:
        assert v12 is not None
        snap = v12.fields()
        if n.shadowing(snap) and snap["vmcs_link_pointer"] != INVALID:
            shadow = Vmcs12(ns.data(NS.VMX_SHADOW_OFFSET, NS.VMCS12_STRUCT_SIZE).ljust(V.VMCS12_SIZE, b"\0"))
        l1_lma = bool(n.v.ctx.get_state().efer & EFER_LMA)   # KVM: the vCPU's current EFER
        run_pending = bool(ns.flags & U.KVM_STATE_NESTED_RUN_PENDING)
        for failure in (check_controls(snap, n.caps, n.maxphyaddr),
                        check_host_state(snap, n.caps, n.maxphyaddr, l1_lma)):
            if failure is not None:
                n.trace_failed(failure)
                raise KvmError(errno.EINVAL, f"vmcs12: {failure} (vmx_set_nested_state)")
        failed = check_guest_state(snap, n.caps, run_pending, n.maxphyaddr, n.read_guest_u32)
        if failed is not None:
            n.trace_failed(failed[0])
            raise KvmError(errno.EINVAL, f"vmcs12: {failed[0]} (vmx_set_nested_state)")
        missing = n.missing_pages(snap) if n.v.vm.nested_pages_at_set else None
        if missing:   # with the option, the pages are checked with the other rules
            raise KvmError(errno.EINVAL, f"vmcs12.{missing} is not backed by guest memory (nested_get_vmcs12_pages)")
    # every rule passed: KVM vmx_leave_nested + free_nested, then the new state
    n.leave_nested()
    if ns.vmxon_pa == INVALID:
        return
    n.vmxon, n.vmxon_ptr = True, ns.vmxon_pa
    if v12 is None:
        return
    n.current_vmptr, n.vmcs12 = ns.vmcs12_pa, v12
    if not guest:
        return
    deadline = None
    if ns.vmx_flags & U.KVM_STATE_VMX_PREEMPTION_TIMER_DEADLINE:
        deadline = ns.preemption_timer_deadline << PREEMPTION_TIMER_RATE
    n.enter_from_state(shadow, bool(ns.flags & U.KVM_STATE_NESTED_RUN_PENDING), deadline)
