/*
 * vmxtest.S - nestvisor's bundled L1 VMX hypervisor and its L2 guests.
 *
 * Boots by multiboot into long mode (runtime.h), enters VMX operation and
 * runs the checks in the TEST table (one TAP line each, tap.h): the VMX
 * instructions' outcomes, VM-entry checks that fail each way the SDM says,
 * and L2 guests that exit to this L1 for CPUID, I/O, HLT, RDMSR through the
 * MSR bitmap, CR3 reads, VMCALL, exceptions in the exception bitmap,
 * external interrupts, triple faults, INVEPT and INVVPID, with event
 * injection on entry; INVEPT and INVVPID in L1 with good and bad operands;
 * L2 under EPT tables this L1 builds (remapping, violations, misconfigurations,
 * accessed and dirty flags, INVEPT).
 *
 * L2 shares L1's GDT, IDT and page tables and runs in 64-bit mode on its
 * own stack; its general registers are saved in l2_regs at every exit and
 * loaded from there at every entry (vm_enter, in vmx.h), as a real
 * hypervisor does.
 */

.include "runtime.h"
.include "tap.h"
.include "vmx.h"

.set VEC_INJECT, 0x33
.set VEC_EXTINT, 0x34
.set CPUID_EXITS, 10
/* INVEPT and INVVPID types (SDM Vol. 2 "INVEPT", "INVVPID") */
.set INVEPT_SINGLE, 1
.set INVEPT_ALL, 2
.set INVVPID_ADDR, 0
.set INVVPID_SINGLE, 1
.set INVVPID_ALL, 2
.set INVVPID_SINGLE_KEEP_GLOBALS, 3
.set EPTP_WB_4LEVEL, 6 | (3 << 3)     /* memory type WB, page-walk length 4 (SDM 25.6.11) */
.set EPTP_AD, 1 << 6
.set NONCANONICAL, 0x8000000000000000
/* EPT entries (SDM 29.3.2, Tables 29-1 to 29-6) */
.set EPT_R, 1 << 0
.set EPT_W, 1 << 1
.set EPT_RWX, 7
.set EPT_WB, 6 << 3                   /* memory type of a page (leaf entries only) */
.set EPT_LARGE, 1 << 7
.set EPT_A, 1 << 8
.set EPT_D, 1 << 9
/* ept_build's map: guest-physical [0, EPT_MAPPED) identity, in 2 MiB pages except the
 * 2 MiB around EPT_PAGE, which ept_pt maps in 4 KiB pages with EPT_PAGE sent elsewhere */
.set EPT_MAPPED, 8 << 20
.set EPT_PAGE, 0x403000
.set EPT_PDE_OFF, (EPT_PAGE >> 21) * 8              /* in ept_pd */
.set EPT_PTE_OFF, ((EPT_PAGE >> 12) & 511) * 8      /* in ept_pt */
/* L1's PDPT[1] -> pd_low: linear ALIAS + x is guest-physical x, so an L2 address that
 * EPT refuses has a linear address that differs from its guest-physical one */
.set ALIAS, 1 << 30
.set EPT_LINEAR, ALIAS + EPT_PAGE + 0x10     /* what the EPT tests' L2 reads and writes */

    TESTS_BEGIN
    DEFTEST t_vmx_feature, vmx_feature, "CPUID.1:ECX.VMX and IA32_VMX_BASIC (revision 0x11e57ed0, TRUE controls)"
    DEFTEST t_vmxon_ud, vmxon_ud, "VMXON with CR4.VMXE=0 is #UD"
    DEFTEST t_vmxon_gp, vmxon_gp, "VMXON with CR0.NE=0, or with IA32_FEATURE_CONTROL unlocked, is #GP(0)"
    DEFTEST t_vmxon, vmxon, "VMXON succeeds (CF=ZF=0) after locking IA32_FEATURE_CONTROL"
    DEFTEST t_cr4_vmxe_pinned, cr4_vmxe_pinned, "clearing CR4.VMXE in VMX operation is #GP(0)"
    DEFTEST t_vmxon_again, vmxon_again, "VMXON in VMX root operation without a current VMCS is VMfailInvalid"
    DEFTEST t_vmptrld_revision, vmptrld_revision, "VMPTRLD of a region with a wrong revision fails"
    DEFTEST t_vmptrld, vmptrld, "VMCLEAR, VMPTRLD and VMPTRST of a VMCS"
    DEFTEST t_vmread_unsupported, vmread_unsupported, "VMREAD of CR3_TARGET_VALUE0 is VMfailValid(12)"
    DEFTEST t_vmwrite_vmread, vmwrite_vmread, "VMWRITE/VMREAD: AR-bytes mask, high half of a 64-bit field"
    DEFTEST t_vmresume_clear, vmresume_clear, "VMRESUME of a clear VMCS is VMfailValid(5)"
    DEFTEST t_entry_bad_control, entry_bad_control, "VM entry with a reserved pin-based control is VMfailValid(7)"
    DEFTEST t_entry_bad_host, entry_bad_host, "VM entry with HOST_CR0.NE=0 is VMfailValid(8)"
    DEFTEST t_entry_bad_guest, entry_bad_guest, "VM entry with activity state 2 fails with exit reason 0x80000021"
    DEFTEST t_entry_vpid, entry_vpid, "VM entry with enable VPID: VPID 0 is VMfailValid(7), VPID 1 enters L2"
    DEFTEST t_entry_bad_eptp, entry_bad_eptp, "VM entry with enable EPT and an EPTP of memory type 1 or reserved bit 7 is VMfailValid(7)"
    DEFTEST t_invvpid, invvpid, "INVVPID: every type; VPID 0, VPID > 0xffff, a non-canonical address, type 4 are VMfailValid(28); #GP, #SS"
    DEFTEST t_invept, invept, "INVEPT: single- and all-context; a bad EPTP, types 0 and 3 are VMfailValid(28)"
    DEFTEST t_l2_cpuid, l2_cpuid, "L2 CPUID exits to L1 10 times; L1's answers reach L2"
    DEFTEST t_l2_exits, l2_exits, "L2 exits for OUT, HLT, INVD, RDMSR (bitmap), MOV from CR3, VMCALL; not for RDMSR of PAT"
    DEFTEST t_l2_exception, l2_exception, "L2 #UD in the exception bitmap exits with interruption info 0x80000306"
    DEFTEST t_l2_lazy_sync, l2_lazy_sync, "L2's ES survives a round trip without a sync; VMREAD of GUEST_ES_SELECTOR sees it"
    DEFTEST t_l2_inject, l2_inject, "an external interrupt injected on VM entry runs L2's handler"
    DEFTEST t_l2_extint, l2_extint, "external-interrupt exiting with acknowledge-on-exit reports the vector"
    DEFTEST t_l2_intr_window, l2_intr_window, "interrupt-window exit right after the STI shadow (sti; nop; vmcall)"
    DEFTEST t_l2_nmi_window, l2_nmi_window, "NMI-window exit (virtual NMIs): at once without blocking, after L2's IRET with virtual-NMI blocking"
    DEFTEST t_l2_preemption, l2_preemption, "VMX-preemption timer: an exit (reason 52) after the count, value saved as 0"
    DEFTEST t_shadow_vmcs, shadow_vmcs, "VMCS shadowing: L2's VMREAD/VMWRITE use the shadow VMCS; a bitmap bit makes VMREAD exit"
    DEFTEST t_l2_invalidate, l2_invalidate, "L2's INVVPID and INVEPT exit (reasons 53, 50) with instruction information"
    DEFTEST t_l2_triple_fault, l2_triple_fault, "a triple fault in L2 exits to L1 (reason 2)"
    DEFTEST t_ept_identity, ept_identity, "EPT identity map: L2's CPUID exits work; a guest-physical address past the map is an EPT violation"
    DEFTEST t_ept_remap, ept_remap, "EPT maps an L2 guest-physical page to another L1 page: L2 reads that page"
    DEFTEST t_ept_violation, ept_violation, "EPT violation: L2's write to a read-only page exits (reason 48, qualification 0x18a, GPA, linear); resumed after L1 allows it"
    DEFTEST t_ept_misconfig, ept_misconfig, "EPT misconfiguration: write-only or memory type 7 exits (reason 49) with the GPA"
    DEFTEST t_ept_ad, ept_ad, "EPT A/D flags: a read sets A, a write D in the leaf; none without EPTP bit 6"
    DEFTEST t_ept_invept, ept_invept, "after INVEPT (single-, then all-context) L2 sees the new EPT mapping"
    DEFTEST t_vmxoff, vmxoff, "VMXOFF leaves VMX operation; VMREAD is then #UD"
    TESTS_END

