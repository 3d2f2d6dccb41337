/*
 * svmdemo.S - the `nestvisor demo --arch svm` workload: an L1 SVM hypervisor
 * runs one L2 guest whose loop exits to L1 for CPUID, port I/O (through the
 * IOPM), RDMSR (through the MSRPM) and HLT, and calls L1 with VMMCALL every
 * DEMO_BATCH iterations. L1 answers CPUID and RDMSR itself, counts the
 * exits by code and prints them.
 */

.include "runtime.h"
.include "svm.h"

.set DEMO_LOOPS, 400
.set DEMO_BATCH, 50
.set DEMO_MSR, MSR_SYSENTER_CS
.set DEMO_PORT, 0x80
.set EXIT_CODE_MAX, 0x80 + 8        /* the codes counted: up to VMMCALL (0x81) */

    .text
    .globl main
main:
    push %rbx
    push %r12
    PRINT "svmdemo: L1 enables SVM (EFER.SVME, VM_HSAVE_PA)\n"
    call svm_enable
    test %eax, %eax
    jnz fail
    lea l2_main(%rip), %rdi
    call vmcb_setup
    orb $1 << (DEMO_PORT & 7), iopm + DEMO_PORT / 8(%rip)             /* one bit per port */
    orb $1 << ((DEMO_MSR * 2) & 7), msrpm + DEMO_MSR * 2 / 8(%rip)    /* the MSR's read bit */
    PRINT "svmdemo: L2 runs its loop\n"
1:  call vm_enter
    cmp $EXIT_CODE_MAX, %rax
    jae fail                          /* SVM_EXIT_ERR or an exit this demo does not expect */
    lea exit_counts(%rip), %rcx
    incq (%rcx, %rax, 8)
    cmp $EXIT_CPUID, %rax
    jne 2f
    movq $0x4C314C31, l2_regs + 8 * 3(%rip)   /* L1's CPUID answer: EBX = "1L1L" */
    jmp 5f
2:  cmp $EXIT_MSR, %rax
    jne 3f
    movq $0x12, vmcb12 + VMCB_RAX(%rip)       /* L1 emulates the MSR: EAX = 0x12 */
    movq $0, l2_regs + 8 * 2(%rip)
    jmp 5f
3:  cmp $EXIT_VMMCALL, %rax
    jne 5f
    cmpq $0, l2_regs + 8 * 3(%rip)            /* L2's RBX = 0: the loop is over */
    je 6f
5:  call skip_l2_insn
    jmp 1b
6:  PRINT "svmdemo: L2 finished; #VMEXITs by code as L1 counted them:\n"
    lea exit_names(%rip), %r12
7:  mov (%r12), %rbx
    test %rbx, %rbx
    jz 8f
    PRINT "svmdemo:   "
    mov 8(%r12), %rdi
    call puts
    PRINT " "
    lea exit_counts(%rip), %rcx
    mov (%rcx, %rbx, 8), %rdi
    call putdec
    mov $'\n', %edi
    call putc
    add $16, %r12
    jmp 7b
8:  mov $MSR_EFER, %ecx               /* leave SVM: EFER.SVME = 0 */
    rdmsr
    and $~EFER_SVME, %eax
    wrmsr
    PRINT "svmdemo: done, exiting with code 0\n"
    xor %eax, %eax
    pop %r12
    pop %rbx
    ret
fail:
    PRINT "svmdemo: VMRUN failed or an unexpected #VMEXIT\n"
    mov $1, %eax
    pop %r12
    pop %rbx
    ret

/* L2: DEMO_LOOPS iterations of CPUID, OUT, RDMSR; HLT and VMMCALL every DEMO_BATCH */
l2_main:
    xor %r12d, %r12d
1:  mov $0x40000000, %eax
    cpuid
    cmp $0x4C314C31, %ebx
    jne 9f
    out %al, $DEMO_PORT
    mov $DEMO_MSR, %ecx
    rdmsr
    cmp $0x12, %eax
    jne 9f
    inc %r12d
    mov %r12d, %eax
    xor %edx, %edx
    mov $DEMO_BATCH, %ecx
    div %ecx
    test %edx, %edx
    jnz 1b
    hlt
    mov $1, %ebx
    vmmcall
    cmp $DEMO_LOOPS, %r12d
    jb 1b
    xor %ebx, %ebx
    vmmcall
9:  ud2                               /* a wrong answer from L1: stop with #UD */

    .section .rodata
    .balign 8
/* names as KVM's trace prints them (uapi/asm/svm.h SVM_EXIT_REASONS) */
exit_names:
    .quad EXIT_CPUID, s_cpuid, EXIT_IOIO, s_io, EXIT_MSR, s_msr, EXIT_HLT, s_hlt
    .quad EXIT_VMMCALL, s_vmmcall, 0, 0
s_cpuid:   .asciz "cpuid"
s_io:      .asciz "io"
s_msr:     .asciz "msr"
s_hlt:     .asciz "hlt"
s_vmmcall: .asciz "hypercall"

    .bss
    .balign 8
exit_counts: .skip 8 * EXIT_CODE_MAX
