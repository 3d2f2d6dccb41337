/*
 * vmx.h - what the bundled L1 VMX hypervisors share: VMCS encodings and
 * control bits (SDM Appendix A-C), VMCS accessors, a VMCS set-up for a
 * 64-bit L2 that shares L1's GDT, IDT and page tables, and vm_enter, which
 * runs L2 until its next VM exit with L2's registers kept in l2_regs.
 * Include after runtime.h.
 */

/* MSRs and bits (SDM Vol. 4, Appendix A) */
.set MSR_FEATURE_CONTROL, 0x3A
.set MSR_VMX_BASIC, 0x480
.set MSR_VMX_TRUE_PIN, 0x48D
.set MSR_VMX_TRUE_PROC, 0x48E
.set MSR_VMX_TRUE_EXIT, 0x48F
.set MSR_VMX_TRUE_ENTRY, 0x490
.set MSR_SYSENTER_CS, 0x174
.set CR4_VMXE, 1 << 13
.set VMCS_REVISION, 0x11E57ED0

/* VMCS field encodings (SDM Appendix B) */
.set VIRTUAL_PROCESSOR_ID, 0x0000
.set GUEST_ES_SELECTOR, 0x0800
.set GUEST_CS_SELECTOR, 0x0802
.set GUEST_SS_SELECTOR, 0x0804
.set GUEST_DS_SELECTOR, 0x0806
.set GUEST_FS_SELECTOR, 0x0808
.set GUEST_GS_SELECTOR, 0x080A
.set GUEST_LDTR_SELECTOR, 0x080C
.set GUEST_TR_SELECTOR, 0x080E
.set HOST_ES_SELECTOR, 0x0C00
.set HOST_CS_SELECTOR, 0x0C02
.set HOST_SS_SELECTOR, 0x0C04
.set HOST_DS_SELECTOR, 0x0C06
.set HOST_FS_SELECTOR, 0x0C08
.set HOST_GS_SELECTOR, 0x0C0A
.set HOST_TR_SELECTOR, 0x0C0C
.set MSR_BITMAP, 0x2004
.set VMREAD_BITMAP, 0x2026
.set VMWRITE_BITMAP, 0x2028
.set TSC_OFFSET, 0x2010
.set EPT_POINTER, 0x201A
.set GUEST_PHYSICAL_ADDRESS, 0x2400
.set VMCS_LINK_POINTER, 0x2800
.set PIN_BASED_CONTROLS, 0x4000
.set CPU_BASED_CONTROLS, 0x4002
.set EXCEPTION_BITMAP, 0x4004
.set VM_EXIT_CONTROLS, 0x400C
.set VM_ENTRY_CONTROLS, 0x4012
.set VM_ENTRY_INTR_INFO, 0x4016
.set SECONDARY_CONTROLS, 0x401E
.set VM_INSTRUCTION_ERROR, 0x4400
.set VM_EXIT_REASON, 0x4402
.set VM_EXIT_INTR_INFO, 0x4404
.set VM_EXIT_INSTRUCTION_LEN, 0x440C
.set VMX_INSTRUCTION_INFO, 0x440E
.set GUEST_ES_LIMIT, 0x4800
.set GUEST_LDTR_LIMIT, 0x480C
.set GUEST_TR_LIMIT, 0x480E
.set GUEST_GDTR_LIMIT, 0x4810
.set GUEST_IDTR_LIMIT, 0x4812
.set GUEST_ES_AR_BYTES, 0x4814
.set GUEST_CS_AR_BYTES, 0x4816
.set GUEST_LDTR_AR_BYTES, 0x4820
.set GUEST_TR_AR_BYTES, 0x4822
.set GUEST_INTERRUPTIBILITY, 0x4824
.set GUEST_ACTIVITY_STATE, 0x4826
.set PREEMPTION_TIMER_VALUE, 0x482E
.set CR0_GUEST_HOST_MASK, 0x6000
.set CR4_GUEST_HOST_MASK, 0x6002
.set CR0_READ_SHADOW, 0x6004
.set CR4_READ_SHADOW, 0x6006
.set CR3_TARGET_VALUE0, 0x6008
.set EXIT_QUALIFICATION, 0x6400
.set GUEST_LINEAR_ADDRESS, 0x640A
.set GUEST_CR0, 0x6800
.set GUEST_CR3, 0x6802
.set GUEST_CR4, 0x6804
.set GUEST_ES_BASE, 0x6806
.set GUEST_TR_BASE, 0x6814
.set GUEST_GDTR_BASE, 0x6816
.set GUEST_IDTR_BASE, 0x6818
.set GUEST_DR7, 0x681A
.set GUEST_RSP, 0x681C
.set GUEST_RIP, 0x681E
.set GUEST_RFLAGS, 0x6820
.set HOST_CR0, 0x6C00
.set HOST_CR3, 0x6C02
.set HOST_CR4, 0x6C04
.set HOST_FS_BASE, 0x6C06
.set HOST_GS_BASE, 0x6C08
.set HOST_TR_BASE, 0x6C0A
.set HOST_GDTR_BASE, 0x6C0C
.set HOST_IDTR_BASE, 0x6C0E
.set HOST_RSP, 0x6C14
.set HOST_RIP, 0x6C16