.macro EXPECT_VMFLAGS want
    EXPECT_EQ vm_flags(%rip), $\want
.endm

/* MARK_VMERR: VMREAD of an unsupported field makes VM_INSTRUCTION_ERROR 12, so a later
 * check sees whether an instruction that succeeded wrote it (rax, rbx clobbered) */
.macro MARK_VMERR
    mov $CR3_TARGET_VALUE0, %eax
    vmread %rax, %rbx
.endm

/* INV_TRY insn, type, low, high: INVEPT or INVVPID of `type` on the descriptor {low, high}
 * (bits 63:0, 127:64); vm_flags gets CF/ZF (rax, rbx clobbered) */
.macro INV_TRY insn, type, low, high
    mov \low, %rax
    mov %rax, inv_desc(%rip)
    mov \high, %rax
    mov %rax, inv_desc+8(%rip)
    mov \type, %rbx
    \insn inv_desc(%rip), %rbx
    SAVE_VMFLAGS
.endm

/* the last INVEPT/INVVPID succeeded and left VM_INSTRUCTION_ERROR alone (after MARK_VMERR) */
.macro EXPECT_INV_OK
    EXPECT_VMFLAGS 0
    VMREAD_R VM_INSTRUCTION_ERROR, %rbx
    EXPECT_EQ %rbx, $12
.endm

/* the last INVEPT/INVVPID was VMfailValid(invalid operand to INVEPT/INVVPID) */
.macro EXPECT_INV_FAIL
    EXPECT_VMFLAGS RFL_ZF
    VMREAD_R VM_INSTRUCTION_ERROR, %rbx
    EXPECT_EQ %rbx, $28
.endm

/* ENABLE_SECONDARY controls: activate the secondary controls with these bits */
.macro ENABLE_SECONDARY controls
    VMREAD_R CPU_BASED_CONTROLS, %rbx
    bts $31, %rbx                     /* CPU_SECONDARY: 1 << 31 does not fit a sign-extended imm32 */
    VMWRITE_I CPU_BASED_CONTROLS, %rbx
    VMWRITE_I SECONDARY_CONTROLS, $\controls
.endm

/* ------------------------------------------------------------------ */
/* VMX instructions */

t_vmx_feature:
    mov $1, %eax
    cpuid
    mov %rcx, %rbx
    EXPECT_MASK %rbx, (1<<5), (1<<5)
    mov $MSR_VMX_BASIC, %ecx
    rdmsr
    mov %rax, %rbx
    EXPECT_EQ %rbx, $VMCS_REVISION
    mov %rdx, %rbx
    EXPECT_MASK %rbx, (1<<23), (1<<23)   /* bit 55 */
    ret

t_vmxon_ud:
    TRY vmxon vmxon_ptr(%rip)
    EXPECT_FAULT 6, 0
    ret

t_vmxon_gp:
    mov %cr4, %rax
    or $CR4_VMXE, %rax
    mov %rax, %cr4
    mov %cr0, %rax                    /* CR0.NE: fixed to 1 in VMX operation (IA32_VMX_CR0_FIXED0) */
    and $~(1 << 5), %rax
    mov %rax, %cr0
    TRY vmxon vmxon_ptr(%rip)
    EXPECT_FAULT 13, 0
    mov %cr0, %rax
    or $1 << 5, %rax
    mov %rax, %cr0
    TRY vmxon vmxon_ptr(%rip)
    EXPECT_FAULT 13, 0
    ret

