"""Two-dimensional paging (KVM's TDP): an L2 linear address goes through L2's own page
tables to an L2 guest-physical address, and every guest-physical address -- of a guest
paging-structure entry or of the final access -- through L1's second-level tables (EPT or
NPT) to an L1 guest-physical address. This is what fills the L2 context's TLB.

A second-level format supplies `translate(gpa, access, linear=, translated=, set_ad=)`;
`access` holds ACCESS_READ/WRITE/FETCH bits. Accesses to the guest's paging structures count
as writes when `paging_writes` is set (EPT with A/D flags, SDM 29.3.5; always for NPT, KVM
paging_tmpl.h `nested_access`), and as a read plus a write for an A/D update otherwise.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from nestvisor.arch.x86 import CR4_LA57, EFER_LMA

from .faults import GuestFault, PageFault
from .paging import PhysMemory, is_canonical, translate

__all__ = ["ACCESS_FETCH", "ACCESS_READ", "ACCESS_WRITE", "TdpFault", "TwoDimensional"]

ACCESS_READ, ACCESS_WRITE, ACCESS_FETCH = 1, 2, 4   # the EPT qualification's access bits
# unicorn's TLB-fill access types (UC_MEM_READ/WRITE/FETCH) and page permissions (UC_PROT_*)
UC_MEM_READ, UC_MEM_WRITE, UC_MEM_FETCH = 16, 17, 18
UC_PROT_READ, UC_PROT_WRITE, UC_PROT_EXEC = 1, 2, 4
_ACCESS_OF = {UC_MEM_READ: ACCESS_READ, UC_MEM_WRITE: ACCESS_WRITE, UC_MEM_FETCH: ACCESS_FETCH}
_PROT_OF = {UC_MEM_READ: UC_PROT_READ, UC_MEM_WRITE: UC_PROT_WRITE, UC_MEM_FETCH: UC_PROT_EXEC}


class TdpFault(Exception):
    """An L2 access the second level refuses: a nested exit to L1, never an exception of L2."""

    def __init__(self, gpa: int, linear: int | None, access: int, translated: bool) -> None:
        super().__init__(gpa, linear)
        self.gpa = gpa
        self.linear = linear
        self.access = access            # ACCESS_* bits of the access
        self.translated = translated    # the access to `linear` itself, not to a paging structure


class TwoDimensional(ABC):
    """The walk shared by EPT and NPT; subclasses define `translate` and set these."""

    __slots__ = ()
    mem: PhysMemory
    maxphyaddr: int
    paging_writes: bool
    # L2's PAE PDPTE registers when VM entry loaded them from the VMCS (EPT); None while they
    # come from memory at L2's CR3
    pdptes: Sequence[int] | None
    # second-level page -> (L1 page, access bits walked with A/D set), since the last flush
    _walked: dict[int, tuple[int, int]]

    @abstractmethod
    def translate(self, gpa: int, access: int, *, linear: int | None = None, translated: bool = True,
                  set_ad: bool = True) -> int:
        """The L1 guest-physical address of L2's `gpa` (SDM 29.3.2, APM 15.25.5), or TdpFault."""

    def lookup(self, gpa: int, access: int, *, linear: int | None = None, translated: bool = True,
               set_ad: bool = True) -> int:
        """`translate` through a cache of the second-level translations already walked (with
        their A/D flags set) since the last TLB flush, as a CPU caches them (SDM 29.4, APM
        15.16): L1 changing its tables is seen after INVEPT / a VMRUN TLB flush."""
        cache = self._walked
        page = gpa >> 12
        hit = cache.get(page)
        if hit is not None and not access & ~hit[1]:
            return hit[0] | (gpa & 0xFFF)
        hpa = self.translate(gpa, access, linear=linear, translated=translated, set_ad=set_ad)
        if set_ad:
            cache[page] = (hpa & ~0xFFF, access | (hit[1] if hit is not None and hit[0] == hpa & ~0xFFF else 0))
        return hpa

    def flush(self) -> None:
        """Forget the cached translations (a TLB flush of the L2 context)."""
        self._walked = {}

    def walker(self, linear: int, *, set_ad: bool = True) -> _PagingStructures:
        """L2 guest-physical memory for the paging-structure accesses of translating `linear`."""
        return _PagingStructures(self, linear, set_ad)

    def data(self, linear: int | None = None) -> _Data:
        """L2 guest-physical memory for data accesses (of `linear`, when known)."""
        return _Data(self, linear)

    def translate_linear(self, linear: int, cr0: int, cr3: int, cr4: int, efer: int, *, write: bool = False,
                         fetch: bool = False, user: bool = False, set_ad: bool = True) -> int:
        """L2 linear -> L2 guest-physical -> L1 guest-physical. Raises PageFault (L2's own
        paging) or TdpFault."""
        gpa = translate(self.walker(linear, set_ad=set_ad), cr0, cr3, cr4, efer, linear, write=write, user=user,
                        fetch=fetch, set_ad=set_ad, maxphyaddr=self.maxphyaddr, pdptes=self.pdptes)
        access = ACCESS_WRITE if write else ACCESS_FETCH if fetch else ACCESS_READ
        return self.lookup(gpa, access, linear=linear, set_ad=set_ad)

    def fill(self, linear: int, access: int, cr0: int, cr3: int, cr4: int, efer: int,
             user: bool) -> tuple[int, int]:
        """A TLB entry for the page of `linear` (unicorn's UC_HOOK_TLB_FILL, `access` one of
        UC_MEM_READ/WRITE/FETCH): (L1 guest-physical page, UC_PROT_* permissions).

        The permissions are those of the access plus read/execute when they need no flag
        update; write is granted only to a write, so that the first write to a page reaches
        this walk and sets the dirty flags (guest PTE and second level)."""
        # unicorn's virtual TLB does not check canonical form: SDM 3.3.7.1, a #GP(0) (a stack
        # access would be #SS, which the fill cannot tell apart)
        if efer & EFER_LMA and not is_canonical(linear, bool(cr4 & CR4_LA57)):
            raise GuestFault(13, 0)
        kind = _ACCESS_OF[access]
        hpa = self.translate_linear(linear, cr0, cr3, cr4, efer, write=kind == ACCESS_WRITE,
                                    fetch=kind == ACCESS_FETCH, user=user)
        prot = _PROT_OF[access]
        for extra, fetch in ((UC_PROT_READ, False), (UC_PROT_EXEC, True)):
            if prot & extra:
                continue
            try:
                self.translate_linear(linear, cr0, cr3, cr4, efer, fetch=fetch, user=user, set_ad=False)
            except (PageFault, TdpFault):
                continue
            prot |= extra
        return hpa & ~0xFFF, prot


