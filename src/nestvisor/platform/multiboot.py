"""Multiboot v1 loader: puts a kernel, its modules and the boot information into guest RAM.

Follows the Multiboot Specification 0.6.96 and, where the specification leaves a choice, what
QEMU's hw/i386/multiboot.c does, because kvm-unit-tests' *.flat kernels are built for QEMU.

The result is the machine the firmware stub (firmware.py) hands over to: the kernel's segments
in place, its bss zeroed, the modules page aligned above it, and the multiboot information
structure (mbi) at a fixed address below 1 MiB.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

# --- Facts: the multiboot header (Multiboot 0.6.96 §3.1) -------------------------------------

MULTIBOOT_HEADER_MAGIC = 0x1BADB002
MULTIBOOT_SEARCH = 8192  # the header lies in the first 8192 bytes, 32-bit aligned (§3.1.1)
MULTIBOOT_BOOTLOADER_MAGIC = 0x2BADB002  # EAX at entry (§3.2)

# Header flag bits (§3.1.2). Bits 0-15 are requirements: a loader that does not know one must fail.
MB_PAGE_ALIGN = 1 << 0  # modules page aligned (we always align them)
MB_MEMORY_INFO = 1 << 1  # mem_* fields required (we always provide them)
MB_VIDEO_MODE = 1 << 2  # video mode table wanted (QEMU: "multiboot knows VBE. we don't.")
MB_AOUT_KLUDGE = 1 << 16  # header address fields are valid and are used for loading
MB_KNOWN_REQUIREMENTS = MB_PAGE_ALIGN | MB_MEMORY_INFO | MB_VIDEO_MODE

# Header layout (§3.1.1): magic, flags, checksum, then the a.out-kludge address fields.
_HEADER = struct.Struct("<III")
_AOUT_FIELDS = struct.Struct("<IIIII")  # header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr

# --- Facts: the multiboot information structure (§3.3) ---------------------------------------

MBI_FLAG_MEMORY = 1 << 0  # mem_lower / mem_upper
MBI_FLAG_BOOTDEV = 1 << 1
MBI_FLAG_CMDLINE = 1 << 2
MBI_FLAG_MODS = 1 << 3
MBI_FLAG_MMAP = 1 << 6
MBI_FLAG_LOADER_NAME = 1 << 9

MBI_SIZE = 88  # through vbe_interface_len (§3.3)
MBI_OFFSETS = {  # byte offsets of the fields we fill (§3.3)
    "flags": 0, "mem_lower": 4, "mem_upper": 8, "boot_device": 12, "cmdline": 16,
    "mods_count": 20, "mods_addr": 24, "mmap_length": 44, "mmap_addr": 48,
    "boot_loader_name": 64,
}
_MODULE = struct.Struct("<IIII")  # mod_start, mod_end, string, reserved (§3.3)
_MMAP_ENTRY = struct.Struct("<IQQI")  # size (of the rest, 20), base_addr, length, type (§3.3)
MMAP_AVAILABLE = 1
MMAP_RESERVED = 2

# --- Where things go in guest memory ----------------------------------------------------------

# QEMU hw/i386/multiboot.c: the e820 copy at 0x9000 (ADDR_E820_MAP) and the mbi at 0x9500
# (ADDR_MBI), both below 1 MiB where no multiboot kernel may be loaded.
MMAP_ADDR = 0x9000
MBI_ADDR = 0x9500
MODS_ADDR = 0x9600  # the module descriptors, 16 bytes each, after the mbi
MODS_MAX = (0xA000 - MODS_ADDR) // _MODULE.size
STRINGS_ADDR = 0xA000  # command lines and the loader name
STRINGS_END = 0x9F000  # below the EBDA (QEMU's e820 ends low RAM at 0x9fc00)
FIRMWARE_PAGE = (0x7000, 0x8000)  # the firmware stub that enters the kernel: nothing may land here
BOOT_INFO_AREA = (MMAP_ADDR, STRINGS_END)
LOW_RAM_END = 0xA0000  # 640 KiB of conventional memory (mem_lower = 640, QEMU)
BOOT_LOADER_NAME = b"nestvisor\0"

PAGE = 4096


class BootError(ValueError):
    """The kernel or a module cannot be booted; the message is one sentence for the user."""


class GuestRam(Protocol):
    """Where the loader writes: the RAM regions of the machine and a way to write bytes there."""

    regions: Sequence[tuple[int, int]]  # (guest physical start, size), sorted

    def write(self, gpa: int, data: bytes) -> None: ...


@dataclass
class Module:
    """A multiboot module: its bytes and the string the kernel sees (QEMU: the -initrd argument)."""

    string: str
    data: bytes


@dataclass
class MultibootHeader:
    offset: int  # file offset of the magic
    flags: int
    header_addr: int = 0
    load_addr: int = 0
    load_end_addr: int = 0
    bss_end_addr: int = 0
    entry_addr: int = 0


@dataclass
class BootInfo:
    """What the loader did: where the firmware stub must jump and what it must pass in EBX."""

    entry: int
    mbi_addr: int
    kernel_start: int
    kernel_end: int  # end of the last loaded byte, bss included
    cmdline: str
    modules: list[tuple[int, int]] = field(default_factory=list)  # (mod_start, mod_end)
    header: MultibootHeader | None = None


def find_header(image: bytes) -> MultibootHeader:
    """Find the multiboot header: 32-bit aligned in the first 8192 bytes, checksum zero (§3.1.1)."""
    limit = min(len(image), MULTIBOOT_SEARCH) - _HEADER.size
    for off in range(0, limit + 1, 4):
        magic, flags, checksum = _HEADER.unpack_from(image, off)
        if magic != MULTIBOOT_HEADER_MAGIC:
            continue
        if (magic + flags + checksum) & 0xFFFFFFFF:  # §3.1.2: the three fields sum to zero
            continue
        hdr = MultibootHeader(off, flags)
        if flags & MB_AOUT_KLUDGE:
            if off + _HEADER.size + _AOUT_FIELDS.size > len(image):
                raise BootError("the multiboot header is cut short before its address fields")
            (hdr.header_addr, hdr.load_addr, hdr.load_end_addr, hdr.bss_end_addr,
             hdr.entry_addr) = _AOUT_FIELDS.unpack_from(image, off + _HEADER.size)
        return hdr
    raise BootError("no multiboot header (magic 0x1BADB002 with a valid checksum) "
                    "in the first 8192 bytes")


def _check_in_ram(ram: GuestRam, start: int, end: int, what: str) -> None:
    if start < FIRMWARE_PAGE[1] and end > FIRMWARE_PAGE[0]:
        raise BootError(f"{what} [{start:#x}, {end:#x}) overlaps the firmware stub page "
                        f"[{FIRMWARE_PAGE[0]:#x}, {FIRMWARE_PAGE[1]:#x})")
    for base, size in ram.regions:
        if base <= start and end <= base + size:
            return
    raise BootError(f"{what} [{start:#x}, {end:#x}) lies outside guest RAM")


def _load_elf(image: bytes, ram: GuestRam) -> tuple[int, int, int]:
    """Load the PT_LOAD segments at their physical addresses; returns (entry, start, end)."""
    try:
        elf = ELFFile(io.BytesIO(image))
        machine = elf["e_machine"]
        if machine not in ("EM_386", "EM_X86_64"):
            raise BootError(f"the kernel is an ELF file for {machine}, not x86")
        segments = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD" and s["p_memsz"]]
        entry = elf["e_entry"]
        loads = []
        for seg in segments:
            paddr, vaddr = seg["p_paddr"], seg["p_vaddr"]
            filesz, memsz, offset = seg["p_filesz"], seg["p_memsz"], seg["p_offset"]
            if filesz > memsz or offset + filesz > len(image):
                raise BootError(f"ELF segment at {paddr:#x} has a file size beyond the file "
                                "or larger than its memory size")
            loads.append((paddr, vaddr, memsz, image[offset:offset + filesz]))
    except ELFError as e:
        raise BootError(f"the kernel is not a valid ELF file ({e})") from None
    if not loads:
        raise BootError("the ELF kernel has no loadable (PT_LOAD) segment")
    for paddr, _vaddr, memsz, _data in loads:
        _check_in_ram(ram, paddr, paddr + memsz, f"ELF segment at {paddr:#x}")
    for paddr, _vaddr, memsz, data in loads:
        ram.write(paddr, data)
        if memsz > len(data):  # the bss: memory the file does not cover is zeroed (ELF gABI)
            ram.write(paddr + len(data), bytes(memsz - len(data)))
    # QEMU multiboot.c: an entry given as a virtual address is translated through the
    # segment that contains it, since the CPU starts with paging off.
    for paddr, vaddr, memsz, _data in loads:
        if vaddr != paddr and vaddr <= entry < vaddr + memsz:
            entry = entry - vaddr + paddr
            break
    if entry > 0xFFFFFFFF:
        raise BootError(f"the ELF entry point {entry:#x} is above 4 GiB; "
                        "multiboot enters in 32-bit protected mode")
    start = min(p for p, _v, _m, _d in loads)
    end = max(p + m for p, _v, m, _d in loads)
    return entry, start, end


def _load_aout(image: bytes, hdr: MultibootHeader, ram: GuestRam) -> tuple[int, int, int]:
    """Load with the header's address fields (§3.1.3, flag bit 16)."""
    if hdr.load_addr > hdr.header_addr:
        raise BootError("multiboot header: load_addr is above header_addr")
    file_start = hdr.offset - (hdr.header_addr - hdr.load_addr)
    if file_start < 0:
        raise BootError("multiboot header: load_addr lies before the start of the file")
    if hdr.load_end_addr:  # 0 means "to the end of the file" (§3.1.3)
        if hdr.load_end_addr < hdr.load_addr:
            raise BootError("multiboot header: load_end_addr is below load_addr")
        load_size = hdr.load_end_addr - hdr.load_addr
    else:
        load_size = len(image) - file_start
    if file_start + load_size > len(image):
        raise BootError("multiboot header: load_end_addr reaches beyond the end of the file")
    end = hdr.load_addr + load_size
    if hdr.bss_end_addr:  # 0 means no bss (§3.1.3)
        if hdr.bss_end_addr < end:
            raise BootError("multiboot header: bss_end_addr is below load_end_addr")
        end = hdr.bss_end_addr
    _check_in_ram(ram, hdr.load_addr, max(end, hdr.load_addr + 1), "the kernel image")
    ram.write(hdr.load_addr, image[file_start:file_start + load_size])
    if end > hdr.load_addr + load_size:
        ram.write(hdr.load_addr + load_size, bytes(end - hdr.load_addr - load_size))
    return hdr.entry_addr, hdr.load_addr, end


