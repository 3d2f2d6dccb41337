/*
 * vmxdemo.S - the `nestvisor demo --arch vmx` workload: an L1 VMX hypervisor
 * runs one L2 guest whose loop exits to L1 for CPUID, port I/O, RDMSR
 * (through the MSR bitmap) and HLT, and calls L1 with VMCALL every
 * DEMO_BATCH iterations. At each VMCALL L1 reads one of L2's rarely used
 * guest fields (its ES selector), which is what makes the lazy sync of those
 * fields observable. L1 counts the exits by reason and prints them.
 */

.include "runtime.h"
.include "vmx.h"

.set DEMO_LOOPS, 400
.set DEMO_BATCH, 50
.set DEMO_MSR, MSR_SYSENTER_CS

    .text
    .globl main
main:
    push %rbx
    push %r12
    PRINT "vmxdemo: L1 enters VMX operation\n"
    call vmx_enable
    test %eax, %eax
    jnz fail
    lea msr_bitmap(%rip), %rax
    orb $1 << (DEMO_MSR & 7), DEMO_MSR / 8(%rax)
    lea l2_main(%rip), %rdi
    call vmcs_setup
    PRINT "vmxdemo: L2 runs its loop\n"
    mov $1, %edi
1:  call vm_enter
    cmp $-1, %rax
    je fail
    cmp $EXIT_REASON_MAX, %rax
    jae fail
    lea exit_counts(%rip), %rcx
    incq (%rcx, %rax, 8)
    cmp $EXIT_CPUID, %rax
    jne 2f
    movq $0x4C314C31, l2_regs + 8 * 3(%rip)   /* L1's CPUID answer: EBX = "1L1L" */
    jmp 5f
2:  cmp $EXIT_RDMSR, %rax
    jne 3f
    movq $0x12, l2_regs(%rip)                 /* L1 emulates the MSR: EAX = 0x12 */
    movq $0, l2_regs + 8 * 2(%rip)
    jmp 5f
3:  cmp $EXIT_VMCALL, %rax
    jne 5f
    VMREAD_R GUEST_ES_SELECTOR, %rbx          /* a rare field: L0 syncs them now */
    cmp $SEL_DATA, %rbx
    jne fail
    cmpq $0, l2_regs + 8 * 3(%rip)            /* L2's RBX = 0: the loop is over */
    je 6f
5:  call skip_l2_insn
    xor %edi, %edi
    jmp 1b
6:  PRINT "vmxdemo: L2 finished; exits by reason as L1 counted them:\n"
    lea exit_names(%rip), %r12
7:  mov (%r12), %rbx
    test %rbx, %rbx
    jz 8f
    PRINT "vmxdemo:   "
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
8:  vmxoff
    PRINT "vmxdemo: done, exiting with code 0\n"
    xor %eax, %eax
    pop %r12
    pop %rbx
    ret
fail:
    PRINT "vmxdemo: a VMX instruction failed\n"
    mov $1, %eax
    pop %r12
    pop %rbx
    ret

/* L2: DEMO_LOOPS iterations of CPUID, OUT, RDMSR; HLT and VMCALL every DEMO_BATCH */
l2_main:
    xor %r12d, %r12d
1:  mov $0x40000000, %eax
    cpuid
    cmp $0x4C314C31, %ebx
    jne 9f
    out %al, $0x80
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
    vmcall
    cmp $DEMO_LOOPS, %r12d
    jb 1b
    xor %ebx, %ebx
    vmcall
9:  ud2                               /* a wrong answer from L1: stop with #UD */

.set EXIT_REASON_MAX, 80

    .section .rodata
    .balign 8
exit_names:
    .quad EXIT_CPUID, s_cpuid, EXIT_IO, s_io, EXIT_RDMSR, s_rdmsr, EXIT_HLT, s_hlt
    .quad EXIT_VMCALL, s_vmcall, 0, 0
s_cpuid:  .asciz "CPUID"
s_io:     .asciz "IO_INSTRUCTION"
s_rdmsr:  .asciz "MSR_READ"
s_hlt:    .asciz "HLT"
s_vmcall: .asciz "VMCALL"

    .bss
    .balign 8
exit_counts: .skip 8 * EXIT_REASON_MAX
