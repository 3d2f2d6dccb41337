/*
 * runtime.h - boot and run-time support shared by the bundled guests.
 *
 * A guest .S file does `.include "runtime.h"` and defines `main` (64-bit,
 * returns the debug-exit code in %eax). This file provides:
 *
 *   - the multiboot v1 header and the 32-bit entry `start` (EAX=0x2BADB002,
 *     EBX=mbi, paging off), which records the entry state in boot_*;
 *   - a GDT (32-bit code, data, 64-bit code, 64-bit TSS with IST1, and
 *     ring-3 data and 64-bit code),
 *     identity page tables (first 1 GiB with 2 MiB pages, the region at
 *     2 MiB with 4 KiB pages holding a not-present and a read-only test
 *     page, and the 2 MiB page of the xAPIC), and the switch to long mode;
 *   - an IDT with one stub per vector (all 256) and a common handler that
 *     records exceptions in exc_* and resumes (see TRY), counts interrupts
 *     in irq_count[] and EOIs them; #BP runs on IST1;
 *   - COM1 output, the xAPIC, fw_cfg, debug-exit, and AP start-up
 *     (INIT/SIPI to a real-mode trampoline at AP_TRAMPOLINE).
 *
 * Calling convention: System V (args in rdi, rsi; result in rax; rax, rcx,
 * rdx, rsi, rdi, r8-r11 are clobbered; rbx, rbp, r12-r15 are preserved).
 */

.include "defs.h"

/* ------------------------------------------------------------------ */
/* Multiboot header: must sit in the first 8 KiB, 4-byte aligned (spec 3.1.1) */

    .section .multiboot, "a"
    .balign 4
multiboot_header:
    .long MB_HEADER_MAGIC
    .long MB_HEADER_FLAGS
    .long -(MB_HEADER_MAGIC + MB_HEADER_FLAGS)

/* ------------------------------------------------------------------ */
/* 32-bit entry */

    .text
    .code32
    .globl start
start:
    cld                             /* multiboot does not promise DF=0 */
    mov %eax, boot_eax              /* kept for the selftest's entry-state check */
    mov %ebx, boot_ebx
    mov %cr0, %ecx
    mov %ecx, boot_cr0
    /* Zero the bss ourselves: stack and page tables live there, and the
     * result must not depend on how carefully the loader cleared it. */
    mov $__bss_start, %edi
    mov $_end, %ecx
    sub %edi, %ecx
    shr $2, %ecx
    xor %eax, %eax
    rep stosl
    mov $bsp_stack_top, %esp
    pushfl
    popl boot_eflags

    lgdt gdt_desc                   /* the loader's GDT may be anywhere, even under our trampoline */
    mov $SEL_DATA, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
    ljmp $SEL_CODE32, $1f
1:
    call build_page_tables
    mov $bsp_start64, %edi
    jmp enter_long_mode

/*
 * Page tables. PML4[0] -> PDPT; PDPT[0] -> pd_low (1 GiB, 2 MiB pages);
 * pd_low[1] -> pt_small (the 2 MiB at SMALL_REGION in 4 KiB pages, so one
 * page can be not present and one read-only); PDPT[3] -> pd_apic, which
 * maps only the 2 MiB page holding the xAPIC, uncached (SDM 11.4.1).
 * Upper dwords stay zero from the bss clear.
 */
build_page_tables:
    movl $pdpt + PTE_P + PTE_RW, pml4
    movl $pd_low + PTE_P + PTE_RW, pdpt
    movl $pd_apic + PTE_P + PTE_RW, pdpt + 3 * 8
    xor %ecx, %ecx
1:  mov %ecx, %eax
    shl $21, %eax
    or $PTE_P + PTE_RW + PTE_PS, %eax
    mov %eax, pd_low(, %ecx, 8)
    inc %ecx
    cmp $512, %ecx
    jb 1b
    movl $pt_small + PTE_P + PTE_RW, pd_low + (SMALL_REGION >> 21) * 8
    xor %ecx, %ecx
