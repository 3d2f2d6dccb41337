/*
 * vmxtest.S - nestvisor's bundled L1 VMX hypervisor and its L2 guests.
 *
 * Boots by multiboot into long mode (runtime.h), enters VMX operation and
 * runs the checks in the TEST table (one TAP line each, tap.h): the VMX
 * instructions' outcomes, VM-entry checks that fail each way the SDM says,
 * and L2 guests that exit to this L1 for CPUID, I/O, HLT, RDMSR through the
 * MSR bitmap, CR3 reads, VMCALL, exceptions in the exception bitmap,
 * external interrupts and triple faults, with event injection on entry.
 *
 * L2 shares L1's GDT, IDT and page tables and runs in 64-bit mode on its
 * own stack; its general registers are saved in l2_regs at every exit and
 * loaded from there at every entry (vm_enter), as a real hypervisor does.
 * `-loops=N`-style arguments are not needed: the counts are fixed, so the
 * output is the same on every run and under QEMU with a VMX CPU.
 */

.include "runtime.h"
.include "tap.h"

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
.set TSC_OFFSET, 0x2010
.set VMCS_LINK_POINTER, 0x2800
.set PIN_BASED_CONTROLS, 0x4000
.set CPU_BASED_CONTROLS, 0x4002
.set EXCEPTION_BITMAP, 0x4004
.set VM_EXIT_CONTROLS, 0x400C
.set VM_ENTRY_CONTROLS, 0x4012
.set VM_ENTRY_INTR_INFO, 0x4016
.set VM_INSTRUCTION_ERROR, 0x4400
.set VM_EXIT_REASON, 0x4402
.set VM_EXIT_INTR_INFO, 0x4404
.set VM_EXIT_INSTRUCTION_LEN, 0x440C
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
.set CR0_GUEST_HOST_MASK, 0x6000
.set CR4_GUEST_HOST_MASK, 0x6002
.set CR0_READ_SHADOW, 0x6004
.set CR4_READ_SHADOW, 0x6006
.set CR3_TARGET_VALUE0, 0x6008
.set EXIT_QUALIFICATION, 0x6400
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
.set CPU_HLT, 1 << 7
.set CPU_CR3_STORE, 1 << 16
.set CPU_UNCOND_IO, 1 << 24
.set CPU_MSR_BITMAPS, 1 << 28
.set EXIT_HOST_64, 1 << 9
.set EXIT_ACK_INTR, 1 << 15

/* Exit reasons (SDM Appendix C) */
.set EXIT_EXCEPTION, 0
.set EXIT_EXTINT, 1
.set EXIT_TRIPLE_FAULT, 2
.set EXIT_CPUID, 10
.set EXIT_HLT, 12
.set EXIT_VMCALL, 18
.set EXIT_CR, 28
.set EXIT_IO, 30
.set EXIT_RDMSR, 31
.set EXIT_INVALID_STATE, 0x80000021

/* RFLAGS after a VMX instruction (SDM 31.2) */
.set RFL_CF, 1 << 0
.set RFL_ZF, 1 << 6

