"""Nested VMX: the L0 side of L1's VMX operation (KVM arch/x86/kvm/vmx/nested.c)."""
