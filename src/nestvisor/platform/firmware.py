"""The firmware stub: from the reset state (real mode) to the multiboot entry state.

The BSP starts at STUB_ADDR in real mode with CS = 0 (the VMM sets these reset registers, the
way a KVM VMM does with KVM_SET_SREGS/KVM_SET_REGS). The stub does what QEMU's multiboot option
ROM (pc-bios/optionrom/multiboot.S) does after SeaBIOS: load a flat GDT, enter protected mode,
load flat data segments, and jump to the kernel with the registers the Multiboot Specification
0.6.96 §3.2 ("Machine state") requires:

    EAX = 0x2BADB002, EBX = physical address of the mbi,
    CS  = 32-bit read/execute code, base 0, limit 4 GiB,
    DS/ES/FS/GS/SS = 32-bit read/write data, base 0, limit 4 GiB,
    CR0.PG = 0, CR0.PE = 1, EFLAGS.VM = 0, EFLAGS.IF = 0.

The code is data: each row is one hand-encoded instruction with its assembly in a comment,
and a unit test disassembles the result and compares it with the rows.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

STUB_ADDR = 0x7000  # multiboot.FIRMWARE_PAGE: no kernel byte may land here
KERNEL_CS = 0x08
KERNEL_DS = 0x10

CR0_PE = 1 << 0  # SDM 2.5
CR0_NW = 1 << 29
CR0_CD = 1 << 30
CR0_PG = 1 << 31
# SeaBIOS romlayout.S transition32: "andl $~(CR0_PG|CR0_CD|CR0_NW)" then "orl $CR0_PE", so a
# multiboot kernel under QEMU starts with caching enabled, not with the reset value's CD|NW.
CR0_CLEAR_MASK = ~(CR0_PG | CR0_CD | CR0_NW) & 0xFFFFFFFF

# A row: (opcode bytes, operand to patch in or None, trailing bytes, assembly).
# The operand is (name, struct format); its value comes from the layout below.
Row = tuple[str, tuple[str, str] | None, str, str]

CODE16: tuple[Row, ...] = (
    ("FA", None, "", "cli"),
    ("66 0F 01 16", ("gdtr", "<H"), "", "lgdtl [gdtr]          ; 32-bit base, 16-bit address"),
    ("0F 20 C0", None, "", "mov eax, cr0"),
    ("66 25", ("cr0_mask", "<I"), "", "and eax, ~(PG|CD|NW)"),
    ("66 83 C8 01", None, "", "or eax, 1              ; CR0.PE"),
    ("0F 22 C0", None, "", "mov cr0, eax"),
    ("66 EA", ("code32", "<I"), "08 00", "ljmpl 0x08:code32      ; CS from the GDT: 32-bit flat"),
)

CODE32: tuple[Row, ...] = (
    ("B8", ("kernel_ds", "<I"), "", "mov eax, 0x10"),
    ("8E D8", None, "", "mov ds, eax"),
    ("8E C0", None, "", "mov es, eax"),
    ("8E E0", None, "", "mov fs, eax"),
    ("8E E8", None, "", "mov gs, eax"),
    ("8E D0", None, "", "mov ss, eax"),
    ("B8", ("magic", "<I"), "", "mov eax, 0x2badb002    ; multiboot §3.2"),
    ("BB", ("mbi", "<I"), "", "mov ebx, mbi"),
    ("EA", ("entry", "<I"), "08 00", "ljmp 0x08:entry"),
)

# The flat GDT (SDM 3.4.5): null, 0x08 code (type 0xA, S, P, D/B, G), 0x10 data (type 0x2).
GDT: tuple[int, ...] = (
    0x0000000000000000,
    0x00CF9A000000FFFF,  # base 0, limit 0xFFFFF pages, 32-bit execute/read
    0x00CF92000000FFFF,  # base 0, limit 0xFFFFF pages, 32-bit read/write
)
GDT_OFFSET = 0x80  # from STUB_ADDR; 8-byte aligned (SDM 3.5.1 recommends it)
GDTR_OFFSET = 0x78  # the 6-byte pseudo-descriptor lgdt reads: limit, base


def _row_size(row: Row) -> int:
    opcode, operand, tail, _ = row
    size = len(bytes.fromhex(opcode)) + len(bytes.fromhex(tail))
    return size + (struct.calcsize(operand[1]) if operand else 0)


def _emit(rows: tuple[Row, ...], values: Mapping[str, int]) -> bytes:
    out = bytearray()
    for opcode, operand, tail, _ in rows:
        out += bytes.fromhex(opcode)
        if operand:
            out += struct.pack(operand[1], values[operand[0]])
        out += bytes.fromhex(tail)
    return bytes(out)


def layout(base: int = STUB_ADDR) -> dict[str, int]:
    """Addresses of the stub's parts."""
    code16_size = sum(map(_row_size, CODE16))
    code32_size = sum(map(_row_size, CODE32))
    code32 = base + code16_size
    if code32 + code32_size > base + GDTR_OFFSET:
        raise AssertionError("firmware stub code overlaps its GDTR")
    return {
        "code16": base, "code32": code32, "code_end": code32 + code32_size,
        "gdtr": base + GDTR_OFFSET, "gdt": base + GDT_OFFSET,
        "end": base + GDT_OFFSET + 8 * len(GDT),
    }


def build_stub(mbi: int, entry: int, base: int = STUB_ADDR) -> bytes:
    """The stub's bytes, to be written at `base` (which must be below 64 KiB: CS = 0)."""
    if base + GDT_OFFSET + 8 * len(GDT) > 0x10000:
        raise ValueError("the firmware stub must lie in the first 64 KiB (real mode, CS = 0)")
    where = layout(base)
    values = {
        "gdtr": where["gdtr"], "cr0_mask": CR0_CLEAR_MASK, "code32": where["code32"],
        "kernel_ds": KERNEL_DS, "magic": 0x2BADB002, "mbi": mbi, "entry": entry,
    }
    image = bytearray(where["end"] - base)
    code = _emit(CODE16, values) + _emit(CODE32, values)
    image[: len(code)] = code
    struct.pack_into("<HI", image, GDTR_OFFSET, 8 * len(GDT) - 1, where["gdt"])
    for i, desc in enumerate(GDT):
        struct.pack_into("<Q", image, GDT_OFFSET + 8 * i, desc)
    return bytes(image)


def enter_stub(vcpu: Any, base: int = STUB_ADDR) -> None:
    """Point a vCPU in its reset state at the stub: real mode, CS = 0, IP = base.

    KVM-style: the VMM overrides the reset CS (0xF000, base 0xFFFF0000) with KVM_SET_SREGS and
    RIP with KVM_SET_REGS. Only selector and base change; the reset limit and attributes stay.
    """
    sregs = vcpu.get_sregs()
    sregs.cs.selector = 0
    sregs.cs.base = 0
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip = base
    regs.rflags = 0x2  # SDM 9.1.1: reserved bit 1 set, IF clear
    vcpu.set_regs(regs)
