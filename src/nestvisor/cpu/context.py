"""The raw CPU context of unicorn 2.1.4 (QEMU 5's CPUX86State), read and patched as bytes.

Loading full descriptor caches, real mode or any paging mode is not possible through
unicorn's register API in UC_MODE_64; writing CPUX86State directly is. The offsets below
are those of the pinned unicorn build; tests/test_context_layout.py re-derives each one by
probing a live instance, so a different build fails loudly instead of corrupting state.
"""

from __future__ import annotations

import ctypes
import struct

from .native import c_p, uclib
from .state import ArchState, DescTable, Segment

# Header of struct uc_context before the CPUX86State copy.
CTX_HEADER = 40
# Offsets inside CPUX86State (qemu/target/i386/cpu.h, x86_64 build).
OFF_REGS = 0
OFF_EIP = 128
OFF_EFLAGS = 136
OFF_HFLAGS = 176
OFF_HFLAGS2 = 180
OFF_SEGS = 184          # ES, CS, SS, DS, FS, GS; then LDT, TR, GDT, IDT; 24 bytes each
OFF_LDT = 184 + 6 * 24
OFF_TR = OFF_LDT + 24
OFF_GDT = OFF_TR + 24
OFF_IDT = OFF_GDT + 24
OFF_CR = 424            # cr[9]
OFF_EFER = 592
# x87/SSE: CPUX86State from fpstt (after the start_init_save marker) to the end of
# xmm_regs[15] (ZMMReg, 64 bytes each), found by writing FPSW.TOP and XMM0/XMM15 through unicorn
OFF_FPU = 604
OFF_XMM = 824
OFF_FPU_END = OFF_XMM + 16 * 64
OFF_XCR0 = 4904          # found by XSETBV/XGETBV (tests/test_snapshot.py runs XGETBV after set_xcrs)
OFF_PAT = 5280
OFF_ERROR_CODE = 5384
OFF_EXCEPTION_IS_INT = 5388
OFF_EXCEPTION_NEXT_EIP = 5392
OFF_DR = 5400
OFF_OLD_EXCEPTION = 5496   # after dr[8] and the breakpoint/watchpoint pointer union
# Where the live CPUX86State is, for native hooks that read it in place: struct uc_struct's
# `cpu` (include/uc_priv.h), then CPUState's `env_ptr` (qemu/include/hw/core/cpu.h).
OFF_UC_CPU = 0x1B8
OFF_CPU_ENV_PTR = 0x128
# CPUState's `mem_io_pc` (the host address in translated code of the last memory-mapped
# I/O access) and its `uc` back-pointer, which confirms the layout.
OFF_CPU_MEM_IO_PC = 0x8178
OFF_CPU_UC = 0x81A8

R_ES, R_CS, R_SS, R_DS, R_FS, R_GS = range(6)
OFF_CS_BASE = OFF_SEGS + 24 * R_CS + 8   # SegmentCache.base (QEMU's code address is CS base + EIP)
SEG_ORDER = ("es", "cs", "ss", "ds", "fs", "gs")

# hflags bits (cpu.h HF_*_SHIFT)
HF_CPL_MASK = 3
HF_INHIBIT_IRQ = 1 << 3
HF_CS32 = 1 << 4
HF_SS32 = 1 << 5
HF_ADDSEG = 1 << 6
HF_PE = 1 << 7
HF_MP_SHIFT = 9
HF_LMA = 1 << 14
HF_CS64 = 1 << 15
HF_SMM = 1 << 19
HF_OSFXSR = 1 << 22
HF_SMAP = 1 << 23
HF2_GIF = 1 << 0
HF2_NMI = 1 << 2

_SEG = struct.Struct("<I4xQII")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_CR = struct.Struct("<9Q")


