"""Exception and interrupt delivery through the guest IVT/IDT, in Python (SDM chapter 6).

Unicorn never vectors an event through the guest's tables; the engine stops, takes an
`ArchState` snapshot and calls `deliver` (one event) or `deliver_with_escalation` (the
double-fault rules of SDM 6.15 Table 6-5 on top). Both return a new state and never modify
the one passed in; the only side effects are the guest-memory writes the CPU itself makes
(stack frame, descriptor accessed bits, page-table A/D bits).

Conventions:
- The return address pushed is `state.rip + insn_len`: pass the faulting RIP for faults,
  the next RIP for traps, and the INT n / INT3 / INTO / INT1 RIP with its length for
  software events (what KVM keeps as the instruction length).
- Faults detected during delivery are raised as `GuestFault`/`PageFault`, with the EXT bit
  of selector error codes set as SDM 6.13 says. `deliver` writes nothing to CR2;
  `deliver_with_escalation` sets CR2 in the state it returns when delivery page-faulted.
- The RF image pushed for a fault-class hardware exception has RF=1 (SDM 17.3.1.1; KVM
  sets it the same way in inject_pending_event).
- Segment caches use the attribute layout of `Segment.flags` (descriptor high dword masked
  to 0x00F0FF00); the 64-bit NULL SS loaded on a privilege change has flags = DPL << 13
  only, as QEMU's do_interrupt64 leaves it.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from nestvisor.arch.x86 import (
    CR4_LA57,
    CR4_VME,
    DF_VECTOR,
    ERR_EXT,
    ERR_IDT,
    GATE_INT16,
    GATE_TASK,
    GATE_TRAP16,
    IDT_GATE_TYPES_IA32E,
    IDT_GATE_TYPES_LEGACY,
    INTERRUPT_GATE_TYPES,
    INTR_TYPE_EXT_INTR,
    INTR_TYPE_HARD_EXCEPTION,
    INTR_TYPE_NMI,
    INTR_TYPE_PRIV_SW_EXCEPTION,
    INTR_TYPE_SOFT_EXCEPTION,
    INTR_TYPE_SOFT_INTR,
    RFLAGS_AC,
    RFLAGS_IF,
    RFLAGS_IOPL,
    RFLAGS_NT,
    RFLAGS_RF,
    RFLAGS_TF,
    RFLAGS_VM,
    SEG_TYPE_ACCESSED,
    SEG_TYPE_CODE,
    SEG_TYPE_CONFORMING,
    SEG_TYPE_EXPAND_DOWN,
    SEG_TYPE_WRITABLE,
    ExceptionClass,
    ExceptionType,
    exception_info,
)
from nestvisor.cpu.faults import GuestFault, PageFault
from nestvisor.cpu.paging import LinearMemory, PhysMemory, is_canonical
from nestvisor.cpu.state import SEG_DPL_SHIFT, ArchState, DescTable, Segment

__all__ = [
    "EventKind", "DeliveryUnsupported", "TripleFault", "deliver", "deliver_with_escalation",
]

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_ATTR_MASK = 0x00F0FF00  # type, S, DPL, P, AVL, L, D/B, G in the descriptor's high dword

_TS, _NP, _SS, _GP = 10, 11, 12, 13


class EventKind(enum.IntEnum):
    """What is being delivered; values are the VMX interruption types (SDM 25.8.3)."""

    EXTERNAL_INTERRUPT = INTR_TYPE_EXT_INTR
    NMI = INTR_TYPE_NMI
    HARDWARE_EXCEPTION = INTR_TYPE_HARD_EXCEPTION
    SOFTWARE_INTERRUPT = INTR_TYPE_SOFT_INTR  # INT n
    PRIVILEGED_SOFTWARE_EXCEPTION = INTR_TYPE_PRIV_SW_EXCEPTION  # INT1 (ICEBP)
    SOFTWARE_EXCEPTION = INTR_TYPE_SOFT_EXCEPTION  # INT3, INTO


# SDM 6.13: EXT is clear only for events the program raised itself (INT n, INT3, INTO).
_EXT_KINDS = frozenset({
    EventKind.EXTERNAL_INTERRUPT, EventKind.NMI, EventKind.HARDWARE_EXCEPTION,
    EventKind.PRIVILEGED_SOFTWARE_EXCEPTION,
})
# SDM Vol. 2 INT n pseudocode: the gate-DPL check applies to INT n, INT3, INTO, not INT1.
_DPL_CHECKED_KINDS = frozenset({EventKind.SOFTWARE_INTERRUPT, EventKind.SOFTWARE_EXCEPTION})


class DeliveryUnsupported(Exception):
    """The event needs a mechanism nestvisor does not model (task gates, VME redirection)."""


@dataclass(frozen=True)
class TripleFault:
    """Shutdown: a fault while delivering #DF (SDM 6.15 "Interrupt 8").

    `vectors` lists every event attempted, first to last; `state` is the input state with
    CR2 updated by any page fault on the way.
    """

    vectors: tuple[int, ...]
    state: ArchState


class _Ctx:
    """Per-delivery values shared by the mode-specific paths."""

    __slots__ = ("state", "new", "lin", "vector", "kind", "ext", "error_code", "ret_ip")

    def __init__(self, state: ArchState, mem: PhysMemory | LinearMemory, vector: int,
                 kind: EventKind, error_code: int | None, insn_len: int) -> None:
        self.state = state
        self.new = state.copy()
        ac = bool(state.rflags & RFLAGS_AC) and state.cpl < 3
        # SDM 4.6: descriptor-table, TSS and ring-change stack accesses are implicit
        # supervisor accesses; SMAP honours AC for them only below CPL 3.
        if isinstance(mem, LinearMemory):
            self.lin = LinearMemory(mem.phys, state, cpl=state.cpl, ac=ac, maxphyaddr=mem.maxphyaddr, walk=mem.walk)
        else:
            self.lin = LinearMemory(mem, state, cpl=state.cpl, ac=ac)
        self.vector = vector
        self.kind = kind
        self.ext = ERR_EXT if kind in _EXT_KINDS else 0
        self.error_code = error_code
        bits = state.code_bits
        mask = (1 << bits) - 1
        self.ret_ip = (state.rip + insn_len) & mask

    # --- memory helpers (all implicit supervisor accesses) ---
    def read_sv(self, linear: int, size: int) -> bytes:
        return self.lin.read(linear, size, user=False)

    def idt_error(self) -> int:
        return (self.vector << 3) | ERR_IDT | self.ext

    def sel_error(self, selector: int) -> int:
        return (selector & 0xFFFC) | self.ext


def _desc_to_segment(selector: int, lo: int, hi: int) -> Segment:
    """SDM 3.4.5: base, limit (scaled by G) and attributes of a code/data descriptor."""
    base = (lo >> 16) | ((hi & 0xFF) << 16) | (hi & 0xFF000000)
    limit = (lo & 0xFFFF) | (hi & 0xF0000)
    if hi & (1 << 23):
        limit = (limit << 12) | 0xFFF
    return Segment(selector, base, limit, hi & _ATTR_MASK)


@dataclass(frozen=True)
class _Desc:
    """A code/data descriptor as read from the GDT/LDT, with where it lives."""

    addr: int
    lo: int
    hi: int

    @property
    def type(self) -> int:
        return (self.hi >> 8) & 0xF

    @property
    def s(self) -> bool:
        return bool(self.hi & (1 << 12))

    @property
    def dpl(self) -> int:
        return (self.hi >> 13) & 3

    @property
    def present(self) -> bool:
        return bool(self.hi & (1 << 15))

    def segment(self, selector: int) -> Segment:
        """The cache a load leaves, accessed bit included (SDM 3.4.5.1)."""
        return _desc_to_segment(selector, self.lo, self.hi | (SEG_TYPE_ACCESSED << 8))

    def set_accessed(self, ctx: _Ctx) -> None:
        """SDM 3.4.5.1: loading a segment register sets the descriptor's accessed bit."""
        if not self.hi & (SEG_TYPE_ACCESSED << 8):
            ctx.lin.write(self.addr + 4, _U32.pack(self.hi | (SEG_TYPE_ACCESSED << 8)), user=False)