t_vmxon:
    mov $MSR_FEATURE_CONTROL, %ecx
    mov $5, %eax                      /* locked, VMXON outside SMX */
    xor %edx, %edx
    wrmsr
    movl $VMCS_REVISION, vmxon_region(%rip)
    movl $VMCS_REVISION, vmcs_a(%rip)
    TRY vmxon vmxon_ptr(%rip)
    SAVE_VMFLAGS
    EXPECT_NO_FAULT
    EXPECT_VMFLAGS 0
    ret

t_cr4_vmxe_pinned:
    mov %cr4, %rbx
    mov %rbx, %rax
    and $~CR4_VMXE, %rax
    TRY mov %rax, %cr4
    EXPECT_FAULT 13, 0
    mov %cr4, %rax
    EXPECT_EQ %rax, %rbx
    ret

t_vmxon_again:
    vmxon vmxon_ptr(%rip)
    SAVE_VMFLAGS
    EXPECT_VMFLAGS RFL_CF
    ret

t_vmptrld_revision:
    vmptrld bad_vmcs_ptr(%rip)
    SAVE_VMFLAGS
    EXPECT_VMFLAGS RFL_CF
    ret

t_vmptrld:
    vmclear vmcs_a_ptr(%rip)
    SAVE_VMFLAGS
    EXPECT_VMFLAGS 0
    vmptrld vmcs_a_ptr(%rip)
    SAVE_VMFLAGS
    EXPECT_VMFLAGS 0
    movq $0, vmptr_out(%rip)
    vmptrst vmptr_out(%rip)
    EXPECT_EQ vmptr_out(%rip), vmcs_a_ptr(%rip)
    ret

t_vmread_unsupported:
    mov $CR3_TARGET_VALUE0, %eax
    vmread %rax, %rbx
    SAVE_VMFLAGS
    EXPECT_VMFLAGS RFL_ZF
    VMREAD_R VM_INSTRUCTION_ERROR, %rbx
    EXPECT_EQ %rbx, $12
    ret

t_vmwrite_vmread:
    VMWRITE_I GUEST_ES_AR_BYTES, $0xFFFFFFFF
    SAVE_VMFLAGS
    EXPECT_VMFLAGS 0
    VMREAD_R GUEST_ES_AR_BYTES, %rbx
    EXPECT_EQ %rbx, $0x1F0FF
    mov $0x1122334455667788, %rdx
    mov $TSC_OFFSET, %eax
    vmwrite %rdx, %rax
    VMREAD_R TSC_OFFSET + 1, %rbx     /* the _HIGH access: bits 63:32 */
    EXPECT_EQ %rbx, $0x11223344
    VMWRITE_I TSC_OFFSET, $0
    ret

t_vmresume_clear:
    lea l2_vmcall(%rip), %rdi
    call vmcs_setup
    xor %edi, %edi
    call vm_enter
    EXPECT_EQ %rax, $-1
    EXPECT_VMFLAGS RFL_ZF
    VMREAD_R VM_INSTRUCTION_ERROR, %rbx
    EXPECT_EQ %rbx, $5
    ret

t_entry_bad_control:
    lea l2_vmcall(%rip), %rdi
    call vmcs_setup
    VMREAD_R PIN_BASED_CONTROLS, %rbx
    or $1 << 20, %rbx                 /* reserved: not in the allowed-1 settings */
    VMWRITE_I PIN_BASED_CONTROLS, %rbx
    mov $1, %edi
    call vm_enter
    EXPECT_EQ %rax, $-1
    EXPECT_VMFLAGS RFL_ZF
    VMREAD_R VM_INSTRUCTION_ERROR, %rbx
    EXPECT_EQ %rbx, $7
    ret

t_entry_bad_host:
    lea l2_vmcall(%rip), %rdi
    call vmcs_setup
    mov %cr0, %rbx
    and $~(1 << 5), %rbx              /* NE is fixed to 1 in VMX operation */
    VMWRITE_I HOST_CR0, %rbx
    mov $1, %edi
    call vm_enter
    EXPECT_EQ %rax, $-1
    EXPECT_VMFLAGS RFL_ZF
    VMREAD_R VM_INSTRUCTION_ERROR, %rbx
    EXPECT_EQ %rbx, $8
    ret

t_entry_bad_guest:
    lea l2_vmcall(%rip), %rdi
    call vmcs_setup
    VMWRITE_I GUEST_ACTIVITY_STATE, $2   /* shutdown: not a state VM entry may load */
    mov $1, %edi
    call vm_enter
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_INVALID_STATE
    VMREAD_R EXIT_QUALIFICATION, %rbx
    EXPECT_EQ %rbx, $0
    xor %edi, %edi                    /* the VMCS stays clear (SDM 27.8) */
    call vm_enter
    EXPECT_EQ %rax, $-1
    VMREAD_R VM_INSTRUCTION_ERROR, %rbx
    EXPECT_EQ %rbx, $5
    ret

t_entry_vpid:
    lea l2_vmcall(%rip), %rdi
    call vmcs_setup
    ENABLE_SECONDARY SEC_VPID
    VMWRITE_I VIRTUAL_PROCESSOR_ID, $0    /* SDM 27.2.1.1: enable VPID needs a VPID other than 0 */
    mov $1, %edi
    call vm_enter
    EXPECT_EQ %rax, $-1
    EXPECT_VMFLAGS RFL_ZF
    VMREAD_R VM_INSTRUCTION_ERROR, %rbx
    EXPECT_EQ %rbx, $7
    VMWRITE_I VIRTUAL_PROCESSOR_ID, $1
    mov $1, %edi
    call vm_enter
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_VMCALL
    ret

t_entry_bad_eptp:
    lea l2_vmcall(%rip), %rdi
    call vmcs_setup
    ENABLE_SECONDARY SEC_EPT
    lea ept_pml4(%rip), %rbx
    or $1 | (3 << 3), %rbx            /* memory type 1 (WC): not offered for EPT paging structures */
    VMWRITE_I EPT_POINTER, %rbx
    mov $1, %edi
    call vm_enter
    EXPECT_EQ %rax, $-1
    EXPECT_VMFLAGS RFL_ZF
    VMREAD_R VM_INSTRUCTION_ERROR, %rbx
    EXPECT_EQ %rbx, $7
    lea ept_pml4(%rip), %rbx
    or $EPTP_WB_4LEVEL | (1 << 7), %rbx   /* bits 11:7 are reserved */
    VMWRITE_I EPT_POINTER, %rbx
    mov $1, %edi
    call vm_enter
    EXPECT_EQ %rax, $-1
    VMREAD_R VM_INSTRUCTION_ERROR, %rbx
    EXPECT_EQ %rbx, $7
    ret