class CpuContext:
    """One uc_context buffer bound to one unicorn instance."""

    def __init__(self, uch: int) -> None:
        self._uch = uch
        handle = c_p()
        if uclib.uc_context_alloc(uch, ctypes.byref(handle)) != 0:
            raise MemoryError("uc_context_alloc failed")
        self._handle = handle
        size = uclib.uc_context_size(uch)
        self.buf = (ctypes.c_char * size).from_address(handle.value + CTX_HEADER)
        self.mv = memoryview(self.buf).cast("B")

    def save(self) -> None:
        uclib.uc_context_save(self._uch, self._handle)

    def restore(self) -> None:
        uclib.uc_context_restore(self._uch, self._handle)

    def live_address(self) -> int:
        """The address of the instance's own CPUX86State, which save() copies. Checked
        against a save, so a build with another layout fails here, not in a hook."""
        cpu = c_p.from_address(self._uch.value + OFF_UC_CPU).value
        env = c_p.from_address(cpu + OFF_CPU_ENV_PTR).value if cpu else None
        self.save()
        if not env or ctypes.string_at(env, OFF_EFER + 8) != bytes(self.mv[:OFF_EFER + 8]):
            raise RuntimeError("unicorn's CPU state is not where context.OFF_UC_CPU/OFF_CPU_ENV_PTR say")
        return env

    def live_cpu(self) -> int:
        """The address of the instance's CPUState, checked by its back-pointer to the instance."""
        cpu = c_p.from_address(self._uch.value + OFF_UC_CPU).value
        if not cpu or c_p.from_address(cpu + OFF_CPU_UC).value != self._uch.value:
            raise RuntimeError("unicorn's CPUState is not where context.OFF_UC_CPU/OFF_CPU_UC say")
        return cpu

    def u32(self, off: int) -> int:
        return _U32.unpack_from(self.mv, off)[0]

    def set_u32(self, off: int, value: int) -> None:
        _U32.pack_into(self.mv, off, value & 0xFFFFFFFF)

    def u64(self, off: int) -> int:
        return _U64.unpack_from(self.mv, off)[0]

    def set_u64(self, off: int, value: int) -> None:
        _U64.pack_into(self.mv, off, value & 0xFFFFFFFFFFFFFFFF)

    def seg(self, off: int) -> Segment:
        sel, base, limit, flags = _SEG.unpack_from(self.mv, off)
        return Segment(sel, base, limit, flags)

    def set_seg(self, off: int, s: Segment) -> None:
        _SEG.pack_into(self.mv, off, s.selector & 0xFFFF, s.base & 0xFFFFFFFFFFFFFFFF, s.limit & 0xFFFFFFFF, s.flags & 0xFFFFFFFF)

    @property
    def hflags(self) -> int:
        return self.u32(OFF_HFLAGS)

    def read_state(self, rip: int, rsp: int, rflags: int) -> ArchState:
        """The architectural state in the buffer (call save() first); RIP/RSP/RFLAGS come from the API."""
        segs = [self.seg(OFF_SEGS + 24 * i) for i in range(6)]
        gdt = self.seg(OFF_GDT)
        idt = self.seg(OFF_IDT)
        cr = _CR.unpack_from(self.mv, OFF_CR)
        return ArchState(
            rip=rip, rsp=rsp, rflags=rflags,
            es=segs[R_ES], cs=segs[R_CS], ss=segs[R_SS], ds=segs[R_DS], fs=segs[R_FS], gs=segs[R_GS],
            ldt=self.seg(OFF_LDT), tr=self.seg(OFF_TR),
            gdt=DescTable(gdt.base, gdt.limit), idt=DescTable(idt.base, idt.limit),
            cr0=cr[0], cr2=cr[2], cr3=cr[3], cr4=cr[4], efer=self.u64(OFF_EFER),
        )

    def write_state(self, st: ArchState) -> None:
        """Patch segments, control registers, EFER and the derived hflags into the buffer."""
        for i, name in enumerate(SEG_ORDER):
            self.set_seg(OFF_SEGS + 24 * i, getattr(st, name))
        self.set_seg(OFF_LDT, st.ldt)
        self.set_seg(OFF_TR, st.tr)
        self.set_seg(OFF_GDT, Segment(0, st.gdt.base, st.gdt.limit, 0))
        self.set_seg(OFF_IDT, Segment(0, st.idt.base, st.idt.limit, 0))
        self.set_u64(OFF_CR + 0, st.cr0)
        self.set_u64(OFF_CR + 16, st.cr2)
        self.set_u64(OFF_CR + 24, st.cr3)
        self.set_u64(OFF_CR + 32, st.cr4)
        self.set_u64(OFF_EFER, st.efer)
        self.set_u32(OFF_HFLAGS, compute_hflags(st, self.hflags))


def compute_hflags(st: ArchState, old: int) -> int:
    """QEMU's hidden flags for `st`, as cpu_x86_load_seg_cache/cpu_x86_update_cr0 derive them."""
    hf = old & (HF_INHIBIT_IRQ | HF_SMM)
    pe = st.cr0 & 1
    vm = (st.rflags >> 17) & 1 if pe else 0
    if pe:
        hf |= HF_PE
        hf |= 3 if vm else st.ss.dpl
    hf |= ((st.cr0 >> 1) & 7) << HF_MP_SHIFT
    lma = st.efer & (1 << 10)
    if lma:
        hf |= HF_LMA
    if lma and st.cs.l:
        hf |= HF_CS64 | HF_CS32
    elif st.cs.db:
        hf |= HF_CS32
    if st.ss.db:
        hf |= HF_SS32
    if not hf & HF_CS64:
        if not pe or vm or not hf & HF_CS32:
            hf |= HF_ADDSEG
        elif st.ds.base | st.es.base | st.ss.base:
            hf |= HF_ADDSEG
    if st.cr4 & (1 << 9):
        hf |= HF_OSFXSR
    if st.cr4 & (1 << 21):
        hf |= HF_SMAP
    return hf