2:  mov %ecx, %eax
    shl $12, %eax
    add $SMALL_REGION + PTE_P + PTE_RW, %eax
    mov %eax, pt_small(, %ecx, 8)
    inc %ecx
    cmp $512, %ecx
    jb 2b
    movl $0, pt_small + ((NP_PAGE - SMALL_REGION) >> 12) * 8
    movl $RO_PAGE + PTE_P, pt_small + ((RO_PAGE - SMALL_REGION) >> 12) * 8
    movl $APIC_BASE_ADDR + PTE_P + PTE_RW + PTE_PS + PTE_PWT + PTE_PCD, pd_apic + ((APIC_BASE_ADDR >> 21) & 511) * 8
    ret

/*
 * PAE, CR3, EFER.LME, then CR0.PG activates IA-32e mode (SDM 9.8.5);
 * the far return loads the 64-bit CS. In: %edi = 64-bit entry point.
 * Shared by the BSP and the APs, so it must not use the stack for data
 * beyond the far-return frame.
 */
enter_long_mode:
    mov %cr4, %eax
    or $CR4_PAE, %eax
    mov %eax, %cr4
    mov $pml4, %eax
    mov %eax, %cr3
    mov $MSR_EFER, %ecx
    rdmsr
    or $EFER_LME, %eax
    wrmsr
    mov %cr0, %eax
    or $CR0_PG + CR0_WP + CR0_PE, %eax   /* WP: the read-only page must fault in ring 0 */
    mov %eax, %cr0
    push $SEL_CODE64
    push %edi
    lret

/* ------------------------------------------------------------------ */
/* 64-bit BSP start */

    .code64
bsp_start64:
    mov $SEL_DATA, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $bsp_stack_top, %rsp
    call pic_mask_all
    call setup_tss
    call setup_idt
    call serial_init
    call main
    mov %eax, %edi
    jmp exit

/*
 * Mask both 8259 PICs. Firmware leaves them at the BIOS vector base 8, with
 * the PIT on IRQ0 and LINT0 in ExtINT mode, so the first sti would take a
 * PIT tick as vector 8, indistinguishable from #DF (as kvm-unit-tests, we
 * mask everything; the guests use only the local APIC).
 */
pic_mask_all:
    mov $0xff, %al
    out %al, $0x21                  /* master PIC OCW1 (IMR) */
    out %al, $0xa1                  /* slave PIC OCW1 */
    ret

/*
 * The TSS descriptor's base is split over four fields, which the linker
 * cannot do with relocations, so it is written here (SDM 8.2.3, fig. 8-4).
 */
setup_tss:
    lea tss(%rip), %rax
    movq $bsp_stack_top, tss + 4(%rip)     /* RSP0: unused (we stay in ring 0) but defined */
    movq $ist1_top, tss + 36(%rip)         /* IST1 */
    movw $tss_end - tss, tss + 102(%rip)   /* I/O map base past the limit: no bitmap */
    lea gdt_tss(%rip), %rdi
    mov %rax, %rdx
    movw $tss_end - tss - 1, (%rdi)        /* limit 15:0 */
    mov %ax, 2(%rdi)                       /* base 15:0 */
    shr $16, %rdx
    mov %dl, 4(%rdi)                       /* base 23:16 */
    movb $0x89, 5(%rdi)                    /* P=1, DPL=0, type 9: available 64-bit TSS */
    movb $0, 6(%rdi)                       /* limit 19:16 = 0, G=0 */
    mov %dh, 7(%rdi)                       /* base 31:24 */
    shr $16, %rdx
    mov %edx, 8(%rdi)                      /* base 63:32 */
    movl $0, 12(%rdi)
    mov $SEL_TSS, %ax
    ltr %ax
    ret

