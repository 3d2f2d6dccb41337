"""nestvisor: a software L0 hypervisor shaped like Linux KVM, over an emulated x86 CPU."""

from .arch.kvm_uapi import *  # noqa: F403 - KVM's constant names are part of the API
from .kvm.errors import KvmError
from .kvm.kvm import Kvm

CAP_NESTED_STATE = KVM_CAP_NESTED_STATE  # noqa: F405 - the issue's short name for KVM's 157

__all__ = ["Kvm", "KvmError"]
