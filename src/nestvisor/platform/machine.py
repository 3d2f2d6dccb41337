"""A PC around the vCPUs: RAM, a multiboot kernel, the firmware stub, the legacy devices,
and a deterministic scheduler that runs the vCPUs and answers their exits.

The machine is a KVM VMM in miniature (the shape of kvmtool or QEMU's kvm-all.c run loop):
it creates the VM through the KVM-shaped API, sets the BSP's registers to the firmware stub,
and services KVM_EXIT_IO / KVM_EXIT_MMIO itself.

Scheduling (DESIGN decision 3, determinism): time is each vCPU's virtual clock (1 instruction
= 1 ns). The run is a sequence of rounds of QUANTUM_NS (shorter after an IPI, longer while
every vCPU waits); in each round every vCPU runs, in vCPU-id order, until its clock reaches the
round's end (KVM_EXIT_INTR) or it can go no further. The same kernel and options therefore
always give the same interleaving.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nestvisor.arch import kvm_uapi as uapi
from nestvisor.kvm import snapfile
from nestvisor.kvm.snapshot import VmSnapshot
from nestvisor.platform.debug_exit import DEBUG_EXIT_BASE, DEBUG_EXIT_SIZE, DebugExit
from nestvisor.platform.firmware import STUB_ADDR, build_stub, enter_stub
from nestvisor.platform.fw_cfg import FW_CFG_PORT_SEL, FwCfg
from nestvisor.platform.multiboot import BootError, BootInfo, Module, kernel_cmdline, load_multiboot
from nestvisor.platform.pic import MASTER_BASE, SLAVE_BASE, PicPair, PicState
from nestvisor.platform.pio import PioBus
from nestvisor.platform.serial import COM1_BASE, COM1_PORTS, Serial16550, SerialState

MiB = 1 << 20
GiB = 1 << 30
DEFAULT_MEMORY = 128 * MiB  # QEMU's default -m
QUANTUM_NS = 5_000  # one scheduler round, in virtual ns (= guest instructions)
# After a round in which one vCPU sent another an interrupt, rounds are this short, so the
# answer (an IPI handshake, a counter the sender polls) comes back after a few hundred
# instructions instead of a whole round of the target's. Deterministic: it depends only on
# what the guest did.
IPI_QUANTUM_NS = 500
# While every vCPU only waits (halted, or spinning on PAUSE), rounds double up to this, so a
# guest polling the TSC for a deadline costs a few rounds instead of hundreds. Any real work
# resets the round to QUANTUM_NS. Deterministic: it depends only on what the guest did.
IDLE_QUANTUM_MAX_NS = 1_000_000
FAR_FUTURE = 1 << 62  # the slice of a lone vCPU: nothing else needs the time
MAX_VCPUS = 255  # xAPIC IDs are 8 bits and 0xff is broadcast (SDM 10.6.2.1)

# QEMU hw/i386/pc_piix.c: with -m >= 0xe0000000 only 3 GiB stay below 4 GiB (gigabyte_align),
# leaving the PCI hole (where the IOAPIC, HPET and local APIC live); the rest starts at 4 GiB.
LOWMEM_SPLIT_THRESHOLD = 0xE0000000
LOWMEM_SPLIT = 0xC0000000
HIGHMEM_BASE = 4 * GiB

REASON_DEBUG_EXIT = "debug-exit"
REASON_SHUTDOWN = "shutdown (triple fault)"
REASON_HALTED = "all vCPUs halted"
REASON_LIMIT = "instruction limit"


@dataclass
class MachineResult:
    """Why the machine stopped. `status` is the debug-exit status, else 0 (QEMU's exit code)."""

    status: int
    reason: str
    clock: int = 0  # the furthest vCPU clock, virtual ns
    exception: BaseException | None = field(default=None, repr=False)


@dataclass
class MachineSnapshot:
    """A whole machine between runs: its configuration, the devices' state and the VM's
    (memory, vCPUs). The serial output already sent is not part of it: it left the machine.
    There is no PIT or IOAPIC on this PC, and the local APICs travel with their vCPUs."""

    smp: int
    memory: int
    kernel: str   # what it booted, for the record; a restore loads no kernel
    debug_exit: tuple[int, int] | None
    debug_exit_status: int | None
    serial: SerialState
    pic_master: PicState
    pic_slave: PicState
    fw_cfg_selector: int
    fw_cfg_offset: int
    vm: VmSnapshot


class StdoutSink:
    """Serial output to the process's stdout, flushed at each newline."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream if stream is not None else sys.stdout.buffer

    def __call__(self, data: bytes) -> None:
        self.stream.write(data)
        if b"\n" in data:
            self.stream.flush()

    def flush(self) -> None:
        self.stream.flush()


def ram_layout(memory: int) -> list[tuple[int, int]]:
    """The RAM regions (start, size) of a PC with `memory` bytes."""
    if memory >= LOWMEM_SPLIT_THRESHOLD:
        return [(0, LOWMEM_SPLIT), (HIGHMEM_BASE, memory - LOWMEM_SPLIT)]
    return [(0, memory)]


class _StagedRam:
    """multiboot.GuestRam that records the writes, so a bad kernel is refused before any VM
    exists; `commit` then copies them into the VM's memory slots."""

    def __init__(self, regions: Sequence[tuple[int, int]]) -> None:
        self.regions = list(regions)
        self.writes: list[tuple[int, bytes]] = []

    def write(self, gpa: int, data: bytes) -> None:
        if data:
            self.writes.append((gpa, bytes(data)))

    def commit(self, vm: Any) -> None:
        for gpa, data in self.writes:
            vm.memory(gpa, len(data))[:] = data
        self.writes.clear()


def _read_file(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else str(e)
        raise BootError(f"could not load {what} '{path}': {reason}") from None


class Machine:
    """A PC with `smp` vCPUs booting a multiboot kernel.

    Errors in what the caller asked for (missing or malformed kernel, bad sizes) raise
    BootError with one sentence; nothing the guest does raises.
    """

    def __init__(
        self,
        kernel: str | os.PathLike[str],
        *,
        smp: int = 1,
        memory: int = DEFAULT_MEMORY,
        append: str = "",
        initrd: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
        profile: str = "vmx",
        cpu_features: dict[str, Any] | None = None,
        serial_out: Callable[[bytes], object] | None = None,
        debug_exit: tuple[int, int] | None = (DEBUG_EXIT_BASE, DEBUG_EXIT_SIZE),
        kvm_factory: Callable[..., Any] | None = None,
    ) -> None:
        if not 1 <= smp <= MAX_VCPUS:
            raise BootError(f"smp must be between 1 and {MAX_VCPUS}, not {smp}")
        if memory < 2 * MiB or memory % 4096:
            raise BootError(f"memory must be a multiple of 4 KiB and at least 2 MiB, not {memory}")
        self.kernel_path = os.fspath(kernel)
        self.smp = smp
        self.memory = memory
        self.serial_out = serial_out if serial_out is not None else StdoutSink()

        image = _read_file(self.kernel_path, "kernel")
        modules = [self._module(spec) for spec in self._initrd_list(initrd)]
        self.regions = ram_layout(memory)
        ram = _StagedRam(self.regions)
        boot = load_multiboot(image, ram, cmdline=kernel_cmdline(self.kernel_path, append), modules=modules)
        self.boot: BootInfo | None = boot  # None in a machine made by restore()
        ram.write(STUB_ADDR, build_stub(boot.mbi_addr, boot.entry))

        if kvm_factory is None:
            from nestvisor.kvm.kvm import Kvm as kvm_factory
        kwargs: dict[str, Any] = {"profile": profile}
        if cpu_features:
            kwargs["features"] = dict(cpu_features)
        try:
            self.kvm = kvm_factory(**kwargs)
        except (ValueError, OSError) as e:  # e.g. an unknown profile: the caller's mistake
            raise BootError(f"cannot create the virtual machine: {e}") from None
        self.vm = self.kvm.create_vm()
        for slot, (gpa, size) in enumerate(self.regions):
            self.vm.set_user_memory_region(slot, gpa, size)
        ram.commit(self.vm)

        self.vcpus = [self.vm.create_vcpu(i) for i in range(smp)]
        enter_stub(self.vcpus[0])  # APs wait for INIT/SIPI, as after a real reset
        self.debug_exit_range = debug_exit
        self._attach_devices()

    def _attach_devices(self) -> None:
        """The legacy devices on the port bus, in their power-on state."""
        debug_exit, memory, smp = self.debug_exit_range, self.memory, self.smp
        self.bus = PioBus()
        self.serial = Serial16550(self.serial_out)
        self.bus.register(self.serial, COM1_BASE, COM1_PORTS)
        self.debug_exit: DebugExit | None = None
        if debug_exit is not None:
            self.debug_exit = DebugExit(*debug_exit)
            self.bus.register(self.debug_exit, debug_exit[0], debug_exit[1])
        self.fw_cfg = FwCfg(ram_size=memory, nb_cpus=smp)
        self.bus.register(self.fw_cfg, FW_CFG_PORT_SEL, 2)
        self.pic = PicPair()
        self.bus.register(self.pic, MASTER_BASE, 2)
        self.bus.register(self.pic, SLAVE_BASE, 2)
        self.unassigned_mmio: Counter[int] = Counter()

    # --- snapshots -----------------------------------------------------------------------------

    def snapshot(self) -> MachineSnapshot:
        """The machine's state between two run() calls (platform devices + Vm.snapshot())."""
        return MachineSnapshot(
            self.smp, self.memory, self.kernel_path, self.debug_exit_range,
            self.debug_exit.status if self.debug_exit is not None else None,
            self.serial.save(), self.pic.master.save(), self.pic.slave.save(),
            self.fw_cfg.selector, self.fw_cfg.offset, self.vm.snapshot(),
        )

    @classmethod
    def restore(
        cls,
        snap: MachineSnapshot,
        *,
        serial_out: Callable[[bytes], object] | None = None,
        kvm_factory: Callable[..., Any] | None = None,
    ) -> Machine:
        """A fresh machine in `snap`'s state (kvm.restore_vm for the VM, then the devices);
        run() continues where the snapshot's machine stood."""
        m = cls.__new__(cls)
        m.kernel_path, m.smp, m.memory = snap.kernel, snap.smp, snap.memory
        m.serial_out = serial_out if serial_out is not None else StdoutSink()
        m.regions = ram_layout(snap.memory)
        m.boot = None
        if kvm_factory is None:
            from nestvisor.kvm.kvm import Kvm as kvm_factory
        m.kvm = kvm_factory(profile=snap.vm.profile, features=dict(snap.vm.features))
        m.vm = m.kvm.restore_vm(snap.vm)
        m.vcpus = list(m.vm.vcpus.values())
        if len(m.vcpus) != snap.smp:
            raise BootError(f"the snapshot has {len(m.vcpus)} vCPUs, its machine {snap.smp}")
        m.debug_exit_range = snap.debug_exit
        m._attach_devices()
        if m.debug_exit is not None:
            m.debug_exit.status = snap.debug_exit_status
        m.serial.restore(snap.serial)
        m.pic.master.restore(snap.pic_master)
        m.pic.slave.restore(snap.pic_slave)
        m.fw_cfg.selector, m.fw_cfg.offset = snap.fw_cfg_selector, snap.fw_cfg_offset
        return m

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write snapshot() to a file (kvm/snapfile.py's envelope: magic, version, CRC32)."""
        snapfile.save(path, self.snapshot())

    @classmethod
    def load(cls, path: str | os.PathLike[str], **kwargs: Any) -> Machine:
        """restore() from a file written by save(); the envelope is checked before decoding."""
        return cls.restore(snapfile.load(path, MachineSnapshot), **kwargs)

    @staticmethod
    def _initrd_list(initrd: Any) -> list[str]:
        if initrd is None:
            return []
        if isinstance(initrd, (str, os.PathLike)):
            return [os.fspath(initrd)]
        return [os.fspath(p) for p in initrd]

    @staticmethod
    def _module(spec: str) -> Module:
        # QEMU multiboot.c: a module is "FILE [ARGS]"; the whole text is the module's string.
        path = spec.split(" ", 1)[0]
        return Module(spec, _read_file(path, "initrd"))

    # --- running ------------------------------------------------------------------------------

    def run(self, max_instructions: int | None = None) -> MachineResult:
        """Run until the guest writes debug-exit, shuts down, halts for good, or the limit.

        `max_instructions` bounds each vCPU's clock (virtual ns: instructions plus halted time).
        """
        try:
            return self._run(max_instructions)
        finally:
            flush = getattr(self.serial_out, "flush", None)
            if flush is not None:
                flush()

    def _clock(self) -> int:
        return max(v.clock for v in self.vcpus)

    def _stop(self, status: int, reason: str, exc: BaseException | None = None) -> MachineResult:
        return MachineResult(status, reason, self._clock(), exc)

    def _run(self, limit: int | None) -> MachineResult:
        quantum = FAR_FUTURE if len(self.vcpus) == 1 else QUANTUM_NS
        round_end = self._clock()
        while True:
            round_end += quantum
            kicks = self.vm.kicks
            if limit is not None:
                round_end = min(round_end, limit)
            halted = 0
            for vcpu in self.vcpus:
                vcpu.run_until = round_end
                outcome = self._run_slice(vcpu)
                if isinstance(outcome, MachineResult):
                    return outcome
                halted += outcome
            # a vCPU that halted earlier in the round may have been sent an event since
            if halted == len(self.vcpus) and self.vm.kicks == kicks:
                return self._stop(0, REASON_HALTED)
            if limit is not None and round_end >= limit:
                return self._stop(0, REASON_LIMIT)
            if len(self.vcpus) > 1:
                if self.vm.kicks != kicks:
                    quantum = IPI_QUANTUM_NS
                elif all(getattr(v, "idle_slice", False) for v in self.vcpus):
                    quantum = min(quantum * 2, IDLE_QUANTUM_MAX_NS)
                else:
                    quantum = QUANTUM_NS

    def _run_slice(self, vcpu: Any) -> MachineResult | int:
        """Run one vCPU to the end of its slice; 1 if it halted for good, 0 if its time is up."""
        while True:
            try:
                ex = vcpu.run()
            except Exception as e:  # DESIGN decision 4: an engine failure is reported, not raised
                return self._stop(0, f"internal error: {type(e).__name__}: {e}", e)
            reason = ex.reason
            if reason == uapi.KVM_EXIT_INTR:
                return 0
            if reason == uapi.KVM_EXIT_IO:
                self._pio(ex.io)
                if self.debug_exit is not None and self.debug_exit.status is not None:
                    return self._stop(self.debug_exit.status, REASON_DEBUG_EXIT)
            elif reason == uapi.KVM_EXIT_MMIO:
                self._mmio(ex.mmio)
            elif reason == uapi.KVM_EXIT_HLT:
                return 1
            elif reason == uapi.KVM_EXIT_SHUTDOWN:
                return self._stop(0, REASON_SHUTDOWN)
            elif reason == uapi.KVM_EXIT_INTERNAL_ERROR:
                return self._stop(0, f"internal error: {_describe(ex)}")
            elif reason == uapi.KVM_EXIT_SYSTEM_EVENT:
                # QEMU --no-reboot: a reset or shutdown request ends the run.
                event = getattr(getattr(ex, "system_event", None), "type", "?")
                return self._stop(0, f"system event {_SYSTEM_EVENTS.get(event, event)}")
            else:
                name = uapi.EXIT_NAMES.get(reason, str(reason))
                return self._stop(0, f"internal error: unexpected exit {name}: {ex!r}")

    def _pio(self, io: Any) -> None:
        size, port, data = io.size, io.port, io.data
        for i in range(io.count):  # string I/O (INS/OUTS with REP) carries `count` elements
            lo, hi = i * size, (i + 1) * size
            if io.direction == uapi.KVM_EXIT_IO_OUT:
                self.bus.write(port, size, int.from_bytes(data[lo:hi], "little"))
                if self.debug_exit is not None and self.debug_exit.status is not None:
                    return
            else:
                data[lo:hi] = self.bus.read(port, size).to_bytes(size, "little")

    def _mmio(self, mmio: Any) -> None:
        # No MMIO device sits outside the vCPU (the local APIC is the kvm layer's): reads of
        # unassigned physical memory float high, writes are dropped (QEMU unassigned_mem_ops).
        self.unassigned_mmio[mmio.phys_addr] += 1
        if not mmio.is_write:
            mmio.data[: mmio.len] = b"\xff" * mmio.len


_SYSTEM_EVENTS = {
    uapi.KVM_SYSTEM_EVENT_SHUTDOWN: "shutdown",
    uapi.KVM_SYSTEM_EVENT_RESET: "reset",
    uapi.KVM_SYSTEM_EVENT_CRASH: "crash",
}


def _describe(ex: Any) -> str:
    """The text an internal-error exit carries (kvm exits.InternalError.message)."""
    internal = getattr(ex, "internal", None)
    message = getattr(internal, "message", None) or getattr(ex, "message", None)
    if message:
        return str(message)
    return repr(internal) if internal is not None else "no detail"