/* 64-bit interrupt gates (type 0xE: IF cleared on entry), one per stub (SDM 6.14.1) */
setup_idt:
    lea idt(%rip), %rdi
    lea isr_stubs(%rip), %rsi
    xor %ecx, %ecx
1:  mov %rsi, %rax
    mov %ax, (%rdi)                 /* offset 15:0 */
    movw $SEL_CODE64, 2(%rdi)
    movb $0, 4(%rdi)                /* IST */
    movb $0x8E, 5(%rdi)             /* P=1, DPL=0, 64-bit interrupt gate */
    shr $16, %rax
    mov %ax, 6(%rdi)                /* offset 31:16 */
    shr $16, %rax
    mov %eax, 8(%rdi)               /* offset 63:32 */
    movl $0, 12(%rdi)
    add $16, %rdi
    add $ISR_STUB_SIZE, %rsi
    inc %ecx
    cmp $256, %ecx
    jb 1b
    /* #BP switches to IST1 so the selftest can observe the stack switch (SDM 6.14.5) */
    movb $1, idt + 3 * 16 + 4(%rip)
    lidt idt_desc(%rip)
    ret

/* ------------------------------------------------------------------ */
/* Interrupt stubs: one 16-byte slot per vector, so stub(v) = isr_stubs + 16 v.
 * Vectors without a CPU-pushed error code push a 0 so every frame looks alike. */

.set ISR_STUB_SIZE, 16
    .balign ISR_STUB_SIZE
isr_stubs:
.set vec, 0
.rept 256
    .balign ISR_STUB_SIZE
    /* vectors that push an error code: SDM 6.3.1, table 6-1 */
    .if !((vec == 8) || (vec >= 10 && vec <= 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30))
    push $0
    .endif
    push $vec
    jmp intr_common
.set vec, vec + 1
.endr

/*
 * Frame on entry, after the 9 saved registers (72 bytes):
 *   72 vector, 80 error code, 88 RIP, 96 CS, 104 RFLAGS, 112 RSP, 120 SS
 *
 * Exceptions (vectors 0-31 and the int $0x80 software interrupt) are
 * recorded in exc_*. If a TRY is armed, the handler resumes at try_end,
 * which skips a faulting instruction without decoding its length. Unarmed
 * traps (#DB, #BP, #OF, int $0x80) resume after the instruction as the CPU
 * left RIP; any other unarmed exception is a bug in the guest or the
 * engine, reported as "Bail out!" rather than retried forever.
 *
 * Other vectors are interrupts: counted in irq_count[vector], answered
 * (VEC_PING sends VEC_PONG to the BSP) and EOI'd, except the spurious vector,
 * which must not be EOI'd (SDM 11.9).
 */
intr_common:
    push %rax
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %r8
    push %r9
    push %r10
    push %r11
    mov 72(%rsp), %rax
    cmp $32, %rax
    jb .Lexception
    cmp $VEC_SYSCALL, %rax
    je .Lexception

    lea irq_count(%rip), %rcx
    lock incl (%rcx, %rax, 4)
    cmp $VEC_SPURIOUS, %eax
    je .Lintr_out
    cmp $VEC_PING, %eax
    jne 1f
    xor %edi, %edi                  /* APIC ID 0: the BSP */
    mov $VEC_PONG + ICR_FIXED + ICR_ASSERT, %esi
    call apic_send_ipi
1:  mov $APIC_EOI, %edi
    xor %esi, %esi
    call apic_write
    jmp .Lintr_out

.Lexception:
    mov %rax, exc_vector(%rip)
    mov 80(%rsp), %rcx
    mov %rcx, exc_error(%rip)
    mov 88(%rsp), %rcx
    mov %rcx, exc_rip(%rip)
    lea 88(%rsp), %rcx              /* RSP right after delivery: where the CPU pushed RIP */
    mov %rcx, exc_rsp(%rip)
    mov %cr2, %rcx
    mov %rcx, exc_cr2(%rip)
    incq exc_count(%rip)
    cmpb $0, try_armed(%rip)
    je 2f
    movb $0, try_armed(%rip)
    mov try_end(%rip), %rcx
    mov %rcx, 88(%rsp)
    jmp .Lintr_out
