"""The engine through the KVM-shaped API, on small real x86 programs assembled here."""

from __future__ import annotations

import ctypes
import errno
import shutil
import subprocess

import pytest

import nestvisor
from nestvisor.arch import kvm_uapi as U
from nestvisor.arch.x86 import CR0_AM, RFLAGS_AC, RFLAGS_FIXED
from nestvisor.cpu.engine import Stop
from nestvisor.cpu.sites import scan

pytestmark = pytest.mark.skipif(shutil.which("as") is None, reason="needs GNU as")

ORG = 0x7C00


def assemble(source: str, tmp_path) -> bytes:
    """Assemble a flat program linked at ORG (16-bit start, may switch modes)."""
    src = tmp_path / "p.S"
    src.write_text(source)
    obj = tmp_path / "p.o"
    out = tmp_path / "p.bin"
    subprocess.run(["as", "--32", str(src), "-o", str(obj)], check=True)
    subprocess.run(["ld", "-m", "elf_i386", f"-Ttext={ORG:#x}", "-e", "0", "--oformat", "binary", str(obj), "-o", str(out)],
                   check=True)
    return out.read_bytes()


def boot(code: bytes, profile: str = "vmx"):
    kvm = nestvisor.Kvm(profile=profile)
    vm = kvm.create_vm()
    vm.set_user_memory_region(0, 0, 4 << 20)
    vm.memory(ORG, len(code))[:] = code
    v = vm.create_vcpu(0)
    s = v.get_sregs()
    for name in ("cs", "ds", "es", "ss"):
        seg = getattr(s, name)
        seg.selector = 0
        seg.base = 0
    v.set_sregs(s)
    r = v.get_regs()
    r.rip = ORG
    r.rsp = 0x7000
    v.set_regs(r)
    return vm, v


# Real mode -> protected mode -> long mode, with an IDT that records exceptions.
MODES = r"""
.code16
start:
  cli
  lgdtl gdtr
  mov %cr0, %eax
  or $1, %eax
  mov %eax, %cr0
  ljmpl $0x08, $pm32
.code32
pm32:
  mov $0x10, %ax
  mov %ax, %ds
  mov %ax, %ss
  mov %ax, %es
  mov $0x7000, %esp
  movl $0x4003, 0x3000
  movl $0x5003, 0x4000
  movl $0x83, 0x5000          # 2 MiB identity page
  movl $0x200083, 0x5008
  mov $0x3000, %eax
  mov %eax, %cr3
  mov %cr4, %eax
  or $0x20, %eax
  mov %eax, %cr4
  mov $0xc0000080, %ecx
  rdmsr
  or $0x100, %eax
  wrmsr
  mov %cr0, %eax
  or $0x80000000, %eax
  mov %eax, %cr0
  ljmpl $0x18, $lm64
.code64
lm64:
  lidt idtr(%rip)
  # build IDT gates for vectors 0..31 pointing at handler
  lea idt(%rip), %rdi
  lea handler(%rip), %rax
  mov $32, %ecx
1:
  mov %ax, (%rdi)
  movw $0x18, 2(%rdi)
  movw $0x8e00, 4(%rdi)
  mov %rax, %rdx
  shr $16, %rdx
  mov %edx, 6(%rdi)
  movl $0, 12(%rdi)
  add $16, %rdi
  loop 1b
  TESTS
  hlt
handler:
  incl count(%rip)
  mov (%rsp), %rax            # error code (for #GP/#PF) or RIP
  mov %rax, last(%rip)
  add $8, %rsp                # drop the error code
  push %rax
  mov skip(%rip), %rax
  add %rax, 8(%rsp)           # skip the faulting instruction
  pop %rax
  iretq
.p2align 3
count: .quad 0
last: .quad 0
skip: .quad 2
gdt: .quad 0
  .quad 0x00cf9a000000ffff
  .quad 0x00cf92000000ffff
  .quad 0x00af9a000000ffff
gdtr: .word 31
  .long gdt
idtr: .word 32*16-1
  .long idt, 0
.p2align 4
idt: .fill 32*16, 1, 0
"""


