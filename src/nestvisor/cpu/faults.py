"""Exceptions the guest receives. Emulation code raises these; the vCPU injects them.

They never reach an API caller: a guest's mistake gets the architectural answer (DESIGN decision 4).
"""

from __future__ import annotations


class GuestFault(Exception):
    """The guest takes exception `vector` (with `error_code` when the vector pushes one)."""

    def __init__(self, vector: int, error_code: int | None = None) -> None:
        super().__init__(vector, error_code)
        self.vector = vector
        self.error_code = error_code

    def __repr__(self) -> str:
        ec = "" if self.error_code is None else f", error_code={self.error_code:#x}"
        return f"{type(self).__name__}(vector={self.vector}{ec})"


class PageFault(GuestFault):
    """#PF: also carries the faulting linear address that goes to CR2."""

    def __init__(self, linear: int, error_code: int) -> None:
        super().__init__(14, error_code)
        self.linear = linear


def gp(error_code: int = 0) -> GuestFault:
    """#GP(error_code), the answer to most bad MSR and control-register accesses."""
    return GuestFault(13, error_code)


def ud() -> GuestFault:
    """#UD."""
    return GuestFault(6)
