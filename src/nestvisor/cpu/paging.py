"""Guest linear-to-physical translation: the x86 page walk in Python (SDM chapter 4).

`translate` walks the guest's own paging structures in guest-physical memory, checks
reserved bits and access rights, sets accessed/dirty flags, and raises `PageFault` with the
exact SDM 4.7 error code. Protection keys are not modelled (PFERR_PK never set).

PAE paging reads the four PDPTEs from memory on every walk; hardware caches them in
registers at MOV CR3 (SDM 4.4.1), and a reserved bit in a PDPTE is a #GP at that load, so
here a bad PDPTE is reported as a reserved-bit #PF instead.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from nestvisor.arch.x86 import (
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
    PFERR_I,
    PFERR_P,
    PFERR_RSVD,
    PFERR_U,
    PFERR_W,
    PTE_A,
    PTE_D,
    PTE_P,
    PTE_PS,
    PTE_RW,
    PTE_US,
    PTE_XD,
    RFLAGS_AC,
)
from nestvisor.cpu.faults import GuestFault, PageFault

__all__ = ["PhysMemory", "LinearMemory", "translate", "is_canonical"]

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_PAGE = 0x1000


class PhysMemory(Protocol):
    """Guest-physical memory (spec: unmapped reads give 0xff bytes, unmapped writes drop)."""

    def read(self, gpa: int, size: int) -> bytes: ...

    def write(self, gpa: int, data: bytes) -> None: ...


def _bits(lo: int, hi: int) -> int:
    """Mask of bits lo..hi inclusive (empty when hi < lo)."""
    if hi < lo:
        return 0
    return ((1 << (hi - lo + 1)) - 1) << lo


def is_canonical(linear: int, la57: bool = False) -> bool:
    """SDM 3.3.7.1: bits 63..47 (63..56 with LA57) all equal."""
    top = 56 if la57 else 47
    upper = linear >> top
    return upper == 0 or upper == (1 << (64 - top)) - 1


def _check_rights(linear: int, ec: int, rw: int, us: int, xd: bool, write: bool, user: bool,
                  fetch: bool, cr0: int, cr4: int, ac: bool) -> None:
    """Access rights of the whole translation (SDM 4.6 "Access Rights")."""
    if user:
        # SDM 4.6.1: user accesses need U/S=1 everywhere, R/W=1 to write, XD=0 to fetch.
        if not us or (write and not rw) or (fetch and xd):
            raise PageFault(linear, ec | PFERR_P)
        return
    if fetch:
        # SDM 4.6.1: supervisor fetches: XD, and SMEP forbids user-mode addresses.
        if xd or (us and cr4 & CR4_SMEP):
            raise PageFault(linear, ec | PFERR_P)
        return
    # SDM 4.6.1: supervisor data: SMAP forbids user-mode addresses unless AC permits it.
    if us and cr4 & CR4_SMAP and not ac:
        raise PageFault(linear, ec | PFERR_P)
    # SDM 4.6.1: supervisor writes to read-only translations fault only with CR0.WP=1.
    if write and not rw and cr0 & CR0_WP:
        raise PageFault(linear, ec | PFERR_P)


def _set_ad(mem: PhysMemory, entries: list[tuple[int, int, int]], write: bool) -> None:
    """SDM 4.8: set A in every entry used, and D in the one that maps the page on a write."""
    last = len(entries) - 1
    for i, (addr, value, size) in enumerate(entries):
        new = value | PTE_A
        if i == last and write:
            new |= PTE_D
        if new != value:
            mem.write(addr, (_U32 if size == 4 else _U64).pack(new))


def _walk32(mem: PhysMemory, cr0: int, cr3: int, cr4: int, linear: int, ec: int, write: bool,
            user: bool, fetch: bool, set_ad: bool, ac: bool, maxphyaddr: int) -> int:
    """32-bit paging (SDM 4.3)."""
    pde_addr = (cr3 & 0xFFFFF000) | ((linear >> 20) & 0xFFC)
    pde = _U32.unpack(mem.read(pde_addr, 4))[0]
    if not pde & PTE_P:
        raise PageFault(linear, ec)
    if pde & PTE_PS and cr4 & CR4_PSE:
        # SDM 4.3 Table 4-4: bits 20:13 hold PA bits 39:32 (PSE-36); 21 and bits above
        # min(MAXPHYADDR, 40) are reserved.
        rsvd = (1 << 21) | _bits(13 + min(maxphyaddr, 40) - 32, 20)
        if pde & rsvd:
            raise PageFault(linear, ec | PFERR_P | PFERR_RSVD)
        _check_rights(linear, ec, pde & PTE_RW, pde & PTE_US, False, write, user, fetch, cr0, cr4, ac)
        if set_ad:
            _set_ad(mem, [(pde_addr, pde, 4)], write)
        return (((pde >> 13) & 0xFF) << 32) | (pde & 0xFFC00000) | (linear & 0x3FFFFF)
    pte_addr = (pde & 0xFFFFF000) | ((linear >> 10) & 0xFFC)
    pte = _U32.unpack(mem.read(pte_addr, 4))[0]
    if not pte & PTE_P:
        raise PageFault(linear, ec)
    _check_rights(linear, ec, pde & pte & PTE_RW, pde & pte & PTE_US, False, write, user, fetch,
                  cr0, cr4, ac)
    if set_ad:
        _set_ad(mem, [(pde_addr, pde, 4), (pte_addr, pte, 4)], write)
    return (pte & 0xFFFFF000) | (linear & 0xFFF)


def translate(mem: PhysMemory, cr0: int, cr3: int, cr4: int, efer: int, linear: int, *,
              write: bool = False, user: bool = False, fetch: bool = False, set_ad: bool = True,
              ac: bool = False, maxphyaddr: int = 48, pdptes: Sequence[int] | None = None) -> int:
    """Translate `linear` to a guest-physical address or raise `PageFault`.

    `user` is True for a user-mode access (CPL 3, not an implicit supervisor access).
    `ac` is RFLAGS.AC as it matters for SMAP (SDM 4.6.1): pass False for implicit
    supervisor accesses made at CPL 3. The caller checks canonicality (a #GP/#SS, not a #PF).
    `pdptes`: PAE paging's PDPTE registers when they did not come from memory at CR3 (a VM
    entry with EPT loads them from the VMCS, SDM 27.3.2.4); else they are read at each walk.

    >>> translate(None, 0x10, 0, 0, 0, 0x1_2345_6789)   # paging off: identity, 32-bit
    591751049
    """
    if not cr0 & CR0_PG:
        return linear & 0xFFFFFFFF
    pae = cr4 & CR4_PAE
    # SDM 4.7: I/D is reported only when XD (PAE-type paging + NXE) or SMEP can apply.
    nxe = bool(efer & EFER_NXE) and bool(pae)
    ec = (PFERR_W if write else 0) | (PFERR_U if user else 0)
    if fetch and (nxe or cr4 & CR4_SMEP):
        ec |= PFERR_I
    if not pae:
        return _walk32(mem, cr0, cr3, cr4, linear & 0xFFFFFFFF, ec, write, user, fetch, set_ad,
                       ac, maxphyaddr)

    addr_mask = _bits(12, maxphyaddr - 1)
    xd_rsvd = 0 if nxe else PTE_XD
    entries: list[tuple[int, int, int]] = []
    if efer & (EFER_LME | EFER_LMA):
        # 4-level / 5-level paging (SDM 4.5): entries' bits 51:M are reserved.
        level = 5 if cr4 & CR4_LA57 else 4
        table = cr3 & addr_mask
        high_rsvd = _bits(maxphyaddr, 51) | xd_rsvd
    else:
        # PAE paging (SDM 4.4): bits 62:M reserved; PDPTE bits 2:1, 8:5, 63 reserved too.
        linear &= 0xFFFFFFFF
        if pdptes is None:
            pdpte_addr = (cr3 & 0xFFFFFFE0) | ((linear >> 27) & 0x18)
            pdpte = _U64.unpack(mem.read(pdpte_addr, 8))[0]
        else:
            pdpte = pdptes[(linear >> 30) & 3]
        if not pdpte & PTE_P:
            raise PageFault(linear, ec)
        if pdpte & (_bits(1, 2) | _bits(5, 8) | _bits(maxphyaddr, 63)):
            raise PageFault(linear, ec | PFERR_P | PFERR_RSVD)
        # SDM 4.4.1: PDPTEs carry no R/W, U/S or XD and are not given A bits.
        level = 2
        table = pdpte & addr_mask
        high_rsvd = _bits(maxphyaddr, 62) | xd_rsvd

    rw = PTE_RW
    us = PTE_US
    xd = 0
    while True:
        shift = 12 + 9 * (level - 1)
        addr = table | (((linear >> shift) & 0x1FF) << 3)
        entry = _U64.unpack(mem.read(addr, 8))[0]
        if not entry & PTE_P:
            raise PageFault(linear, ec)
        rsvd = high_rsvd
        large = False
        if level >= 4:
            rsvd |= PTE_PS  # SDM 4.5 Tables 4-14/4-15: PS is reserved in PML5E/PML4E
        elif level >= 2 and entry & PTE_PS:
            large = True
            rsvd |= _bits(13, shift - 1)  # SDM Tables 4-9/4-17/4-18: PAT at 12, 13.. reserved
        if entry & rsvd:
            raise PageFault(linear, ec | PFERR_P | PFERR_RSVD)
        rw &= entry
        us &= entry
        xd |= entry & PTE_XD
        entries.append((addr, entry, 8))
        if level == 1 or large:
            page_mask = (1 << shift) - 1
            phys = (entry & addr_mask & ~page_mask) | (linear & page_mask)
            break
        table = entry & addr_mask
        level -= 1

    _check_rights(linear, ec, rw, us, bool(xd) and nxe, write, user, fetch, cr0, cr4, ac)
    if set_ad:
        _set_ad(mem, entries, write)
    return phys


class LinearMemory:
    """Guest-linear view of guest-physical memory under a fixed paging state.

    Built from `regs`, anything with cr0/cr3/cr4/efer attributes (an `ArchState`). `cpl`
    defaults to `regs.cpl` and `ac` to `regs.rflags & AC` when those exist. Accesses are
    user-mode when cpl == 3 unless `user=` says otherwise (pass user=False for implicit
    supervisor accesses: descriptor tables, TSS). An access crossing a page boundary is
    translated completely before any byte moves, so a fault leaves memory unchanged.
    """

    __slots__ = ("phys", "walk", "cr0", "cr3", "cr4", "efer", "cpl", "ac", "maxphyaddr", "_long", "_la57")

    def __init__(self, phys: PhysMemory, regs: Any, cpl: int | None = None, *,
                 ac: bool | None = None, maxphyaddr: int = 48,
                 walk: Callable[[int], PhysMemory] | None = None) -> None:
        self.phys = phys
        # the memory the paging structures of a linear address are read from, when it is
        # not `phys` (L2 under EPT/NPT: nestvisor.cpu.tdp.TwoDimensional.walker)
        self.walk = walk
        self.cr0 = regs.cr0
        self.cr3 = regs.cr3
        self.cr4 = regs.cr4
        self.efer = regs.efer
        if cpl is None:
            cpl = getattr(regs, "cpl", 0)
        self.cpl = cpl
        if ac is None:
            ac = bool(getattr(regs, "rflags", 0) & RFLAGS_AC)
        self.ac = ac
        self.maxphyaddr = maxphyaddr
        self._long = bool(self.cr0 & CR0_PG) and bool(self.efer & EFER_LMA)
        self._la57 = bool(self.cr4 & CR4_LA57)

    def translate(self, linear: int, *, write: bool = False, user: bool | None = None,
                  fetch: bool = False) -> int:
        if user is None:
            user = self.cpl == 3
        mem = self.phys if self.walk is None else self.walk(linear)
        return translate(mem, self.cr0, self.cr3, self.cr4, self.efer, linear, write=write,
                         user=user, fetch=fetch, ac=self.ac, maxphyaddr=self.maxphyaddr)

    def _chunks(self, linear: int, size: int, write: bool, user: bool | None) -> list[tuple[int, int]]:
        if self._long:
            # SDM 6.3.1/3.3.7.1: a non-canonical data access is #GP(0) (the caller turns it to #SS).
            if not (is_canonical(linear, self._la57) and is_canonical(linear + size - 1, self._la57)):
                raise GuestFault(13, 0)
            wrap = (1 << 64) - 1
        else:
            wrap = 0xFFFFFFFF  # SDM 3.3.6: linear addresses are 32 bits outside IA-32e mode
        out = []
        while size:
            linear &= wrap
            n = min(size, _PAGE - (linear & (_PAGE - 1)))
            out.append((self.translate(linear, write=write, user=user), n))
            linear += n
            size -= n
        return out

    def read(self, linear: int, size: int, *, user: bool | None = None) -> bytes:
        chunks = self._chunks(linear, size, False, user)
        if len(chunks) == 1:
            return self.phys.read(chunks[0][0], size)
        return b"".join(self.phys.read(pa, n) for pa, n in chunks)

    def write(self, linear: int, data: bytes, *, user: bool | None = None) -> None:
        chunks = self._chunks(linear, len(data), True, user)
        off = 0
        for pa, n in chunks:
            self.phys.write(pa, bytes(data[off:off + n]))
            off += n

    def read_u16(self, linear: int, *, user: bool | None = None) -> int:
        return _U16.unpack(self.read(linear, 2, user=user))[0]

    def read_u32(self, linear: int, *, user: bool | None = None) -> int:
        return _U32.unpack(self.read(linear, 4, user=user))[0]

    def read_u64(self, linear: int, *, user: bool | None = None) -> int:
        return _U64.unpack(self.read(linear, 8, user=user))[0]

    def write_u16(self, linear: int, value: int, *, user: bool | None = None) -> None:
        self.write(linear, _U16.pack(value & 0xFFFF), user=user)

    def write_u32(self, linear: int, value: int, *, user: bool | None = None) -> None:
        self.write(linear, _U32.pack(value & 0xFFFFFFFF), user=user)

    def write_u64(self, linear: int, value: int, *, user: bool | None = None) -> None:
        self.write(linear, _U64.pack(value & 0xFFFFFFFFFFFFFFFF), user=user)
