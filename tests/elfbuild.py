"""Tiny ELF32/ELF64 multiboot kernels built with struct, for loader tests (no toolchain)."""

from __future__ import annotations

import struct

MB_MAGIC = 0x1BADB002


def mb_header(flags: int = 0, *, checksum: int | None = None, aout: tuple[int, ...] = ()) -> bytes:
    """A multiboot header (Multiboot 0.6.96 §3.1.1); `aout` = the five address fields."""
    if checksum is None:
        checksum = -(MB_MAGIC + flags) & 0xFFFFFFFF
    return struct.pack("<III", MB_MAGIC, flags, checksum) + struct.pack(f"<{len(aout)}I", *aout)


def elf32(segments: list[tuple[int, int, bytes, int]], entry: int, machine: int = 3) -> bytes:
    """segments: (vaddr, paddr, file bytes, memsz). ELF32 little endian, ET_EXEC."""
    phoff = 52
    data_off = phoff + 32 * len(segments)
    phdrs, blobs = b"", b""
    for vaddr, paddr, data, memsz in segments:
        off = data_off + len(blobs)
        phdrs += struct.pack("<IIIIIIII", 1, off, vaddr, paddr, len(data), memsz, 7, 4)
        blobs += data
    ident = b"\x7fELF" + bytes((1, 1, 1)) + bytes(9)
    hdr = ident + struct.pack("<HHIIIIIHHHHHH", 2, machine, 1, entry, phoff, 0, 0, 52, 32,
                              len(segments), 40, 0, 0)
    return hdr + phdrs + blobs


def elf64(segments: list[tuple[int, int, bytes, int]], entry: int) -> bytes:
    phoff = 64
    data_off = phoff + 56 * len(segments)
    phdrs, blobs = b"", b""
    for vaddr, paddr, data, memsz in segments:
        off = data_off + len(blobs)
        phdrs += struct.pack("<IIQQQQQQ", 1, 7, off, vaddr, paddr, len(data), memsz, 8)
        blobs += data
    ident = b"\x7fELF" + bytes((2, 1, 1)) + bytes(9)
    hdr = ident + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, entry, phoff, 0, 0, 64, 56,
                              len(segments), 64, 0, 0)
    return hdr + phdrs + blobs


class FakeRam:
    """multiboot.GuestRam over a bytearray starting at physical 0."""

    def __init__(self, size: int = 16 << 20, fill: int = 0) -> None:
        self.mem = bytearray([fill]) * size
        self.regions = [(0, size)]

    def write(self, gpa: int, data: bytes) -> None:
        assert gpa + len(data) <= len(self.mem), "write outside the fake RAM"
        self.mem[gpa:gpa + len(data)] = data

    def u32(self, gpa: int) -> int:
        return struct.unpack_from("<I", self.mem, gpa)[0]

    def cstr(self, gpa: int) -> str:
        end = self.mem.index(0, gpa)
        return self.mem[gpa:end].decode()
