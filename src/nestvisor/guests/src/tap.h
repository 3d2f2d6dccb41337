/*
 * tap.h - the TAP test harness shared by the bundled test guests.
 *
 * A guest does `.include "runtime.h"` and `.include "tap.h"`, lists its
 * tests between TESTS_BEGIN and TESTS_END with DEFTEST, and defines
 * `tap_title` (a string printed first, e.g. "# nestvisor selftest\n").
 * `main` runs the tests in order and prints one TAP line each on COM1:
 *     ok N - name
 *     not ok N - name (check K: got G want W; last exception vec V error E rip R cr2 C)
 *     ok N - name # SKIP reason
 * then "1..N", "# skip S", "# pass P fail F", and returns the exit code
 * (0: all passed, 1: a failure). A multiboot command-line word "-ID" skips
 * the test with that ID, as a kvm-unit-tests "-name" filter does.
 */

.macro TESTS_BEGIN
    .pushsection .rodata.tests, "a"
    .balign 8
tests:
    .popsection
.endm

.macro TESTS_END
    .pushsection .rodata.tests, "a"
    .quad 0
    .popsection
.endm

/* ------------------------------------------------------------------ */
/* Test helpers (gas macro names ignore case, hence DEFTEST, not TEST). A test is a function that sets test_ok through EXPECT_*
 * (or skip_reason through SKIP_BECAUSE) and returns; main prints its line.
 * The EXPECT macros use rax and rcx as scratch; keep test values in rbx,
 * rbp, r8-r15. The first failed expectation is kept as the detail. */

.macro DEFTEST func, id, name:vararg
    .pushsection .rodata.tests, "a"
    .quad \func, .Lid\@, .Lname\@
    .popsection
    .pushsection .rodata
.Lid\@:   .asciz "\id"
.Lname\@: .asciz \name
    .popsection
.endm

/* fail with got=rax, want=rcx, unless a failure is already recorded */
.macro FAIL_WITH_RAX_RCX
    cmpb $0, test_ok(%rip)
    je .Lfail_keep\@
    movb $0, test_ok(%rip)
    mov %rax, fail_got(%rip)
    mov %rcx, fail_want(%rip)
    mov check_no(%rip), %rax
    mov %rax, fail_check(%rip)
.Lfail_keep\@:
.endm

/* every EXPECT counts itself, so a failure can say which check it was */
.macro NEXT_CHECK
    incq check_no(%rip)
.endm

/* got == want (operands: $imm, %reg other than rax/rcx, or mem) */
.macro EXPECT_EQ got, want
    NEXT_CHECK
    mov \got, %rax
    mov \want, %rcx
    cmp %rcx, %rax
    je .Lok\@
    FAIL_WITH_RAX_RCX
.Lok\@:
.endm

/* (got & mask) == want */
.macro EXPECT_MASK got, mask, want
    NEXT_CHECK
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
    NEXT_CHECK
    mov \got, %rax
    mov \want, %rcx
    cmp %rcx, %rax
    jb .Lok\@
    FAIL_WITH_RAX_RCX
.Lok\@:
.endm

/* lo <= got < hi, unsigned */
.macro EXPECT_RANGE got, lo, hi
    NEXT_CHECK
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

.macro SKIP_BECAUSE reason:vararg
    .pushsection .rodata
.Lreason\@: .asciz \reason
    .popsection
    lea .Lreason\@(%rip), %rax
    mov %rax, skip_reason(%rip)
.endm

/* Load ecx and edx:eax from rax for a wrmsr, which stays separate so
 * that it can be TRY'd */
.macro WRMSR64 msr
    mov $\msr, %ecx
    mov %rax, %rdx
    shr $32, %rdx
.endm

/* ------------------------------------------------------------------ */

    .globl main
main:
    push %rbx
    push %r12
    lea tap_title(%rip), %rdi
    call puts
    call cmdline
    test %rax, %rax
    jz 1f
    mov %rax, %rbx
    PRINT "# cmdline: "
    mov %rbx, %rdi
    call puts
    mov $'\n', %edi
    call putc
1:  lea tests(%rip), %rbx
2:  mov (%rbx), %r12
    test %r12, %r12
    jz 5f
    mov 8(%rbx), %rdi
    call excluded
    lea s_excluded(%rip), %rsi
    test %eax, %eax
    jnz 3f
    movb $1, test_ok(%rip)
    movq $0, skip_reason(%rip)
    movq $0, check_no(%rip)
    push %rbx                       /* a test may clobber any register */
    push %r12
    call *%r12
    pop %r12
    pop %rbx
    mov skip_reason(%rip), %rsi
    test %rsi, %rsi
    jnz 3f
    mov 16(%rbx), %rdi
    call report
    jmp 4f
3:  mov 16(%rbx), %rdi
    call report_skip
4:  add $24, %rbx
    jmp 2b
5:  call tap_finish
    pop %r12
    pop %rbx
    ret

/* cmdline() -> rax = the multiboot command line, or 0 (mbi flags bit 2,
 * field at offset 16: multiboot spec 3.3) */
cmdline:
    xor %eax, %eax
    mov boot_ebx(%rip), %rdx
    test %rdx, %rdx
    jz 1f
    testl $1 << 2, (%rdx)
    jz 1f
    mov 16(%rdx), %eax
1:  ret

/* excluded(rdi = test ID) -> eax = 1 if the command line has the word "-ID" */
excluded:
    push %rdi
    call cmdline
    pop %rdi
    mov %rax, %rsi
    test %rsi, %rsi
    jz 6f
1:  movzbl (%rsi), %eax             /* skip blanks */
    test %eax, %eax
    jz 6f
    cmp $' ', %eax
    jne 2f
    inc %rsi
    jmp 1b
2:  cmp $'-', %eax
    jne 5f
    lea 1(%rsi), %rdx               /* compare the word after '-' with the ID */
    mov %rdi, %rcx
3:  movzbl (%rcx), %eax
    test %eax, %eax
    jz 4f
    cmpb %al, (%rdx)
    jne 5f
    inc %rcx
    inc %rdx
    jmp 3b
4:  movzbl (%rdx), %eax             /* the ID ended: a match if the word did too */
    test %eax, %eax
    jz 7f
    cmp $' ', %eax
    je 7f
5:  movzbl (%rsi), %eax             /* skip to the end of this word */
    test %eax, %eax
    jz 6f
    cmp $' ', %eax
    je 1b
    inc %rsi
    jmp 5b
6:  xor %eax, %eax
    ret
7:  mov $1, %eax
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
    lea s_check(%rip), %rdi
    call puts
    mov fail_check(%rip), %rdi
    call putdec
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
    call put_last_exception
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
s_check:  .asciz " (check "
s_got:    .asciz ": got "
s_want:   .asciz " want "
s_last:   .asciz "; last exception vec "
s_skip:   .asciz " # SKIP "
s_excluded: .asciz "excluded on the command line"
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
fail_check: .quad 0
check_no:  .quad 0
skip_reason: .quad 0
test_ok:   .byte 0

    .text
