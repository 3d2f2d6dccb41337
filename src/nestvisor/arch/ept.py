"""Extended page tables: entry bits, EPTP fields, the EPT-violation exit qualification
(SDM Vol. 3 29.3 "The extended page-table mechanism", 25.6.11 "Extended-Page-Table Pointer",
Table 28-7 "Exit Qualification for EPT Violations")."""

# EPT paging-structure entries (SDM Tables 29-1 .. 29-6)
EPT_READ = 1 << 0
EPT_WRITE = 1 << 1
EPT_EXEC = 1 << 2
EPT_RWX = EPT_READ | EPT_WRITE | EPT_EXEC
EPT_MEMTYPE_SHIFT = 3
EPT_MEMTYPE_MASK = 7 << EPT_MEMTYPE_SHIFT
EPT_LARGE = 1 << 7
EPT_ACCESSED = 1 << 8
EPT_DIRTY = 1 << 9

# SDM 29.3.3.1: memory types 2, 3 and 7 in a leaf entry are an EPT misconfiguration
EPT_RESERVED_MEMTYPES = frozenset({2, 3, 7})

# SDM 29.3.3.1: for a present entry, the bits that must be 0 besides those at or above
# MAXPHYADDR, by level (4 = PML4E, 3 = PDPTE, 2 = PDE, 1 = PTE) and whether it maps a page.
# A PML4E has 7:3 reserved; a non-leaf PDPTE/PDE 6:3 (7 is the page size); a 1 GiB PDPTE
# 29:12 and a 2 MiB PDE 20:12 (the address must be aligned); a PTE none (bit 7 ignored).
EPT_RESERVED = {
    (4, False): 0xF8,
    (3, False): 0x78,
    (3, True): ((1 << 30) - 1) & ~0xFFF,
    (2, False): 0x78,
    (2, True): ((1 << 21) - 1) & ~0xFFF,
    (1, True): 0,
}

# The EPT pointer (SDM 25.6.11)
EPTP_MEMTYPE_MASK = 0x7
EPTP_WALK_LENGTH_SHIFT = 3
EPTP_WALK_LENGTH_MASK = 0x7 << EPTP_WALK_LENGTH_SHIFT
EPTP_AD_ENABLE = 1 << 6
EPTP_RESERVED_LOW = 0x1F << 7    # bits 11:7
MEMTYPE_UC = 0
MEMTYPE_WB = 6

# EPT-violation exit qualification (SDM Table 28-7)
EPT_QUAL_READ = 1 << 0
EPT_QUAL_WRITE = 1 << 1
EPT_QUAL_FETCH = 1 << 2
EPT_QUAL_PERM_SHIFT = 3          # bits 5:3: the AND of the R/W/X bits of the entries walked
EPT_QUAL_LINEAR_VALID = 1 << 7
EPT_QUAL_TRANSLATED = 1 << 8     # with bit 7: the access was to the translated linear address
EPT_QUAL_NMI_UNBLOCKING = 1 << 12
