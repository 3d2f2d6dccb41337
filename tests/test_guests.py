"""The bundled selftest guest: real x86 code from real mode to long mode, on 1 and 2 vCPUs."""

from __future__ import annotations

import shutil

import pytest

from nestvisor.guests.build import build
from nestvisor.platform.machine import Machine

pytestmark = pytest.mark.skipif(shutil.which("as") is None, reason="needs GNU binutils")


@pytest.mark.parametrize("smp", [1, 2])
def test_selftest_guest_passes(smp):
    out = bytearray()
    m = Machine(build("selftest"), smp=smp, serial_out=out.extend)
    result = m.run(max_instructions=2_000_000_000)
    text = out.decode()
    assert result.reason == "debug-exit", text
    assert result.status == 1, text
    lines = [ln for ln in text.splitlines() if ln.startswith(("ok ", "not ok "))]
    assert len(lines) == 36 and all(ln.startswith("ok ") for ln in lines), text
    # the run is deterministic: the same inputs give the same virtual time
    m2 = Machine(build("selftest"), smp=smp, serial_out=lambda b: None)
    assert m2.run(max_instructions=2_000_000_000).clock == result.clock


def test_two_vcpus_exchange_ipis():
    out = bytearray()
    m = Machine(build("selftest"), smp=2, serial_out=out.extend)
    m.run(max_instructions=2_000_000_000)
    text = out.decode()
    assert "ok 33 - AP 1 online in long mode after INIT/SIPI" in text
    assert "ok 34 - IPI round trip between 2 vCPUs" in text
    assert m.vcpus[1].stats["deliver_80"] >= 1 and m.vcpus[0].stats["deliver_81"] >= 1


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="QEMU is an optional oracle")
def test_selftest_agrees_with_qemu_tcg():
    # QEMU TCG as an oracle: with the checks TCG itself gets wrong skipped on both sides,
    # both machines pass the same lines.
    from guest_helpers import QEMU_TCG_GAPS, run_under_qemu

    status, tap, text = run_under_qemu("selftest", smp=2, exclude=QEMU_TCG_GAPS)
    out = bytearray()
    append = " ".join("-" + name for name in QEMU_TCG_GAPS)
    Machine(build("selftest"), smp=2, append=append, serial_out=out.extend).run(max_instructions=2_000_000_000)
    ours = [ln.split(" - ")[0] for ln in out.decode().splitlines() if ln.startswith(("ok ", "not ok "))]
    theirs = [ln.split(" - ")[0] for ln in text.splitlines() if ln.startswith(("ok ", "not ok "))]
    assert status == 1 and ours == theirs