/* Controls (SDM 25.6-25.8) */
.set PIN_EXT_INTR, 1 << 0
.set PIN_NMI_EXITING, 1 << 3
.set PIN_VIRTUAL_NMIS, 1 << 5
.set PIN_PREEMPTION_TIMER, 1 << 6
.set CPU_INTR_WINDOW, 1 << 2
.set CPU_NMI_WINDOW, 1 << 22
.set CPU_HLT, 1 << 7
.set CPU_CR3_STORE, 1 << 16
.set CPU_UNCOND_IO, 1 << 24
.set CPU_MSR_BITMAPS, 1 << 28
.set SEC_EPT, 1 << 1
.set SEC_VPID, 1 << 5
.set SEC_SHADOW_VMCS, 1 << 14
.set EXIT_HOST_64, 1 << 9
.set EXIT_ACK_INTR, 1 << 15
.set EXIT_SAVE_PREEMPTION, 1 << 22

/* Exit reasons (SDM Appendix C) */
.set EXIT_EXCEPTION, 0
.set EXIT_EXTINT, 1
.set EXIT_TRIPLE_FAULT, 2
.set EXIT_CPUID, 10
.set EXIT_INTR_WINDOW, 7
.set EXIT_NMI_WINDOW, 8
.set EXIT_HLT, 12
.set EXIT_INVD, 13
.set EXIT_VMCALL, 18
.set EXIT_VMREAD, 23
.set EXIT_CR, 28
.set EXIT_IO, 30
.set EXIT_RDMSR, 31
.set EXIT_EPT_VIOLATION, 48
.set EXIT_EPT_MISCONFIG, 49
.set EXIT_INVEPT, 50
.set EXIT_PREEMPTION_TIMER, 52
.set EXIT_INVVPID, 53
.set EXIT_INVALID_STATE, 0x80000021

/* RFLAGS after a VMX instruction (SDM 31.2) */
.set RFL_CF, 1 << 0
.set RFL_ZF, 1 << 6


/* VMWRITE_I field, value: write a value (not in rax; rax, rdx scratch); AT&T order is value, field */
.macro VMWRITE_I field, value
    mov \value, %rdx
    mov $\field, %eax
    vmwrite %rdx, %rax
.endm

/* VMWRITE_R fieldreg, value: the field encoding is in a register */
.macro VMWRITE_R fieldreg, value
    mov \value, %rdx
    mov \fieldreg, %rax
    vmwrite %rdx, %rax
.endm

/* VMREAD_R field, reg: read a field into reg (not rax) */
.macro VMREAD_R field, reg
    mov $\field, %eax
    vmread %rax, \reg
.endm

/* flags of the last VMX instruction, CF and ZF only, into rax */
.macro SAVE_VMFLAGS
    pushfq
    pop %rax
    and $RFL_CF | RFL_ZF, %eax
    mov %rax, vm_flags(%rip)
.endm

/* ------------------------------------------------------------------ */

    .text
/* adjust_ctls(edi = TRUE control MSR, esi = wanted bits) -> eax: the must-be-1 bits added,
 * the not-allowed bits dropped (SDM A.3) */
adjust_ctls:
    mov %edi, %ecx
    rdmsr
    or %eax, %esi
    and %edx, %esi
    mov %esi, %eax
    ret

/* vmcs_setup(rdi = L2 entry point): VMCLEAR and VMPTRLD vmcs_a and fill it for a 64-bit L2
 * that shares L1's GDT, IDT and paging. Controls: CPUID always exits; HLT, CR3 store,
 * unconditional I/O and MSR bitmaps as set here. */
vmcs_setup:
    push %rbx
    push %r12
    mov %rdi, %r12
    vmclear vmcs_a_ptr(%rip)
    vmptrld vmcs_a_ptr(%rip)
    lea l2_regs(%rip), %rdi          /* L2 starts with zeroed registers */
    mov $16, %ecx
    xor %eax, %eax
    rep stosq
    mov $MSR_VMX_TRUE_PIN, %edi
    xor %esi, %esi
    call adjust_ctls
    VMWRITE_I PIN_BASED_CONTROLS, %rax
    mov $MSR_VMX_TRUE_PROC, %edi
    mov $CPU_HLT | CPU_CR3_STORE | CPU_UNCOND_IO | CPU_MSR_BITMAPS, %esi
    call adjust_ctls
    VMWRITE_I CPU_BASED_CONTROLS, %rax
    mov $MSR_VMX_TRUE_EXIT, %edi
    mov $EXIT_HOST_64 | EXIT_ACK_INTR, %esi
    call adjust_ctls
    VMWRITE_I VM_EXIT_CONTROLS, %rax
    mov $MSR_VMX_TRUE_ENTRY, %edi
    mov $1 << 9, %esi
    call adjust_ctls
    VMWRITE_I VM_ENTRY_CONTROLS, %rax
    lea msr_bitmap(%rip), %rbx
    VMWRITE_I MSR_BITMAP, %rbx
    VMWRITE_I EXCEPTION_BITMAP, $0
    VMWRITE_I VMCS_LINK_POINTER, $-1
    VMWRITE_I VM_ENTRY_INTR_INFO, $0
    VMWRITE_I GUEST_ACTIVITY_STATE, $0
    VMWRITE_I GUEST_INTERRUPTIBILITY, $0
    VMWRITE_I GUEST_LDTR_SELECTOR, $0
    /* host state: this CPU as it is now */
    mov %cr0, %rbx
    VMWRITE_I HOST_CR0, %rbx
    VMWRITE_I GUEST_CR0, %rbx
    VMWRITE_I CR0_READ_SHADOW, %rbx
    mov %cr3, %rbx
    VMWRITE_I HOST_CR3, %rbx
    VMWRITE_I GUEST_CR3, %rbx
    mov %cr4, %rbx
    VMWRITE_I HOST_CR4, %rbx
    VMWRITE_I GUEST_CR4, %rbx
    VMWRITE_I CR4_READ_SHADOW, %rbx
    VMWRITE_I CR0_GUEST_HOST_MASK, $0
    VMWRITE_I CR4_GUEST_HOST_MASK, $0
    VMWRITE_I HOST_CS_SELECTOR, $SEL_CODE64
    VMWRITE_I GUEST_CS_SELECTOR, $SEL_CODE64
    VMWRITE_I GUEST_CS_AR_BYTES, $0xA09B          /* code, S, P, L, G */
    mov $HOST_ES_SELECTOR, %ebx
    mov $GUEST_ES_SELECTOR, %r8d
1:  cmp $HOST_CS_SELECTOR, %ebx
    je 2f
    VMWRITE_R %rbx, $SEL_DATA                     /* host ES SS DS FS GS */
    mov %r8, %rax
    mov $SEL_DATA, %edx
    vmwrite %rdx, %rax                            /* guest ES SS DS FS GS selector */
    mov %r8, %rax
    add $GUEST_ES_AR_BYTES - GUEST_ES_SELECTOR, %eax
    mov $0xC093, %edx                             /* data, S, P, D/B, G */
    vmwrite %rdx, %rax
2:  add $2, %ebx
    add $2, %r8d
    cmp $HOST_TR_SELECTOR, %ebx
    jb 1b
    /* guest ES..GS limits 0xffffffff, bases 0 */
    mov $GUEST_ES_LIMIT, %ebx
3:  VMWRITE_R %rbx, $0xFFFFFFFF
    add $2, %ebx
    cmp $GUEST_LDTR_LIMIT, %ebx
    jb 3b
    VMWRITE_I GUEST_LDTR_AR_BYTES, $0x10000       /* unusable */
    VMWRITE_I HOST_TR_SELECTOR, $SEL_TSS
    VMWRITE_I GUEST_TR_SELECTOR, $SEL_TSS
    lea tss(%rip), %rbx
    VMWRITE_I HOST_TR_BASE, %rbx
    VMWRITE_I GUEST_TR_BASE, %rbx
    VMWRITE_I GUEST_TR_LIMIT, $0x67
    VMWRITE_I GUEST_TR_AR_BYTES, $0x8B            /* busy 64-bit TSS, P */
    lea gdt(%rip), %rbx
    VMWRITE_I HOST_GDTR_BASE, %rbx
    VMWRITE_I GUEST_GDTR_BASE, %rbx
    VMWRITE_I GUEST_GDTR_LIMIT, $(gdt_end-gdt-1)
    lea idt(%rip), %rbx
    VMWRITE_I HOST_IDTR_BASE, %rbx
    VMWRITE_I GUEST_IDTR_BASE, %rbx
    VMWRITE_I GUEST_IDTR_LIMIT, $(256*16-1)
    VMWRITE_I HOST_FS_BASE, $0
    VMWRITE_I HOST_GS_BASE, $0
    VMWRITE_I GUEST_DR7, $0x400
    VMWRITE_I GUEST_RFLAGS, $2
    lea l2_stack_top(%rip), %rbx
    VMWRITE_I GUEST_RSP, %rbx
    lea vm_exit_point(%rip), %rbx
    VMWRITE_I HOST_RIP, %rbx
    movq $0, host_rsp(%rip)           /* a new VMCS: HOST_RSP is not written yet */
    VMWRITE_I GUEST_RIP, %r12
    pop %r12
    pop %rbx
    ret