def program(tests: str) -> str:
    return MODES.replace("TESTS", tests)


def run_to_halt(v) -> None:
    ex = v.run()
    assert ex.reason == U.KVM_EXIT_HLT, ex


def test_real_to_long_mode(tmp_path):
    vm, v = boot(assemble(program("mov $0x1234, %r15"), tmp_path))
    run_to_halt(v)
    s = v.get_sregs()
    assert s.efer & (1 << 10) and s.cs.l == 1 and s.cs.selector == 0x18
    assert s.cr0 & 0x80000001 == 0x80000001
    assert v.get_regs().r15 == 0x1234
    assert v.stats["MOV_TO_CR"] == 4 and v.stats["WRMSR"] == 1 and v.stats["RDMSR"] == 1


def test_unknown_msr_gp_through_idt(tmp_path):
    # rdmsr of an unknown MSR raises #GP(0), delivered through the guest's IDT
    vm, v = boot(assemble(program("mov $0xdeadbeef, %ecx\n  rdmsr\n  mov count(%rip), %r14\n  mov last(%rip), %r13"), tmp_path))
    run_to_halt(v)
    r = v.get_regs()
    assert r.r14 == 1 and r.r13 == 0          # one #GP, error code 0
    assert v.stats["deliver_13"] == 1


def test_reserved_cr4_bit_gp(tmp_path):
    vm, v = boot(assemble(program("movq $3, skip(%rip)\n  mov %cr4, %rax\n  bts $63, %rax\n  mov %rax, %cr4\n  mov count(%rip), %r14"), tmp_path))
    run_to_halt(v)
    assert v.get_regs().r14 == 1
    assert not v.get_sregs().cr4 >> 63


def test_pat_and_efer_rules(tmp_path):
    body = """
  mov $0x277, %ecx
  mov $0x02020202, %eax        # type 2 is reserved in IA32_PAT
  mov %eax, %edx
  wrmsr
  mov count(%rip), %r14
  mov $0x277, %ecx
  mov $0x00070406, %eax
  mov $0x00070406, %edx
  wrmsr
  rdmsr
  mov %eax, %r13d
"""
    vm, v = boot(assemble(program(body), tmp_path))
    run_to_halt(v)
    r = v.get_regs()
    assert r.r14 == 1 and r.r13 == 0x00070406


def test_port_io_exits_and_completion(tmp_path):
    body = """
  mov $0x3f8, %dx
  mov $0x41, %al
  outb %al, %dx
  mov $0x60, %dx
  inb %dx, %al
  movzbl %al, %r12d
"""
    vm, v = boot(assemble(program(body), tmp_path))
    ex = v.run()
    assert ex.reason == U.KVM_EXIT_IO and ex.io.direction == U.KVM_EXIT_IO_OUT
    assert (ex.io.port, ex.io.size, bytes(ex.io.data)) == (0x3F8, 1, b"A")
    ex = v.run()
    assert ex.reason == U.KVM_EXIT_IO and ex.io.direction == U.KVM_EXIT_IO_IN and ex.io.port == 0x60
    ex.io.data[0] = 0x5A
    run_to_halt(v)
    assert v.get_regs().r12 == 0x5A


def test_code_written_at_run_time_is_trapped(tmp_path):
    # copy "rdmsr; hlt" (0f 32 f4) into a data page and jump there: the site is still found
    body = """
  movl $0xf4320f, 0x100000
  mov $0x10, %ecx
  mov $0x100000, %rax
  jmp *%rax
"""
    vm, v = boot(assemble(program(body), tmp_path))
    run_to_halt(v)
    assert v.stats["RDMSR"] == 2      # the EFER read of the mode switch, and the new code's
    assert v.get_regs().rip == 0x100003


def test_site_hooks_only_where_trapped_instructions_start(tmp_path):
    # immediates full of trap opcode bytes (HLT f4, STI fb, IN e4/ec, WRMSR 0f 30, RDMSR 0f 32):
    # unicorn walks every site hook at each hooked instruction, so none of them may get one
    body = """
  mov $0xf4fbe4ec, %eax
  mov $0x320f300f, %ebx
  movabs $0xf4f4f4f4f4f4f4f4, %rdx
  mov $0x10, %ecx
  rdmsr
"""
    code = assemble(program(body), tmp_path)
    vm, v = boot(code)
    run_to_halt(v)
    first = ORG + code.index(bytes.fromhex("ece4fbf4"))
    last = ORG + code.index(bytes.fromhex("f4f4f4f4f4f4f4f4")) + 8
    hooked = sorted(a - first for a in v.ctx._site_hooks if first <= a < last + 8)
    assert hooked == [last + 5 - first, last + 7 - first]     # the RDMSR and the HLT after it
    assert v.stats["RDMSR"] == 2 and v.get_regs().rax & 0xFFFFFFFF != 0xF4FBE4EC


# x2APIC mode on: IA32_APIC_BASE |= EN | EXTD
_X2APIC_ON = """
  mov $0x1b, %ecx
  rdmsr
  or $0xc00, %eax
  wrmsr"""
# the xAPIC page mapped (a 2 MiB page at 0xfee00000 through PDPT[3]), its address in %rbx
_XAPIC_PAGE = """
  movl $0x20003, 0x4018
  movl $0xfee00083, 0x20fb8
  mov %cr3, %rax
  mov %rax, %cr3
  mov $0xfee00000, %ebx"""


def _gates(handler: str, *vectors: int) -> str:
    """Interrupt gates in MODES's IDT for `vectors`, all to `handler`."""
    code = f"""
  lea idt(%rip), %rdi
  lea {handler}(%rip), %rax
  mov %rax, %rdx
  shr $16, %rdx"""
    for v in vectors:
        code += f"""
  mov %ax, {v}*16(%rdi)
  movw $0x18, {v}*16+2(%rdi)
  movw $0x8e00, {v}*16+4(%rdi)
  mov %edx, {v}*16+6(%rdi)"""
    return code


# x2APIC self-NMIs through the ICR: one whose handler sends three more while NMIs are
# blocked (one stays pending, KVM process_nmi), then 300 x (physical to its own ID, self
# shorthand). r14 counts NMIs, r15 is the ICR read back.
_SELF_NMIS = _X2APIC_ON + _gates("nmi_handler", 2) + """
  xor %r14, %r14
  mov $0x830, %ecx
  xor %edx, %edx
  mov $0x40400, %eax
  wrmsr
  mov $300, %esi
1: mov $0x400, %eax
  wrmsr
  mov $0x40400, %eax
  wrmsr
  dec %esi
  jnz 1b
  rdmsr
  mov %rax, %r15
  jmp 2f
nmi_handler:
  inc %r14
  cmp $1, %r14
  jne 3f
  push %rax
  mov $0x40400, %eax
  wrmsr
  wrmsr
  wrmsr
  pop %rax
3: iretq
2:
"""


_XAPIC_SELF_NMIS = (_SELF_NMIS
                    .replace(_X2APIC_ON, _XAPIC_PAGE + "\n  movl $0, 0x310(%rbx)", 1)
                    # a write of the page does not end the translation block, where the
                    # NMI it sends is taken: a jump ends it
                    .replace("  wrmsr\n", "  mov %eax, 0x300(%rbx)\n  jmp 5f\n5:\n")
                    .replace("  rdmsr\n", "  mov 0x300(%rbx), %eax\n"))


def test_xapic_self_nmi_fast_path_matches_python_path(tmp_path, monkeypatch):
    # the same through the xAPIC page: ICR2 (destination 0, this vCPU) then ICR writes
    from nestvisor.kvm.lapic import ApicBus, Lapic
    writes = {"n": 0}
    mmio_write = Lapic.mmio_write

    def counted(self, offset, size, value):
        writes["n"] += offset == 0x300
        return mmio_write(self, offset, size, value)

    monkeypatch.setattr(Lapic, "mmio_write", counted)
    code = assemble(program(_XAPIC_SELF_NMIS), tmp_path)
    results = []
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(ApicBus, "xapic_id_unique", lambda self, lapic: False)
        writes["n"] = 0
        vm, v = boot(code)
        run_to_halt(v)
        r = v.get_regs()
        results.append((r.r14, r.r15 & 0xFFFFFFFF, v.clock, v.stats["deliver_2"], writes["n"]))
    fast, slow = results
    assert fast[:4] == slow[:4]
    assert slow[0] == 2 + 600 and slow[1] == 0x40400
    assert slow[4] == 604 and fast[4] < 10


def test_x2apic_self_nmi_fast_path_matches_python_path(tmp_path, monkeypatch):
    # KVM's fastpath for ICR writes: self-NMIs taken in the hook, the ICR synced back
    from nestvisor.cpu.engine import ExecContext
    from nestvisor.kvm.lapic import Lapic
    writes = {"n": 0}
    msr_write = Lapic.msr_write

    def counted(self, msr, value):
        writes["n"] += msr == 0x830
        return msr_write(self, msr, value)

    monkeypatch.setattr(Lapic, "msr_write", counted)
    code = assemble(program(_SELF_NMIS), tmp_path)
    results = []
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(ExecContext, "fast_wrmsr", lambda self, rip, length: None)
        writes["n"] = 0
        vm, v = boot(code)
        run_to_halt(v)
        r = v.get_regs()
        results.append((r.r14, r.r15, v.clock, v.stats["WRMSR"], v.stats["deliver_2"], writes["n"]))
    fast, slow = results
    assert fast[:5] == slow[:5]
    assert slow[0] == 2 + 600 and slow[1] == 0x40400   # the burst gave 2, the loop 600
    assert slow[5] == 604 and fast[5] < 10     # Python's LAPIC saw the ICR writes only without the fast path


# Gates for vectors 2 (NMI) and 31 at `seen_event`, which records the RIP the event
# interrupted and returns to `after` (a HLT).
_EVENT_GATES = _gates("seen_event", 2, 31) + """
  jmp 2f
seen_event:
  mov (%rsp), %rax
  mov %rax, %r13
  lea after(%rip), %rax
  mov %rax, (%rsp)
  iretq
after:
  hlt
2:
"""


_TIMER_ARMED_IN_RUN = {
    "x2apic": _X2APIC_ON + """
  xor %edx, %edx
  mov $0x80f, %ecx
  mov $0x1ff, %eax
  wrmsr
  mov $0x83e, %ecx
  mov $0xb, %eax
  wrmsr
  mov $0x832, %ecx
  mov $31, %eax
  wrmsr
  sti
  mov $0x838, %ecx
  mov $100, %eax
  wrmsr""",
    "xapic": _XAPIC_PAGE + """
  movl $0x1ff, 0xf0(%rbx)
  movl $0xb, 0x3e0(%rbx)
  movl $31, 0x320(%rbx)
  sti
  movl $100, 0x380(%rbx)""",
}


@pytest.mark.parametrize("mode", ["x2apic", "xapic"])
def test_timer_armed_during_a_run_fires_at_its_deadline(tmp_path, mode):
    # one vCPU (no time slices): the run that arms the one-shot timer (100 ns) must stop at
    # its deadline, not at the end of the million-instruction loop
    body = _EVENT_GATES + _TIMER_ARMED_IN_RUN[mode] + """
  mov $1000000, %ecx
1: dec %ecx
  jnz 1b"""
    vm, v = boot(assemble(program(body), tmp_path))
    run_to_halt(v)
    assert v.get_regs().r13 != 0 and v.get_regs().rcx > 999_000


@pytest.mark.parametrize("event", ["nmi", "interrupt"])
def test_event_comes_before_the_fetch_fault_of_the_next_instruction(tmp_path, event):
    # SDM 6.9: an NMI or interrupt is taken before the #PF of fetching the next instruction;
    # RIP at an unmapped page (1 GiB, beyond the 4 MiB identity map) when the event arrives
    vm, v = boot(assemble(program(_EVENT_GATES), tmp_path))
    run_to_halt(v)
    r = v.get_regs()
    r.rip, r.rflags, r.r13 = 0x40000000, 0x202, 0
    v.set_regs(r)
    v.nmi() if event == "nmi" else v.interrupt(31)
    before = v.get_sregs().cr2
    run_to_halt(v)
    assert v.get_regs().r13 == 0x40000000      # the event interrupted RIP, before any fetch
    assert v.stats["exception_14"] == 0 and v.get_sregs().cr2 == before


def test_cpuid_deterministic_clock(tmp_path):
    body = "mov $0, %eax\n  cpuid\n  rdtsc\n  shl $32, %rdx\n  or %rax, %rdx\n  mov %rdx, %r12"
    code = assemble(program(body), tmp_path)
    results = []
    for _ in range(2):
        vm, v = boot(code)
        run_to_halt(v)
        results.append((v.get_regs().r12, v.clock, v.get_regs().rbx))
    assert results[0] == results[1]
    assert results[0][2] == 0x756E6547   # "Genu"


def test_triple_fault_is_shutdown(tmp_path):
    # an IDT limit of 0 makes every exception fault again: #GP -> #DF -> shutdown
    body = "lidt zero(%rip)\n  ud2\nzero: .word 0\n  .quad 0"
    vm, v = boot(assemble(program(body), tmp_path))
    ex = v.run()
    assert ex.reason == U.KVM_EXIT_SHUTDOWN


def test_unbacked_memory_is_mmio(tmp_path):
    body = "mov $0x40000000, %rax\n  movl $0x11223344, (%rax)\n  mov (%rax), %ebx"
    # map 1 GiB..1 GiB+2 MiB (no RAM there) through a second page directory
    code = program(body).replace("movl $0x5003, 0x4000", "movl $0x5003, 0x4000\n  movl $0x6003, 0x4008\n  movl $0x40000083, 0x6000")
    vm, v = boot(assemble(code, tmp_path))
    ex = v.run()
    assert ex.reason == U.KVM_EXIT_MMIO and ex.mmio.is_write
    assert (ex.mmio.phys_addr, ex.mmio.len, bytes(ex.mmio.data)) == (0x40000000, 4, bytes.fromhex("44332211"))
    ex = v.run()
    assert ex.reason == U.KVM_EXIT_MMIO and not ex.mmio.is_write
    ex.mmio.data[:] = bytes.fromhex("efbeadde")
    run_to_halt(v)
    assert v.get_regs().rbx == 0xDEADBEEF


def test_api_errors_leave_state_unchanged():
    kvm = nestvisor.Kvm()
    vm = kvm.create_vm()
    vm.set_user_memory_region(0, 0, 0x10000)
    with pytest.raises(nestvisor.KvmError) as e:
        vm.set_user_memory_region(1, 0x8000, 0x10000)
    assert e.value.errno == errno.EEXIST
    with pytest.raises(nestvisor.KvmError) as e:
        vm.set_user_memory_region(2, 0x123, 0x1000)
    assert e.value.errno == errno.EINVAL
    v = vm.create_vcpu(0)
    with pytest.raises(nestvisor.KvmError):
        vm.create_vcpu(0)
    before = v.get_sregs()
    bad = v.get_sregs()
    bad.cr0 = 0x80000000   # PG without PE
    with pytest.raises(nestvisor.KvmError) as e:
        v.set_sregs(bad)
    assert e.value.errno == errno.EINVAL and "cr0" in str(e.value)
    assert v.get_sregs() == before
    with pytest.raises(nestvisor.KvmError):
        nestvisor.Kvm(profile="nope")


def test_scan_finds_prefixed_sites():
    code = b"\x90\x48\x0f\x22\xd8" + b"\x0f\x32" + b"\xf3\x90" + b"\x90" * 10
    sites = scan(code)
    assert {1, 2, 5, 7} <= set(sites)       # REX-prefixed MOV CR3, RDMSR, PAUSE
    assert 0 not in sites and 9 not in sites   # plain NOPs are not sites


def test_rdtsc_fast_path_matches_python_path(tmp_path, monkeypatch):
    # a loop of RDTSCs: after the first, each site is answered by the native hook
    body = """mov $200, %ecx
  xor %r12, %r12
1: rdtsc
  shl $32, %rdx
  or %rax, %rdx
  add %rdx, %r12
  dec %ecx
  jnz 1b"""
    code = assemble(program(body), tmp_path)
    vm, v = boot(code)
    run_to_halt(v)
    fast = (v.get_regs().r12, v.clock, v.stats["RDTSC"])
    from nestvisor.cpu.engine import ExecContext
    monkeypatch.setattr(ExecContext, "fast_rdtsc", lambda self, linear, length: None)
    vm, v = boot(code)
    run_to_halt(v)
    slow = (v.get_regs().r12, v.clock, v.stats["RDTSC"])
    assert fast[:2] == slow[:2]
    assert slow[2] == 200 and fast[2] == 1   # Python saw every RDTSC only without the fast path


# The APIC timer counted down and read 800 times (one-shot, masked, 3000 ns at divide-by-1):
# past the target the reads are 0. r12 hashes every value read.
_TMCCT_POLL = """
  mov $800, %esi
  xor %r12, %r12
1: READ
  imul $31, %r12, %r12
  add %rax, %r12
  dec %esi
  jnz 1b"""
_X2APIC_TIMER = _X2APIC_ON + """
  xor %edx, %edx
  mov $0x83e, %ecx
  mov $0xb, %eax
  wrmsr
  mov $0x832, %ecx
  mov $0x100ee, %eax
  wrmsr
  mov $0x838, %ecx
  mov $3000, %eax
  wrmsr
  mov $0x839, %ecx""" + _TMCCT_POLL.replace("READ", "rdmsr")
_XAPIC_TIMER = _XAPIC_PAGE + """
  movl $0xb, 0x3e0(%rbx)
  movl $0x100ee, 0x320(%rbx)
  movl $3000, 0x380(%rbx)""" + _TMCCT_POLL.replace("READ", "mov 0x390(%rbx), %eax")


@pytest.mark.parametrize("body", [_X2APIC_TIMER, _XAPIC_TIMER], ids=["x2apic-rdmsr", "xapic-mmio"])
def test_tmcct_fast_path_matches_python_path(tmp_path, monkeypatch, body):
    # while the timer counts down the hooks answer TMCCT in C; past the target, Python
    from nestvisor.cpu.engine import ExecContext
    from nestvisor.kvm.lapic import Lapic
    seen = {"reads": 0}
    read_register = Lapic._read_register

    def counted(self, offset):
        seen["reads"] += offset == 0x390
        return read_register(self, offset)

    monkeypatch.setattr(Lapic, "_read_register", counted)
    code = assemble(program(body), tmp_path)
    set_tmcct = ExecContext.set_tmcct
    results = []
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(ExecContext, "set_tmcct", lambda self, where, *a: set_tmcct(self, 0, *a))
        seen["reads"] = 0
        vm, v = boot(code)
        run_to_halt(v)
        results.append((v.get_regs().r12, v.clock, seen["reads"]))
    (fast_hash, fast_clock, fast_reads), (slow_hash, slow_clock, slow_reads) = results
    assert (fast_hash, fast_clock) == (slow_hash, slow_clock) and fast_hash != 0
    assert slow_reads == 800 and fast_reads < 400   # Python saw only the reads at or past the target


