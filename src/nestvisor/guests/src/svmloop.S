/*
 * svmloop.S - LOOP_EXITS VMRUN/#VMEXIT round trips: an L2 CPUID loop whose
 * every CPUID exits to this L1 SVM hypervisor, which answers EBX = the
 * number of exits so far; L2 sums the answers. L1 prints a line every
 * LOOP_REPORT exits and the sum at the end, so the console output is the
 * same on any correct SVM implementation (nestvisor, QEMU TCG, hardware).
 */

.include "runtime.h"
.include "svm.h"

.set LOOP_EXITS, 1000
.set LOOP_REPORT, 250

    .text
    .globl main
main:
    push %rbx
    push %r12
    PRINT "svmloop: L1 enables SVM\n"
    call svm_enable
    test %eax, %eax
    jnz 9f
    lea l2_loop(%rip), %rdi
    call vmcb_setup
    xor %r12d, %r12d                  /* CPUID exits so far */
1:  call vm_enter
    cmp $EXIT_VMMCALL, %rax
    je 3f
    cmp $EXIT_CPUID, %rax
    jne 9f
    inc %r12
    mov %r12, l2_regs + 8 * 3(%rip)   /* L1's answer: EBX = the exit count */
    call skip_l2_insn
    mov %r12, %rax
    xor %edx, %edx
    mov $LOOP_REPORT, %ecx
    div %rcx
    test %rdx, %rdx
    jnz 1b
    PRINT "svmloop: "
    mov %r12, %rdi
    call putdec
    PRINT " CPUID exits\n"
    jmp 1b
3:  PRINT "svmloop: L2 done after "
    mov %r12, %rdi
    call putdec
    PRINT " exits, sum of L1's answers "
    mov l2_regs + 8 * 3(%rip), %rdi
    call putdec
    mov $'\n', %edi
    call putc
    xor %eax, %eax
    pop %r12
    pop %rbx
    ret
9:  PRINT "svmloop: VMRUN failed or an unexpected #VMEXIT\n"
    mov $1, %eax
    pop %r12
    pop %rbx
    ret

/* L2: LOOP_EXITS CPUIDs, summing EBX, then VMMCALL with the sum in RBX */
l2_loop:
    xor %r12d, %r12d
    xor %r13d, %r13d
1:  mov $0x40001234, %eax
    cpuid
    add %rbx, %r13
    inc %r12d
    cmp $LOOP_EXITS, %r12d
    jb 1b
    mov %r13, %rbx
    vmmcall
    ud2