def _read_descriptor(ctx: _Ctx, selector: int, fault_vector: int) -> _Desc:
    """Fetch the 8-byte descriptor for `selector`; outside the table → fault(selector+EXT)."""
    table: DescTable | Segment = ctx.state.ldt if selector & 4 else ctx.state.gdt
    offset = selector & 0xFFF8
    if offset + 7 > table.limit:
        raise GuestFault(fault_vector, ctx.sel_error(selector))
    addr = table.base + offset
    lo, hi = struct.unpack("<II", ctx.read_sv(addr, 8))
    return _Desc(addr, lo, hi)


def _room_ok(seg: Segment, sp: int, mask: int, nbytes: int) -> bool:
    """SDM 5.3 / 6.12.1: every byte of [sp - nbytes, sp) lies inside the stack segment."""
    lo = (sp - nbytes) & mask
    hi = (sp - 1) & mask
    points = [lo, hi] if lo <= hi else [lo, mask, 0, hi]
    if seg.type & SEG_TYPE_EXPAND_DOWN:
        upper = 0xFFFFFFFF if seg.db else 0xFFFF
        return all(seg.limit < p <= upper for p in points)
    return all(p <= seg.limit for p in points)


def _push_all(ctx: _Ctx, base: int, sp: int, mask: int, width: int, values: list[int],
              user: bool) -> int:
    """Push `values` in order at base + (sp & mask); returns the new sp (unmasked bits kept)."""
    pack = {2: _U16, 4: _U32, 8: _U64}[width]
    vmask = (1 << (8 * width)) - 1
    size = width * len(values)
    top = sp & mask
    if top >= size:
        # The frame does not wrap around the stack's address mask: one write, which
        # translates the whole range before any byte moves. If it faults, the pushes are
        # redone one by one so the fault (and CR2) is the first push's, as on hardware.
        frame = b"".join(pack.pack(v & vmask) for v in reversed(values))
        try:
            ctx.lin.write(base + top - size, frame, user=user)
            return top - size
        except GuestFault:
            pass
    for v in values:
        sp = (sp - width) & mask
        ctx.lin.write(base + sp, pack.pack(v & vmask), user=user)
    return sp


