"""Nested EPT: L2 guest-physical to L1 guest-physical through L1's EPT tables, walked in the
L0 with accessed/dirty flags (SDM Vol. 3 29.3); the two-dimensional walk is tdp.py's.

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

from .paging import PhysMemory
from .tdp import TdpFault, TwoDimensional

__all__ = ["Ept", "EptFault", "EptMisconfig", "EptViolation"]

_U64 = struct.Struct("<Q")


class EptFault(TdpFault):
    """An L2 access EPT refuses: a nested VM exit to L1, never an exception of L2."""


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


class Ept(TwoDimensional):
    """L1's EPT hierarchy rooted at an EPTP, over L1 guest-physical memory `mem`."""

    __slots__ = ("mem", "eptp", "root", "ad", "exec_only", "maxphyaddr", "pdptes", "paging_writes", "_walked", "_addr",
                 "_high_rsvd")

    def __init__(self, mem: PhysMemory, eptp: int, maxphyaddr: int, *, exec_only: bool = True) -> None:
        self.mem = mem
        self.eptp = eptp
        self.maxphyaddr = maxphyaddr
        self._addr = _bits(12, maxphyaddr - 1)
        self._high_rsvd = _bits(maxphyaddr, 51)
        self.root = eptp & self._addr
        self.ad = bool(eptp & EPTP_AD_ENABLE)
        self.exec_only = exec_only
        self.pdptes = None
        # SDM 29.3.5: with EPT A/D enabled, paging-structure accesses are writes for EPT
        self.paging_writes = self.ad
        self._walked = {}

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
