/*
 * selftest.S - nestvisor's conformance guest.
 *
 * Boots by multiboot, enters long mode on its own (runtime.h), then runs
 * one check per TAP line on COM1:
 *     ok N - name
 *     not ok N - name (got G want W; last exception vec V err E rip R cr2 C)
 *     ok N - name # SKIP reason
 * and finishes with "1..N", "# skip S", "# pass P fail F" and the exit
 * code on the debug-exit port (0: all passed, 1: a failure; 63 after
 * "Bail out!"). Each check names the rule it exercises.
 */

.include "runtime.h"

/* ------------------------------------------------------------------ */
/* TAP helpers. A test is a function: TEST_BEGIN, EXPECT_*..., REPORT.
 * The EXPECT macros use rax and rcx as scratch; keep test values in
 * rbx, rbp or r12-r15. The first failed expectation is kept as the
 * failure's detail. */

.macro TEST_BEGIN
    movb $1, test_ok(%rip)
.endm

/* fail with got=rax, want=rcx, unless a failure is already recorded */
.macro FAIL_WITH_RAX_RCX
    cmpb $0, test_ok(%rip)
    je .Lfail_keep\@
    movb $0, test_ok(%rip)
    mov %rax, fail_got(%rip)
    mov %rcx, fail_want(%rip)
.Lfail_keep\@:
.endm

/* got == want (operands: $imm, %reg other than rax/rcx, or mem) */
.macro EXPECT_EQ got, want
    mov \got, %rax
    mov \want, %rcx
    cmp %rcx, %rax
    je .Lok\@
    FAIL_WITH_RAX_RCX
.Lok\@:
.endm

/* (got & mask) == want */
.macro EXPECT_MASK got, mask, want
    mov \got, %rax
    mov $\mask, %rcx
    and %rcx, %rax
    mov $\want, %rcx
    cmp %rcx, %rax
    je .Lok\@
    FAIL_WITH_RAX_RCX
.Lok\@:
.endm

/* got < want, unsigned */
.macro EXPECT_BELOW got, want
    mov \got, %rax
    mov \want, %rcx
    cmp %rcx, %rax
    jb .Lok\@
    FAIL_WITH_RAX_RCX
.Lok\@:
.endm

/* lo <= got < hi, unsigned */
.macro EXPECT_RANGE got, lo, hi
    mov \got, %rax
    mov \lo, %rcx
    cmp %rcx, %rax
    jb .Lbad\@
    mov \hi, %rcx
    cmp %rcx, %rax
    jb .Lok\@
.Lbad\@:
    FAIL_WITH_RAX_RCX
.Lok\@:
.endm

/* The TRY'd instruction faulted once with this vector and error code, and
 * the fault reported the instruction's own address (faults, SDM 6.5). */
.macro EXPECT_FAULT vector, error
    EXPECT_EQ exc_count(%rip), $1
    EXPECT_EQ exc_vector(%rip), $\vector
    EXPECT_EQ exc_error(%rip), $\error
    EXPECT_EQ exc_rip(%rip), try_start(%rip)
.endm

/* The TRY'd instruction trapped once with this vector; RIP is the next
 * instruction (traps and software interrupts, SDM 6.5). */
.macro EXPECT_TRAP vector
    EXPECT_EQ exc_count(%rip), $1
    EXPECT_EQ exc_vector(%rip), $\vector
    EXPECT_EQ exc_rip(%rip), try_end(%rip)
.endm

.macro EXPECT_NO_FAULT
    EXPECT_EQ exc_count(%rip), $0
.endm

.macro REPORT name:vararg
    .pushsection .rodata
.Lname\@: .asciz \name
    .popsection
    lea .Lname\@(%rip), %rdi
    call report
.endm

.macro SKIP name, reason
    .pushsection .rodata
.Lname\@: .asciz "\name"
.Lreason\@: .asciz "\reason"
    .popsection
    lea .Lname\@(%rip), %rdi
    lea .Lreason\@(%rip), %rsi
    call report_skip
.endm

.macro COMMENT text:vararg
    .pushsection .rodata
.Ltext\@: .asciz \text
    .popsection
    lea .Ltext\@(%rip), %rdi
    call puts
.endm

/* rdmsr/wrmsr with the 64-bit value in rax (ecx = MSR) */
.macro RDMSR64 msr
    mov $\msr, %ecx
    rdmsr
    shl $32, %rdx
    or %rdx, %rax
