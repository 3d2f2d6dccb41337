"""Finding trap sites: where in a run of code bytes a trapped instruction may start.

The scan is by byte pattern, so it also finds sites in code that lives in data sections or
was written at run time. Its candidates include bytes inside other instructions (an
immediate 0xF4 is not a HLT); the engine keeps only those where a block the CPU runs really
has an instruction start (ExecContext._on_count), and every candidate it keeps is decoded
exactly before anything is emulated (decode.py).
"""

from __future__ import annotations

import re

# Opcodes the L0 must see and unicorn would otherwise execute natively (SDM Vol. 2):
#   0F 30 WRMSR, 0F 32 RDMSR, 0F 31 RDTSC, 0F A2 CPUID, 0F 06 CLTS, 0F 20-23 MOV CR/DR,
#   0F 08 INVD, 0F 09 WBINVD, 0F 78/79 VMREAD/VMWRITE,
#   0F 01 group 7 (INVLPG, LMSW, XSETBV, RDTSCP), F4 HLT, F3 90 PAUSE, FB STI, 8E/17 MOV/POP SS,
#   E4-E7 / EC-EF IN/OUT, 6C-6F INS/OUTS.
# The other VMX and the SVM instructions need no site: the CPU model has neither, so they
# raise #UD; VMREAD/VMWRITE and the 0F 01 group get sites because they are frequent.
_OPCODES = re.compile(rb"\x0f[\x30\x31\x32\xa2\x06\x08\x09\x78\x79\x20-\x23\x01]|[\xf4\xfb\x8e\x17\xe4-\xe7\xec-\xef\x6c-\x6f]|\x90")
# Bytes that can precede an opcode as prefixes (legacy prefixes and REX).
_PREFIX = frozenset(b"\x66\x67\xf2\xf3\x2e\x36\x3e\x26\x64\x65\xf0") | frozenset(range(0x40, 0x50))
MAX_PREFIXES = 4


def scan(code: bytes) -> list[int]:
    """Offsets of candidate sites in the first 4096 bytes of `code` (which may carry the bytes
    that follow, so an instruction that crosses the end is seen whole)."""
    sites: set[int] = set()
    for m in _OPCODES.finditer(code):
        start = m.start()
        if m.group() == b"\x90":
            # only PAUSE (F3 90) traps; a plain NOP does not
            if start == 0 or code[start - 1] != 0xF3:
                continue
            start -= 1
        k = start
        for _ in range(MAX_PREFIXES + 1):
            if k < 4096:
                sites.add(k)
            if k == 0 or code[k - 1] not in _PREFIX:
                break
            k -= 1
    return sorted(sites)

