"""Unit tests for the guest page walk (SDM chapter 4) over a bytearray-backed memory."""

from __future__ import annotations

import struct

import pytest

from nestvisor.arch.x86 import (
    CR0_PE,
    CR0_PG,
    CR0_WP,
    CR4_LA57,
    CR4_PAE,
    CR4_PSE,
    CR4_SMAP,
    CR4_SMEP,
    EFER_LMA,
    EFER_LME,
    EFER_NXE,
    PTE_A,
    PTE_D,
    PTE_P,
    PTE_PS,
    PTE_RW,
    PTE_US,
    PTE_XD,
)
from nestvisor.cpu.faults import GuestFault, PageFault
from nestvisor.cpu.paging import LinearMemory, is_canonical, translate
from nestvisor.cpu.state import ArchState

P, RW, US, PS, A, D, XD = PTE_P, PTE_RW, PTE_US, PTE_PS, PTE_A, PTE_D, PTE_XD
URW = P | RW | US
PG_CR0 = CR0_PE | CR0_PG
LONG_EFER = EFER_LME | EFER_LMA


class FakeMem:
    """Guest-physical memory: unmapped reads give 0xff, unmapped writes are dropped."""

    def __init__(self, size: int = 0x20000) -> None:
        self.buf = bytearray(size)
        self.writes: list[tuple[int, bytes]] = []

    def read(self, gpa: int, size: int) -> bytes:
        return bytes(self.buf[gpa + i] if gpa + i < len(self.buf) else 0xFF for i in range(size))

    def write(self, gpa: int, data: bytes) -> None:
        self.writes.append((gpa, bytes(data)))
        for i, b in enumerate(data):
            if gpa + i < len(self.buf):
                self.buf[gpa + i] = b

    def put32(self, gpa: int, v: int) -> None:
        struct.pack_into("<I", self.buf, gpa, v)

    def put64(self, gpa: int, v: int) -> None:
        struct.pack_into("<Q", self.buf, gpa, v)

    def get32(self, gpa: int) -> int:
        return struct.unpack_from("<I", self.buf, gpa)[0]

    def get64(self, gpa: int) -> int:
        return struct.unpack_from("<Q", self.buf, gpa)[0]


def pf(fn, *args, **kw) -> PageFault:
    with pytest.raises(PageFault) as info:
        fn(*args, **kw)
    return info.value


# ---------------------------------------------------------------- paging off
def test_paging_off_is_identity_truncated_to_32_bits() -> None:
    assert translate(None, CR0_PE, 0, 0, 0, 0x1234) == 0x1234
    assert translate(None, 0, 0, 0, 0, 0x1_FFFF_F000, write=True, user=True) == 0xFFFF_F000


# ---------------------------------------------------------------- 32-bit paging
def mem32() -> FakeMem:
    m = FakeMem()
    m.put32(0x1000 + 1 * 4, 0x2000 | URW)      # PDE[1] -> PT at 0x2000 (linear 0x00400000)
    m.put32(0x2000 + 3 * 4, 0x7000 | URW)      # 0x00403000 -> 0x7000
    m.put32(0x2000 + 5 * 4, 0x8000 | P | RW)   # supervisor page
    m.put32(0x2000 + 6 * 4, 0x9000 | P | US)   # read-only user page
    m.put32(0x2000 + 7 * 4, 0xA000 | P)        # read-only supervisor page
    return m


def t32(m, linear, cr0=PG_CR0, cr4=0, **kw) -> int:
    return translate(m, cr0, 0x1000, cr4, 0, linear, **kw)


def test_32bit_4k_walk_sets_accessed_then_dirty() -> None:
    m = mem32()
    assert t32(m, 0x00403123) == 0x7123
    assert m.get32(0x1004) == 0x2000 | URW | A
    assert m.get32(0x200C) == 0x7000 | URW | A
    assert t32(m, 0x00403FFF, write=True, user=True) == 0x7FFF
    assert m.get32(0x1004) == 0x2000 | URW | A  # D only in the entry that maps the page
    assert m.get32(0x200C) == 0x7000 | URW | A | D


def test_32bit_not_present_error_codes() -> None:
    m = mem32()
    assert pf(t32, m, 0x00404010).error_code == 0
    e = pf(t32, m, 0x00404010, write=True, user=True)
    assert (e.error_code, e.linear) == (0x6, 0x00404010)
    assert pf(t32, m, 0x00C00000).error_code == 0  # PDE not present


