"""CPU profiles: the CPU a guest sees (DESIGN decision 7).

The base table is what the substrate (unicorn's default x86-64 model) really executes, so
no instruction is advertised that would #UD; a profile only adds what nestvisor emulates.
A feature that is not implemented is not advertised: VMX and SVM appear here only when
nested VMX/SVM are in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from ..arch import cpuid as F
from ..arch import svm as S

Leaf = tuple[int, int, int, int]

# CPUID of the substrate's default model, leaf/subleaf -> (eax, ebx, ecx, edx), with the
# dynamic bits (APIC ID, OSXSAVE) cleared; they are filled in per vCPU.
_BASE: dict[tuple[int, int], Leaf] = {
    (0x0, 0): (0xD, *F.VENDOR_INTEL),
    (0x1, 0): (0x306C4, 0x00000800, 0xC6D82203, 0x078BFBFD),
    (0x2, 0): (0x1, 0x0, 0x0, 0x2C307D),
    (0x4, 0): (0x121, 0x1C0003F, 0x3F, 0x1),
    (0x4, 1): (0x122, 0x1C0003F, 0x3F, 0x1),
    (0x4, 2): (0x143, 0x3C0003F, 0xFFF, 0x1),
    (0x5, 0): (0x0, 0x0, 0x3, 0x0),
    (0x6, 0): (0x4, 0x0, 0x0, 0x0),
    (0x7, 0): (0x0, 0x389, 0x0, 0x0),
    # x2APIC topology (SDM CPUID leaf 0BH): SMT level with one thread, then the core level;
    # EDX (the x2APIC ID) is filled in per vCPU.
    (0xB, 0): (0x0, 0x1, 0x100, 0x0),
    (0xB, 1): (0x8, 0x1, 0x201, 0x0),
    (0xD, 0): (0x3, 0x240, 0x240, 0x0),
    (0xD, 1): (0x1, 0x0, 0x0, 0x0),
    (0x80000000, 0): (0x80000008, *F.VENDOR_INTEL),
    (0x80000001, 0): (0x306C4, 0x0, 0x21, 0x28100800),
    (0x80000002, 0): (0x7473656E, 0x6F736976, 0x69762072, 0x61757472),  # "nestvisor virtua"
    (0x80000003, 0): (0x5043206C, 0x55, 0x0, 0x0),                      # "l CPU"
    (0x80000004, 0): (0x0, 0x0, 0x0, 0x0),
    (0x80000005, 0): (0x1FF01FF, 0x1FF01FF, 0x40020140, 0x40020140),
    (0x80000006, 0): (0x0, 0x42004200, 0x2008140, 0x0),
    (0x80000007, 0): (0x0, 0x0, 0x0, 0x0),
    (0x80000008, 0): (0x3028, 0x0, 0x0, 0x0),   # MAXPHYADDR 40, linear 48
}


@dataclass
class Profile:
    name: str
    vendor: tuple[int, int, int]
    features: dict[str, bool] = field(default_factory=dict)
    description: str = ""
    leaves: dict[tuple[int, int], Leaf] = field(default_factory=dict)   # leaves beyond the base table

    @property
    def maxphyaddr(self) -> int:
        return _BASE[(0x80000008, 0)][0] & 0xFF

    def has(self, feature: str) -> bool:
        leaf, reg, bit = F.FEATURES[feature]
        return bool(self._advertised[(leaf, 0)][F.REG_INDEX[reg]] >> bit & 1)

    @cached_property
    def _advertised(self) -> dict[tuple[int, int], Leaf]:
        # has() sits on nested paths (every VMRUN checks EFER and CR4): build the table once
        return self.table()

    def table(self) -> dict[tuple[int, int], Leaf]:
        """The CPUID table this profile advertises (KVM_GET_SUPPORTED_CPUID's answer)."""
        t = {k: list(v) for k, v in _BASE.items()}
        for k, v in self.leaves.items():
            t[k] = list(v)
            if k[0] >= 0x80000000:
                t[(0x80000000, 0)][0] = max(t[(0x80000000, 0)][0], k[0])
        for leaf in ((0x0, 0), (0x80000000, 0)):
            t[leaf][1:4] = self.vendor
        # KVM sets the hypervisor bit; the substrate's leaf 1 already has it.
        for name, on in self.features.items():
            leaf, reg, bit = F.FEATURES[name]
            row = t[(leaf, 0)]
            if on:
                row[F.REG_INDEX[reg]] |= 1 << bit
            else:
                row[F.REG_INDEX[reg]] &= ~(1 << bit)
        return {k: tuple(v) for k, v in t.items()}  # type: ignore[misc]


def _profile(name: str, vendor: tuple[int, int, int], description: str,
             leaves: dict[tuple[int, int], Leaf] | None = None, **features: bool) -> Profile:
    return Profile(name, vendor, dict(features), description, dict(leaves or {}))


# APM CPUID Fn8000_000A: SVM revision 1, 8 ASIDs (as KVM offers L1), and the features nested
# SVM implements: NPT and NRIPS (no VGIF, LBRV, pause filter, ... until they work)
_SVM_LEAVES: dict[tuple[int, int], Leaf] = {
    (0x80000009, 0): (0, 0, 0, 0),
    (0x8000000A, 0): (1, 8, 0, (1 << S.SVM_FEATURE_NPT) | (1 << S.SVM_FEATURE_NRIPS)),
}


PROFILES: dict[str, Profile] = {
    "vmx": _profile("vmx", F.VENDOR_INTEL, "Intel-like CPU with nested VMX (CPUID.1:ECX.VMX and the VMX MSRs)",
                    x2apic=True, vmx=True, pcid=True, **{"tsc-deadline": True}),
    "svm": _profile("svm", F.VENDOR_AMD, "AMD-like CPU with nested SVM (CPUID 8000_0001:ECX.SVM, leaf 8000_000A)",
                    _SVM_LEAVES, x2apic=True, svm=True, **{"tsc-deadline": True}),
    "base": _profile("base", F.VENDOR_INTEL, "the substrate's CPU with a local APIC in xAPIC mode only"),
}


def get_profile(name: str, features: dict[str, bool] | None = None) -> Profile:
    """A copy of the named profile with `features` (e.g. {"x2apic": False}) applied."""
    base = PROFILES[name]
    merged = dict(base.features)
    for k, v in (features or {}).items():
        if k not in F.FEATURES:
            raise KeyError(k)
        merged[k] = v
    return Profile(base.name, base.vendor, merged, base.description, dict(base.leaves))
