"""Trap-site scanning: every trapped opcode is a candidate, with its prefixes."""

from nestvisor.cpu.sites import scan


def test_scan_finds_prefixed_sites():
    page = bytes(10) + b"\x66\x0f\x01\xd1" + bytes(4082)   # 66-prefixed XSETBV... starts at 10
    assert scan(page + b"\x00") == [10, 11]
