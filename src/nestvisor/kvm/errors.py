"""The one error type of the API: KVM's errno and a sentence that names the rule."""

from __future__ import annotations

import errno as _errno


class KvmError(OSError):
    """An API call was refused, as the corresponding KVM ioctl would refuse it.

    `errno` is KVM's errno (EINVAL, E2BIG, EEXIST, ...); the message names the rule. The
    VM is left exactly as it was before the call.
    """

    def __init__(self, err: int, rule: str) -> None:
        super().__init__(err, rule)

    def __str__(self) -> str:
        return f"[{_errno.errorcode.get(self.errno, self.errno)}] {self.strerror}"


def einval(rule: str) -> KvmError:
    return KvmError(_errno.EINVAL, rule)