t_invvpid:
    lea l2_stack(%rip), %r12          /* a canonical linear address */
    MARK_VMERR
    INV_TRY invvpid, $INVVPID_ALL, $0, $0       /* all-context: VPID 0 is allowed */
    EXPECT_INV_OK
    INV_TRY invvpid, $INVVPID_ADDR, $1, %r12
    EXPECT_INV_OK
    INV_TRY invvpid, $INVVPID_SINGLE, $0xFFFF, $0
    EXPECT_INV_OK
    INV_TRY invvpid, $INVVPID_SINGLE_KEEP_GLOBALS, $1, $0
    EXPECT_INV_OK
    INV_TRY invvpid, $INVVPID_SINGLE, $0, $0
    EXPECT_INV_FAIL
    INV_TRY invvpid, $INVVPID_SINGLE_KEEP_GLOBALS, $0, $0
    EXPECT_INV_FAIL
    INV_TRY invvpid, $INVVPID_ADDR, $0, %r12
    EXPECT_INV_FAIL
    INV_TRY invvpid, $INVVPID_ADDR, $1, $NONCANONICAL
    EXPECT_INV_FAIL
    INV_TRY invvpid, $INVVPID_ALL, $0x10000, $0   /* descriptor bits 63:16 are reserved */
    EXPECT_INV_FAIL
    INV_TRY invvpid, $4, $1, $0
    EXPECT_INV_FAIL
    INV_TRY invvpid, $-1, $1, $0                  /* the type is all 64 bits of the register */
    EXPECT_INV_FAIL
    mov $NONCANONICAL, %rax
    mov $INVVPID_ALL, %ebx
    TRY invvpid (%rax), %rbx
    EXPECT_FAULT 13, 0
    mov $NONCANONICAL, %rax
    sub %rsp, %rax                    /* RSP as the base: a stack reference */
    TRY invvpid (%rsp,%rax,1), %rbx
    EXPECT_FAULT 12, 0
    ret

t_invept:
    lea ept_pml4(%rip), %r12
    or $EPTP_WB_4LEVEL, %r12
    MARK_VMERR
    INV_TRY invept, $INVEPT_ALL, $0, $0
    EXPECT_INV_OK
    INV_TRY invept, $INVEPT_SINGLE, %r12, $0
    EXPECT_INV_OK
    mov %r12, %r13
    or $EPTP_AD, %r13                 /* A/D flags are offered */
    INV_TRY invept, $INVEPT_SINGLE, %r13, $0
    EXPECT_INV_OK
    mov %r12, %r13
    xor $6 ^ 1, %r13                  /* memory type 1 */
    INV_TRY invept, $INVEPT_SINGLE, %r13, $0
    EXPECT_INV_FAIL
    mov %r12, %r13
    xor $(3 ^ 4) << 3, %r13           /* page-walk length 5: not offered */
    INV_TRY invept, $INVEPT_SINGLE, %r13, $0
    EXPECT_INV_FAIL
    mov %r12, %r13
    bts $52, %r13                     /* above MAXPHYADDR */
    INV_TRY invept, $INVEPT_SINGLE, %r13, $0
    EXPECT_INV_FAIL
    INV_TRY invept, $0, %r12, $0
    EXPECT_INV_FAIL
    INV_TRY invept, $3, %r12, $0
    EXPECT_INV_FAIL
    ret

/* ------------------------------------------------------------------ */
/* L2 guests and the exits they cause */

/* L2: CPUID leaf 0x4000_1234 ten times, summing EBX, then VMCALL with the sum in RBX */
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
    vmcall
    ud2

/* serve_cpuid: launch L2 and answer its CPUID exits with EBX = 7 until another exit;
 * rax = that exit's reason, rdx = how many CPUID exits there were */
serve_cpuid:
    push %r12
    xor %r12d, %r12d
    mov $1, %edi
1:  call vm_enter
    cmp $EXIT_CPUID, %rax
    jne 2f
    incq %r12
    movq $7, l2_regs + 8 * 3(%rip)    /* L1's answer: EBX = 7 */
    call skip_l2_insn
    xor %edi, %edi
    jmp 1b
2:  mov %r12, %rdx
    pop %r12
    ret

t_l2_cpuid:
    lea l2_cpuid_loop(%rip), %rdi
    call vmcs_setup
    call serve_cpuid
    mov %rdx, %r12
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_VMCALL
    EXPECT_EQ %r12, $CPUID_EXITS
    EXPECT_EQ l2_regs+8*3(%rip), $(7*CPUID_EXITS)
    ret

/* L2: one instruction per exit reason, in order */
l2_exits_prog:
    out %al, $0x80
    hlt
    invd
    mov $MSR_SYSENTER_CS, %ecx
    rdmsr
    mov $MSR_PAT, %ecx
    rdmsr                             /* bitmap bit clear: L0 answers, no exit */
    mov %rax, %r14
    mov %cr3, %rax
    vmcall
    ud2

t_l2_exits:
    push %r12
    lea msr_bitmap(%rip), %rax        /* read bitmap for low MSRs: bit 0x174 */
    orb $1 << (MSR_SYSENTER_CS & 7), MSR_SYSENTER_CS / 8(%rax)
    lea l2_exits_prog(%rip), %rdi
    call vmcs_setup
    lea exit_log(%rip), %r12
    mov $1, %edi
1:  call vm_enter
    mov %rax, (%r12)
    add $8, %r12
    cmp $EXIT_CR, %rax
    jne 2f
    VMREAD_R EXIT_QUALIFICATION, %rbx
    mov %rbx, cr_qual(%rip)
2:  cmp $EXIT_IO, %rax
    jne 3f
    VMREAD_R EXIT_QUALIFICATION, %rbx
    mov %rbx, io_qual(%rip)