.endm

.macro WRMSR64 msr
    mov $\msr, %ecx
    mov %rax, %rdx
    shr $32, %rdx
.endm
/* WRMSR64 only loads ecx/edx:eax so that the wrmsr itself can be TRY'd */

/* ------------------------------------------------------------------ */

    .globl main
main:
    push %rbx
    COMMENT "# nestvisor selftest\n"
    lea tests(%rip), %rbx
1:  mov (%rbx), %rax
    test %rax, %rax
    jz 2f
    call *%rax
    add $8, %rbx
    jmp 1b
2:  call tap_finish
    pop %rbx
    ret

/* The tests, in order. Order matters only where noted. */
    .section .rodata
    .balign 8
tests:
    .quad t_multiboot_entry
    .quad t_long_mode
    .quad t_ud
    .quad t_de
    .quad t_bp
    .quad t_bp_ist
    .quad t_int80
    .quad t_noncanonical
    .quad t_pf_read
    .quad t_pf_write
    .quad t_pf_ro
    .quad t_rdmsr_unknown
    .quad t_wrmsr_efer_reserved
    .quad t_cr4_reserved
    .quad t_cr0_nw
    .quad t_cr0_pg_no_pe
    .quad t_msr_pat
    .quad t_msr_sysenter_esp
    .quad t_msr_kernel_gs_base
    .quad t_pat_invalid
    .quad t_rdtsc
    .quad t_cpuid
    .quad t_cr8
    .quad t_cr8_tpr
    .quad t_port_unassigned
    .quad t_apic_base_msr
    .quad t_apic_enable              /* the tests below need the APIC enabled */
    .quad t_apic_id_version
    .quad t_apic_timer_oneshot
    .quad t_apic_timer_periodic
    .quad t_fw_cfg_cpus              /* the SMP tests below need ncpus */
    .quad t_smp_ap_online
    .quad t_smp_ipi
    .quad 0
    .text

/* ------------------------------------------------------------------ */
/* Boot and modes */

/* Multiboot spec 3.2: EAX magic, EBX the mbi, protected mode without
 * paging, IF and VM clear. */
t_multiboot_entry:
    push %rbx
    TEST_BEGIN
    EXPECT_EQ boot_eax(%rip), $MB_BOOTLOADER_MAGIC
    EXPECT_MASK boot_cr0(%rip), CR0_PE + CR0_PG, CR0_PE
    EXPECT_MASK boot_eflags(%rip), (1 << 9) + (1 << 17), 0
    mov boot_ebx(%rip), %rbx
    EXPECT_RANGE %rbx, $1, $0x100000000
    REPORT "multiboot entry state (EAX=0x2badb002, EBX=mbi, PE=1, PG=0, IF=0)"
    pop %rbx
    ret

/* SDM 9.8.5: LMA is set by CR0.PG with LME; LAR shows CS.L=1, CS.D=0 (SDM 5.2.1) */
t_long_mode:
    push %rbx
    TEST_BEGIN
    RDMSR64 MSR_EFER
    mov %rax, %rbx
    EXPECT_MASK %rbx, EFER_LME + EFER_LMA, EFER_LME + EFER_LMA
    mov %cs, %eax
    lar %ax, %ebx
    EXPECT_MASK %rbx, (1 << 21) + (1 << 22), 1 << 21
    REPORT "long mode active (EFER.LMA=1, CS.L=1, CS.D=0)"
    pop %rbx
    ret

/* ------------------------------------------------------------------ */
/* Exceptions through the IDT */

t_ud:
    TEST_BEGIN
    TRY ud2
    EXPECT_FAULT 6, 0
    /* IST=0 gate in ring 0: no stack switch (SDM 6.14.2) */
    lea bsp_stack(%rip), %r8
    lea bsp_stack_top(%rip), %r9
    EXPECT_RANGE exc_rsp(%rip), %r8, %r9
    REPORT "#UD from ud2, delivered on the current stack"
    ret

t_de:
    TEST_BEGIN
    mov $1, %eax
    xor %edx, %edx
    xor %ecx, %ecx
    TRY div %ecx
    EXPECT_FAULT 0, 0
    REPORT "#DE from div by 0"
    ret

t_bp:
    TEST_BEGIN
    TRY int3
    EXPECT_TRAP 3
    REPORT "#BP from int3 (RIP after int3)"
    ret

