"""A VM: guest-physical memory (memory slots) and its vCPUs, as KVM_CREATE_VM gives."""

from __future__ import annotations

import bisect
import errno
import mmap
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import KvmError, einval
from .lapic import ApicBus

if TYPE_CHECKING:
    from .kvm import Kvm
    from .snapshot import VmSnapshot
    from .vcpu import Vcpu

PAGE = 0x1000
APIC_MMIO = 0xFEE00000
KVM_MEM_READONLY = 1 << 1
KVM_USER_MEM_SLOTS = 32764
MAX_VCPUS = 288


@dataclass
class MemorySlot:
    slot: int
    guest_phys_addr: int
    memory_size: int
    flags: int
    host: mmap.mmap

    @property
    def end(self) -> int:
        return self.guest_phys_addr + self.memory_size

    @property
    def host_addr(self) -> int:
        import ctypes
        return ctypes.addressof(ctypes.c_char.from_buffer(self.host))


class PhysicalMemory:
    """Guest-physical memory as the L0 reads and writes it: unbacked reads give all-ones,
    unbacked writes are dropped (the PC's unassigned-memory behaviour)."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._slots: list[MemorySlot] = []

    def _insert(self, s: MemorySlot) -> None:
        i = bisect.bisect(self._starts, s.guest_phys_addr)
        self._starts.insert(i, s.guest_phys_addr)
        self._slots.insert(i, s)

    def _remove(self, s: MemorySlot) -> None:
        i = self._slots.index(s)
        del self._starts[i]
        del self._slots[i]

    def find(self, gpa: int) -> MemorySlot | None:
        i = bisect.bisect(self._starts, gpa) - 1
        if i >= 0:
            s = self._slots[i]
            if gpa < s.end:
                return s
        return None

    def read(self, gpa: int, size: int) -> bytes:
        s = self.find(gpa)
        if s is not None and gpa + size <= s.end:
            off = gpa - s.guest_phys_addr
            return s.host[off:off + size]
        return bytes(self._read_slow(gpa, size))

    def _read_slow(self, gpa: int, size: int) -> bytearray:
        out = bytearray()
        while size:
            s = self.find(gpa)
            if s is None:
                nxt = next((x.guest_phys_addr for x in self._slots if x.guest_phys_addr > gpa), gpa + size)
                n = min(size, nxt - gpa)
                out += b"\xff" * n
            else:
                n = min(size, s.end - gpa)
                off = gpa - s.guest_phys_addr
                out += s.host[off:off + n]
            gpa += n
            size -= n
        return out

    def write(self, gpa: int, data: bytes) -> None:
        while data:
            s = self.find(gpa)
            if s is None:
                nxt = next((x.guest_phys_addr for x in self._slots if x.guest_phys_addr > gpa), gpa + len(data))
                n = min(len(data), nxt - gpa)
            else:
                n = min(len(data), s.end - gpa)
                if not s.flags & KVM_MEM_READONLY:
                    off = gpa - s.guest_phys_addr
                    s.host[off:off + n] = data[:n]
            gpa += n
            data = data[n:]


TRACE_DEPTH = 4096


class Vm:
    """KVM_CREATE_VM's result. Create it with Kvm.create_vm().

    >>> import nestvisor
    >>> vm = nestvisor.Kvm().create_vm()
    >>> vm.set_user_memory_region(0, 0, 0x10000)
    >>> vm.memory(0x1000, 4)[:] = b"abcd"
    >>> bytes(vm.memory(0x1000, 4))
    b'abcd'
    """

    def __init__(self, kvm: Kvm) -> None:
        self.kvm = kvm
        self.phys = PhysicalMemory()
        self.slots: dict[int, MemorySlot] = {}
        self.vcpus: dict[int, Vcpu] = {}
        self.apic_bus = ApicBus()
        self.host_writes = 0
        self.kicks = 0   # events one vCPU sent another that was not running (IPIs): the scheduler's hint
        # KVM_SET_NESTED_STATE maps the pages hanging off vmcs12/vmcb12 at once (True) instead
        # of at the vCPU's first run (KVM's KVM_REQ_GET_NESTED_STATE_PAGES, the default)
        self.nested_pages_at_set = False
        # the SVM nested-state format KVM_GET_NESTED_STATE produces: "svm" (KVM's) or "svm-v2"
        self.svm_state_format = "svm"
        # Trace events shaped like KVM's tracepoints (kvm_nested_vmenter, ...): (name, fields)
        self.trace_log: deque[tuple[str, dict[str, object]]] = deque(maxlen=TRACE_DEPTH)

    def trace(self, event: str, **fields: object) -> None:
        self.trace_log.append((event, fields))

    # KVM_SET_USER_MEMORY_REGION
    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory_size: int, flags: int = 0) -> None:
        """Create (or, with memory_size 0, delete) a memory slot backed by host memory."""
        if not 0 <= slot < KVM_USER_MEM_SLOTS:
            raise einval(f"slot {slot} is out of range (kvm_set_memory_region: id < KVM_USER_MEM_SLOTS)")
        if guest_phys_addr % PAGE or memory_size % PAGE or guest_phys_addr < 0 or memory_size < 0:
            raise einval("guest_phys_addr and memory_size must be page aligned (__kvm_set_memory_region)")
        if flags & ~KVM_MEM_READONLY:
            raise einval(f"flags {flags:#x} has unknown bits (check_memory_region_flags)")
        old = self.slots.get(slot)
        if memory_size == 0:
            if old is not None:
                self._unmap(old)
            return
        if old is not None:
            raise einval(f"slot {slot} exists; moving or resizing a slot is not supported (delete it first)")
        end = guest_phys_addr + memory_size
        if end > 1 << 52:
            raise einval("the slot ends beyond the 52-bit physical address space")
        for s in self.slots.values():
            if guest_phys_addr < s.end and s.guest_phys_addr < end:
                raise KvmError(errno.EEXIST, f"the range overlaps slot {s.slot} (__kvm_set_memory_region)")
        if guest_phys_addr < APIC_MMIO + PAGE and APIC_MMIO < end:
            raise einval("the range covers the local APIC page at 0xfee00000, which nestvisor keeps as MMIO")
        host = mmap.mmap(-1, memory_size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0))
        s = MemorySlot(slot, guest_phys_addr, memory_size, flags, host)
        self.slots[slot] = s
        self.phys._insert(s)
        for v in self.vcpus.values():
            for ctx in v.contexts():
                ctx.map_ram(s.guest_phys_addr, s.memory_size, s.host_addr)

    def _unmap(self, s: MemorySlot) -> None:
        for v in self.vcpus.values():
            for ctx in v.contexts():
                ctx.unmap(s.guest_phys_addr, s.memory_size)
        self.phys._remove(s)
        del self.slots[s.slot]

    def memory(self, gpa: int, size: int) -> memoryview:
        """Host view of guest RAM [gpa, gpa+size), which must lie in one slot."""
        s = self.phys.find(gpa)
        if s is None or gpa + size > s.end or size < 0:
            raise KvmError(errno.EFAULT, f"[{gpa:#x}, {gpa + size:#x}) is not inside one memory slot")
        off = gpa - s.guest_phys_addr
        # the caller may write code: vCPUs drop their translations before they next run
        self.host_writes += 1
        return memoryview(s.host)[off:off + size]

    # KVM_CREATE_VCPU
    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        """Create vCPU `vcpu_id`; vCPU 0 is the bootstrap processor."""
        from .vcpu import Vcpu

        if not 0 <= vcpu_id < MAX_VCPUS:
            raise einval(f"vcpu_id {vcpu_id} is out of range (KVM_MAX_VCPU_IDS = {MAX_VCPUS})")
        if vcpu_id in self.vcpus:
            raise KvmError(errno.EEXIST, f"vcpu {vcpu_id} already exists (kvm_vm_ioctl_create_vcpu)")
        v = Vcpu(self, vcpu_id)
        self.vcpus[vcpu_id] = v
        return v

    def snapshot(self) -> VmSnapshot:
        """The whole VM as data: memory slots, every vCPU's save_state() in creation order,
        the VM-level settings (kvm/snapshot.py). Call it between runs. Kvm.restore_vm()
        makes a VM from it; kvm/snapfile.py writes it to a file.

        >>> import nestvisor
        >>> vm = nestvisor.Kvm().create_vm()
        >>> _ = vm.create_vcpu(0)
        >>> [s.vcpu_id for s in vm.snapshot().vcpus]
        [0]
        """
        from .snapshot import snapshot_vm
        return snapshot_vm(self)
