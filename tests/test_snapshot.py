"""Whole-vCPU and whole-VM snapshots (issue 5): the LAPIC/XSAVE/XCRS/MSR-list ioctls, KVM's
save and load order, the snapshot file's envelope, and state_test-style runs: stop a
bundled guest at named stages, save to a file, restore into a fresh machine (here and in
another process) and check that the rest of the run is identical."""

from __future__ import annotations

import errno
import json
import shutil
import struct
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass

import pytest

import nestvisor
from nestvisor.arch import kvm_uapi as U
from nestvisor.arch import msr as M
from nestvisor.cpu import fpu
from nestvisor.guests.build import build
from nestvisor.kvm import snapfile
from nestvisor.kvm.errors import KvmError
from nestvisor.kvm.snapshot import VcpuState, VmSnapshot
from nestvisor.kvm.xsave import KVM_XSAVE_SIZE, XSAVE_HDR_OFFSET, Xcrs
from nestvisor.platform.machine import Machine, MachineSnapshot
from nestvisor.state import nested_state as NS

needs_as = pytest.mark.skipif(shutil.which("as") is None, reason="needs GNU binutils")
LIMIT = 2_000_000_000
OSXSAVE = 1 << 18


def _vcpu(profile: str = "vmx"):
    vm = nestvisor.Kvm(profile=profile).create_vm()
    vm.set_user_memory_region(0, 0, 0x10000)
    return vm, vm.create_vcpu(0)


# ---- the new ioctls -----------------------------------------------------------------------------

def _fxsave_sample(blob: bytes) -> bytes:
    b = bytearray(blob)
    # FCW, FSW (TOP = 6), abridged tag (ST0, ST1 valid), FOP, FIP, FDP, MXCSR
    struct.pack_into("<HHBxHQQI", b, 0, 0x27F, (6 << 11) | 0x41, 0xC0, 0x123, 0x1004, 0x2008, 0x1F80 | 0x40)
    struct.pack_into("<QH", b, 32, 0xC90FDAA22168C235, 0x4000)   # ST0 = pi
    struct.pack_into("<QH", b, 48, 0x8000000000000000, 0x3FFF)   # ST1 = 1.0
    for i in range(16):
        b[160 + 16 * i:176 + 16 * i] = bytes((i * 16 + j) & 0xFF for j in range(16))
    return bytes(b)


def test_xsave_round_trip():
    _, vcpu = _vcpu()
    blob = vcpu.get_xsave()
    assert len(blob) == KVM_XSAVE_SIZE
    xstate_bv, xcomp_bv = struct.unpack_from("<QQ", blob, XSAVE_HDR_OFFSET)
    assert (xstate_bv, xcomp_bv) == (3, 0)   # x87 | SSE, standard format
    sample = _fxsave_sample(blob)
    vcpu.set_xsave(sample)
    assert vcpu.get_xsave() == sample
    _, other = _vcpu()
    other.set_xsave(sample)
    assert other.get_xsave() == sample


def test_xsave_components_left_out_are_loaded_in_their_init_state():
    _, vcpu = _vcpu()
    sample = bytearray(_fxsave_sample(vcpu.get_xsave()))
    struct.pack_into("<Q", sample, XSAVE_HDR_OFFSET, 1)   # x87 only: SSE (XMM) in its init state
    vcpu.set_xsave(bytes(sample))
    got = vcpu.get_xsave()
    assert got[160:416] == bytes(256) and got[32:160] == sample[32:160]
    assert struct.unpack_from("<I", got, 24)[0] == 0x1F80


