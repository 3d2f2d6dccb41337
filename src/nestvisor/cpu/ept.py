"""Nested EPT: L2 guest-physical to L1 guest-physical through L1's EPT tables, walked in the
L0 with accessed/dirty flags (SDM Vol. 3 29.3), and the two-dimensional walk of an L2 linear
address that fills the L2 context's TLB.

Two kinds of access reach EPT (SDM 29.3.3.2, Table 28-7): accesses to the guest's own paging
structures, made while translating a linear address (qualification bit 7 set, bit 8 clear;
with EPT A/D enabled they count as writes, SDM 29.3.5), and the access to the translated
address itself (bits 7 and 8 set). Accesses the L0 makes for L2 outside a linear
translation (none today) would have bit 7 clear.
"""

from __future__ import annotations

import struct

from nestvisor.arch.ept import (
    EPT_ACCESSED,
    EPT_DIRTY,
    EPT_EXEC,
    EPT_LARGE,
    EPT_MEMTYPE_SHIFT,
    EPT_QUAL_FETCH,
    EPT_QUAL_LINEAR_VALID,
    EPT_QUAL_PERM_SHIFT,
    EPT_QUAL_READ,
    EPT_QUAL_TRANSLATED,
    EPT_QUAL_WRITE,
    EPT_READ,
    EPT_RESERVED,
    EPT_RESERVED_MEMTYPES,
    EPT_RWX,
    EPT_WRITE,
    EPTP_AD_ENABLE,
)

from .faults import PageFault
from .paging import PhysMemory, translate

__all__ = ["Ept", "EptFault", "EptMisconfig", "EptViolation"]

_U64 = struct.Struct("<Q")
# unicorn's TLB-fill access types (UC_MEM_READ/WRITE/FETCH) and page permissions (UC_PROT_*)
UC_MEM_READ, UC_MEM_WRITE, UC_MEM_FETCH = 16, 17, 18
UC_PROT_READ, UC_PROT_WRITE, UC_PROT_EXEC = 1, 2, 4
_ACCESS_OF = {UC_MEM_READ: EPT_QUAL_READ, UC_MEM_WRITE: EPT_QUAL_WRITE, UC_MEM_FETCH: EPT_QUAL_FETCH}
_PROT_OF = {UC_MEM_READ: UC_PROT_READ, UC_MEM_WRITE: UC_PROT_WRITE, UC_MEM_FETCH: UC_PROT_EXEC}


class EptFault(Exception):
    """An L2 access EPT refuses: a nested VM exit to L1, never an exception of L2."""

    def __init__(self, gpa: int, linear: int | None, access: int, translated: bool) -> None:
        super().__init__(gpa, linear)
        self.gpa = gpa
        self.linear = linear
        self.access = access            # EPT_QUAL_READ/WRITE/FETCH bits of the access
        self.translated = translated    # the access to `linear` itself, not to a paging structure


class EptViolation(EptFault):
    """SDM 29.3.3.2: exit reason 48 with `qualification` (Table 28-7)."""

    def __init__(self, gpa: int, linear: int | None, access: int, translated: bool, qualification: int) -> None:
        super().__init__(gpa, linear, access, translated)
        self.qualification = qualification


class EptMisconfig(EptFault):
    """SDM 29.3.3.1: exit reason 49; the qualification is 0."""


def _bits(lo: int, hi: int) -> int:
    return ((1 << (hi - lo + 1)) - 1) << lo


def _rights(access: int) -> int:
    return (EPT_READ if access & EPT_QUAL_READ else 0) | (EPT_WRITE if access & EPT_QUAL_WRITE else 0) \
        | (EPT_EXEC if access & EPT_QUAL_FETCH else 0)


