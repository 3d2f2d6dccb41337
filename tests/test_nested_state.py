"""KVM_GET/SET_NESTED_STATE on real L1/L2 code: the blob at every stage of the bundled
L1 VMX hypervisor (KVM selftests' state_test, in-process), E2BIG, SET's rules through the
vCPU API with the vCPU left as it was, and the deferred vmcs12 pages."""

from __future__ import annotations

import errno
import shutil

import pytest

import nestvisor
from nestvisor.arch import kvm_uapi as U
from nestvisor.arch import vmcs as V
from nestvisor.guests import tap
from nestvisor.guests.build import build
from nestvisor.platform.machine import Machine
from nestvisor.state import nested_state as NS

_RFLAGS = NS.VMX_VMCS12_OFFSET + V.BY_NAME["guest_rflags"].offset
needs_as = pytest.mark.skipif(shutil.which("as") is None, reason="needs GNU binutils")


def test_cap_nested_state_is_the_largest_blob():
    assert nestvisor.Kvm(profile="vmx").check_extension(nestvisor.CAP_NESTED_STATE) == 8320
    assert nestvisor.Kvm(profile="svm").check_extension(nestvisor.KVM_CAP_NESTED_STATE) == 4224


def test_get_with_a_small_buffer_is_e2big_with_the_size():
    vcpu = nestvisor.Kvm(profile="vmx").create_vm().create_vcpu(0)
    with pytest.raises(nestvisor.KvmError) as e:
        vcpu.get_nested_state(buffer_size=127)
    assert e.value.errno == errno.E2BIG and e.value.needed == 128
    blob = vcpu.get_nested_state(buffer_size=128)
    # flags 0, format VMX, size 128, vmxon_pa and vmcs12_pa -1 (VMX off), the rest zero
    assert blob == bytes.fromhex("0000" "0000" "80000000") + b"\xff" * 16 + bytes(104)


def _stages(name: str, step: int) -> tuple[str, int, dict[tuple[int, bool, bool], int], Machine]:
    """Run `name`, stopping every `step` instructions; at each stop GET, SET the blob back
    into the vCPU (leaving and re-entering L2 through the restore path) and GET again."""
    out = bytearray()
    m = Machine(build(name), serial_out=out.extend)
    vcpu = m.vcpus[0]
    seen: dict[tuple[int, bool, bool], int] = {}
    limit = 0
    while True:
        limit += step
        result = m.run(max_instructions=limit)
        blob = vcpu.get_nested_state()
        ns = NS.NestedState.decode(blob)
        stage = (len(blob), bool(ns.flags & U.KVM_STATE_NESTED_GUEST_MODE), ns.vmxon_pa != NS.INVALID_GPA)
        seen[stage] = seen.get(stage, 0) + 1
        assert ns.size == len(blob) and ns.format == U.KVM_STATE_NESTED_FORMAT_VMX
        vcpu.set_nested_state(blob)
        assert vcpu.get_nested_state() == blob, f"SET then GET changed the blob at {limit}"
        if result.reason != "instruction limit":
            return out.decode(), result.clock, seen, m


@needs_as
@pytest.mark.parametrize("name,step", [("vmxdemo", 97), ("vmxtest", 997)])
def test_save_and_restore_at_every_stage_changes_nothing(name, step):
    text, clock, seen, _ = _stages(name, step)
    undisturbed = bytearray()
    m = Machine(build(name), serial_out=undisturbed.extend)
    result = m.run(max_instructions=500_000_000)
    assert text == undisturbed.decode() and clock == result.clock
    # every stage was met: VMX off (128), VMXON with a current VMCS (4224), L2 running (4224, GUEST_MODE)
    assert seen[(128, False, False)] and seen[(4224, False, True)] and seen[(4224, True, True)] >= 30
    if name == "vmxtest":
        parsed = tap.parse(text)
        assert parsed.complete and not parsed.failed and len(parsed.tests) == 37


