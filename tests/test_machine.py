"""Machine and `nestvisor run` against a scripted fake of the KVM-shaped API (notes/spec.md)."""

import struct
from types import SimpleNamespace

import pytest
from elfbuild import elf32, mb_header

uapi = pytest.importorskip("nestvisor.arch.kvm_uapi")

from nestvisor import cli  # noqa: E402
from nestvisor.platform import firmware as fw  # noqa: E402
from nestvisor.platform import machine as m  # noqa: E402
from nestvisor.platform.multiboot import BootError  # noqa: E402

KBASE = 0x400000
LOW_FAKE = 16 << 20  # the fake VM backs only the first 16 MiB


def io_exit(port, size, value=0, out=True, count=1):
    data = bytearray(value.to_bytes(size, "little") * count) if out else bytearray(size * count)
    return SimpleNamespace(reason=uapi.KVM_EXIT_IO, io=SimpleNamespace(
        direction=uapi.KVM_EXIT_IO_OUT if out else uapi.KVM_EXIT_IO_IN,
        size=size, port=port, count=count, data=data))


def simple(reason, **kw):
    return SimpleNamespace(reason=getattr(uapi, reason), **kw)


class FakeVcpu:
    """Returns the scripted exits; when the script is empty, runs to run_until (KVM_EXIT_INTR)."""

    def __init__(self, vcpu_id, script):
        self.id = vcpu_id
        self.script = list(script)
        self.clock = 0
        self.run_until = 0
        self.slices = []
        self.seen = []
        self.sregs = SimpleNamespace(cs=SimpleNamespace(selector=0xF000, base=0xFFFF0000))
        self.regs = SimpleNamespace(rip=0xFFF0, rflags=2, rax=0)

    def get_sregs(self):
        return self.sregs

    def set_sregs(self, s):
        self.sregs = s

    def get_regs(self):
        return self.regs

    def set_regs(self, r):
        self.regs = r

    def run(self):
        self.slices.append(self.run_until)
        if self.script:
            ex = self.script.pop(0)
            if isinstance(ex, BaseException):
                raise ex
            if callable(ex):
                ex = ex()   # an exit with a side effect (an IPI sent during the slice)
            self.seen.append(ex)
            return ex
        self.clock = max(self.clock, self.run_until)
        return simple("KVM_EXIT_INTR")


class FakeVm:
    def __init__(self, scripts):
        self.ram = bytearray(LOW_FAKE)
        self.slots = []
        self.scripts = scripts
        self.vcpus = []
        self.kicks = 0

    def set_user_memory_region(self, slot, gpa, size, flags=0):
        self.slots.append((slot, gpa, size))

    def memory(self, gpa, size):
        return memoryview(self.ram)[gpa:gpa + size]

    def create_vcpu(self, vcpu_id):
        self.vcpus.append(FakeVcpu(vcpu_id, self.scripts.get(vcpu_id, [])))
        return self.vcpus[-1]


class FakeKvm:
    def __init__(self, scripts):
        self.scripts = scripts
        self.kwargs = None
        self.vm = None

    def __call__(self, **kwargs):
        self.kwargs = kwargs
        return self

    def create_vm(self):
        self.vm = FakeVm(self.scripts)
        return self.vm


@pytest.fixture
def kernel(tmp_path):
    code = mb_header() + b"\xf4"
    path = tmp_path / "k.flat"
    path.write_bytes(elf32([(KBASE, KBASE, code, len(code) + 0x100)], KBASE + 12))
    return path


def make(kernel, scripts=None, **kw):
    out = []
    fake = FakeKvm(scripts or {})
    mach = m.Machine(kernel, serial_out=out.append, kvm_factory=fake, **kw)
    return mach, fake, out


def test_boot_places_stub_and_bsp(kernel):
    mach, fake, _ = make(kernel, append="a b", cpu_features={"x2apic": True}, profile="svm")
    vm = fake.vm
    assert fake.kwargs == {"profile": "svm", "features": {"x2apic": True}}
    assert vm.slots == [(0, 0, 128 << 20)]
    stub = fw.build_stub(mach.boot.mbi_addr, KBASE + 12)
    assert bytes(vm.ram[fw.STUB_ADDR:fw.STUB_ADDR + len(stub)]) == stub
    bsp = vm.vcpus[0]
    assert (bsp.sregs.cs.selector, bsp.sregs.cs.base, bsp.regs.rip) == (0, 0, fw.STUB_ADDR)
    cmdline_addr = struct.unpack_from("<I", vm.ram, mach.boot.mbi_addr + 16)[0]
    end = vm.ram.index(0, cmdline_addr)
    assert bytes(vm.ram[cmdline_addr:end]) == f"{kernel} a b".encode()


def test_4g_is_split_around_the_pci_hole(kernel):
    _, fake, _ = make(kernel, memory=4 << 30)
    assert fake.vm.slots == [(0, 0, 3 << 30), (1, 4 << 30, 1 << 30)]


def test_serial_then_debug_exit(kernel):
    script = [io_exit(0x3F8, 1, ord("h")), io_exit(0x3F8, 1, ord("i")), io_exit(0xF4, 4, 1)]
    mach, _, out = make(kernel, {0: script})
    result = mach.run()
    assert (result.status, result.reason) == (3, "debug-exit")
    assert b"".join(out) == b"hi"


def test_an_event_sent_to_a_halted_vcpu_keeps_the_machine_running(kernel):
    # vCPU 0 halts; vCPU 1, later in the same round, sends it an IPI and halts: vCPU 0 gets
    # another turn (it writes debug-exit) instead of the machine stopping as all halted
    fake_kvm = {}

    def ipi_then_hlt():
        fake_kvm["kvm"].vm.kicks += 1
        return simple("KVM_EXIT_HLT")

    scripts = {0: [simple("KVM_EXIT_HLT"), io_exit(0xF4, 4, 2)], 1: [ipi_then_hlt, simple("KVM_EXIT_HLT")]}
    mach, fake, _ = make(kernel, scripts, smp=2)
    fake_kvm["kvm"] = fake
    result = mach.run()
    assert (result.status, result.reason) == (5, "debug-exit")


def test_in_from_fw_cfg_and_unassigned(kernel):
    nb = io_exit(0x511, 1, out=False)
    unassigned = io_exit(0x5000, 2, out=False, count=2)
    mmio = simple("KVM_EXIT_MMIO", mmio=SimpleNamespace(phys_addr=0xFEC00000, len=4,
                                                         data=bytearray(8), is_write=False))
    script = [io_exit(0x510, 2, 5), nb, unassigned, mmio, io_exit(0xF4, 4, 0)]
    mach, _, _ = make(kernel, {0: script}, smp=3)
    assert mach.run().status == 1
    assert nb.io.data == bytearray([3])  # FW_CFG_NB_CPUS low byte
    assert unassigned.io.data == bytearray(b"\xff" * 4)
    assert mmio.mmio.data == bytearray(b"\xff" * 4 + bytes(4))
    assert mach.unassigned_mmio[0xFEC00000] == 1


@pytest.mark.parametrize("exits, reason", [
    ([simple("KVM_EXIT_SHUTDOWN")], "shutdown (triple fault)"),
    ([simple("KVM_EXIT_INTERNAL_ERROR",
             internal=SimpleNamespace(suberror=1, message="emulation failed at 0x1234"))],
     "internal error: emulation failed at 0x1234"),
    ([RuntimeError("boom")], "internal error: RuntimeError: boom"),
    ([simple("KVM_EXIT_HLT")], "all vCPUs halted"),
    ([simple("KVM_EXIT_SYSTEM_EVENT", system_event=SimpleNamespace(type=2))], "system event reset"),
    ([simple("KVM_EXIT_FAIL_ENTRY")], "internal error: unexpected exit KVM_EXIT_FAIL_ENTRY: "),
])
def test_stop_reasons(kernel, exits, reason):
    mach, _, _ = make(kernel, {0: exits})
    result = mach.run()
    assert result.status == 0 and result.reason.startswith(reason)


def test_single_vcpu_runs_one_long_slice(kernel):
    mach, fake, _ = make(kernel, {0: [io_exit(0x80, 1, 0), io_exit(0xF4, 4, 0)]})
    mach.run()
    assert fake.vm.vcpus[0].slices == [m.FAR_FUTURE] * 2


def test_round_robin_rounds_and_instruction_limit(kernel):
    mach, fake, _ = make(kernel, smp=2)
    result = mach.run(max_instructions=50_000)
    assert result.reason == "instruction limit" and result.clock == 50_000
    q = m.QUANTUM_NS
    for vcpu in fake.vm.vcpus:
        assert vcpu.slices == [*range(q, 50_000, q), 50_000]


def test_halted_vcpu_does_not_stop_the_others(kernel):
    # vCPU 1 halts for good in round 1; vCPU 0 keeps running and then exits.
    scripts = {0: [simple("KVM_EXIT_INTR"), io_exit(0xF4, 4, 5)], 1: [simple("KVM_EXIT_HLT")]}
    mach, _, _ = make(kernel, scripts, smp=2)
    assert mach.run().status == 11


def test_missing_and_bad_kernels(tmp_path):
    with pytest.raises(BootError, match="could not load kernel '.*nope': No such file"):
        m.Machine(tmp_path / "nope", kvm_factory=FakeKvm({}))
    bad = tmp_path / "bad"
    bad.write_bytes(b"hello")
    with pytest.raises(BootError, match="no multiboot header"):
        m.Machine(bad, kvm_factory=FakeKvm({}))
    with pytest.raises(BootError, match="smp"):
        m.Machine(bad, smp=0, kvm_factory=FakeKvm({}))


def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
    assert cli.main(["run", str(tmp_path / "nope")]) == 2
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x7fELF\x01\x01\x01" + bytes(9) + mb_header())
    assert cli.main(["run", str(bad)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("nestvisor: error: ") for line in err)
    assert "No such file or directory" in err[0] and "not a valid ELF" in err[1]
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", str(bad), "-m", "lots"])
    assert exc.value.code == 2