.set VEC_INJECT, 0x33
.set VEC_EXTINT, 0x34
.set CPUID_EXITS, 10

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

    TESTS_BEGIN
    DEFTEST t_vmx_feature, vmx_feature, "CPUID.1:ECX.VMX and IA32_VMX_BASIC (revision 0x11e57ed0, TRUE controls)"
    DEFTEST t_vmxon_ud, vmxon_ud, "VMXON with CR4.VMXE=0 is #UD"
    DEFTEST t_vmxon_gp, vmxon_gp, "VMXON with IA32_FEATURE_CONTROL unlocked is #GP(0)"
    DEFTEST t_vmxon, vmxon, "VMXON succeeds (CF=ZF=0) after locking IA32_FEATURE_CONTROL"
    DEFTEST t_cr4_vmxe_pinned, cr4_vmxe_pinned, "clearing CR4.VMXE in VMX operation is #GP(0)"
    DEFTEST t_vmxon_again, vmxon_again, "VMXON in VMX root operation without a current VMCS is VMfailInvalid"
    DEFTEST t_vmptrld_revision, vmptrld_revision, "VMPTRLD of a region with a wrong revision fails"
    DEFTEST t_vmptrld, vmptrld, "VMCLEAR, VMPTRLD and VMPTRST of a VMCS"
    DEFTEST t_vmread_unsupported, vmread_unsupported, "VMREAD of CR3_TARGET_VALUE0 is VMfailValid(12)"
    DEFTEST t_vmwrite_vmread, vmwrite_vmread, "VMWRITE/VMREAD: AR-bytes mask, high half of a 64-bit field"
    DEFTEST t_vmresume_clear, vmresume_clear, "VMRESUME of a clear VMCS is VMfailValid(5)"
    DEFTEST t_entry_bad_control, entry_bad_control, "VM entry with a reserved pin-based control is VMfailValid(7)"
    DEFTEST t_entry_bad_host, entry_bad_host, "VM entry with HOST_CR0.NE=0 is VMfailValid(8)"
    DEFTEST t_entry_bad_guest, entry_bad_guest, "VM entry with activity state 2 fails with exit reason 0x80000021"
    DEFTEST t_l2_cpuid, l2_cpuid, "L2 CPUID exits to L1 10 times; L1's answers reach L2"
    DEFTEST t_l2_exits, l2_exits, "L2 exits for OUT, HLT, RDMSR (bitmap), MOV from CR3, VMCALL; not for RDMSR of PAT"
    DEFTEST t_l2_exception, l2_exception, "L2 #UD in the exception bitmap exits with interruption info 0x80000306"
    DEFTEST t_l2_lazy_sync, l2_lazy_sync, "VMREAD of GUEST_ES_SELECTOR after an exit sees L2's ES"
    DEFTEST t_l2_inject, l2_inject, "an external interrupt injected on VM entry runs L2's handler"
    DEFTEST t_l2_extint, l2_extint, "external-interrupt exiting with acknowledge-on-exit reports the vector"
    DEFTEST t_l2_triple_fault, l2_triple_fault, "a triple fault in L2 exits to L1 (reason 2)"
    DEFTEST t_vmxoff, vmxoff, "VMXOFF leaves VMX operation; VMREAD is then #UD"
    TESTS_END

/* ------------------------------------------------------------------ */
/* helpers */

/* vmx_check_flags(rdi = expected CF|ZF): compare the last VMX instruction's flags */
.macro EXPECT_VMFLAGS want
    EXPECT_EQ vm_flags(%rip), $\want
.endm

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
    VMWRITE_I GUEST_RIP, %r12
    pop %r12
    pop %rbx
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
    mov $HOST_RSP, %eax
    vmwrite %rsp, %rax
    mov $HOST_RIP, %eax
    lea vm_exit_point(%rip), %rdx
    vmwrite %rdx, %rax
    mov l2_regs + 8 * 1(%rip), %rcx
    mov l2_regs + 8 * 2(%rip), %rdx
    mov l2_regs + 8 * 3(%rip), %rbx
    mov l2_regs + 8 * 5(%rip), %rbp
    mov l2_regs + 8 * 6(%rip), %rsi
    mov l2_regs + 8 * 7(%rip), %rdi
    mov l2_regs + 8 * 8(%rip), %r8
    mov l2_regs + 8 * 9(%rip), %r9
    mov l2_regs + 8 * 10(%rip), %r10
    mov l2_regs + 8 * 11(%rip), %r11
    mov l2_regs + 8 * 12(%rip), %r12
    mov l2_regs + 8 * 13(%rip), %r13
    mov l2_regs + 8 * 14(%rip), %r14
    mov l2_regs + 8 * 15(%rip), %r15
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
    mov %rcx, l2_regs + 8 * 1(%rip)
    mov %rdx, l2_regs + 8 * 2(%rip)
    mov %rbx, l2_regs + 8 * 3(%rip)
    mov %rbp, l2_regs + 8 * 5(%rip)
    mov %rsi, l2_regs + 8 * 6(%rip)
    mov %rdi, l2_regs + 8 * 7(%rip)
    mov %r8, l2_regs + 8 * 8(%rip)
    mov %r9, l2_regs + 8 * 9(%rip)
    mov %r10, l2_regs + 8 * 10(%rip)
    mov %r11, l2_regs + 8 * 11(%rip)
    mov %r12, l2_regs + 8 * 12(%rip)
    mov %r13, l2_regs + 8 * 13(%rip)
    mov %r14, l2_regs + 8 * 14(%rip)
    mov %r15, l2_regs + 8 * 15(%rip)
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

/* ------------------------------------------------------------------ */
/* VMX instructions */

t_vmx_feature:
    mov $1, %eax
    cpuid
    mov %rcx, %rbx
    EXPECT_MASK %rbx, (1<<5), (1<<5)
    mov $MSR_VMX_BASIC, %ecx
    rdmsr
    mov %rax, %rbx
    EXPECT_EQ %rbx, $VMCS_REVISION
    mov %rdx, %rbx
    EXPECT_MASK %rbx, (1<<23), (1<<23)   /* bit 55 */
    ret