3:  cmp $EXIT_VMCALL, %rax
    je 4f
    cmp $-1, %rax
    je 4f
    call skip_l2_insn
    xor %edi, %edi
    jmp 1b
4:  EXPECT_EQ exit_log(%rip), $EXIT_IO
    EXPECT_EQ exit_log+8(%rip), $EXIT_HLT
    EXPECT_EQ exit_log+16(%rip), $EXIT_INVD
    EXPECT_EQ exit_log+24(%rip), $EXIT_RDMSR
    EXPECT_EQ exit_log+32(%rip), $EXIT_CR
    EXPECT_EQ exit_log+40(%rip), $EXIT_VMCALL
    EXPECT_EQ io_qual(%rip), $0x00800040     /* port 0x80, 1 byte, OUT, immediate */
    EXPECT_EQ cr_qual(%rip), $0x13           /* CR3, MOV from CR, RAX */
    mov $PAT_DEFAULT, %rax
    EXPECT_EQ l2_regs+8*14(%rip), %rax   /* L2 read PAT through L0 */
    pop %r12
    ret

l2_ud:
    ud2
    vmcall

t_l2_exception:
    lea l2_ud(%rip), %rdi
    call vmcs_setup
    VMWRITE_I EXCEPTION_BITMAP, $1 << 6
    mov $1, %edi
    call vm_enter
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_EXCEPTION
    VMREAD_R VM_EXIT_INTR_INFO, %rbx
    EXPECT_EQ %rbx, $0x80000306
    VMREAD_R GUEST_RIP, %rbx
    lea l2_ud(%rip), %rax
    EXPECT_EQ %rbx, %rax
    add $2, %rbx
    VMWRITE_I GUEST_RIP, %rbx
    xor %edi, %edi
    call vm_enter
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_VMCALL
    ret

l2_load_es:
    xor %eax, %eax
    mov %ax, %es
    vmcall                            /* L1 resumes without reading L2's segment state */
    mov %es, %ebx                     /* ES must still be 0 after that round trip */
    vmcall
    ud2

t_l2_lazy_sync:
    lea l2_load_es(%rip), %rdi
    call vmcs_setup
    mov $1, %edi
    call vm_enter
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_VMCALL
    call skip_l2_insn                 /* VMREAD/VMWRITE of GUEST_RIP: no rare-field sync */
    xor %edi, %edi
    call vm_enter
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_VMCALL
    EXPECT_EQ l2_regs+8*3(%rip), $0   /* L2's ES survived the unsynced round trip */
    VMREAD_R GUEST_ES_SELECTOR, %rbx
    EXPECT_EQ %rbx, $0
    VMREAD_R GUEST_ES_AR_BYTES, %rbx
    EXPECT_MASK %rbx, 0x10000, 0x10000       /* a null selector leaves ES unusable */
    VMREAD_R GUEST_CS_SELECTOR, %rbx
    EXPECT_EQ %rbx, $SEL_CODE64
    ret

l2_vmcall:
    vmcall
    ud2

t_l2_inject:
    lea l2_vmcall(%rip), %rdi
    call vmcs_setup
    movl $0, irq_count + VEC_INJECT * 4(%rip)
    VMWRITE_I VM_ENTRY_INTR_INFO, $0x80000000 | VEC_INJECT   /* external interrupt */
    VMWRITE_I GUEST_RFLAGS, $0x202    /* SDM 27.3.1.4: injecting an interrupt needs IF = 1 */
    mov $1, %edi
    call vm_enter
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_VMCALL
    mov irq_count + VEC_INJECT * 4(%rip), %ebx
    EXPECT_EQ %rbx, $1
    VMREAD_R VM_ENTRY_INTR_INFO, %rbx
    EXPECT_EQ %rbx, $VEC_INJECT              /* the valid bit is cleared on exit */
    ret

l2_spin:
    pause
    jmp l2_spin

t_l2_extint:
    call apic_enable
    lea l2_spin(%rip), %rdi
    call vmcs_setup
    VMREAD_R PIN_BASED_CONTROLS, %rbx
    or $PIN_EXT_INTR, %rbx
    VMWRITE_I PIN_BASED_CONTROLS, %rbx
    mov $APIC_ICR, %edi
    mov $0x40000 | VEC_EXTINT, %esi           /* self IPI (shorthand 01) */
    call apic_write
    mov $1, %edi
    call vm_enter
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_EXTINT
    VMREAD_R VM_EXIT_INTR_INFO, %rbx
    EXPECT_EQ %rbx, $0x80000000 | VEC_EXTINT
    mov $APIC_EOI, %edi                       /* acknowledged on exit: L1 ends it */
    xor %esi, %esi
    call apic_write
    ret

l2_sti_window:
    sti
    nop
l2_after_window:
    vmcall
    ud2

t_l2_intr_window:
    lea l2_sti_window(%rip), %rdi
    call vmcs_setup                   /* RFLAGS.IF = 0: no window until the STI shadow ends */
    VMREAD_R CPU_BASED_CONTROLS, %rbx
    or $CPU_INTR_WINDOW, %rbx
    VMWRITE_I CPU_BASED_CONTROLS, %rbx
    mov $1, %edi
    call vm_enter
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_INTR_WINDOW
    VMREAD_R GUEST_RIP, %rbx
    lea l2_after_window(%rip), %rax
    EXPECT_EQ %rbx, %rax
    ret

/* L2 returns to l2_after_iret through IRET, which ends virtual-NMI blocking (SDM 25.3) */
l2_nmi_iret:
    mov %rsp, %rax
    mov %ss, %ecx
    push %rcx
    push %rax
    pushfq
    mov %cs, %ecx
    push %rcx
    lea l2_after_iret(%rip), %rcx
    push %rcx
    iretq
l2_after_iret:
    nop
    vmcall
    ud2

/* SDM 26.7.6: with virtual NMIs, NMI-window exiting exits before the first instruction
 * without virtual-NMI blocking; with it, after the IRET that ends it */
t_l2_nmi_window:
    push %r12
    xor %r12d, %r12d