/* vmx_enable() -> eax = 0 in VMX root operation, 1 if VMXON failed: CR0.NE and CR4.VMXE
 * (IA32_VMX_CR0/CR4_FIXED0), IA32_FEATURE_CONTROL locked with VMXON outside SMX, the
 * revision in the VMXON region and in vmcs_a (SDM 24.7, 24.11.5) */
vmx_enable:
    mov %cr0, %rax
    or $1 << 5, %rax
    mov %rax, %cr0
    mov %cr4, %rax
    or $CR4_VMXE, %rax
    mov %rax, %cr4
    mov $MSR_FEATURE_CONTROL, %ecx
    mov $5, %eax
    xor %edx, %edx
    wrmsr
    movl $VMCS_REVISION, vmxon_region(%rip)
    movl $VMCS_REVISION, vmcs_a(%rip)
    vmxon vmxon_ptr(%rip)
    setbe %al                         /* CF or ZF: VMfail */
    movzbl %al, %eax
    ret

/*
 * vm_enter(edi = 1 for VMLAUNCH, 0 for VMRESUME) -> rax = exit reason, or -1 if the
 * instruction failed (vm_flags then holds CF/ZF). L2's registers come from l2_regs and
 * go back there at the exit; L1's callee-saved registers live on the host stack.
 */
vm_enter:
    push %rbx
    push %rbp
    push %r12
    push %r13
    push %r14
    push %r15
    mov %edi, launch(%rip)
    /* HOST_RSP only when it changed, as KVM's vmx_update_host_rsp: a VMWRITE of a field L0
     * does not shadow costs L0 a sync of vmcs12 (KVM handle_vmwrite) */
    cmp host_rsp(%rip), %rsp
    je 1f
    mov %rsp, host_rsp(%rip)
    mov $HOST_RSP, %eax
    vmwrite %rsp, %rax
1:
    L2_GPRS_LOAD
    mov l2_regs(%rip), %rax
    cmpl $0, launch(%rip)
    je 1f
    vmlaunch
    jmp 2f
1:  vmresume
2:  SAVE_VMFLAGS
    mov $-1, %rax
    jmp 3f
vm_exit_point:
    mov %rax, l2_regs(%rip)
    L2_GPRS_STORE
    movq $0, vm_flags(%rip)
    mov $VM_EXIT_REASON, %eax
    vmread %rax, %rax
3:  pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %rbp
    pop %rbx
    ret

/* skip_l2_insn: GUEST_RIP += VM_EXIT_INSTRUCTION_LEN (rax, rcx, rdx clobbered) */
skip_l2_insn:
    VMREAD_R VM_EXIT_INSTRUCTION_LEN, %rcx
    VMREAD_R GUEST_RIP, %rdx
    add %rcx, %rdx
    mov $GUEST_RIP, %eax
    vmwrite %rdx, %rax
    ret


    .data
    .balign 8
vmxon_ptr:    .quad vmxon_region
vmcs_a_ptr:   .quad vmcs_a
vm_flags:     .quad 0               /* CF|ZF after the last failed VMLAUNCH/VMRESUME */
launch:       .long 0
    .balign 8
host_rsp:     .quad 0               /* the HOST_RSP last written to the current VMCS */
    .balign 8
l2_regs:      .skip 8 * 16          /* L2's RAX..R15 (RSP unused: it is in the VMCS) */

    .bss
    .balign 4096
vmxon_region: .skip 4096
vmcs_a:       .skip 4096
msr_bitmap:   .skip 4096
l2_stack:     .skip 8192
l2_stack_top:

    .text