class _PagingStructures:
    """L2 paging structures read (and A/D-updated) during one linear translation (SDM 29.3.3.2:
    qualification bit 7 set, bit 8 clear)."""

    __slots__ = ("tdp", "linear", "set_ad")

    def __init__(self, tdp: TwoDimensional, linear: int, set_ad: bool) -> None:
        self.tdp = tdp
        self.linear = linear
        self.set_ad = set_ad

    def read(self, gpa: int, size: int) -> bytes:
        access = ACCESS_READ | (ACCESS_WRITE if self.tdp.paging_writes else 0)
        hpa = self.tdp.lookup(gpa, access, linear=self.linear, translated=False, set_ad=self.set_ad)
        return self.tdp.mem.read(hpa, size)

    def write(self, gpa: int, data: bytes) -> None:
        # the guest's A/D update: read then write of the entry
        hpa = self.tdp.lookup(gpa, ACCESS_READ | ACCESS_WRITE, linear=self.linear, translated=False,
                              set_ad=self.set_ad)
        self.tdp.mem.write(hpa, data)


class _Data:
    """L2 guest-physical memory for data accesses by the L0 (event delivery, instruction
    operands)."""

    __slots__ = ("tdp", "linear")

    def __init__(self, tdp: TwoDimensional, linear: int | None) -> None:
        self.tdp = tdp
        self.linear = linear

    def read(self, gpa: int, size: int) -> bytes:
        return self._span(gpa, size, ACCESS_READ, None)

    def write(self, gpa: int, data: bytes) -> None:
        self._span(gpa, len(data), ACCESS_WRITE, data)

    def _span(self, gpa: int, size: int, access: int, data: bytes | None) -> bytes:
        # translate every page first, so a fault leaves memory unchanged
        pieces = []
        while size > 0:
            n = min(size, 0x1000 - (gpa & 0xFFF))
            pieces.append((self.tdp.lookup(gpa, access, linear=self.linear), n))
            gpa += n
            size -= n
        if data is None:
            return b"".join(self.tdp.mem.read(hpa, n) for hpa, n in pieces)
        off = 0
        for hpa, n in pieces:
            self.tdp.mem.write(hpa, data[off:off + n])
            off += n
        return b""