def _guest_mode_machine() -> Machine:
    m = Machine(build("vmxdemo"), serial_out=lambda b: None)
    limit = 0
    while not m.vcpus[0].nested.guest_mode:
        limit += 97
        m.run(max_instructions=limit)
    return m


def _state(vcpu: nestvisor.kvm.vcpu.Vcpu) -> tuple:
    return (vcpu.get_regs(), vcpu.get_sregs(), vcpu.get_vcpu_events(), vcpu.get_nested_state())


@needs_as
@pytest.mark.parametrize("change,rule", [
    (lambda ns: setattr(ns, "format", 1), "format: not KVM_STATE_NESTED_FORMAT_VMX"),
    (lambda ns: setattr(ns, "vmxon_pa", ns.vmxon_pa | 0x800), "hdr.vmx.vmxon_pa: not page aligned"),
    (lambda ns: setattr(ns, "vmcs12_pa", ns.vmxon_pa), "hdr.vmx.vmcs12_pa: equal to vmxon_pa"),
    (lambda ns: setattr(ns, "smm_flags", 2), "hdr.vmx.smm.flags: set while the vCPU is not in SMM"),
    (lambda ns: setattr(ns, "vmx_flags", 2), "hdr.vmx.flags: bits outside"),
    (lambda ns: setattr(ns, "flags", ns.flags | 0x20), "flags: bits outside"),
    (lambda ns: setattr(ns, "size", 1000), "size: no room for vmcs12"),
    (lambda ns: setattr(ns, "raw", ns.raw[:128] + b"\x01" + ns.raw[129:]), "revision_id is not 0x11e57ed0"),
    # the guest-state checks (vmx_set_nested_state row 23): RFLAGS bit 1 must be set
    (lambda ns: setattr(ns, "raw", ns.raw[:_RFLAGS] + bytes(8) + ns.raw[_RFLAGS + 8:]), "RFLAGS"),
])
def test_a_rejected_blob_leaves_the_vcpu_as_it_was(change, rule):
    m = _guest_mode_machine()
    vcpu = m.vcpus[0]
    before = _state(vcpu)
    ns = NS.NestedState.decode(before[3])
    change(ns)
    with pytest.raises(nestvisor.KvmError) as e:
        vcpu.set_nested_state(ns.encode() if ns.size >= 128 else ns.raw)
    assert e.value.errno == errno.EINVAL
    assert rule in str(e.value)
    assert _state(vcpu) == before and vcpu.nested.guest_mode


def _fresh_vcpu_with(m: Machine, ram_end: int) -> tuple[nestvisor.kvm.vm.Vm, nestvisor.kvm.vcpu.Vcpu]:
    """A fresh VM holding `m`'s memory below `ram_end` only, with `m`'s vCPU 0's sregs and
    regs loaded (the caller sets the nested state last, as KVM's selftests do)."""
    src = m.vcpus[0]
    vm = nestvisor.Kvm(profile="vmx").create_vm()
    vm.set_user_memory_region(0, 0, ram_end)
    vm.memory(0, ram_end)[:] = m.vm.memory(0, ram_end)
    vcpu = vm.create_vcpu(0)
    vcpu.set_sregs(src.get_sregs())
    vcpu.set_regs(src.get_regs())
    return vm, vcpu


@needs_as
def test_restore_maps_the_vmcs12_pages_at_the_first_run():
    m = _guest_mode_machine()
    blob = m.vcpus[0].get_nested_state()
    # vmxdemo's MSR bitmap is at 0x112000: memory below 1 MiB holds neither it nor L1's code
    vm, vcpu = _fresh_vcpu_with(m, 0x100000)
    vcpu.set_nested_state(blob)       # the bitmap page is not read here (post-copy)
    assert vcpu.nested.guest_mode
    ex = vcpu.run()
    assert ex.reason == U.KVM_EXIT_INTERNAL_ERROR and ex.internal.suberror == U.KVM_INTERNAL_ERROR_EMULATION

    vm, vcpu = _fresh_vcpu_with(m, 0x100000)
    vcpu.set_nested_state(blob)
    # the rest of memory arrives after SET, before the first run: L2 goes on to its next exit
    vm.set_user_memory_region(1, 0x100000, 0x7F00000)
    vm.memory(0x100000, 0x7F00000)[:] = m.vm.memory(0x100000, 0x7F00000)
    vcpu.run_until = 10_000
    assert vcpu.run().reason != U.KVM_EXIT_INTERNAL_ERROR
    assert vcpu.nested.stats["exits"] >= 1


@needs_as
def test_mapping_the_pages_at_set_refuses_a_missing_one():
    m = _guest_mode_machine()
    blob = m.vcpus[0].get_nested_state()
    vm, vcpu = _fresh_vcpu_with(m, 0x100000)
    vm.nested_pages_at_set = True
    with pytest.raises(nestvisor.KvmError) as e:
        vcpu.set_nested_state(blob)
    assert e.value.errno == errno.EINVAL and "msr_bitmap" in str(e.value)
    assert not vcpu.nested.guest_mode and not vcpu.nested.vmxon


@needs_as
def test_leaving_nested_operation_before_the_first_run_cancels_the_request():
    m = _guest_mode_machine()
    vm, vcpu = _fresh_vcpu_with(m, 0x100000)
    vcpu.set_nested_state(m.vcpus[0].get_nested_state())
    assert "KVM_REQ_GET_NESTED_STATE_PAGES" in vcpu.requests
    off = NS.NestedState.decode(vcpu.get_nested_state())
    off.flags = 0
    off.vmxon_pa = off.vmcs12_pa = NS.INVALID_GPA
    off.size = 128
    vcpu.set_nested_state(off.encode())   # leaving nested operation
    assert not vcpu.requests and not vcpu.nested.vmxon


@pytest.fixture(scope="module")
def l2_vcpu():
    """vCPU 0 of vmxdemo with L2 running, and its blob."""
    m = _guest_mode_machine()
    return m, m.vcpus[0].get_nested_state()


def _mutations():
    """Blobs made from the valid one: byte flips anywhere, a header field set to a random
    value, truncation, and bytes with no structure at all."""
    from hypothesis import strategies as st
    flips = st.lists(st.tuples(st.integers(0, 8319), st.integers(0, 255)), min_size=1, max_size=8)
    header = st.tuples(st.sampled_from([0, 2, 4, 8, 16, 24, 26, 28, 32]), st.integers(0, (1 << 64) - 1))
    return st.one_of(
        st.tuples(st.just("flip"), flips),
        st.tuples(st.just("header"), header),
        st.tuples(st.just("truncate"), st.integers(0, 4223)),
        st.tuples(st.just("random"), st.binary(min_size=0, max_size=600)),
    )


def _mutate(blob: bytes, how: tuple) -> bytes:
    kind, arg = how
    if kind == "flip":
        b = bytearray(blob)
        for at, value in arg:
            if at < len(b):
                b[at] = value
        return bytes(b)
    if kind == "header":
        at, value = arg
        width = {0: 2, 2: 2, 4: 4, 24: 2, 26: 2, 28: 4}.get(at, 8)
        return blob[:at] + (value & ((1 << 8 * width) - 1)).to_bytes(width, "little") + blob[at + width:]
    if kind == "truncate":
        return blob[:arg]
    return arg


@needs_as
def test_fuzzed_blobs_are_answered_with_kvm_errors_and_leave_the_vcpu_unchanged(l2_vcpu):
    from hypothesis import HealthCheck, given, settings

    m, valid = l2_vcpu
    vcpu = m.vcpus[0]

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(_mutations())
    def check(how):
        blob = _mutate(valid, how)
        before = _state(vcpu)
        try:
            vcpu.set_nested_state(blob)
        except nestvisor.KvmError as e:
            assert e.errno in (errno.EINVAL, errno.EFAULT), e
            assert _state(vcpu) == before, f"a rejected SET changed the vCPU ({e})"
        else:
            vcpu.set_nested_state(valid)   # back to the valid state for the next example

    check()
