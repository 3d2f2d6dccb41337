"""An execution context: one unicorn instance running guest code for one vCPU (or one level).

It owns the trap hook (_trap.c), finds trap sites in every code page that runs, decodes the
trapped instruction and hands it to the `TrapHandler` (the vCPU, in kvm/), runs a budget of
instructions, and reads or loads the full architectural state through the raw context.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

import capstone
from unicorn import UC_ARCH_X86, UC_MODE_64, UC_PROT_READ, UC_PROT_WRITE, Uc
from unicorn import unicorn_const as ucc
from unicorn import x86_const as X

from nestvisor.arch.msr import EFER as MSR_EFER
from nestvisor.arch.x86 import AC_VECTOR, CR0_AM, RFLAGS_AC

from . import context as C
from . import native as N
from .decode import Insn, decode
from .faults import GuestFault, PageFault
from .paging import translate
from .sites import scan
from .state import ArchState
from .tdp import TdpFault, TwoDimensional

GPRS = (X.UC_X86_REG_RAX, X.UC_X86_REG_RCX, X.UC_X86_REG_RDX, X.UC_X86_REG_RBX,
        X.UC_X86_REG_RSP, X.UC_X86_REG_RBP, X.UC_X86_REG_RSI, X.UC_X86_REG_RDI,
        X.UC_X86_REG_R8, X.UC_X86_REG_R9, X.UC_X86_REG_R10, X.UC_X86_REG_R11,
        X.UC_X86_REG_R12, X.UC_X86_REG_R13, X.UC_X86_REG_R14, X.UC_X86_REG_R15)
RIP = X.UC_X86_REG_RIP
RFLAGS = X.UC_X86_REG_RFLAGS
DREGS = (X.UC_X86_REG_DR0, X.UC_X86_REG_DR1, X.UC_X86_REG_DR2, X.UC_X86_REG_DR3,
         X.UC_X86_REG_DR6, X.UC_X86_REG_DR7)
_CRS = {0: X.UC_X86_REG_CR0, 2: X.UC_X86_REG_CR2, 3: X.UC_X86_REG_CR3, 4: X.UC_X86_REG_CR4, 8: X.UC_X86_REG_CR8}
TOP = 0xFFFFFFFFFFFFFFFF
_GPR_INDEX = {rid: n for n, rid in enumerate(GPRS)}
_EIP_INDEX = C.OFF_EIP // 8
_HFLAGS_INDEX, _HFLAGS2_INDEX = C.OFF_HFLAGS // 4, C.OFF_HFLAGS2 // 4
_CS_SELECTOR_INDEX = (C.OFF_SEGS + 24 * C.R_CS) // 4
_CR_INDEX = C.OFF_CR // 8
_CS_BASE_INDEX = C.OFF_CS_BASE // 8
_PAGING_REGS = (X.UC_X86_REG_CR0, X.UC_X86_REG_CR3, X.UC_X86_REG_CR4, X.UC_X86_REG_CS)
# Instructions a translation block can hold: QEMU ends one once it spans a page less 32
# bytes (its last instruction adds at most 15), and an instruction is at least a byte long.
BLOCK_INSNS_MAX = 0x1000


class Stop(IntEnum):
    """Why a run() returned."""

    BUDGET = 1      # the instruction budget is spent
    TRAP = 2        # a trap handler asked to stop
    EXCEPTION = 3   # the CPU raised an exception or executed INT n: see `exception`
    UNMAPPED = 4    # access to guest-physical memory nothing backs: see `unmapped`
    HALTED = 5      # a HLT ran natively (only if a site was missed)
    TDP = 6         # L2 under EPT/NPT: an access the second level refused, see `tlb_fault`
    PAUSE = 7       # a PAUSE retired at a fast site while `pause_yield` (fast_pause)


@dataclass(slots=True)
class RaisedException:
    vector: int
    error_code: int | None
    software: bool     # INT n / INT3 / INTO: return address is next_rip
    next_rip: int
    cr2: int | None = None   # #PF: the faulting address (unicorn may clobber CR2 after the hook)


@dataclass(slots=True)
class UnmappedAccess:
    gpa: int
    size: int
    is_write: bool
    value: int
    fetch: bool


class TrapHandler(Protocol):
    def on_trap(self, insn: Insn, rip: int) -> int:
        """Handle a trapped instruction at `rip`; returns a native.NV_* action."""


class PhysMemory(Protocol):
    def read(self, gpa: int, size: int) -> bytes: ...
    def write(self, gpa: int, data: bytes) -> None: ...


_DISASM = {16: capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_16),
           32: capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_32),
           64: capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)}



def _detailed(mode: int) -> capstone.Cs:
    md = capstone.Cs(capstone.CS_ARCH_X86, mode)
    md.detail = True
    return md


_DETAIL = {16: _detailed(capstone.CS_MODE_16), 32: _detailed(capstone.CS_MODE_32), 64: _detailed(capstone.CS_MODE_64)}
# capstone register ids -> unicorn register ids, for effective addresses
_CS_REGS = {getattr(capstone.x86, "X86_REG_" + n): getattr(X, "UC_X86_REG_" + n)
            for n in ("RAX", "RBX", "RCX", "RDX", "RSI", "RDI", "RBP", "RSP", "R8", "R9", "R10", "R11", "R12",
                      "R13", "R14", "R15", "EAX", "EBX", "ECX", "EDX", "ESI", "EDI", "EBP", "ESP")}

# Vectors that push an error code (SDM 6.15).
_ERROR_CODE_VECTORS = frozenset((8, 10, 11, 12, 13, 14, 17, 21, 29, 30))


class _Batch:
    """Preallocated argument arrays for uc_reg_{read,write}_batch over a fixed register list;
    for a list of general registers only, their indexes in CPUX86State.regs instead."""

    def __init__(self, ids: tuple[int, ...]) -> None:
        self.gprs = tuple(_GPR_INDEX[i] for i in ids) if all(i in _GPR_INDEX for i in ids) else None
        self.n = len(ids)
        self.ids = (ctypes.c_int * self.n)(*ids)
        self.vals = (ctypes.c_uint64 * self.n)()
        base = ctypes.addressof(self.vals)
        self.ptrs = (ctypes.c_void_p * self.n)(*[base + 8 * i for i in range(self.n)])


class _UcMsr(ctypes.Structure):
    _fields_ = [("rid", ctypes.c_uint32), ("value", ctypes.c_uint64)]


class ExecContext:
    """One unicorn instance with its trap machinery."""

    def __init__(self, mem: PhysMemory, handler: TrapHandler) -> None:
        self.mem = mem
        self.handler = handler
        self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        self.h = self.uc._uch
        self.ctx = C.CpuContext(self.h)
        self.trap_ptr = N.traplib.nv_new()
        self.trap = self.trap_ptr.contents
        self._tp = ctypes.cast(self.trap_ptr, N.c_p).value
        # callbacks must stay referenced as long as the instance lives
        self._cb_page = N.PAGE_CB(self._on_page)
        self._cb_site = N.PAGE_CB(self._on_site)
        self._cb_recheck = N.RECHECK_CB(self._on_recheck)
        self.trap.emu_stop = N.EMU_STOP
        self.trap.reg_write = N.REG_WRITE
        self.trap.reg_rax, self.trap.reg_rdx, self.trap.reg_rip = GPRS[0], GPRS[2], RIP
        self.trap.on_page = ctypes.cast(self._cb_page, N.c_p).value
        self.trap.on_site = ctypes.cast(self._cb_site, N.c_p).value
        self.trap.on_recheck = ctypes.cast(self._cb_recheck, N.c_p).value
        self._cb_count = N.COUNT_CB(self._on_count)
        self.trap.on_count = ctypes.cast(self._cb_count, N.c_p).value
        env = self.ctx.live_address()
        self.trap.env = env
        # The live CPUX86State, read and written in place where unicorn's register API would
        # do no more (general registers, EIP, hflags, old_exception): it is current outside a
        # run and inside a hook, where TCG has stored its globals and reloads them after.
        live = memoryview((ctypes.c_char * (C.OFF_OLD_EXCEPTION + 4)).from_address(env)).cast("B")
        self._live_q = live[:C.OFF_CR + 5 * 8].cast("Q")   # regs[16], eip, ..., cr[0..4]
        self._live_i = live.cast("I")
        self.trap.hflags = env + C.OFF_HFLAGS
        self.trap.eflags = env + C.OFF_EFLAGS
        self.trap.raise_exception_err = N.RAISE_EXCEPTION_ERR
        self.trap.ac_flag = RFLAGS_AC
        self.trap.ac_vector = AC_VECTOR
        self.trap.eip = env + C.OFF_EIP
        self.trap.cs_base = env + C.OFF_CS_BASE
        cpu = self.ctx.live_cpu()
        self.trap.cpu = cpu
        self.trap.mem_io_pc = cpu + C.OFF_CPU_MEM_IO_PC
        self.trap.restore_state = N.RESTORE_STATE
        self.trap.do_interrupt = N.DO_INTERRUPT
        self.trap.emu_start = N.EMU_START
        self.trap.ctl = N.UC_CTL
        self.trap.ctl_tb_flush = N.CTL_TB_FLUSH
        self.trap.old_exception = env + C.OFF_OLD_EXCEPTION
        self.trap.hflags2 = env + C.OFF_HFLAGS2
        self.trap.regs = env + C.OFF_REGS
        self.trap.hf_inhibit_irq = C.HF_INHIBIT_IRQ
        self.trap.hf2_nmi = C.HF2_NMI
        self._offsets = (ctypes.c_uint16 * BLOCK_INSNS_MAX)()
        self.trap.offsets = ctypes.addressof(self._offsets)
        self.trap.offsets_cap = BLOCK_INSNS_MAX
        self._align_hook: int | None = None   # nv_align_hook's handle while CR0.AM = 1
        hh = ctypes.c_size_t()
        if N.hook_add_raw(self.h, ctypes.byref(hh), N.UC_HOOK_BLOCK, N.BLOCK_HOOK, self._tp, 1, 0):
            raise RuntimeError("uc_hook_add(block) failed")
        if N.hook_add_raw(self.h, ctypes.byref(hh), N.UC_HOOK_MEM_FETCH_PROT, N.FETCH_HOOK, self._tp, 1, 0):
            raise RuntimeError("uc_hook_add(fetch) failed")
        self.uc.hook_add(ucc.UC_HOOK_INTR, self._on_intr)
        self.uc.hook_add(ucc.UC_HOOK_INSN_INVALID, self._on_invalid)
        self.uc.hook_add(ucc.UC_HOOK_MEM_UNMAPPED, self._on_unmapped)
        # scanned code: physical page -> (snapshot of its bytes, linear pages that map it)
        self._scanned: dict[int, tuple[bytes, set[int]]] = {}
        self._decoded: dict[tuple[int, int], Insn | None] = {}
        # Trap sites are found in the blocks the CPU runs (_on_count), where instruction starts
        # are known: every hooked address costs a step of unicorn's hook-list walk at each
        # site it runs, so only real instructions get hooks.
        self._site_hooks: set[int] = set()     # linear addresses with a site hook (never removed)
        self._page_sites: dict[int, set[int]] = {}   # physical page -> page offsets of its sites
        self._lin_phys: dict[int, int] = {}   # linear code page -> the physical page last seen there
        self._error: BaseException | None = None
        self.exception: RaisedException | None = None
        self.unmapped: UnmappedAccess | None = None
        # L2 under EPT/NPT: unicorn's TLB is filled by the two-dimensional walk (use_tdp)
        self.tdp: TwoDimensional | None = None
        self.tlb_fault: TdpFault | None = None
        self._fill_fault: GuestFault | TdpFault | None = None
        self._tlb_hooked = False
        self._u64 = ctypes.c_uint64()
        self._u64p = ctypes.byref(self._u64)
        self._batch_ids = (ctypes.c_int * 16)(*GPRS)
        self._batch_vals = (ctypes.c_uint64 * 16)()
        self._batch_ptrs = (ctypes.c_void_p * 16)(*[ctypes.addressof(self._batch_vals) + 8 * i for i in range(16)])
        self._msr = _UcMsr()
        self._batches: dict[tuple[int, ...], _Batch] = {}
        self.retired = 0   # instructions retired in the last run() or step()

    # ---- memory -------------------------------------------------------------------------

    def map_ram(self, gpa: int, size: int, host_addr: int) -> None:
        # No EXEC permission: every code fetch during translation reaches nv_fetch_hook,
        # which is how rewritten code pages are noticed.
        self.uc.mem_map_ptr(gpa, size, UC_PROT_READ | UC_PROT_WRITE, host_addr)

    def map_apic(self, gpa: int, read: Callable[[int, int], int], write: Callable[[int, int, int], None]) -> None:
        """The local APIC's xAPIC page as memory-mapped I/O. Accesses go to the trap's C
        callbacks, which answer TMCCT while the timer counts (fast_tmcct) and take self-NMI
        ICR writes (xapic_self_nmi) and hand the rest to `read` and `write`, where RIP and
        clock() are the accessing instruction's."""
        def rd(offset: int, size: int) -> int:
            try:
                return read(offset, size)
            except BaseException as e:  # noqa: BLE001 - any failure stops the run and re-raises
                self._fail(e)
                return 0

        def wr(offset: int, size: int, value: int) -> None:
            try:
                write(offset, size, value)
            except BaseException as e:  # noqa: BLE001
                self._fail(e)

        self._cb_apic_read = N.MMIO_READ_CB(rd)
        self._cb_apic_write = N.MMIO_WRITE_CB(wr)
        self.trap.apic_read = ctypes.cast(self._cb_apic_read, N.c_p).value
        self.trap.apic_write = ctypes.cast(self._cb_apic_write, N.c_p).value
        if N.uclib.uc_mmio_map(self.h, gpa, 0x1000, N.APIC_MMIO_READ, self._tp, N.APIC_MMIO_WRITE, self._tp):
            raise RuntimeError("uc_mmio_map(APIC) failed")

    def unmap(self, gpa: int, size: int) -> None:
        self.uc.mem_unmap(gpa, size)

    # ---- registers (fast paths) -----------------------------------------------------------

    def reg(self, rid: int) -> int:
        N.uclib.uc_reg_read(self.h, rid, self._u64p)
        return self._u64.value

    def set_reg(self, rid: int, value: int) -> None:
        self._u64.value = value & TOP
        N.uclib.uc_reg_write(self.h, rid, self._u64p)

    def gprs(self) -> list[int]:
        N.uclib.uc_reg_read_batch(self.h, self._batch_ids, self._batch_ptrs, 16)
        return list(self._batch_vals)

    def set_gprs(self, values: list[int]) -> None:
        for i, v in enumerate(values):
            self._batch_vals[i] = v & TOP
        N.uclib.uc_reg_write_batch(self.h, self._batch_ids, self._batch_ptrs, 16)

    def cpu_msr(self, index: int) -> int:
        """An MSR the substrate itself uses (EFER, STAR, FS/GS bases, SYSENTER_*, PAT, ...)."""
        self._msr.rid = index
        N.uclib.uc_reg_read(self.h, X.UC_X86_REG_MSR, ctypes.byref(self._msr))
        return self._msr.value

    def set_cpu_msr(self, index: int, value: int) -> None:
        self._msr.rid = index
        self._msr.value = value & TOP
        N.uclib.uc_reg_write(self.h, X.UC_X86_REG_MSR, ctypes.byref(self._msr))

    def reg_cr(self, n: int) -> int:
        if n < 5:
            return self._live_q[_CR_INDEX + n]   # CPUX86State.cr[n], what uc_reg_read answers
        return self.reg(_CRS[n])

    def set_reg_cr(self, n: int, value: int) -> None:
        self.set_reg(_CRS[n], value)
        if n == 0:
            self._load_cr0_am(value)

    def _load_cr0_am(self, cr0: int) -> None:
        """Hook every data access for the alignment check while CR0.AM = 1, and none while
        it is 0: a memory hook sends every access of code translated under it through
        unicorn's slow path. Called wherever CR0 enters this context. Only outside run()."""
        want = bool(cr0 & CR0_AM)
        if want == (self._align_hook is not None):
            return
        if want:
            hh = ctypes.c_size_t()
            if N.hook_add_raw(self.h, ctypes.byref(hh), N.UC_HOOK_MEM_READ | N.UC_HOOK_MEM_WRITE,
                              N.ALIGN_HOOK, self._tp, 1, 0):
                raise RuntimeError("uc_hook_add(align) failed")
            self._align_hook = hh.value
        else:
            N.uclib.uc_hook_del(self.h, self._align_hook)
            self._align_hook = None
        # whether an access calls memory hooks is decided when its code is translated
        N.uc_ctl0(self.h, N.CTL_TB_FLUSH)

    def read_batch(self, ids: tuple[int, ...]) -> list[int]:
        """Several registers in one call (the trap handlers' fast path)."""
        b = self._batches.get(ids)
        if b is None:
            b = self._batches[ids] = _Batch(ids)
        if b.gprs is not None:
            q = self._live_q
            return [q[i] for i in b.gprs]
        N.uclib.uc_reg_read_batch(self.h, b.ids, b.ptrs, b.n)
        return list(b.vals)

    def write_batch(self, ids: tuple[int, ...], values: tuple[int, ...] | list[int]) -> None:
        """Write general registers in one call. RIP is never batched: only uc_reg_write sets
        unicorn's skip_sync_pc_on_exit, without which a RIP written in a hook is reverted."""
        b = self._batches.get(ids)
        if b is None:
            b = self._batches[ids] = _Batch(ids)
        if b.gprs is not None:
            q = self._live_q
            for i, v in zip(b.gprs, values, strict=True):
                q[i] = v & TOP
            return
        vals = b.vals
        for i, v in enumerate(values):
            vals[i] = v & TOP
        N.uclib.uc_reg_write_batch(self.h, b.ids, b.ptrs, b.n)

    def gpr(self, n: int) -> int:
        return self._live_q[n]

    def set_gpr(self, n: int, value: int) -> None:
        self._live_q[n] = value & TOP

    @property
    def rip(self) -> int:
        return self._live_q[_EIP_INDEX]

    @rip.setter
    def rip(self, value: int) -> None:
        self.set_reg(RIP, value)

    @property
    def rflags(self) -> int:
        return self.reg(RFLAGS)

    @rflags.setter
    def rflags(self, value: int) -> None:
        self.set_reg(RFLAGS, value)

    # ---- full state through the raw context ------------------------------------------------

    def get_state(self) -> ArchState:
        self.ctx.save()
        return self.ctx.read_state(self.rip, self.gpr(4), self.rflags)

    def set_state(self, st: ArchState) -> None:
        """Load `st` (any mode, full descriptor caches). Only outside run()."""
        self.ctx.save()
        old_paging = (self.ctx.u64(C.OFF_CR), self.ctx.u64(C.OFF_CR + 24), self.ctx.u64(C.OFF_CR + 32), self.ctx.u64(C.OFF_EFER))
        self.ctx.write_state(st)
        self.ctx.restore()
        self.set_reg(RFLAGS, st.rflags)
        self.set_reg(RIP, st.rip)
        self.set_gpr(4, st.rsp)
        self._load_cr0_am(st.cr0)
        if old_paging != (st.cr0, st.cr3, st.cr4, st.efer):
            self.flush_tlb()

    def hflags(self) -> int:
        return self._live_i[_HFLAGS_INDEX]

    def hflags2(self) -> int:
        return self._live_i[_HFLAGS2_INDEX]

    def patch_hflags(self, set_mask: int = 0, clear_mask: int = 0, set2: int = 0, clear2: int = 0) -> None:
        """Change hidden flags (interrupt shadow, NMI blocking, SMM). Only outside run()."""
        live = self._live_i
        live[_HFLAGS_INDEX] = (live[_HFLAGS_INDEX] | set_mask) & ~clear_mask & 0xFFFFFFFF
        live[_HFLAGS2_INDEX] = (live[_HFLAGS2_INDEX] | set2) & ~clear2 & 0xFFFFFFFF

    def set_tsc(self, base: int, fast: bool) -> None:
        """The TSC is base + instructions retired in the run; `fast` lets the trap hook answer
        RDTSC at registered sites itself."""
        self.trap.tsc_base = base & TOP
        self.trap.fast_tsc = int(fast)

    def fast_rdtsc(self, rip: int, length: int) -> None:
        """Answer the RDTSC at `rip` in the trap hook from now on (until a TLB flush)."""
        N.traplib.nv_fast_rdtsc(self._tp, self._linear(rip), length)

    def _linear(self, rip: int) -> int:
        """The linear address of `rip` in the current code segment (what the hooks see)."""
        return (self._live_q[_CS_BASE_INDEX] + rip) & TOP

    def fast_rdmsr(self, rip: int, length: int) -> None:
        """Answer the RDMSR at `rip` in the trap hook when it reads TMCCT and the timer
        counts (set_tmcct), until a TLB flush."""
        N.traplib.nv_fast_rdmsr(self._tp, self._linear(rip), length)

    def set_tmcct(self, where: int, clock_base: int, target: int, period: int, divisor: int) -> None:
        """Let the hooks answer TMCCT for this run (`where`: NV_TMCCT_MSR, NV_TMCCT_MMIO, or 0)
        while the vCPU clock (clock_base + retired) is before `target`."""
        t = self.trap
        t.fast_tmcct = where
        t.clock_base = clock_base
        t.tmcct_target = target
        t.tmcct_period = period
        t.tmcct_divisor = divisor

    def fast_wrmsr(self, rip: int, length: int) -> None:
        """Take the x2APIC ICR writes of the WRMSR at `rip` that send this vCPU an NMI in the
        trap hook while the trap's `icr_self_nmi` is set, until a TLB flush."""
        N.traplib.nv_fast_wrmsr(self._tp, self._linear(rip), length)

    def fast_pause(self, rip: int, length: int) -> None:
        """Retire the PAUSE at `rip` in the trap hook and stop the run (Stop.PAUSE) while the
        trap's `pause_yield` is set, until a TLB flush."""
        N.traplib.nv_fast_pause(self._tp, self._linear(rip), length)

    def passive_sti(self, rip: int) -> None:
        """Run the STI at `rip` without a callback while no interrupt waits (see run's
        `sti_watch`), until a TLB flush."""
        N.traplib.nv_passive_sti(self._tp, self._linear(rip))

    def flush_tlb(self) -> None:
        """The linear->physical map changed: drop unicorn's TLB and our per-page site records."""
        N.uc_ctl0(self.h, N.CTL_TLB_FLUSH)
        if self.tdp is not None:
            self.tdp.flush()
        N.traplib.nv_flush(self._tp)
        self._decoded.clear()
        for _, lins in self._scanned.values():
            lins.clear()

    def flush_code(self) -> None:
        """Guest memory may hold new code written behind the CPU's back (by the host):
        drop every translation, site record and block count."""
        N.uc_ctl0(self.h, N.CTL_TB_FLUSH)
        N.traplib.nv_flush_counts(self._tp)
        self._scanned.clear()
        self._page_sites.clear()
        self._lin_phys.clear()
        self.flush_tlb()

    def paging_regs(self) -> tuple[int, int, int, int]:
        self.ctx.save()
        cr = struct.unpack_from("<5Q", self.ctx.mv, C.OFF_CR)
        return cr[0], cr[3], cr[4], self.ctx.u64(C.OFF_EFER)

    def linear_to_phys(self, linear: int, *, write: bool = False, fetch: bool = False, user: bool = False) -> int:
        """The physical address unicorn uses for `linear` (no flag updates); PageFault if none."""
        cr0, cr3, cr4, efer = self.paging_regs()
        if self.tdp is not None:
            try:
                return self.tdp.translate_linear(linear, cr0, cr3, cr4, efer, write=write, fetch=fetch, user=user,
                                                 set_ad=False)
            except TdpFault:
                raise PageFault(linear, 0) from None
        return translate(self.mem, cr0, cr3, cr4, efer, linear, write=write, fetch=fetch, user=user, set_ad=False)

    def read_code(self, linear: int, size: int) -> bytes:
        """Bytes of code at a linear address (stops early at an unmapped page)."""
        out = bytearray()
        while size > 0:
            try:
                pa = self.linear_to_phys(linear, fetch=True)
            except PageFault:
                break
            n = min(size, 0x1000 - (linear & 0xFFF))
            out += self.mem.read(pa, n)
            linear += n
            size -= n
        return bytes(out)

    def access_address(self, page: int, *, fetch: bool) -> int:
        """The linear address in `page` that the instruction at RIP accesses: RIP itself for a
        fetch, else its explicit memory operand; `page` when neither lies in it (an implicit
        stack access, a string instruction's second operand)."""
        st = self.get_state()
        rip = (st.cs.base + st.rip) & TOP
        if fetch:
            return rip if rip & ~0xFFF == page else page
        md = _DETAIL[self.code_bits()]
        code = self.read_code(rip, 15)
        for insn in md.disasm(code, st.rip, 1):
            for o in insn.operands:
                if o.type != capstone.x86.X86_OP_MEM:
                    continue
                m = o.mem
                addr = m.disp
                if m.base == capstone.x86.X86_REG_RIP:
                    addr += st.rip + insn.size
                elif m.base:
                    addr += self.reg(_CS_REGS[m.base])
                if m.index:
                    addr += self.reg(_CS_REGS[m.index]) * m.scale
                seg = {capstone.x86.X86_REG_FS: st.fs.base, capstone.x86.X86_REG_GS: st.gs.base}.get(m.segment, 0)
                addr = (addr + seg) & (TOP if st.cs.l else 0xFFFFFFFF)
                if addr & ~0xFFF == page:
                    return addr
        return page

    def use_tdp(self, tdp: TwoDimensional | None) -> None:
        """Translate through the second level `tdp` from now on (L2 under EPT or NPT), or let
        unicorn walk the guest's page tables itself (None). Under a second level unicorn's
        TLB runs in UC_TLB_VIRTUAL mode and every miss is filled by `TwoDimensional.fill`."""
        if tdp is not None and not self._tlb_hooked:
            self.uc.hook_add(ucc.UC_HOOK_TLB_FILL, self._on_tlb_fill)
            self._tlb_hooked = True
        if (tdp is None) != (self.tdp is None):
            self.uc.ctl_set_tlb_mode(ucc.UC_TLB_CPU if tdp is None else ucc.UC_TLB_VIRTUAL)
        self.tdp = tdp
        self.flush_tlb()

    # ---- running ------------------------------------------------------------------------

    def run(self, budget: int, limit: int = TOP) -> Stop:
        """Run about `budget` instructions from the current RIP, and never more than `limit`.
        The budget is checked at the start of each translation block, so the last block may
        run past it; the block that would run past the limit runs one instruction at a time."""
        t = self.trap
        self.exception = self.unmapped = self.tlb_fault = self._fill_fault = self._error = None
        err = N.traplib.nv_run(self._tp, self.h, budget, limit)
        self.retired = t.icount
        stop = self._stopped(err, Stop.HALTED)
        target = min(budget, limit)
        if stop == Stop.BUDGET and t.budget == budget and self.retired < target:   # the limit stopped it
            t.budget = t.limit = TOP
            while self.retired < target:
                err = self._emulate(1)
                before, self.retired = self.retired, N.traplib.nv_retired(self._tp)
                stop = self._stopped(err, Stop.BUDGET)
                if stop != Stop.BUDGET or self.retired == before:
                    break
        return stop

    def _emulate(self, count: int) -> int:
        """uc_emu_start from RIP; `count` 1 runs one instruction (unicorn's count mode)."""
        t = self.trap
        # count mode only stops in blocks translated while it is on
        flush = count > 0
        while True:
            if flush:
                N.uc_ctl0(self.h, N.CTL_TB_FLUSH)
            self._no_exception_in_flight()
            err = N.uclib.uc_emu_start(self.h, self.rip, TOP, 0, count)
            if t.stop_reason != N.NV_STOP_RETRY or self._error is not None:
                return err
            if count and N.traplib.nv_clock(self._tp):
                # the step's instruction ran; the retry is for the next block
                t.stop_reason = N.NV_STOP_NONE
                return err
            # New trap sites were hooked in code already translated: translate it again. (A
            # ranged TB_REMOVE_CACHE walks the page through the fetch path, which faults on
            # RAM mapped without EXEC, so the whole cache is dropped; this happens once per
            # code page that brings new sites.)
            flush = True
            t.stop_reason = N.NV_STOP_NONE

    def clock(self) -> int:
        """Instructions retired since run() or step() began, up to where the CPU stands: the
        instruction a trap handler or an I/O callback runs for, or where the run stopped."""
        return N.traplib.nv_clock(self._tp)

    def _enter(self, budget: int) -> None:
        t = self.trap
        t.icount = 0
        t.budget = budget
        t.limit = TOP
        t.stop_reason = N.NV_STOP_NONE
        self.exception = None
        self.unmapped = None
        self.tlb_fault = None
        self._fill_fault = None
        self._error = None

    def _stopped(self, err: int, otherwise: Stop) -> Stop:
        """Why emulation returned: a hook's exception is re-raised, then the recorded reason."""
        if self._error is not None:
            e, self._error = self._error, None
            raise e
        if err == ucc.UC_ERR_EXCEPTION and self.tdp is not None and self._fill_fault is None:
            err = 0   # only unicorn's probe of the `until` page failed (see _on_tlb_fill)
        if err == ucc.UC_ERR_EXCEPTION and self._fill_fault is not None:
            f, self._fill_fault = self._fill_fault, None
            if isinstance(f, GuestFault):
                self.exception = RaisedException(f.vector, f.error_code, False, 0, getattr(f, "linear", None))
            else:
                self.tlb_fault = f
                return Stop.TDP
        if self.exception is not None:
            return Stop.EXCEPTION
        if self.unmapped is not None:
            return Stop.UNMAPPED
        if self.trap.stop_reason == N.NV_STOP_SITE:
            return Stop.TRAP
        if self.trap.stop_reason == N.NV_STOP_PAUSE:
            return Stop.PAUSE
        if self.trap.stop_reason == N.NV_STOP_BUDGET:
            return Stop.BUDGET
        if err:
            raise RuntimeError(f"unicorn stopped with error {err} at {self.rip:#x}")
        return otherwise

    def _no_exception_in_flight(self) -> None:
        """QEMU's check_exception escalates to #DF and shutdown from env->old_exception, which
        only do_interrupt_all resets. Unicorn never runs that, and faults internally where no
        hook sees it (uc_hook_add probes the hooked range through the fetch path), so every
        entry starts with no exception in flight."""
        self._live_i[C.OFF_OLD_EXCEPTION // 4] = 0xFFFFFFFF

    def step(self) -> Stop:
        """Execute one instruction (unicorn's count mode; rare paths only); `retired` is 0
        when it faulted or trapped before it ran."""
        self._enter(TOP)
        err = self._emulate(1)
        self.retired = N.traplib.nv_retired(self._tp)
        return self._stopped(err, Stop.BUDGET)

    def request_stop(self) -> None:
        """From inside a callback: stop at the next block boundary (e.g. an IPI arrived)."""
        self.trap.budget = 0

    def _fail(self, e: BaseException) -> None:
        if self._error is None:
            self._error = e
        self.uc.emu_stop()

    # ---- callbacks from the C hook --------------------------------------------------------

    def _on_page(self, linear: int) -> int:
        try:
            return self._scan_linear_page(linear & ~0xFFF)
        except BaseException as e:  # noqa: BLE001
            self._error = e
            return -1

    def _scan_linear_page(self, page: int) -> int:
        """Record a linear page the CPU runs code from and hook the sites already found in its
        physical page; returns how many hooks are new."""
        N.traplib.nv_set_page(self._tp, page >> 12)
        try:
            pa = self.linear_to_phys(page, fetch=True) & ~0xFFF
        except PageFault:
            return 0
        pp = pa >> 12
        code = self.mem.read(pa, 0x1000)
        entry = self._scanned.get(pp)
        moved = self._lin_phys.get(page >> 12, pp) != pp
        self._lin_phys[page >> 12] = pp
        if entry is None or entry[0] != code:
            if entry is not None:
                self._page_sites.pop(pp, None)
            entry = (code, entry[1] if entry else set())
            self._scanned[pp] = entry
            N.traplib.nv_mark_scanned(self._tp, pp)
            moved = True
        entry[1].add(page >> 12)
        if moved:
            # other code at these linear addresses: count its blocks (and find their sites) again
            N.traplib.nv_flush_counts(self._tp)
        return self._hook_sites(page, self._page_sites.get(pp, ()))

    def _hook_sites(self, page: int, offsets: Iterable[int]) -> int:
        added = 0
        hh = ctypes.c_size_t()
        for offset in offsets:
            addr = page + offset
            if addr not in self._site_hooks:
                if N.hook_add_raw(self.h, ctypes.byref(hh), N.UC_HOOK_CODE, N.SITE_HOOK, self._tp, addr, addr):
                    raise RuntimeError("uc_hook_add(site) failed")
                self._site_hooks.add(addr)
                added += 1
        return added

    def _on_recheck(self) -> int:
        try:
            t = self.trap
            pages = [t.recheck[i] for i in range(t.recheck_count)]
            t.recheck_count = 0
            for pp in pages:
                entry = self._scanned.get(pp)
                if entry is None:
                    continue
                if self.mem.read(pp << 12, 0x1000) != entry[0]:
                    # code was rewritten: every linear page that maps it is scanned again
                    for lp in entry[1]:
                        N.traplib.nv_drop_page(self._tp, lp)
                        self._decoded = {k: v for k, v in self._decoded.items() if k[0] >> 12 != lp}
                    entry[1].clear()
                    del self._scanned[pp]
                    self._page_sites.pop(pp, None)
                    N.traplib.nv_flush_counts(self._tp)
            return 0
        except BaseException as e:  # noqa: BLE001
            self._error = e
            return -1

    def _on_count(self, addr: int, size: int) -> int:
        """Instructions in the translation block [addr, addr+size), their offsets written to
        the trap's `offsets` (decoded once, then cached in C). The block's trap sites are
        hooked; when that adds hooks the block must be translated again (NV_COUNT_RETRY)."""
        try:
            # the bytes after the block too: QEMU may end a block inside an instruction it
            # refuses (#UD) that is a trap site all the same
            code = self.read_code(addr, size + 15)
            md = _DISASM[self.code_bits()]
            offsets = [a - addr for a, _, _, _ in md.disasm_lite(code, addr) if a - addr < size][:BLOCK_INSNS_MAX] or [0]
            starts = set(offsets)
            added = 0
            for off in scan(code[:size + 14]):
                if off in starts:
                    linear = addr + off
                    page = linear & ~0xFFF
                    pp = self._lin_phys.get(page >> 12)
                    if pp is None:
                        pp = self.linear_to_phys(page, fetch=True) >> 12
                    self._page_sites.setdefault(pp, set()).add(linear & 0xFFF)
                    added += self._hook_sites(page, (linear & 0xFFF,))
            if added:
                return N.NV_COUNT_RETRY
            self._offsets[:len(offsets)] = offsets
            return len(offsets)
        except BaseException as e:  # noqa: BLE001
            self._error = e
            return -1

    def code_bits(self) -> int:
        hf = self.hflags()
        if hf & C.HF_CS64:
            return 64
        return 32 if hf & C.HF_CS32 else 16

    def decode_at(self, linear: int) -> Insn | None:
        key = (linear, self._live_i[_CS_SELECTOR_INDEX])
        insn = self._decoded.get(key, False)
        if insn is False:
            insn = decode(self.read_code(linear, 15), self.code_bits())
            self._decoded[key] = insn
        return insn

    def _on_site(self, linear: int) -> int:
        try:
            insn = self.decode_at(linear)
            if insn is None:
                return N.NV_CONTINUE
            return self.handler.on_trap(insn, self.rip)
        except BaseException as e:  # noqa: BLE001
            self._error = e
            return N.NV_STOP_BEFORE

    # ---- callbacks from unicorn ------------------------------------------------------------

    def _on_intr(self, uc: Uc, intno: int, data: object) -> None:
        try:
            self.ctx.save()
            is_int = bool(self.ctx.u32(C.OFF_EXCEPTION_IS_INT))
            next_rip = self.ctx.u64(C.OFF_EXCEPTION_NEXT_EIP)
            ec = self.ctx.u32(C.OFF_ERROR_CODE) if (intno in _ERROR_CODE_VECTORS and not is_int) else None
            cr2 = self.reg_cr(2) if intno == 14 and not is_int else None
            self.exception = RaisedException(intno, ec, is_int, next_rip, cr2)
        except BaseException as e:  # noqa: BLE001
            self._error = e
        self.uc.emu_stop()

    def _on_invalid(self, uc: Uc, data: object) -> bool:
        self.exception = RaisedException(6, None, False, 0)
        self.uc.emu_stop()
        return True

    def _on_tlb_fill(self, uc: Uc, vaddr: int, access: int, entry: object, data: object) -> bool:
        """UC_HOOK_TLB_FILL under EPT/NPT. A refused access stops emulation at the instruction
        (unicorn ends the run with UC_ERR_EXCEPTION) and becomes a #PF of L2 or an EPT exit;
        unicorn also probes its `until` address (TOP) when a run ends; that is not an access."""
        tdp = self.tdp
        if tdp is None or vaddr == TOP & ~0xFFF:
            return False
        try:
            cr0, cr3, cr4, cs = self.read_batch(_PAGING_REGS)
            paddr, perms = tdp.fill(vaddr, access, cr0, cr3, cr4, self.cpu_msr(MSR_EFER), cs & 3 == 3)
        except (GuestFault, TdpFault) as f:
            self._fill_fault = f
            return False
        except BaseException as e:  # noqa: BLE001
            self._error = e
            return False
        entry.paddr = paddr
        entry.perms = perms
        return True

    def _on_unmapped(self, uc: Uc, access: int, address: int, size: int, value: int, data: object) -> bool:
        self.unmapped = UnmappedAccess(address, size, access == ucc.UC_MEM_WRITE_UNMAPPED, value & TOP,
                                       access == ucc.UC_MEM_FETCH_UNMAPPED)
        return False