2:  cmp $1, %eax                    /* #DB, #BP, #OF: traps, RIP already past the instruction */
    je .Lintr_out
    cmp $3, %eax
    je .Lintr_out
    cmp $4, %eax
    je .Lintr_out
    cmp $VEC_SYSCALL, %eax
    je .Lintr_out
    jmp bail_unexpected

.Lintr_out:
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rax
    add $16, %rsp                   /* vector and error code */
    iretq

/* Print "V error E rip R cr2 C" for the last exception taken (shared by the bail-out
 * path and the selftest's failure lines). */
put_last_exception:
    mov exc_vector(%rip), %rdi
    call puthex
    lea msg_err(%rip), %rdi
    call puts
    mov exc_error(%rip), %rdi
    call puthex
    lea msg_rip(%rip), %rdi
    call puts
    mov exc_rip(%rip), %rdi
    call puthex
    lea msg_cr2(%rip), %rdi
    call puts
    mov exc_cr2(%rip), %rdi
    jmp puthex

bail_unexpected:
    lea msg_bail(%rip), %rdi
    call puts
    call put_last_exception
    mov $'\n', %edi
    call putc
    mov $EXIT_ABORT, %edi
    jmp exit

/* Forget the last exception (called by TRY). */
exc_reset:
    movq $-1, exc_vector(%rip)
    movq $0, exc_error(%rip)
    movq $0, exc_rip(%rip)
    movq $0, exc_rsp(%rip)
    movq $0, exc_cr2(%rip)
    movq $0, exc_count(%rip)
    ret

/*
 * TRY insn: execute one instruction that may fault. If it does, the handler
 * records the exception and continues after the instruction (try_end);
 * try_start is the instruction's address, which a fault must report as RIP.
 */
.macro TRY insn:vararg
    call exc_reset
    movq $.Ltry_start\@, try_start(%rip)
    movq $.Ltry_end\@, try_end(%rip)
    movb $1, try_armed(%rip)
.Ltry_start\@:
    \insn
.Ltry_end\@:
    movb $0, try_armed(%rip)
.endm

/* PRINT "text": a string literal to COM1 */
.macro PRINT text:vararg
    .pushsection .rodata
.Ltext\@: .asciz \text
    .popsection
    lea .Ltext\@(%rip), %rdi
    call puts
.endm

/* rdmsr with the 64-bit result in rax (ecx = MSR) */
.macro RDMSR64 msr
    mov $\msr, %ecx
    rdmsr
    shl $32, %rdx
    or %rdx, %rax
.endm

/* ------------------------------------------------------------------ */
/* COM1 output */

serial_init:
    mov $COM1 + 3, %dx              /* LCR: DLAB=1 to set the divisor */
    mov $0x80, %al
    out %al, %dx
    mov $COM1 + 0, %dx              /* divisor 1: 115200 baud */
    mov $1, %al
    out %al, %dx
    mov $COM1 + 1, %dx
    xor %al, %al
    out %al, %dx
    mov $COM1 + 3, %dx              /* 8N1, DLAB=0 */
    mov $3, %al
    out %al, %dx
    mov $COM1 + 1, %dx              /* IER: no interrupts, we poll */
    xor %al, %al
    out %al, %dx
    mov $COM1 + 2, %dx              /* FCR */
    out %al, %dx
    mov $COM1 + 4, %dx              /* MCR: DTR, RTS */
    mov $3, %al
    out %al, %dx
    ret

/* putc(dil). The THRE poll is bounded so a missing UART cannot hang us. */
putc:
    mov $100000, %ecx
    mov $UART_LSR, %dx
