"""isa-debug-exit: a write ends the machine with process status (value << 1) | 1.

QEMU hw/misc/debugexit.c debug_exit_write: exit((val << 1) | 1). kvm-unit-tests' exit(code)
writes its code to port 0xf4 with iosize 4 (lib/x86: outl(code, 0xf4)), so PASS = 1, FAIL = 3,
SKIP = 77.
"""

from __future__ import annotations

DEBUG_EXIT_BASE = 0xF4
DEBUG_EXIT_SIZE = 4


class DebugExit:
    """Records the status; the machine checks `status` after each write and stops."""

    def __init__(self, base: int = DEBUG_EXIT_BASE, iosize: int = DEBUG_EXIT_SIZE) -> None:
        self.base = base
        self.iosize = iosize
        self.status: int | None = None

    def pio_write(self, port: int, size: int, value: int) -> None:
        value &= (1 << (8 * size)) - 1  # the access size bounds the value (QEMU: val is size bytes)
        self.status = (value << 1) | 1

    def pio_read(self, port: int, size: int) -> int:
        return (1 << (8 * size)) - 1  # QEMU debugexit has no read handler: unassigned, all-ones
