"""Nested paging (AMD NPT): L2 guest-physical to L1 guest-physical through the page tables
L1 names in vmcb12's nCR3, in L1's own paging format, walked in the L0 with A/D flags (APM
vol. 2 15.25 "Nested Paging"); the two-dimensional walk is tdp.py's.

APM 15.25.5: every nested-page-table access is a user-level access, and guest page-table
accesses are writes (KVM paging_tmpl.h: `nested_access = PFERR_WRITE | PFERR_USER`).
"""

from __future__ import annotations

from nestvisor.arch.x86 import (
    CR0_PE,
    CR0_PG,
    CR0_WP,
    CR4_LA57,
    CR4_PAE,
    CR4_PSE,
    EFER_LMA,
    EFER_LME,
    EFER_NXE,
    PFERR_GUEST_FINAL,
    PFERR_GUEST_PAGE,
)

from .faults import PageFault
from .paging import PhysMemory, translate
from .tdp import ACCESS_FETCH, ACCESS_WRITE, TdpFault, TwoDimensional

__all__ = ["Npt", "NptFault"]


class NptFault(TdpFault):
    """APM 15.25.6: #VMEXIT(NPF), exit_info_1 = `error_code`, exit_info_2 = the guest-physical
    address."""

    def __init__(self, gpa: int, linear: int | None, access: int, translated: bool, error_code: int) -> None:
        super().__init__(gpa, linear, access, translated)
        self.error_code = error_code


class Npt(TwoDimensional):
    """L1's nested page tables at `ncr3`, in the paging mode L1's CR4/EFER select (KVM
    nested_svm_init_mmu_context takes them from vmcb01)."""

    __slots__ = ("mem", "ncr3", "cr0", "cr4", "efer", "maxphyaddr", "pdptes", "paging_writes", "_walked")

    def __init__(self, mem: PhysMemory, ncr3: int, l1_cr4: int, l1_efer: int, maxphyaddr: int) -> None:
        self.mem = mem
        self.ncr3 = ncr3
        self.cr0 = CR0_PG | CR0_PE | CR0_WP
        self.cr4 = l1_cr4 & (CR4_PAE | CR4_PSE | CR4_LA57)
        self.efer = l1_efer & (EFER_LMA | EFER_LME | EFER_NXE)
        self.maxphyaddr = maxphyaddr
        self.pdptes = None
        self.paging_writes = True
        self._walked = {}

    def translate(self, gpa: int, access: int, *, linear: int | None = None, translated: bool = True,
                  set_ad: bool = True) -> int:
        try:
            return translate(self.mem, self.cr0, self.ncr3, self.cr4, self.efer, gpa, write=bool(access & ACCESS_WRITE),
                             user=True, fetch=bool(access & ACCESS_FETCH), set_ad=set_ad, maxphyaddr=self.maxphyaddr)
        except PageFault as f:
            ec = (f.error_code or 0) | (PFERR_GUEST_FINAL if translated else PFERR_GUEST_PAGE)
            raise NptFault(gpa, linear, access, translated, ec) from None