def test_32bit_rights_user_supervisor_and_wp() -> None:
    m = mem32()
    assert pf(t32, m, 0x00405000, user=True).error_code == 0x5  # P | U
    assert pf(t32, m, 0x00406000, write=True, user=True).error_code == 0x7  # P | W | U
    assert t32(m, 0x00407000, write=True) == 0xA000  # WP=0: supervisor may write RO
    assert m.get32(0x201C) == 0xA000 | P | A | D
    m = mem32()
    e = pf(t32, m, 0x00407000, cr0=PG_CR0 | CR0_WP, write=True)
    assert e.error_code == 0x3
    assert m.get32(0x201C) == 0xA000 | P  # faulting walk sets no A bit


def test_32bit_fetch_reports_i_only_with_smep() -> None:
    m = mem32()
    assert pf(t32, m, 0x00405000, user=True, fetch=True).error_code == 0x5
    assert pf(t32, m, 0x00403000, fetch=True, cr4=CR4_SMEP).error_code == 0x11  # P | I
    assert pf(t32, m, 0x00404000, fetch=True, cr4=CR4_SMEP).error_code == 0x10  # not present


def test_32bit_pse_4m_page_and_pse36() -> None:
    m = mem32()
    m.put32(0x1000 + 2 * 4, 0x00C00000 | PS | P | RW)
    assert t32(m, 0x00812345, cr4=CR4_PSE) == 0x00C12345
    assert m.get32(0x1008) == 0x00C00000 | PS | P | RW | A
    # Without CR4.PSE the PS bit is ignored: the PDE points at a page table (all zeros here).
    m2 = mem32()
    m2.put32(0x1000 + 2 * 4, 0x3000 | PS | P | RW)
    assert pf(t32, m2, 0x00812345).error_code == 0
    # PSE-36: PDE bits 20:13 are physical-address bits 39:32.
    m.put32(0x1000 + 3 * 4, 0x00400000 | (0x12 << 13) | PS | P)
    assert t32(m, 0x00C00010, cr4=CR4_PSE) == 0x12_0040_0010


def test_32bit_pse_reserved_bits() -> None:
    m = mem32()
    m.put32(0x1000 + 3 * 4, 0x00400000 | (1 << 21) | PS | P)
    assert pf(t32, m, 0x00C00000, cr4=CR4_PSE, write=True).error_code == 0xB  # P|W|RSVD
    m.put32(0x1000 + 3 * 4, 0x00400000 | (1 << 17) | PS | P)
    assert t32(m, 0x00C00000, cr4=CR4_PSE) == 0x10_0040_0000
    e = pf(t32, m, 0x00C00000, cr4=CR4_PSE, maxphyaddr=36)  # bits 20:17 reserved at M=36
    assert e.error_code == 0x9


# ---------------------------------------------------------------- PAE paging
def mem_pae() -> FakeMem:
    m = FakeMem()
    m.put64(0x1000, 0x2000 | P)                  # PDPTE[0]
    m.put64(0x2000, 0x3000 | URW)                # PDE[0] -> PT
    m.put64(0x2008, 0x00400000 | PS | P | RW)    # PDE[1]: 2 MiB page
    m.put64(0x3000 + 1 * 8, 0x9000 | URW)
    m.put64(0x3000 + 2 * 8, 0xA000 | P | XD)
    m.put64(0x3000 + 3 * 8, 0xB000 | P | (1 << 52))
    return m


def tpae(m, linear, efer=EFER_NXE, cr4=CR4_PAE, **kw) -> int:
    return translate(m, PG_CR0, 0x1000, cr4, efer, linear, **kw)


def test_pae_4k_and_2m_pages() -> None:
    m = mem_pae()
    assert tpae(m, 0x1234) == 0x9234
    assert tpae(m, 0x00212345, write=True) == 0x00412345
    assert m.get64(0x2008) == 0x00400000 | PS | P | RW | A | D
    assert m.get64(0x1000) == 0x2000 | P  # PDPTEs get no accessed bit
    assert m.get64(0x2000) == 0x3000 | URW | A
    assert m.get64(0x3008) == 0x9000 | URW | A


def test_pae_nx() -> None:
    m = mem_pae()
    assert tpae(m, 0x2010) == 0xA010
    assert pf(tpae, m, 0x2010, fetch=True).error_code == 0x11  # P | I
    # Without EFER.NXE bit 63 is reserved, and I/D is not reported.
    assert pf(tpae, m, 0x2010, efer=0).error_code == 0x9
    assert pf(tpae, m, 0x2010, efer=0, fetch=True).error_code == 0x9


def test_pae_reserved_bits() -> None:
    m = mem_pae()
    assert pf(tpae, m, 0x3000, user=True).error_code == 0xD  # bits 62:M reserved in PAE
    m.put64(0x2008, 0x00400000 | (1 << 13) | PS | P)
    assert pf(tpae, m, 0x00200000).error_code == 0x9
    m.put64(0x1000, 0x2000 | P | RW)  # PDPTE bit 1 reserved
    assert pf(tpae, m, 0x1000).error_code == 0x9
    assert pf(tpae, m, 0x40000000, write=True).error_code == 0x2  # PDPTE[1] not present


