"""Architectural CPU state as plain values: what the engine reads out of and writes into unicorn.

Segment attributes use the layout of the descriptor's high dword (SDM 3.4.5), which is also
how QEMU's SegmentCache.flags stores them, so a cache read from unicorn needs no translation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Bit positions in Segment.flags (SDM 3.4.5 "Segment Descriptors", high dword).
SEG_TYPE_SHIFT = 8
SEG_S = 1 << 12
SEG_DPL_SHIFT = 13
SEG_P = 1 << 15
SEG_AVL = 1 << 20
SEG_L = 1 << 21
SEG_DB = 1 << 22
SEG_G = 1 << 23


@dataclass
class Segment:
    """A segment register with its hidden descriptor cache."""

    selector: int = 0
    base: int = 0
    limit: int = 0xFFFF
    flags: int = SEG_P | SEG_S | (3 << SEG_TYPE_SHIFT)

    @property
    def type(self) -> int:
        return (self.flags >> SEG_TYPE_SHIFT) & 0xF

    @property
    def s(self) -> int:
        return (self.flags >> 12) & 1

    @property
    def dpl(self) -> int:
        return (self.flags >> SEG_DPL_SHIFT) & 3

    @property
    def present(self) -> int:
        return (self.flags >> 15) & 1

    @property
    def avl(self) -> int:
        return (self.flags >> 20) & 1

    @property
    def l(self) -> int:  # noqa: E743 - the architectural name
        return (self.flags >> 21) & 1

    @property
    def db(self) -> int:
        return (self.flags >> 22) & 1

    @property
    def g(self) -> int:
        return (self.flags >> 23) & 1

    def copy(self) -> Segment:
        # direct construction: dataclasses.replace costs ~10x more on this hot path
        return Segment(self.selector, self.base, self.limit, self.flags)


def real_mode_segment(selector: int, code: bool = False) -> Segment:
    """A segment as a real-mode load leaves it (SDM 20.1.1): base = selector * 16, limit 64K."""
    seg_type = 0xB if code else 0x3
    return Segment(selector, (selector << 4) & 0xFFFFF, 0xFFFF, SEG_P | SEG_S | (seg_type << SEG_TYPE_SHIFT))


@dataclass
class DescTable:
    """GDTR or IDTR."""

    base: int = 0
    limit: int = 0xFFFF


@dataclass
class ArchState:
    """The state exception delivery and mode changes work on."""

    rip: int = 0xFFF0
    rsp: int = 0
    rflags: int = 0x2
    cs: Segment = field(default_factory=lambda: Segment(0xF000, 0xFFFF0000, 0xFFFF, SEG_P | SEG_S | (0xB << SEG_TYPE_SHIFT)))
    ss: Segment = field(default_factory=Segment)
    ds: Segment = field(default_factory=Segment)
    es: Segment = field(default_factory=Segment)
    fs: Segment = field(default_factory=Segment)
    gs: Segment = field(default_factory=Segment)
    tr: Segment = field(default_factory=lambda: Segment(0, 0, 0xFFFF, SEG_P | (0xB << SEG_TYPE_SHIFT)))
    ldt: Segment = field(default_factory=lambda: Segment(0, 0, 0xFFFF, SEG_P | (0x2 << SEG_TYPE_SHIFT)))
    gdt: DescTable = field(default_factory=DescTable)
    idt: DescTable = field(default_factory=DescTable)
    cr0: int = 0x60000010
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    efer: int = 0

    @property
    def protected(self) -> bool:
        return bool(self.cr0 & 1)

    @property
    def long_mode(self) -> bool:
        """EFER.LMA: IA-32e mode active."""
        return bool(self.efer & (1 << 10))

    @property
    def vm86(self) -> bool:
        return bool(self.rflags & (1 << 17)) and self.protected

    @property
    def cpl(self) -> int:
        """Current privilege level (SDM 5.5): SS.DPL in protected mode, 0 in real mode, 3 in VM86."""
        if not self.protected:
            return 0
        if self.vm86:
            return 3
        return self.ss.dpl

    @property
    def code_bits(self) -> int:
        """Default operand size of the code running now: 16, 32 or 64."""
        if not self.protected or self.vm86:
            return 16
        if self.long_mode and self.cs.l:
            return 64
        return 32 if self.cs.db else 16

    def copy(self) -> ArchState:
        return ArchState(
            self.rip, self.rsp, self.rflags,
            self.cs.copy(), self.ss.copy(), self.ds.copy(), self.es.copy(),
            self.fs.copy(), self.gs.copy(), self.tr.copy(), self.ldt.copy(),
            DescTable(self.gdt.base, self.gdt.limit), DescTable(self.idt.base, self.idt.limit),
            self.cr0, self.cr2, self.cr3, self.cr4, self.efer,
        )
