"""Parse the TAP lines a bundled guest prints (see the package docstring for the protocol).

>>> r = parse("ok 1 - a\\nnot ok 2 - b (check 1: got 0x0 want 0x1)\\nok 3 - c # SKIP 1 CPU\\n1..3\\n")
>>> [(t.number, t.ok, t.skip) for t in r.tests], r.failed, r.complete
([(1, True, None), (2, False, None), (3, True, '1 CPU')], ['b (check 1: got 0x0 want 0x1)'], True)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_LINE = re.compile(r"^(ok|not ok) (\d+) - (.*?)(?: # SKIP (.*))?$")
_PLAN = re.compile(r"^1\.\.(\d+)$")


@dataclass(frozen=True)
class TapTest:
    number: int
    ok: bool
    name: str  # for a failure, includes the "(check K: got G want W; ...)" detail
    skip: str | None = None  # the SKIP reason, when skipped


@dataclass
class TapResult:
    tests: list[TapTest] = field(default_factory=list)
    plan: int | None = None  # from the trailing "1..N"
    bailed_out: str | None = None  # the "Bail out!" line, if any

    @property
    def failed(self) -> list[str]:
        return [t.name for t in self.tests if not t.ok]

    @property
    def complete(self) -> bool:
        """The plan was printed, matches the lines seen, and nothing bailed out."""
        return (self.bailed_out is None and self.plan is not None
                and [t.number for t in self.tests] == list(range(1, self.plan + 1)))


def parse(text: str) -> TapResult:
    """Collect ok/not ok lines, the plan and a bail-out from a guest's serial output."""
    result = TapResult()
    for raw in text.splitlines():
        line = raw.rstrip("\r")
        if m := _LINE.match(line):
            result.tests.append(TapTest(int(m[2]), m[1] == "ok", m[3], m[4]))
        elif m := _PLAN.match(line):
            result.plan = int(m[1])
        elif line.startswith("Bail out!"):
            result.bailed_out = line
    return result