# ---------------------------------------------------------------- 4-level / 5-level
def mem64() -> FakeMem:
    m = FakeMem()
    m.put64(0x1000, 0x2000 | URW)                 # PML4E[0]
    m.put64(0x1000 + 511 * 8, 0x2000 | P | RW)    # PML4E[511] (supervisor)
    m.put64(0x1008, 0x2000 | P | PS)              # PML4E[1]: PS is reserved
    m.put64(0x2000, 0x3000 | URW)                 # PDPTE[0]
    m.put64(0x2008, 0x40000000 | PS | P | RW)     # PDPTE[1]: 1 GiB page
    m.put64(0x2010, 0x80000000 | (1 << 13) | PS | P)  # 1 GiB page with a reserved bit
    m.put64(0x3000, 0x4000 | URW)                 # PDE[0]
    m.put64(0x3008, 0x00200000 | PS | URW)        # PDE[1]: 2 MiB user page
    m.put64(0x3010, 0x5000 | P | RW | US | XD)    # PDE[2]: XD at a non-leaf level
    m.put64(0x4000 + 5 * 8, 0x5000 | URW)
    m.put64(0x4000 + 6 * 8, 0x6000 | P | (1 << 52))  # bit 52 ignored in 4-level paging
    m.put64(0x4000 + 7 * 8, (1 << 45) | 0x7000 | P)
    m.put64(0x4000 + 8 * 8, 0x8000 | P | US)      # read-only user page
    m.put64(0x5000, 0xC000 | URW)                 # PT behind PDE[2]
    return m


def t64(m, linear, cr0=PG_CR0, cr4=CR4_PAE, efer=LONG_EFER | EFER_NXE, **kw) -> int:
    return translate(m, cr0, 0x1000, cr4, efer, linear, **kw)


def test_4level_4k_walk_and_ad_bits() -> None:
    m = mem64()
    assert t64(m, 0x5678, write=True) == 0x5678
    assert [m.get64(a) & (A | D) for a in (0x1000, 0x2000, 0x3000, 0x4028)] == [A, A, A, A | D]
    assert t64(m, 0x6000) == 0x6000
    assert t64(m, 0xFFFFFF8000005678) == 0x5678  # PML4E[511], sign-extended address


def test_4level_set_ad_false_leaves_entries() -> None:
    m = mem64()
    before = bytes(m.buf)
    assert t64(m, 0x5678, write=True, set_ad=False) == 0x5678
    assert bytes(m.buf) == before and m.writes == []


def test_4level_large_pages() -> None:
    m = mem64()
    assert t64(m, 0x40001234) == 0x40001234
    assert t64(m, 0x00234567, user=True, write=True) == 0x00234567
    assert m.get64(0x3008) == 0x00200000 | PS | URW | A | D
    assert pf(t64, m, 0x80000000).error_code == 0x9
    assert pf(t64, m, 1 << 39).error_code == 0x9  # PML4E.PS reserved


def test_4level_maxphyaddr_reserved_bits() -> None:
    m = mem64()
    assert t64(m, 0x7000) == (1 << 45) | 0x7000
    assert pf(t64, m, 0x7000, maxphyaddr=40).error_code == 0x9


def test_4level_nx_and_rights() -> None:
    m = mem64()
    assert pf(t64, m, 0x400000, user=True, fetch=True).error_code == 0x15  # P|U|I
    assert t64(m, 0x400000, user=True) == 0xC000
    # NXE=0: the same XD bit is reserved.
    assert pf(t64, m, 0x400000, efer=LONG_EFER).error_code == 0x9
    assert pf(t64, m, 0x8000, user=True, write=True).error_code == 0x7
    assert t64(m, 0x8000, write=True) == 0x8000  # WP=0 supervisor write to RO user page
    assert pf(t64, m, 0x8000, cr0=PG_CR0 | CR0_WP, write=True).error_code == 0x3
    assert pf(t64, m, 0xFFFFFF8000005678, user=True).error_code == 0x5


def test_smep_and_smap() -> None:
    m = mem64()
    assert pf(t64, m, 0x5000, fetch=True, cr4=CR4_PAE | CR4_SMEP, efer=LONG_EFER).error_code == 0x11
    assert t64(m, 0x5000, fetch=True, cr4=CR4_PAE) == 0x5000
    assert pf(t64, m, 0x5000, cr4=CR4_PAE | CR4_SMAP).error_code == 0x1
    assert pf(t64, m, 0x5000, write=True, cr4=CR4_PAE | CR4_SMAP).error_code == 0x3
    assert t64(m, 0x5000, cr4=CR4_PAE | CR4_SMAP, ac=True) == 0x5000
    assert t64(m, 0x5000, cr4=CR4_PAE | CR4_SMAP, user=True) == 0x5000  # user access: no SMAP


