"""Nested SVM: KVM's arch/x86/kvm/svm/nested.c."""