1:  lea l2_nmi_iret(%rip), %rdi
    call vmcs_setup
    VMREAD_R PIN_BASED_CONTROLS, %rbx
    or $PIN_NMI_EXITING | PIN_VIRTUAL_NMIS, %rbx
    VMWRITE_I PIN_BASED_CONTROLS, %rbx
    VMREAD_R CPU_BASED_CONTROLS, %rbx
    or $CPU_NMI_WINDOW, %rbx
    VMWRITE_I CPU_BASED_CONTROLS, %rbx
    VMWRITE_I GUEST_INTERRUPTIBILITY, %r12          /* 0, then blocking by NMI (bit 3) */
    mov $1, %edi
    call vm_enter
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_NMI_WINDOW
    VMREAD_R GUEST_RIP, %rbx
    lea l2_nmi_iret(%rip), %rax
    lea l2_after_iret(%rip), %rcx
    test %r12d, %r12d
    cmovnz %rcx, %rax
    EXPECT_EQ %rbx, %rax
    add $8, %r12d
    cmp $16, %r12d
    jb 1b
    pop %r12
    ret

t_l2_preemption:
    lea l2_spin(%rip), %rdi
    call vmcs_setup
    VMREAD_R PIN_BASED_CONTROLS, %rbx
    or $PIN_PREEMPTION_TIMER, %rbx
    VMWRITE_I PIN_BASED_CONTROLS, %rbx
    VMREAD_R VM_EXIT_CONTROLS, %rbx
    or $EXIT_SAVE_PREEMPTION, %rbx
    VMWRITE_I VM_EXIT_CONTROLS, %rbx
    VMWRITE_I PREEMPTION_TIMER_VALUE, $1000
    mov $1, %edi
    call vm_enter
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_PREEMPTION_TIMER
    VMREAD_R PREEMPTION_TIMER_VALUE, %rbx
    EXPECT_EQ %rbx, $0
    ret

l2_shadow:
    mov $TSC_OFFSET, %eax
    mov $0x1234, %edx
    vmwrite %rdx, %rax                /* to the shadow VMCS: no exit */
    vmread %rax, %rbx                 /* and back */
    mov $GUEST_RIP, %eax
    vmread %rax, %rcx                 /* its VMREAD-bitmap bit is set: exit */
    ud2

t_shadow_vmcs:
    movl $VMCS_REVISION | 0x80000000, shadow_vmcs(%rip)   /* shadow-VMCS indicator */
    vmclear shadow_ptr(%rip)
    lea l2_shadow(%rip), %rdi
    call vmcs_setup
    VMREAD_R CPU_BASED_CONTROLS, %rbx
    bts $31, %rbx                     /* CPU_SECONDARY: 1 << 31 does not fit a sign-extended imm32 */
    VMWRITE_I CPU_BASED_CONTROLS, %rbx
    VMWRITE_I SECONDARY_CONTROLS, $SEC_SHADOW_VMCS
    lea vmread_bitmap(%rip), %rbx
    orb $1 << (GUEST_RIP & 7), GUEST_RIP / 8(%rbx)
    VMWRITE_I VMREAD_BITMAP, %rbx
    lea vmwrite_bitmap(%rip), %rbx
    VMWRITE_I VMWRITE_BITMAP, %rbx
    VMWRITE_I VMCS_LINK_POINTER, shadow_ptr(%rip)
    mov $1, %edi
    call vm_enter
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_VMREAD
    EXPECT_EQ l2_regs+8*3(%rip), $0x1234      /* L2's RBX: read back from the shadow */
    vmptrld shadow_ptr(%rip)                   /* the shadow was written back at the exit */
    VMREAD_R TSC_OFFSET, %rbx
    EXPECT_EQ %rbx, $0x1234
    vmptrld vmcs_a_ptr(%rip)
    ret

/* L2: INVVPID and INVEPT, which exit whatever their operands */
l2_inv:
    lea inv_desc(%rip), %rsi
    xor %edi, %edi
    mov $INVVPID_ALL, %ecx
    invvpid (%rsi), %rcx
    mov $INVEPT_ALL, %edx
    invept 8(%rsi,%rdi,2), %rdx
    vmcall
    ud2

t_l2_invalidate:
    lea l2_inv(%rip), %rdi
    call vmcs_setup
    mov $1, %edi
    call vm_enter
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_INVVPID
    /* SDM Table 28-14: reg2 RCX, base RSI, no index, DS, 64-bit address, scale 1 */
    VMREAD_R VMX_INSTRUCTION_INFO, %rbx
    EXPECT_EQ %rbx, $(1 << 28) | (6 << 23) | (1 << 22) | (3 << 15) | (2 << 7)
    VMREAD_R EXIT_QUALIFICATION, %rbx
    EXPECT_EQ %rbx, $0
    call skip_l2_insn
    xor %edi, %edi
    call vm_enter
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_INVEPT
    /* reg2 RDX, base RSI, index RDI, DS, 64-bit address, scale 2; the displacement */
    VMREAD_R VMX_INSTRUCTION_INFO, %rbx
    EXPECT_EQ %rbx, $(2 << 28) | (6 << 23) | (7 << 18) | (3 << 15) | (2 << 7) | 1
    VMREAD_R EXIT_QUALIFICATION, %rbx
    EXPECT_EQ %rbx, $8
    call skip_l2_insn
    xor %edi, %edi
    call vm_enter
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_VMCALL
    ret

l2_no_idt:
    lidt zero_idt(%rip)
    ud2

t_l2_triple_fault:
    lea l2_no_idt(%rip), %rdi
    call vmcs_setup
    mov $1, %edi
    call vm_enter
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_TRIPLE_FAULT
    ret

/* ------------------------------------------------------------------ */
/* L2 under EPT */

/* ept_build: EPT tables in ept_pml4, ept_pdpt, ept_pd, ept_pt mapping guest-physical
 * [0, EPT_MAPPED) to the same L1 addresses, write-back, read/write/execute, with EPT_PAGE
 * sent to ept_target, accessed and dirty flags clear; and linear ALIAS + x to x in L1's
 * paging, which L2 shares (rax, rcx, rdi clobbered) */