@pytest.mark.parametrize("offset, fmt, value, rule", [
    (XSAVE_HDR_OFFSET, "<Q", 7, "fpu_copy_uabi_to_guest_fpstate"),      # YMM: not on this CPU
    (XSAVE_HDR_OFFSET + 8, "<Q", 1 << 63, "validate_user_xstate_header"),  # compacted format
    (XSAVE_HDR_OFFSET + 16, "<Q", 1, "validate_user_xstate_header"),   # reserved header bytes
    (24, "<I", 1 << 16, "copy_uabi_to_xstate"),                         # MXCSR reserved bit
])
def test_set_xsave_rules(offset, fmt, value, rule):
    _, vcpu = _vcpu()
    before = vcpu.get_xsave()
    bad = bytearray(before)
    struct.pack_into(fmt, bad, offset, value)
    with pytest.raises(KvmError) as e:
        vcpu.set_xsave(bytes(bad))
    assert e.value.errno == errno.EINVAL and rule in str(e.value)
    assert vcpu.get_xsave() == before
    with pytest.raises(KvmError):
        vcpu.set_xsave(before[:512])


@pytest.mark.parametrize("xcr0, rule", [(0, "bit 0"), (2, "bit 0"), (5, "AVX without SSE"),
                                        (7, "guest_supported_xcr0"), (1 << 9 | 3, "guest_supported_xcr0")])
def test_set_xcrs_rules(xcr0, rule):
    _, vcpu = _vcpu()
    with pytest.raises(KvmError) as e:
        vcpu.set_xcrs(Xcrs({0: xcr0}))
    assert e.value.errno == errno.EINVAL and rule in str(e.value) and "__kvm_set_xcr" in str(e.value)
    with pytest.raises(KvmError):
        vcpu.set_xcrs(Xcrs({0: 3}, flags=1))
    vcpu.set_xcrs(Xcrs({1: 5}))   # no XCR0 in the table: KVM ignores it


def test_xcr0_is_what_the_guest_sees():
    """set_xcrs and the guest's XSETBV/XGETBV meet in the same place (checks cpu/context.py's
    OFF_XCR0 on the running unicorn build)."""
    vm, vcpu = _vcpu()
    code = bytes.fromhex(
        "6631c9" "6631d2" "66b801000000"   # xor ecx,ecx; xor edx,edx; mov eax,1
        "0f01d1" "e610"                    # xsetbv; out 0x10,al
        "0f01d0" "e611" "f4")              # xgetbv; out 0x11,al; hlt
    vm.memory(0x1000, len(code))[:] = code
    s = vcpu.get_sregs()
    s.cs.selector = s.cs.base = 0
    s.cr4 |= OSXSAVE
    vcpu.set_sregs(s)
    r = vcpu.get_regs()
    r.rip = 0x1000
    vcpu.set_regs(r)
    assert vcpu.get_xcrs().xcrs == {0: 3}
    ex = vcpu.run()
    assert ex.reason == U.KVM_EXIT_IO and ex.io.port == 0x10
    assert vcpu.get_xcrs().xcrs == {0: 1}   # the guest's XSETBV
    vcpu.set_xcrs(Xcrs({0: 3}))
    ex = vcpu.run()
    assert ex.io.port == 0x11 and ex.io.data[0] == 3   # the guest's XGETBV sees set_xcrs


def test_lapic_round_trip_and_rules():
    _, vcpu = _vcpu()
    page = bytearray(vcpu.get_lapic())
    assert len(page) == 1024
    struct.pack_into("<I", page, 0x80, 0x20)    # TPR
    struct.pack_into("<I", page, 0x3E0, 0xB)    # TDCR: divide by 1
    vcpu.set_lapic(bytes(page))
    assert vcpu.get_lapic()[0x80] == 0x20 and vcpu.get_lapic()[0x3E0] == 0xB
    with pytest.raises(KvmError) as e:
        vcpu.set_lapic(bytes(page[:512]))
    assert e.value.errno == errno.EINVAL
    # x2APIC mode: the ID in the page must be the vCPU's (kvm_apic_state_fixup)
    vcpu.set_msrs({M.IA32_APIC_BASE: vcpu.get_msrs([M.IA32_APIC_BASE])[M.IA32_APIC_BASE] | (1 << 10)})
    page = bytearray(vcpu.get_lapic())
    struct.pack_into("<I", page, 0x20, 7)
    with pytest.raises(KvmError) as e:
        vcpu.set_lapic(bytes(page))
    assert "kvm_apic_state_fixup" in str(e.value)


def test_msr_index_list_round_trips():
    for profile, present, absent in (("vmx", M.IA32_FEATURE_CONTROL, 0xC0010114), ("svm", 0xC0010114, M.IA32_FEATURE_CONTROL)):
        kvm = nestvisor.Kvm(profile=profile)
        index = kvm.get_msr_index_list()
        assert M.IA32_TSC in index and M.EFER in index and present in index and absent not in index
        vcpu = kvm.create_vm().create_vcpu(0)
        values = vcpu.get_msrs(index)
        assert list(values) == index   # KVM_GET_MSRS reads every listed MSR
        assert vcpu.set_msrs(values) == len(index)   # ... and KVM_SET_MSRS writes them back


def test_vcpu_state_round_trip_through_a_file(tmp_path):
    _, vcpu = _vcpu()
    vcpu.set_xsave(_fxsave_sample(vcpu.get_xsave()))
    vcpu.interrupt(0x30)
    vcpu.interrupt(0x31)
    state = vcpu.save_state()
    assert state.engine.ext_interrupts == [0x30, 0x31] and state.events.interrupt_nr == 0x30
    snapfile.save(tmp_path / "vcpu.nvs", state)
    loaded = snapfile.load(tmp_path / "vcpu.nvs", VcpuState)
    assert loaded == state
    _, fresh = _vcpu()
    fresh.load_state(loaded)
    assert fresh.save_state() == state


# ---- load order: what KVM refuses ------------------------------------------------------------

def test_svm_guest_mode_before_sregs_set_efer_svme_is_einval():
    _, vcpu = _vcpu("svm")
    ns = NS.NestedState(flags=U.KVM_STATE_NESTED_GUEST_MODE | U.KVM_STATE_NESTED_GIF_SET,
                        format=U.KVM_STATE_NESTED_FORMAT_SVM, size=NS.SVM_MAX_SIZE)
    with pytest.raises(KvmError) as e:
        vcpu.set_nested_state(ns.encode())
    assert e.value.errno == errno.EINVAL and "SVME" in str(e.value)
    # once SREGS has set EFER.SVME (KVM's load order) that rule passes; this blob's empty
    # vmcb12 then fails a later one
    s = vcpu.get_sregs()
    s.efer |= 1 << 12
    vcpu.set_sregs(s)
    with pytest.raises(KvmError) as e:
        vcpu.set_nested_state(ns.encode())
    assert e.value.errno == errno.EINVAL and "SVME" not in str(e.value)


@needs_as
def test_vmx_nested_state_before_sregs_is_einval():
    """KVM checks vmcs12's host state against the vCPU's EFER.LMA as loaded: with L2's SREGS
    not yet set (a fresh vCPU in real mode) a 64-bit host fails; in KVM's order it loads."""
    out = bytearray()
    m = Machine(build("vmxdemo"), serial_out=out.extend)
    _run_to(m, out, Stage("l2", _in_l2(3), 101, 34_000))
    snap = m.vm.snapshot()
    state = snap.vcpus[0]
    vm = nestvisor.Kvm(profile="vmx").create_vm()
    for img in snap.slots:
        vm.set_user_memory_region(img.slot, img.guest_phys_addr, img.memory_size)
        for off, data in img.runs:
            vm.memory(img.guest_phys_addr + off, len(data))[:] = data
    vcpu = vm.create_vcpu(0)
    with pytest.raises(KvmError) as e:
        vcpu.set_nested_state(state.nested_state)
    assert e.value.errno == errno.EINVAL and "vmx_set_nested_state" in str(e.value)
    assert not vcpu.nested.guest_mode   # a refused blob changes nothing
    vcpu.load_state(state)
    assert vcpu.nested.guest_mode and vcpu.get_regs() == state.regs


def test_load_state_refuses_a_state_of_another_shape():
    _, vmx = _vcpu("vmx")
    _, base = _vcpu("base")
    with pytest.raises(KvmError) as e:
        base.load_state(vmx.save_state())
    assert e.value.errno == errno.EINVAL
    with pytest.raises(KvmError):
        nestvisor.Kvm(profile="svm").restore_vm(vmx.vm.snapshot())


# ---- the envelope -----------------------------------------------------------------------------

def test_envelope_is_checked_before_decoding(tmp_path):
    _, vcpu = _vcpu()
    good = snapfile.encode(vcpu.vm.snapshot())
    assert isinstance(snapfile.decode(good, VmSnapshot), VmSnapshot)
    cases = {
        "magic": b"X" + good[1:],
        "version": good[:8] + struct.pack("<I", snapfile.VERSION + 1) + good[12:],
        "crc32": good[:-1] + bytes((good[-1] ^ 1,)),
        "size": good[:-1],
        "flags": good[:12] + struct.pack("<I", 0x80) + good[16:],
    }
    for field, data in cases.items():
        with pytest.raises(snapfile.SnapshotError, match=f"envelope.{field}"):
            snapfile.decode(data, VmSnapshot)
    with pytest.raises(snapfile.SnapshotError, match="limit"):
        snapfile.decode(good, VmSnapshot, max_size=16)
    with pytest.raises(snapfile.SnapshotError, match="payload.kind"):
        snapfile.decode(good, MachineSnapshot)
    # a valid envelope around a document of the wrong shape: the field path is named
    state = vcpu.save_state()
    state.regs.rip = "x"   # type: ignore[assignment]
    with pytest.raises(snapfile.SnapshotError, match=r"VcpuState\.regs\.rip: expected int"):
        snapfile.decode(snapfile.encode(state), VcpuState)


# ---- state_test: named stages, save -> fresh machine -> restore -> compare -------------------------

@dataclass(frozen=True)
class Stage:
    name: str
    reached: Callable[[Machine, bytes], bool]
    step: int = 10_000
    start: int = 0   # where to begin looking (virtual ns), for stages late in the run


def _after(marker: str) -> Callable[[Machine, bytes], bool]:
    return lambda m, out: marker.encode() in out


def _in_l2(exits: int) -> Callable[[Machine, bytes], bool]:
    def reached(m: Machine, out: bytes) -> bool:
        nested = m.vcpus[0].nested
        return nested.guest_mode and nested.stats["exits"] >= exits
    return reached


def _run_to(m: Machine, out: bytearray, stage: Stage) -> None:
    """Run in short slices until the stage is reached (the machine is still running)."""
    clock = stage.start
    if clock:
        m.run(max_instructions=clock)
    while not stage.reached(m, bytes(out)):
        clock += stage.step
        result = m.run(max_instructions=clock)
        assert result.reason == "instruction limit", f"{stage.name} not reached: {result}"


def _check_restore(tmp_path, name: str, stage: Stage, smp: int = 1) -> MachineSnapshot:
    """Save at `stage`, run on; restore the file into a fresh machine and run it: the same
    serial output from the stage on, the same status and final clock. Returns the snapshot."""
    out = bytearray()
    m = Machine(build(name), smp=smp, serial_out=out.extend)
    _run_to(m, out, stage)
    path = tmp_path / f"{name}-{stage.name}.nvs"
    m.save(path)
    done = len(out)
    original = m.run(max_instructions=LIMIT)
    rest = bytearray()
    restored = Machine.load(path, serial_out=rest.extend)
    again = restored.run(max_instructions=LIMIT)
    assert bytes(rest) == bytes(out[done:]), stage.name
    assert (again.status, again.reason, again.clock) == (original.status, original.reason, original.clock)
    assert original.status == 1, out.decode()
    return snapfile.load(path, MachineSnapshot)


SELFTEST_STAGES = [
    Stage("first-line", _after("ok 1 -"), 2_000),
    Stage("msrs-done", _after("ok 21 -"), 5_000),
    Stage("apic-timer-armed", _after("ok 29 -"), 500_000),   # halted, the one-shot timer running
    Stage("periodic-timer", _after("ok 30 -"), 20_000),
]


