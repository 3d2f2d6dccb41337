"""Valid default kvm_nested_state blobs for the state tests (KVM selftests'
nested_set_state_test style: start from one of these, change one field)."""

from __future__ import annotations

from nestvisor.arch import kvm_uapi as U
from nestvisor.arch import svm as S
from nestvisor.arch import vmcs as V
from nestvisor.arch import vmx as X
from nestvisor.state import nested_state as NS
from nestvisor.state import svm_v2 as V2

GM = U.KVM_STATE_NESTED_GUEST_MODE
GIF = U.KVM_STATE_NESTED_GIF_SET
VMXON_PA, VMCS12_PA, LINK_PA, VMCB_PA = 0x10000, 0x11000, 0x12000, 0x13000


def put(ns: NS.NestedState, offset: int, size: int, value: int) -> NS.NestedState:
    """`ns` with `value` at blob `offset`, through the bytes: encode() writes the header's
    fields (the VMX view of the union) over `raw`, so a header patch must be decoded back."""
    blob = bytearray(ns.encode())
    blob[offset:offset + size] = value.to_bytes(size, "little")
    return NS.NestedState.decode(bytes(blob))


def put_vmcs12(ns: NS.NestedState, name: str, value: int, base: int = NS.VMX_VMCS12_OFFSET) -> NS.NestedState:
    f = V.BY_NAME[name]
    return put(ns, base + f.offset, f.size, value)


def vmx_off() -> NS.NestedState:
    return NS.NestedState(format=U.KVM_STATE_NESTED_FORMAT_VMX, size=NS.HEADER_SIZE)


def vmx_root() -> NS.NestedState:
    """VMXON with a current VMCS, L1 in VMX root operation (4224 bytes)."""
    ns = NS.NestedState(format=U.KVM_STATE_NESTED_FORMAT_VMX, size=NS.VMX_SHADOW_OFFSET,
                        vmxon_pa=VMXON_PA, vmcs12_pa=VMCS12_PA)
    ns = put(ns, NS.VMX_VMCS12_OFFSET, 4, V.VMCS12_REVISION)
    return put_vmcs12(ns, "guest_rip", 0x401000)


def vmx_guest() -> NS.NestedState:
    """L2 running, vmcs12 with VMCS shadowing and its shadow vmcs12 (8320 bytes)."""
    ns = vmx_root()
    ns.flags, ns.size = GM, NS.VMX_MAX_SIZE
    ns = put_vmcs12(ns, "cpu_based_vm_exec_control", X.CPU_ACTIVATE_SECONDARY)
    ns = put_vmcs12(ns, "secondary_vm_exec_control", X.SEC_SHADOW_VMCS)
    ns = put_vmcs12(ns, "vmcs_link_pointer", LINK_PA)
    return put(ns, NS.VMX_SHADOW_OFFSET, 4, V.VMCS12_REVISION | V.SHADOW_VMCS_BIT)


def save_area(**values: int) -> bytes:
    out = bytearray(S.SAVE_SIZE)
    for name, value in values.items():
        off, size = S.SAVE[name]
        out[off:off + size] = value.to_bytes(size, "little")
    return bytes(out)


L1_SAVE = save_area(cr0=0x80000011, cr3=0x5000, cr4=0x20, efer=0x1D00, rflags=2, rip=0x1234, rsp=0x8000,
                    g_pat=0x0007040600070406)
L2_SAVE = save_area(cr0=0x80000011, cr3=0x6000, cr4=0x20, efer=0x1500, rflags=2, rip=0x9000, rax=7)


def svm_guest() -> NS.NestedState:
    """KVM's SVM blob in guest mode: vmcb12's control area and vmcb01's save area."""
    ns = NS.NestedState(format=U.KVM_STATE_NESTED_FORMAT_SVM, size=NS.SVM_MAX_SIZE, flags=GM | GIF)
    ns.vmcb_pa, ns.gpat = VMCB_PA, 0
    ns = ns.with_data(NS.SVM_SAVE_OFFSET, L1_SAVE)
    ns = put(ns, NS.SVM_CONTROL_OFFSET + S.CONTROL["intercept_word4"][0], 4, 1)   # VMRUN
    ns = put(ns, NS.SVM_CONTROL_OFFSET + S.CONTROL["asid"][0], 4, 1)
    return put(ns, NS.SVM_CONTROL_OFFSET + S.CONTROL["exit_code"][0], 8, S.EXIT["CPUID"])


def svm_outside() -> NS.NestedState:
    return NS.NestedState(format=U.KVM_STATE_NESTED_FORMAT_SVM, size=NS.HEADER_SIZE, flags=GIF)


def v2_guest() -> NS.NestedState:
    return NS.NestedState.decode(V2.kvm_to_v2(svm_guest().encode(), L2_SAVE))


VMX_FACTS = NS.VcpuFacts(has_vmx=True)
SVM_FACTS = NS.VcpuFacts(has_svm=True, efer_svme=True)
