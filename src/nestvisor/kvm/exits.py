"""What vcpu.run() returns: one of a closed set of exit types, as in struct kvm_run."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..arch import kvm_uapi as U


@dataclass
class IoExit:
    direction: int          # KVM_EXIT_IO_IN / KVM_EXIT_IO_OUT
    size: int               # 1, 2 or 4
    port: int
    count: int
    data: bytearray         # size * count bytes; the caller fills it for IN


@dataclass
class MmioExit:
    phys_addr: int
    data: bytearray
    len: int
    is_write: bool


@dataclass
class InternalError:
    suberror: int
    message: str


@dataclass
class SystemEvent:
    type: int


@dataclass
class DebugExit:
    exception: int
    pc: int


@dataclass
class FailEntry:
    hardware_entry_failure_reason: int
    cpu: int


@dataclass
class Exit:
    """struct kvm_run after KVM_RUN: `reason` is a KVM_EXIT_* number; one payload is set."""

    reason: int
    io: IoExit | None = None
    mmio: MmioExit | None = None
    internal: InternalError | None = None
    system_event: SystemEvent | None = None
    debug: DebugExit | None = None
    fail_entry: FailEntry | None = None
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return U.EXIT_NAMES.get(self.reason, f"KVM_EXIT_{self.reason}")

    def __repr__(self) -> str:
        payload = self.io or self.mmio or self.internal or self.system_event or self.debug or self.fail_entry
        return f"Exit({self.name}{', ' + repr(payload) if payload else ''})"