@needs_as
@pytest.mark.parametrize("stage", SELFTEST_STAGES, ids=lambda s: s.name)
def test_selftest_restores_at_each_stage(tmp_path, stage):
    _check_restore(tmp_path, "selftest", stage)


@needs_as
@pytest.mark.parametrize("stage", [
    # the AP phase is the last 10 us of virtual time: INIT, SIPI, then IPIs both ways
    Stage("ap-init-received", lambda m, out: m.vcpus[1].mp_state == U.KVM_MP_STATE_INIT_RECEIVED, 200, 10_220_000),
    Stage("ap-online", _after("ok 33 -"), 200, 10_220_000),
    Stage("ipi-delivered", lambda m, out: m.vcpus[1].stats["deliver_80"] >= 1, 200, 10_220_000),
], ids=lambda s: s.name)
def test_selftest_two_vcpus_restores(tmp_path, stage):
    _check_restore(tmp_path, "selftest", stage, smp=2)


@needs_as
@pytest.mark.parametrize("name, stage", [
    ("vmxdemo", Stage("l2-first-exits", _in_l2(3), 101, 34_000)),
    ("vmxdemo", Stage("l2-after-vmcalls", _in_l2(600), 101, 80_000)),
    ("vmxtest", Stage("l2-running", _in_l2(1), 1_001, 90_000)),
    ("vmxtest", Stage("l2-later", _in_l2(1), 1_001, 115_000)),
], ids=lambda x: x if isinstance(x, str) else x.name)
def test_nested_vmx_restores_while_l2_runs(tmp_path, name, stage):
    snap = _check_restore(tmp_path, name, stage)
    blob = snap.vm.vcpus[0].nested_state
    assert blob is not None and NS.NestedState.decode(blob).flags & U.KVM_STATE_NESTED_GUEST_MODE


@needs_as
def test_l1_context_kept_while_l2_runs():
    """What the architecture shares between L1 and L2 but nestvisor keeps per context
    (x87/SSE, XCR0, ...) comes back in L1's context, where the nested exit does not reload it."""
    out = bytearray()
    m = Machine(build("vmxdemo"), serial_out=out.extend)
    _run_to(m, out, Stage("l2", _in_l2(3), 101, 34_000))
    l1 = m.vcpus[0].ctx01
    marker = _fxsave_sample(fpu.read_fxsave(l1))
    fpu.write_fxsave(l1, marker)   # as if L1 had used SSE before VMLAUNCH
    fpu.write_xcr0(l1, 1)
    restored = m.kvm.restore_vm(m.vm.snapshot()).vcpus[0]
    assert restored.nested.guest_mode
    assert fpu.read_fxsave(restored.ctx01) == marker and fpu.read_xcr0(restored.ctx01) == 1
    assert restored.ctx01.cpu_msr(M.EFER) == l1.cpu_msr(M.EFER)
    assert restored.get_xsave() == m.vcpus[0].get_xsave() and restored.get_regs() == m.vcpus[0].get_regs()


@needs_as
def test_restore_in_another_process(tmp_path):
    out = bytearray()
    m = Machine(build("vmxdemo"), serial_out=out.extend)
    _run_to(m, out, Stage("l2", _in_l2(300), 101, 56_000))
    path = tmp_path / "vmxdemo.nvs"
    m.save(path)
    done = len(out)
    original = m.run(max_instructions=LIMIT)
    script = textwrap.dedent("""
        import json, sys
        from nestvisor.platform.machine import Machine
        out = bytearray()
        r = Machine.load(sys.argv[1], serial_out=out.extend).run(max_instructions=int(sys.argv[2]))
        print(json.dumps({"status": r.status, "reason": r.reason, "clock": r.clock, "out": out.decode()}))
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(path), str(LIMIT)],
                          capture_output=True, text=True, timeout=300, check=True)
    got = json.loads(proc.stdout.splitlines()[-1])
    assert got == {"status": original.status, "reason": original.reason, "clock": original.clock,
                   "out": out[done:].decode()}