def _new_rflags(rflags: int, gate_type: int) -> int:
    """SDM 6.12.1.3: TF, NT, RF, VM cleared; an interrupt gate also clears IF."""
    rflags &= ~(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | RFLAGS_VM)
    if gate_type in INTERRUPT_GATE_TYPES:
        rflags &= ~RFLAGS_IF
    return rflags


def _pushed_rflags(ctx: _Ctx) -> int:
    """SDM 17.3.1.1: a fault-class exception saves RF=1 so the restarted instruction is not re-trapped."""
    rflags = ctx.state.rflags
    if ctx.kind == EventKind.HARDWARE_EXCEPTION and ctx.vector < 32:
        if exception_info(ctx.vector).type == ExceptionType.FAULT:
            rflags |= RFLAGS_RF
    return rflags


# --------------------------------------------------------------------------------------
# Real-address mode (SDM 20.1.4 "Interrupt and Exception Handling", INT n pseudocode)
# --------------------------------------------------------------------------------------

def _deliver_real(ctx: _Ctx) -> None:
    state, new = ctx.state, ctx.new
    if (ctx.vector << 2) + 3 > state.idt.limit:
        raise GuestFault(_GP, 0)
    entry = ctx.read_sv(state.idt.base + (ctx.vector << 2), 4)
    ip, cs = struct.unpack("<HH", entry)
    if not _room_ok(state.ss, state.rsp, 0xFFFF, 6):
        raise GuestFault(_SS, 0)
    # SDM 20.1.4: push FLAGS, CS, IP (16 bits each); no error code in real mode.
    sp = _push_all(ctx, state.ss.base, state.rsp, 0xFFFF, 2,
                   [state.rflags, state.cs.selector, ctx.ret_ip], user=False)
    new.rsp = (state.rsp & ~0xFFFF) | sp
    new.rflags = state.rflags & ~(RFLAGS_IF | RFLAGS_TF | RFLAGS_AC | RFLAGS_RF)
    # SDM 20.1.1: a real-mode CS load changes only selector and base.
    new.cs.selector = cs
    new.cs.base = cs << 4
    new.rip = ip


