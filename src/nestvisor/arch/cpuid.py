"""CPUID leaves and feature bits (SDM Vol. 2A "CPUID"; AMD APM Vol. 3 appendix E)."""

# (leaf, register, bit): register is one of "eax", "ebx", "ecx", "edx"
FEATURES: dict[str, tuple[int, str, int]] = {
    "sse3": (1, "ecx", 0),
    "monitor": (1, "ecx", 3),
    "vmx": (1, "ecx", 5),
    "pdcm": (1, "ecx", 15),
    "pcid": (1, "ecx", 17),
    "x2apic": (1, "ecx", 21),
    "tsc-deadline": (1, "ecx", 24),
    "xsave": (1, "ecx", 26),
    "osxsave": (1, "ecx", 27),
    "hypervisor": (1, "ecx", 31),
    "fpu": (1, "edx", 0),
    "tsc": (1, "edx", 4),
    "msr": (1, "edx", 5),
    "pae": (1, "edx", 6),
    "apic": (1, "edx", 9),
    "mtrr": (1, "edx", 12),
    "pge": (1, "edx", 13),
    "mca": (1, "edx", 14),
    "pat": (1, "edx", 16),
    "clflush": (1, "edx", 19),
    "fsgsbase": (7, "ebx", 0),
    "tsc-adjust": (7, "ebx", 1),
    "smep": (7, "ebx", 7),
    "smap": (7, "ebx", 20),
    "umip": (7, "ecx", 2),
    "pku": (7, "ecx", 3),
    "la57": (7, "ecx", 16),
    "svm": (0x80000001, "ecx", 2),
    "syscall": (0x80000001, "edx", 11),
    "nx": (0x80000001, "edx", 20),
    "rdtscp": (0x80000001, "edx", 27),
    "lm": (0x80000001, "edx", 29),
}

REG_INDEX = {"eax": 0, "ebx": 1, "ecx": 2, "edx": 3}

# Leaves whose output depends on ECX (the subleaf).
INDEXED_LEAVES = frozenset((4, 7, 0xB, 0xD, 0xF, 0x10, 0x12, 0x14, 0x17, 0x18, 0x1F, 0x8000001D))

VENDOR_INTEL = (0x756E6547, 0x6C65746E, 0x49656E69)   # "GenuineIntel" in EBX, ECX, EDX
VENDOR_AMD = (0x68747541, 0x444D4163, 0x69746E65)     # "AuthenticAMD"