def test_5level_paging() -> None:
    m = mem64()
    m.put64(0x9000 + 1 * 8, 0x1000 | URW)   # PML5E[1] -> the PML4 above
    m.put64(0x9000 + 2 * 8, 0x1000 | URW | PS)
    lin = (1 << 48) | 0x5678
    assert translate(m, PG_CR0, 0x9000, CR4_PAE | CR4_LA57, LONG_EFER, lin) == 0x5678
    assert m.get64(0x9008) & A
    e = pf(translate, m, PG_CR0, 0x9000, CR4_PAE | CR4_LA57, LONG_EFER, 2 << 48)
    assert e.error_code == 0x9
    e = pf(translate, m, PG_CR0, 0x9000, CR4_PAE | CR4_LA57, LONG_EFER, 3 << 48)
    assert e.error_code == 0


def test_is_canonical() -> None:
    assert is_canonical(0x00007FFFFFFFFFFF) and is_canonical(0xFFFF800000000000)
    assert not is_canonical(0x0000800000000000)
    assert is_canonical(0x0000800000000000, la57=True)
    assert not is_canonical(0x0100000000000000, la57=True)


# ---------------------------------------------------------------- LinearMemory
def test_linear_memory_crosses_pages() -> None:
    m = mem64()
    m.put64(0x4000 + 9 * 8, 0xE000 | URW)   # 0x9000 -> 0xE000
    m.put64(0x4000 + 10 * 8, 0xD000 | URW)  # 0xA000 -> 0xD000 (not contiguous)
    m.buf[0xEFFE:0xF000] = b"\x11\x22"
    m.buf[0xD000:0xD002] = b"\x33\x44"
    regs = ArchState(cr0=PG_CR0, cr3=0x1000, cr4=CR4_PAE, efer=LONG_EFER)
    lin = LinearMemory(m, regs)
    assert lin.read(0x9FFE, 4) == b"\x11\x22\x33\x44"
    assert lin.read_u32(0x9FFE) == 0x44332211
    assert lin.read_u16(0x9FFF) == 0x3322
    lin.write_u64(0x9FFC, 0x0102030405060708)
    assert bytes(m.buf[0xEFFC:0xF000]) == b"\x08\x07\x06\x05"
    assert bytes(m.buf[0xD000:0xD004]) == b"\x04\x03\x02\x01"
    assert lin.read_u64(0x9FFC) == 0x0102030405060708


def test_linear_memory_write_fault_is_atomic() -> None:
    m = mem64()
    m.put64(0x4000 + 9 * 8, 0xE000 | URW)   # 0xA000 left not present
    lin = LinearMemory(m, ArchState(cr0=PG_CR0, cr3=0x1000, cr4=CR4_PAE, efer=LONG_EFER))
    e = pf(lin.write, 0x9FFE, b"\xAA\xBB\xCC\xDD")
    assert (e.linear, e.error_code) == (0xA000, 0x2)
    assert bytes(m.buf[0xEFFE:0xF000]) == b"\0\0"


def test_linear_memory_cpl_decides_user_and_non_canonical_is_gp() -> None:
    m = mem64()
    st = ArchState(cr0=PG_CR0, cr3=0x1000, cr4=CR4_PAE, efer=LONG_EFER)
    st.ss.flags |= 3 << 13  # CPL 3
    lin = LinearMemory(m, st)
    assert lin.cpl == 3
    assert pf(lin.read, 0xFFFFFF8000005678, 1).error_code == 0x5
    assert lin.read(0xFFFFFF8000005678, 1, user=False) == b"\0"
    with pytest.raises(GuestFault) as info:
        lin.read(0x0000800000000000, 1)
    assert (info.value.vector, info.value.error_code) == (13, 0)


def test_linear_memory_wraps_at_4g_outside_long_mode() -> None:
    m = mem32()
    m.put32(0x1000 + 1023 * 4, 0x3000 | URW)    # linear 0xFFC00000.. -> PT 0x3000
    m.put32(0x3000 + 1023 * 4, 0x8000 | URW)    # 0xFFFFF000 -> 0x8000
    m.put32(0x1000, 0x4000 | URW)
    m.put32(0x4000, 0x9000 | URW)               # 0x00000000 -> 0x9000
    m.buf[0x8FFE:0x9000] = b"\x01\x02"
    m.buf[0x9000:0x9002] = b"\x03\x04"
    lin = LinearMemory(m, ArchState(cr0=PG_CR0, cr3=0x1000), cpl=0)
    assert lin.read(0xFFFFFFFE, 4) == b"\x01\x02\x03\x04"
