"""vCPU requests: work the vCPU does before it next enters the guest (KVM's KVM_REQ_* bits,
include/linux/kvm_host.h and arch/x86/include/asm/kvm_host.h), by KVM's name."""

# Map the pages that hang off vmcs12/vmcb12 (bitmaps, permission maps) at the first run after
# KVM_SET_NESTED_STATE, so guest memory may arrive after it (post-copy migration).
REQ_GET_NESTED_STATE_PAGES = "KVM_REQ_GET_NESTED_STATE_PAGES"
