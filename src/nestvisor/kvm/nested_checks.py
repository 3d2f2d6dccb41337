"""The one rule evaluator of both vendors' nested entry checks (KVM's CC() in
arch/x86/kvm/{vmx,svm}/nested.c).

A check function states its rules one `cc` line each: the rule's name (KVM's CC() expression
in words), its source (SDM/APM section or KVM function) and the values involved. `run` calls
the check function and returns the first failing rule as a `CheckFailure`, which the caller
turns into the kvm_nested_vmenter_failed trace event and the architectural failure.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class CheckFailure:
    name: str
    source: str
    values: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        vals = " ".join(f"{k}={v:#x}" for k, v in self.values.items())
        return f"{self.name} ({self.source}){': ' + vals if vals else ''}"


class _Failed(Exception):
    def __init__(self, failure: CheckFailure) -> None:
        self.failure = failure


def cc(failed: bool, name: str, source: str, **values: int) -> None:
    """One rule: when `failed`, the check stops here with this rule's failure."""
    if failed:
        raise _Failed(CheckFailure(name, source, values))


def run(fn: Callable[..., None], *args: object) -> CheckFailure | None:
    """Run a check function made of `cc` rules; the first failing rule, or None.

    >>> run(lambda asid: cc(asid == 0, "ASID is not 0", "nested_vmcb_check_controls"), 0)
    CheckFailure(name='ASID is not 0', source='nested_vmcb_check_controls', values={})
    """
    try:
        fn(*args)
    except _Failed as f:
        return f.failure
    return None
