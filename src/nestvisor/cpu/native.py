"""Raw access to libunicorn and to our trap hooks (_trap.c), below the Python binding.

The binding costs several microseconds per call on the paths that run per exit; these
wrappers call the C functions directly with preallocated arguments.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import importlib.util
from pathlib import Path

from unicorn.unicorn_py3 import unicorn as _ucpy

uclib = _ucpy.uclib

c_u64 = ctypes.c_uint64
c_p = ctypes.c_void_p

uclib.uc_reg_read.argtypes = [c_p, ctypes.c_int, c_p]
uclib.uc_reg_read.restype = ctypes.c_int
uclib.uc_reg_write.argtypes = [c_p, ctypes.c_int, c_p]
uclib.uc_reg_write.restype = ctypes.c_int
uclib.uc_reg_read_batch.argtypes = [c_p, c_p, c_p, ctypes.c_int]
uclib.uc_reg_read_batch.restype = ctypes.c_int
uclib.uc_reg_write_batch.argtypes = [c_p, c_p, c_p, ctypes.c_int]
uclib.uc_reg_write_batch.restype = ctypes.c_int
uclib.uc_emu_start.argtypes = [c_p, c_u64, c_u64, c_u64, ctypes.c_size_t]
uclib.uc_emu_start.restype = ctypes.c_int
uclib.uc_context_alloc.argtypes = [c_p, ctypes.POINTER(c_p)]
uclib.uc_context_save.argtypes = [c_p, c_p]
uclib.uc_context_restore.argtypes = [c_p, c_p]
uclib.uc_context_size.argtypes = [c_p]
uclib.uc_context_size.restype = ctypes.c_size_t
uclib.uc_mmio_map.argtypes = [c_p, c_u64, ctypes.c_size_t, c_p, c_p, c_p, c_p]
uclib.uc_mmio_map.restype = ctypes.c_int
uclib.uc_hook_del.argtypes = [c_p, ctypes.c_size_t]
uclib.uc_hook_del.restype = ctypes.c_int

# uc_hook_add is variadic; code/memory hooks take exactly these seven arguments.
_hook_add = uclib.uc_hook_add
_hook_add_proto = ctypes.CFUNCTYPE(ctypes.c_int, c_p, ctypes.POINTER(ctypes.c_size_t), ctypes.c_int, c_p, c_p, c_u64, c_u64)
hook_add_raw = _hook_add_proto(ctypes.cast(_hook_add, c_p).value)

_ctl_proto = ctypes.CFUNCTYPE(ctypes.c_int, c_p, ctypes.c_int)
uc_ctl0 = _ctl_proto(ctypes.cast(uclib.uc_ctl, c_p).value)

# UC_CTL_WRITE(UC_CTL_TLB_FLUSH, 0) and UC_CTL_WRITE(UC_CTL_TB_FLUSH, 0): type | nr << 26 | IO_WRITE << 30
CTL_TLB_FLUSH = 11 | (1 << 30)
CTL_TB_FLUSH = 10 | (1 << 30)

UC_HOOK_CODE = 1 << 2
UC_HOOK_BLOCK = 1 << 3
UC_HOOK_MEM_FETCH_PROT = 1 << 9
UC_HOOK_MEM_READ = 1 << 10
UC_HOOK_MEM_WRITE = 1 << 11

# action codes returned by Python site callbacks (enum nv_action in _trap.c)
NV_CONTINUE, NV_HANDLED, NV_STOP_BEFORE, NV_HANDLED_STOP = 0, 1, 2, 3
NV_SKIP = 0x100   # | length: emulated, the hook moves RIP past the instruction
NV_STOP_NONE, NV_STOP_BUDGET, NV_STOP_SITE, NV_STOP_RETRY, NV_STOP_PAUSE = 0, 1, 2, 3, 4
NV_COUNT_RETRY = -2   # on_count hooked new sites in the block: translate it again

PAGE_CB = ctypes.CFUNCTYPE(ctypes.c_int, c_u64)
RECHECK_CB = ctypes.CFUNCTYPE(ctypes.c_int)
COUNT_CB = ctypes.CFUNCTYPE(ctypes.c_int, c_u64, ctypes.c_uint32)


class NvTrap(ctypes.Structure):
    """Mirror of the public head of struct nv_trap (_trap.c)."""

    _fields_ = [
        ("icount", c_u64),
        ("budget", c_u64),
        ("stop_reason", ctypes.c_uint32),
        ("recheck_count", ctypes.c_uint32),
        ("recheck", c_u64 * 64),
        ("emu_stop", c_p),
        ("on_page", c_p),
        ("on_site", c_p),
        ("on_recheck", c_p),
        ("on_count", c_p),
        ("reg_write", c_p),
        ("reg_rax", ctypes.c_int32),
        ("reg_rdx", ctypes.c_int32),
        ("reg_rip", ctypes.c_int32),
        ("fast_tsc", ctypes.c_uint32),
        ("tsc_base", c_u64),
        ("sti_watch", ctypes.c_uint32),
        ("env", c_p),
        ("hflags", c_p),
        ("eflags", c_p),
        ("raise_exception_err", c_p),
        ("ac_flag", c_u64),
        ("ac_vector", ctypes.c_int32),
        ("offsets", c_p),
        ("offsets_cap", ctypes.c_uint32),
        ("eip", c_p),
        ("cs_base", c_p),
        ("limit", c_u64),
        ("cpu", c_p),
        ("mem_io_pc", c_p),
        ("restore_state", c_p),
        ("inject", ctypes.c_int32),
        ("do_interrupt", c_p),
        ("nmi_pending", ctypes.c_uint32),
        ("nmi_native", ctypes.c_uint32),
        ("nmi_taken", ctypes.c_uint32),
        ("hflags2", c_p),
        ("hf_inhibit_irq", ctypes.c_uint32),
        ("hf2_nmi", ctypes.c_uint32),
        ("fast_tmcct", ctypes.c_uint32),
        ("clock_base", c_u64),
        ("tmcct_target", c_u64),
        ("tmcct_period", c_u64),
        ("tmcct_divisor", c_u64),
        ("regs", c_p),
        ("apic_read", c_p),
        ("pause_yield", ctypes.c_uint32),
        ("icr_self_nmi", ctypes.c_uint32),
        ("x2apic_id", ctypes.c_uint32),
        ("lapic_quiet_until", c_u64),
        ("icr_value", c_u64),
        ("icr_written", ctypes.c_uint32),
        ("icr_fast", ctypes.c_uint32),
        ("xapic_self_nmi", ctypes.c_uint32),
        ("xapic_id", ctypes.c_uint32),
        ("apic_write", c_p),
        ("emu_start", c_p),
        ("ctl", c_p),
        ("ctl_tb_flush", ctypes.c_int32),
        ("old_exception", c_p),
        ("attention", ctypes.c_uint32),
    ]


def _load_trap() -> ctypes.CDLL:
    spec = importlib.util.find_spec("nestvisor.cpu._trap")
    if spec is None or spec.origin is None:
        here = Path(__file__).parent
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            cand = here / f"_trap{suffix}"
            if cand.exists():
                return ctypes.CDLL(str(cand))
        raise ImportError("nestvisor.cpu._trap is not built: run `pip install -e .` (needs a C compiler)")
    return ctypes.CDLL(spec.origin)


traplib = _load_trap()
traplib.nv_new.restype = ctypes.POINTER(NvTrap)
traplib.nv_free.argtypes = [c_p]
traplib.nv_flush.argtypes = [c_p]
traplib.nv_fast_rdtsc.argtypes = [c_p, c_u64, ctypes.c_uint32]
traplib.nv_passive_sti.argtypes = [c_p, c_u64]
traplib.nv_fast_rdmsr.argtypes = [c_p, c_u64, ctypes.c_uint32]
traplib.nv_fast_pause.argtypes = [c_p, c_u64, ctypes.c_uint32]
traplib.nv_fast_wrmsr.argtypes = [c_p, c_u64, ctypes.c_uint32]
traplib.nv_set_page.argtypes = [c_p, c_u64]
traplib.nv_drop_page.argtypes = [c_p, c_u64]
traplib.nv_mark_scanned.argtypes = [c_p, c_u64]
traplib.nv_flush_counts.argtypes = [c_p]
traplib.nv_clock.argtypes = [c_p]
traplib.nv_clock.restype = c_u64
traplib.nv_retired.argtypes = [c_p]
traplib.nv_retired.restype = c_u64
traplib.nv_sync_io_pc.argtypes = [c_p]
traplib.nv_run.argtypes = [c_p, c_p, c_u64, c_u64]
traplib.nv_run.restype = ctypes.c_int
BLOCK_HOOK = ctypes.cast(traplib.nv_block_hook, c_p).value
SITE_HOOK = ctypes.cast(traplib.nv_site_hook, c_p).value
FETCH_HOOK = ctypes.cast(traplib.nv_fetch_hook, c_p).value
ALIGN_HOOK = ctypes.cast(traplib.nv_align_hook, c_p).value
APIC_MMIO_READ = ctypes.cast(traplib.nv_apic_mmio_read, c_p).value
APIC_MMIO_WRITE = ctypes.cast(traplib.nv_apic_mmio_write, c_p).value
MMIO_READ_CB = ctypes.CFUNCTYPE(c_u64, c_u64, ctypes.c_uint32)
MMIO_WRITE_CB = ctypes.CFUNCTYPE(None, c_u64, ctypes.c_uint32, c_u64)
NV_TMCCT_MSR, NV_TMCCT_MMIO = 1, 2
EMU_STOP = ctypes.cast(uclib.uc_emu_stop, c_p).value
EMU_START = ctypes.cast(uclib.uc_emu_start, c_p).value
UC_CTL = ctypes.cast(uclib.uc_ctl, c_p).value
REG_WRITE = ctypes.cast(uclib.uc_reg_write, c_p).value
# QEMU's raise_exception_err (excp_helper.c), exported by libunicorn under its x86-64 name
RAISE_EXCEPTION_ERR = ctypes.cast(uclib.raise_exception_err_x86_64, c_p).value
# QEMU's cpu_restore_state (translate-all.c): RIP from a host address in translated code
RESTORE_STATE = ctypes.cast(uclib.cpu_restore_state_x86_64, c_p).value
# QEMU's do_interrupt_x86_hardirq (seg_helper.c): delivery through the IVT/IDT as the CPU does it
DO_INTERRUPT = ctypes.cast(uclib.do_interrupt_x86_hardirq_x86_64, c_p).value
