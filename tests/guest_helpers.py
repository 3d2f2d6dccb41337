"""Helpers for tests that run the bundled guests (nestvisor.guests).

QEMU is an optional oracle, never a dependency: ``run_under_qemu`` returns None
when ``qemu-system-x86_64`` is not installed, so callers can ``pytest.skip``.
"""

from __future__ import annotations

import shutil
import subprocess

from nestvisor.guests import build, tap

# Selftest IDs whose rule QEMU TCG does not implement (see nestvisor.guests' docstring);
# the last is nestvisor's own instruction clock, where TCG's TSC follows the host's.
QEMU_TCG_GAPS = ("rdmsr_unknown", "wrmsr_efer_reserved", "cr4_reserved",
                 "cr0_nw", "cr0_pg_no_pe", "pat_invalid", "alignment_check", "tsc_instruction_clock")


def run_under_qemu(name: str, smp: int = 1, exclude: tuple[str, ...] = (),
                   timeout: float = 60.0, cpu: str | None = None) -> tuple[int, tap.TapResult, str] | None:
    """Boot guest ``name`` under QEMU TCG (CPU model ``cpu``, e.g. "qemu64,+svm", or QEMU's
    default); return (process status, parsed TAP, serial text)."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return None
    cmd = [qemu, "-nodefaults", "-display", "none", "-serial", "stdio",
           "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-accel", "tcg",
           "-kernel", str(build.build(name)), "-smp", str(smp), "-m", "128"]
    if cpu is not None:
        cmd += ["-cpu", cpu]
    if exclude:
        cmd += ["-append", " ".join(f"-{t}" for t in exclude)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, tap.parse(proc.stdout), proc.stdout
