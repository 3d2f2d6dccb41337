"""`nestvisor bench [--quick] [--json]`: how fast the L0 engine runs guest code and traps.

One process, one run of each measurement:

  a. guest MIPS on a straight-line loop under nestvisor (real mode at 0x7c00,
     `mov ecx,N; dec ecx; jnz; hlt`, run to KVM_EXIT_HLT);
  b. the same loop on bare unicorn (64-bit code, emu_start up to the hlt);
  c. µs per trapped CPUID and per trapped RDMSR(IA32_TSC) round trip under nestvisor,
     and per RDTSC (answered in the native trap hook after its first run),
     the cost of the same loop without the trapping instruction subtracted;
  d. µs per CPUID on bare unicorn with a Python UC_HOOK_INSN CPUID hook (the binding's
     per-hook cost) and with a UC_HOOK_CODE hook on the CPUID address;
  e. µs per nested VMX round trip (L2 CPUID -> L1's handler -> VMRESUME -> L2, the bundled
     vmxbench guest) with lazy and with eager vmcs12 sync, and the fields copied per exit;
  f. µs per IPI round trip between two vCPUs: vCPU 0 sends vCPU 1 an NMI through the x2APIC
     ICR and PAUSEs until vCPU 1's handler has counted it, the vCPUs run in the machine's
     rounds (the cost of cross-vCPU event delivery: IPI handshakes in SMP guests).

Wall times are the host's; the instruction counts are exact (vcpu.clock, 1 insn = 1 ns).
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
from collections.abc import Sequence
from typing import Any

import unicorn
from unicorn import x86_const as X

from nestvisor import KVM_EXIT_HLT, KVM_MP_STATE_RUNNABLE, Kvm

LOOP_INSNS = 20_000_000        # straight-line loop, instructions (quick: 2M)
LOOP_INSNS_QUICK = 2_000_000
TRAP_ITERATIONS = 20_000       # trapped instructions per loop (quick: 2000)
TRAP_ITERATIONS_QUICK = 2_000
IPI_ITERATIONS = 5_000         # NMI round trips between two vCPUs (quick: 500)
IPI_ITERATIONS_QUICK = 500
NESTED_STATE_ITERATIONS = 2_000   # get+set pairs (quick: 200)
NESTED_STATE_ITERATIONS_QUICK = 200
NESTED_STATE_STEP = 97          # instructions per step until L2 runs
SNAPSHOT_MEMORY = 64 << 20
SNAPSHOT_ITERATIONS = 10        # snapshot+restore pairs (quick: 3)
SNAPSHOT_ITERATIONS_QUICK = 3
IA32_TSC = 0x10

LOOP_ADDR = 0x7C00             # real mode, CS base 0; each guest loop gets its own address
TRAP_ADDR = 0x8000             # (a fresh address needs no translation-cache invalidation)
TRAP_STRIDE = 0x400
UC_BASE = 0x100000

# 16-bit (real mode) encodings
MOV_ECX16 = b"\x66\xb9"        # mov ecx, imm32
DEC_ECX16 = b"\x66\x49"
MOV_ESI16 = b"\x66\xbe"        # mov esi, imm32 (CPUID clobbers ecx, so trap loops count in esi)
DEC_ESI16 = b"\x66\x4e"
XOR_EAX16 = b"\x66\x31\xc0"    # CPUID leaf 0 every time
# 64-bit encodings
MOV_ECX64 = b"\xb9"
DEC_ECX64 = b"\xff\xc9"
MOV_ESI64 = b"\xbe"
DEC_ESI64 = b"\xff\xce"
XOR_EAX64 = b"\x31\xc0"
CPUID = b"\x0f\xa2"
RDMSR = b"\x0f\x32"
RDTSC = b"\x0f\x31"
JNZ = b"\x75"
HLT = b"\xf4"


def _loop(prologue: bytes, body: bytes, dec: bytes) -> bytes:
    """prologue; 1: body; dec; jnz 1b; hlt."""
    inner = body + dec
    return prologue + inner + JNZ + bytes([-(len(inner) + 2) & 0xFF]) + HLT


def straight_loop16(iterations: int) -> bytes:
    return _loop(MOV_ECX16 + struct.pack("<I", iterations), b"", DEC_ECX16)


def trap_loop16(iterations: int, body: bytes) -> bytes:
    prologue = MOV_ECX16 + struct.pack("<I", IA32_TSC) + MOV_ESI16 + struct.pack("<I", iterations)
    return _loop(prologue, body, DEC_ESI16)


class _RealModeGuest:
    """One vCPU in real mode with CS base 0 over 1 MiB of RAM."""

    def __init__(self) -> None:
        self.vm = Kvm(profile="vmx").create_vm()
        self.vm.set_user_memory_region(0, 0, 1 << 20)
        self.vcpu = self.vm.create_vcpu(0)
        sregs = self.vcpu.get_sregs()
        sregs.cs.selector = 0
        sregs.cs.base = 0
        self.vcpu.set_sregs(sregs)

    def run(self, addr: int, code: bytes) -> tuple[float, int]:
        """Run `code` at `addr` to its hlt: (wall seconds, instructions = clock delta)."""
        self.vm.memory(addr, len(code))[:] = code
        regs = self.vcpu.get_regs()
        regs.rip = addr
        self.vcpu.set_regs(regs)
        self.vcpu.set_mp_state(KVM_MP_STATE_RUNNABLE)  # the previous loop ended in hlt
        clock = self.vcpu.clock
        start = time.perf_counter()
        ex = self.vcpu.run()
        wall = time.perf_counter() - start
        if ex.reason != KVM_EXIT_HLT:
            raise RuntimeError(f"bench loop at {addr:#x} ended with {ex.name}, not KVM_EXIT_HLT")
        return wall, self.vcpu.clock - clock


# Real mode, CS base 0. Both vCPUs switch their APIC to x2APIC mode; vCPU 1's NMI handler
# (IVT vector 2) counts at IPI_COUNTER and returns; vCPU 0 sends and waits for the count.
IPI_SENDER, IPI_RECEIVER, IPI_HANDLER, IPI_COUNTER = 0x1000, 0x2000, 0x2100, 0x3000
X2APIC_ON16 = bytes.fromhex("66b91b000000" "0f32" "660d000c0000" "0f30")   # APIC_BASE |= EN | EXTD
IPI_RECEIVER_CODE = X2APIC_ON16 + bytes.fromhex("f390" "ebfc")             # 1: pause; jmp 1b
IPI_HANDLER_CODE = bytes.fromhex("ff060030" "cf")                          # inc word [0x3000]; iret


def ipi_sender16(iterations: int) -> bytes:
    """x2APIC on; esi = N; 2: bx = count; ICR = NMI to x2APIC ID 1; 3: pause until the count
    moves; dec esi; jnz 2b; hlt."""
    send = (bytes.fromhex("8b1e0030" "66b930080000" "66b800040000" "66ba01000000" "0f30")
            + bytes.fromhex("f390" "3b1e0030" "74f8"))
    body = send + DEC_ESI16
    return (X2APIC_ON16 + MOV_ESI16 + struct.pack("<I", iterations) + body
            + JNZ + bytes([-(len(body) + 2) & 0xFF]) + HLT)


def _ipi_round_trip(iterations: int) -> float:
    """µs per NMI round trip between two vCPUs, scheduled in rounds as Machine does."""
    from nestvisor.platform.machine import IPI_QUANTUM_NS, QUANTUM_NS

    vm = Kvm(profile="vmx").create_vm()
    vm.set_user_memory_region(0, 0, 1 << 20)
    vm.memory(8, 4)[:] = struct.pack("<HH", IPI_HANDLER, 0)   # IVT entry 2
    vm.memory(IPI_HANDLER, len(IPI_HANDLER_CODE))[:] = IPI_HANDLER_CODE
    vm.memory(IPI_RECEIVER, len(IPI_RECEIVER_CODE))[:] = IPI_RECEIVER_CODE
    sender = ipi_sender16(iterations)
    vm.memory(IPI_SENDER, len(sender))[:] = sender
    vcpus = []
    for i, rip in enumerate((IPI_SENDER, IPI_RECEIVER)):
        v = vm.create_vcpu(i)
        sregs = v.get_sregs()
        sregs.cs.selector, sregs.cs.base = 0, 0
        v.set_sregs(sregs)
        regs = v.get_regs()
        regs.rip = rip
        v.set_regs(regs)
        v.set_mp_state(KVM_MP_STATE_RUNNABLE)
        vcpus.append(v)
    end, quantum = 0, QUANTUM_NS
    start = time.perf_counter()
    while True:
        end += quantum
        kicks = vm.kicks
        for v in vcpus:
            v.run_until = end
            if v.run().reason == KVM_EXIT_HLT:
                wall = time.perf_counter() - start
                if vm.memory(IPI_COUNTER, 2).tobytes() != struct.pack("<H", iterations & 0xFFFF):
                    raise RuntimeError("the IPI bench guest lost an NMI")
                return wall / iterations * 1e6
        quantum = IPI_QUANTUM_NS if vm.kicks != kicks else QUANTUM_NS


def _uc_run(code: bytes, hooks: Sequence[tuple[int, Any, tuple]] = ()) -> float:
    """Run 64-bit `code` on a bare unicorn up to its final hlt; wall seconds."""
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    uc.mem_map(UC_BASE, 0x1000)
    uc.mem_write(UC_BASE, code)
    for kind, callback, extra in hooks:
        uc.hook_add(kind, callback, None, *extra)
    start = time.perf_counter()
    uc.emu_start(UC_BASE, UC_BASE + len(code) - len(HLT))
    return time.perf_counter() - start


def _cpuid_insn_hook(uc: Any, user_data: Any) -> int:
    return 1  # handled: unicorn skips its own CPUID


def _code_hook(uc: Any, address: int, size: int, user_data: Any) -> None:
    return None


def measure(quick: bool = False) -> dict[str, Any]:
    """Run every measurement once; the results as a flat dict."""
    loop_insns = LOOP_INSNS_QUICK if quick else LOOP_INSNS
    k = TRAP_ITERATIONS_QUICK if quick else TRAP_ITERATIONS
    iterations = loop_insns // 2
    started = time.perf_counter()

    # a. nestvisor straight-line loop: mov, N x (dec, jnz), hlt
    guest = _RealModeGuest()
    expected = 2 * iterations + 2
    wall, executed = guest.run(LOOP_ADDR, straight_loop16(iterations))
    nv_mips = executed / wall / 1e6

    # b. bare unicorn: mov, N x (dec, jnz); emu_start stops before the hlt
    uc_code = _loop(MOV_ECX64 + struct.pack("<I", iterations), b"", DEC_ECX64)
    uc_mips = (2 * iterations + 1) / _uc_run(uc_code) / 1e6

    # c. trapped CPUID and RDMSR round trips, the bare loop subtracted
    addrs = iter(range(TRAP_ADDR, TRAP_ADDR + 8 * TRAP_STRIDE, TRAP_STRIDE))
    base_cpuid, _ = guest.run(next(addrs), trap_loop16(k, XOR_EAX16))
    with_cpuid, _ = guest.run(next(addrs), trap_loop16(k, XOR_EAX16 + CPUID))
    base_rdmsr, _ = guest.run(next(addrs), trap_loop16(k, b""))
    with_rdmsr, _ = guest.run(next(addrs), trap_loop16(k, RDMSR))
    base_rdtsc, _ = guest.run(next(addrs), trap_loop16(k, b""))
    with_rdtsc, _ = guest.run(next(addrs), trap_loop16(k, RDTSC))
    traps = {name: guest.vcpu.stats[name] for name in ("CPUID", "RDMSR", "RDTSC")}

    # d. bare unicorn CPUID with Python hooks
    uc_prologue = MOV_ESI64 + struct.pack("<I", k)
    uc_base = _uc_run(_loop(uc_prologue, XOR_EAX64, DEC_ESI64))
    cpuid_code = _loop(uc_prologue, XOR_EAX64 + CPUID, DEC_ESI64)
    cpuid_addr = UC_BASE + len(uc_prologue) + len(XOR_EAX64)
    uc_insn = _uc_run(cpuid_code, [(unicorn.UC_HOOK_INSN, _cpuid_insn_hook, (1, 0, X.UC_X86_INS_CPUID))])
    uc_code = _uc_run(cpuid_code, [(unicorn.UC_HOOK_CODE, _code_hook, (cpuid_addr, cpuid_addr))])

    # e. nested VMX round trip: L2 CPUID -> L1 handler -> VMRESUME -> L2 (vmxbench guest)
    nested = {mode: _nested_round_trip(eager) for mode, eager in (("lazy", False), ("eager", True))}

    # f. NMI round trips between two vCPUs through the x2APIC
    ipi_n = IPI_ITERATIONS_QUICK if quick else IPI_ITERATIONS
    ipi_us = _ipi_round_trip(ipi_n)

    # g. KVM_GET_NESTED_STATE + KVM_SET_NESTED_STATE with L2 running (vmxbench guest)
    state_n, state_us = _nested_state_get_set(NESTED_STATE_ITERATIONS_QUICK if quick else NESTED_STATE_ITERATIONS)

    # h. whole-machine snapshot and restore of a 64 MiB guest with L2 running (vmxbench)
    snap_ms, restore_ms = _snapshot_restore(SNAPSHOT_ITERATIONS_QUICK if quick else SNAPSHOT_ITERATIONS)

    us = 1e6 / k
    return {
        "quick": quick,
        "loop_expected_instructions": expected,
        "loop_instructions": executed,
        "loop_seconds": wall,
        "nestvisor_loop_mips": nv_mips,
        "unicorn_loop_mips": uc_mips,
        "trap_iterations": k,
        "trapped": traps,
        "nestvisor_cpuid_us": (with_cpuid - base_cpuid) * us,
        "nestvisor_rdmsr_us": (with_rdmsr - base_rdmsr) * us,
        "nestvisor_rdtsc_us": (with_rdtsc - base_rdtsc) * us,
        "unicorn_hook_insn_cpuid_us": (uc_insn - uc_base) * us,
        "unicorn_hook_code_cpuid_us": (uc_code - uc_base) * us,
        "nested_exits": nested["lazy"][0],
        "nested_round_trip_lazy_us": nested["lazy"][1],
        "nested_round_trip_eager_us": nested["eager"][1],
        "nested_fields_per_exit_lazy": nested["lazy"][2],
        "nested_fields_per_exit_eager": nested["eager"][2],
        "ipi_iterations": ipi_n,
        "ipi_round_trip_us": ipi_us,
        "nested_state_iterations": state_n,
        "nested_state_get_set_us": state_us,
        "snapshot_memory_mib": SNAPSHOT_MEMORY >> 20,
        "snapshot_ms": snap_ms,
        "restore_ms": restore_ms,
        "total_seconds": time.perf_counter() - started,
    }


def _nested_round_trip(eager: bool) -> tuple[int, float, float]:
    """(nested exits, µs per round trip, vmcs12 fields copied per exit) for one vmxbench run."""
    from nestvisor.guests.build import build
    from nestvisor.platform.machine import Machine

    machine = Machine(build("vmxbench"), profile="vmx", serial_out=lambda data: None)
    nested = machine.vcpus[0].nested
    nested.eager_sync = eager
    start = time.perf_counter()
    result = machine.run()
    wall = time.perf_counter() - start
    if result.status != 1:
        raise RuntimeError(f"vmxbench failed: {result}")
    st = nested.stats
    exits = st["exits"]
    return exits, wall / exits * 1e6, (st["fields_copied"] + st["fields_copied_rare"]) / exits


def _nested_state_get_set(iterations: int) -> tuple[int, float]:
    """(iterations, µs per get_nested_state + set_nested_state) on a vCPU in guest mode: GET
    syncs vmcs02 -> vmcs12 in full, SET checks everything and enters L2 again."""
    vcpu = _in_l2(SNAPSHOT_MEMORY).vcpus[0]
    start = time.perf_counter()
    for _ in range(iterations):
        vcpu.set_nested_state(vcpu.get_nested_state())
    return iterations, (time.perf_counter() - start) / iterations * 1e6


def _in_l2(memory: int) -> Any:
    """A vmxbench machine stopped while L2 runs."""
    from nestvisor.guests.build import build
    from nestvisor.platform.machine import Machine

    machine = Machine(build("vmxbench"), profile="vmx", memory=memory, serial_out=lambda data: None)
    limit = 0
    while not machine.vcpus[0].nested.guest_mode:
        limit += NESTED_STATE_STEP
        if machine.run(max_instructions=limit).reason != "instruction limit":
            raise RuntimeError("vmxbench ended before L2 ran")
    return machine


def _snapshot_restore(iterations: int) -> tuple[float, float]:
    """(ms per Machine.snapshot(), ms per Machine.restore()) of a SNAPSHOT_MEMORY guest."""
    from nestvisor.platform.machine import Machine

    machine = _in_l2(SNAPSHOT_MEMORY)
    snap_s = restore_s = 0.0
    for _ in range(iterations):
        start = time.perf_counter()
        snap = machine.snapshot()
        mid = time.perf_counter()
        Machine.restore(snap, serial_out=lambda data: None)
        snap_s += mid - start
        restore_s += time.perf_counter() - mid
    return snap_s / iterations * 1e3, restore_s / iterations * 1e3


def format_table(r: dict[str, Any]) -> str:
    rows = [
        (f"guest loop, nestvisor ({r['loop_instructions']:,} insns)", f"{r['nestvisor_loop_mips']:.2f}", "MIPS"),
        ("guest loop, bare unicorn", f"{r['unicorn_loop_mips']:.2f}", "MIPS"),
        (f"trapped CPUID, nestvisor ({r['trap_iterations']:,}x)", f"{r['nestvisor_cpuid_us']:.2f}", "µs"),
        (f"trapped RDMSR IA32_TSC, nestvisor ({r['trap_iterations']:,}x)",
         f"{r['nestvisor_rdmsr_us']:.2f}", "µs"),
        (f"trapped RDTSC, nestvisor, answered in the native hook ({r['trap_iterations']:,}x)",
         f"{r['nestvisor_rdtsc_us']:.2f}", "µs"),
        ("CPUID, bare unicorn + UC_HOOK_INSN (Python)", f"{r['unicorn_hook_insn_cpuid_us']:.2f}", "µs"),
        ("CPUID, bare unicorn + UC_HOOK_CODE (Python)", f"{r['unicorn_hook_code_cpuid_us']:.2f}", "µs"),
        (f"nested round trip L2 CPUID -> L1 -> VMRESUME, lazy sync ({r['nested_exits']:,}x)",
         f"{r['nested_round_trip_lazy_us']:.1f}", "µs"),
        ("nested round trip, eager sync", f"{r['nested_round_trip_eager_us']:.1f}", "µs"),
        ("vmcs12 fields copied per exit, lazy sync", f"{r['nested_fields_per_exit_lazy']:.1f}", "fields"),
        ("vmcs12 fields copied per exit, eager sync", f"{r['nested_fields_per_exit_eager']:.1f}", "fields"),
        (f"IPI round trip, NMI to the other vCPU and back through memory ({r['ipi_iterations']:,}x)",
         f"{r['ipi_round_trip_us']:.1f}", "µs"),
        (f"get_nested_state + set_nested_state in L2 ({r['nested_state_iterations']:,}x)",
         f"{r['nested_state_get_set_us']:.1f}", "µs"),
        (f"Machine.snapshot(), {r['snapshot_memory_mib']} MiB guest in L2", f"{r['snapshot_ms']:.1f}", "ms"),
        (f"Machine.restore(), {r['snapshot_memory_mib']} MiB guest in L2", f"{r['restore_ms']:.1f}", "ms"),
        ("total bench time", f"{r['total_seconds']:.2f}", "s"),
    ]
    lw = max(len(a) for a, _, _ in rows)
    vw = max(len(b) for _, b, _ in rows)
    title = "nestvisor bench" + (" --quick" if r["quick"] else "")
    return "\n".join([title] + [f"  {a:<{lw}}  {b:>{vw}} {c}" for a, b, c in rows]) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """`nestvisor bench` with `argv` (the command's parser, so options match)."""
    from nestvisor.cli import build_parser

    return run(build_parser().parse_args(["bench", *(sys.argv[1:] if argv is None else argv)]))


def run(args: argparse.Namespace) -> int:
    results = measure(quick=args.quick)
    if args.json:
        rounded = {k: round(v, 2) if isinstance(v, float) else v for k, v in results.items()}
        print(json.dumps(rounded, indent=2, sort_keys=True))
    else:
        sys.stdout.write(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