def _align_up(value: int, align: int = PAGE) -> int:
    return (value + align - 1) & -align


def build_mmap(regions: Sequence[tuple[int, int]]) -> bytes:
    """The memory map as QEMU's e820 table describes a PC: low 640 KiB, then RAM from 1 MiB."""
    entries = []
    for base, size in regions:
        if base == 0:
            entries.append((0, min(size, LOW_RAM_END), MMAP_AVAILABLE))
            if size > 0x100000:
                entries.append((0x100000, size - 0x100000, MMAP_AVAILABLE))
        else:
            entries.append((base, size, MMAP_AVAILABLE))
    return b"".join(_MMAP_ENTRY.pack(_MMAP_ENTRY.size - 4, b, n, t) for b, n, t in entries)


def load_multiboot(
    image: bytes,
    ram: GuestRam,
    *,
    cmdline: str,
    modules: Sequence[Module] = (),
) -> BootInfo:
    """Load a multiboot v1 kernel and build its boot information; raises BootError.

    `cmdline` is the whole string the kernel sees; QEMU passes "KERNEL_PATH ARGS" (see
    kernel_cmdline()).
    """
    hdr = find_header(image)
    unknown = hdr.flags & 0xFFFF & ~MB_KNOWN_REQUIREMENTS
    if unknown:  # §3.1.2: unknown requirement bits make the loader fail
        raise BootError(f"the multiboot header requires features this loader lacks "
                        f"(flags {unknown:#x})")
    if hdr.flags & MB_AOUT_KLUDGE:  # QEMU uses the address fields whenever bit 16 is set
        entry, kstart, kend = _load_aout(image, hdr, ram)
    else:
        if image[:4] != b"\x7fELF":
            raise BootError("the kernel is neither ELF nor a multiboot image with load addresses "
                            "(header flag bit 16)")
        entry, kstart, kend = _load_elf(image, ram)
    if kstart < BOOT_INFO_AREA[1] and kend > BOOT_INFO_AREA[0] and modules:
        raise BootError(f"the kernel [{kstart:#x}, {kend:#x}) overlaps the boot information area "
                        f"[{BOOT_INFO_AREA[0]:#x}, {BOOT_INFO_AREA[1]:#x}), which then cannot list modules")

    # Modules, page aligned above the kernel (QEMU multiboot.c loads them after the image).
    mod_addr = _align_up(kend)
    placed: list[tuple[int, int]] = []
    if len(modules) > MODS_MAX:
        raise BootError(f"too many multiboot modules ({len(modules)}, at most {MODS_MAX})")
    for mod in modules:
        start, end = mod_addr, mod_addr + len(mod.data)
        _check_in_ram(ram, start, max(end, start + 1), f"module '{mod.string}'")
        ram.write(start, mod.data)
        placed.append((start, end))
        mod_addr = _align_up(max(end, start + 1))

    # Strings: the command line, each module's own string, the loader name.
    strings = bytearray()

    def put(s: bytes) -> int:
        addr = STRINGS_ADDR + len(strings)
        strings.extend(s)
        return addr

    cmdline_addr = put(cmdline.encode() + b"\0")
    mod_string_addrs = [put(m.string.encode() + b"\0") for m in modules]
    loader_addr = put(BOOT_LOADER_NAME)
    if STRINGS_ADDR + len(strings) > STRINGS_END:
        raise BootError("the command line and module strings do not fit below 640 KiB")

    mmap = build_mmap(ram.regions)
    low = next((size for base, size in ram.regions if base == 0), 0)
    mbi = bytearray(MBI_SIZE)

    def put_u32(name: str, value: int) -> None:
        struct.pack_into("<I", mbi, MBI_OFFSETS[name], value)

    flags = MBI_FLAG_MEMORY | MBI_FLAG_CMDLINE | MBI_FLAG_MMAP | MBI_FLAG_LOADER_NAME
    if modules:
        flags |= MBI_FLAG_MODS
    put_u32("flags", flags)
    # QEMU multiboot.c: mem_lower = 640, mem_upper = KiB from 1 MiB to the end of low RAM.
    put_u32("mem_lower", min(low, LOW_RAM_END) // 1024)
    put_u32("mem_upper", max(low - 0x100000, 0) // 1024)
    put_u32("cmdline", cmdline_addr)
    put_u32("mods_count", len(modules))
    put_u32("mods_addr", MODS_ADDR)
    put_u32("mmap_length", len(mmap))
    put_u32("mmap_addr", MMAP_ADDR)
    put_u32("boot_loader_name", loader_addr)

    mods = b"".join(_MODULE.pack(s, e, a, 0) for (s, e), a in zip(placed, mod_string_addrs, strict=True))
    ram.write(MMAP_ADDR, mmap)
    ram.write(MBI_ADDR, bytes(mbi))
    if mods:
        ram.write(MODS_ADDR, mods)
    ram.write(STRINGS_ADDR, bytes(strings))
    if kstart < BOOT_INFO_AREA[1] and kend > BOOT_INFO_AREA[0]:
        # QEMU's multiboot option ROM copies the kernel after writing the boot information,
        # so a low kernel (kvm-unit-tests' realmode.flat at 0x8000) overwrites it: load it again
        if hdr.flags & MB_AOUT_KLUDGE:
            _load_aout(image, hdr, ram)
        else:
            _load_elf(image, ram)
    return BootInfo(entry=entry, mbi_addr=MBI_ADDR, kernel_start=kstart, kernel_end=kend,
                    cmdline=cmdline, modules=placed, header=hdr)


def kernel_cmdline(kernel_path: str, append: str) -> str:
    """QEMU multiboot.c: snprintf("%s %s", kernel_filename, kernel_cmdline); argv[0] is the path."""
    return f"{kernel_path} {append}"