# --------------------------------------------------------------------------------------
# Protected mode and IA-32e mode (SDM 6.12, 6.14, Vol. 2 "INT n" pseudocode)
# --------------------------------------------------------------------------------------

@dataclass
class _Gate:
    type: int
    dpl: int
    present: bool
    selector: int
    offset: int
    ist: int


def _read_gate(ctx: _Ctx) -> _Gate:
    state = ctx.state
    long_mode = state.long_mode
    size = 16 if long_mode else 8
    # SDM 6.10 / 6.14.1: the whole gate must lie inside the IDT limit.
    if ctx.vector * size + size - 1 > state.idt.limit:
        raise GuestFault(_GP, ctx.idt_error())
    raw = ctx.read_sv(state.idt.base + ctx.vector * size, size)
    lo, hi = struct.unpack_from("<II", raw)
    gtype = (hi >> 8) & 0xF
    system = not hi & (1 << 12)
    valid = IDT_GATE_TYPES_IA32E if long_mode else IDT_GATE_TYPES_LEGACY
    if not system or gtype not in valid:
        raise GuestFault(_GP, ctx.idt_error())
    offset = (lo & 0xFFFF) | (hi & 0xFFFF0000)
    if long_mode:
        offset |= _U32.unpack_from(raw, 8)[0] << 32
    elif gtype in (GATE_INT16, GATE_TRAP16):
        offset &= 0xFFFF
    return _Gate(gtype, (hi >> 13) & 3, bool(hi & (1 << 15)), lo >> 16, offset,
                 hi & 7 if long_mode else 0)


def _tss_read(ctx: _Ctx, offset: int, size: int) -> int:
    """Read the current TSS; beyond its limit → #TS(TR selector + EXT) (SDM 6.12.1)."""
    tr = ctx.state.tr
    if offset + size - 1 > tr.limit:
        raise GuestFault(_TS, ctx.sel_error(tr.selector))
    data = ctx.read_sv(tr.base + offset, size)
    return {2: _U16, 4: _U32, 8: _U64}[size].unpack(data)[0]


def _legacy_ring_stack(ctx: _Ctx, dpl: int) -> tuple[int, int, _Desc]:
    """New SS:ESP for ring `dpl` from a 16- or 32-bit TSS (SDM 7.2.1, INT n pseudocode)."""
    if ctx.state.tr.type & 8:  # 32-bit TSS: ESPn at 4 + 8n, SSn at 8 + 8n
        esp = _tss_read(ctx, (dpl << 3) + 4, 4)
        ss_sel = _tss_read(ctx, (dpl << 3) + 8, 2)
    else:  # 16-bit TSS: SPn at 2 + 4n, SSn at 4 + 4n
        esp = _tss_read(ctx, (dpl << 2) + 2, 2)
        ss_sel = _tss_read(ctx, (dpl << 2) + 4, 2)
    if ss_sel & 0xFFFC == 0:
        raise GuestFault(_TS, ctx.ext)
    if ss_sel & 3 != dpl:
        raise GuestFault(_TS, ctx.sel_error(ss_sel))
    desc = _read_descriptor(ctx, ss_sel, _TS)
    writable_data = desc.s and not desc.type & SEG_TYPE_CODE and desc.type & SEG_TYPE_WRITABLE
    if desc.dpl != dpl or not writable_data:
        raise GuestFault(_TS, ctx.sel_error(ss_sel))
    if not desc.present:
        raise GuestFault(_SS, ctx.sel_error(ss_sel))
    return ss_sel, esp, desc


