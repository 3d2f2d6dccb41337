"""KVM_GET/SET_NESTED_STATE for nested SVM (KVM svm_get_nested_state, svm_set_nested_state).

KVM's format carries the cached vmcb12 control area and vmcb01's save area (L1's state as
VMRUN left it); L2's registers travel through KVM_GET/SET_REGS and SREGS. So SET in guest
mode takes L2's state from the vCPU as it is (the SREGS/REGS loaded before it) and L1's from
the blob, as KVM does (svm_copy_vmrun_state into vmcb01, vmcb01's old save area into
vmcb02). Every rule is checked before anything changes, so a rejected blob leaves the vCPU
as it was.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from ...arch import kvm_uapi as U
from ...arch import svm as S
from ...state import nested_state as NS
from ...state import svm_v2 as V2
from ..errors import KvmError
from .checks import check_controls, check_cr3, check_save
from .vmcb import (
    Vmcb,
    VmcbCtrlCached,
    VmcbSaveCached,
    control_from_cache,
    copy_control_to_cache,
    copy_save_to_cache,
)

if TYPE_CHECKING:
    from .nested import NestedSvm


def get_nested_state(n: NestedSvm, user_size: int) -> bytes | int:
    """The blob in the VM's SVM format (`vm.svm_state_format`), or the size it needs when
    `user_size` is smaller."""
    blob = get_kvm_state(n, user_size if n.v.vm.svm_state_format == "svm" else NS.SVM_MAX_SIZE)
    if n.v.vm.svm_state_format == "svm" or isinstance(blob, int):
        return blob
    v2 = V2.kvm_to_v2(blob, n.l2_save_area() if n.guest_mode else b"")
    return v2 if len(v2) <= user_size else len(v2)


def get_kvm_state(n: NestedSvm, user_size: int) -> bytes | int:
    """KVM svm_get_nested_state: the blob, or the size it needs when `user_size` is smaller
    (KVM writes the data before it reports E2BIG; here nothing is written)."""
    ns = NS.NestedState(format=U.KVM_STATE_NESTED_FORMAT_SVM, size=NS.HEADER_SIZE)
    ns.vmcb_pa = 0
    ns.gpat = 0   # KVM_X86_QUIRK_NESTED_SVM_SHARED_PAT (the default): L2 has L1's PAT
    if n.guest_mode:
        ns.vmcb_pa = n.vmcb12_pa
        ns.size += U.KVM_STATE_NESTED_SVM_VMCB_SIZE
        ns.flags |= U.KVM_STATE_NESTED_GUEST_MODE
        if n.v.entry_event_pending():
            ns.flags |= U.KVM_STATE_NESTED_RUN_PENDING
    if n.gif:
        ns.flags |= U.KVM_STATE_NESTED_GIF_SET
    if user_size < ns.size:
        return ns.size
    if not n.guest_mode:
        return ns.encode()
    assert n.ctl is not None
    n.sync_control_for_save()
    ns = ns.with_data(NS.SVM_CONTROL_OFFSET, bytes(control_from_cache(n.ctl).data[:S.CONTROL_SIZE]))
    return ns.with_data(NS.SVM_SAVE_OFFSET, n.vmcb01_save()[S.SAVE_OFFSET:S.SAVE_OFFSET + S.SAVE_SIZE]).encode()


def facts(n: NestedSvm) -> NS.VcpuFacts:
    st = n.v.ctx.get_state()
    return NS.VcpuFacts(has_svm=n.v.profile.has("svm"), maxphyaddr=n.maxphyaddr, in_smm=False,
                        efer_svme=n.svme, cr0=st.cr0)


def set_nested_state(n: NestedSvm, ns: NS.NestedState) -> None:
    """KVM svm_set_nested_state, every rule before any change; KvmError when one fails.
    An svm-v2 blob is restored as a nested VMRUN from its vmcb12 on top of its L1 state."""
    if ns.format == V2.KVM_STATE_NESTED_FORMAT_SVM_V2:
        return set_v2_state(n, ns)
    f = facts(n)
    if _outside_guest_mode(n, ns, NS.SVM_RULES, f):
        return
    gif = bool(ns.flags & U.KVM_STATE_NESTED_GIF_SET)
    vmcb = Vmcb(ns.data(NS.SVM_CONTROL_OFFSET, S.VMCB_SIZE))
    has = n.v.profile.has
    ctl = copy_control_to_cache(vmcb, has_xsave=has("xsave"), has_rdtscp=has("rdtscp"), has_invpcid=False,
                                has_npt=True, has_skinit=False, has_rdpru=False)
    failure = check_controls(ctl, n.maxphyaddr, npt_enabled=True)
    if failure is not None:
        n.trace_failed(failure)
        raise KvmError(errno.EINVAL, f"data.svm.control: {failure} (svm_set_nested_state)")
    bad = NS.first_violation(NS.SVM_STATE_RULES, ns, f)
    if bad is not None:
        raise KvmError(bad.errno, str(bad))
    l1 = copy_save_to_cache(vmcb)
    failure = check_save(l1, n.maxphyaddr, n.v.cr4_valid, n.v.efer_valid)
    if failure is not None:
        n.trace_failed(failure)
        raise KvmError(errno.EINVAL, f"data.svm.save: {failure} (svm_set_nested_state)")
    # nested_svm_load_cr3 on the vCPU's current (L2's) CR3, checked here before the commit
    st = n.v.ctx.get_state()
    l2 = VmcbSaveCached(efer=st.efer, cr4=st.cr4, cr3=st.cr3, cr0=st.cr0)
    failure = check_cr3(l2, n.maxphyaddr, bool(ctl.nested_ctl & S.NESTED_CTL_NP_ENABLE), n.read_u64)
    if failure is not None:
        n.trace_failed(failure)
        raise KvmError(errno.EINVAL, f"the vCPU's CR3: {failure} (svm_set_nested_state)")
    _pages_at_set(n, ctl)
    n.enter_from_state(ns.vmcb_pa, ctl, vmcb, gif, bool(ns.flags & U.KVM_STATE_NESTED_RUN_PENDING))


def _outside_guest_mode(n: NestedSvm, ns: NS.NestedState, rules: tuple[NS.Rule, ...], f: NS.VcpuFacts) -> bool:
    """The header rules of either format; a blob without GUEST_MODE is then applied here
    (svm_leave_nested, GIF from the flags) and True returned."""
    bad = NS.first_violation(rules, ns, f)
    if bad is not None:
        raise KvmError(bad.errno, str(bad))
    if ns.flags & U.KVM_STATE_NESTED_GUEST_MODE:
        return False
    n.leave_nested()
    n.gif = bool(ns.flags & U.KVM_STATE_NESTED_GIF_SET)
    return True


def _pages_at_set(n: NestedSvm, ctl: VmcbCtrlCached) -> None:
    """With `vm.nested_pages_at_set`, the permission maps are checked with the other rules."""
    missing = n.missing_pages(ctl) if n.v.vm.nested_pages_at_set else None
    if missing:
        raise KvmError(errno.EINVAL, f"vmcb12.{missing} is not backed by guest memory (svm_get_nested_state_pages)")


def _refuse(n: NestedSvm, failure: object, where: str) -> KvmError:
    n.trace_failed(failure)
    return KvmError(errno.EINVAL, f"{where}: {failure} (svm_set_nested_state, svm-v2)")


def set_v2_state(n: NestedSvm, ns: NS.NestedState) -> None:
    """svm-v2's SET: its layout and KVM's header rules, then L1's state as svm_set_nested_state
    checks it, then exactly what VMRUN checks on vmcb12 (nested_vmcb_check_controls/_save,
    nested_svm_load_cr3); then L1's state is loaded and L2 entered by the VMRUN code."""
    if _outside_guest_mode(n, ns, V2.SVM_V2_RULES, facts(n)):
        return
    gif = bool(ns.flags & U.KVM_STATE_NESTED_GIF_SET)
    raw = ns.encode()
    vmcb12 = Vmcb(raw[V2.CONTROL_OFFSET:V2.VMCB01_SAVE_OFFSET].ljust(S.VMCB_SIZE, b"\0"))
    l1 = Vmcb(bytes(S.SAVE_OFFSET) + raw[V2.VMCB01_SAVE_OFFSET:V2.L1_REGS_OFFSET].ljust(S.VMCB_SIZE - S.SAVE_OFFSET, b"\0"))
    for name, value in V2.l1_regs(raw).items():
        l1.set_save(name, value)   # the guest-visible values are L1's (vmcb01 may differ)
    l1_save = copy_save_to_cache(l1)
    failure = check_save(l1_save, n.maxphyaddr, n.v.cr4_valid, n.v.efer_valid)
    if failure is not None:
        raise _refuse(n, failure, "L1's save area")
    has = n.v.profile.has
    ctl = copy_control_to_cache(vmcb12, has_xsave=has("xsave"), has_rdtscp=has("rdtscp"), has_invpcid=False,
                                has_npt=True, has_skinit=False, has_rdpru=False)
    save = copy_save_to_cache(vmcb12)
    failure = check_save(save, n.maxphyaddr, n.v.cr4_valid, n.v.efer_valid) \
        or check_controls(ctl, n.maxphyaddr, npt_enabled=True) \
        or check_cr3(save, n.maxphyaddr, bool(ctl.nested_ctl & S.NESTED_CTL_NP_ENABLE), n.read_u64)
    if failure is not None:
        raise _refuse(n, failure, "vmcb12")
    _pages_at_set(n, ctl)
    n.vmrun_from_state(ns.vmcb_pa, l1, ctl, save, gif, bool(ns.flags & U.KVM_STATE_NESTED_RUN_PENDING))
