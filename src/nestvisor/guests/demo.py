"""`nestvisor demo`: boot a bundled guest and show what the L0 did for it.

`--arch vmx` (the default) runs src/vmxdemo.S: an L1 VMX hypervisor whose L2 guest exits
to it for CPUID, port I/O, RDMSR, HLT and VMCALL. It runs twice, with the rarely used
vmcs12 guest fields synced lazily (KVM's default) and then eagerly on every exit, and the
summary shows nested entries and exits by reason, vmcs12 fields copied per exit in each
mode, and wall time per nested exit.

`--arch svm` runs src/svmdemo.S on the svm profile: an L1 SVM hypervisor whose L2 guest
exits to it for CPUID, port I/O (IOPM), RDMSR (MSRPM), HLT and VMMCALL; the summary shows
nested VMRUNs and #VMEXITs by exit code (KVM's trace names), the SVM instructions L1
executed and wall time per #VMEXIT.

`--arch engine` runs src/demo.S without nesting on the base profile: the summary shows exits
to userspace, trapped instructions and events delivered through the IDT. Guest lines go to
stdout unchanged; every number but wall time is deterministic.
"""

from __future__ import annotations

import argparse
import codecs
import sys
import time
from collections import Counter
from typing import Any

from nestvisor.arch import svm as S
from nestvisor.guests.build import build
from nestvisor.platform.machine import Machine

DEBUG_EXIT_OK = 1  # isa-debug-exit: status = (code << 1) | 1, so code 0 is status 1

_VECTOR_NAMES = {
    0: "#DE", 1: "#DB", 2: "NMI", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM", 8: "#DF",
    10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF", 17: "#AC", 18: "#MC",
    19: "#XM", 20: "#VE", 21: "#CP",
}
# vcpu.stats keys that are not trapped instructions
_NOT_INSNS = ("KVM_EXIT_", "deliver_", "exception_", "hypercall_", "triple_fault")


