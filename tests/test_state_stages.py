"""KVM selftests' state_test stages on the bundled L1/L2 (issue 5): before VMXON / EFER.SVME,
VMXON without a current VMCS, with a current VMCS, in L2, in L2 with the entry still pending,
in L2 with a shadow VMCS, back in L1. A reference run records the first instruction count at
which each stage holds; a second run stops there, checks the blob's header, saves the
machine, restores it into a fresh one, and both run to the end with the same console,
registers, memory and clock. SVM runs in both nested-state formats."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable

import pytest

from nestvisor.arch import kvm_uapi as U
from nestvisor.guests.build import build
from nestvisor.platform.machine import Machine
from nestvisor.state import nested_state as NS

needs_as = pytest.mark.skipif(shutil.which("as") is None, reason="needs GNU binutils")
LIMIT = 2_000_000_000
MEMORY = 4 << 20
GM, RP = U.KVM_STATE_NESTED_GUEST_MODE, U.KVM_STATE_NESTED_RUN_PENDING

# stage -> (predicate on the vCPU after a nested instruction or exit, blob size, header flags)
Predicate = Callable[[object], bool]
VMX_STAGES: dict[str, tuple[Predicate, int, int]] = {
    "vmxon-no-vmcs": (lambda v: v.nested.vmxon and v.nested.vmcs12 is None, 128, 0),
    "current-vmcs": (lambda v: v.nested.vmcs12 is not None and not v.nested.guest_mode, 4224, 0),
    "l2-running": (lambda v: v.nested.guest_mode and not v.entry_event_pending() and v.nested.shadow12 is None,
                   4224, GM),
    "l2-entry-pending": (lambda v: v.nested.guest_mode and v.entry_event_pending(), 4224, GM | RP),
    "l2-shadow-vmcs": (lambda v: v.nested.guest_mode and v.nested.shadow12 is not None, 8320, GM),
    "back-in-l1": (lambda v: not v.nested.guest_mode and v.nested.stats["exits"] > 0, 4224, 0),
}
SVM_STAGES: dict[str, tuple[Predicate, int, int]] = {
    "svme-set": (lambda v: v.efer_svme and not v.nested.guest_mode and not v.nested.stats["vmruns"], 128,
                 U.KVM_STATE_NESTED_GIF_SET),
    "l2-running": (lambda v: v.nested.guest_mode and not v.entry_event_pending(), 4224, GM | U.KVM_STATE_NESTED_GIF_SET),
    "l2-entry-pending": (lambda v: v.nested.guest_mode and v.entry_event_pending(), 4224,
                         GM | RP | U.KVM_STATE_NESTED_GIF_SET),
    "back-in-l1": (lambda v: not v.nested.guest_mode and v.nested.stats["exits"] > 0, 128, 0),
}


def _first_clocks(name: str, profile: str, stages: dict[str, tuple[Predicate, int, int]]) -> dict[str, int]:
    """The vCPU clock at which each stage first holds, after a nested instruction or exit."""
    m = Machine(build(name), memory=MEMORY, profile=profile, serial_out=lambda b: None)
    vcpu = m.vcpus[0]
    nested = vcpu.nested
    first: dict[str, int] = {}

    def look() -> None:
        for stage, (holds, _, _) in stages.items():
            if stage not in first and holds(vcpu):
                first[stage] = vcpu.clock

    def wrap(fn: Callable) -> Callable:
        def wrapped(*args: object) -> None:
            fn(*args)
            look()
        return wrapped

    nested.emulate, nested.vmexit = wrap(nested.emulate), wrap(nested.vmexit)
    assert m.run(max_instructions=LIMIT).status == 1
    return first


def _final(m: Machine) -> tuple:
    regs = tuple((v.get_regs(), v.get_sregs(), v.get_xsave()) for v in m.vcpus)
    return regs, hashlib.sha256(bytes(m.vm.memory(0, m.memory))).hexdigest()


def _stage_round_trip(tmp_path, name: str, profile: str, clock: int, fmt: str) -> tuple:
    """Stop `name` at `clock`, save it, run on, and run the saved machine in a fresh one:
    (blob size and flags at the stop, how the original went on, how the restored one did)."""
    out = bytearray()
    m = Machine(build(name), memory=MEMORY, profile=profile, serial_out=out.extend)
    m.vm.svm_state_format = fmt
    assert m.run(max_instructions=clock).reason == "instruction limit"
    blob = m.vcpus[0].get_nested_state()
    header = (len(blob), NS.NestedState.decode(blob).flags)
    path = tmp_path / "stage.nvs"
    m.save(path)
    done = len(out)
    original = m.run(max_instructions=LIMIT)
    rest = bytearray()
    restored = Machine.load(path, serial_out=rest.extend)
    again = restored.run(max_instructions=LIMIT)
    return (header, (bytes(out[done:]), original.status, original.clock, _final(m)),
            (bytes(rest), again.status, again.clock, _final(restored)))


@pytest.fixture(scope="module")
def vmx_clocks():
    return _first_clocks("vmxtest", "vmx", VMX_STAGES)


@pytest.fixture(scope="module")
def svm_clocks():
    return _first_clocks("svmtest", "svm", SVM_STAGES)


@needs_as
@pytest.mark.parametrize("stage", ["before-vmxon", *VMX_STAGES])
def test_vmx_stage_saves_and_restores(tmp_path, vmx_clocks, stage):
    if stage == "before-vmxon":
        clock, size, flags = 1000, 128, 0
    else:
        clock, (_, size, flags) = vmx_clocks[stage], VMX_STAGES[stage]
    header, original, restored = _stage_round_trip(tmp_path, "vmxtest", "vmx", clock, "svm")
    assert header == (size, flags)
    assert original[1] == 1 and restored == original


@needs_as
@pytest.mark.parametrize("fmt", ["svm", "svm-v2"])
@pytest.mark.parametrize("stage", ["before-svme", *SVM_STAGES])
def test_svm_stage_saves_and_restores(tmp_path, svm_clocks, stage, fmt):
    if stage == "before-svme":
        clock, size, flags = 1000, 128, U.KVM_STATE_NESTED_GIF_SET
    else:
        clock, (_, size, flags) = svm_clocks[stage], SVM_STAGES[stage]
    header, original, restored = _stage_round_trip(tmp_path, "svmtest", "svm", clock, fmt)
    # svm-v2 has the same flags, and the header alone or its full layout
    assert header == (size, flags) if fmt == "svm" else (header[0] > 128, header[1]) == (size > 128, flags)
    assert original[1] == 1 and restored == original
