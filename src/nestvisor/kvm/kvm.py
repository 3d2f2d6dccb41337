"""The /dev/kvm handle: capabilities, supported CPUID, VM creation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..arch import cpuid as F
from ..arch import kvm_uapi as U
from ..state import nested_state as NS
from . import msr as msrs
from .errors import einval
from .profiles import PROFILES, Profile, get_profile
from .vm import KVM_USER_MEM_SLOTS, MAX_VCPUS, Vm

if TYPE_CHECKING:
    from .snapshot import VmSnapshot

KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1


@dataclass(frozen=True)
class CpuidEntry:
    """struct kvm_cpuid_entry2."""

    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


class Kvm:
    """The hypervisor: what /dev/kvm is to a VMM.

    >>> import nestvisor
    >>> kvm = nestvisor.Kvm(profile="vmx")
    >>> kvm.check_extension(nestvisor.KVM_CAP_USER_MEMORY)
    1
    """

    def __init__(self, profile: str = "vmx", features: dict[str, bool] | None = None) -> None:
        if profile not in PROFILES:
            raise einval(f"unknown profile {profile!r}; known: {', '.join(PROFILES)}")
        try:
            self.profile: Profile = get_profile(profile, features)
        except KeyError as e:
            raise einval(f"unknown CPU feature {e.args[0]!r}; known: {', '.join(F.FEATURES)}") from None

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION: 0 when the capability is absent."""
        caps = {
            U.KVM_CAP_IRQCHIP: 1, U.KVM_CAP_HLT: 1, U.KVM_CAP_USER_MEMORY: 1,
            U.KVM_CAP_EXT_CPUID: 1, U.KVM_CAP_NR_VCPUS: MAX_VCPUS, U.KVM_CAP_MAX_VCPUS: MAX_VCPUS,
            U.KVM_CAP_MAX_VCPU_ID: MAX_VCPUS, U.KVM_CAP_NR_MEMSLOTS: KVM_USER_MEM_SLOTS,
            U.KVM_CAP_MP_STATE: 1, U.KVM_CAP_USER_NMI: 1, U.KVM_CAP_VCPU_EVENTS: 1,
            U.KVM_CAP_DEBUGREGS: 1, U.KVM_CAP_TSC_DEADLINE_TIMER: int(self.profile.has("tsc-deadline")),
            U.KVM_CAP_IMMEDIATE_EXIT: 1, U.KVM_CAP_SYNC_MMU: 1, U.KVM_CAP_GET_TSC_KHZ: 1,
            # KVM: get_nested_state(NULL), the largest blob (vmx_get_nested_state, svm_get_nested_state)
            U.KVM_CAP_NESTED_STATE: NS.VMX_MAX_SIZE if self.profile.has("vmx")
            else NS.SVM_MAX_SIZE if self.profile.has("svm") else 0,
        }
        return caps.get(cap, 0)

    def get_supported_cpuid(self) -> list[CpuidEntry]:
        """KVM_GET_SUPPORTED_CPUID for this profile."""
        out = []
        for (leaf, sub), (a, b, c, d) in sorted(self.profile.table().items()):
            flags = KVM_CPUID_FLAG_SIGNIFCANT_INDEX if leaf in F.INDEXED_LEAVES else 0
            out.append(CpuidEntry(leaf, sub, flags, a, b, c, d))
        return out

    def create_vm(self) -> Vm:
        """KVM_CREATE_VM."""
        return Vm(self)

    def get_msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs a VMM saves and restores on this CPU profile,
        those whose feature the profile has and that a host-initiated write can restore
        (KVM's msrs_to_save + emulated_msrs, filtered by kvm_init_msr_lists). The read-only
        ones (VMX capabilities, MTRRcap, MCG_CAP, ...) follow from the profile itself.

        >>> import nestvisor
        >>> 0x10 in nestvisor.Kvm().get_msr_index_list()   # IA32_TSC
        True
        """
        return [i for i, row in sorted(msrs.MSR_TABLE.items())
                if row.write is not None and (row.feature is None or self.profile.has(row.feature))]

    def restore_vm(self, snapshot: VmSnapshot) -> Vm:
        """A new VM from Vm.snapshot()'s result: the same memory, vCPUs created in the same
        order, each loaded in KVM's order (Vcpu.load_state). EINVAL when the snapshot was
        taken on another CPU profile.

        >>> import nestvisor
        >>> vm = nestvisor.Kvm().create_vm()
        >>> vm.set_user_memory_region(0, 0, 0x10000)
        >>> _ = vm.create_vcpu(0)
        >>> vm.memory(0x1000, 2)[:] = b"hi"
        >>> bytes(nestvisor.Kvm().restore_vm(vm.snapshot()).memory(0x1000, 2))
        b'hi'
        """
        from .snapshot import restore_vm
        return restore_vm(self, snapshot)
