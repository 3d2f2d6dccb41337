/*
 * demo.S - the guest behind `nestvisor demo`.
 *
 * A short long-mode workload that makes the engine do a little of
 * everything, narrating on COM1: port I/O, MSR and control-register traps,
 * exceptions through the IDT, a CPUID/RDTSC loop, an APIC timer interrupt
 * woken from hlt. Exits through debug-exit with 0 (process status 1 under
 * QEMU). Every line starts with "demo:" so it is easy to pick out.
 */

.include "runtime.h"

.set LOOP_ITERATIONS, 1000
.set POST_PORT, 0x80                /* PC POST diagnostic port: written, never read back */
.set UNASSIGNED_PORT, 0x278

/* "label: 0x<value of rdi>\n" */
.macro SHOW label:vararg
    push %rdi
    PRINT \label
    pop %rdi
    call puthex
    mov $'\n', %edi
    call putc
.endm

/* "label<decimal value of rdi>\n" */
.macro SHOW_DEC label:vararg
    push %rdi
    PRINT \label
    pop %rdi
    call putdec
    mov $'\n', %edi
    call putc
.endm

    .globl main
main:
    push %rbx
    push %r12
    push %r13
    PRINT "demo: nestvisor demo guest, in 64-bit long mode\n"

    /* Port I/O: every in/out is a KVM_EXIT_IO for the VMM */
    mov $POST_PORT, %dx
    mov $0x42, %al
    out %al, %dx
    mov $UNASSIGNED_PORT, %dx
    in %dx, %al
    movzbl %al, %edi
    SHOW "demo: port I/O: out 0x42 to port 0x80; in from unassigned port 0x278 = "

    /* CPUID */
    xor %eax, %eax
    xor %ecx, %ecx
    cpuid
    mov %ebx, vendor(%rip)
    mov %edx, vendor + 4(%rip)
    mov %ecx, vendor + 8(%rip)
    PRINT "demo: cpuid vendor: "
    lea vendor(%rip), %rdi
    call puts
    mov $'\n', %edi
    call putc

    /* MSR traps */
    RDMSR64 MSR_EFER
    mov %rax, %rdi
    SHOW "demo: rdmsr IA32_EFER = "
    mov $MSR_KERNEL_GS_BASE, %ecx
    mov $0xffff8000, %edx
    mov $0xcafe0000, %eax
    wrmsr
    RDMSR64 MSR_KERNEL_GS_BASE
    mov %rax, %rdi
    SHOW "demo: wrmsr/rdmsr IA32_KERNEL_GS_BASE = "
    RDMSR64 MSR_APIC_BASE
    mov %rax, %rdi
    SHOW "demo: rdmsr IA32_APIC_BASE = "

    /* Control-register traps */
    mov %cr0, %rdi
    SHOW "demo: cr0 = "
    mov %cr4, %rdi
    SHOW "demo: cr4 = "
    mov $2, %eax
    mov %rax, %cr8
    mov %cr8, %rdi
    SHOW "demo: mov 2 to cr8, read back "
    xor %eax, %eax
    mov %rax, %cr8

    /* Exceptions: delivered through the IDT, recorded, resumed (runtime.h TRY) */
    TRY ud2
    mov exc_rip(%rip), %rdi
    SHOW "demo: #UD (vector 6) caught at rip "
    TRY int3
    mov exc_rsp(%rip), %rdi
    SHOW "demo: #BP (vector 3) on the IST1 stack, rsp "
    mov $0xdeadbeef, %ecx
    TRY rdmsr
    mov exc_vector(%rip), %rdi
    SHOW "demo: rdmsr of unknown MSR 0xdeadbeef: exception vector (-1: none) "
    mov $NP_PAGE + 0x10, %rbx
    TRY mov (%rbx), %rax
    mov exc_cr2(%rip), %rdi
    SHOW "demo: #PF (vector 14) on a not-present page, cr2 "

    /* A loop of trapping instructions: each CPUID and RDTSC exits to the engine */
    rdtsc
    shl $32, %rdx
    or %rax, %rdx
    mov %rdx, %r12
    mov $LOOP_ITERATIONS, %r13d
1:  xor %eax, %eax
    xor %ecx, %ecx
    cpuid
    rdtsc
    dec %r13d
    jnz 1b
    shl $32, %rdx
    or %rax, %rdx
    sub %r12, %rdx
    mov %rdx, %rdi
    SHOW_DEC "demo: 1000 x (cpuid; rdtsc) took TSC ticks: "

    /* APIC timer: a 1 ms one-shot, slept through with hlt */
    call apic_enable
    movl $0, irq_count + VEC_TIMER * 4(%rip)
    rdtsc
    shl $32, %rdx
    or %rax, %rdx
    mov %rdx, %r12
    mov $1000000, %edi
    call apic_timer_oneshot
    mov $100, %ebx                  /* bounded: a broken timer ends the demo, not hangs it */
2:  cmpl $0, irq_count + VEC_TIMER * 4(%rip)
    jne 3f
    sti
    hlt
    cli
    dec %ebx
    jnz 2b
3:  rdtsc
    shl $32, %rdx
    or %rax, %rdx
    sub %r12, %rdx
    mov %rdx, %rdi
    SHOW_DEC "demo: APIC timer interrupt (vector 0x40) woke hlt after TSC ticks: "

    PRINT "demo: done, exiting with code 0\n"
    xor %eax, %eax
    pop %r13
    pop %r12
    pop %rbx
    ret

    .data
vendor: .long 0, 0, 0, 0