/* SDM 6.14.5: the IST pointer is loaded unconditionally, then aligned to 16
 * (SDM 6.14.2), and SS, RSP, RFLAGS, CS, RIP are pushed: 40 bytes. */
t_bp_ist:
    TEST_BEGIN
    TRY int3
    EXPECT_TRAP 3
    lea ist1_top - 40(%rip), %r8
    EXPECT_EQ exc_rsp(%rip), %r8
    REPORT "#BP through an IST1 gate runs on the IST1 stack"
    ret

t_int80:
    TEST_BEGIN
    TRY int $VEC_SYSCALL
    EXPECT_TRAP VEC_SYSCALL
    REPORT "int $0x80 software interrupt"
    ret

/* SDM 3.3.7.1: a non-canonical data reference (not via SS) is #GP(0) */
t_noncanonical:
    push %rbx
    TEST_BEGIN
    mov $0x8000000000000000, %rbx
    TRY mov (%rbx), %rax
    EXPECT_FAULT 13, 0
    REPORT "#GP(0) on a non-canonical address"
    pop %rbx
    ret

/* SDM 4.7: error code P=0 W/R=0 for a read of a not-present page, CR2 = address */
t_pf_read:
    push %rbx
    TEST_BEGIN
    mov $NP_PAGE + 0x123, %rbx
    TRY mov (%rbx), %rax
    EXPECT_FAULT 14, 0
    EXPECT_EQ exc_cr2(%rip), %rbx
    REPORT "#PF(0) on read of a not-present page, CR2 = address"
    pop %rbx
    ret

t_pf_write:
    push %rbx
    TEST_BEGIN
    mov $NP_PAGE + 0x456, %rbx
    TRY movl $1, (%rbx)
    EXPECT_FAULT 14, 2
    EXPECT_EQ exc_cr2(%rip), %rbx
    REPORT "#PF(W) on write to a not-present page, CR2 = address"
    pop %rbx
    ret

/* SDM 4.6.1: with CR0.WP=1 supervisor writes honour R/W; error P|W */
t_pf_ro:
    push %rbx
    TEST_BEGIN
    mov $RO_PAGE + 8, %rbx
    TRY mov (%rbx), %rax
    EXPECT_NO_FAULT
    TRY movl $1, (%rbx)
    EXPECT_FAULT 14, 3
    EXPECT_EQ exc_cr2(%rip), %rbx
    REPORT "#PF(P|W) on write to a read-only page with CR0.WP=1"
    pop %rbx
    ret

/* ------------------------------------------------------------------ */
/* Reserved values: these need the engine's checks (unicorn and TCG lack them) */

/* SDM RDMSR: #GP(0) if ECX names a reserved or unimplemented MSR */
t_rdmsr_unknown:
    TEST_BEGIN
    mov $0xdeadbeef, %ecx
    TRY rdmsr
    EXPECT_FAULT 13, 0
    REPORT "#GP(0) from rdmsr of unknown MSR 0xdeadbeef"
    ret

/* SDM 2.2.1 / KVM kvm_valid_efer: EFER bit 1 is reserved */
t_wrmsr_efer_reserved:
    push %rbx
    TEST_BEGIN
    RDMSR64 MSR_EFER
    mov %rax, %rbx
    or $1 << 1, %rax
    WRMSR64 MSR_EFER
    TRY wrmsr
    EXPECT_FAULT 13, 0
    RDMSR64 MSR_EFER
    mov %rax, %r8
    EXPECT_EQ %r8, %rbx
    mov %rbx, %rax                  /* put EFER back if the write got through */
    WRMSR64 MSR_EFER
    wrmsr
    REPORT "#GP(0) from wrmsr of reserved EFER bit 1"
    pop %rbx
    ret

/* SDM 2.5: CR4 bits 63:33 are reserved; MOV CR4 #GP(0) on setting one */
t_cr4_reserved:
    push %rbx
    TEST_BEGIN
    mov %cr4, %rbx
    mov %rbx, %rax
    bts $63, %rax
    TRY mov %rax, %cr4
    EXPECT_FAULT 13, 0
    mov %cr4, %r8
    EXPECT_EQ %r8, %rbx
    mov %rbx, %cr4
    REPORT "#GP(0) from mov to CR4 with reserved bit 63"
    pop %rbx
    ret