ept_build:
    lea ept_pml4(%rip), %rdi
    mov $4 * 512, %ecx
    xor %eax, %eax
    rep stosq
    lea ept_pdpt + EPT_RWX(%rip), %rax   /* a non-leaf entry: the table's address and rights */
    mov %rax, ept_pml4(%rip)
    lea ept_pd + EPT_RWX(%rip), %rax
    mov %rax, ept_pdpt(%rip)
    lea ept_pd(%rip), %rdi
    mov $EPT_LARGE | EPT_WB | EPT_RWX, %eax
1:  mov %rax, (%rdi)                  /* 2 MiB pages */
    add $8, %rdi
    add $1 << 21, %rax
    cmp $EPT_MAPPED, %rax
    jb 1b
    lea ept_pt + EPT_RWX(%rip), %rax
    mov %rax, ept_pd + EPT_PDE_OFF(%rip)
    lea ept_pt(%rip), %rdi
    mov $(EPT_PAGE & ~0x1FFFFF) | EPT_WB | EPT_RWX, %eax
2:  mov %rax, (%rdi)                  /* 4 KiB pages */
    add $8, %rdi
    add $1 << 12, %rax
    cmp $(EPT_PAGE & ~0x1FFFFF) + (1 << 21), %rax
    jb 2b
    lea ept_target + EPT_WB + EPT_RWX(%rip), %rax
    mov %rax, ept_pt + EPT_PTE_OFF(%rip)
    lea pd_low + PTE_P + PTE_RW(%rip), %rax
    mov %rax, pdpt + 8(%rip)
    ret

/* ept_flush: INVEPT single-context of ept_eptp (rax, rbx clobbered; vm_flags set) */
ept_flush:
    INV_TRY invept, $INVEPT_SINGLE, ept_eptp(%rip), $0
    ret

/* ept_setup(rdi = L2 entry point, rsi = EPTP_AD or 0): vmcs_setup, then fresh EPT tables
 * (ept_build), enable EPT with ept_eptp (WB, 4 levels) and VPID 1, and L2's RSI =
 * EPT_LINEAR. With a VPID, L2's cached translations may outlive a VM entry, even of
 * another VMCS (SDM 29.4 "Caching Translation Information"), so tables that changed since
 * the last run are made current by INVEPT, as a hypervisor must. */
ept_setup:
    push %r12
    mov %rsi, %r12
    call vmcs_setup
    call ept_build
    ENABLE_SECONDARY SEC_EPT | SEC_VPID
    VMWRITE_I VIRTUAL_PROCESSOR_ID, $1
    lea ept_pml4 + EPTP_WB_4LEVEL(%rip), %rax
    or %r12, %rax
    mov %rax, ept_eptp(%rip)
    VMWRITE_I EPT_POINTER, ept_eptp(%rip)
    movq $EPT_LINEAR, l2_regs + 8 * 6(%rip)
    call ept_flush
    pop %r12
    ret

/* EPT_SET_PTE entry: EPT_PAGE's EPT entry := entry (an L1 address plus bits), then INVEPT
 * single-context (rax, rbx clobbered) */
.macro EPT_SET_PTE entry
    lea \entry(%rip), %rax
    mov %rax, ept_pt + EPT_PTE_OFF(%rip)
    call ept_flush
.endm

/* L2 of the EPT tests: read the quadword at RSI into RBX, VMCALL, write EAX there, VMCALL */
l2_ept_touch:
    mov (%rsi), %rbx
    vmcall
l2_ept_write:
    mov %eax, (%rsi)
    vmcall
    ud2

t_ept_identity:
    lea l2_cpuid_loop(%rip), %rdi
    xor %esi, %esi
    call ept_setup
    call serve_cpuid
    mov %rdx, %r12
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_VMCALL
    EXPECT_EQ %r12, $CPUID_EXITS
    EXPECT_EQ l2_regs+8*3(%rip), $(7*CPUID_EXITS)
    /* then a read of a guest-physical address L1's paging maps and EPT does not */
    lea l2_ept_touch(%rip), %rbx
    VMWRITE_I GUEST_RIP, %rbx
    movq $EPT_MAPPED + 0x10, l2_regs + 8 * 6(%rip)
    xor %edi, %edi
    call vm_enter
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_EPT_VIOLATION
    VMREAD_R EXIT_QUALIFICATION, %rbx
    EXPECT_EQ %rbx, $0x181            /* read; no rights (the PDE is not present); linear, the access to it */
    VMREAD_R GUEST_PHYSICAL_ADDRESS, %rbx
    EXPECT_EQ %rbx, $EPT_MAPPED + 0x10
    ret

t_ept_remap:
    lea l2_ept_touch(%rip), %rdi
    xor %esi, %esi
    call ept_setup
    mov $0x1122334455667788, %rax
    mov %rax, ept_target + 0x10(%rip)
    movq $0xBAD, EPT_PAGE + 0x10      /* what L2 would read without EPT */
    mov $1, %edi
    call vm_enter
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_VMCALL
    mov $0x1122334455667788, %rbx
    EXPECT_EQ l2_regs+8*3(%rip), %rbx
    ret

t_ept_violation:
    lea l2_ept_touch(%rip), %rdi
    xor %esi, %esi
    call ept_setup
    EPT_SET_PTE ept_target + EPT_WB + EPT_R
    movq $0, ept_target + 0x10(%rip)
    movq $0x600DF00D, l2_regs(%rip)   /* L2's EAX: what it writes */
    mov $1, %edi
    call vm_enter                     /* the read is allowed */
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_VMCALL
    call skip_l2_insn
    xor %edi, %edi
    call vm_enter                     /* the write is not */
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_EPT_VIOLATION
    VMREAD_R EXIT_QUALIFICATION, %rbx
    EXPECT_EQ %rbx, $0x18A            /* write; readable; linear address valid, the access to it (SDM Table 28-7) */
    VMREAD_R GUEST_PHYSICAL_ADDRESS, %rbx
    EXPECT_EQ %rbx, $EPT_PAGE + 0x10
    VMREAD_R GUEST_LINEAR_ADDRESS, %rbx
    EXPECT_EQ %rbx, $EPT_LINEAR
    VMREAD_R GUEST_RIP, %rbx          /* fault-like: RIP at the write, nothing written */
    lea l2_ept_write(%rip), %rax
    EXPECT_EQ %rbx, %rax
    EXPECT_EQ ept_target + 0x10(%rip), $0
    EPT_SET_PTE ept_target + EPT_WB + EPT_RWX
    xor %edi, %edi
    call vm_enter                     /* the write again, now allowed */
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_VMCALL
    EXPECT_EQ ept_target + 0x10(%rip), $0x600DF00D
    ret