t_vmxon_ud:
    TRY vmxon vmxon_ptr(%rip)
    EXPECT_FAULT 6, 0
    ret

t_vmxon_gp:
    mov %cr0, %rax                    /* CR0.NE: fixed to 1 in VMX operation (IA32_VMX_CR0_FIXED0) */
    or $1 << 5, %rax
    mov %rax, %cr0
    mov %cr4, %rax
    or $CR4_VMXE, %rax
    mov %rax, %cr4
    TRY vmxon vmxon_ptr(%rip)
    EXPECT_FAULT 13, 0
    ret

t_vmxon:
    mov $MSR_FEATURE_CONTROL, %ecx
    mov $5, %eax                      /* locked, VMXON outside SMX */
    xor %edx, %edx
    wrmsr
    movl $VMCS_REVISION, vmxon_region(%rip)
    movl $VMCS_REVISION, vmcs_a(%rip)
    TRY vmxon vmxon_ptr(%rip)
    SAVE_VMFLAGS
    EXPECT_NO_FAULT
    EXPECT_VMFLAGS 0
    ret

t_cr4_vmxe_pinned:
    mov %cr4, %rbx
    mov %rbx, %rax
    and $~CR4_VMXE, %rax
    TRY mov %rax, %cr4
    EXPECT_FAULT 13, 0
    mov %cr4, %rax
    EXPECT_EQ %rax, %rbx
    ret

t_vmxon_again:
    vmxon vmxon_ptr(%rip)
    SAVE_VMFLAGS
    EXPECT_VMFLAGS RFL_CF
    ret

t_vmptrld_revision:
    vmptrld bad_vmcs_ptr(%rip)
    SAVE_VMFLAGS
    EXPECT_VMFLAGS RFL_CF
    ret

t_vmptrld:
    vmclear vmcs_a_ptr(%rip)
    SAVE_VMFLAGS
    EXPECT_VMFLAGS 0
    vmptrld vmcs_a_ptr(%rip)
    SAVE_VMFLAGS
    EXPECT_VMFLAGS 0
    movq $0, vmptr_out(%rip)
    vmptrst vmptr_out(%rip)
    EXPECT_EQ vmptr_out(%rip), vmcs_a_ptr(%rip)
    ret

t_vmread_unsupported:
    mov $CR3_TARGET_VALUE0, %eax
    vmread %rax, %rbx
    SAVE_VMFLAGS
    EXPECT_VMFLAGS RFL_ZF
    VMREAD_R VM_INSTRUCTION_ERROR, %rbx
    EXPECT_EQ %rbx, $12
    ret

t_vmwrite_vmread:
    VMWRITE_I GUEST_ES_AR_BYTES, $0xFFFFFFFF
    SAVE_VMFLAGS
    EXPECT_VMFLAGS 0
    VMREAD_R GUEST_ES_AR_BYTES, %rbx
    EXPECT_EQ %rbx, $0x1F0FF
    mov $0x1122334455667788, %rdx
    mov $TSC_OFFSET, %eax
    vmwrite %rdx, %rax
    VMREAD_R TSC_OFFSET + 1, %rbx     /* the _HIGH access: bits 63:32 */
    EXPECT_EQ %rbx, $0x11223344
    VMWRITE_I TSC_OFFSET, $0
    ret

t_vmresume_clear:
    lea l2_vmcall(%rip), %rdi
    call vmcs_setup
    xor %edi, %edi
    call vm_enter
    EXPECT_EQ %rax, $-1
    EXPECT_VMFLAGS RFL_ZF
    VMREAD_R VM_INSTRUCTION_ERROR, %rbx
    EXPECT_EQ %rbx, $5
    ret

t_entry_bad_control:
    lea l2_vmcall(%rip), %rdi
    call vmcs_setup
    VMREAD_R PIN_BASED_CONTROLS, %rbx
    or $1 << 20, %rbx                 /* reserved: not in the allowed-1 settings */
    VMWRITE_I PIN_BASED_CONTROLS, %rbx
    mov $1, %edi
    call vm_enter
    EXPECT_EQ %rax, $-1
    EXPECT_VMFLAGS RFL_ZF
    VMREAD_R VM_INSTRUCTION_ERROR, %rbx
    EXPECT_EQ %rbx, $7
    ret