def _set_esp(old: int, value: int, mask: int) -> int:
    """A 16-bit stack updates SP only; a 32-bit one zero-extends ESP (QEMU SET_ESP)."""
    if mask == 0xFFFF:
        return (old & ~0xFFFF) | (value & 0xFFFF)
    return value & mask


def _deliver_legacy(ctx: _Ctx, gate: _Gate, cs_sel: int, cs_desc: _Desc, new_cpl: int,
                    privilege_change: bool) -> None:
    """32-bit protected mode through an interrupt or trap gate (SDM 6.12.1, Figure 6-4)."""
    state, new = ctx.state, ctx.new
    width = 2 if gate.type in (GATE_INT16, GATE_TRAP16) else 4
    push_ec = ctx.kind == EventKind.HARDWARE_EXCEPTION and ctx.error_code is not None
    from_vm86 = state.vm86
    ss_desc: _Desc | None = None
    if privilege_change:
        ss_sel, sp, ss_desc = _legacy_ring_stack(ctx, new_cpl)
        ss_seg = ss_desc.segment(ss_sel)
        count = 5 + (4 if from_vm86 else 0) + push_ec
        mask = 0xFFFFFFFF if ss_seg.db else 0xFFFF
        if not _room_ok(ss_seg, sp, mask, count * width):
            raise GuestFault(_SS, ctx.sel_error(ss_sel))
    else:
        ss_seg = state.ss
        sp = state.rsp
        mask = 0xFFFFFFFF if ss_seg.db else 0xFFFF
        if not _room_ok(ss_seg, sp, mask, (3 + push_ec) * width):
            raise GuestFault(_SS, ctx.ext)
    cs_seg = cs_desc.segment((cs_sel & 0xFFFC) | new_cpl)
    if gate.offset > cs_seg.limit:
        raise GuestFault(_GP, ctx.ext)  # SDM INT n: EIP outside the new CS → #GP(EXT)

    values = []
    if from_vm86:
        # SDM 20.3.1.1 / Figure 20-5: the VM86 segment registers are saved, then nulled.
        values += [state.gs.selector, state.fs.selector, state.ds.selector, state.es.selector]
    if privilege_change:
        values += [state.ss.selector, state.rsp]
    values += [_pushed_rflags(ctx), state.cs.selector, ctx.ret_ip]
    if push_ec:
        values.append(ctx.error_code)
    user = new_cpl == 3
    sp = _push_all(ctx, ss_seg.base, sp, mask, width, values, user=user)

    cs_desc.set_accessed(ctx)
    if ss_desc is not None:
        ss_desc.set_accessed(ctx)
        new.ss = ss_seg
    new.rsp = _set_esp(state.rsp, sp, mask)
    new.cs = cs_seg
    new.rip = gate.offset
    new.rflags = _new_rflags(state.rflags, gate.type)
    if from_vm86:
        for name in ("ds", "es", "fs", "gs"):
            setattr(new, name, Segment(0, 0, 0, 0))


