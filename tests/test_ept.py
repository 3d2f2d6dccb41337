"""Unit tests for the EPT walk (SDM Vol. 3 29.3 "The Extended Page-Table Mechanism", Table
28-7 "Exit Qualification for EPT Violations") over a bytearray-backed L1 guest-physical memory."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nestvisor.arch.ept import (
    EPT_ACCESSED,
    EPT_DIRTY,
    EPT_EXEC,
    EPT_LARGE,
    EPT_QUAL_FETCH,
    EPT_QUAL_LINEAR_VALID,
    EPT_QUAL_READ,
    EPT_QUAL_TRANSLATED,
    EPT_QUAL_WRITE,
    EPT_READ,
    EPT_RWX,
    EPT_WRITE,
    EPTP_AD_ENABLE,
    MEMTYPE_WB,
)
from nestvisor.arch.x86 import CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME
from nestvisor.cpu.ept import Ept, EptMisconfig, EptViolation

R, W, X, RWX = EPT_READ, EPT_WRITE, EPT_EXEC, EPT_RWX
A, D, LARGE = EPT_ACCESSED, EPT_DIRTY, EPT_LARGE
WB = MEMTYPE_WB << 3
READ, WRITE, FETCH = EPT_QUAL_READ, EPT_QUAL_WRITE, EPT_QUAL_FETCH
LINEAR = EPT_QUAL_LINEAR_VALID | EPT_QUAL_TRANSLATED   # the access to a translated linear address
MAXPHYADDR = 40
GIB, MIB = 1 << 30, 1 << 20

# The tables of `ept()`, in L1 guest-physical memory
PML4, PDPT, PD, PT, PT_RX = 0x1000, 0x2000, 0x3000, 0x4000, 0x5000
EPTP = PML4 | MEMTYPE_WB | (3 << 3)   # WB, 4-level


class FakeMem:
    """L1 guest-physical memory: unmapped reads give 0xff, unmapped writes are dropped."""

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

    def put64(self, gpa: int, v: int) -> None:
        struct.pack_into("<Q", self.buf, gpa, v)

    def get64(self, gpa: int) -> int:
        return struct.unpack_from("<Q", self.buf, gpa)[0]


def ept_mem() -> FakeMem:
    """PML4[0] -> PDPT; PDPT[0] -> PD; PDPT[1]: 1 GiB page at 7 GiB; PD[0] -> PT; PD[1]: 2 MiB
    page at 10 MiB; PD[3] -> PT_RX with R-X rights. PT maps 0x3000 -> 0x7000 (RWX), 0x5000 ->
    0x8000 (R), 0x6000 -> 0x9000 (execute-only); PT_RX maps 6 MiB -> 0xB000 (RWX)."""
    m = FakeMem()
    m.put64(PML4, PDPT | RWX)
    m.put64(PDPT, PD | RWX)
    m.put64(PDPT + 8, 7 * GIB | LARGE | WB | RWX)
    m.put64(PD, PT | RWX)
    m.put64(PD + 8, 10 * MIB | LARGE | WB | RWX)
    m.put64(PD + 3 * 8, PT_RX | R | X)
    m.put64(PT + 3 * 8, 0x7000 | WB | RWX)
    m.put64(PT + 5 * 8, 0x8000 | WB | R)
    m.put64(PT + 6 * 8, 0x9000 | WB | X)
    m.put64(PT_RX, 0xB000 | WB | RWX)
    return m


def ept(m: FakeMem, *, ad: bool = False, exec_only: bool = True) -> Ept:
    return Ept(m, EPTP | (EPTP_AD_ENABLE if ad else 0), MAXPHYADDR, exec_only=exec_only)


def violation(e: Ept, gpa: int, access: int, **kw) -> EptViolation:
    with pytest.raises(EptViolation) as info:
        e.translate(gpa, access, **kw)
    return info.value


def misconfig(e: Ept, gpa: int, access: int = READ, **kw) -> EptMisconfig:
    with pytest.raises(EptMisconfig) as info:
        e.translate(gpa, access, **kw)
    return info.value


# ---------------------------------------------------------------- addresses
def test_4k_2m_and_1g_leaves_give_the_right_address() -> None:
    e = ept(ept_mem())
    assert e.translate(0x3123, READ) == 0x7123
    assert e.translate(0x3FFF, WRITE) == 0x7FFF
    assert e.translate(2 * MIB + 0xABCDE, READ) == 10 * MIB + 0xABCDE
    assert e.translate(GIB + 0x0123_4567, FETCH) == 7 * GIB + 0x0123_4567
    assert e.translate(6 * MIB + 0x10, FETCH) == 0xB010


def test_the_root_comes_from_the_eptp_address_bits() -> None:
    m = ept_mem()
    e = Ept(m, EPTP | EPTP_AD_ENABLE | (1 << 63), MAXPHYADDR)   # flags and high bits are not the root
    assert e.root == PML4 and e.translate(0x3000, READ) == 0x7000


# ---------------------------------------------------------------- violations
@pytest.mark.parametrize("gpa", [512 * GIB, 2 * GIB, 8 * MIB, 0x4000], ids=["pml4e", "pdpte", "pde", "pte"])
@pytest.mark.parametrize("access", [READ, WRITE, FETCH])
def test_not_present_at_each_level(gpa: int, access: int) -> None:
    """The entry at that level is 0, so the AND of the rights walked (bits 5:3) is 0."""
    e = ept(ept_mem())
    v = violation(e, gpa + 0x18, access, linear=0x7000_0018)
    assert (v.qualification, v.gpa, v.linear, v.access) == (access | LINEAR, gpa + 0x18, 0x7000_0018, access)
    assert violation(e, gpa, access).qualification == access   # no linear address: bits 7, 8 clear
    # an access to a paging structure of the guest, while translating a linear address
    assert violation(e, gpa, access, linear=0x1000, translated=False).qualification == access | EPT_QUAL_LINEAR_VALID


def test_permission_violation_reports_the_and_of_the_rights_walked() -> None:
    e = ept(ept_mem())
    assert violation(e, 0x5010, WRITE, linear=0x5010).qualification == WRITE | (R << 3) | LINEAR    # 0x18a
    assert violation(e, 0x5010, FETCH).qualification == FETCH | (R << 3)
    assert violation(e, 0x6000, READ).qualification == READ | (X << 3)                      # execute-only
    # R-X in the PDE and RWX in the PTE: the AND is R-X
    assert violation(e, 6 * MIB, WRITE).qualification == WRITE | ((R | X) << 3)
    assert violation(e, 6 * MIB, READ | WRITE).qualification == READ | WRITE | ((R | X) << 3)


def test_allowed_accesses() -> None:
    e = ept(ept_mem())
    assert e.translate(0x5010, READ) == 0x8010
    assert e.translate(0x6010, FETCH) == 0x9010
    assert e.translate(6 * MIB, READ | FETCH) == 0xB000


# ---------------------------------------------------------------- misconfigurations
@pytest.mark.parametrize("rights", [W, W | X])
def test_writable_without_readable_is_a_misconfig(rights: int) -> None:
    m = ept_mem()
    m.put64(PT + 3 * 8, 0x7000 | WB | rights)
    f = misconfig(ept(m), 0x3010, WRITE, linear=0x3010)   # even for an access it would allow
    assert (f.gpa, f.linear) == (0x3010, 0x3010)
    m = ept_mem()
    m.put64(PML4, PDPT | W)                               # in a non-leaf entry too
    misconfig(ept(m), 0x3010)


def test_execute_only_needs_the_capability() -> None:
    m = ept_mem()
    assert ept(m).translate(0x6000, FETCH) == 0x9000
    misconfig(ept(m, exec_only=False), 0x6000, FETCH)


@pytest.mark.parametrize("bit", [MAXPHYADDR, 45, 51])
@pytest.mark.parametrize("entry", [PML4, PDPT, PD, PT + 3 * 8])
def test_reserved_bits_above_maxphyaddr(entry: int, bit: int) -> None:
    m = ept_mem()
    m.put64(entry, m.get64(entry) | (1 << bit))
    assert misconfig(ept(m), 0x3000).gpa == 0x3000


def test_bits_above_51_are_not_reserved() -> None:
    m = ept_mem()
    m.put64(PT + 3 * 8, m.get64(PT + 3 * 8) | (1 << 52) | (1 << 63))   # ignored; suppress #VE
    assert ept(m).translate(0x3000, READ) == 0x7000


@pytest.mark.parametrize("memtype", range(8))
def test_leaf_memory_types_2_3_7_are_misconfigs(memtype: int) -> None:
    for entry, gpa in ((PT + 3 * 8, 0x3000), (PD + 8, 2 * MIB), (PDPT + 8, GIB)):
        m = ept_mem()
        m.put64(entry, m.get64(entry) & ~(7 << 3) | (memtype << 3))
        e = ept(m)
        if memtype in (2, 3, 7):
            assert misconfig(e, gpa).gpa == gpa
        else:   # the leaf maps the region's first byte to its address field
            assert e.translate(gpa, READ) == m.get64(entry) & 0x000FFFFFFFFFF000


@pytest.mark.parametrize("entry, bits", [
    (PML4, 1 << 3),           # PML4E bits 7:3
    (PML4, LARGE),
    (PDPT, 1 << 6),           # non-leaf PDPTE bits 6:3
    (PD, 6 << 3),             # non-leaf PDE: no memory type
])
def test_non_leaf_reserved_bits(entry: int, bits: int) -> None:
    m = ept_mem()
    m.put64(entry, m.get64(entry) | bits)
    assert misconfig(ept(m), 0x3000).gpa == 0x3000


@pytest.mark.parametrize("bit", range(12, 21))
def test_2m_leaf_address_bits_20_12_are_reserved(bit: int) -> None:
    m = ept_mem()
    m.put64(PD + 8, m.get64(PD + 8) | (1 << bit))
    assert misconfig(ept(m), 2 * MIB).gpa == 2 * MIB


@pytest.mark.parametrize("bit", [12, 20, 21, 29])
def test_1g_leaf_address_bits_29_12_are_reserved(bit: int) -> None:
    m = ept_mem()
    m.put64(PDPT + 8, m.get64(PDPT + 8) | (1 << bit))
    assert misconfig(ept(m), GIB).gpa == GIB


def test_misconfig_is_found_before_a_later_missing_entry() -> None:
    m = ept_mem()
    m.put64(PD + 4 * 8, 0x6000 | W)   # a write-only non-leaf PDE over nothing
    assert misconfig(ept(m), 8 * MIB).gpa == 8 * MIB


# ---------------------------------------------------------------- accessed and dirty flags
def test_no_flags_without_the_eptp_enable() -> None:
    m = ept_mem()
    e = ept(m)
    e.translate(0x3000, READ)
    e.translate(0x3000, WRITE)
    e.translate(2 * MIB, WRITE)
    assert m.writes == [] and not e.paging_writes


def test_a_in_every_entry_walked_d_only_in_the_leaf_on_a_write() -> None:
    m = ept_mem()
    e = ept(m, ad=True)
    assert e.paging_writes   # SDM 29.3.5: guest paging-structure accesses count as writes
    e.translate(0x3000, READ)
    assert [m.get64(a) & (A | D) for a in (PML4, PDPT, PD, PT + 3 * 8)] == [A, A, A, A]
    e.translate(0x3000, FETCH)
    assert m.get64(PT + 3 * 8) & D == 0
    e.translate(0x3000, WRITE)
    assert [m.get64(a) & (A | D) for a in (PML4, PDPT, PD, PT + 3 * 8)] == [A, A, A, A | D]


@pytest.mark.parametrize("entry, gpa", [(PD + 8, 2 * MIB), (PDPT + 8, GIB)])
def test_d_in_a_large_leaf(entry: int, gpa: int) -> None:
    m = ept_mem()
    e = ept(m, ad=True)
    e.translate(gpa, READ)
    assert m.get64(entry) & (A | D) == A
    e.translate(gpa, WRITE)
    assert m.get64(entry) & (A | D) == A | D
    assert m.get64(PML4) & (A | D) == A


def test_no_flags_when_set_ad_is_off_or_the_walk_fails() -> None:
    m = ept_mem()
    e = ept(m, ad=True)
    e.translate(0x3000, WRITE, set_ad=False)
    violation(e, 0x5000, WRITE)
    assert m.writes == []


# ---------------------------------------------------------------- properties
_RIGHTS = [R, R | W, R | X, R | W | X, X]   # every combination that is not a misconfiguration


@settings(max_examples=200, deadline=None)
@given(
    level=st.sampled_from([1, 2, 3]),
    frame=st.integers(0, (1 << (MAXPHYADDR - 12)) - 1),
    gpa=st.integers(0, (1 << 48) - 1),
    rights=st.lists(st.sampled_from(_RIGHTS), min_size=4, max_size=4),
    access=st.sampled_from([READ, WRITE, FETCH, READ | WRITE]),
    linear=st.one_of(st.none(), st.integers(0, (1 << 64) - 1)),
    ad=st.booleans(),
)
def test_walk_matches_a_model(level: int, frame: int, gpa: int, rights: list[int], access: int,
                              linear: int | None, ad: bool) -> None:
    """One path of tables to a leaf at `level` for `gpa`: the address is the leaf's frame plus
    the offset in the page; a refused access has the AND of the rights in bits 5:3."""
    size = 1 << (12 + 9 * (level - 1))
    base = frame << 12 & ~(size - 1)
    m = FakeMem()
    tables = [0x1000, 0x2000, 0x3000, 0x4000]
    for i, lvl in enumerate(range(4, level - 1, -1)):
        index = gpa >> (12 + 9 * (lvl - 1)) & 0x1FF
        leaf = lvl == level
        entry = (base | WB | (LARGE if lvl > 1 else 0)) if leaf else tables[i + 1]
        m.put64(tables[i] + index * 8, entry | rights[i])
    e = Ept(m, 0x1000 | MEMTYPE_WB | (3 << 3) | (EPTP_AD_ENABLE if ad else 0), MAXPHYADDR)
    allowed = R | W | X
    for r in rights[:5 - level]:
        allowed &= r
    wanted = (R if access & READ else 0) | (W if access & WRITE else 0) | (X if access & FETCH else 0)
    if wanted & ~allowed:
        v = violation(e, gpa, access, linear=linear)
        assert v.qualification == access | allowed << 3 | (0 if linear is None else LINEAR)
        assert v.gpa == gpa and m.writes == []
    else:
        assert e.translate(gpa, access, linear=linear) == base | (gpa & (size - 1))
        assert (m.writes != []) == ad


# ---------------------------------------------------------------- through a guest walk
G_PML4, G_PDPT, G_PD, G_PT = 0x10000, 0x11000, 0x12000, 0x13000
P_RW_A = 0x23   # present, writable, accessed


def guest() -> FakeMem:
    """EPT maps guest-physical [0, 2 MiB) to itself; the guest's 4-level tables map linear
    0x5000 to 0x5000 and linear 1 GiB through a PD at 4 MiB, which EPT does not map."""
    m = FakeMem()
    m.put64(PML4, PDPT | RWX)
    m.put64(PDPT, PD | RWX)
    m.put64(PD, 0 | LARGE | WB | RWX)
    m.put64(G_PML4, G_PDPT | P_RW_A)
    m.put64(G_PDPT, G_PD | P_RW_A)
    m.put64(G_PDPT + 8, 4 * MIB | P_RW_A)
    m.put64(G_PD, G_PT | P_RW_A)
    m.put64(G_PT + 5 * 8, 0x5000 | P_RW_A | 0x40)
    return m


_LONG = (CR0_PE | CR0_PG, G_PML4, CR4_PAE, EFER_LME | EFER_LMA)


@pytest.mark.parametrize("ad, access", [(False, READ), (True, READ | WRITE)])
def test_guest_paging_structure_access_has_bit_7_without_bit_8(ad: bool, access: int) -> None:
    e = ept(guest(), ad=ad)
    assert e.translate_linear(0x5123, *_LONG) == 0x5123
    with pytest.raises(EptViolation) as info:
        e.translate_linear(GIB + 0x10, *_LONG)
    v = info.value
    assert (v.gpa, v.linear, v.translated) == (4 * MIB, GIB + 0x10, False)
    assert v.qualification == access | EPT_QUAL_LINEAR_VALID   # with A/D flags, a write (SDM 29.3.5)