t_entry_bad_host:
    lea l2_vmcall(%rip), %rdi
    call vmcs_setup
    mov %cr0, %rbx
    and $~(1 << 5), %rbx              /* NE is fixed to 1 in VMX operation */
    VMWRITE_I HOST_CR0, %rbx
    mov $1, %edi
    call vm_enter
    EXPECT_EQ %rax, $-1
    EXPECT_VMFLAGS RFL_ZF
    VMREAD_R VM_INSTRUCTION_ERROR, %rbx
    EXPECT_EQ %rbx, $8
    ret

t_entry_bad_guest:
    lea l2_vmcall(%rip), %rdi
    call vmcs_setup
    VMWRITE_I GUEST_ACTIVITY_STATE, $2   /* shutdown: not a state VM entry may load */
    mov $1, %edi
    call vm_enter
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_INVALID_STATE
    VMREAD_R EXIT_QUALIFICATION, %rbx
    EXPECT_EQ %rbx, $0
    xor %edi, %edi                    /* the VMCS stays clear (SDM 27.8) */
    call vm_enter
    EXPECT_EQ %rax, $-1
    VMREAD_R VM_INSTRUCTION_ERROR, %rbx
    EXPECT_EQ %rbx, $5
    ret

/* ------------------------------------------------------------------ */
/* L2 guests and the exits they cause */

/* L2: CPUID leaf 0x4000_1234 ten times, summing EBX, then VMCALL with the sum in RBX */
l2_cpuid_loop:
    xor %r12d, %r12d
    xor %r13d, %r13d
1:  mov $0x40001234, %eax
    cpuid
    add %rbx, %r13
    inc %r12d
    cmp $CPUID_EXITS, %r12d
    jb 1b
    mov %r13, %rbx
    vmcall
    ud2

t_l2_cpuid:
    push %r12
    lea l2_cpuid_loop(%rip), %rdi
    call vmcs_setup
    xor %r12d, %r12d
    mov $1, %edi
1:  call vm_enter
    cmp $EXIT_CPUID, %rax
    jne 2f
    incq %r12
    movq $7, l2_regs + 8 * 3(%rip)    /* L1's answer: EBX = 7 */
    call skip_l2_insn
    xor %edi, %edi
    jmp 1b
2:  mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_VMCALL
    EXPECT_EQ %r12, $CPUID_EXITS
    EXPECT_EQ l2_regs+8*3(%rip), $(7*CPUID_EXITS)
    pop %r12
    ret

/* L2: one instruction per exit reason, in order */
l2_exits_prog:
    out %al, $0x80
    hlt
    mov $MSR_SYSENTER_CS, %ecx
    rdmsr
    mov $MSR_PAT, %ecx
    rdmsr                             /* bitmap bit clear: L0 answers, no exit */
    mov %rax, %r14
    mov %cr3, %rax
    vmcall
    ud2

t_l2_exits:
    push %r12
    lea msr_bitmap(%rip), %rax        /* read bitmap for low MSRs: bit 0x174 */
    orb $1 << (MSR_SYSENTER_CS & 7), MSR_SYSENTER_CS / 8(%rax)
    lea l2_exits_prog(%rip), %rdi
    call vmcs_setup
    lea exit_log(%rip), %r12
    mov $1, %edi
1:  call vm_enter
    mov %rax, (%r12)
    add $8, %r12
    cmp $EXIT_CR, %rax
    jne 2f
    VMREAD_R EXIT_QUALIFICATION, %rbx
    mov %rbx, cr_qual(%rip)
2:  cmp $EXIT_IO, %rax
    jne 3f
    VMREAD_R EXIT_QUALIFICATION, %rbx
    mov %rbx, io_qual(%rip)
3:  cmp $EXIT_VMCALL, %rax
    je 4f
    cmp $-1, %rax
    je 4f
    call skip_l2_insn
    xor %edi, %edi
    jmp 1b
4:  EXPECT_EQ exit_log(%rip), $EXIT_IO
    EXPECT_EQ exit_log+8(%rip), $EXIT_HLT
    EXPECT_EQ exit_log+16(%rip), $EXIT_RDMSR
    EXPECT_EQ exit_log+24(%rip), $EXIT_CR
    EXPECT_EQ exit_log+32(%rip), $EXIT_VMCALL
    EXPECT_EQ io_qual(%rip), $0x00800040     /* port 0x80, 1 byte, OUT, immediate */
    EXPECT_EQ cr_qual(%rip), $0x13           /* CR3, MOV from CR, RAX */
    mov $PAT_DEFAULT, %rax
    EXPECT_EQ l2_regs+8*14(%rip), %rax   /* L2 read PAT through L0 */
    pop %r12
    ret