class Ept:
    """L1's EPT hierarchy rooted at an EPTP, over L1 guest-physical memory `mem`."""

    __slots__ = ("mem", "eptp", "root", "ad", "exec_only", "maxphyaddr", "pdptes", "_addr", "_high_rsvd")

    def __init__(self, mem: PhysMemory, eptp: int, maxphyaddr: int, *, exec_only: bool = True) -> None:
        self.mem = mem
        self.eptp = eptp
        self.maxphyaddr = maxphyaddr
        self._addr = _bits(12, maxphyaddr - 1)
        self._high_rsvd = _bits(maxphyaddr, 51)
        self.root = eptp & self._addr
        self.ad = bool(eptp & EPTP_AD_ENABLE)
        self.exec_only = exec_only
        # L2's PAE PDPTE registers as VM entry loaded them from the VMCS; None once L2
        # reloads them from memory (MOV to CR3, paging-mode change)
        self.pdptes: tuple[int, int, int, int] | None = None

    def translate(self, gpa: int, access: int, *, linear: int | None = None, translated: bool = True,
                  set_ad: bool = True) -> int:
        """The L1 guest-physical address of L2 guest-physical `gpa`, or raise `EptFault`.

        `access` holds qualification access bits (EPT_QUAL_READ/WRITE/FETCH); `linear` is the
        linear address being translated, if any, and `translated` says whether this is the
        access to it (else to a guest paging structure).
        """
        table = self.root
        rights = EPT_RWX
        level = 4
        walked: list[tuple[int, int]] = []
        while True:
            shift = 12 + 9 * (level - 1)
            addr = table | (((gpa >> shift) & 0x1FF) << 3)
            entry = _U64.unpack(self.mem.read(addr, 8))[0]
            perm = entry & EPT_RWX
            rights &= perm
            if not perm:
                raise self._violation(gpa, linear, translated, access, rights)
            leaf = level == 1 or (level in (2, 3) and bool(entry & EPT_LARGE))
            if self._misconfigured(entry, perm, level, leaf):
                raise EptMisconfig(gpa, linear, access, translated)
            walked.append((addr, entry))
            if leaf:
                break
            table = entry & self._addr
            level -= 1
        if _rights(access) & ~rights:
            raise self._violation(gpa, linear, translated, access, rights)
        if self.ad and set_ad:
            # SDM 29.3.5: A in every entry used, D in the leaf on a write
            last = len(walked) - 1
            for i, (addr, e) in enumerate(walked):
                new = e | EPT_ACCESSED | (EPT_DIRTY if i == last and access & EPT_QUAL_WRITE else 0)
                if new != e:
                    self.mem.write(addr, _U64.pack(new))
        page_mask = (1 << shift) - 1
        return (entry & self._addr & ~page_mask) | (gpa & page_mask)

    def _misconfigured(self, entry: int, perm: int, level: int, leaf: bool) -> bool:
        """SDM 29.3.3.1: write without read, execute-only when not supported, reserved bits,
        a reserved memory type in a leaf."""
        if perm & EPT_WRITE and not perm & EPT_READ:
            return True
        if perm == EPT_EXEC and not self.exec_only:
            return True
        if entry & (self._high_rsvd | EPT_RESERVED[(level, leaf)]):
            return True
        return leaf and (entry >> EPT_MEMTYPE_SHIFT) & 7 in EPT_RESERVED_MEMTYPES

    @staticmethod
    def _violation(gpa: int, linear: int | None, translated: bool, access: int, rights: int) -> EptViolation:
        qual = access | (rights << EPT_QUAL_PERM_SHIFT)
        if linear is not None:
            qual |= EPT_QUAL_LINEAR_VALID | (EPT_QUAL_TRANSLATED if translated else 0)
        return EptViolation(gpa, linear, access, translated, qual)

    # ---- L2 memory as the guest's page walk and the L0 see it --------------------------------

    def walker(self, linear: int, *, set_ad: bool = True) -> _PagingStructures:
        """L2 guest-physical memory for the paging-structure accesses of translating `linear`."""
        return _PagingStructures(self, linear, set_ad)

    def data(self, linear: int | None = None) -> _Data:
        """L2 guest-physical memory for data accesses (of `linear`, when known)."""
        return _Data(self, linear)

    def translate_linear(self, linear: int, cr0: int, cr3: int, cr4: int, efer: int, *, write: bool = False,
                         fetch: bool = False, user: bool = False, set_ad: bool = True) -> int:
        """The two-dimensional walk: L2 linear -> L2 guest-physical -> L1 guest-physical.
        Raises PageFault (L2's own paging) or EptFault."""
        gpa = translate(self.walker(linear, set_ad=set_ad), cr0, cr3, cr4, efer, linear, write=write, user=user,
                        fetch=fetch, set_ad=set_ad, maxphyaddr=self.maxphyaddr, pdptes=self.pdptes)
        access = EPT_QUAL_WRITE if write else EPT_QUAL_FETCH if fetch else EPT_QUAL_READ
        return self.translate(gpa, access, linear=linear, set_ad=set_ad)

    def fill(self, linear: int, access: int, cr0: int, cr3: int, cr4: int, efer: int,
             user: bool) -> tuple[int, int]:
        """A TLB entry for the page of `linear` (unicorn's UC_HOOK_TLB_FILL, `access` one of
        UC_MEM_READ/WRITE/FETCH): (L1 guest-physical page, UC_PROT_* permissions).

        The permissions are those of the access plus read/execute when they need no flag
        update; write is granted only to a write, so that the first write to a page reaches
        this walk and sets the dirty flags (guest PTE and EPT)."""
        kind = _ACCESS_OF[access]
        hpa = self.translate_linear(linear, cr0, cr3, cr4, efer, write=kind == EPT_QUAL_WRITE,
                                    fetch=kind == EPT_QUAL_FETCH, user=user)
        prot = _PROT_OF[access]
        for extra, fetch in ((UC_PROT_READ, False), (UC_PROT_EXEC, True)):
            if prot & extra:
                continue
            try:
                self.translate_linear(linear, cr0, cr3, cr4, efer, fetch=fetch, user=user, set_ad=False)
            except (PageFault, EptFault):
                continue
            prot |= extra
        return hpa & ~0xFFF, prot