1:  in %dx, %al
    test $LSR_THRE, %al
    jnz 2f
    dec %ecx
    jnz 1b
2:  mov $COM1, %dx
    mov %edi, %eax
    out %al, %dx
    ret

/* puts(rdi = NUL-terminated string) */
puts:
    push %rbx
    mov %rdi, %rbx
1:  movzbl (%rbx), %edi
    test %edi, %edi
    jz 2f
    call putc
    inc %rbx
    jmp 1b
2:  pop %rbx
    ret

/* putdec(rdi): unsigned decimal */
putdec:
    push %rbx
    sub $32, %rsp
    lea 31(%rsp), %rbx
    movb $0, (%rbx)
    mov %rdi, %rax
    mov $10, %ecx
1:  xor %edx, %edx
    div %rcx
    add $'0', %dl
    dec %rbx
    mov %dl, (%rbx)
    test %rax, %rax
    jnz 1b
    mov %rbx, %rdi
    call puts
    add $32, %rsp
    pop %rbx
    ret

/* puthex(rdi): 0x-prefixed, no leading zeros */
puthex:
    push %rbx
    sub $32, %rsp
    lea 31(%rsp), %rbx
    movb $0, (%rbx)
    mov %rdi, %rax
1:  mov %eax, %edx
    and $15, %edx
    lea hexdigits(%rip), %rcx
    movzbl (%rcx, %rdx), %edx
    dec %rbx
    mov %dl, (%rbx)
    shr $4, %rax
    jnz 1b
    dec %rbx
    movb $'x', (%rbx)
    dec %rbx
    movb $'0', (%rbx)
    mov %rbx, %rdi
    call puts
    add $32, %rsp
    pop %rbx
    ret

/* exit(edi): QEMU isa-debug-exit; if nothing is there, stop for good. */
exit:
    mov %edi, %eax
    mov $DEBUG_EXIT_PORT, %dx
    out %eax, %dx
    cli
1:  hlt
    jmp 1b

/* ------------------------------------------------------------------ */
/* xAPIC (MMIO at APIC_BASE_ADDR; the address does not fit a sign-extended
 * disp32, so it goes through a register) */

/* apic_read(edi = register offset) -> eax */
apic_read:
    mov $APIC_BASE_ADDR, %eax
    mov %edi, %edi
    mov (%rax, %rdi), %eax
    ret

/* apic_write(edi = register offset, esi = value) */
apic_write:
    mov $APIC_BASE_ADDR, %eax
    mov %edi, %edi
    mov %esi, (%rax, %rdi)
    ret

/* Software-enable the APIC with the spurious vector VEC_SPURIOUS (SDM 11.4.7.2). */
apic_enable:
    mov $APIC_SPIV, %edi
    mov $APIC_SPIV_ENABLE + VEC_SPURIOUS, %esi
    jmp apic_write

/* apic_send_ipi(edi = destination APIC ID, esi = ICR low dword).
 * ICR2 first: writing the low dword is what sends (SDM 11.6.1). */
apic_send_ipi:
    push %rsi
    shl $24, %edi
    mov %edi, %esi
    mov $APIC_ICR2, %edi
    call apic_write
    pop %rsi
    mov $APIC_ICR, %edi
    call apic_write
    mov $100000, %r8d               /* bounded wait for delivery status idle */
1:  mov $APIC_ICR, %edi
    call apic_read
    test $ICR_BUSY, %eax
    jz 2f
    dec %r8d
    jnz 1b
2:  ret

/* apic_timer_oneshot(edi = initial count, divide by 1, vector VEC_TIMER) */
apic_timer_oneshot:
    push %rdi
    mov $APIC_TDCR, %edi
    mov $TDCR_DIV1, %esi
    call apic_write
    mov $APIC_LVTT, %edi
    mov $VEC_TIMER, %esi
    call apic_write
    pop %rsi
    mov $APIC_TMICT, %edi
    jmp apic_write