t_ept_misconfig:
    lea l2_ept_touch(%rip), %rdi
    xor %esi, %esi
    call ept_setup
    EPT_SET_PTE ept_target + EPT_WB + EPT_W    /* writable, not readable */
    mov $1, %edi
    call vm_enter
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_EPT_MISCONFIG
    VMREAD_R GUEST_PHYSICAL_ADDRESS, %rbx
    EXPECT_EQ %rbx, $EPT_PAGE + 0x10
    EPT_SET_PTE ept_target + (7 << 3) + EPT_RWX   /* memory type 7 is reserved */
    xor %edi, %edi
    call vm_enter
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_EPT_MISCONFIG
    VMREAD_R GUEST_PHYSICAL_ADDRESS, %rbx
    EXPECT_EQ %rbx, $EPT_PAGE + 0x10
    EPT_SET_PTE ept_target + EPT_WB + EPT_RWX
    xor %edi, %edi
    call vm_enter                     /* the read completes */
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_VMCALL
    ret

t_ept_ad:
    lea l2_ept_touch(%rip), %rdi
    mov $EPTP_AD, %esi
    call ept_setup
    mov $1, %edi
    call vm_enter                     /* L2 reads EPT_PAGE */
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_VMCALL
    mov ept_pt + EPT_PTE_OFF(%rip), %rbx
    EXPECT_MASK %rbx, EPT_A | EPT_D, EPT_A
    mov ept_pd + EPT_PDE_OFF(%rip), %rbx
    EXPECT_MASK %rbx, EPT_A | EPT_D, EPT_A    /* every entry used gets A; D only a page's */
    call skip_l2_insn
    xor %edi, %edi
    call vm_enter                     /* and writes it */
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_VMCALL
    mov ept_pt + EPT_PTE_OFF(%rip), %rbx
    EXPECT_MASK %rbx, EPT_A | EPT_D, EPT_A | EPT_D
    mov ept_pd + EPT_PDE_OFF(%rip), %rbx
    EXPECT_MASK %rbx, EPT_D, 0
    /* the same accesses with A/D flags off in the EPTP */
    lea l2_ept_touch(%rip), %rdi
    xor %esi, %esi
    call ept_setup
    mov $1, %edi
    call vm_enter
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_VMCALL
    call skip_l2_insn
    xor %edi, %edi
    call vm_enter
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_VMCALL
    mov ept_pt + EPT_PTE_OFF(%rip), %rbx
    EXPECT_MASK %rbx, EPT_A | EPT_D, 0
    mov ept_pd + EPT_PDE_OFF(%rip), %rbx
    EXPECT_MASK %rbx, EPT_A | EPT_D, 0
    ret

/* Without INVEPT, L2 (with a VPID) may keep using the old mapping; that is allowed, not
 * required, so only what INVEPT guarantees is checked: the new mapping after it. */
t_ept_invept:
    lea l2_ept_touch(%rip), %rdi
    xor %esi, %esi
    call ept_setup
    movq $0x1111, ept_target + 0x10(%rip)
    movq $0x2222, ept_target2 + 0x10(%rip)
    mov $1, %edi
    call vm_enter
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_VMCALL
    EXPECT_EQ l2_regs+8*3(%rip), $0x1111
    EPT_SET_PTE ept_target2 + EPT_WB + EPT_RWX   /* with INVEPT single-context */
    lea l2_ept_touch(%rip), %rbx      /* L2 reads again */
    VMWRITE_I GUEST_RIP, %rbx
    xor %edi, %edi
    call vm_enter
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_VMCALL
    EXPECT_EQ l2_regs+8*3(%rip), $0x2222
    lea ept_target + EPT_WB + EPT_RWX(%rip), %rax
    mov %rax, ept_pt + EPT_PTE_OFF(%rip)
    INV_TRY invept, $INVEPT_ALL, $0, $0
    lea l2_ept_touch(%rip), %rbx
    VMWRITE_I GUEST_RIP, %rbx
    xor %edi, %edi
    call vm_enter
    mov %rax, %rbx
    EXPECT_EQ %rbx, $EXIT_VMCALL
    EXPECT_EQ l2_regs+8*3(%rip), $0x1111
    ret

t_vmxoff:
    vmxoff
    SAVE_VMFLAGS
    EXPECT_VMFLAGS 0
    mov $VM_EXIT_REASON, %eax
    TRY vmread %rax, %rbx
    EXPECT_FAULT 6, 0
    ret

    .section .rodata
tap_title: .asciz "# nestvisor vmxtest: an L1 VMX hypervisor and its L2 guests\n"

    .data
    .balign 8
bad_vmcs_ptr: .quad bad_vmcs
shadow_ptr:   .quad shadow_vmcs
vmptr_out:    .quad 0
io_qual:      .quad 0
cr_qual:      .quad 0
inv_desc:     .quad 0, 0            /* an INVEPT/INVVPID descriptor */
ept_eptp:     .quad 0               /* the EPTP of the EPT tests */
exit_log:     .skip 8 * 16
zero_idt:     .word 0
              .quad 0

    .bss
    .balign 4096
bad_vmcs:     .skip 4096
shadow_vmcs:  .skip 4096
vmread_bitmap:  .skip 4096
vmwrite_bitmap: .skip 4096
ept_pml4:     .skip 4096            /* EPT tables (ept_build): PML4, PDPT, PD, one PT */
ept_pdpt:     .skip 4096
ept_pd:       .skip 4096
ept_pt:       .skip 4096
ept_target:   .skip 4096            /* where EPT sends L2's EPT_PAGE */
ept_target2:  .skip 4096
