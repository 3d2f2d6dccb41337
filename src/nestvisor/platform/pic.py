"""The 8259A PIC pair at 0x20/0x21 (master) and 0xa0/0xa1 (slave), as far as guests program it.

Interrupt delivery goes through the local APIC; the PICs only remember what is written: the
initialization sequence (Intel 8259A datasheet, "Initialization Command Words") and the mask
register (OCW1). Reads of the command port give IRR or ISR per OCW3, both 0 here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MASTER_BASE = 0x20
SLAVE_BASE = 0xA0

ICW1_INIT = 0x10  # 8259A: a command-port write with D4 = 1 is ICW1
ICW1_IC4 = 0x01  # ICW4 needed
ICW1_SNGL = 0x02  # single PIC: no ICW3
OCW3_SELECT = 0x08  # D4 = 0, D3 = 1: OCW3 (D3 = 0: OCW2)
OCW3_RR = 0x02
OCW3_RIS = 0x01


@dataclass
class PicState:
    """One 8259A's programmed state, including an initialization sequence in progress."""

    imr: int = 0
    vector_base: int = 0
    icw3: int = 0
    icw4: int = 0
    read_isr: bool = False
    expect: list[str] = field(default_factory=list)


class Pic8259:
    """One 8259A."""

    def __init__(self, base: int) -> None:
        self.base = base
        self.imr = 0
        self.vector_base = 0
        self.icw3 = 0
        self.icw4 = 0
        self.read_isr = False
        self._expect: list[str] = []  # ICWs still due after ICW1

    def pio_write(self, port: int, size: int, value: int) -> None:
        value &= 0xFF
        if port == self.base:
            if value & ICW1_INIT:
                # 8259A: ICW1 clears the mask register and starts the ICW sequence.
                self.imr = 0
                self._expect = ["icw2"]
                if not value & ICW1_SNGL:
                    self._expect.append("icw3")
                if value & ICW1_IC4:
                    self._expect.append("icw4")
            elif value & OCW3_SELECT and value & OCW3_RR:
                self.read_isr = bool(value & OCW3_RIS)
            # OCW2 (EOI, rotation) has nothing to act on: no interrupt is ever in service.
            return
        if self._expect:
            step = self._expect.pop(0)
            if step == "icw2":
                self.vector_base = value & 0xF8  # 8259A in 8086 mode: T7-T3
            elif step == "icw3":
                self.icw3 = value
            else:
                self.icw4 = value
            return
        self.imr = value  # OCW1

    def save(self) -> PicState:
        return PicState(self.imr, self.vector_base, self.icw3, self.icw4, self.read_isr, list(self._expect))

    def restore(self, st: PicState) -> None:
        if any(step not in ("icw2", "icw3", "icw4") for step in st.expect):
            raise ValueError(f"pic state: unknown initialization steps {st.expect}")
        self.imr, self.vector_base, self.icw3, self.icw4 = st.imr, st.vector_base, st.icw3, st.icw4
        self.read_isr, self._expect = st.read_isr, list(st.expect)

    def pio_read(self, port: int, size: int) -> int:
        if port == self.base:
            return 0  # IRR or ISR: nothing requested, nothing in service
        return self.imr


class PicPair:
    """Master and slave, dispatched by port."""

    PORTS = (MASTER_BASE, MASTER_BASE + 1, SLAVE_BASE, SLAVE_BASE + 1)

    def __init__(self) -> None:
        self.master = Pic8259(MASTER_BASE)
        self.slave = Pic8259(SLAVE_BASE)

    def _chip(self, port: int) -> Pic8259:
        return self.master if port < SLAVE_BASE else self.slave

    def pio_write(self, port: int, size: int, value: int) -> None:
        self._chip(port).pio_write(port, size, value)

    def pio_read(self, port: int, size: int) -> int:
        return self._chip(port).pio_read(port, size)
