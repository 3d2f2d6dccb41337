import struct

import pytest
from elfbuild import FakeRam, elf32, elf64, mb_header

from nestvisor.platform import multiboot as mb
from nestvisor.platform.multiboot import BootError, Module, kernel_cmdline, load_multiboot

KBASE = 0x400000  # kvm-unit-tests x86/flat.lds: . = 4M
CODE = mb_header() + b"\x90" * 16 + b"\xf4"


def flat_like(bss: int = 0x3000) -> bytes:
    """An ELF32 kernel shaped like a kvm-unit-tests .flat: one segment at 4 MiB with a bss."""
    return elf32([(KBASE, KBASE, CODE, len(CODE) + bss)], entry=KBASE + 12)


def test_elf32_segments_loaded_and_bss_zeroed():
    ram = FakeRam(fill=0xAA)
    info = load_multiboot(flat_like(), ram, cmdline="k.flat ")
    assert info.entry == KBASE + 12
    assert bytes(ram.mem[KBASE:KBASE + len(CODE)]) == CODE
    bss = ram.mem[KBASE + len(CODE):KBASE + len(CODE) + 0x3000]
    assert bss == bytes(0x3000)  # ELF gABI: memsz beyond filesz is zero
    assert ram.mem[KBASE + len(CODE) + 0x3000] == 0xAA  # nothing written past the bss
    assert (info.kernel_start, info.kernel_end) == (KBASE, KBASE + len(CODE) + 0x3000)
    assert info.mbi_addr == mb.MBI_ADDR < 0x100000


def test_elf64_kernel_loads():
    ram = FakeRam()
    image = elf64([(0x200000, 0x200000, CODE, len(CODE) + 0x100)], entry=0x200010)
    info = load_multiboot(image, ram, cmdline="x ")
    assert info.entry == 0x200010
    assert bytes(ram.mem[0x200000:0x200000 + len(CODE)]) == CODE


def test_virtual_entry_translated_to_physical():
    # QEMU multiboot.c: the entry is translated through the segment containing it.
    ram = FakeRam()
    image = elf32([(0xC0400000, KBASE, CODE, len(CODE))], entry=0xC0400010)
    info = load_multiboot(image, ram, cmdline="x ")
    assert info.entry == KBASE + 0x10
    assert bytes(ram.mem[KBASE:KBASE + 4]) == struct.pack("<I", mb.MULTIBOOT_HEADER_MAGIC)


def test_mbi_layout_memory_cmdline_loader_name():
    ram = FakeRam(size=16 << 20)
    load_multiboot(flat_like(), ram, cmdline=kernel_cmdline("x86/vmx.flat", "-ept_access* foo"))
    mbi = mb.MBI_ADDR
    flags = ram.u32(mbi)
    assert flags & mb.MBI_FLAG_MEMORY and flags & mb.MBI_FLAG_CMDLINE and flags & mb.MBI_FLAG_MMAP
    assert not flags & mb.MBI_FLAG_MODS
    assert ram.u32(mbi + 4) == 640  # mem_lower, KiB
    assert ram.u32(mbi + 8) == (16 << 20) // 1024 - 1024  # mem_upper: KiB above 1 MiB
    assert ram.cstr(ram.u32(mbi + 16)) == "x86/vmx.flat -ept_access* foo"
    assert ram.u32(mbi + 20) == 0  # mods_count
    assert ram.cstr(ram.u32(mbi + 64)) == "nestvisor"


def test_cmdline_is_path_space_args_like_qemu():
    assert kernel_cmdline("a.flat", "") == "a.flat "
    assert kernel_cmdline("a.flat", "x y") == "a.flat x y"


def test_mmap_describes_low_and_upper_ram():
    ram = FakeRam(size=16 << 20)
    load_multiboot(flat_like(), ram, cmdline="x ")
    length, addr = ram.u32(mb.MBI_ADDR + 44), ram.u32(mb.MBI_ADDR + 48)
    entries = [struct.unpack_from("<IQQI", ram.mem, addr + off) for off in range(0, length, 24)]
    assert entries == [(20, 0, 0xA0000, 1), (20, 0x100000, (16 << 20) - 0x100000, 1)]


def test_mmap_for_split_memory():
    data = mb.build_mmap([(0, 0xC0000000), (1 << 32, 1 << 30)])
    entries = [struct.unpack_from("<IQQI", data, off) for off in range(0, len(data), 24)]
    assert entries[-1] == (20, 1 << 32, 1 << 30, 1)