class _LineOut:
    """Serial bytes to sys.stdout as text (looked up per call, so pytest's capsys sees it)."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, data: bytes) -> None:
        text = self._decoder.decode(data)
        if text:
            sys.stdout.write(text)
            if "\n" in text:
                sys.stdout.flush()

    def flush(self) -> None:
        sys.stdout.flush()


def _count_retired(vcpu: Any) -> list[int]:
    """Sum the instructions of every engine run of `vcpu` (its clock also holds halted time)."""
    total = [0]
    ctx = vcpu.ctx
    engine_run = ctx.run

    def run(*args: int) -> Any:
        try:
            return engine_run(*args)
        finally:
            total[0] += ctx.retired

    ctx.run = run
    return total


def _table(title: str, rows: list[tuple[str, str]]) -> list[str]:
    if not rows:
        return [title, "  (none)"]
    width = max(len(label) for label, _ in rows)
    vwidth = max(len(value) for _, value in rows)
    return [title] + [f"  {label:<{width}}  {value:>{vwidth}}" for label, value in rows]


def summary(result: Any, vcpu: Any, retired: int, wall: float, arch: str) -> str:
    """The summary text for one demo run."""
    stats: Counter[str] = vcpu.stats
    exits = sorted((k, v) for k, v in stats.items() if k.startswith("KVM_EXIT_"))
    insns = sorted((k, v) for k, v in stats.items() if not k.startswith(_NOT_INSNS))
    delivered = sorted(
        (int(k.split("_", 1)[1]), v) for k, v in stats.items() if k.startswith("deliver_")
    )
    halted = vcpu.clock - retired
    if result.status == DEBUG_EXIT_OK:
        status = f"{result.status} (debug-exit code 0: pass)"
    else:
        status = f"{result.status} ({result.reason})"
    mips = retired / wall / 1e6 if wall > 0 else 0.0
    lines = ["", f"nestvisor demo summary (--arch {arch}: the L0 engine alone, no L1/L2)"]
    lines += _table("run", [
        ("wall time", f"{wall:.2f} s"),
        ("virtual time", f"{vcpu.clock:,} ns"),
        ("instructions retired", f"{retired:,}"),
        ("halted", f"{halted:,} ns"),
        ("guest MIPS", f"{mips:.2f}"),
    ])
    lines += _table("exits to userspace", [(k, f"{v:,}") for k, v in exits])
    lines += _table("trapped instructions", [(k, f"{v:,}") for k, v in insns])
    lines += _table("delivered through the IDT", [
        (f"vector {vec:<3} {_VECTOR_NAMES.get(vec, 'interrupt' if vec >= 32 else '?')}", f"{n:,}")
        for vec, n in delivered
    ])
    lines.append(f"guest exit status: {status}")
    return "\n".join(lines) + "\n"


def _nested_run(eager: bool, out: Any) -> tuple[Any, Any, float]:
    machine = Machine(build("vmxdemo"), smp=1, profile="vmx", serial_out=out)
    vcpu = machine.vcpus[0]
    vcpu.nested.eager_sync = eager
    start = time.perf_counter()
    result = machine.run()
    return result, vcpu, time.perf_counter() - start


def nested_summary(runs: list[tuple[str, Any, Any, float]]) -> str:
    """The nested VMX summary: one column per sync mode."""
    lines = ["", "nestvisor demo summary (--arch vmx: an L1 VMX hypervisor and its L2 guest)"]
    stats = [vcpu.nested.stats for _, _, vcpu, _ in runs]
    reasons = sorted({k for st in stats for k in st if k.startswith("exit_")})
    header = "".join(f"{mode:>14}" for mode, _, _, _ in runs)
    lines.append(f"  {'':<34}{header}")

    def row(label: str, values: list[str]) -> None:
        lines.append(f"  {label:<34}" + "".join(f"{v:>14}" for v in values))

    row("nested VM entries", [f"{st['entries']:,}" for st in stats])
    row("nested VM exits", [f"{st['exits']:,}" for st in stats])
    for r in reasons:
        row(f"  {r[5:]}", [f"{st[r]:,}" for st in stats])
    row("rare-field syncs", [f"{st['rare_syncs']:,}" for st in stats])
    row("vmcs12 fields copied per exit", [
        f"{(st['fields_copied'] + st['fields_copied_rare']) / max(1, st['exits']):.1f}" for st in stats])
    row("wall time per nested exit", [f"{wall / max(1, st['exits']) * 1e6:,.0f} µs"
                                      for st, (_, _, _, wall) in zip(stats, runs, strict=True)])
    row("VMX instructions L1 executed", [
        f"{sum(v for k, v in st.items() if k.startswith(('VM', 'INV'))):,}" for st in stats])
    for mode, result, _, _ in runs:
        ok = "pass" if result.status == DEBUG_EXIT_OK else f"FAIL ({result.reason})"
        lines.append(f"guest exit status ({mode}): {result.status} ({ok})")
    return "\n".join(lines) + "\n"


# SVM instructions L1 executes, as the vCPU counts its trapped instructions
_SVM_INSNS = ("VMRUN", "VMLOAD", "VMSAVE", "CLGI", "STGI")


def svm_summary(result: Any, vcpu: Any, wall: float) -> str:
    """The nested SVM summary: #VMEXITs by exit code, in code order, with KVM's trace names."""
    stats: Counter[str] = vcpu.nested.stats
    code_of = {f"exit_{name}": code for code, name in S.EXIT_NAMES.items()}
    exits = sorted((code_of.get(k, -1), k[5:], v) for k, v in stats.items() if k.startswith("exit_"))
    rows = [("nested VMRUNs", f"{stats['vmruns']:,}"), ("failed VMRUNs (SVM_EXIT_ERR)", f"{stats['vmrun_failed']:,}"),
            ("nested #VMEXITs", f"{stats['exits']:,}")]
    rows += [(f"  {code:#05x} {name}", f"{n:,}") for code, name, n in exits]
    rows.append(("wall time per #VMEXIT", f"{wall / max(1, stats['exits']) * 1e6:,.0f} µs"))
    rows += [(f"L1 {insn}", f"{vcpu.stats[insn]:,}") for insn in _SVM_INSNS]
    lines = _table("\nnestvisor demo summary (--arch svm: an L1 SVM hypervisor and its L2 guest)", rows)
    ok = "pass" if result.status == DEBUG_EXIT_OK else f"FAIL ({result.reason})"
    lines.append(f"guest exit status: {result.status} ({ok})")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    """Boot the demo guest (one vCPU), print its serial lines and a summary; 0 if it passed."""
    arch = getattr(args, "arch", None) or "vmx"
    out = _LineOut()
    if arch == "vmx":
        runs = []
        for mode, eager in (("lazy sync", False), ("eager sync", True)):
            result, vcpu, wall = _nested_run(eager, out if not eager else (lambda data: None))
            runs.append((mode, result, vcpu, wall))
        sys.stdout.write(nested_summary(runs))
        sys.stdout.flush()
        return 0 if all(r.status == DEBUG_EXIT_OK for _, r, _, _ in runs) else 1
    if arch == "svm":
        machine = Machine(build("svmdemo"), smp=1, profile="svm", serial_out=out)
        start = time.perf_counter()
        result = machine.run()
        wall = time.perf_counter() - start
        sys.stdout.write(svm_summary(result, machine.vcpus[0], wall))
        sys.stdout.flush()
        return 0 if result.status == DEBUG_EXIT_OK else 1
    machine = Machine(build("demo"), smp=1, profile="base", serial_out=out)
    vcpu = machine.vcpus[0]
    retired = _count_retired(vcpu)
    start = time.perf_counter()
    result = machine.run()
    wall = time.perf_counter() - start
    sys.stdout.write(summary(result, vcpu, retired[0], wall, arch))
    sys.stdout.flush()
    return 0 if result.status == DEBUG_EXIT_OK else 1