/* Writing 0 to the initial count stops the timer (SDM 11.5.4). */
apic_timer_stop:
    mov $APIC_TMICT, %edi
    xor %esi, %esi
    jmp apic_write

/*
 * wait_nonzero(rdi = address of a u32, esi = budget in 1 ms slices) -> eax
 * Sleep in hlt until *rdi != 0; a 1 ms one-shot timer bounds each sleep, so
 * a lost wake-up costs at most the budget instead of hanging. Needs the APIC
 * enabled. Returns the value (0 on time-out). sti;hlt: the STI shadow makes
 * the pair atomic, so a wake-up cannot slip in between (SDM STI).
 */
wait_nonzero:
    push %rbx
    push %r12
    mov %rdi, %rbx
    mov %esi, %r12d
1:  mov (%rbx), %eax
    test %eax, %eax
    jnz 2f
    test %r12d, %r12d
    jz 2f
    dec %r12d
    mov $1000000, %edi
    call apic_timer_oneshot
    sti
    hlt
    cli
    jmp 1b
2:  push %rax
    call apic_timer_stop
    pop %rax
    pop %r12
    pop %rbx
    ret

/* ------------------------------------------------------------------ */
/* fw_cfg: 16-bit selector write, then byte reads, little endian */

/* fw_cfg_read32(edi = key) -> eax */
fw_cfg_read32:
    mov %edi, %eax
    mov $FW_CFG_CTL, %dx
    out %ax, %dx
    mov $FW_CFG_DATA, %dx
    xor %ecx, %ecx
    xor %esi, %esi
1:  in %dx, %al
    movzbl %al, %eax
    shl %cl, %eax
    or %eax, %esi
    add $8, %ecx
    cmp $32, %ecx
    jb 1b
    mov %esi, %eax
    ret

/* ------------------------------------------------------------------ */
/* AP start-up */

/*
 * smp_start_ap(edi = APIC ID): copy the trampoline below 1 MiB and send
 * INIT then STARTUP (SDM 8.4.4.1). A second STARTUP is sent only if the
 * first did not bring the AP online, as the SDM's sequence allows.
 * Returns eax = ap_online after at most ~200 ms.
 */
smp_start_ap:
    push %rbx
    mov %edi, %ebx
    lea ap_trampoline(%rip), %rsi
    mov $AP_TRAMPOLINE, %edi
    mov $ap_trampoline_end - ap_trampoline, %ecx
    rep movsb
    mov %ebx, %edi
    mov $ICR_INIT + ICR_ASSERT, %esi
    call apic_send_ipi
    mov $10000, %edi                  /* SDM 9.4.4.1: a delay between INIT and SIPI (10 us) */
    call apic_timer_oneshot
    sti
    hlt
    cli
    call apic_timer_stop
    mov %ebx, %edi
    mov $ICR_STARTUP + ICR_ASSERT + SIPI_VECTOR, %esi
    call apic_send_ipi
    lea ap_online(%rip), %rdi
    mov $100, %esi
    call wait_nonzero
    test %eax, %eax
    jnz 1f
    mov %ebx, %edi
    mov $ICR_STARTUP + ICR_ASSERT + SIPI_VECTOR, %esi
    call apic_send_ipi
    lea ap_online(%rip), %rdi
    mov $100, %esi
    call wait_nonzero
1:  pop %rbx
    ret

/*
 * Real-mode trampoline, copied to AP_TRAMPOLINE; the SIPI starts the AP at
 * CS=SIPI_VECTOR<<8, IP=0 (SDM 8.4.4.1). Position independent: data is
 * addressed relative to the copy through DS=CS.
 */
    .code16
ap_trampoline:
    cli
    mov %cs, %ax
    mov %ax, %ds
    lgdtl ap_gdt_desc - ap_trampoline
    mov %cr0, %eax
    or $CR0_PE, %eax
    mov %eax, %cr0
    ljmpl $SEL_CODE32, $ap_start32
    .balign 4