/* SDM MOV CR: #GP(0) on invalid CR0 combinations: NW=1 with CD=0 */
t_cr0_nw:
    push %rbx
    TEST_BEGIN
    mov %cr0, %rbx
    mov %rbx, %rax
    or $CR0_NW, %rax
    and $~CR0_CD, %rax
    TRY mov %rax, %cr0
    EXPECT_FAULT 13, 0
    mov %cr0, %r8
    EXPECT_EQ %r8, %rbx
    mov %rbx, %cr0
    REPORT "#GP(0) from mov to CR0 with NW=1, CD=0"
    pop %rbx
    ret

/* SDM MOV CR: #GP(0) on PG=1 with PE=0 (KVM kvm_is_valid_cr0) */
t_cr0_pg_no_pe:
    push %rbx
    TEST_BEGIN
    mov %cr0, %rbx
    mov %rbx, %rax
    and $~CR0_PE, %rax
    TRY mov %rax, %cr0
    EXPECT_FAULT 13, 0
    mov %cr0, %r8
    EXPECT_EQ %r8, %rbx
    mov %rbx, %cr0
    REPORT "#GP(0) from mov to CR0 with PG=1, PE=0"
    pop %rbx
    ret

/* ------------------------------------------------------------------ */
/* MSR round trips */

/* Every PAT entry is a valid type (0, 1, 4, 5, 6, 7) (SDM 11.12.2) */
t_msr_pat:
    TEST_BEGIN
    mov $0x0007010600070106, %rax
    WRMSR64 MSR_PAT
    wrmsr
    RDMSR64 MSR_PAT
    mov %rax, %r8
    mov $0x0007010600070106, %r9
    EXPECT_EQ %r8, %r9
    mov $PAT_DEFAULT, %rax
    WRMSR64 MSR_PAT
    wrmsr
    REPORT "IA32_PAT write/read round trip"
    ret

/* A 32-bit value: AMD keeps only SYSENTER_ESP[31:0] (APM vol. 2, 6.1.1) */
t_msr_sysenter_esp:
    TEST_BEGIN
    mov $0x12345678, %eax
    WRMSR64 MSR_SYSENTER_ESP
    wrmsr
    RDMSR64 MSR_SYSENTER_ESP
    mov %rax, %r8
    EXPECT_EQ %r8, $0x12345678
    xor %eax, %eax
    WRMSR64 MSR_SYSENTER_ESP
    wrmsr
    REPORT "IA32_SYSENTER_ESP write/read round trip"
    ret

/* Canonical, so valid on every vendor (SDM WRMSR: non-canonical is #GP) */
t_msr_kernel_gs_base:
    TEST_BEGIN
    mov $0xffff888000001000, %rax
    WRMSR64 MSR_KERNEL_GS_BASE
    wrmsr
    RDMSR64 MSR_KERNEL_GS_BASE
    mov %rax, %r8
    mov $0xffff888000001000, %r9
    EXPECT_EQ %r8, %r9
    xor %eax, %eax
    WRMSR64 MSR_KERNEL_GS_BASE
    wrmsr
    REPORT "IA32_KERNEL_GS_BASE write/read round trip"
    ret

/* SDM 11.12.2: PAT types 2 and 3 are reserved; WRMSR #GP(0). PAT keeps its value. */
t_pat_invalid:
    TEST_BEGIN
    mov $(PAT_DEFAULT & ~0xff) | 2, %rax
    WRMSR64 MSR_PAT
    TRY wrmsr
    EXPECT_FAULT 13, 0
    RDMSR64 MSR_PAT
    mov %rax, %r8
    mov $PAT_DEFAULT, %r9
    EXPECT_EQ %r8, %r9
    mov $PAT_DEFAULT, %rax
    WRMSR64 MSR_PAT
    wrmsr
    REPORT "#GP(0) from wrmsr of IA32_PAT with reserved type 2"
    ret

/* ------------------------------------------------------------------ */
/* Time, CPUID, CR8, port I/O */

t_rdtsc:
    push %r12
    push %r13
    push %r14
    TEST_BEGIN
    rdtsc
    shl $32, %rdx
    or %rax, %rdx
    mov %rdx, %r12
    rdtsc
    shl $32, %rdx
    or %rax, %rdx
    mov %rdx, %r13
    rdtsc
    shl $32, %rdx
    or %rax, %rdx
    mov %rdx, %r14
    EXPECT_BELOW %r12, %r13
    EXPECT_BELOW %r13, %r14
    REPORT "rdtsc strictly increasing"
    pop %r14
    pop %r13
    pop %r12
    ret

t_cpuid:
    push %rbx
    push %r12
    TEST_BEGIN
    xor %eax, %eax
    xor %ecx, %ecx
    cpuid
    mov %ebx, vendor(%rip)          /* the vendor string is EBX, EDX, ECX */
    mov %edx, vendor + 4(%rip)
    mov %ecx, vendor + 8(%rip)
    movzbl vendor(%rip), %r12d
    EXPECT_RANGE %r12, $0x21, $0x7f   /* a printable first character */
    mov $1, %eax
    xor %ecx, %ecx
    cpuid
    mov %edx, %r12d
    EXPECT_MASK %r12, 1 << 9, 1 << 9     /* CPUID.1:EDX.APIC */
    COMMENT "# cpuid vendor: "
    lea vendor(%rip), %rdi
    call puts
    mov $'\n', %edi
    call putc
    REPORT "CPUID vendor string non-empty, leaf 1 reports an APIC"
    pop %r12
    pop %rbx
    ret

t_cr8:
    TEST_BEGIN
    mov $5, %eax
    mov %rax, %cr8
    mov %cr8, %r8
    EXPECT_EQ %r8, $5
    xor %eax, %eax
    mov %rax, %cr8
    mov %cr8, %r8
    EXPECT_EQ %r8, $0
    REPORT "CR8 write/read round trip"
    ret

/* SDM 11.8.6.1: CR8[3:0] is TPR[7:4], in both directions */
t_cr8_tpr:
    push %rbx
    TEST_BEGIN
    mov $9, %eax
    mov %rax, %cr8
    mov $APIC_TPR, %edi
    call apic_read
    mov %eax, %ebx
    EXPECT_MASK %rbx, 0xf0, 0x90
    mov $APIC_TPR, %edi
    mov $0x30, %esi
    call apic_write
    mov %cr8, %rbx
    EXPECT_EQ %rbx, $3
    xor %eax, %eax
    mov %rax, %cr8
    REPORT "CR8 mirrors APIC TPR[7:4]"
    pop %rbx
    ret

/* Nothing decodes port 0x278 (LPT2) on this machine: the bus floats high */
t_port_unassigned:
    TEST_BEGIN
    mov $0x278, %dx
    xor %eax, %eax
    in %dx, %al
    mov %rax, %r8
    EXPECT_EQ %r8, $0xff
    xor %eax, %eax
    in %dx, %ax
    mov %rax, %r8
    EXPECT_EQ %r8, $0xffff
    xor %eax, %eax
    in %dx, %eax
    mov %rax, %r8
    mov $0xffffffff, %r9
    EXPECT_EQ %r8, %r9
    REPORT "in from unassigned port 0x278 reads all ones (8/16/32-bit)"
    ret

/* ------------------------------------------------------------------ */
/* Local APIC */

/* SDM 11.4.4: base 0xfee00000, EN (bit 11), BSP (bit 8) on the boot CPU */
t_apic_base_msr:
    TEST_BEGIN
    RDMSR64 MSR_APIC_BASE
    mov %rax, %r8
    EXPECT_MASK %r8, 0xfffff900, 0xfee00900
    REPORT "IA32_APIC_BASE: 0xfee00000, enabled, BSP"
    ret

t_apic_enable:
    push %rbx
    TEST_BEGIN
    call apic_enable
    mov $APIC_SPIV, %edi
    call apic_read
    mov %eax, %ebx
    EXPECT_MASK %rbx, 0x1ff, APIC_SPIV_ENABLE + VEC_SPURIOUS
    REPORT "APIC software-enabled via SPIV (0xfee000f0)"
    pop %rbx
    ret

/* SDM 11.4.6, 11.4.8: the BSP is APIC ID 0 here; an integrated APIC's
 * version is 0x1X, with at least the timer/LINT0/LINT1/error LVTs */
t_apic_id_version:
    push %rbx
    TEST_BEGIN
    mov $APIC_ID, %edi
    call apic_read
    mov %eax, %ebx
    shr $24, %ebx
    EXPECT_EQ %rbx, $0
    mov $APIC_VER, %edi
    call apic_read
    mov %eax, %ebx
    EXPECT_MASK %rbx, 0xf0, 0x10
    shr $16, %ebx
    and $0xff, %ebx
    EXPECT_RANGE %rbx, $3, $0x100
    REPORT "APIC ID 0 on the BSP, version 0x1X with >= 4 LVT entries"
    pop %rbx
    ret

/* SDM 11.5.4: one-shot counts down from TMICT to 0, interrupts once, stays 0.
 * The count is checked to be moving before hlt, so a dead timer fails
 * instead of sleeping forever. */
t_apic_timer_oneshot:
    push %rbx
    push %r12
    TEST_BEGIN
    movl $0, irq_count + VEC_TIMER * 4(%rip)
    rdtsc
    shl $32, %rdx
    or %rax, %rdx
    mov %rdx, %r12
    mov $100000, %edi
    call apic_timer_oneshot
    mov $APIC_TMCCT, %edi
    call apic_read
    mov %eax, %ebx
    EXPECT_RANGE %rbx, $1, $100000 + 1
    cmpb $0, test_ok(%rip)
    je 2f
    mov $1000, %ebx                 /* hlt wake-ups allowed before giving up */
1:  cmpl $0, irq_count + VEC_TIMER * 4(%rip)
    jne 2f
    sti
    hlt
    cli
    dec %ebx
    jnz 1b
2:  rdtsc
    shl $32, %rdx
    or %rax, %rdx
    sub %r12, %rdx
    mov %rdx, %r12
    mov irq_count + VEC_TIMER * 4(%rip), %ebx
    EXPECT_EQ %rbx, $1
    mov $APIC_TMCCT, %edi
    call apic_read
    mov %eax, %ebx
    EXPECT_EQ %rbx, $0
    COMMENT "# timer interrupt after "
    mov %r12, %rdi
    call putdec
    COMMENT " TSC ticks\n"
    REPORT "APIC timer one-shot fires vector 0x40 once (sti; hlt)"
    pop %r12
    pop %rbx
    ret

/* SDM 11.5.4: periodic mode reloads TMICT and fires again */
t_apic_timer_periodic:
    push %rbx
    TEST_BEGIN
    movl $0, irq_count + VEC_TIMER * 4(%rip)
    mov $APIC_TDCR, %edi
    mov $TDCR_DIV1, %esi
    call apic_write
    mov $APIC_LVTT, %edi
    mov $VEC_TIMER + (1 << 17), %esi
    call apic_write
    mov $APIC_TMICT, %edi
    mov $50000, %esi
    call apic_write
    mov $20, %ebx
1:  cmpl $3, irq_count + VEC_TIMER * 4(%rip)
    jae 2f
    sti
    hlt
    cli
    dec %ebx
    jnz 1b
2:  call apic_timer_stop
    mov $APIC_LVTT, %edi
    mov $VEC_TIMER + (1 << 16), %esi     /* masked */
    call apic_write
    mov irq_count + VEC_TIMER * 4(%rip), %ebx
    EXPECT_RANGE %rbx, $3, $5
    REPORT "APIC timer periodic mode fires repeatedly"
    pop %rbx
    ret

/* ------------------------------------------------------------------ */
/* SMP */

t_fw_cfg_cpus:
    push %rbx
    TEST_BEGIN
    mov $FW_CFG_NB_CPUS, %edi
    call fw_cfg_read32
    mov %eax, ncpus(%rip)
    mov %eax, %ebx
    EXPECT_RANGE %rbx, $1, $256
    COMMENT "# fw_cfg NB_CPUS: "
    mov %rbx, %rdi
    call putdec
    mov $'\n', %edi
    call putc
    REPORT "fw_cfg NB_CPUS (0x05) reads 1..255"
    pop %rbx
    ret

t_smp_ap_online:
    push %rbx
    cmpl $2, ncpus(%rip)
    jae 1f
    SKIP "AP 1 online in long mode after INIT/SIPI", "1 CPU"
    pop %rbx
    ret
1:  TEST_BEGIN
    mov $1, %edi
    call smp_start_ap
    mov %eax, %ebx
    EXPECT_EQ %rbx, $1
    mov ap_apic_id(%rip), %ebx
    EXPECT_EQ %rbx, $1
    mov ap_efer(%rip), %ebx
    EXPECT_MASK %rbx, EFER_LMA, EFER_LMA
    REPORT "AP 1 online in long mode after INIT/SIPI"
    pop %rbx
    ret

t_smp_ipi:
    push %rbx
    cmpl $2, ncpus(%rip)
    jae 1f
    SKIP "IPI round trip between 2 vCPUs", "1 CPU"
    pop %rbx
    ret
1:  TEST_BEGIN
    movl $0, irq_count + VEC_PONG * 4(%rip)
    movl $0, irq_count + VEC_PING * 4(%rip)
    mov $1, %edi
    mov $VEC_PING + ICR_FIXED + ICR_ASSERT, %esi
    call apic_send_ipi
    lea irq_count + VEC_PONG * 4(%rip), %rdi
    mov $200, %esi
    call wait_nonzero
    mov irq_count + VEC_PING * 4(%rip), %ebx
    EXPECT_EQ %rbx, $1
    mov irq_count + VEC_PONG * 4(%rip), %ebx
    EXPECT_EQ %rbx, $1
    REPORT "IPI round trip between 2 vCPUs (0x50 to AP, 0x51 back)"
    pop %rbx
    ret

/* ------------------------------------------------------------------ */
/* TAP output */

/* report(rdi = name): one ok / not ok line from test_ok */
report:
    push %rbx
    mov %rdi, %rbx
    incq test_num(%rip)
    cmpb $0, test_ok(%rip)
    je 1f
    incq n_pass(%rip)
    lea s_ok(%rip), %rdi
    call puts
    call put_num_name
    jmp 2f
1:  incq n_fail(%rip)
    lea s_not_ok(%rip), %rdi
    call puts
    call put_num_name
    lea s_got(%rip), %rdi
    call puts
    mov fail_got(%rip), %rdi
    call puthex
    lea s_want(%rip), %rdi
    call puts
    mov fail_want(%rip), %rdi
    call puthex
    lea s_last(%rip), %rdi
    call puts
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
    call puthex
    mov $')', %edi
    call putc
2:  mov $'\n', %edi
    call putc
    pop %rbx
    ret

/* prints "N - name" with rbx = name */
put_num_name:
    mov test_num(%rip), %rdi
    call putdec
    lea s_dash(%rip), %rdi
    call puts
    mov %rbx, %rdi
    jmp puts

/* report_skip(rdi = name, rsi = reason): "ok N - name # SKIP reason" */
report_skip:
    push %rbx
    push %r12
    mov %rdi, %rbx
    mov %rsi, %r12
    incq test_num(%rip)
    incq n_pass(%rip)
    incq n_skip(%rip)
    lea s_ok(%rip), %rdi
    call puts
    call put_num_name
    lea s_skip(%rip), %rdi
    call puts
    mov %r12, %rdi
    call puts
    mov $'\n', %edi
    call putc
    pop %r12
    pop %rbx
    ret

/* "1..N", "# skip S", "# pass P fail F"; eax = exit code */
tap_finish:
    lea s_plan(%rip), %rdi
    call puts
    mov test_num(%rip), %rdi
    call putdec
    lea s_skipn(%rip), %rdi
    call puts
    mov n_skip(%rip), %rdi
    call putdec
    lea s_pass(%rip), %rdi
    call puts
    mov n_pass(%rip), %rdi
    call putdec
    lea s_fail(%rip), %rdi
    call puts
    mov n_fail(%rip), %rdi
    call putdec
    mov $'\n', %edi
    call putc
    xor %eax, %eax
    cmpq $0, n_fail(%rip)
    setne %al                       /* EXIT_FAIL (1) on any failure, else EXIT_PASS */
    ret

    .section .rodata
s_ok:     .asciz "ok "
s_not_ok: .asciz "not ok "
s_dash:   .asciz " - "
s_got:    .asciz " (got "
s_want:   .asciz " want "
s_last:   .asciz "; last exception vec "
s_skip:   .asciz " # SKIP "
s_plan:   .asciz "1.."
s_skipn:  .asciz "\n# skip "
s_pass:   .asciz "\n# pass "
s_fail:   .asciz " fail "

    .data
    .balign 8
test_num:  .quad 0
n_pass:    .quad 0
n_fail:    .quad 0
n_skip:    .quad 0
fail_got:  .quad 0
fail_want: .quad 0
ncpus:     .long 0
vendor:    .long 0, 0, 0, 0         /* 12 characters and a NUL */
test_ok:   .byte 0
