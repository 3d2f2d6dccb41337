/*
 * vmxbench.S - the nested round trip `nestvisor bench` times: L2 executes CPUID
 * BENCH_LOOPS times; each one exits to this L1, whose handler advances L2's RIP
 * (a VMREAD of the instruction length, a VMREAD and a VMWRITE of GUEST_RIP) and
 * resumes it (vm_enter: VMRESUME, then a VMREAD of the exit reason). L2 ends
 * with VMCALL.
 */

.include "runtime.h"
.include "vmx.h"

.set BENCH_LOOPS, 1000

    .text
    .globl main
main:
    push %rbx
    call vmx_enable
    test %eax, %eax
    jnz 9f
    lea l2_cpuid_loop(%rip), %rdi
    call vmcs_setup
    mov $1, %edi
1:  call vm_enter
    cmp $EXIT_CPUID, %rax
    jne 2f
    call skip_l2_insn
    xor %edi, %edi
    jmp 1b
2:  cmp $EXIT_VMCALL, %rax
    jne 9f
    vmxoff
    xor %eax, %eax
    pop %rbx
    ret
9:  mov $1, %eax
    pop %rbx
    ret

l2_cpuid_loop:
    mov $BENCH_LOOPS, %ebx
1:  xor %eax, %eax
    cpuid
    dec %ebx
    jnz 1b
    vmcall
    ud2