ap_gdt_desc:
    .word gdt_end - gdt - 1
    .long gdt
ap_trampoline_end:

    .code32
ap_start32:
    mov $SEL_DATA, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
    mov $ap_stack_top, %esp
    mov $ap_start64, %edi
    jmp enter_long_mode

    .code64
/* The AP shares the page tables and the IDT; it has no TR loaded, so it
 * must not take an IST exception (#BP). It only ever takes interrupts. */
ap_start64:
    mov $ap_stack_top, %rsp
    lidt idt_desc(%rip)
    call apic_enable
    mov $APIC_ID, %edi
    call apic_read
    shr $24, %eax
    mov %eax, ap_apic_id(%rip)
    mov $MSR_EFER, %ecx
    rdmsr
    mov %eax, ap_efer(%rip)
    lock incl ap_online(%rip)
    sti
1:  hlt
    jmp 1b

/* ------------------------------------------------------------------ */
/* Data */

    .section .rodata
hexdigits: .ascii "0123456789abcdef"
msg_bail:  .asciz "Bail out! unexpected exception vector "
msg_err:   .asciz " error "
msg_rip:   .asciz " rip "
msg_cr2:   .asciz " cr2 "

    .data
    .balign 8
/* Entry state as the loader left it (upper halves stay 0). */
boot_eax:    .quad 0
boot_ebx:    .quad 0
boot_cr0:    .quad 0
boot_eflags: .quad 0

/* GDT: SDM 3.4.5; the 64-bit code segment has L=1, D=0 (SDM 5.2.1) */
    .balign 16
gdt:
    .quad 0                         /* 0x00 null */
    .quad 0x00CF9A000000FFFF        /* 0x08 32-bit code, flat */
    .quad 0x00CF92000000FFFF        /* 0x10 data, flat */
    .quad 0x00AF9A000000FFFF        /* 0x18 64-bit code */
    .quad 0                         /* 0x20 unused */
gdt_tss:
    .quad 0, 0                      /* 0x28 64-bit TSS (16 bytes), written by setup_tss */
    .quad 0x00CFF2000000FFFF        /* 0x38 data, DPL 3 */
    .quad 0x00AFFA000000FFFF        /* 0x40 64-bit code, DPL 3 */
gdt_end:

/* lgdt reads a 32-bit base in 32-bit code and 64 bits in long mode */
gdt_desc:
    .word gdt_end - gdt - 1
    .quad gdt
idt_desc:
    .word 256 * 16 - 1
    .quad idt

/* The last exception, written by intr_common */
exc_vector: .quad -1
exc_error:  .quad 0
exc_rip:    .quad 0
exc_rsp:    .quad 0
exc_cr2:    .quad 0
exc_count:  .quad 0
try_start:  .quad 0
try_end:    .quad 0
try_armed:  .byte 0

    .balign 4
ap_online:  .long 0
ap_apic_id: .long -1
ap_efer:    .long 0

    .bss
    .balign 4096
pml4:       .skip 4096
pdpt:       .skip 4096
pd_low:     .skip 4096
pt_small:   .skip 4096
pd_apic:    .skip 4096
idt:        .skip 256 * 16
tss:        .skip 104
tss_end:
    .balign 16
irq_count:  .skip 256 * 4
    .balign 16
bsp_stack:  .skip 16384
bsp_stack_top:
ap_stack:   .skip 8192
ap_stack_top:
ist1_stack: .skip 4096
ist1_top:

    .text

/* L2's general registers but RAX and RSP (which VMCS/VMCB fields carry), kept by an L1 in
 * `l2_regs` (16 quads, the x86 register order) across VM entry and exit */
.macro L2_GPRS_LOAD
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
.endm

.macro L2_GPRS_STORE
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
.endm
