/*
 * svmtest.S - nestvisor's bundled L1 SVM hypervisor and its L2 guests.
 *
 * Boots by multiboot into long mode (runtime.h), enables SVM (EFER.SVME,
 * VM_HSAVE_PA) and runs the checks in the TEST table (one TAP line each,
 * tap.h): the SVM instructions' faults, VMLOAD/VMSAVE, L2 guests that exit
 * to this L1 for VMMCALL, CPUID, I/O through the IOPM, RDMSR/WRMSR through
 * the MSRPM, CR accesses, exceptions, INVLPG, RDTSC, PAUSE, HLT and VMRUN;
 * GIF and physical interrupts; EVENTINJ and V_IRQ; nested paging with
 * tables this L1 builds; one invalid vmcb12 per VMRUN consistency check;
 * vmcb12 rewritten while L2 runs; and the int_ctl bits L2 changes.
 *
 * Without NPT, L2 shares L1's GDT, IDT and page tables and runs in 64-bit
 * mode on its own stack; its registers other than RAX and RSP are saved in
 * l2_regs at every #VMEXIT and loaded from there at every VMRUN (vm_enter,
 * in svm.h), as a real hypervisor does.
 */

.include "runtime.h"
.include "tap.h"
.include "svm.h"

.set VEC_INJECT, 0x33
.set VEC_GIF, 0x34
.set VEC_VIRQ, 0x35
.set CPUID_EXITS, 10
.set MAX_LOG, 16
.set MAXPHY_BIT, 1 << 52             /* above any MAXPHYADDR (APM 15.5.1: an illegal address) */
.set NP_LINEAR, NP_PAGE + 0x10
.set RO_LINEAR, RO_PAGE + 0x10
/* npt_build's map: guest-physical [0, NPT_MAPPED) identity in 2 MiB pages, except the 2 MiB
 * around NPT_PAGE, which npt_pt maps in 4 KiB pages with NPT_PAGE sent to npt_target */
.set NPT_MAPPED, 8 << 20
.set NPT_PAGE, 0x403000
.set NPT_PDE_OFF, (NPT_PAGE >> 21) * 8              /* in npt_pd */
.set NPT_PTE_OFF, ((NPT_PAGE >> 12) & 511) * 8      /* in npt_pt */
/* nested page table entries are user entries: APM 15.25.5 treats every nested walk as a
 * user access */
.set NPT_RW, PTE_P | PTE_RW | PTE_US
.set NPT_RO, PTE_P | PTE_US

/* BADVMCB id, offset, and, or, name: a test that runs l2_vmmcall from a valid vmcb12 whose
 * quadword at `offset` becomes (q & and) | or, and expects #VMEXIT(SVM_EXIT_ERR) */
.macro BADVMCB id, off, and, or, name:vararg
    DEFTEST t_\id, \id, \name
    .pushsection .rodata
    .balign 8
.Lbad\@: .quad \off, \and, \or
    .popsection
    .pushsection .text
t_\id:
    lea .Lbad\@(%rip), %rdi
    jmp bad_vmcb
    .popsection
.endm

    TESTS_BEGIN
    DEFTEST t_svm_feature, svm_feature, "CPUID Fn8000_0001_ECX.SVM, Fn8000_000A_EDX.NP and NRIPS"
    DEFTEST t_svm_ud, svm_ud, "VMRUN, VMLOAD, VMSAVE, CLGI, STGI with EFER.SVME=0 are #UD"
    DEFTEST t_svm_enable, svm_enable, "EFER.SVME and VM_HSAVE_PA are set and read back"
    DEFTEST t_vmrun_gp, vmrun_gp, "VMRUN with an unaligned rAX, or VM_HSAVE_PA=0, is #GP(0)"
    DEFTEST t_vmload_vmsave, vmload_vmsave, "VMSAVE stores KernelGSBase and SYSENTER_CS, VMLOAD loads them"
    DEFTEST t_vmrun_roundtrip, vmrun_roundtrip, "VMRUN round trip: VMMCALL exits (0x81) with next_rip; L1 resumes L2 after it"
    DEFTEST t_l2_cpuid, l2_cpuid, "L2 CPUID exits to L1 10 times (0x72); L1's answers reach L2"
    DEFTEST t_l2_ioio, l2_ioio, "IOIO through the IOPM: OUT 0x80 and IN 0x84 exit with port/size/direction; IN 0x81 does not"
    DEFTEST t_l2_msr, l2_msr, "MSR through the MSRPM: read and write bits exit with exit_info_1 0 and 1; clear bits do not"
    DEFTEST t_l2_cr, l2_cr, "CR0 read, CR0 write and CR3 write intercepts exit (0x0, 0x10, 0x13); CR3 read does not"
    DEFTEST t_l2_insns, l2_insns, "INVLPG, RDTSC, PAUSE, HLT exit with their intercepts, INVLPG and RDTSC not without; VMRUN always"
    DEFTEST t_l2_ud, l2_ud, "#UD intercept: L2's ud2 exits (0x46) at the instruction"
    DEFTEST t_l2_pf, l2_pf, "#PF intercept: exit 0x4e with the error code in exit_info_1 and CR2 in exit_info_2"
    DEFTEST t_gif, gif, "GIF=0 holds a self-IPI until STGI; INTR intercept exits (0x60), held after #VMEXIT until STGI"
    DEFTEST t_inject_exception, inject_exception, "EVENTINJ of #GP with an error code runs L2's handler with it"
    DEFTEST t_inject_intr, inject_intr, "EVENTINJ of an external interrupt runs L2's handler"
    DEFTEST t_virq, virq, "V_IRQ: VINTR exit (0x64) with the intercept; without it L2 takes the vector and V_IRQ clears"
    DEFTEST t_npt_identity, npt_identity, "NPT identity map: L2's CPUID exits work; a GPA past the map is #VMEXIT(NPF)"
    DEFTEST t_npt_remap, npt_remap, "NPT maps an L2 guest-physical page to another L1 page: L2 reads that page"
    DEFTEST t_npt_fault, npt_fault, "NPF: not present and read-only entries exit (0x400) with error code and GPA; resumed after L1 fixes them"
    DEFTEST t_vmcb_valid, vmcb_valid, "the valid default vmcb12 of the failure tests enters L2"
    BADVMCB vmrun_intercept, 0x10, ~1, 0, "VMRUN intercept clear is SVM_EXIT_ERR"
    BADVMCB asid_zero, VMCB_ASID, ~0xFFFFFFFF, 0, "ASID 0 is SVM_EXIT_ERR"
    BADVMCB efer_svme, VMCB_EFER, ~EFER_SVME, 0, "EFER.SVME clear in vmcb12 is SVM_EXIT_ERR"
    BADVMCB cr0_nw, VMCB_CR0, ~CR0_CD, CR0_NW, "CR0.CD=0 with CR0.NW=1 is SVM_EXIT_ERR"
    BADVMCB cr0_high, VMCB_CR0, -1, 1 << 32, "CR0 bit 32 set is SVM_EXIT_ERR"
    BADVMCB cr3_maxphy, VMCB_CR3, -1, MAXPHY_BIT, "CR3 bit 52 set under long-mode paging is SVM_EXIT_ERR"
    BADVMCB cr4_reserved, VMCB_CR4, -1, 1 << 15, "CR4 reserved bit 15 set is SVM_EXIT_ERR"
    BADVMCB efer_reserved, VMCB_EFER, -1, 1 << 9, "EFER reserved bit 9 set is SVM_EXIT_ERR"
    BADVMCB lme_no_pae, VMCB_CR4, ~CR4_PAE, 0, "EFER.LME and CR0.PG without CR4.PAE is SVM_EXIT_ERR"
    BADVMCB lme_no_pe, VMCB_CR0, ~CR0_PE, 0, "EFER.LME and CR0.PG without CR0.PE is SVM_EXIT_ERR"
    BADVMCB cs_l_d, VMCB_CS, -1, ATTR_DB << 16, "EFER.LME, CR0.PG, CS.L and CS.D together is SVM_EXIT_ERR"
    BADVMCB dr6_high, VMCB_DR6, -1, 1 << 32, "DR6 bit 32 set is SVM_EXIT_ERR"
    BADVMCB dr7_high, VMCB_DR7, -1, 1 << 32, "DR7 bit 32 set is SVM_EXIT_ERR"
    BADVMCB iopm_maxphy, VMCB_IOPM_BASE, -1, MAXPHY_BIT, "IOPM base beyond MAXPHYADDR is SVM_EXIT_ERR"
    BADVMCB msrpm_maxphy, VMCB_MSRPM_BASE, -1, MAXPHY_BIT, "MSRPM base beyond MAXPHYADDR is SVM_EXIT_ERR"
    BADVMCB evtinj_type, VMCB_EVENT_INJ, -1, EVTINJ_VALID | (1 << 8) | 0x20, "EVENTINJ of type 1 is SVM_EXIT_ERR"
    BADVMCB evtinj_vector, VMCB_EVENT_INJ, -1, EVTINJ_VALID | EVTINJ_TYPE_EXEPT | 2, "EVENTINJ of exception vector 2 is SVM_EXIT_ERR"
    BADVMCB vnmi_no_intercept, VMCB_INT_CTL, -1, V_NMI_ENABLE, "V_NMI_ENABLE without the NMI intercept is SVM_EXIT_ERR"
    DEFTEST t_vmrun_err_code, vmrun_err_code, "a failed VMRUN: EXITCODE -1 in all 64 bits, exit_info_1/2 0, save area untouched"
    DEFTEST t_npt_bad_cr3, npt_bad_cr3, "nested paging with nested_cr3 beyond MAXPHYADDR is SVM_EXIT_ERR"
    DEFTEST t_vmcb12_toctou, vmcb12_toctou, "L2 rewriting vmcb12 changes nothing until the next VMRUN; #VMEXIT writes L2's state"
    DEFTEST t_int_ctl, int_ctl, "int_ctl: L2's CR8 is V_TPR; a V_IRQ above it is taken; vmcb12 gets V_TPR and V_IRQ clear"
    DEFTEST t_l2_shutdown, l2_shutdown, "a triple fault in L2 exits to L1 (SHUTDOWN, 0x7f)"
    DEFTEST t_svm_disable, svm_disable, "clearing EFER.SVME makes VMRUN #UD again"
    TESTS_END

/* ------------------------------------------------------------------ */
/* helpers */

/* run_log: run L2 until VMMCALL, SVM_EXIT_ERR or MAX_LOG other exits; each other exit goes to
 * exit_log, info1_log, info2_log and L2 resumes at next_rip. rax = the number logged, and
 * last_exit the exit that ended the run */
run_log:
    push %r12
    xor %r12d, %r12d
1:  call vm_enter
    mov %rax, last_exit(%rip)
    cmp $EXIT_VMMCALL, %rax
    je 2f
    cmp $EXIT_ERR, %rax
    je 2f
    lea exit_log(%rip), %rcx
    mov %rax, (%rcx, %r12, 8)
    mov vmcb12 + VMCB_EXIT_INFO_1(%rip), %rax
    lea info1_log(%rip), %rcx
    mov %rax, (%rcx, %r12, 8)
    mov vmcb12 + VMCB_EXIT_INFO_2(%rip), %rax
    lea info2_log(%rip), %rcx
    mov %rax, (%rcx, %r12, 8)
    inc %r12
    call skip_l2_insn
    cmp $MAX_LOG, %r12
    jb 1b
2:  mov %r12, %rax
    pop %r12
    ret

/* MSRPM_SET msr, bit, base: the read (bit 0) or write (bit 1) intercept of MSR number `msr`
 * of the range whose bits start at byte `base` (APM 15.11: two bits per MSR) */
.macro MSRPM_SET msr, bit, base=0
    orb $1 << (((\msr) * 2 + (\bit)) & 7), msrpm + (\base) + ((\msr) * 2 + (\bit)) / 8(%rip)
.endm

/* ------------------------------------------------------------------ */
/* SVM instructions in L1 */

t_svm_feature:
    mov $0x80000001, %eax
    cpuid
    mov %rcx, %rbx
    EXPECT_MASK %rbx, CPUID_EXT_SVM, CPUID_EXT_SVM
    mov $0x8000000A, %eax
    cpuid
    mov %rdx, %rbx
    EXPECT_MASK %rbx, CPUID_SVM_NP | CPUID_SVM_NRIPS, CPUID_SVM_NP | CPUID_SVM_NRIPS
    ret

t_svm_ud:
    lea vmcb12(%rip), %rax
    TRY vmrun
    EXPECT_FAULT 6, 0
    lea vmcb12(%rip), %rax
    TRY vmload
    EXPECT_FAULT 6, 0
    lea vmcb12(%rip), %rax
    TRY vmsave
    EXPECT_FAULT 6, 0
    TRY clgi
    EXPECT_FAULT 6, 0
    TRY stgi
    EXPECT_FAULT 6, 0
    ret

t_svm_enable:
    call svm_enable
    mov %rax, %rbx
    EXPECT_EQ %rbx, $0
    mov $MSR_EFER, %ecx
    rdmsr
    mov %rax, %rbx
    EXPECT_MASK %rbx, EFER_SVME, EFER_SVME
    RDMSR64 MSR_VM_HSAVE_PA
    mov %rax, %rbx
    lea hsave_area(%rip), %r12
    EXPECT_EQ %rbx, %r12
    ret

t_vmrun_gp:
    lea vmcb12 + 8(%rip), %rax        /* APM "VMRUN": rAX must be 4 KiB aligned */
    TRY vmrun
    EXPECT_FAULT 13, 0
    mov $MSR_VM_HSAVE_PA, %ecx        /* KVM nested_svm_vmrun: no host save area is #GP(0) */
    xor %eax, %eax
    xor %edx, %edx
    wrmsr
    lea vmcb12(%rip), %rax
    TRY vmrun
    EXPECT_FAULT 13, 0
    call svm_enable
    ret

t_vmload_vmsave:
    mov $0x00007FFF12345678, %rax   /* canonical, or WRMSR is #GP */
    WRMSR64 MSR_KERNEL_GS_BASE
    wrmsr
    mov $SEL_CODE64, %eax
    WRMSR64 MSR_SYSENTER_CS
    wrmsr
    lea vmsave_page(%rip), %rax
    vmsave
    mov vmsave_page + 0x620(%rip), %rbx      /* KernelGsBase (APM Table B-2) */
    mov $0x00007FFF12345678, %r12
    EXPECT_EQ %rbx, %r12
    EXPECT_EQ vmsave_page+0x628(%rip), $SEL_CODE64   /* SYSENTER_CS */
    movq $0x8877, vmsave_page + 0x620(%rip)
    movq $SEL_CODE32, vmsave_page + 0x628(%rip)
    lea vmsave_page(%rip), %rax
    vmload
    RDMSR64 MSR_KERNEL_GS_BASE
    mov %rax, %rbx
    EXPECT_EQ %rbx, $0x8877
    RDMSR64 MSR_SYSENTER_CS
    mov %rax, %rbx
    EXPECT_EQ %rbx, $SEL_CODE32
    xor %eax, %eax
    WRMSR64 MSR_KERNEL_GS_BASE
    wrmsr
    ret

/* ------------------------------------------------------------------ */
/* L2 guests and the exits they cause */

l2_vmmcall:
    vmmcall
    ud2

l2_two_calls:
    mov $1, %ebx
l2_first_call:
    vmmcall
    mov $2, %ebx
l2_second_call:
    vmmcall
    ud2

t_vmrun_roundtrip:
    lea l2_two_calls(%rip), %rdi
    call vmcb_setup
    call vm_enter
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_VMMCALL
    EXPECT_EQ l2_regs+8*3(%rip), $1
    lea l2_first_call(%rip), %rbx
    EXPECT_EQ vmcb12+VMCB_RIP(%rip), %rbx   /* the exit is before the instruction */
    cmpb $0, has_nrips(%rip)
    je 1f
    add $3, %rbx                              /* APM 15.7.1: next_rip is the next instruction */
    EXPECT_EQ vmcb12+VMCB_NEXT_RIP(%rip), %rbx
1:
    EXPECT_EQ vmcb12+VMCB_EXIT_INFO_1(%rip), $0
    call skip_l2_insn
    call vm_enter
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_VMMCALL
    EXPECT_EQ l2_regs+8*3(%rip), $2
    lea l2_second_call(%rip), %rbx
    EXPECT_EQ vmcb12+VMCB_RIP(%rip), %rbx
    ret

/* L2: CPUID leaf 0x4000_1234 ten times, summing EBX, then VMMCALL with the sum in RBX */
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
    vmmcall
    ud2

/* serve_cpuid: run L2 and answer its CPUID exits with EBX = 7 until another exit;
 * rax = that exit's code, rdx = how many CPUID exits there were */
serve_cpuid:
    push %r12
    xor %r12d, %r12d
1:  call vm_enter
    cmp $EXIT_CPUID, %rax
    jne 2f
    incq %r12
    movq $7, l2_regs + 8 * 3(%rip)    /* L1's answer: EBX = 7 */
    call skip_l2_insn
    jmp 1b
2:  mov %r12, %rdx
    pop %r12
    ret

t_l2_cpuid:
    lea l2_cpuid_loop(%rip), %rdi
    call vmcb_setup
    call serve_cpuid
    mov %rdx, %r12
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_VMMCALL
    EXPECT_EQ %r12, $CPUID_EXITS
    EXPECT_EQ l2_regs+8*3(%rip), $(7 * CPUID_EXITS)
    ret

l2_ioio:
    out %al, $0x80
l2_ioio_1:
    in $0x81, %al                     /* IOPM bit clear: L0 answers */
    mov $0x84, %dx
    in %dx, %ax
    vmmcall
    ud2

t_l2_ioio:
    lea l2_ioio(%rip), %rdi
    call vmcb_setup
    orb $1 << (0x80 & 7), iopm + 0x80 / 8(%rip)   /* one bit per port (APM 15.10.1) */
    orb $1 << (0x84 & 7), iopm + 0x84 / 8(%rip)
    call run_log
    mov %rax, %rbx
    EXPECT_EQ %rbx, $2
    EXPECT_EQ last_exit(%rip), $EXIT_VMMCALL
    EXPECT_EQ exit_log(%rip), $EXIT_IOIO
    /* APM Figure 15-2: port, 8-bit, OUT; not the address-size bits 9:7, which nestvisor sets
     * and QEMU TCG leaves clear for IN/OUT (tests/test_nested_svm.py pins nestvisor's) */
    EXPECT_MASK info1_log(%rip), ~IOIO_ASIZE_MASK, (0x80 << IOIO_PORT_SHIFT) | IOIO_SZ8
    lea l2_ioio_1(%rip), %rbx          /* exit_info_2: the next RIP */
    EXPECT_EQ info2_log(%rip), %rbx
    EXPECT_EQ exit_log+8(%rip), $EXIT_IOIO
    EXPECT_MASK info1_log+8(%rip), ~IOIO_ASIZE_MASK, (0x84 << IOIO_PORT_SHIFT) | IOIO_SZ16 | IOIO_TYPE_IN
    ret

l2_msr:
    mov $MSR_SYSENTER_CS, %ecx
    rdmsr                             /* read bit set: exit */
    mov $MSR_SYSENTER_ESP, %ecx
    rdmsr                             /* read bit clear */
    wrmsr                             /* write bit set: exit */
    mov $MSR_KERNEL_GS_BASE, %ecx
    rdmsr                             /* the second range's read bit: exit */
    mov $MSR_PAT, %ecx
    rdmsr                             /* bits clear: L0 answers */
    shl $32, %rdx
    or %rdx, %rax
    mov %rax, %r14
    vmmcall
    ud2

t_l2_msr:
    lea l2_msr(%rip), %rdi
    call vmcb_setup
    MSRPM_SET MSR_SYSENTER_CS, 0
    MSRPM_SET MSR_SYSENTER_ESP, 1
    MSRPM_SET MSR_KERNEL_GS_BASE-0xC0000000, 0, 2048   /* MSRs 0xc0000000+ from byte 2048 */
    call run_log
    mov %rax, %rbx
    EXPECT_EQ %rbx, $3
    EXPECT_EQ last_exit(%rip), $EXIT_VMMCALL
    EXPECT_EQ exit_log(%rip), $EXIT_MSR
    EXPECT_EQ info1_log(%rip), $0      /* APM 15.11: 0 for RDMSR, 1 for WRMSR */
    EXPECT_EQ exit_log+8(%rip), $EXIT_MSR
    EXPECT_EQ info1_log+8(%rip), $1
    EXPECT_EQ exit_log+16(%rip), $EXIT_MSR
    EXPECT_EQ info1_log+16(%rip), $0
    mov $PAT_DEFAULT, %rbx
    EXPECT_EQ l2_regs+8*14(%rip), %rbx
    ret

l2_cr:
    mov %cr0, %rax
    mov %rax, %cr0
    mov %cr3, %rax                    /* no CR3 read intercept */
    mov %rax, %cr3
    vmmcall
    ud2

t_l2_cr:
    lea l2_cr(%rip), %rdi
    call vmcb_setup
    SET_INTERCEPT INTERCEPT_CR0_READ
    SET_INTERCEPT INTERCEPT_CR0_WRITE
    SET_INTERCEPT INTERCEPT_CR3_WRITE
    call run_log
    mov %rax, %rbx
    EXPECT_EQ %rbx, $3
    EXPECT_EQ last_exit(%rip), $EXIT_VMMCALL
    EXPECT_EQ exit_log(%rip), $EXIT_CR0_READ
    EXPECT_EQ exit_log+8(%rip), $EXIT_CR0_WRITE
    EXPECT_EQ exit_log+16(%rip), $EXIT_CR3_WRITE
    ret

l2_insns:
    invlpg (%rsp)
    rdtsc
    pause
    hlt
    lea vmcb12(%rip), %rax
    vmrun                             /* APM 15.5.1: VMRUN is always intercepted in L2 */
    vmmcall
    ud2

t_l2_insns:
    lea l2_insns(%rip), %rdi
    call vmcb_setup
    SET_INTERCEPT INTERCEPT_INVLPG
    SET_INTERCEPT INTERCEPT_RDTSC
    SET_INTERCEPT INTERCEPT_PAUSE
    call run_log
    mov %rax, %rbx
    EXPECT_EQ %rbx, $5
    EXPECT_EQ last_exit(%rip), $EXIT_VMMCALL
    EXPECT_EQ exit_log(%rip), $EXIT_INVLPG
    EXPECT_EQ exit_log+8(%rip), $EXIT_RDTSC
    EXPECT_EQ exit_log+16(%rip), $EXIT_PAUSE
    EXPECT_EQ exit_log+24(%rip), $EXIT_HLT
    EXPECT_EQ exit_log+32(%rip), $EXIT_VMRUN
    /* again without the INVLPG and RDTSC intercepts (a PAUSE that L0 handles yields the
     * vCPU's time slice, KVM's pause-loop exiting: kept intercepted here) */
    lea l2_insns(%rip), %rdi
    call vmcb_setup
    SET_INTERCEPT INTERCEPT_PAUSE
    call run_log
    mov %rax, %rbx
    EXPECT_EQ %rbx, $3
    EXPECT_EQ exit_log(%rip), $EXIT_PAUSE
    EXPECT_EQ exit_log+8(%rip), $EXIT_HLT
    EXPECT_EQ exit_log+16(%rip), $EXIT_VMRUN
    ret

l2_ud:
    ud2
    vmmcall

t_l2_ud:
    lea l2_ud(%rip), %rdi
    call vmcb_setup
    SET_INTERCEPT INTERCEPT_EXC + 6
    call vm_enter
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_EXC + 6
    lea l2_ud(%rip), %rbx
    EXPECT_EQ vmcb12+VMCB_RIP(%rip), %rbx
    add $2, %rbx                      /* L1 skips the ud2 itself: next_rip is for instruction intercepts */
    mov %rbx, vmcb12 + VMCB_RIP(%rip)
    call vm_enter
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_VMMCALL
    ret

l2_pf:
    movl $1, RO_LINEAR
l2_pf_done:
    vmmcall
    ud2

t_l2_pf:
    lea l2_pf(%rip), %rdi
    call vmcb_setup
    SET_INTERCEPT INTERCEPT_EXC + 14
    call vm_enter
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_EXC + 14
    EXPECT_EQ vmcb12+VMCB_EXIT_INFO_1(%rip), $PTE_P | PTE_RW   /* APM 15.12: the #PF error code */
    EXPECT_EQ vmcb12+VMCB_EXIT_INFO_2(%rip), $RO_LINEAR        /* and the faulting address */
    lea l2_pf(%rip), %rbx
    EXPECT_EQ vmcb12+VMCB_RIP(%rip), %rbx
    lea l2_pf_done(%rip), %rbx
    mov %rbx, vmcb12 + VMCB_RIP(%rip)
    call vm_enter
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_VMMCALL
    ret

/* ------------------------------------------------------------------ */
/* GIF and interrupts */

t_gif:
    call apic_enable
    movl $0, irq_count + VEC_GIF * 4(%rip)
    clgi
    sti
    mov $APIC_ICR, %edi
    mov $0x40000 | VEC_GIF, %esi      /* self IPI (shorthand 01) */
    call apic_write
    nop
    nop
    mov irq_count + VEC_GIF * 4(%rip), %ebx   /* APM 15.17: GIF=0 holds it */
    stgi
    nop
    cli
    mov irq_count + VEC_GIF * 4(%rip), %r12d
    EXPECT_EQ %rbx, $0
    EXPECT_EQ %r12, $1
    /* L1 with IF=1 under V_INTR_MASKING: the interrupt exits from L2 and waits for STGI */
    lea l2_vmmcall(%rip), %rdi
    call vmcb_setup
    SET_INTERCEPT INTERCEPT_INTR
    movl $V_INTR_MASKING, vmcb12 + VMCB_INT_CTL(%rip)
    movl $0, irq_count + VEC_GIF * 4(%rip)
    mov $APIC_ICR, %edi
    mov $0x40000 | VEC_GIF, %esi
    call apic_write
    clgi
    sti
    call vm_enter_gif0
    mov %rax, %rbx
    mov irq_count + VEC_GIF * 4(%rip), %r12d  /* #VMEXIT cleared GIF: still held */
    stgi
    nop
    cli
    mov irq_count + VEC_GIF * 4(%rip), %r13d
    EXPECT_EQ %rbx, $EXIT_INTR
    EXPECT_EQ %r12, $0
    EXPECT_EQ %r13, $1
    ret

/* L2 of the injection tests: the event comes before its first instruction, and the handler
 * resumes at l2_inj_done (an armed TRY in shared memory) */
l2_inj:
    ud2
l2_inj_done:
    vmmcall
    ud2

t_inject_exception:
    lea l2_inj(%rip), %rdi
    call vmcb_setup
    call exc_reset
    lea l2_inj_done(%rip), %rax
    mov %rax, try_end(%rip)
    movb $1, try_armed(%rip)
    movl $EVTINJ_VALID | EVTINJ_VALID_ERR | EVTINJ_TYPE_EXEPT | 13, vmcb12 + VMCB_EVENT_INJ(%rip)
    movl $0x1234, vmcb12 + VMCB_EVENT_INJ_ERR(%rip)
    call vm_enter
    mov %rax, %rbx
    movb $0, try_armed(%rip)
    EXPECT_EQ %rbx, $EXIT_VMMCALL
    EXPECT_EQ exc_count(%rip), $1
    EXPECT_EQ exc_vector(%rip), $13
    EXPECT_EQ exc_error(%rip), $0x1234
    lea l2_inj(%rip), %rbx
    EXPECT_EQ exc_rip(%rip), %rbx
    mov vmcb12 + VMCB_EVENT_INJ(%rip), %ebx     /* delivered: the valid bit is clear */
    EXPECT_MASK %rbx, EVTINJ_VALID, 0
    ret

t_inject_intr:
    lea l2_inj_done(%rip), %rdi
    call vmcb_setup
    movl $0, irq_count + VEC_INJECT * 4(%rip)
    movl $EVTINJ_VALID | EVTINJ_TYPE_INTR | VEC_INJECT, vmcb12 + VMCB_EVENT_INJ(%rip)
    call vm_enter
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_VMMCALL
    mov irq_count + VEC_INJECT * 4(%rip), %ebx
    EXPECT_EQ %rbx, $1
    ret

t_virq:
    lea l2_vmmcall(%rip), %rdi
    call vmcb_setup
    SET_INTERCEPT INTERCEPT_VINTR
    movl $V_IRQ | (1 << V_INTR_PRIO_SHIFT), vmcb12 + VMCB_INT_CTL(%rip)
    movl $VEC_VIRQ, vmcb12 + VMCB_INT_VECTOR(%rip)
    movq $RFLAGS_FIXED | (1 << 9), vmcb12 + VMCB_RFLAGS(%rip)   /* L2's IF=1 */
    movl $0, irq_count + VEC_VIRQ * 4(%rip)
    call vm_enter
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_VINTR       /* APM 15.21.4: L2 could take it, L1 asked first */
    mov vmcb12 + VMCB_INT_CTL(%rip), %ebx
    EXPECT_MASK %rbx, V_IRQ, V_IRQ
    lea l2_vmmcall(%rip), %rbx
    EXPECT_EQ vmcb12+VMCB_RIP(%rip), %rbx
    CLR_INTERCEPT INTERCEPT_VINTR
    call vm_enter
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_VMMCALL
    mov irq_count + VEC_VIRQ * 4(%rip), %ebx
    EXPECT_EQ %rbx, $1
    mov vmcb12 + VMCB_INT_CTL(%rip), %ebx
    EXPECT_MASK %rbx, V_IRQ, 0
    ret

/* ------------------------------------------------------------------ */
/* L2 under nested paging */

/* npt_build: nested tables in npt_pml4, npt_pdpt, npt_pd, npt_pt mapping guest-physical
 * [0, NPT_MAPPED) to the same L1 addresses, with NPT_PAGE sent to npt_target (rax, rcx, rdi
 * clobbered) */
npt_build:
    lea npt_pml4(%rip), %rdi
    mov $4 * 512, %ecx
    xor %eax, %eax
    rep stosq
    lea npt_pdpt + NPT_RW(%rip), %rax
    mov %rax, npt_pml4(%rip)
    lea npt_pd + NPT_RW(%rip), %rax
    mov %rax, npt_pdpt(%rip)
    lea npt_pd(%rip), %rdi
    mov $PTE_PS | NPT_RW, %eax
1:  mov %rax, (%rdi)                  /* 2 MiB pages */
    add $8, %rdi
    add $1 << 21, %rax
    cmp $NPT_MAPPED, %rax
    jb 1b
    lea npt_pt + NPT_RW(%rip), %rax
    mov %rax, npt_pd + NPT_PDE_OFF(%rip)
    lea npt_pt(%rip), %rdi
    mov $(NPT_PAGE & ~0x1FFFFF) | NPT_RW, %eax
2:  mov %rax, (%rdi)                  /* 4 KiB pages */
    add $8, %rdi
    add $1 << 12, %rax
    cmp $(NPT_PAGE & ~0x1FFFFF) + (1 << 21), %rax
    jb 2b
    lea npt_target + NPT_RW(%rip), %rax
    mov %rax, npt_pt + NPT_PTE_OFF(%rip)
    ret

/* npt_setup(rdi = L2 entry point): vmcb_setup, fresh nested tables (npt_build), NP_ENABLE
 * with nested_cr3 = npt_pml4, a TLB flush, and L2's RSI = NPT_PAGE + 0x10 */
npt_setup:
    call vmcb_setup
    call npt_build
    movq $NESTED_CTL_NP_ENABLE, vmcb12 + VMCB_NESTED_CTL(%rip)
    lea npt_pml4(%rip), %rax
    mov %rax, vmcb12 + VMCB_NESTED_CR3(%rip)
    movb $TLB_FLUSH_ALL, vmcb12 + VMCB_TLB_CTL(%rip)
    movq $NPT_PAGE + 0x10, l2_regs + 8 * 6(%rip)
    ret

/* NPT_SET_PTE entry: NPT_PAGE's nested entry := entry (an L1 address plus bits); tables
 * changed, so the next VMRUN flushes L2's TLB (APM 15.16.1) (rax clobbered) */
.macro NPT_SET_PTE entry
    lea \entry(%rip), %rax
    mov %rax, npt_pt + NPT_PTE_OFF(%rip)
    movb $TLB_FLUSH_ALL, vmcb12 + VMCB_TLB_CTL(%rip)
.endm

/* L2 of the NPT tests: read the quadword at RSI into RBX, VMMCALL, write EAX there, VMMCALL */
l2_npt_touch:
    mov (%rsi), %rbx
    vmmcall
l2_npt_write:
    mov %eax, (%rsi)
    vmmcall
    ud2

t_npt_identity:
    lea l2_cpuid_loop(%rip), %rdi
    call npt_setup
    call serve_cpuid
    mov %rdx, %r12
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_VMMCALL
    EXPECT_EQ %r12, $CPUID_EXITS
    EXPECT_EQ l2_regs+8*3(%rip), $(7 * CPUID_EXITS)
    /* then a read of a guest-physical address L1's paging maps and the nested tables do not */
    lea l2_npt_touch(%rip), %rbx
    mov %rbx, vmcb12 + VMCB_RIP(%rip)
    movq $NPT_MAPPED + 0x10, l2_regs + 8 * 6(%rip)
    call vm_enter
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_NPF
    mov $NPF_FINAL | NPF_US, %rbx     /* not present, read, user, in the final translation */
    EXPECT_EQ vmcb12+VMCB_EXIT_INFO_1(%rip), %rbx
    EXPECT_EQ vmcb12+VMCB_EXIT_INFO_2(%rip), $NPT_MAPPED + 0x10
    ret

t_npt_remap:
    lea l2_npt_touch(%rip), %rdi
    call npt_setup
    mov $0x1122334455667788, %rax
    mov %rax, npt_target + 0x10(%rip)
    movq $0xBAD, NPT_PAGE + 0x10      /* what L2 would read without NPT */
    call vm_enter
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_VMMCALL
    mov $0x1122334455667788, %rbx
    EXPECT_EQ l2_regs+8*3(%rip), %rbx
    ret

t_npt_fault:
    lea l2_npt_touch(%rip), %rdi
    call npt_setup
    movq $0, npt_pt + NPT_PTE_OFF(%rip)
    movq $0x5555, npt_target + 0x10(%rip)
    movq $0x600DF00D, vmcb12 + VMCB_RAX(%rip)   /* what L2 writes */
    call vm_enter                     /* the read: not present */
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_NPF
    mov $NPF_FINAL | NPF_US, %rbx
    EXPECT_EQ vmcb12+VMCB_EXIT_INFO_1(%rip), %rbx
    EXPECT_EQ vmcb12+VMCB_EXIT_INFO_2(%rip), $NPT_PAGE + 0x10
    lea l2_npt_touch(%rip), %rbx      /* fault-like: RIP at the read */
    EXPECT_EQ vmcb12+VMCB_RIP(%rip), %rbx
    NPT_SET_PTE npt_target + NPT_RO
    call vm_enter                     /* the read again, now allowed */
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_VMMCALL
    EXPECT_EQ l2_regs+8*3(%rip), $0x5555
    call skip_l2_insn
    call vm_enter                     /* the write: read-only */
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_NPF
    mov $NPF_FINAL | NPF_US | PTE_RW | PTE_P, %rbx
    EXPECT_EQ vmcb12+VMCB_EXIT_INFO_1(%rip), %rbx
    EXPECT_EQ vmcb12+VMCB_EXIT_INFO_2(%rip), $NPT_PAGE + 0x10
    lea l2_npt_write(%rip), %rbx
    EXPECT_EQ vmcb12+VMCB_RIP(%rip), %rbx
    EXPECT_EQ npt_target+0x10(%rip), $0x5555
    NPT_SET_PTE npt_target + NPT_RW
    call vm_enter
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_VMMCALL
    EXPECT_EQ npt_target+0x10(%rip), $0x600DF00D
    ret

/* ------------------------------------------------------------------ */
/* VMRUN consistency checks (APM 15.5.1; KVM nested_vmcb_check_controls / _save) */

t_vmcb_valid:
    lea l2_vmmcall(%rip), %rdi
    call vmcb_setup
    call vm_enter
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_VMMCALL
    ret

/* bad_vmcb(rdi = {offset, and, or}): see BADVMCB */
bad_vmcb:
    push %r12
    mov %rdi, %r12
    lea l2_vmmcall(%rip), %rdi
    call vmcb_setup
    mov (%r12), %rcx
    lea vmcb12(%rip), %rdx
    mov (%rdx, %rcx), %rax
    and 8(%r12), %rax
    or 16(%r12), %rax
    mov %rax, (%rdx, %rcx)
    call expect_vmrun_err
    pop %r12
    ret

/* expect_vmrun_err: VMRUN of vmcb12 is #VMEXIT(SVM_EXIT_ERR) with exit_info_1 = 0. Only what
 * QEMU TCG does too is checked here: exit code bits 31:0; t_vmrun_err_code checks the rest */
expect_vmrun_err:
    movq $0x1111, vmcb12 + VMCB_EXIT_INFO_1(%rip)
    call vm_enter
    mov %eax, %ebx
    EXPECT_EQ %rbx, $0xFFFFFFFF
    EXPECT_EQ vmcb12+VMCB_EXIT_INFO_1(%rip), $0
    ret

/* KVM nested_svm_vmrun on a failed check: exit_code (all 64 bits, APM Table C-1) -1,
 * exit_info_1/2 = 0, the save area untouched (L2 never ran) */
t_vmrun_err_code:
    lea l2_vmmcall(%rip), %rdi
    call vmcb_setup
    movl $0, vmcb12 + VMCB_ASID(%rip)
    movq $0x1111, vmcb12 + VMCB_EXIT_INFO_1(%rip)
    movq $0x2222, vmcb12 + VMCB_EXIT_INFO_2(%rip)
    call vm_enter
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_ERR
    EXPECT_EQ vmcb12+VMCB_EXIT_INFO_1(%rip), $0
    EXPECT_EQ vmcb12+VMCB_EXIT_INFO_2(%rip), $0
    lea l2_vmmcall(%rip), %rbx
    EXPECT_EQ vmcb12+VMCB_RIP(%rip), %rbx
    ret

t_npt_bad_cr3:
    lea l2_vmmcall(%rip), %rdi
    call npt_setup
    mov $MAXPHY_BIT, %rax
    or %rax, vmcb12 + VMCB_NESTED_CR3(%rip)
    jmp expect_vmrun_err

/* ------------------------------------------------------------------ */
/* vmcb12 while L2 runs, and int_ctl */

/* L2 (RSI = vmcb12, shared memory without NPT): rewrite save.rax and clear the CPUID
 * intercept in vmcb12, then CPUID twice */
l2_toctou:
    movq $0xBAD, VMCB_RAX(%rsi)
    andb $~(1 << (INTERCEPT_CPUID & 7)), INTERCEPT_CPUID / 8(%rsi)
    mov $0x40001234, %eax
l2_toctou_cpuid:
    cpuid                             /* L0 uses its cache of vmcb12: still an exit */
    mov $0x40001234, %eax
    xor %ecx, %ecx
    cpuid                             /* after the next VMRUN: no intercept */
    vmmcall
    ud2

t_vmcb12_toctou:
    lea l2_toctou(%rip), %rdi
    call vmcb_setup
    lea vmcb12(%rip), %rax
    mov %rax, l2_regs + 8 * 6(%rip)
    call vm_enter
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_CPUID
    /* APM 15.6: the save area now holds L2's state, not what L2 wrote into it */
    EXPECT_EQ vmcb12+VMCB_RAX(%rip), $0x40001234
    lea l2_toctou_cpuid(%rip), %rbx
    EXPECT_EQ vmcb12+VMCB_RIP(%rip), %rbx
    lea l2_stack_top(%rip), %rbx
    EXPECT_EQ vmcb12+VMCB_RSP(%rip), %rbx
    movzwl vmcb12 + VMCB_CS + SEG_SEL(%rip), %ebx
    EXPECT_EQ %rbx, $SEL_CODE64
    movzwl vmcb12 + VMCB_CS + SEG_ATTRIB(%rip), %ebx
    EXPECT_MASK %rbx, ATTR_L | ATTR_DB, ATTR_L
    mov vmcb12 + VMCB_EFER(%rip), %rbx
    EXPECT_MASK %rbx, EFER_SVME | EFER_LMA, EFER_SVME | EFER_LMA
    movzbl vmcb12 + INTERCEPT_CPUID / 8(%rip), %ebx
    EXPECT_MASK %rbx, 1 << (INTERCEPT_CPUID & 7), 0  /* #VMEXIT does not write the intercepts */
    call skip_l2_insn
    call vm_enter                     /* this VMRUN caches the cleared intercept */
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_VMMCALL
    mov $0x40001234, %eax             /* L0 answered L2's CPUID as it answers L1's */
    xor %ecx, %ecx
    cpuid
    mov %eax, %ebx
    EXPECT_EQ vmcb12+VMCB_RAX(%rip), %rbx
    ret

/* L2 under V_INTR_MASKING: read CR8 (V_TPR), lower it below the pending V_IRQ's priority */
l2_cr8:
    mov %cr8, %rbx
    mov $2, %eax
    mov %rax, %cr8                    /* the V_IRQ of priority 5 is taken here */
    nop
    vmmcall
    ud2

t_int_ctl:
    lea l2_cr8(%rip), %rdi
    call vmcb_setup
    movl $V_INTR_MASKING | V_IRQ | (5 << V_INTR_PRIO_SHIFT) | 6, vmcb12 + VMCB_INT_CTL(%rip)
    movl $VEC_VIRQ, vmcb12 + VMCB_INT_VECTOR(%rip)
    movq $RFLAGS_FIXED | (1 << 9), vmcb12 + VMCB_RFLAGS(%rip)
    movl $0, irq_count + VEC_VIRQ * 4(%rip)
    call vm_enter
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_VMMCALL
    EXPECT_EQ l2_regs+8*3(%rip), $6          /* L2's CR8 read V_TPR */
    mov irq_count + VEC_VIRQ * 4(%rip), %ebx
    EXPECT_EQ %rbx, $1
    /* APM 15.21: V_TPR as L2 wrote it, V_IRQ clear once taken, L1's other bits unchanged */
    mov vmcb12 + VMCB_INT_CTL(%rip), %ebx
    EXPECT_EQ %rbx, $V_INTR_MASKING | (5 << V_INTR_PRIO_SHIFT) | 2
    mov %cr8, %rbx                    /* L1's own TPR was never L2's */
    EXPECT_EQ %rbx, $0
    ret

l2_no_idt:
    lidt zero_idt(%rip)
    ud2

t_l2_shutdown:
    lea l2_no_idt(%rip), %rdi
    call vmcb_setup
    call vm_enter
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_SHUTDOWN
    ret

t_svm_disable:
    mov $MSR_EFER, %ecx
    rdmsr
    and $~EFER_SVME, %eax
    wrmsr
    lea vmcb12(%rip), %rax
    TRY vmrun
    EXPECT_FAULT 6, 0
    ret

    .section .rodata
tap_title: .asciz "# nestvisor svmtest: an L1 SVM hypervisor and its L2 guests\n"

    .data
    .balign 8
last_exit:    .quad 0
exit_log:     .skip 8 * MAX_LOG
info1_log:    .skip 8 * MAX_LOG
info2_log:    .skip 8 * MAX_LOG
zero_idt:     .word 0
              .quad 0

    .bss
    .balign 4096
vmsave_page:  .skip 4096
npt_pml4:     .skip 4096            /* nested tables (npt_build): PML4, PDPT, PD, one PT */
npt_pdpt:     .skip 4096
npt_pd:       .skip 4096
npt_pt:       .skip 4096
npt_target:   .skip 4096            /* where the nested tables send L2's NPT_PAGE */