def _deliver_long(ctx: _Ctx, gate: _Gate, cs_sel: int, cs_desc: _Desc, new_cpl: int,
                  privilege_change: bool) -> None:
    """IA-32e mode through a 64-bit gate (SDM 6.14.2-6.14.5, Figure 6-9)."""
    state, new = ctx.state, ctx.new
    if gate.ist:
        rsp = _tss_read(ctx, (gate.ist << 3) + 28, 8)  # SDM 6.14.5: IST1 at TSS offset 36
    elif privilege_change:
        rsp = _tss_read(ctx, (new_cpl << 3) + 4, 8)  # SDM 7.7: RSPn at TSS offset 4 + 8n
    else:
        rsp = state.rsp
    rsp &= ~0xF  # SDM 6.14.2: the new RSP is aligned to 16 bytes
    push_ec = ctx.kind == EventKind.HARDWARE_EXCEPTION and ctx.error_code is not None
    size = (6 if push_ec else 5) * 8
    la57 = bool(state.cr4 & CR4_LA57)
    mask64 = (1 << 64) - 1
    if not (is_canonical((rsp - size) & mask64, la57) and is_canonical((rsp - 1) & mask64, la57)):
        raise GuestFault(_SS, ctx.ext)
    if not is_canonical(gate.offset, la57):
        raise GuestFault(_GP, ctx.ext)

    # SDM 6.14.2: SS:RSP is pushed unconditionally in IA-32e mode.
    values = [state.ss.selector, state.rsp, _pushed_rflags(ctx), state.cs.selector, ctx.ret_ip]
    if push_ec:
        values.append(ctx.error_code)
    rsp = _push_all(ctx, 0, rsp, mask64, 8, values, user=new_cpl == 3)

    cs_desc.set_accessed(ctx)
    if privilege_change:
        # SDM 6.14.4: SS is loaded with a NULL selector whose RPL is the new CPL.
        new.ss = Segment(new_cpl, 0, 0, new_cpl << SEG_DPL_SHIFT)
    new.rsp = rsp
    new.cs = cs_desc.segment((cs_sel & 0xFFFC) | new_cpl)
    new.rip = gate.offset
    new.rflags = _new_rflags(state.rflags, gate.type)


def _deliver_protected(ctx: _Ctx) -> None:
    """Gate and code-segment checks shared by legacy and IA-32e delivery (INT n pseudocode)."""
    state = ctx.state
    cpl = state.cpl
    vm86 = state.vm86
    if vm86 and ctx.kind == EventKind.SOFTWARE_INTERRUPT:
        if state.cr4 & CR4_VME:
            raise DeliveryUnsupported("INT n in virtual-8086 mode with CR4.VME=1 (SDM 20.3.3)")
        if (state.rflags & RFLAGS_IOPL) >> 12 < 3:
            raise GuestFault(_GP, 0)  # SDM 20.2.7: INT n is IOPL-sensitive in VM86 mode
    gate = _read_gate(ctx)
    if ctx.kind in _DPL_CHECKED_KINDS and gate.dpl < cpl:
        raise GuestFault(_GP, (ctx.vector << 3) | ERR_IDT)  # SDM 6.12.1.1
    if not gate.present:
        raise GuestFault(_NP, ctx.idt_error())
    if gate.type == GATE_TASK:
        raise DeliveryUnsupported(f"vector {ctx.vector} uses a task gate (SDM 6.12.2)")

    sel = gate.selector
    if sel & 0xFFFC == 0:
        raise GuestFault(_GP, ctx.ext)
    cs_desc = _read_descriptor(ctx, sel, _GP)
    if not cs_desc.s or not cs_desc.type & SEG_TYPE_CODE or cs_desc.dpl > cpl:
        raise GuestFault(_GP, ctx.sel_error(sel))
    if not cs_desc.present:
        raise GuestFault(_NP, ctx.sel_error(sel))
    if state.long_mode and (not cs_desc.hi & (1 << 21) or cs_desc.hi & (1 << 22)):
        raise GuestFault(_GP, ctx.sel_error(sel))  # SDM 6.14.1: target must be 64-bit code

    if not cs_desc.type & SEG_TYPE_CONFORMING and cs_desc.dpl < cpl:
        new_cpl, privilege_change = cs_desc.dpl, True
        if vm86 and cs_desc.dpl != 0:
            raise GuestFault(_GP, ctx.sel_error(sel))  # SDM 20.3.1.1: VM86 handlers run at ring 0
    else:
        if vm86:
            raise GuestFault(_GP, ctx.sel_error(sel))
        new_cpl, privilege_change = cpl, False

    if state.long_mode:
        _deliver_long(ctx, gate, sel, cs_desc, new_cpl, privilege_change)
    else:
        _deliver_legacy(ctx, gate, sel, cs_desc, new_cpl, privilege_change)


