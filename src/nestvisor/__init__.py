"""nestvisor: a software L0 hypervisor shaped like Linux KVM, over an emulated x86 CPU."""

from .arch.kvm_uapi import *  # noqa: F403 - KVM's constant names are part of the API
from .kvm.errors import KvmError
from .kvm.kvm import Kvm

__all__ = ["Kvm", "KvmError"]
