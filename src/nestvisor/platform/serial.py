"""COM1: a 16550 UART at 0x3f8-0x3ff that only transmits.

Register map and bits: National Semiconductor PC16550D datasheet, "Registers"; reset values as
QEMU hw/char/serial.c serial_reset. The guest polls LSR.THRE and then writes THR; every byte
written to THR goes to the sink at once, so the transmitter is always empty.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

COM1_BASE = 0x3F8
COM1_PORTS = 8

# Register offsets (PC16550D table 2). DLAB = LCR bit 7 selects DLL/DLM at offsets 0 and 1.
RBR_THR_DLL = 0
IER_DLM = 1
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

LCR_DLAB = 0x80
LSR_THRE = 0x20  # transmitter holding register empty
LSR_TEMT = 0x40  # transmitter empty
IIR_NO_INT = 0x01  # no interrupt pending
MSR_DCD_DSR_CTS = 0xB0  # QEMU serial_reset: carrier, data set ready, clear to send


@dataclass
class SerialState:
    """The UART's registers (what a snapshot keeps; the sink is the machine's)."""

    dll: int
    dlm: int
    ier: int
    fcr: int
    lcr: int
    mcr: int
    scr: int
    transmitted: int


class Serial16550:
    """Transmit-only 16550: THR bytes go to `sink`, nothing is ever received."""

    def __init__(self, sink: Callable[[bytes], object], base: int = COM1_BASE) -> None:
        self.sink = sink
        self.base = base
        self.dll = 0x0C  # QEMU serial_reset: divider 12 (9600 baud)
        self.dlm = 0
        self.ier = 0
        self.fcr = 0
        self.lcr = 0
        self.mcr = 0
        self.scr = 0
        self.transmitted = 0

    def pio_write(self, port: int, size: int, value: int) -> None:
        reg = port - self.base
        value &= 0xFF  # byte-wide registers
        dlab = self.lcr & LCR_DLAB
        if reg == RBR_THR_DLL:
            if dlab:
                self.dll = value
            else:
                self.transmitted += 1
                self.sink(bytes((value,)))
        elif reg == IER_DLM:
            if dlab:
                self.dlm = value
            else:
                self.ier = value & 0x0F  # PC16550D: IER bits 4-7 are always 0
        elif reg == IIR_FCR:
            self.fcr = value
        elif reg == LCR:
            self.lcr = value
        elif reg == MCR:
            self.mcr = value & 0x1F  # PC16550D: MCR bits 5-7 are always 0
        elif reg == SCR:
            self.scr = value
        # LSR and MSR are read-only (writes are "for factory test" on the 16550): ignored.

    def pio_read(self, port: int, size: int) -> int:
        reg = port - self.base
        dlab = self.lcr & LCR_DLAB
        if reg == RBR_THR_DLL:
            return self.dll if dlab else 0  # nothing is ever received
        if reg == IER_DLM:
            return self.dlm if dlab else self.ier
        if reg == IIR_FCR:
            return IIR_NO_INT
        if reg == LCR:
            return self.lcr
        if reg == MCR:
            return self.mcr
        if reg == LSR:
            return LSR_THRE | LSR_TEMT
        if reg == MSR:
            return MSR_DCD_DSR_CTS
        return self.scr

    def save(self) -> SerialState:
        return SerialState(self.dll, self.dlm, self.ier, self.fcr, self.lcr, self.mcr, self.scr, self.transmitted)

    def restore(self, st: SerialState) -> None:
        self.dll, self.dlm, self.ier, self.fcr = st.dll, st.dlm, st.ier, st.fcr
        self.lcr, self.mcr, self.scr, self.transmitted = st.lcr, st.mcr, st.scr, st.transmitted