def test_modules_page_aligned_above_kernel_with_own_strings():
    ram = FakeRam()
    mods = [Module("/tmp/env", b"NR_CPUS=2\n"), Module("second arg1", b"\x01" * 5000)]
    info = load_multiboot(flat_like(bss=0x1234), ram, cmdline="k ", modules=mods)
    assert ram.u32(mb.MBI_ADDR) & mb.MBI_FLAG_MODS
    assert ram.u32(mb.MBI_ADDR + 20) == 2
    table = ram.u32(mb.MBI_ADDR + 24)
    (s0, e0, str0, _), (s1, e1, str1, _) = (
        struct.unpack_from("<IIII", ram.mem, table + 16 * i) for i in range(2))
    assert s0 % 4096 == 0 and s0 >= info.kernel_end and s0 - info.kernel_end < 4096
    assert bytes(ram.mem[s0:e0]) == b"NR_CPUS=2\n"
    assert s1 % 4096 == 0 and s1 >= e0
    assert bytes(ram.mem[s1:e1]) == b"\x01" * 5000
    assert ram.cstr(str0) == "/tmp/env" and ram.cstr(str1) == "second arg1"
    assert info.modules == [(s0, e0), (s1, e1)]


def test_aout_kludge_loads_raw_image():
    # flag bit 16: header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr (§3.1.3)
    load = 0x100000
    hdr_off = 8
    body = bytes(8) + mb_header(1 << 16, aout=(load + hdr_off, load, 0, load + 0x2000, load + 0x40))
    body += b"\xcc" * (0x100 - len(body))
    ram = FakeRam(fill=0x55)
    info = load_multiboot(body, ram, cmdline="raw ")
    assert info.entry == load + 0x40
    assert bytes(ram.mem[load:load + 0x100]) == body
    assert ram.mem[load + 0x100:load + 0x2000] == bytes(0x2000 - 0x100)
    assert ram.mem[load + 0x2000] == 0x55
    assert info.kernel_end == load + 0x2000


def test_header_must_be_in_first_8192_bytes():
    image = elf32([(KBASE, KBASE, bytes(8192) + CODE, 8192 + len(CODE))], entry=KBASE)
    with pytest.raises(BootError, match="no multiboot header"):
        load_multiboot(image, FakeRam(), cmdline="x ")


@pytest.mark.parametrize(
    "image, message",
    [
        (b"just some text, not a kernel" * 10, "no multiboot header"),
        (elf32([(KBASE, KBASE, b"\x90" * 64, 64)], KBASE), "no multiboot header"),
        (elf32([(KBASE, KBASE, mb_header(checksum=0) + bytes(16), 32)], KBASE),
         "no multiboot header"),
        (b"MZ" + bytes(6) + mb_header() + bytes(64), "neither ELF"),
        (elf32([(KBASE, KBASE, CODE, len(CODE))], KBASE, machine=40), "not x86"),
        (elf32([(64 << 20, 64 << 20, CODE, len(CODE))], 64 << 20), "outside guest RAM"),
        (elf32([(0x7800, 0x7800, CODE, len(CODE))], 0x7800), "firmware stub page"),
        (elf32([(KBASE, KBASE, mb_header(1 << 3), 12)], KBASE), "requires features"),
        (b"\x7fELF\x01\x01\x01" + bytes(9) + mb_header(), "not a valid ELF"),
    ],
    ids=["text", "elf-no-header", "bad-checksum", "not-elf-no-aout", "arm-elf",
         "segment-beyond-ram", "segment-on-firmware-page", "unknown-requirement", "truncated-elf"],
)
def test_bad_files_are_boot_errors(image, message):
    with pytest.raises(BootError, match=message) as exc:
        load_multiboot(image, FakeRam(), cmdline="x ")
    assert isinstance(exc.value, ValueError)
    assert "\n" not in str(exc.value)


def test_module_beyond_ram_is_boot_error():
    ram = FakeRam(size=8 << 20)
    with pytest.raises(BootError, match="module 'big'"):
        load_multiboot(flat_like(), ram, cmdline="x ", modules=[Module("big", bytes(5 << 20))])


def test_low_kernel_overwrites_boot_information_as_qemu_does():
    # QEMU's option ROM copies the kernel last: a kernel at 0x8000 wins over the mbi at 0x9500
    ram = FakeRam()
    code = CODE + bytes(0x2000)
    info = load_multiboot(elf32([(0x8000, 0x8000, code, len(code))], 0x8000), ram, cmdline="x ")
    assert bytes(ram.mem[0x8000:0x8000 + len(code)]) == code
    assert info.kernel_start == 0x8000