class _PagingStructures:
    """L2 paging structures read (and A/D-updated) during one linear translation (SDM 29.3.3.2:
    qualification bit 7 set, bit 8 clear)."""

    __slots__ = ("ept", "linear", "set_ad")

    def __init__(self, ept: Ept, linear: int, set_ad: bool) -> None:
        self.ept = ept
        self.linear = linear
        self.set_ad = set_ad

    def read(self, gpa: int, size: int) -> bytes:
        # SDM 29.3.5: with EPT A/D enabled, paging-structure accesses are writes for EPT
        access = EPT_QUAL_READ | (EPT_QUAL_WRITE if self.ept.ad else 0)
        hpa = self.ept.translate(gpa, access, linear=self.linear, translated=False, set_ad=self.set_ad)
        return self.ept.mem.read(hpa, size)

    def write(self, gpa: int, data: bytes) -> None:
        # the guest's A/D update: read then write of the entry
        hpa = self.ept.translate(gpa, EPT_QUAL_READ | EPT_QUAL_WRITE, linear=self.linear, translated=False,
                                 set_ad=self.set_ad)
        self.ept.mem.write(hpa, data)


class _Data:
    """L2 guest-physical memory for data accesses by the L0 (event delivery, instruction
    operands)."""

    __slots__ = ("ept", "linear")

    def __init__(self, ept: Ept, linear: int | None) -> None:
        self.ept = ept
        self.linear = linear

    def read(self, gpa: int, size: int) -> bytes:
        return self._span(gpa, size, EPT_QUAL_READ, None)

    def write(self, gpa: int, data: bytes) -> None:
        self._span(gpa, len(data), EPT_QUAL_WRITE, data)

    def _span(self, gpa: int, size: int, access: int, data: bytes | None) -> bytes:
        # translate every page first, so a fault leaves memory unchanged
        pieces = []
        while size > 0:
            n = min(size, 0x1000 - (gpa & 0xFFF))
            pieces.append((self.ept.translate(gpa, access, linear=self.linear), n))
            gpa += n
            size -= n
        if data is None:
            return b"".join(self.ept.mem.read(hpa, n) for hpa, n in pieces)
        off = 0
        for hpa, n in pieces:
            self.ept.mem.write(hpa, data[off:off + n])
            off += n
        return b""