# --------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------

def deliver(state: ArchState, mem: PhysMemory | LinearMemory, vector: int, *, kind: EventKind,
            error_code: int | None = None, insn_len: int = 0) -> ArchState:
    """Deliver one event through the IVT/IDT and return the handler's entry state.

    `mem` is guest-physical memory, or a `LinearMemory` whose physical memory and
    MAXPHYADDR are used; the walk always uses `state`'s control registers and CPL. `error_code` is pushed for hardware exceptions in
    protected mode; real mode never pushes one (SDM 20.1.4). Faults found while delivering
    are raised (`GuestFault`, `PageFault`); `DeliveryUnsupported` for task gates.
    """
    if not 0 <= vector <= 255:
        raise ValueError(f"vector {vector} is not in 0..255")
    kind = EventKind(kind)
    if error_code is not None and kind != EventKind.HARDWARE_EXCEPTION:
        raise ValueError(f"{kind.name} cannot carry an error code")
    ctx = _Ctx(state, mem, vector, kind, error_code, insn_len)
    if not state.protected:
        _deliver_real(ctx)
    else:
        _deliver_protected(ctx)
    return ctx.new


def _escalates(first: ExceptionClass, second: ExceptionClass) -> bool:
    """SDM 6.15 Table 6-5: which first/second pairs become #DF."""
    if first == ExceptionClass.CONTRIBUTORY:
        return second == ExceptionClass.CONTRIBUTORY
    if first == ExceptionClass.PAGE_FAULT:
        return second in (ExceptionClass.CONTRIBUTORY, ExceptionClass.PAGE_FAULT)
    return False


def deliver_with_escalation(state: ArchState, mem: PhysMemory | LinearMemory, vector: int,
                            kind: EventKind = EventKind.HARDWARE_EXCEPTION,
                            error_code: int | None = None,
                            insn_len: int = 0) -> ArchState | TripleFault:
    """Deliver an event; a fault during delivery follows SDM 6.15 Table 6-5.

    Benign pairs and benign→anything are handled serially (the second exception is
    delivered instead); contributory→contributory and #PF→contributory/#PF become #DF with
    error code 0; any fault while delivering #DF is a triple fault. For the first event,
    only a hardware exception has a class: interrupts and software events count as benign.
    CR2 is set in the returned state when delivery itself page-faulted; for an original #PF
    the caller sets CR2 before calling.
    """
    vectors = [vector]
    cur = state
    kind = EventKind(kind)
    while True:
        try:
            return deliver(cur, mem, vector, kind=kind, error_code=error_code, insn_len=insn_len)
        except GuestFault as fault:
            if isinstance(fault, PageFault):
                cur = cur.copy()
                cur.cr2 = fault.linear  # SDM 4.7: CR2 is loaded when the #PF is detected
            hardware = kind == EventKind.HARDWARE_EXCEPTION
            if hardware and vector == DF_VECTOR:
                # SDM 6.15 Interrupt 8: a fault while invoking the #DF handler → shutdown.
                return TripleFault(tuple(vectors + [fault.vector]), cur)
            first = exception_info(vector).klass if hardware else ExceptionClass.BENIGN
            second = exception_info(fault.vector).klass
            if _escalates(first, second):
                vector, error_code = DF_VECTOR, 0
            else:
                vector, error_code = fault.vector, fault.error_code
            # A fault in delivery is reported at the instruction, as a hardware exception.
            kind, insn_len = EventKind.HARDWARE_EXCEPTION, 0
            vectors.append(vector)
