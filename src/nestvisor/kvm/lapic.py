"""The in-kernel local APIC, shaped like KVM's arch/x86/kvm/lapic.c, on the deterministic clock.

One `Lapic` per vCPU, one `ApicBus` per VM (KVM's apic map / kvm_irq_delivery_to_apic).

The vCPU drives it through a small surface:

* IA32_APIC_BASE: `get_apic_base()`, `set_apic_base(value, host_initiated)`.
* xAPIC MMIO: `mmio_in_range(gpa)`, `mmio_read(offset, size)`, `mmio_write(offset, size, value)`.
* x2APIC MSRs 0x800-0x8FF: `msr_read(msr)`, `msr_write(msr, value)`.
* IA32_TSC_DEADLINE: the `tsc_deadline` property; `tsc_offset` maps vCPU clock to guest TSC.
* CR8: `get_cr8()`, `set_cr8(value)`.
* interrupts: `pending_vector()`, `ack_interrupt()`, `accept_pic_intr()`; devices use
  `accept_irq()` and `ApicBus.deliver_irq()`.
* time: `next_deadline()`, `update_timer(now)`.
* INIT / power-on: `reset(init_event)`; migration: `snapshot()`, `restore(state)`.

Time: the vCPU's virtual ns (`ApicHost.now()`), TSC = 1 tick per ns (+ `tsc_offset`),
APIC bus = 1 tick per ns before the TDCR divider. Every guest-visible access first
catches the timer up to "now", so the model is exact however rarely the vCPU calls
`update_timer()`; `next_deadline()` only tells the vCPU when to wake up.

GuestFault(13) is raised exactly where KVM's kvm_x2apic_msr_read/write and
kvm_apic_set_base return 1.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from nestvisor.arch import apic as A
from nestvisor.cpu.faults import GuestFault

_U32 = struct.Struct("<I")
_MASK32 = 0xFFFFFFFF


class ApicHost(Protocol):
    """What the Lapic needs from its vCPU."""

    def now(self) -> int:
        """Virtual ns this vCPU has lived (1 retired instruction = 1 ns)."""
        ...

    def kick(self) -> None:
        """An interrupt became pending (IRR set, or PPR dropped below a pending vector)."""
        ...

    def deliver_nmi(self) -> None:
        """Latch an NMI (KVM kvm_inject_nmi + kick)."""
        ...

    def deliver_init(self) -> None:
        """INIT received: the vCPU does kvm_vcpu_reset(init_event) -> `Lapic.reset(True)`."""
        ...

    def deliver_sipi(self, vector: int) -> None:
        """Start-up IPI; honoured only in wait-for-SIPI (KVM kvm_apic_accept_events)."""
        ...


@dataclass(frozen=True)
class LapicState:
    """KVM_GET_LAPIC's 1 KiB register page plus the timer state KVM keeps outside it.

    `regs` is kvm_lapic_state.regs: TMCCT holds the current count at save time, the
    x2APIC ID is stored as a full 32-bit value (KVM_X2APIC_API_USE_32BIT_IDS format) and
    ICR is split into ICR (0x300) and ICR2 (0x310). The timer fields make restore exact
    (TMCCT has a resolution of one divided bus tick and loses "has the one-shot fired").
    IA32_APIC_BASE is not here: as in KVM it travels with the MSRs/sregs and must be set
    before `restore()`.
    """

    regs: bytes
    timer_armed: bool | None = None  # None: unknown (bare KVM bytes), derive from TMCCT
    timer_remaining_ns: int = 0  # ns from save time to the next one-shot/periodic expiry
    tsc_deadline: int = 0  # IA32_TSC_DEADLINE (0 = disarmed)
    esr_pending: int = 0  # errors latched since the last ESR write (SDM 11.5.3)


class Lapic:
    """One vCPU's local APIC (KVM struct kvm_lapic)."""

    def __init__(
        self,
        vcpu_id: int,
        host: ApicHost,
        bus: ApicBus,
        *,
        maxphyaddr: int = 40,
        x2apic_supported: bool = True,
        tsc_deadline_supported: bool = True,
        nr_lvt: int = A.APIC_NR_LVT,
    ) -> None:
        self.vcpu_id = vcpu_id
        self.host = host
        self.bus = bus
        # Guest CPUID facts KVM consults (update them after set_cpuid2).
        self.maxphyaddr = maxphyaddr
        self.x2apic_supported = x2apic_supported
        self.tsc_deadline_supported = tsc_deadline_supported
        self.nr_lvt = nr_lvt
        # Guest TSC = host.now() + tsc_offset (TSC runs at 1 GHz).
        self.tsc_offset = 0
        # KVM_X86_QUIRK_LAPIC_MMIO_HOLE (on by default): a disabled or x2APIC-mode APIC
        # still claims its page, reads return all ones and writes are dropped.
        self.mmio_hole_quirk = True
        # KVM_X86_QUIRK_LINT0_REENABLED (on by default): the BSP's LVT0 is ExtINT at reset.
        self.lint0_reenabled_quirk = True
        self.smi_count = 0  # SMIs received: recorded, not delivered (no SMM)

        self.regs = bytearray(A.KVM_APIC_REG_SIZE)
        # IRR/ISR/TMR as 256-bit ints (bit n = vector n) so the highest vector is
        # bit_length() - 1; they are spliced into the register page on read/snapshot.
        self.irr = 0
        self.isr = 0
        self.tmr = 0
        self.apic_base = 0
        self.esr_pending = 0
        self.divide_count = 2
        self.timer_mode = A.APIC_LVT_TIMER_ONESHOT
        self._period = 0  # ns per TMICT period (KVM lapic_timer.period)
        self._target: int | None = None  # ns of the next one-shot/periodic expiry
        self._tscdeadline = 0
        bus.attach(self)
        self.reset(init_event=False)

    # --- register page helpers -----------------------------------------------------------

    def get_reg(self, offset: int) -> int:
        """Raw 32-bit register at `offset` (KVM kvm_lapic_get_reg); IRR/ISR/TMR included."""
        if not A.APIC_ISR <= offset < A.APIC_IRR + 0x80:
            return _U32.unpack_from(self.regs, offset)[0]
        group = self._vector_group(offset)
        if group is not None:
            bits, index = group
            return (bits >> (32 * index)) & _MASK32
        return _U32.unpack_from(self.regs, offset)[0]

    def _set_reg(self, offset: int, value: int) -> None:
        _U32.pack_into(self.regs, offset, value & _MASK32)
        if offset == A.APIC_ID:
            self.bus.modes_changed += 1

    def _vector_group(self, offset: int) -> tuple[int, int] | None:
        if A.APIC_ISR <= offset < A.APIC_ISR + 0x80:
            return self.isr, (offset - A.APIC_ISR) >> 4
        if A.APIC_TMR <= offset < A.APIC_TMR + 0x80:
            return self.tmr, (offset - A.APIC_TMR) >> 4
        if A.APIC_IRR <= offset < A.APIC_IRR + 0x80:
            return self.irr, (offset - A.APIC_IRR) >> 4
        return None

    # --- mode predicates ----------------------------------------------------------------

    @property
    def hw_enabled(self) -> bool:
        """IA32_APIC_BASE.EN (KVM kvm_apic_hw_enabled / kvm_apic_present)."""
        return bool(self.apic_base & A.MSR_IA32_APICBASE_ENABLE)

    @property
    def sw_enabled(self) -> bool:
        """SPIV bit 8 (KVM kvm_apic_sw_enabled)."""
        return bool(self.get_reg(A.APIC_SPIV) & A.APIC_SPIV_APIC_ENABLED)

    @property
    def enabled(self) -> bool:
        """Hardware- and software-enabled (KVM apic_enabled)."""
        return self.hw_enabled and self.sw_enabled

    @property
    def x2apic_mode(self) -> bool:
        """IA32_APIC_BASE.EXTD (KVM apic_x2apic_mode)."""
        return bool(self.apic_base & A.MSR_IA32_APICBASE_EXTD)

    @property
    def mode(self) -> int:
        """One of arch.apic.LAPIC_MODE_* (KVM kvm_get_apic_mode)."""
        return self.apic_base & (A.MSR_IA32_APICBASE_ENABLE | A.MSR_IA32_APICBASE_EXTD)

    @property
    def base_address(self) -> int:
        """Guest-physical address of the xAPIC MMIO page."""
        return self.apic_base & A.MSR_IA32_APICBASE_BASE & ((1 << self.maxphyaddr) - 1)

    @property
    def xapic_id(self) -> int:
        """APIC ID as xAPIC sees it (KVM kvm_xapic_id: ID register bits 31:24)."""
        return self.get_reg(A.APIC_ID) >> 24

    @property
    def x2apic_id(self) -> int:
        """x2APIC ID: read-only and equal to the vCPU id (KVM kvm_x2apic_id)."""
        return self.vcpu_id

    @property
    def is_bsp(self) -> bool:
        """IA32_APIC_BASE.BSP."""
        return bool(self.apic_base & A.MSR_IA32_APICBASE_BSP)

    @property
    def ppr(self) -> int:
        """Processor priority register."""
        return self.get_reg(A.APIC_PROCPRI)

    @property
    def tpr(self) -> int:
        """Task priority register."""
        return self.get_reg(A.APIC_TASKPRI)

    def _timer_mode_mask(self) -> int:
        # KVM: timer_mode_mask = 3 << 17 with TSC-deadline in guest CPUID, else 1 << 17.
        return A.APIC_LVT_TIMER_MASK if self.tsc_deadline_supported else A.APIC_LVT_TIMER_PERIODIC

    def _lvt_supported(self, offset: int) -> bool:
        # KVM kvm_lapic_lvt_supported: LVT index < nr_lvt_entries (CMCI is index 6).
        return A.LVT_REGISTERS.index(offset) < self.nr_lvt

    # --- reset ------------------------------------------------------------------------------

    def reset(self, init_event: bool = True) -> None:
        """KVM kvm_lapic_reset: INIT keeps IA32_APIC_BASE and the APIC ID (SDM 11.4.7.3).

        With init_event=False this is power-on RESET: IA32_APIC_BASE = 0xFEE00000 | EN
        (| BSP for vCPU 0) and the xAPIC ID = vCPU id.
        """
        if not init_event:
            value = A.APIC_DEFAULT_PHYS_BASE | A.MSR_IA32_APICBASE_ENABLE
            if self.vcpu_id == 0:  # KVM kvm_vcpu_is_reset_bsp
                value |= A.MSR_IA32_APICBASE_BSP
            self._set_base(value)
            self._set_reg(A.APIC_ID, self.vcpu_id << 24)  # xAPIC ID set at RESET
        self._reset_registers()

    def _reset_registers(self) -> None:
        """Everything kvm_lapic_reset() initialises, except IA32_APIC_BASE and the ID."""
        self._cancel_timer()
        self._tscdeadline = 0
        self._set_reg(A.APIC_LVR, A.apic_lvr_value(self.nr_lvt))
        for offset in A.LVT_REGISTERS[: self.nr_lvt]:
            self._set_reg(offset, A.APIC_LVT_MASKED)
        if self.nr_lvt < len(A.LVT_REGISTERS):
            self._set_reg(A.APIC_LVTCMCI, 0)
        self.timer_mode = A.APIC_LVT_TIMER_ONESHOT
        if self.vcpu_id == 0 and self.lint0_reenabled_quirk:
            # KVM_X86_QUIRK_LINT0_REENABLED: BSP LVT0 = ExtINT, unmasked.
            self._set_reg(A.APIC_LVT0, A.APIC_DM_EXTINT)
        self._set_reg(A.APIC_DFR, A.APIC_DFR_FLAT)
        self._set_reg(A.APIC_SPIV, A.APIC_SPIV_RESET)
        self._set_reg(A.APIC_TASKPRI, 0)
        if not self.x2apic_mode:
            self._set_reg(A.APIC_LDR, 0)
        self._set_reg(A.APIC_ESR, 0)
        self.esr_pending = 0
        self._set_reg(A.APIC_ICR, 0)
        self._set_reg(A.APIC_ICR2, 0)
        self._set_reg(A.APIC_TDCR, 0)
        self._set_reg(A.APIC_TMICT, 0)
        self._set_reg(A.APIC_TMCCT, 0)
        self._set_reg(A.APIC_ARBPRI, 0)
        self.irr = self.isr = self.tmr = 0
        self._update_divide_count()
        self._set_reg(A.APIC_PROCPRI, 0)

    # --- IA32_APIC_BASE ------------------------------------------------------------------

    def get_apic_base(self) -> int:
        """IA32_APIC_BASE (MSR 0x1B)."""
        return self.apic_base

    def set_apic_base(self, value: int, host_initiated: bool = False) -> None:
        """KVM kvm_apic_set_base: reserved bits and invalid mode transitions are refused.

        Raises GuestFault(13); a host-initiated write (KVM_SET_MSRS) skips only the
        transition rules, and its caller turns a refusal into the ioctl's failure.
        """
        if value == self.apic_base:
            return
        reserved = ~((1 << self.maxphyaddr) - 1) & ((1 << 64) - 1)  # KVM reserved gpa bits
        reserved |= A.APIC_BASE_LOW_RESERVED
        if not self.x2apic_supported:
            reserved |= A.MSR_IA32_APICBASE_EXTD
        old_mode = self.mode
        new_mode = value & (A.MSR_IA32_APICBASE_ENABLE | A.MSR_IA32_APICBASE_EXTD)
        if value & reserved or new_mode == A.LAPIC_MODE_INVALID:
            raise GuestFault(13, 0)  # KVM kvm_apic_set_base: reserved bits / EXTD without EN
        if not host_initiated:
            if old_mode == A.LAPIC_MODE_X2APIC and new_mode == A.LAPIC_MODE_XAPIC:
                raise GuestFault(13, 0)  # SDM 11.12.5: x2APIC -> xAPIC must go via disabled
            if old_mode == A.LAPIC_MODE_DISABLED and new_mode == A.LAPIC_MODE_X2APIC:
                raise GuestFault(13, 0)  # SDM 11.12.5: disabled -> x2APIC must go via xAPIC
        self._sync_timer()
        self._set_base(value)

    def _set_base(self, value: int) -> None:
        """KVM __kvm_apic_set_base, plus the SDM's reset of the APIC when EN goes 1 -> 0."""
        old = self.apic_base
        self.apic_base = value
        self.bus.modes_changed += 1
        changed = old ^ value
        if changed & A.MSR_IA32_APICBASE_ENABLE:
            if value & A.MSR_IA32_APICBASE_ENABLE:
                self._set_reg(A.APIC_ID, self.vcpu_id << 24)  # KVM: xAPIC ID on enable
            else:
                # SDM 11.12.5.1: disabling the APIC returns it to its power-up state
                # (KVM keeps the registers; a disabled APIC is invisible either way).
                self._reset_registers()
                self._set_reg(A.APIC_ID, self.vcpu_id << 24)
        if changed & A.MSR_IA32_APICBASE_EXTD:
            if value & A.MSR_IA32_APICBASE_EXTD:
                # KVM kvm_apic_set_x2apic_id: ID = vcpu_id, LDR derived from it (SDM 11.12.10.2).
                self._set_reg(A.APIC_ID, self.vcpu_id)
                self._set_reg(A.APIC_LDR, A.x2apic_ldr(self.vcpu_id))
            elif value & A.MSR_IA32_APICBASE_ENABLE:
                self._set_reg(A.APIC_ID, self.vcpu_id << 24)  # KVM kvm_apic_set_xapic_id

    # --- xAPIC MMIO --------------------------------------------------------------------------

    def mmio_in_range(self, gpa: int) -> bool:
        """Does this APIC claim `gpa`? (KVM apic_mmio_in_range + the MMIO-hole quirk)."""
        base = self.base_address
        if not base <= gpa < base + A.LAPIC_MMIO_LENGTH:
            return False
        return (self.hw_enabled and not self.x2apic_mode) or self.mmio_hole_quirk

    def mmio_read(self, offset: int, size: int) -> int:
        """KVM apic_mmio_read: `offset` within the 4 KiB page, `size` 1, 2 or 4 bytes."""
        if not self.hw_enabled or self.x2apic_mode:
            return (1 << (8 * size)) - 1  # KVM_X86_QUIRK_LAPIC_MMIO_HOLE: reads all ones
        alignment = offset & 0xF
        if alignment + size > 4:
            return 0  # KVM kvm_lapic_reg_read: no access straddles a 32-bit register
        if offset > 0x3F0 or not self._readable_mask() & A.apic_reg_bit(offset):
            return 0  # reserved and write-only registers read as 0
        value = self._read_register(offset & ~0xF)
        return (value >> (8 * alignment)) & ((1 << (8 * size)) - 1)

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        """KVM apic_mmio_write: only aligned 32-bit writes reach a register (SDM 11.4.1)."""
        if not self.hw_enabled or self.x2apic_mode:
            return  # KVM_X86_QUIRK_LAPIC_MMIO_HOLE: writes dropped
        if size != 4 or offset & 0xF:
            return
        self._write_register(offset & 0xFF0, value & _MASK32)  # refusals are ignored in MMIO

    # --- x2APIC MSRs ---------------------------------------------------------------------

    def msr_read(self, msr: int) -> int:
        """KVM kvm_x2apic_msr_read for MSRs 0x800-0x8FF; #GP when KVM returns 1."""
        if not self.hw_enabled or not self.x2apic_mode:
            raise GuestFault(13, 0)  # KVM: not in x2APIC mode
        offset = A.x2apic_offset(msr)
        if offset == A.APIC_ICR:
            return self.get_reg(A.APIC_ICR) | self.get_reg(A.APIC_ICR2) << 32  # 64-bit ICR
        if not 0 <= offset <= 0x3F0 or not self._readable_mask() & A.apic_reg_bit(offset):
            raise GuestFault(13, 0)  # KVM kvm_lapic_reg_read: reserved or write-only
        return self._read_register(offset)

    def msr_write(self, msr: int, value: int) -> None:
        """KVM kvm_x2apic_msr_write for MSRs 0x800-0x8FF; #GP when KVM returns 1."""
        if not self.hw_enabled or not self.x2apic_mode:
            raise GuestFault(13, 0)  # KVM: not in x2APIC mode
        offset = A.x2apic_offset(msr)
        if offset == A.APIC_ICR:
            if value & A.X2APIC_ICR_RESERVED_BITS:
                raise GuestFault(13, 0)  # KVM kvm_x2apic_icr_write
            self._sync_timer()
            value &= ~A.APIC_ICR_BUSY  # KVM: BUSY is reserved in x2APIC; cleared
            self._set_reg(A.APIC_ICR, value & _MASK32)
            self._set_reg(A.APIC_ICR2, value >> 32)
            self.bus.send_ipi(self, value & _MASK32, value >> 32)
            return
        if value >> 32:
            raise GuestFault(13, 0)  # KVM kvm_lapic_msr_write: bits 63:32 reserved
        if not 0 <= offset <= 0x3F0 or not self._write_register(offset, value):
            raise GuestFault(13, 0)  # KVM kvm_lapic_reg_write returned 1

    # --- register read/write core (KVM __apic_read / kvm_lapic_reg_write) -----------------

    def _readable_mask(self) -> int:
        mask = A.X2APIC_READABLE if self.x2apic_mode else A.XAPIC_READABLE
        if not self._lvt_supported(A.APIC_LVTCMCI):
            mask &= ~A.apic_reg_bit(A.APIC_LVTCMCI)
        return mask

    def _read_register(self, offset: int) -> int:
        """KVM __apic_read for a readable, 16-byte aligned offset."""
        self._sync_timer()
        if offset == A.APIC_ARBPRI:
            return 0  # KVM: arbitration priority is not modelled
        if offset == A.APIC_TMCCT:
            return self._get_tmcct()
        return self.get_reg(offset)

    def _write_register(self, offset: int, value: int) -> bool:
        """KVM kvm_lapic_reg_write: store `value` with its side effects; False = refused."""
        self._sync_timer()
        x2 = self.x2apic_mode
        if offset == A.APIC_ID:
            if x2:
                return False  # x2APIC ID is read-only
            self._set_reg(A.APIC_ID, value & 0xFF000000)
        elif offset == A.APIC_TASKPRI:
            self._set_tpr(value & 0xFF)
        elif offset == A.APIC_EOI:
            self._set_eoi()
        elif offset == A.APIC_LDR:
            if x2:
                return False  # x2APIC LDR is read-only
            self._set_reg(A.APIC_LDR, value & A.APIC_LDR_MASK)
        elif offset == A.APIC_DFR:
            if x2:
                return False  # no DFR in x2APIC
            self._set_reg(A.APIC_DFR, value | A.APIC_DFR_CLUSTER)  # bits 27:0 read as 1
        elif offset == A.APIC_SPIV:
            self._set_spiv(value)
        elif offset == A.APIC_ICR:
            value &= ~A.APIC_ICR_BUSY  # KVM: no delay, the IPI is delivered at once
            self._set_reg(A.APIC_ICR, value)
            self.bus.send_ipi(self, value, self.get_reg(A.APIC_ICR2))
        elif offset == A.APIC_ICR2:
            if x2:
                return False
            self._set_reg(A.APIC_ICR2, value & 0xFF000000)
        elif offset in (A.APIC_LVTTHMR, A.APIC_LVTPC, A.APIC_LVT0, A.APIC_LVT1,
                        A.APIC_LVTERR, A.APIC_LVTCMCI):  # fmt: skip
            if not self._lvt_supported(offset):
                return False
            if not self.sw_enabled:
                value |= A.APIC_LVT_MASKED  # SDM 11.4.7.2: LVTs stay masked while disabled
            self._set_reg(offset, value & A.LVT_WRITE_MASK[offset])
        elif offset == A.APIC_LVTT:
            if not self.sw_enabled:
                value |= A.APIC_LVT_MASKED  # SDM 11.4.7.2
            self._set_reg(A.APIC_LVTT, value & (A.LVT_MASK | self._timer_mode_mask()))
            self._update_lvtt()
        elif offset == A.APIC_TMICT:
            if self.timer_mode == A.APIC_LVT_TIMER_TSCDEADLINE:
                return True  # SDM 11.5.4.1: TMICT writes ignored in TSC-deadline mode
            self._cancel_timer()
            self._set_reg(A.APIC_TMICT, value)
            self._start_apic_timer()
        elif offset == A.APIC_TDCR:
            self._set_tdcr(value)
        elif offset == A.APIC_ESR:
            if x2 and value != 0:
                return False  # SDM 11.12.1.2: only 0 may be written in x2APIC mode
            # SDM 11.5.3: a write latches the errors seen since the previous write.
            self._set_reg(A.APIC_ESR, self.esr_pending)
            self.esr_pending = 0
        elif offset == A.APIC_SELF_IPI:
            if not x2 or value & ~A.APIC_VECTOR_MASK:
                return False  # KVM: x2APIC only, bits 31:8 reserved
            self.bus.send_ipi(self, A.APIC_DEST_SELF | value, 0)
        else:
            return False  # read-only or reserved
        return True

    # --- priorities, IRR/ISR (SDM 11.8) ---------------------------------------------------------

    def _set_tpr(self, tpr: int) -> None:
        """KVM apic_set_tpr."""
        self._set_reg(A.APIC_TASKPRI, tpr)
        self._update_ppr()

    def _compute_ppr(self) -> int:
        """KVM __apic_update_ppr / SDM 11.8.3.1: PPR = TPR if TPR[7:4] >= ISRV[7:4] else ISRV & 0xF0."""
        tpr = self.get_reg(A.APIC_TASKPRI)
        isrv = self.isr.bit_length() - 1 if self.isr else 0
        return tpr & 0xFF if (tpr & 0xF0) >= (isrv & 0xF0) else isrv & 0xF0

    def _update_ppr(self) -> None:
        """KVM apic_update_ppr: kick when PPR dropped below a pending vector."""
        old = self.get_reg(A.APIC_PROCPRI)
        ppr = self._compute_ppr()
        if ppr != old:
            self._set_reg(A.APIC_PROCPRI, ppr)
        if ppr < old and self._highest_irr_for_ppr(ppr) is not None:
            self.host.kick()

    def _highest_irr_for_ppr(self, ppr: int) -> int | None:
        """KVM apic_has_interrupt_for_ppr: highest IRR whose class is above PPR's."""
        if not self.irr:
            return None
        vector = self.irr.bit_length() - 1
        return None if (vector & 0xF0) <= ppr else vector

    def get_cr8(self) -> int:
        """KVM kvm_lapic_get_cr8: CR8 = TPR[7:4] (SDM 11.8.6.1)."""
        return (self.get_reg(A.APIC_TASKPRI) & 0xF0) >> 4

    def set_cr8(self, value: int) -> None:
        """KVM kvm_set_cr8 / kvm_lapic_set_tpr: TPR = CR8 << 4; bits 63:4 reserved -> #GP."""
        if value & A.CR8_RESERVED_BITS:
            raise GuestFault(13, 0)  # KVM kvm_set_cr8: CR8_RESERVED_BITS
        self._sync_timer()
        self._set_tpr((value & 0xF) << 4)

    def accept_irq(
        self,
        vector: int,
        *,
        delivery_mode: int = A.APIC_DM_FIXED,
        level: bool = True,
        trigger_mode: int = 0,
    ) -> bool:
        """KVM __apic_accept_irq: take one interrupt message; True if it was accepted.

        Fixed/lowest-priority set IRR (and TMR for level-triggered); `level` is the
        assert bit, a level-triggered de-assert is dropped. NMI/INIT/SIPI go to the host.
        """
        level_trig = bool(trigger_mode)
        if delivery_mode in (A.APIC_DM_FIXED, A.APIC_DM_LOWEST):
            if level_trig and not level:
                return False  # KVM: level-triggered de-assert carries no interrupt
            if not self.enabled:
                return False  # KVM: dropped by a hardware- or software-disabled APIC
            if vector < A.APIC_ILLEGAL_VECTOR_LIMIT:
                self._report_error(A.APIC_ESR_RECV_ILLEGAL_VECTOR)  # SDM 11.5.3
                return False
            bit = 1 << vector
            if level_trig:
                self.tmr |= bit
            else:
                self.tmr &= ~bit
            self.irr |= bit
            self.host.kick()
            return True
        if not self.hw_enabled:
            return False
        if delivery_mode == A.APIC_DM_NMI:
            self.host.deliver_nmi()
            return True
        if delivery_mode == A.APIC_DM_INIT:
            if level_trig and not level:
                return False  # SDM 11.6.1: INIT level de-assert only syncs arbitration IDs
            self.host.deliver_init()
            return True
        if delivery_mode == A.APIC_DM_STARTUP:
            self.host.deliver_sipi(vector)
            return True
        if delivery_mode == A.APIC_DM_SMI:
            self.smi_count += 1  # no SMM: recorded only
            return True
        return False  # ExtINT comes through accept_pic_intr(); remote read is obsolete

    def pending_vector(self) -> int | None:
        """KVM kvm_apic_has_interrupt: highest IRR vector whose class beats PPR, or None.

        Like KVM this checks hardware enable only: IRR bits latched before a software
        disable are still held and delivered (SDM 11.4.7.2).
        """
        self._sync_timer()
        if not self.irr or not self.hw_enabled:
            return None
        return self._highest_irr_for_ppr(self.get_reg(A.APIC_PROCPRI))

    def ack_interrupt(self, vector: int | None = None) -> int:
        """KVM kvm_get_apic_interrupt / kvm_apic_ack_interrupt: IRR -> ISR, raise PPR.

        Without `vector`, acknowledges pending_vector(); returns the vector, or -1 when
        none is deliverable (the vCPU then delivers nothing).
        """
        if vector is None:
            vector = self.pending_vector()
            if vector is None:
                return -1
        bit = 1 << vector
        self.irr &= ~bit
        self.isr |= bit
        self._set_reg(A.APIC_PROCPRI, self._compute_ppr())
        return vector

    def _set_eoi(self) -> int:
        """KVM apic_set_eoi: clear the highest ISR bit; tell the bus (IOAPIC) about it."""
        if not self.isr:
            return -1  # not every EOI has an in-service vector
        vector = self.isr.bit_length() - 1
        self.isr &= ~(1 << vector)
        self._update_ppr()
        self.bus.notify_eoi(self, vector, bool(self.tmr >> vector & 1))
        return vector

    def accept_pic_intr(self) -> bool:
        """KVM kvm_apic_accept_pic_intr: may the 8259 deliver through LINT0 (ExtINT)?"""
        if not self.hw_enabled:
            return True
        lvt0 = self.get_reg(A.APIC_LVT0)
        return not lvt0 & A.APIC_LVT_MASKED and lvt0 & A.APIC_MODE_MASK == A.APIC_DM_EXTINT

    def local_deliver(self, lvt_offset: int) -> bool:
        """KVM kvm_apic_local_deliver: raise the interrupt an LVT entry describes.

        Used for LINT0/LINT1 (NMI watchdog, LINT1 = NMI), LVTPC, LVTTHMR, LVTERR and the
        timer. LVTPC masks itself after delivery (KVM: Intel-compatible guests).
        """
        reg = self.get_reg(lvt_offset)
        if not self.hw_enabled or reg & A.APIC_LVT_MASKED:
            return False
        accepted = self.accept_irq(
            reg & A.APIC_VECTOR_MASK,
            delivery_mode=reg & A.APIC_MODE_MASK,
            level=True,
            trigger_mode=1 if reg & A.APIC_LVT_LEVEL_TRIGGER else 0,
        )
        if accepted and lvt_offset == A.APIC_LVTPC:
            self._set_reg(A.APIC_LVTPC, reg | A.APIC_LVT_MASKED)
        return accepted

    def _report_error(self, bits: int) -> None:
        """SDM 11.5.3: latch an error for the next ESR write; signal it through LVTERR."""
        new = bits & ~self.esr_pending
        self.esr_pending |= bits
        if new:
            self.local_deliver(A.APIC_LVTERR)

    def _set_spiv(self, value: int) -> None:
        """KVM kvm_lapic_reg_write(APIC_SPIV): a software disable masks every LVT (SDM 11.4.7.2)."""
        mask = A.APIC_SPIV_WRITE_MASK
        if self.get_reg(A.APIC_LVR) & A.APIC_LVR_DIRECTED_EOI:
            mask |= A.APIC_SPIV_DIRECTED_EOI
        self._set_reg(A.APIC_SPIV, value & mask)
        if not value & A.APIC_SPIV_APIC_ENABLED:
            for offset in A.LVT_REGISTERS[: self.nr_lvt]:
                self._set_reg(offset, self.get_reg(offset) | A.APIC_LVT_MASKED)
            self._update_lvtt()

    # --- timer (SDM 11.5.4, KVM lapic_timer) ---------------------------------------------------

    def _update_divide_count(self) -> None:
        """KVM update_divide_count: TDCR bits 0,1,3 select 1..128."""
        self.divide_count = A.TDCR_DIVISOR[self.get_reg(A.APIC_TDCR) & A.APIC_TDCR_MASK]

    def _tmict_to_ns(self, count: int) -> int:
        """KVM tmict_to_ns: count * APIC bus cycle * divider."""
        return count * A.APIC_BUS_CYCLE_NS * self.divide_count

    def _cancel_timer(self) -> None:
        """KVM cancel_apic_timer."""
        self._target = None

    def _update_lvtt(self) -> None:
        """KVM apic_update_lvtt: switching into or out of TSC-deadline mode stops the timer."""
        mode = self.get_reg(A.APIC_LVTT) & self._timer_mode_mask()
        if mode == self.timer_mode:
            return
        was_deadline = self.timer_mode == A.APIC_LVT_TIMER_TSCDEADLINE
        if was_deadline != (mode == A.APIC_LVT_TIMER_TSCDEADLINE):
            self._cancel_timer()
            self._set_reg(A.APIC_TMICT, 0)
            self._period = 0
            self._tscdeadline = 0
        self.timer_mode = mode

    def _start_apic_timer(self, initial_ns: int | None = None) -> None:
        """KVM set_target_expiration + start_sw_period for one-shot/periodic modes."""
        if self.timer_mode not in (A.APIC_LVT_TIMER_ONESHOT, A.APIC_LVT_TIMER_PERIODIC):
            return
        self._period = self._tmict_to_ns(self.get_reg(A.APIC_TMICT))
        if not self._period:
            self._target = None  # TMICT = 0 stops the timer (SDM 11.5.4)
            return
        delay = self._period if initial_ns is None else initial_ns
        self._target = self.host.now() + delay

    def _set_tdcr(self, value: int) -> None:
        """KVM APIC_TDCR write + update_target_expiration: rescale the time left."""
        old_divisor = self.divide_count
        self._set_reg(A.APIC_TDCR, value & A.APIC_TDCR_MASK)
        self._update_divide_count()
        if self.divide_count == old_divisor or not self._period:
            return
        self._period = self._tmict_to_ns(self.get_reg(A.APIC_TMICT))
        if self._target is not None:
            now = self.host.now()
            remaining = max(self._target - now, 0)
            self._target = now + remaining * self.divide_count // old_divisor

    def _get_tmcct(self) -> int:
        """KVM apic_get_tmcct: counts down from TMICT to 0 in divided bus ticks.

        Unlike KVM's (remaining % period), a timer read at the very ns it was armed shows
        TMICT, not 0 — KVM never observes that instant; a deterministic clock does.
        """
        if self.timer_mode == A.APIC_LVT_TIMER_TSCDEADLINE:
            return 0  # KVM __apic_read: TMCCT reads 0 in TSC-deadline mode
        if not self.get_reg(A.APIC_TMICT) or not self._period or self._target is None:
            return 0
        remaining = self._target - self.host.now()
        if remaining <= 0:
            return 0
        return min(remaining, self._period) // (A.APIC_BUS_CYCLE_NS * self.divide_count)

    def countdown(self) -> tuple[int, int, int] | None:
        """The one-shot or periodic timer while it is armed: (target ns, period ns, ns per
        TMCCT tick), from which TMCCT at any clock before the target is _get_tmcct's
        min(target - now, period) // ns per tick. None when TMCCT is not such a countdown."""
        if self._target is None or self.timer_mode == A.APIC_LVT_TIMER_TSCDEADLINE or not self._period \
                or not self.get_reg(A.APIC_TMICT):
            return None
        return self._target, self._period, A.APIC_BUS_CYCLE_NS * self.divide_count

    @property
    def tsc_deadline(self) -> int:
        """IA32_TSC_DEADLINE read (KVM kvm_get_lapic_tscdeadline_msr): 0 outside TSC-deadline mode."""
        if not self.hw_enabled or self.timer_mode != A.APIC_LVT_TIMER_TSCDEADLINE:
            return 0
        self._sync_timer()
        return self._tscdeadline

    @tsc_deadline.setter
    def tsc_deadline(self, value: int) -> None:
        self.set_tsc_deadline(value)

    def set_tsc_deadline(self, value: int) -> None:
        """KVM kvm_set_lapic_tscdeadline_msr: arms only in TSC-deadline mode (SDM 11.5.4.1)."""
        if not self.hw_enabled or self.timer_mode != A.APIC_LVT_TIMER_TSCDEADLINE:
            return  # SDM 11.5.4.1: writes are ignored unless in TSC-deadline mode
        self._sync_timer()
        self._tscdeadline = value & ((1 << 64) - 1)
        # KVM start_sw_tscdeadline: a deadline already passed fires now.
        self.update_timer(self.host.now())

    def expiry(self) -> int | None:
        """Virtual ns of the next timer expiry, whatever it would deliver: until then no
        access catches the timer up."""
        return self._expiry()

    def set_icr(self, value: int) -> None:
        """The x2APIC ICR as a WRMSR the vCPU's hook took left it (KVM kvm_x2apic_icr_write:
        BUSY cleared), the IPI already sent."""
        self._set_reg(A.APIC_ICR, value & _MASK32)
        self._set_reg(A.APIC_ICR2, value >> 32)

    def _expiry(self) -> int | None:
        """Virtual ns of the next timer expiry, whatever it would deliver."""
        if self.timer_mode == A.APIC_LVT_TIMER_TSCDEADLINE:
            return self._tscdeadline - self.tsc_offset if self._tscdeadline else None
        return self._target

    def next_deadline(self) -> int | None:
        """Virtual ns at which the timer next raises an interrupt, or None.

        An expiry that would deliver nothing (LVTT masked, APIC disabled) is not reported;
        the model catches such expiries up on the next access, so no wake-up is needed.
        """
        expiry = self._expiry()
        if expiry is None or not self.hw_enabled:
            return None
        if self.get_reg(A.APIC_LVTT) & A.APIC_LVT_MASKED:
            return None
        return expiry

    def update_timer(self, now: int) -> bool:
        """Fire the timer if it expired at or before `now` (KVM apic_timer_fn +
        kvm_inject_apic_timer_irqs). Returns True if an expiry happened.

        Missed periods coalesce into one interrupt, as KVM's pending counter does.
        """
        expiry = self._expiry()
        if expiry is None or now < expiry:
            return False
        if self.timer_mode == A.APIC_LVT_TIMER_TSCDEADLINE:
            self._tscdeadline = 0  # KVM kvm_apic_inject_pending_timer_irqs
        elif self.timer_mode == A.APIC_LVT_TIMER_PERIODIC and self._period:
            # KVM advance_periodic_target_expiration, all missed periods at once.
            self._target = expiry + self._period * ((now - expiry) // self._period + 1)
        else:
            self._target = None  # one-shot: disarmed after it fires
        self.local_deliver(A.APIC_LVTT)
        return True

    def _sync_timer(self) -> None:
        """Catch the timer up to the present before any guest-visible access."""
        expiry = self._expiry()
        if expiry is not None:
            self.update_timer(self.host.now())

    # --- save / restore (KVM kvm_apic_get_state / kvm_apic_set_state) ----------------------------

    def snapshot(self) -> LapicState:
        """KVM_GET_LAPIC plus the exact timer state; call after the vCPU has stopped."""
        self._sync_timer()
        regs = bytearray(self.regs)
        for base, bits in ((A.APIC_ISR, self.isr), (A.APIC_TMR, self.tmr), (A.APIC_IRR, self.irr)):
            for i in range(A.APIC_ISR_NR):
                _U32.pack_into(regs, base + 0x10 * i, (bits >> (32 * i)) & _MASK32)
        _U32.pack_into(regs, A.APIC_TMCCT, self._get_tmcct())
        now = self.host.now()
        return LapicState(
            regs=bytes(regs),
            timer_armed=self._target is not None,
            timer_remaining_ns=max(self._target - now, 0) if self._target is not None else 0,
            tsc_deadline=self._tscdeadline,
            esr_pending=self.esr_pending,
        )

    def restore(self, state: LapicState | bytes) -> None:
        """KVM_SET_LAPIC. IA32_APIC_BASE must already be set (KVM: sregs before LAPIC).

        Given bare KVM bytes, the timer restarts from TMCCT as KVM's __start_apic_timer
        does, except that TMCCT = 0 in one-shot mode means "already fired" here (KVM
        re-arms it for an immediate expiry).
        """
        if isinstance(state, bytes | bytearray):
            state = LapicState(regs=bytes(state))
        regs = bytearray(state.regs)
        if len(regs) != A.KVM_APIC_REG_SIZE:
            raise ValueError(
                f"lapic state: regs must be {A.KVM_APIC_REG_SIZE} bytes, got {len(regs)}"
            )
        if self.x2apic_mode:
            # KVM kvm_apic_state_fixup(set): the x2APIC ID and LDR are derived, not restored.
            _U32.pack_into(regs, A.APIC_ID, self.x2apic_id)
            _U32.pack_into(regs, A.APIC_LDR, A.x2apic_ldr(self.x2apic_id))
        self.regs[:] = regs
        self.bus.modes_changed += 1
        self.irr = self.isr = self.tmr = 0
        for i in range(A.APIC_ISR_NR):
            self.isr |= _U32.unpack_from(regs, A.APIC_ISR + 0x10 * i)[0] << (32 * i)
            self.tmr |= _U32.unpack_from(regs, A.APIC_TMR + 0x10 * i)[0] << (32 * i)
            self.irr |= _U32.unpack_from(regs, A.APIC_IRR + 0x10 * i)[0] << (32 * i)
        self._set_reg(A.APIC_LVR, A.apic_lvr_value(self.nr_lvt))  # KVM kvm_apic_set_version
        self.esr_pending = state.esr_pending
        self._set_reg(A.APIC_PROCPRI, self._compute_ppr())
        # KVM: cancel, apic_update_lvtt, update_divide_count, __start_apic_timer(TMCCT).
        self._cancel_timer()
        self.timer_mode = self.get_reg(A.APIC_LVTT) & self._timer_mode_mask()
        self._update_divide_count()
        self._tscdeadline = state.tsc_deadline
        tmcct = self.get_reg(A.APIC_TMCCT)
        self._set_reg(A.APIC_TMCCT, 0)
        self._period = self._tmict_to_ns(self.get_reg(A.APIC_TMICT))
        if (
            self.timer_mode in (A.APIC_LVT_TIMER_ONESHOT, A.APIC_LVT_TIMER_PERIODIC)
            and self._period
        ):
            if state.timer_armed is None:  # bare KVM bytes: derive from TMCCT
                remaining = min(self._tmict_to_ns(tmcct), self._period)
                if remaining:
                    self._target = self.host.now() + remaining
                elif self.timer_mode == A.APIC_LVT_TIMER_PERIODIC:
                    self._target = self.host.now() + self._period
            elif state.timer_armed:
                self._target = self.host.now() + state.timer_remaining_ns
        if self._highest_irr_for_ppr(self.get_reg(A.APIC_PROCPRI)) is not None:
            self.host.kick()  # KVM: KVM_REQ_EVENT after set_state


class ApicBus:
    """The Lapics of one VM and the routing between them (KVM kvm_irq_delivery_to_apic).

    Delivery follows KVM's slow path, which the optimized apic map must agree with.
    `eoi_listeners` are called as fn(lapic, vector, level_triggered) on each EOI that
    retired an in-service vector (KVM kvm_ioapic_send_eoi; the IOAPIC subscribes).
    """

    def __init__(self) -> None:
        self.lapics: list[Lapic] = []
        self.eoi_listeners: list[Callable[[Lapic, int, bool], None]] = []
        self.modes_changed = 0   # bumped by every IA32_APIC_BASE or APIC ID change (the caches below)
        self._all_x2apic: tuple[int, bool] = (-1, False)
        self._xapic_unique: dict[Lapic, tuple[int, bool]] = {}

    def xapic_id_unique(self, lapic: Lapic) -> bool:
        """No other enabled APIC answers `lapic`'s xAPIC ID as a physical destination
        (KVM kvm_apic_match_physical_addr), and it is not the broadcast ID."""
        version, value = self._xapic_unique.get(lapic, (-1, False))
        if version != self.modes_changed:
            value = self._xapic_id_unique(lapic)
            self._xapic_unique[lapic] = (self.modes_changed, value)
        return value

    def _xapic_id_unique(self, lapic: Lapic) -> bool:
        dest = lapic.xapic_id
        if dest == A.APIC_BROADCAST:
            return False
        for other in self.lapics:
            if other is not lapic and other.hw_enabled \
                    and (other.x2apic_id if other.x2apic_mode else other.xapic_id) == dest:
                return False
        return True

    def all_x2apic(self) -> bool:
        """Every enabled APIC is in x2APIC mode (KVM's apic map is then x2APIC-only, so a
        physical x2APIC ID names one APIC)."""
        version, value = self._all_x2apic
        if version != self.modes_changed:
            value = all(lapic.x2apic_mode or not lapic.hw_enabled for lapic in self.lapics)
            self._all_x2apic = (self.modes_changed, value)
        return value

    def attach(self, lapic: Lapic) -> None:
        """Add a vCPU's Lapic (in vCPU creation order, KVM's kvm_for_each_vcpu order)."""
        self.lapics.append(lapic)
        self.modes_changed += 1

    def notify_eoi(self, lapic: Lapic, vector: int, level: bool) -> None:
        """Forward an EOI to the listeners (IOAPIC remote-IRR)."""
        for listener in self.eoi_listeners:
            listener(lapic, vector, level)

    def send_ipi(self, src: Lapic, icr_low: int, icr_high: int) -> int:
        """KVM kvm_apic_send_ipi: decode ICR and deliver; returns the number accepted."""
        vector = icr_low & A.APIC_VECTOR_MASK
        delivery_mode = icr_low & A.APIC_MODE_MASK
        if (
            delivery_mode in (A.APIC_DM_FIXED, A.APIC_DM_LOWEST)
            and vector < A.APIC_ILLEGAL_VECTOR_LIMIT
        ):
            src._report_error(A.APIC_ESR_SEND_ILLEGAL_VECTOR)  # SDM 11.5.3
        dest = icr_high if src.x2apic_mode else icr_high >> A.XAPIC_DEST_SHIFT
        return self.deliver_irq(
            dest_id=dest,
            dest_mode=icr_low & A.APIC_DEST_LOGICAL,
            delivery_mode=delivery_mode,
            vector=vector,
            trigger_mode=1 if icr_low & A.APIC_INT_LEVELTRIG else 0,
            level=bool(icr_low & A.APIC_INT_ASSERT),
            shorthand=icr_low & A.APIC_SHORT_MASK,
            src=src,
        )

    def deliver_irq(
        self,
        *,
        dest_id: int,
        dest_mode: int,
        delivery_mode: int,
        vector: int,
        trigger_mode: int = 0,
        level: bool = True,
        shorthand: int = A.APIC_DEST_NOSHORT,
        src: Lapic | None = None,
    ) -> int:
        """KVM kvm_irq_delivery_to_apic (slow path); `src` is None for IOAPIC/MSI messages.

        Lowest priority uses KVM's vector hashing: the (vector % n)-th software-enabled
        target in vCPU order. Returns the number of APICs that accepted, -1 if none matched.
        """
        if (
            dest_mode == A.APIC_DEST_PHYSICAL
            and dest_id == A.APIC_BROADCAST
            and delivery_mode == A.APIC_DM_LOWEST
        ):
            delivery_mode = A.APIC_DM_FIXED  # KVM: physical broadcast + lowest -> fixed
        result = -1
        lowest_candidates: list[Lapic] = []
        for target in self.lapics:
            if not target.hw_enabled:
                continue  # KVM kvm_apic_present
            if not self.match_dest(target, src, shorthand, dest_id, dest_mode):
                continue
            if delivery_mode != A.APIC_DM_LOWEST:
                result = max(result, 0)
                result += target.accept_irq(
                    vector, delivery_mode=delivery_mode, level=level, trigger_mode=trigger_mode
                )
            elif target.sw_enabled:
                lowest_candidates.append(target)
        if lowest_candidates:
            # KVM kvm_vector_to_index (vector hashing, enabled by default).
            target = lowest_candidates[vector % len(lowest_candidates)]
            result = int(
                target.accept_irq(
                    vector, delivery_mode=delivery_mode, level=level, trigger_mode=trigger_mode
                )
            )
        return result

    @staticmethod
    def match_dest(
        target: Lapic, src: Lapic | None, shorthand: int, dest: int, dest_mode: int
    ) -> bool:
        """KVM kvm_apic_match_dest."""
        if shorthand == A.APIC_DEST_NOSHORT:
            # KVM kvm_apic_mda: with the broadcast quirk, a device's xAPIC broadcast
            # reaches x2APIC targets too.
            if src is None and dest == A.APIC_BROADCAST and target.x2apic_mode:
                dest = A.X2APIC_BROADCAST
            if dest_mode == A.APIC_DEST_PHYSICAL:
                return ApicBus._match_physical(target, dest)
            return ApicBus._match_logical(target, dest)
        if shorthand == A.APIC_DEST_SELF:
            return target is src
        if shorthand == A.APIC_DEST_ALLINC:
            return True
        return target is not src  # APIC_DEST_ALLBUT

    @staticmethod
    def _is_broadcast(target: Lapic, mda: int) -> bool:
        """KVM kvm_apic_broadcast."""
        return mda == (A.X2APIC_BROADCAST if target.x2apic_mode else A.APIC_BROADCAST)

    @staticmethod
    def _match_physical(target: Lapic, mda: int) -> bool:
        """KVM kvm_apic_match_physical_addr (with its x2APIC-ID hotplug rule for mda > 0xFF)."""
        if ApicBus._is_broadcast(target, mda):
            return True
        if target.x2apic_mode or mda > 0xFF:
            return mda == target.x2apic_id
        return mda == target.xapic_id

    @staticmethod
    def _match_logical(target: Lapic, mda: int) -> bool:
        """KVM kvm_apic_match_logical_addr: flat/cluster xAPIC (DFR), x2APIC cluster (SDM 11.6.2.2)."""
        if ApicBus._is_broadcast(target, mda):
            return True
        ldr = target.get_reg(A.APIC_LDR)
        if target.x2apic_mode:
            return (ldr >> 16) == (mda >> 16) and (ldr & mda & 0xFFFF) != 0
        logical_id = ldr >> 24
        dfr = target.get_reg(A.APIC_DFR)
        if dfr == A.APIC_DFR_FLAT:
            return (logical_id & mda) != 0
        if dfr == A.APIC_DFR_CLUSTER:
            return (logical_id >> 4) == (mda >> 4) and (logical_id & mda & 0xF) != 0
        return False
