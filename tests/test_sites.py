"""Trap-site scanning: the incremental rescan finds exactly what a full scan finds."""

from hypothesis import given, settings
from hypothesis import strategies as st

from nestvisor.cpu.sites import rescan, scan

# bytes that make sites (opcodes, second bytes, prefixes) and bytes that do not
_POOL = st.sampled_from([0x0F, 0x30, 0xA2, 0x90, 0xF3, 0x66, 0x48, 0xF4, 0x01, 0x78, 0x00, 0xE4, 0xFB, 0x8E, 0xC3])


_EDITS = st.lists(st.tuples(st.integers(0, 4096), st.lists(_POOL, min_size=1, max_size=8)), max_size=12)


def _apply(page: bytes, edits: list) -> bytes:
    out = bytearray(page)
    for at, data in edits:
        out[at:at + len(data)] = bytes(data)[:4097 - at]
    return bytes(out[:4097])


@settings(max_examples=300, deadline=None)
@given(first=_EDITS, second=_EDITS)
def test_rescan_equals_scan(first, second):
    before = _apply(bytes(4097), first)
    after = _apply(before, second)
    assert rescan(before, scan(before), after) == scan(after)


def test_scan_finds_prefixed_sites():
    page = bytes(10) + b"\x66\x0f\x01\xd1" + bytes(4082)   # 66-prefixed XSETBV... starts at 10
    assert scan(page + b"\x00") == [10, 11]
