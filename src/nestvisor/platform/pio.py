"""The port I/O bus: which device answers which port, and what answers when none does."""

from __future__ import annotations

from collections import Counter
from typing import Protocol


class PioDevice(Protocol):
    def pio_read(self, port: int, size: int) -> int: ...

    def pio_write(self, port: int, size: int, value: int) -> None: ...


class Unassigned:
    """No device: reads float high (all-ones), writes are dropped (QEMU unassigned_io_ops).

    Each access is counted by port so a run can report what the guest touched in vain.
    """

    def __init__(self) -> None:
        self.reads: Counter[int] = Counter()
        self.writes: Counter[int] = Counter()

    def pio_read(self, port: int, size: int) -> int:
        self.reads[port] += 1
        return (1 << (8 * size)) - 1

    def pio_write(self, port: int, size: int, value: int) -> None:
        self.writes[port] += 1


class PioBus:
    """Maps each port to one device; an access goes to the device that owns its first port."""

    def __init__(self) -> None:
        self.ports: dict[int, PioDevice] = {}
        self.unassigned = Unassigned()

    def register(self, device: PioDevice, base: int, count: int) -> None:
        for port in range(base, base + count):
            if port in self.ports:
                raise ValueError(f"I/O port {port:#x} is already assigned")
            self.ports[port] = device

    def device(self, port: int) -> PioDevice:
        return self.ports.get(port, self.unassigned)

    def read(self, port: int, size: int) -> int:
        return self.device(port).pio_read(port, size) & ((1 << (8 * size)) - 1)

    def write(self, port: int, size: int, value: int) -> None:
        self.device(port).pio_write(port, size, value & ((1 << (8 * size)) - 1))