def _pause_ping(kvm_vcpus: int = 2) -> list[tuple[int, int, int, int]]:
    """Two vCPUs spinning `pause; inc %ax` 200 times, scheduled in rounds as the machine
    does; per vCPU: (clock, AX, PAUSEs, KVM_RUN calls)."""
    vm = nestvisor.Kvm(profile="vmx").create_vm()
    vm.set_user_memory_region(0, 0, 1 << 20)
    vm.memory(0x1000, 11)[:] = bytes.fromhex("31c0f390403dc80075f8f4")   # xor ax; 1: pause; inc ax; cmp $200; jne 1b; hlt
    vcpus = []
    for i in range(kvm_vcpus):
        v = vm.create_vcpu(i)
        sregs = v.get_sregs()
        sregs.cs.selector, sregs.cs.base = 0, 0
        v.set_sregs(sregs)
        regs = v.get_regs()
        regs.rip = 0x1000
        v.set_regs(regs)
        v.set_mp_state(U.KVM_MP_STATE_RUNNABLE)
        vcpus.append(v)
    runs = [0] * kvm_vcpus
    halted = [False] * kvm_vcpus
    end = 0
    while not all(halted):
        end += 5000
        for i, v in enumerate(vcpus):
            if halted[i]:
                continue
            v.run_until = end
            runs[i] += 1
            halted[i] = v.run().reason == U.KVM_EXIT_HLT
    return [(v.clock, v.get_regs().rax & 0xFFFF, v.stats["PAUSE"], runs[i]) for i, v in enumerate(vcpus)]


def test_pause_fast_path_matches_python_path(monkeypatch):
    # each PAUSE ends the vCPU's slice (pause-loop exit); after the first at a site the hook
    # retires it and stops the run without calling Python
    from nestvisor.cpu.decode import Op
    from nestvisor.cpu.engine import ExecContext
    from nestvisor.kvm.vcpu import Vcpu
    calls = {"n": 0}
    on_trap = Vcpu.on_trap

    def counted(self, insn, rip):
        calls["n"] += insn.op == Op.PAUSE
        return on_trap(self, insn, rip)

    monkeypatch.setattr(Vcpu, "on_trap", counted)
    fast = _pause_ping()
    fast_calls = calls["n"]
    monkeypatch.setattr(ExecContext, "fast_pause", lambda self, rip, length: None)
    calls["n"] = 0
    slow = _pause_ping()
    assert fast == slow and slow[0][1] == 200 and slow[0][2] == 200
    assert calls["n"] == 400 and fast_calls == 2   # Python saw every PAUSE only without the fast path


def test_clock_is_exact_inside_a_block():
    # one translation block of 40 NOPs and a HLT (real mode at ORG): the clock counts whole
    # blocks, yet a run stopped inside one has retired exactly the instructions before RIP
    vm, v = boot(b"\x90" * 40 + b"\xf4")
    ctx = v.ctx
    assert ctx.run(1000, limit=13) == Stop.BUDGET         # the limit falls inside the block
    assert ctx.retired == 13 and ctx.rip == ORG + 13
    assert ctx.step() == Stop.BUDGET and ctx.retired == 1 and ctx.rip == ORG + 14
    assert ctx.run(1000) == Stop.TRAP and ctx.retired == 26   # stopped before the HLT site
    assert ctx.rip == ORG + 40


def test_alignment_check_hook_only_while_cr0_am():
    # A data-access hook sends every access through unicorn's slow path, so the #AC hook
    # is there exactly while CR0.AM = 1 (the selftest's alignment_check runs the rule itself)
    vm, v = boot(b"\xf4")
    assert v.ctx._align_hook is None
    s = v.get_sregs()
    s.cr0 |= CR0_AM
    v.set_sregs(s)
    assert v.ctx._align_hook is not None
    s.cr0 &= ~CR0_AM
    v.set_sregs(s)
    assert v.ctx._align_hook is None


def test_align_hook_reads_the_live_cpu_state():
    # nv_align_hook reads CPL and RFLAGS.AC in unicorn's own CPU state, found by offsets
    vm, v = boot(b"\xf4")
    r = v.get_regs()
    r.rflags = RFLAGS_FIXED | RFLAGS_AC
    v.set_regs(r)
    assert ctypes.c_uint64.from_address(v.ctx.trap.eflags).value & RFLAGS_AC
    r.rflags = RFLAGS_FIXED
    v.set_regs(r)
    assert not ctypes.c_uint64.from_address(v.ctx.trap.eflags).value & RFLAGS_AC
