"""Migration changes nothing (issue 5): a bundled nested workload is snapshotted at every
nested VM-exit and at a spread of arbitrary instruction counts, each snapshot restored into a
fresh machine that runs on to the next point; the last one runs to the end. Console output,
registers and memory must equal those of the run that was never migrated."""

from __future__ import annotations

import hashlib
import shutil

import pytest

from nestvisor.guests.build import build
from nestvisor.platform.machine import Machine

needs_as = pytest.mark.skipif(shutil.which("as") is None, reason="needs GNU binutils")
LIMIT = 2_000_000_000
MEMORY = 4 << 20
SPREAD = 7919      # instructions between the arbitrary stops (a prime: no alignment with loops)


def _final(m: Machine) -> tuple:
    """What must match at the end: every vCPU's registers and all of guest memory."""
    regs = tuple((v.get_regs(), v.get_sregs(), v.get_debugregs(), v.get_xsave()) for v in m.vcpus)
    return regs, hashlib.sha256(bytes(m.vm.memory(0, m.memory))).hexdigest()


def _reference(name: str, profile: str) -> tuple[list[int], bytes, object, tuple]:
    """The never-migrated run, and the vCPU clock at each of its nested VM-exits."""
    out = bytearray()
    m = Machine(build(name), memory=MEMORY, profile=profile, serial_out=out.extend)
    vcpu = m.vcpus[0]
    nested = vcpu.nested
    clocks: list[int] = []
    vmexit = nested.vmexit

    def recording_vmexit(e: object) -> None:
        vmexit(e)
        clocks.append(vcpu.clock)

    nested.vmexit = recording_vmexit
    result = m.run(max_instructions=LIMIT)
    assert result.status == 1, out.decode()
    return clocks, bytes(out), result, _final(m)


def _migrating_run(name: str, profile: str, stops: list[int], fmt: str) -> tuple[bytes, object, tuple, int]:
    out = bytearray()
    m = Machine(build(name), memory=MEMORY, profile=profile, serial_out=out.extend)
    migrations = 0
    for stop in stops:
        m.vm.svm_state_format = fmt   # the nested-state format the snapshot carries
        if m.run(max_instructions=stop).reason != "instruction limit":
            break
        m = Machine.restore(m.snapshot(), serial_out=out.extend)
        migrations += 1
    result = m.run(max_instructions=LIMIT)
    return bytes(out), result, _final(m), migrations


@needs_as
@pytest.mark.parametrize("name,profile,fmt", [("vmxdemo", "vmx", "svm"), ("svmdemo", "svm", "svm"),
                                              ("svmdemo", "svm", "svm-v2")])
def test_migration_at_every_nested_exit_changes_nothing(name, profile, fmt):
    clocks, out, result, final = _reference(name, profile)
    assert len(clocks) > 500
    stops = sorted(set(clocks) | set(range(SPREAD, result.clock, SPREAD)))
    m_out, m_result, m_final, migrations = _migrating_run(name, profile, stops, fmt)
    assert migrations == len(stops)
    assert m_out == out
    assert (m_result.status, m_result.reason, m_result.clock) == (result.status, result.reason, result.clock)
    assert m_final == final