l2_ud:
    ud2
    vmcall

t_l2_exception:
    lea l2_ud(%rip), %rdi
    call vmcs_setup
    VMWRITE_I EXCEPTION_BITMAP, $1 << 6
    mov $1, %edi
    call vm_enter
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_EXCEPTION
    VMREAD_R VM_EXIT_INTR_INFO, %rbx
    EXPECT_EQ %rbx, $0x80000306
    VMREAD_R GUEST_RIP, %rbx
    lea l2_ud(%rip), %rax
    EXPECT_EQ %rbx, %rax
    add $2, %rbx
    VMWRITE_I GUEST_RIP, %rbx
    xor %edi, %edi
    call vm_enter
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_VMCALL
    ret

l2_load_es:
    xor %eax, %eax
    mov %ax, %es
    vmcall

t_l2_lazy_sync:
    lea l2_load_es(%rip), %rdi
    call vmcs_setup
    mov $1, %edi
    call vm_enter
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_VMCALL
    VMREAD_R GUEST_ES_SELECTOR, %rbx
    EXPECT_EQ %rbx, $0
    VMREAD_R GUEST_ES_AR_BYTES, %rbx
    EXPECT_MASK %rbx, 0x10000, 0x10000       /* a null selector leaves ES unusable */
    VMREAD_R GUEST_CS_SELECTOR, %rbx
    EXPECT_EQ %rbx, $SEL_CODE64
    ret

l2_vmcall:
    vmcall
    ud2

t_l2_inject:
    lea l2_vmcall(%rip), %rdi
    call vmcs_setup
    movl $0, irq_count + VEC_INJECT * 4(%rip)
    VMWRITE_I VM_ENTRY_INTR_INFO, $0x80000000 | VEC_INJECT   /* external interrupt */
    mov $1, %edi
    call vm_enter
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_VMCALL
    mov irq_count + VEC_INJECT * 4(%rip), %ebx
    EXPECT_EQ %rbx, $1
    VMREAD_R VM_ENTRY_INTR_INFO, %rbx
    EXPECT_EQ %rbx, $VEC_INJECT              /* the valid bit is cleared on exit */
    ret

l2_spin:
    pause
    jmp l2_spin

t_l2_extint:
    call apic_enable
    lea l2_spin(%rip), %rdi
    call vmcs_setup
    VMREAD_R PIN_BASED_CONTROLS, %rbx
    or $PIN_EXT_INTR, %rbx
    VMWRITE_I PIN_BASED_CONTROLS, %rbx
    mov $APIC_ICR, %edi
    mov $0x40000 | VEC_EXTINT, %esi           /* self IPI (shorthand 01) */
    call apic_write
    mov $1, %edi
    call vm_enter
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_EXTINT
    VMREAD_R VM_EXIT_INTR_INFO, %rbx
    EXPECT_EQ %rbx, $0x80000000 | VEC_EXTINT
    mov $APIC_EOI, %edi                       /* acknowledged on exit: L1 ends it */
    xor %esi, %esi
    call apic_write
    ret

l2_no_idt:
    lidt zero_idt(%rip)
    ud2

t_l2_triple_fault:
    lea l2_no_idt(%rip), %rdi
    call vmcs_setup
    mov $1, %edi
    call vm_enter
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_TRIPLE_FAULT
    ret

t_vmxoff:
    vmxoff
    SAVE_VMFLAGS
    EXPECT_VMFLAGS 0
    mov $VM_EXIT_REASON, %eax
    TRY vmread %rax, %rbx
    EXPECT_FAULT 6, 0
    ret

    .section .rodata
tap_title: .asciz "# nestvisor vmxtest: an L1 VMX hypervisor and its L2 guests\n"

    .data
    .balign 8
vmxon_ptr:    .quad vmxon_region
vmcs_a_ptr:   .quad vmcs_a
bad_vmcs_ptr: .quad bad_vmcs
vmptr_out:    .quad 0
vm_flags:     .quad 0
launch:       .long 0
    .balign 8
io_qual:      .quad 0
cr_qual:      .quad 0
exit_log:     .skip 8 * 16
l2_regs:      .skip 8 * 16
zero_idt:     .word 0
              .quad 0

    .bss
    .balign 4096
vmxon_region: .skip 4096
vmcs_a:       .skip 4096
bad_vmcs:     .skip 4096
msr_bitmap:   .skip 4096
l2_stack:     .skip 8192
l2_stack_top:
