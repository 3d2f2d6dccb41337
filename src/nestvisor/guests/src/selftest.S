/*
 * selftest.S - nestvisor's conformance guest.
 *
 * Boots by multiboot, enters long mode on its own (runtime.h), then runs
 * the checks listed in the TEST table below, one TAP line each on COM1:
 *     ok N - name
 *     not ok N - name (check K: got G want W; last exception vec V error E rip R cr2 C)
 *     ok N - name # SKIP reason
 * and finishes with "1..N", "# skip S", "# pass P fail F" and the exit
 * code on the debug-exit port (0: all passed, 1: a failure; 63 after
 * "Bail out!"). Each check names the rule it exercises.
 *
 * A multiboot command-line word "-ID" skips the test with that ID (as a
 * kvm-unit-tests "-name" filter does), e.g. to run on an oracle that is
 * known to mishandle it: qemu ... -append "-cr4_reserved".
 */

.include "runtime.h"

.include "tap.h"

/* ------------------------------------------------------------------ */
/* The tests, in order: (function, ID for "-ID", TAP name). Order matters
 * only where noted. */

    TESTS_BEGIN
    DEFTEST t_multiboot_entry, multiboot_entry, "multiboot entry state (EAX=0x2badb002, EBX=mbi, PE=1, PG=0, IF=0)"
    DEFTEST t_long_mode, long_mode, "long mode active (EFER.LMA=1, CS.L=1, CS.D=0)"
    DEFTEST t_ud, ud, "#UD from ud2, delivered on the current stack"
    DEFTEST t_de, de, "#DE from div by 0"
    DEFTEST t_bp, bp, "#BP from int3 (RIP after int3)"
    DEFTEST t_bp_ist, bp_ist, "#BP through an IST1 gate runs on the IST1 stack"
    DEFTEST t_int80, int80, "int $0x80 software interrupt"
    DEFTEST t_noncanonical, noncanonical, "#GP(0) on a non-canonical address"
    DEFTEST t_pf_read, pf_read, "#PF(0) on read of a not-present page, CR2 = address"
    DEFTEST t_pf_write, pf_write, "#PF(W) on write to a not-present page, CR2 = address"
    DEFTEST t_pf_ro, pf_ro, "#PF(P|W) on write to a read-only page with CR0.WP=1"
    DEFTEST t_rdmsr_unknown, rdmsr_unknown, "#GP(0) from rdmsr of unknown MSR 0xdeadbeef"
    DEFTEST t_wrmsr_efer_reserved, wrmsr_efer_reserved, "#GP(0) from wrmsr of reserved EFER bit 1"
    DEFTEST t_cr4_reserved, cr4_reserved, "#GP(0) from mov to CR4 with reserved bit 63"
    DEFTEST t_cr0_nw, cr0_nw, "#GP(0) from mov to CR0 with NW=1, CD=0"
    DEFTEST t_cr0_pg_no_pe, cr0_pg_no_pe, "#GP(0) from mov to CR0 with PG=1, PE=0"
    DEFTEST t_msr_pat, msr_pat, "IA32_PAT write/read round trip"
    DEFTEST t_msr_sysenter_esp, msr_sysenter_esp, "IA32_SYSENTER_ESP write/read round trip"
    DEFTEST t_msr_kernel_gs_base, msr_kernel_gs_base, "IA32_KERNEL_GS_BASE write/read round trip"
    DEFTEST t_pat_invalid, pat_invalid, "#GP(0) from wrmsr of IA32_PAT with reserved type 2"
    DEFTEST t_rdtsc, rdtsc, "rdtsc strictly increasing"
    DEFTEST t_cpuid, cpuid, "CPUID vendor string non-empty, leaf 1 reports an APIC"
    DEFTEST t_cr8, cr8, "CR8 write/read round trip"
    DEFTEST t_cr8_tpr, cr8_tpr, "CR8 mirrors APIC TPR[7:4]"
    DEFTEST t_port_unassigned, port_unassigned, "in from unassigned port 0x278 reads all ones (8/16/32-bit)"
    DEFTEST t_apic_base_msr, apic_base_msr, "IA32_APIC_BASE: 0xfee00000, enabled, BSP"
    /* the tests below need the APIC software-enabled */
    DEFTEST t_apic_enable, apic_enable, "APIC software-enabled via SPIV (0xfee000f0)"
    DEFTEST t_apic_id_version, apic_id_version, "APIC ID 0 on the BSP, version 0x1X with >= 4 LVT entries"
    DEFTEST t_sti_window, sti_window, "a pending interrupt is taken in the one-instruction window of sti; nop; cli"
    DEFTEST t_apic_timer_oneshot, apic_timer_oneshot, "APIC timer one-shot fires vector 0x40 once (sti; hlt)"
    DEFTEST t_apic_timer_periodic, apic_timer_periodic, "APIC timer periodic mode fires repeatedly"
    /* the SMP tests below need ncpus, and the IPI test an online AP */
    DEFTEST t_fw_cfg_cpus, fw_cfg_cpus, "fw_cfg NB_CPUS (0x05) reads 1..255"
    DEFTEST t_smp_ap_online, smp_ap_online, "AP 1 online in long mode after INIT/SIPI"
    DEFTEST t_smp_ipi, smp_ipi, "IPI round trip between 2 vCPUs (0x50 to AP, 0x51 back)"
    DEFTEST t_alignment_check, alignment_check, "#AC(0) from a misaligned write only at CPL 3 with CR0.AM=1 and RFLAGS.AC=1"
    DEFTEST t_tsc_instruction_clock, tsc_instruction_clock, "clock reads (RDTSC, IA32_TSC, APIC TMCCT) in one straight-line block differ by the instructions between them"
    TESTS_END

/* ------------------------------------------------------------------ */
/* Boot and modes */

/* Multiboot spec 3.2: EAX magic, EBX the mbi, protected mode without
 * paging, IF and VM clear. */
t_multiboot_entry:
    push %rbx
    EXPECT_EQ boot_eax(%rip), $MB_BOOTLOADER_MAGIC
    EXPECT_MASK boot_cr0(%rip), CR0_PE + CR0_PG, CR0_PE
    EXPECT_MASK boot_eflags(%rip), (1 << 9) + (1 << 17), 0
    mov boot_ebx(%rip), %rbx
    EXPECT_RANGE %rbx, $1, $0x100000000
    pop %rbx
    ret

/* SDM 9.8.5: LMA is set by CR0.PG with LME; CS.L=1, CS.D=0 (SDM 5.2.1) */
t_long_mode:
    push %rbx
    RDMSR64 MSR_EFER
    mov %rax, %rbx
    EXPECT_MASK %rbx, EFER_LME + EFER_LMA, EFER_LME + EFER_LMA
    /* CS's descriptor, found through GDTR (LAR would be simpler, but KVM's
     * instruction emulator cannot run it when a nested host makes it exit) */
    sgdt gdtr_copy(%rip)
    mov gdtr_copy + 2(%rip), %rbx
    mov %cs, %eax
    and $~7, %eax
    mov (%rbx, %rax), %rbx
    EXPECT_MASK %rbx, (1 << 53) + (1 << 54), 1 << 53
    pop %rbx
    ret

/* ------------------------------------------------------------------ */
/* Exceptions through the IDT */

t_ud:
    TRY ud2
    EXPECT_FAULT 6, 0
    /* IST=0 gate in ring 0: no stack switch (SDM 6.14.2) */
    lea bsp_stack(%rip), %r8
    lea bsp_stack_top(%rip), %r9
    EXPECT_RANGE exc_rsp(%rip), %r8, %r9
    ret

t_de:
    mov $1, %eax
    xor %edx, %edx
    xor %ecx, %ecx
    TRY div %ecx
    EXPECT_FAULT 0, 0
    ret

t_bp:
    TRY int3
    EXPECT_TRAP 3
    ret

/* SDM 6.14.5: the IST pointer is loaded unconditionally, then aligned to 16
 * (SDM 6.14.2), and SS, RSP, RFLAGS, CS, RIP are pushed: 40 bytes. */
t_bp_ist:
    TRY int3
    EXPECT_TRAP 3
    lea ist1_top - 40(%rip), %r8
    EXPECT_EQ exc_rsp(%rip), %r8
    ret

t_int80:
    TRY int $VEC_SYSCALL
    EXPECT_TRAP VEC_SYSCALL
    ret

/* SDM 3.3.7.1: a non-canonical data reference (not via SS) is #GP(0) */
t_noncanonical:
    push %rbx
    mov $0x8000000000000000, %rbx
    TRY mov (%rbx), %rax
    EXPECT_FAULT 13, 0
    pop %rbx
    ret

/* SDM 4.7: error code P=0 W/R=0 for a read of a not-present page, CR2 = address */
t_pf_read:
    push %rbx
    mov $NP_PAGE + 0x123, %rbx
    TRY mov (%rbx), %rax
    EXPECT_FAULT 14, 0
    EXPECT_EQ exc_cr2(%rip), %rbx
    pop %rbx
    ret

t_pf_write:
    push %rbx
    mov $NP_PAGE + 0x456, %rbx
    TRY movl $1, (%rbx)
    EXPECT_FAULT 14, 2
    EXPECT_EQ exc_cr2(%rip), %rbx
    pop %rbx
    ret

/* SDM 4.6.1: with CR0.WP=1 supervisor writes honour R/W; error P|W */
t_pf_ro:
    push %rbx
    mov $RO_PAGE + 8, %rbx
    TRY mov (%rbx), %rax
    EXPECT_NO_FAULT
    TRY movl $1, (%rbx)
    EXPECT_FAULT 14, 3
    EXPECT_EQ exc_cr2(%rip), %rbx
    pop %rbx
    ret

/* ------------------------------------------------------------------ */
/* Reserved values: these need the engine's checks (unicorn and TCG lack them) */

/* SDM RDMSR: #GP(0) if ECX names a reserved or unimplemented MSR */
t_rdmsr_unknown:
    mov $0xdeadbeef, %ecx
    TRY rdmsr
    EXPECT_FAULT 13, 0
    ret

/* SDM 2.2.1 / KVM kvm_valid_efer: EFER bit 1 is reserved */
t_wrmsr_efer_reserved:
    push %rbx
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
    pop %rbx
    ret

/* SDM 2.5: CR4 bits 63:33 are reserved; MOV CR4 #GP(0) on setting one */
t_cr4_reserved:
    push %rbx
    mov %cr4, %rbx
    mov %rbx, %rax
    bts $63, %rax
    TRY mov %rax, %cr4
    EXPECT_FAULT 13, 0
    mov %cr4, %r8
    EXPECT_EQ %r8, %rbx
    mov %rbx, %cr4
    pop %rbx
    ret

/* SDM MOV CR: #GP(0) on invalid CR0 combinations: NW=1 with CD=0 */
t_cr0_nw:
    push %rbx
    mov %cr0, %rbx
    mov %rbx, %rax
    or $CR0_NW, %rax
    and $~CR0_CD, %rax
    TRY mov %rax, %cr0
    EXPECT_FAULT 13, 0
    mov %cr0, %r8
    EXPECT_EQ %r8, %rbx
    mov %rbx, %cr0
    pop %rbx
    ret

/* SDM MOV CR: #GP(0) on PG=1 with PE=0 (KVM kvm_is_valid_cr0) */
t_cr0_pg_no_pe:
    push %rbx
    mov %cr0, %rbx
    mov %rbx, %rax
    and $~CR0_PE, %rax
    TRY mov %rax, %cr0
    EXPECT_FAULT 13, 0
    mov %cr0, %r8
    EXPECT_EQ %r8, %rbx
    mov %rbx, %cr0
    pop %rbx
    ret

/* ------------------------------------------------------------------ */
/* MSR round trips */

/* Every PAT entry is a valid type (0, 1, 4, 5, 6, 7) (SDM 11.12.2) */
t_msr_pat:
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
    ret

/* A 32-bit value: AMD keeps only SYSENTER_ESP[31:0] (APM vol. 2, 6.1.1) */
t_msr_sysenter_esp:
    mov $0x12345678, %eax
    WRMSR64 MSR_SYSENTER_ESP
    wrmsr
    RDMSR64 MSR_SYSENTER_ESP
    mov %rax, %r8
    EXPECT_EQ %r8, $0x12345678
    xor %eax, %eax
    WRMSR64 MSR_SYSENTER_ESP
    wrmsr
    ret

/* Canonical, so valid on every vendor (SDM WRMSR: non-canonical is #GP) */
t_msr_kernel_gs_base:
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
    ret

/* SDM 11.12.2: PAT types 2 and 3 are reserved; WRMSR #GP(0). PAT keeps its value. */
t_pat_invalid:
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
    ret

/* ------------------------------------------------------------------ */
/* Time, CPUID, CR8, port I/O */

t_rdtsc:
    push %r12
    push %r13
    push %r14
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
    pop %r14
    pop %r13
    pop %r12
    ret

/* nestvisor's clock (its DESIGN decision 3, not an architectural rule): the
 * TSC counts retired instructions, so two reads in one straight-line block
 * differ by exactly the instructions from the first read to the second:
 * through RDTSC answered by the L0 in Python (first pass) or in its native
 * hook (second pass), across a CPUID the L0 emulates, and through RDMSR of
 * IA32_TSC. The APIC timer's bus runs at 1 GHz too, so with divide-by-1 its
 * current count, read through memory-mapped I/O, drops by one an
 * instruction. QEMU TCG's clocks follow the host's. */
t_tsc_instruction_clock:
    push %rbx
    push %r12
    push %r13
    push %r14
    push %r15
    mov $2, %r15d
1:  rdtsc                   /* T */
    shl $32, %rdx
    or %rax, %rdx
    mov %rdx, %r12
    nop
    rdtsc                   /* T + 5 */
    shl $32, %rdx
    or %rax, %rdx
    mov %rdx, %r13
    xor %eax, %eax
    cpuid
    rdtsc                   /* T + 11 */
    shl $32, %rdx
    or %rax, %rdx
    mov %rdx, %r14
    mov $MSR_TSC, %ecx
    rdmsr                   /* T + 16 */
    shl $32, %rdx
    or %rax, %rdx
    mov %rdx, %rbx
    sub %r12, %r13
    sub %r12, %r14
    sub %r12, %rbx
    EXPECT_EQ %r13, $5
    EXPECT_EQ %r14, $11
    EXPECT_EQ %rbx, $16
    dec %r15d
    jnz 1b
    mov $10000000, %edi
    call apic_timer_oneshot
    mov $APIC_BASE_ADDR + APIC_TMCCT, %esi
    mov (%rsi), %ebx        /* C */
    nop
    nop
    mov (%rsi), %r12d       /* C - 3 */
    sub %r12, %rbx
    EXPECT_EQ %rbx, $3
    call apic_timer_stop
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %rbx
    ret

t_cpuid:
    push %rbx
    push %r12
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
    PRINT "# cpuid vendor: "
    lea vendor(%rip), %rdi
    call puts
    mov $'\n', %edi
    call putc
    pop %r12
    pop %rbx
    ret

t_cr8:
    mov $5, %eax
    mov %rax, %cr8
    mov %cr8, %r8
    EXPECT_EQ %r8, $5
    xor %eax, %eax
    mov %rax, %cr8
    mov %cr8, %r8
    EXPECT_EQ %r8, $0
    ret

/* SDM 11.8.6.1: CR8[3:0] is TPR[7:4], in both directions */
t_cr8_tpr:
    push %rbx
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
    pop %rbx
    ret

/* Nothing decodes port 0x278 (LPT2) on this machine: the bus floats high */
t_port_unassigned:
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
    ret

/* ------------------------------------------------------------------ */
/* Local APIC */

/* SDM 11.4.4: base 0xfee00000, EN (bit 11), BSP (bit 8) on the boot CPU */
t_apic_base_msr:
    RDMSR64 MSR_APIC_BASE
    mov %rax, %r8
    EXPECT_MASK %r8, 0xfffff900, 0xfee00900
    ret

t_apic_enable:
    push %rbx
    call apic_enable
    mov $APIC_SPIV, %edi
    call apic_read
    mov %eax, %ebx
    EXPECT_MASK %rbx, 0x1ff, APIC_SPIV_ENABLE + VEC_SPURIOUS
    pop %rbx
    ret

/* SDM STI: interrupts are recognized after the instruction following STI, so a self-IPI
 * pending while IF=0 is taken between the nop and the cli, before the counter is read */
t_sti_window:
    push %rbx
    movl $0, irq_count + VEC_STI_WINDOW * 4(%rip)
    cli
    mov $APIC_ICR, %edi
    mov $0x40000 + VEC_STI_WINDOW, %esi        /* self IPI (shorthand 01), fixed */
    call apic_write
    sti
    nop
    cli
    mov irq_count + VEC_STI_WINDOW * 4(%rip), %ebx
    EXPECT_EQ %rbx, $1
    pop %rbx
    ret

/* SDM 11.4.6, 11.4.8: the BSP is APIC ID 0 here; an integrated APIC's
 * version is 0x1X, with at least the timer/LINT0/LINT1/error LVTs */
t_apic_id_version:
    push %rbx
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
    pop %rbx
    ret

/* SDM 11.5.4: one-shot counts down from TMICT to 0, interrupts once, stays 0.
 * The count is checked to be moving (or the interrupt pending) before hlt,
 * so a dead timer fails instead of sleeping forever. */
t_apic_timer_oneshot:
    push %rbx
    push %r12
    push %r13
    movl $0, irq_count + VEC_TIMER * 4(%rip)
    rdtsc
    shl $32, %rdx
    or %rax, %rdx
    mov %rdx, %r12
    mov $10000000, %edi             /* 10 ms: TCG can spend 100s of us translating the code below */
    call apic_timer_oneshot
    mov $APIC_TMCCT, %edi
    call apic_read
    mov %eax, %ebx
    EXPECT_RANGE %rbx, $0, $10000000 + 1
    test %ebx, %ebx
    jnz 3f
    /* Already expired (a descheduled oracle vCPU): then it must be pending in IRR
     * (SDM 11.8.4). QEMU may count TMCCT down to 0 a little before its timer
     * callback sets IRR, hence a bounded poll; an exact engine passes at once. */
    mov $100000, %r13d
4:  mov $APIC_IRR + (VEC_TIMER / 32) * 0x10, %edi
    call apic_read
    mov %eax, %ebx
    test $1 << (VEC_TIMER % 32), %ebx
    jnz 5f
    dec %r13d
    jnz 4b
5:
    EXPECT_MASK %rbx, 1 << (VEC_TIMER % 32), 1 << (VEC_TIMER % 32)
3:  cmpb $0, test_ok(%rip)
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
    PRINT "# timer interrupt after "
    mov %r12, %rdi
    call putdec
    PRINT " TSC ticks\n"
    pop %r13
    pop %r12
    pop %rbx
    ret

/* SDM 11.5.4: periodic mode reloads TMICT and fires again */
t_apic_timer_periodic:
    push %rbx
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
    pop %rbx
    ret

/* ------------------------------------------------------------------ */
/* SMP */

t_fw_cfg_cpus:
    push %rbx
    mov $FW_CFG_NB_CPUS, %edi
    call fw_cfg_read32
    mov %eax, ncpus(%rip)
    mov %eax, %ebx
    EXPECT_RANGE %rbx, $1, $256
    PRINT "# fw_cfg NB_CPUS: "
    mov %rbx, %rdi
    call putdec
    mov $'\n', %edi
    call putc
    pop %rbx
    ret

t_smp_ap_online:
    push %rbx
    cmpl $2, ncpus(%rip)
    jae 1f
    SKIP_BECAUSE "fw_cfg reports 1 CPU"
    pop %rbx
    ret
1:
    mov $1, %edi
    call smp_start_ap
    mov %eax, %ebx
    EXPECT_EQ %rbx, $1
    mov ap_apic_id(%rip), %ebx
    EXPECT_EQ %rbx, $1
    mov ap_efer(%rip), %ebx
    EXPECT_MASK %rbx, EFER_LMA, EFER_LMA
    pop %rbx
    ret

t_smp_ipi:
    push %rbx
    cmpl $2, ncpus(%rip)
    jae 1f
    SKIP_BECAUSE "fw_cfg reports 1 CPU"
    pop %rbx
    ret
1:
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
    pop %rbx
    ret

/* ------------------------------------------------------------------ */
/* Alignment check */

/* SDM 6.15 "Interrupt 17": with CR0.AM=1, RFLAGS.AC=1 and CPL 3, a quadword
 * access that is not 8-byte aligned is #AC(0), a fault: RIP is the write's
 * and nothing is written. Not at CPL 0, not with AC=0, not with CR0.AM=0. */
t_alignment_check:
    push %rbx
    push %r12
    call user_mode_on
    mov %cr0, %r12
    mov %r12, %rax
    or $CR0_AM, %rax
    mov %rax, %cr0
    lea ac_buf + 4(%rip), %rbx
    movq $0, (%rbx)
    mov $RFLAGS_FIXED + RFLAGS_AC, %esi
    call user_write
    EXPECT_FAULT 17, 0
    EXPECT_EQ (%rbx), $0
    lea ac_buf + 8(%rip), %rbx      /* aligned */
    mov $RFLAGS_FIXED + RFLAGS_AC, %esi
    call user_write
    EXPECT_NO_FAULT
    EXPECT_EQ (%rbx), %rbx
    lea ac_buf + 4(%rip), %rbx      /* AC=0 */
    mov $RFLAGS_FIXED, %esi
    call user_write
    EXPECT_NO_FAULT
    EXPECT_EQ (%rbx), %rbx
    movq $0, (%rbx)                 /* CPL 0 */
    pushfq
    orq $RFLAGS_AC, (%rsp)
    popfq
    TRY mov %rbx, (%rbx)
    pushfq
    andq $~RFLAGS_AC, (%rsp)
    popfq
    EXPECT_NO_FAULT
    EXPECT_EQ (%rbx), %rbx
    and $~CR0_AM, %r12              /* CR0.AM=0 */
    mov %r12, %cr0
    movq $0, (%rbx)
    mov $RFLAGS_FIXED + RFLAGS_AC, %esi
    call user_write
    EXPECT_NO_FAULT
    EXPECT_EQ (%rbx), %rbx
    call user_mode_off
    pop %r12
    pop %rbx
    ret

/* user_write(rbx = address, esi = RFLAGS): `mov %rbx, (%rbx)` at CPL 3, armed
 * as TRY arms it, but from CPL 0: TRY's own bookkeeping is not aligned for
 * CPL 3 with AC=1. */
user_write:
    call exc_reset
    lea user_write_insn(%rip), %rax
    mov %rax, try_start(%rip)
    lea user_write_end(%rip), %rax
    mov %rax, try_end(%rip)
    movb $1, try_armed(%rip)
    lea user_write_insn(%rip), %rdi
    call run_user
    movb $0, try_armed(%rip)
    ret
user_write_insn:
    mov %rbx, (%rbx)
user_write_end:
    int $VEC_USER_RET

/* CPL 3 may run the image: U=1 in the entries that map its 2 MiB (SDM 4.6.1),
 * and int $VEC_USER_RET goes through a DPL-3 gate to user_return (SDM 6.12.1.1). */
user_mode_on:
    orq $PTE_US, pml4(%rip)
    orq $PTE_US, pdpt(%rip)
    orq $PTE_US, pd_low(%rip)
    mov %cr3, %rax
    mov %rax, %cr3
    lea idt + VEC_USER_RET * 16(%rip), %rdi
    lea user_return(%rip), %rax
    mov %ax, (%rdi)
    movw $SEL_CODE64, 2(%rdi)
    movb $0, 4(%rdi)
    movb $0xEE, 5(%rdi)             /* P=1, DPL=3, 64-bit interrupt gate */
    shr $16, %rax
    mov %ax, 6(%rdi)
    shr $16, %rax
    mov %eax, 8(%rdi)
    movl $0, 12(%rdi)
    ret

user_mode_off:
    andq $~PTE_US, pml4(%rip)
    andq $~PTE_US, pdpt(%rip)
    andq $~PTE_US, pd_low(%rip)
    mov %cr3, %rax
    mov %rax, %cr3
    ret

/* run_user(rdi = code, esi = RFLAGS): run code at CPL 3 until it does
 * int $VEC_USER_RET. Exceptions from CPL 3 are delivered below this frame
 * (TSS.RSP0, SDM 6.14.4); RSP0, RFLAGS and rbp, r12-r15 come back as they
 * were, rbx is the code's argument. */
run_user:
    pushfq
    push %rbp
    push %r12
    push %r13
    push %r14
    push %r15
    pushq tss + 4(%rip)
    mov %rsp, user_rsp(%rip)
    mov %rsp, tss + 4(%rip)
    push $SEL_USER_DATA
    lea user_stack_top(%rip), %rax
    push %rax
    push %rsi
    push $SEL_USER_CODE64
    push %rdi
    iretq
user_return:
    mov user_rsp(%rip), %rsp
    mov $SEL_DATA, %eax             /* IRET to CPL 3 nulled them (SDM IRET) */
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %fs
    mov %eax, %gs
    popq tss + 4(%rip)
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %rbp
    popfq
    ret

    .section .rodata
tap_title: .asciz "# nestvisor selftest\n"

    .data
gdtr_copy: .skip 10
ncpus:     .long 0
vendor:    .long 0, 0, 0, 0         /* 12 characters and a NUL */
    .balign 16
ac_buf:    .quad 0, 0, 0
user_rsp:  .quad 0

    .bss
    .balign 16
user_stack: .skip 256
user_stack_top:
