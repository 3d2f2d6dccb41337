/*
 * svm.h - what the bundled L1 SVM hypervisors share: VMCB offsets, intercept
 * bits, exit codes and control bits (AMD APM vol. 2 chapter 15 and appendix
 * B, C), a vmcb12 set-up for a 64-bit L2 that shares L1's GDT, IDT and page
 * tables, and vm_enter, which runs L2 until its next #VMEXIT with L2's
 * registers kept in l2_regs (RAX in the VMCB). Include after runtime.h.
 */

/* MSRs and bits (APM 15.30 "SVM Related MSRs"; 3.1.7 EFER) */
.set MSR_VM_CR, 0xC0010114
.set MSR_VM_HSAVE_PA, 0xC0010117
.set MSR_SYSENTER_CS, 0x174
.set EFER_SVME, 1 << 12

/* CPUID (APM vol. 3 appendix E.4.2 and E.4.9) */
.set CPUID_EXT_SVM, 1 << 2            /* Fn8000_0001_ECX */
.set CPUID_SVM_NP, 1 << 0             /* Fn8000_000A_EDX */
.set CPUID_SVM_NRIPS, 1 << 3

/* VMCB control area (APM Table B-1) */
.set VMCB_INTERCEPT_CR, 0x000         /* bits 15:0 CRn read, 31:16 CRn write */
.set VMCB_INTERCEPT_EXC, 0x008        /* bit v: exception vector v */
.set VMCB_IOPM_BASE, 0x040
.set VMCB_MSRPM_BASE, 0x048
.set VMCB_ASID, 0x058
.set VMCB_TLB_CTL, 0x05C
.set VMCB_INT_CTL, 0x060
.set VMCB_INT_VECTOR, 0x064
.set VMCB_EXIT_CODE, 0x070
.set VMCB_EXIT_INFO_1, 0x078
.set VMCB_EXIT_INFO_2, 0x080
.set VMCB_EXIT_INT_INFO, 0x088
.set VMCB_NESTED_CTL, 0x090
.set VMCB_EVENT_INJ, 0x0A8
.set VMCB_EVENT_INJ_ERR, 0x0AC
.set VMCB_NESTED_CR3, 0x0B0
.set VMCB_NEXT_RIP, 0x0C8

/* VMCB state save area, from the VMCB's start (APM Table B-2, which counts from 0x400) */
.set VMCB_ES, 0x400
.set VMCB_CS, 0x410
.set VMCB_SS, 0x420
.set VMCB_DS, 0x430
.set VMCB_GDTR, 0x460
.set VMCB_IDTR, 0x480
.set VMCB_CPL, 0x4CB
.set VMCB_EFER, 0x4D0
.set VMCB_CR4, 0x548
.set VMCB_CR3, 0x550
.set VMCB_CR0, 0x558
.set VMCB_DR7, 0x560
.set VMCB_DR6, 0x568
.set VMCB_RFLAGS, 0x570
.set VMCB_RIP, 0x578
.set VMCB_RSP, 0x5D8
.set VMCB_RAX, 0x5F8
.set VMCB_CR2, 0x640
.set VMCB_G_PAT, 0x668
/* a segment in the save area: selector, attributes, limit, base (APM Table B-2) */
.set SEG_SEL, 0
.set SEG_ATTRIB, 2
.set SEG_LIMIT, 4
.set SEG_BASE, 8
/* attributes: descriptor bits 47:40 and 55:52 (APM 15.5.1) */
.set ATTR_CODE64, 0xA9B               /* code, S, P, L, G */
.set ATTR_DATA, 0xC93                 /* data, S, P, D/B, G */
.set ATTR_L, 1 << 9
.set ATTR_DB, 1 << 10

/* Intercept bit numbers: the VMCB's intercept words from offset 0 as one bit string (APM Table B-1) */
.set INTERCEPT_CR0_READ, 0
.set INTERCEPT_CR0_WRITE, 16
.set INTERCEPT_CR3_WRITE, 19
.set INTERCEPT_EXC, 64                /* + vector */
.set INTERCEPT_INTR, 96
.set INTERCEPT_NMI, 97
.set INTERCEPT_VINTR, 100
.set INTERCEPT_RDTSC, 110
.set INTERCEPT_CPUID, 114
.set INTERCEPT_PAUSE, 119
.set INTERCEPT_HLT, 120
.set INTERCEPT_INVLPG, 121
.set INTERCEPT_IOIO, 123
.set INTERCEPT_MSR, 124
.set INTERCEPT_SHUTDOWN, 127
.set INTERCEPT_VMRUN, 128
.set INTERCEPT_VMMCALL, 129

/* Exit codes (APM appendix C, Table C-1) */
.set EXIT_CR0_READ, 0x000
.set EXIT_CR0_WRITE, 0x010
.set EXIT_CR3_WRITE, 0x013
.set EXIT_EXC, 0x040                  /* + vector */
.set EXIT_INTR, 0x060
.set EXIT_VINTR, 0x064
.set EXIT_RDTSC, 0x06E
.set EXIT_CPUID, 0x072
.set EXIT_PAUSE, 0x077
.set EXIT_HLT, 0x078
.set EXIT_INVLPG, 0x079
.set EXIT_IOIO, 0x07B
.set EXIT_MSR, 0x07C
.set EXIT_SHUTDOWN, 0x07F
.set EXIT_VMRUN, 0x080
.set EXIT_VMMCALL, 0x081
.set EXIT_NPF, 0x400
.set EXIT_ERR, -1                     /* VMEXIT_INVALID: a VMRUN consistency check failed */

/* int_ctl (APM Table B-1, 15.21) */
.set V_TPR_MASK, 0xF
.set V_IRQ, 1 << 8
.set V_INTR_PRIO_SHIFT, 16
.set V_IGN_TPR, 1 << 20
.set V_INTR_MASKING, 1 << 24
.set V_NMI_ENABLE, 1 << 26

/* EVENTINJ (APM 15.20, Figure 15-4) */
.set EVTINJ_VALID, 1 << 31
.set EVTINJ_VALID_ERR, 1 << 11
.set EVTINJ_TYPE_INTR, 0 << 8
.set EVTINJ_TYPE_NMI, 2 << 8
.set EVTINJ_TYPE_EXEPT, 3 << 8

/* IOIO exit_info_1 (APM 15.10.2, Figure 15-2) */
.set IOIO_TYPE_IN, 1 << 0
.set IOIO_SZ8, 1 << 4
.set IOIO_SZ16, 1 << 5
.set IOIO_ASIZE_MASK, 7 << 7
.set IOIO_PORT_SHIFT, 16

/* NPF exit_info_1: a #PF error code and where the fault hit (APM 15.25.6) */
.set NPF_US, 1 << 2
.set NPF_FINAL, 1 << 32               /* in the final guest-physical translation */
.set NESTED_CTL_NP_ENABLE, 1 << 0
.set TLB_FLUSH_ALL, 1                 /* tlb_ctl (APM 15.16.1) */

/* The permission maps' sizes (APM 15.10.1, 15.11) */
.set IOPM_SIZE, 0x3000
.set MSRPM_SIZE, 0x2000

/* SET_INTERCEPT / CLR_INTERCEPT bit: in vmcb12 */
.macro SET_INTERCEPT bit
    orb $1 << ((\bit) & 7), vmcb12 + (\bit) / 8(%rip)
.endm
.macro CLR_INTERCEPT bit
    andb $~(1 << ((\bit) & 7)), vmcb12 + (\bit) / 8(%rip)
.endm

/* ------------------------------------------------------------------ */

    .text
/* vmcb_set_seg(rdi = VMCB offset of the segment, si = selector, edx = attributes) with
 * limit 0xffffffff and base 0 */
vmcb_set_seg:
    lea vmcb12(%rip), %rax
    add %rax, %rdi
    mov %si, SEG_SEL(%rdi)
    mov %dx, SEG_ATTRIB(%rdi)
    movl $0xFFFFFFFF, SEG_LIMIT(%rdi)
    movq $0, SEG_BASE(%rdi)
    ret

/* vmcb_setup(rdi = L2 entry point): a fresh vmcb12 for a 64-bit L2 that shares L1's GDT,
 * IDT and paging, with zeroed registers and empty permission maps. Intercepts: VMRUN (which
 * APM 15.5.1 requires), VMMCALL, CPUID, HLT, SHUTDOWN, and IOIO and MSR through the maps. */
vmcb_setup:
    push %rbx
    push %r12
    mov %rdi, %r12
    lea vmcb12(%rip), %rdi
    mov $4096 / 8, %ecx
    xor %eax, %eax
    rep stosq
    lea l2_regs(%rip), %rdi
    mov $16, %ecx
    rep stosq
    lea iopm(%rip), %rdi
    mov $(IOPM_SIZE + MSRPM_SIZE) / 8, %ecx      /* msrpm follows iopm */
    rep stosq
    /* FS, GS, TR, LDTR and the syscall MSRs move only by VMLOAD/VMSAVE (APM "VMLOAD"):
     * L2 starts with L1's */
    lea vmcb12(%rip), %rax
    vmsave
    SET_INTERCEPT INTERCEPT_VMRUN
    SET_INTERCEPT INTERCEPT_VMMCALL
    SET_INTERCEPT INTERCEPT_CPUID
    SET_INTERCEPT INTERCEPT_HLT
    SET_INTERCEPT INTERCEPT_SHUTDOWN
    SET_INTERCEPT INTERCEPT_IOIO
    SET_INTERCEPT INTERCEPT_MSR
    lea iopm(%rip), %rax
    mov %rax, vmcb12 + VMCB_IOPM_BASE(%rip)
    lea msrpm(%rip), %rax
    mov %rax, vmcb12 + VMCB_MSRPM_BASE(%rip)
    movl $1, vmcb12 + VMCB_ASID(%rip)          /* ASID 0 is the host's (APM 15.16) */
    mov $VMCB_CS, %edi
    mov $SEL_CODE64, %esi
    mov $ATTR_CODE64, %edx
    call vmcb_set_seg
    mov $VMCB_ES, %ebx
1:  mov %ebx, %edi
    mov $SEL_DATA, %esi
    mov $ATTR_DATA, %edx
    call vmcb_set_seg
    add $0x10, %ebx
    cmp $VMCB_CS, %ebx
    jne 2f
    add $0x10, %ebx                   /* CS is set above */
2:  cmp $VMCB_DS, %ebx
    jbe 1b
    movl $gdt_end - gdt - 1, vmcb12 + VMCB_GDTR + SEG_LIMIT(%rip)
    lea gdt(%rip), %rax
    mov %rax, vmcb12 + VMCB_GDTR + SEG_BASE(%rip)
    movl $256 * 16 - 1, vmcb12 + VMCB_IDTR + SEG_LIMIT(%rip)
    lea idt(%rip), %rax
    mov %rax, vmcb12 + VMCB_IDTR + SEG_BASE(%rip)
    mov $MSR_EFER, %ecx
    rdmsr
    mov %eax, vmcb12 + VMCB_EFER(%rip)        /* with SVME, which APM 15.5.1 requires */
    mov %cr0, %rax
    mov %rax, vmcb12 + VMCB_CR0(%rip)
    mov %cr3, %rax
    mov %rax, vmcb12 + VMCB_CR3(%rip)
    mov %cr4, %rax
    mov %rax, vmcb12 + VMCB_CR4(%rip)
    movl $0xFFFF0FF0, vmcb12 + VMCB_DR6(%rip)   /* the reset values (APM 13.1.1) */
    movl $0x400, vmcb12 + VMCB_DR7(%rip)
    mov $PAT_DEFAULT, %rax
    mov %rax, vmcb12 + VMCB_G_PAT(%rip)
    movq $RFLAGS_FIXED, vmcb12 + VMCB_RFLAGS(%rip)
    lea l2_stack_top(%rip), %rax
    mov %rax, vmcb12 + VMCB_RSP(%rip)
    mov %r12, vmcb12 + VMCB_RIP(%rip)
    pop %r12
    pop %rbx
    ret

/* svm_enable() -> eax = 1 if CPUID has no SVM, else 0 with EFER.SVME set, VM_HSAVE_PA
 * pointing at hsave_area (APM 15.4 "Enabling SVM") and has_nrips known */
svm_enable:
    push %rbx
    mov $0x80000001, %eax
    cpuid
    test $CPUID_EXT_SVM, %ecx
    jz 1f
    mov $MSR_EFER, %ecx
    rdmsr
    or $EFER_SVME, %eax
    wrmsr
    mov $MSR_VM_HSAVE_PA, %ecx
    lea hsave_area(%rip), %rax
    mov %rax, %rdx
    shr $32, %rdx
    wrmsr
    call svm_features
    xor %eax, %eax
    pop %rbx
    ret
1:  mov $1, %eax
    pop %rbx
    ret

/*
 * vm_enter() -> rax = vmcb12's exit code (EXIT_ERR if VMRUN's checks failed). As KVM's
 * svm_vcpu_run: CLGI, VMSAVE of L1's FS/GS/TR/LDTR/MSRs to host_save, VMLOAD of L2's from
 * vmcb12, VMRUN, then the reverse and STGI. L2's RAX and RSP are in vmcb12; its other
 * registers come from l2_regs and go back there, as #VMEXIT leaves them (APM 15.6).
 * vm_enter_gif0 leaves GIF = 0 after the #VMEXIT, as #VMEXIT does (APM 15.17).
 */
vm_enter_gif0:
    movb $0, stgi_after(%rip)
    jmp 1f
vm_enter:
    movb $1, stgi_after(%rip)
1:  push %rbx
    push %rbp
    push %r12
    push %r13
    push %r14
    push %r15
    clgi
    lea host_save(%rip), %rax
    vmsave
    L2_GPRS_LOAD
    lea vmcb12(%rip), %rax
    vmload
    vmrun
    vmsave                            /* #VMEXIT restored RAX: still vmcb12 */
    L2_GPRS_STORE
    lea host_save(%rip), %rax
    vmload
    cmpb $0, stgi_after(%rip)
    je 2f
    stgi
2:  mov vmcb12 + VMCB_EXIT_CODE(%rip), %rax
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %rbp
    pop %rbx
    ret

/* skip_l2_insn: vmcb12 RIP := the address after the intercepted instruction: next_rip with
 * NRIPS (APM 15.7.1); without it (QEMU TCG), exit_info_2 for IOIO (APM 15.10.2) or the
 * length of the instruction these guests use for that exit (rax, rcx, rdx clobbered) */
skip_l2_insn:
    mov vmcb12 + VMCB_NEXT_RIP(%rip), %rax
    cmpb $0, has_nrips(%rip)
    jne 3f
    mov vmcb12 + VMCB_EXIT_INFO_2(%rip), %rax
    mov vmcb12 + VMCB_EXIT_CODE(%rip), %rdx
    cmp $EXIT_IOIO, %rdx
    je 3f
    lea insn_lengths(%rip), %rcx
1:  cmpw $-1, (%rcx)
    je 4f                             /* not in the table: L2 stays where it is */
    cmp %dx, (%rcx)
    je 2f
    add $4, %rcx
    jmp 1b
2:  movzwl 2(%rcx), %eax
    add vmcb12 + VMCB_RIP(%rip), %rax
3:  mov %rax, vmcb12 + VMCB_RIP(%rip)
4:  ret

/* svm_features(): has_nrips := CPUID Fn8000_000A_EDX.NRIPS (rax..rdx clobbered) */
svm_features:
    push %rbx
    mov $0x8000000A, %eax
    cpuid
    test $CPUID_SVM_NRIPS, %edx
    setnz has_nrips(%rip)
    pop %rbx
    ret

    .section .rodata
    .balign 4
/* {exit code, length} of the intercepted instructions in these guests (vmcb12 without
 * NRIPS); INVLPG is invlpg (%rsp) */
insn_lengths:
    .word EXIT_CR0_READ, 3, EXIT_CR0_WRITE, 3, EXIT_CR3_WRITE, 3, EXIT_RDTSC, 2, EXIT_CPUID, 2, EXIT_PAUSE, 2
    .word EXIT_HLT, 1, EXIT_INVLPG, 4, EXIT_MSR, 2, EXIT_VMRUN, 3, EXIT_VMMCALL, 3
    .word -1

    .text
    .data
    .balign 8
stgi_after:   .byte 0
has_nrips:    .byte 0
    .balign 8
l2_regs:      .skip 8 * 16          /* L2's registers by number (RAX and RSP unused: in vmcb12) */

    .bss
    .balign 4096
vmcb12:       .skip 4096
host_save:    .skip 4096            /* L1's VMSAVE area while L2 runs */
hsave_area:   .skip 4096            /* VM_HSAVE_PA: the CPU's, L1 never touches it (APM 15.30.4) */
iopm:         .skip IOPM_SIZE
msrpm:        .skip MSRPM_SIZE
l2_stack:     .skip 8192
l2_stack_top:

    .text
