"""Local APIC model: registers, priorities, timers, IPIs and x2APIC rules on a fake vCPU."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from nestvisor.arch import apic as A
from nestvisor.cpu.faults import GuestFault
from nestvisor.kvm.lapic import ApicBus, Lapic, LapicState

X2 = A.MSR_IA32_APICBASE_ENABLE | A.MSR_IA32_APICBASE_EXTD


class FakeHost:
    """An ApicHost with a hand-driven clock that records every event."""

    def __init__(self) -> None:
        self.t = 0
        self.kicks = 0
        self.nmis = 0
        self.inits = 0
        self.sipis: list[int] = []

    def now(self) -> int:
        return self.t

    def kick(self) -> None:
        self.kicks += 1

    def deliver_nmi(self) -> None:
        self.nmis += 1

    def deliver_init(self) -> None:
        self.inits += 1

    def deliver_sipi(self, vector: int) -> None:
        self.sipis.append(vector)


def make(n: int = 1) -> tuple[ApicBus, list[Lapic], list[FakeHost]]:
    bus = ApicBus()
    hosts = [FakeHost() for _ in range(n)]
    lapics = [Lapic(i, hosts[i], bus) for i in range(n)]
    return bus, lapics, hosts


def rd(lapic: Lapic, offset: int) -> int:
    return lapic.mmio_read(offset, 4)


def wr(lapic: Lapic, offset: int, value: int) -> None:
    lapic.mmio_write(offset, 4, value)


def enable(lapic: Lapic, spurious: int = 0xFF) -> None:
    wr(lapic, A.APIC_SPIV, A.APIC_SPIV_APIC_ENABLED | spurious)


def to_x2apic(lapic: Lapic) -> None:
    lapic.set_apic_base(lapic.get_apic_base() | A.MSR_IA32_APICBASE_EXTD)


# --- reset, ID, version ------------------------------------------------------------------


def test_reset_values_bsp_and_ap() -> None:
    _, (bsp, ap), _ = make(2)
    assert bsp.get_apic_base() == 0xFEE00000 | A.MSR_IA32_APICBASE_ENABLE | A.MSR_IA32_APICBASE_BSP
    assert ap.get_apic_base() == 0xFEE00000 | A.MSR_IA32_APICBASE_ENABLE
    assert rd(bsp, A.APIC_ID) == 0 and rd(ap, A.APIC_ID) == 1 << 24
    assert rd(ap, A.APIC_LVR) == 0x50014
    assert rd(ap, A.APIC_SPIV) == 0xFF
    assert rd(ap, A.APIC_DFR) == 0xFFFFFFFF
    for lvt in (A.APIC_LVTT, A.APIC_LVTTHMR, A.APIC_LVTPC, A.APIC_LVT0, A.APIC_LVT1, A.APIC_LVTERR):
        assert rd(ap, lvt) == A.APIC_LVT_MASKED
    # KVM_X86_QUIRK_LINT0_REENABLED: the BSP's LINT0 is ExtINT, unmasked.
    assert rd(bsp, A.APIC_LVT0) == A.APIC_DM_EXTINT
    assert bsp.accept_pic_intr() and not ap.accept_pic_intr()
    assert rd(ap, A.APIC_TASKPRI) == rd(ap, A.APIC_PROCPRI) == rd(ap, A.APIC_TMICT) == 0


def test_mmio_partial_and_reserved_reads() -> None:
    _, (_, ap), _ = make(2)
    assert ap.mmio_read(A.APIC_ID + 3, 1) == 1  # byte 3 of ID
    assert ap.mmio_read(A.APIC_LVR, 2) == 0x0014
    assert ap.mmio_read(A.APIC_LVR + 2, 2) == 0x0005
    assert ap.mmio_read(A.APIC_LVR + 2, 4) == 0  # straddles the register: KVM reads nothing
    assert rd(ap, A.APIC_EOI) == 0  # write-only
    assert rd(ap, A.APIC_RRR) == 0  # reserved
    assert rd(ap, A.APIC_LVTCMCI) == 0  # absent with 6 LVTs
    assert rd(ap, A.APIC_ARBPRI) == 0
    assert rd(ap, 0x800) == 0  # beyond the register file


def test_xapic_id_and_ldr_writable_dfr_low_bits_read_as_one() -> None:
    _, (lapic,), _ = make()
    wr(lapic, A.APIC_ID, 0x05123456)
    assert rd(lapic, A.APIC_ID) == 0x05000000
    wr(lapic, A.APIC_LDR, 0x81FFFFFF)
    assert rd(lapic, A.APIC_LDR) == 0x81000000
    wr(lapic, A.APIC_DFR, 0)
    assert rd(lapic, A.APIC_DFR) == A.APIC_DFR_CLUSTER


def test_mmio_write_needs_aligned_dword() -> None:
    _, (lapic,), _ = make()
    lapic.mmio_write(A.APIC_TASKPRI, 1, 0x50)
    lapic.mmio_write(A.APIC_TASKPRI + 4, 4, 0x50)
    assert rd(lapic, A.APIC_TASKPRI) == 0
    lapic.mmio_write(A.APIC_TASKPRI, 4, 0x150)
    assert rd(lapic, A.APIC_TASKPRI) == 0x50


def test_read_only_registers_ignore_mmio_writes() -> None:
    _, (lapic,), _ = make()
    wr(lapic, A.APIC_LVR, 0)
    wr(lapic, A.APIC_PROCPRI, 0xF0)
    wr(lapic, A.APIC_IRR + 0x10, 0xFFFFFFFF)
    assert rd(lapic, A.APIC_LVR) == 0x50014
    assert rd(lapic, A.APIC_PROCPRI) == 0
    assert rd(lapic, A.APIC_IRR + 0x10) == 0


# --- TPR / PPR / IRR / ISR / EOI ---------------------------------------------------------


def test_cr8_maps_to_tpr() -> None:
    _, (lapic,), _ = make()
    lapic.set_cr8(0x9)
    assert rd(lapic, A.APIC_TASKPRI) == 0x90 and rd(lapic, A.APIC_PROCPRI) == 0x90
    wr(lapic, A.APIC_TASKPRI, 0x3C)
    assert lapic.get_cr8() == 3
    with pytest.raises(GuestFault) as exc:
        lapic.set_cr8(0x10)
    assert exc.value.vector == 13


def test_irr_isr_priority_and_eoi() -> None:
    _, (lapic,), (host,) = make()
    enable(lapic)
    assert lapic.accept_irq(0x41) and lapic.accept_irq(0x82)
    assert host.kicks == 2
    assert rd(lapic, A.APIC_IRR + 0x20) == 1 << 1  # vector 0x41
    assert rd(lapic, A.APIC_IRR + 0x40) == 1 << 2  # vector 0x82
    assert lapic.pending_vector() == 0x82
    assert lapic.ack_interrupt() == 0x82
    assert rd(lapic, A.APIC_ISR + 0x40) == 1 << 2 and rd(lapic, A.APIC_IRR + 0x40) == 0
    assert rd(lapic, A.APIC_PROCPRI) == 0x80
    assert lapic.pending_vector() is None  # 0x41 is below the in-service class
    assert lapic.accept_irq(0x9F)
    assert lapic.pending_vector() == 0x9F  # higher class preempts
    assert lapic.ack_interrupt() == 0x9F
    wr(lapic, A.APIC_EOI, 0)  # retires 0x9F, the highest in service
    assert rd(lapic, A.APIC_ISR + 0x40) == 1 << 2
    assert rd(lapic, A.APIC_PROCPRI) == 0x80
    wr(lapic, A.APIC_EOI, 0)
    assert rd(lapic, A.APIC_PROCPRI) == 0
    assert lapic.pending_vector() == 0x41
    assert lapic.ack_interrupt() == 0x41 and lapic.ack_interrupt() == -1


def test_tpr_blocks_same_class_including_low_nibble() -> None:
    _, (lapic,), (host,) = make()
    enable(lapic)
    lapic.accept_irq(0x2F)
    wr(lapic, A.APIC_TASKPRI, 0x21)
    assert lapic.pending_vector() is None
    wr(lapic, A.APIC_TASKPRI, 0x20)
    assert lapic.pending_vector() is None
    kicks = host.kicks
    wr(lapic, A.APIC_TASKPRI, 0x10)
    assert lapic.pending_vector() == 0x2F
    assert host.kicks == kicks + 1  # PPR fell below a pending vector


def test_level_triggered_sets_tmr_and_eoi_reports_it() -> None:
    bus, (lapic,), _ = make()
    seen: list[tuple[int, bool]] = []
    bus.eoi_listeners.append(lambda _l, vec, level: seen.append((vec, level)))
    enable(lapic)
    assert lapic.accept_irq(0x30, trigger_mode=1)
    assert not lapic.accept_irq(0x31, trigger_mode=1, level=False)  # de-assert dropped
    assert rd(lapic, A.APIC_TMR + 0x10) == 1 << 16
    lapic.ack_interrupt()
    wr(lapic, A.APIC_EOI, 0)
    assert seen == [(0x30, True)]


def test_sw_disabled_apic_drops_fixed_and_masks_lvts() -> None:
    _, (lapic,), _ = make()
    assert not lapic.accept_irq(0x40)  # SPIV.APIC_ENABLED is clear after reset
    assert lapic.pending_vector() is None
    wr(lapic, A.APIC_LVT1, A.APIC_DM_NMI)  # forced masked while disabled
    assert rd(lapic, A.APIC_LVT1) == A.APIC_LVT_MASKED | A.APIC_DM_NMI
    enable(lapic)
    wr(lapic, A.APIC_LVTERR, 0x33)
    assert rd(lapic, A.APIC_LVTERR) == 0x33
    wr(lapic, A.APIC_SPIV, 0xFF)  # software disable
    assert rd(lapic, A.APIC_LVTERR) == 0x33 | A.APIC_LVT_MASKED


def test_lvt_write_masks() -> None:
    _, (lapic,), _ = make()
    enable(lapic)
    wr(lapic, A.APIC_LVTERR, 0xFFFFFFFF)
    assert rd(lapic, A.APIC_LVTERR) == A.LVT_MASK
    wr(lapic, A.APIC_LVT0, 0xFFFFFFFF)
    assert rd(lapic, A.APIC_LVT0) == A.LINT_MASK
    wr(lapic, A.APIC_LVTT, 0xFFFFFFFF)
    assert rd(lapic, A.APIC_LVTT) == A.LVT_MASK | A.APIC_LVT_TIMER_MASK
    wr(lapic, A.APIC_SPIV, 0xFFFFFFFF)
    assert rd(lapic, A.APIC_SPIV) == 0x3FF


def test_illegal_vector_sets_esr_after_write_and_fires_lvterr() -> None:
    _, (lapic,), _ = make()
    enable(lapic)
    wr(lapic, A.APIC_LVTERR, 0xE0)
    assert not lapic.accept_irq(0x05)
    assert rd(lapic, A.APIC_IRR) == 0
    assert rd(lapic, A.APIC_ESR) == 0  # not visible before the ESR write
    wr(lapic, A.APIC_ESR, 0)
    assert rd(lapic, A.APIC_ESR) == A.APIC_ESR_RECV_ILLEGAL_VECTOR
    assert lapic.pending_vector() == 0xE0  # LVTERR delivered
    wr(lapic, A.APIC_ESR, 0)
    assert rd(lapic, A.APIC_ESR) == 0  # the write cleared it


def test_lint1_nmi_and_lvtpc_self_masks() -> None:
    _, (lapic,), (host,) = make()
    enable(lapic)
    wr(lapic, A.APIC_LVT1, A.APIC_DM_NMI)
    assert lapic.local_deliver(A.APIC_LVT1) and host.nmis == 1
    wr(lapic, A.APIC_LVTPC, 0x50)
    assert lapic.local_deliver(A.APIC_LVTPC)
    assert rd(lapic, A.APIC_LVTPC) == 0x50 | A.APIC_LVT_MASKED
    assert not lapic.local_deliver(A.APIC_LVTPC)
    assert lapic.pending_vector() == 0x50


# --- timer -------------------------------------------------------------------------------------


def test_one_shot_timer_fires_at_exact_ns_and_tmcct_counts_down() -> None:
    _, (lapic,), (host,) = make()
    enable(lapic)
    wr(lapic, A.APIC_TDCR, 0b0001)  # divide by 4
    wr(lapic, A.APIC_LVTT, 0xEC)
    host.t = 1000
    wr(lapic, A.APIC_TMICT, 100)
    assert lapic.next_deadline() == 1400
    assert rd(lapic, A.APIC_TMCCT) == 100
    host.t = 1001
    assert rd(lapic, A.APIC_TMCCT) == 99  # floor((400-1)/4), as KVM
    host.t = 1200
    assert rd(lapic, A.APIC_TMCCT) == 50
    assert not lapic.update_timer(1399) and lapic.pending_vector() is None
    assert lapic.update_timer(1400)
    assert lapic.pending_vector() == 0xEC
    assert lapic.next_deadline() is None
    host.t = 1400
    assert rd(lapic, A.APIC_TMCCT) == 0
    assert rd(lapic, A.APIC_TMICT) == 100
    assert not lapic.update_timer(5000)  # one-shot: no second expiry


def test_periodic_timer_rearms_and_coalesces_missed_periods() -> None:
    _, (lapic,), (host,) = make()
    enable(lapic)
    wr(lapic, A.APIC_TDCR, 0b1011)  # divide by 1
    wr(lapic, A.APIC_LVTT, A.APIC_LVT_TIMER_PERIODIC | 0x40)
    wr(lapic, A.APIC_TMICT, 50)
    assert lapic.next_deadline() == 50
    assert lapic.update_timer(50)
    assert lapic.next_deadline() == 100
    assert lapic.ack_interrupt() == 0x40
    wr(lapic, A.APIC_EOI, 0)
    host.t = 70
    assert rd(lapic, A.APIC_TMCCT) == 30
    assert lapic.update_timer(260)  # periods at 100, 150, 200, 250 coalesce into one
    assert rd(lapic, A.APIC_IRR + 0x20) == 1
    assert lapic.next_deadline() == 300


def test_timer_catches_up_on_register_access() -> None:
    _, (lapic,), (host,) = make()
    enable(lapic)
    wr(lapic, A.APIC_TDCR, 0b1011)
    wr(lapic, A.APIC_LVTT, 0x61)
    wr(lapic, A.APIC_TMICT, 10)
    host.t = 15  # the vCPU never called update_timer
    assert rd(lapic, A.APIC_IRR + 0x30) == 1 << 1  # IRR shows vector 0x61 anyway


def test_masked_timer_expiry_is_lost_and_not_a_wakeup() -> None:
    _, (lapic,), (host,) = make()
    enable(lapic)
    wr(lapic, A.APIC_TDCR, 0b1011)
    wr(lapic, A.APIC_LVTT, A.APIC_LVT_MASKED | 0x61)
    wr(lapic, A.APIC_TMICT, 10)
    assert lapic.next_deadline() is None
    host.t = 20
    wr(lapic, A.APIC_LVTT, 0x61)  # unmask after expiry: the expiry already happened
    assert lapic.pending_vector() is None
    assert rd(lapic, A.APIC_TMCCT) == 0


def test_tmict_zero_stops_timer_and_tdcr_change_rescales() -> None:
    _, (lapic,), (host,) = make()
    enable(lapic)
    wr(lapic, A.APIC_TDCR, 0b1011)
    wr(lapic, A.APIC_LVTT, 0x61)
    wr(lapic, A.APIC_TMICT, 100)
    host.t = 40
    wr(lapic, A.APIC_TDCR, 0b0000)  # divide by 2: 60 ns left become 120
    assert lapic.next_deadline() == 160
    assert rd(lapic, A.APIC_TMCCT) == 60
    wr(lapic, A.APIC_TMICT, 0)
    assert lapic.next_deadline() is None and rd(lapic, A.APIC_TMCCT) == 0


def test_tdcr_encoding_table() -> None:
    _, (lapic,), _ = make()
    for tdcr, divisor in A.TDCR_DIVISOR.items():
        wr(lapic, A.APIC_TDCR, tdcr | 0x4)  # bit 2 is not part of the encoding
        assert rd(lapic, A.APIC_TDCR) == tdcr
        assert lapic.divide_count == divisor


def test_tsc_deadline_timer() -> None:
    _, (lapic,), (host,) = make()
    enable(lapic)
    lapic.tsc_deadline = 500
    assert lapic.tsc_deadline == 0  # ignored outside TSC-deadline mode
    wr(lapic, A.APIC_LVTT, A.APIC_LVT_TIMER_TSCDEADLINE | 0xD0)
    wr(lapic, A.APIC_TMICT, 1234)  # ignored in TSC-deadline mode
    assert rd(lapic, A.APIC_TMICT) == 0 and rd(lapic, A.APIC_TMCCT) == 0
    lapic.tsc_offset = 1000  # guest TSC = clock + 1000
    host.t = 100
    lapic.set_tsc_deadline(1600)
    assert lapic.tsc_deadline == 1600
    assert lapic.next_deadline() == 600
    assert not lapic.update_timer(599)
    assert lapic.update_timer(600)
    assert lapic.pending_vector() == 0xD0
    assert lapic.tsc_deadline == 0  # disarmed after firing
    lapic.ack_interrupt()
    wr(lapic, A.APIC_EOI, 0)
    lapic.tsc_deadline = 50  # already in the past: fires at once
    assert lapic.pending_vector() == 0xD0


def test_leaving_tsc_deadline_mode_disarms() -> None:
    _, (lapic,), (host,) = make()
    enable(lapic)
    wr(lapic, A.APIC_LVTT, A.APIC_LVT_TIMER_TSCDEADLINE | 0xD0)
    lapic.tsc_deadline = 1000
    wr(lapic, A.APIC_LVTT, 0xD0)
    assert lapic.next_deadline() is None and lapic.tsc_deadline == 0
    host.t = 2000
    assert lapic.pending_vector() is None


# --- IPIs ----------------------------------------------------------------------------------


def icr(lapic: Lapic, low: int, dest: int = 0) -> None:
    wr(lapic, A.APIC_ICR2, dest << 24)
    wr(lapic, A.APIC_ICR, low)


def test_fixed_ipi_physical_and_icr_idle() -> None:
    _, (a, b), (_, hb) = make(2)
    enable(a)
    enable(b)
    icr(a, A.APIC_DM_FIXED | A.APIC_ICR_BUSY | 0x55, dest=1)
    assert b.pending_vector() == 0x55 and a.pending_vector() is None
    assert hb.kicks == 1
    assert rd(a, A.APIC_ICR) & A.APIC_ICR_BUSY == 0
    assert rd(a, A.APIC_ICR) == 0x55 and rd(a, A.APIC_ICR2) == 1 << 24


def test_shorthands() -> None:
    _, (a, b, c), _ = make(3)
    for lapic in (a, b, c):
        enable(lapic)
    icr(a, A.APIC_DEST_SELF | 0x60)
    assert [x.pending_vector() for x in (a, b, c)] == [0x60, None, None]
    icr(a, A.APIC_DEST_ALLBUT | 0x70)
    assert [x.pending_vector() for x in (a, b, c)] == [0x60, 0x70, 0x70]
    icr(b, A.APIC_DEST_ALLINC | 0x80)
    assert [x.pending_vector() for x in (a, b, c)] == [0x80, 0x80, 0x80]


def test_physical_broadcast_and_unmatched_destination() -> None:
    bus, (a, b), _ = make(2)
    enable(a)
    enable(b)
    icr(a, 0x90, dest=0xFF)
    assert a.pending_vector() == 0x90 and b.pending_vector() == 0x90
    assert bus.send_ipi(a, 0x91, 7 << 24) == -1  # nobody has ID 7


def test_logical_flat_and_cluster() -> None:
    _, (a, b, c), _ = make(3)
    for lapic, ldr in ((a, 0x01), (b, 0x02), (c, 0x04)):
        enable(lapic)
        wr(lapic, A.APIC_LDR, ldr << 24)
    icr(a, A.APIC_DEST_LOGICAL | 0x50, dest=0x06)
    assert [x.pending_vector() for x in (a, b, c)] == [None, 0x50, 0x50]
    # cluster model: cluster in bits 7:4, members in 3:0
    for lapic, ldr in ((a, 0x11), (b, 0x12), (c, 0x21)):
        wr(lapic, A.APIC_DFR, A.APIC_DFR_CLUSTER)
        wr(lapic, A.APIC_LDR, ldr << 24)
    icr(b, A.APIC_DEST_LOGICAL | 0x51, dest=0x13)
    assert [x.get_reg(A.APIC_IRR + 0x20) >> 0x11 & 1 for x in (a, b, c)] == [1, 1, 0]


def test_lowest_priority_picks_one_target_deterministically() -> None:
    _, (a, b, c), _ = make(3)
    for lapic in (a, b, c):
        enable(lapic)
        wr(lapic, A.APIC_LDR, 0x0F << 24)
    icr(a, A.APIC_DEST_LOGICAL | A.APIC_DM_LOWEST | 0x52, dest=0x0F)
    hits = [x.pending_vector() == 0x52 for x in (a, b, c)]
    assert hits == [False, True, False]  # KVM vector hashing: 0x52 % 3 == 1


def test_nmi_init_sipi_smi_routing() -> None:
    _, (a, b), (ha, hb) = make(2)
    icr(a, A.APIC_DM_NMI, dest=1)
    assert hb.nmis == 1 and ha.nmis == 0
    icr(a, A.APIC_DM_INIT | A.APIC_INT_LEVELTRIG | A.APIC_INT_ASSERT, dest=1)
    assert hb.inits == 1
    icr(a, A.APIC_DM_INIT | A.APIC_INT_LEVELTRIG, dest=1)  # INIT level de-assert
    assert hb.inits == 1
    icr(a, A.APIC_DM_STARTUP | 0x9A, dest=1)
    assert hb.sipis == [0x9A]
    icr(a, A.APIC_DM_SMI, dest=1)
    assert b.smi_count == 1 and hb.kicks == 0


def test_hw_disabled_target_receives_nothing() -> None:
    _, (a, b), (_, hb) = make(2)
    b.set_apic_base(A.APIC_DEFAULT_PHYS_BASE)
    icr(a, A.APIC_DM_NMI, dest=1)
    icr(a, A.APIC_DM_INIT | A.APIC_INT_ASSERT, dest=1)
    assert hb.nmis == 0 and hb.inits == 0


def test_send_illegal_vector_sets_sender_esr() -> None:
    _, (a, b), _ = make(2)
    enable(a)
    enable(b)
    icr(a, 0x03, dest=1)
    wr(a, A.APIC_ESR, 0)
    wr(b, A.APIC_ESR, 0)
    assert rd(a, A.APIC_ESR) == A.APIC_ESR_SEND_ILLEGAL_VECTOR
    assert rd(b, A.APIC_ESR) == A.APIC_ESR_RECV_ILLEGAL_VECTOR
    assert b.pending_vector() is None


# --- IA32_APIC_BASE and x2APIC --------------------------------------------------------------


def gp(fn: Callable[..., object], *args: int) -> int:
    with pytest.raises(GuestFault) as exc:
        fn(*args)
    return exc.value.vector


def test_apic_base_transitions() -> None:
    _, (_, ap), _ = make(2)
    base = A.APIC_DEFAULT_PHYS_BASE
    en, extd = A.MSR_IA32_APICBASE_ENABLE, A.MSR_IA32_APICBASE_EXTD
    assert gp(ap.set_apic_base, base | en | 0x1) == 13  # reserved low bit
    assert gp(ap.set_apic_base, base | en | (1 << 45)) == 13  # above MAXPHYADDR
    assert gp(ap.set_apic_base, base | extd) == 13  # EXTD without EN is invalid
    ap.set_apic_base(base | en | extd)  # xAPIC -> x2APIC
    assert ap.x2apic_mode
    assert gp(ap.set_apic_base, base | en) == 13  # x2APIC -> xAPIC directly
    ap.set_apic_base(base)  # x2APIC -> disabled
    assert gp(ap.set_apic_base, base | en | extd) == 13  # disabled -> x2APIC
    ap.set_apic_base(base | en)
    assert rd(ap, A.APIC_ID) == 1 << 24 and not ap.x2apic_mode
    ap.set_apic_base(base | en | extd)
    ap.set_apic_base(base | en, host_initiated=True)  # host may skip the transition rules
    assert ap.get_apic_base() == base | en


def test_x2apic_not_supported_makes_extd_reserved() -> None:
    bus = ApicBus()
    lapic = Lapic(0, FakeHost(), bus, x2apic_supported=False)
    assert gp(to_x2apic, lapic) == 13


def test_disable_resets_registers_and_mmio_reads_all_ones() -> None:
    _, (lapic,), _ = make()
    enable(lapic)
    wr(lapic, A.APIC_TASKPRI, 0x40)
    lapic.accept_irq(0x80)
    lapic.set_apic_base(A.APIC_DEFAULT_PHYS_BASE | A.MSR_IA32_APICBASE_BSP)
    assert lapic.mmio_read(A.APIC_LVR, 4) == 0xFFFFFFFF  # KVM LAPIC_MMIO_HOLE quirk
    assert lapic.mmio_in_range(A.APIC_DEFAULT_PHYS_BASE + 0x30)
    assert lapic.pending_vector() is None
    lapic.set_cr8(5)  # CR8 still works with the APIC disabled
    assert lapic.get_cr8() == 5
    lapic.set_apic_base(
        A.APIC_DEFAULT_PHYS_BASE | A.MSR_IA32_APICBASE_BSP | A.MSR_IA32_APICBASE_ENABLE
    )
    assert rd(lapic, A.APIC_SPIV) == 0xFF and rd(lapic, A.APIC_IRR + 0x40) == 0
    assert rd(lapic, A.APIC_LVR) == 0x50014


def test_x2apic_id_ldr_and_mmio_hole() -> None:
    _, lapics, _ = make(20)
    lapic = lapics[19]
    to_x2apic(lapic)
    assert lapic.msr_read(A.x2apic_msr(A.APIC_ID)) == 19
    assert lapic.msr_read(A.x2apic_msr(A.APIC_LDR)) == (1 << 16) | (1 << 3)
    assert lapic.msr_read(A.x2apic_msr(A.APIC_LVR)) == 0x50014
    assert lapic.mmio_read(A.APIC_ID, 4) == 0xFFFFFFFF
    lapic.mmio_write(A.APIC_TASKPRI, 4, 0x50)  # dropped
    assert lapic.msr_read(0x808) == 0


@pytest.mark.parametrize(
    "msr",
    [
        0x801,  # reserved
        0x809,  # ARBPRI not in x2APIC
        0x80B,  # EOI write-only
        0x80C,  # RRR
        0x80E,  # DFR not in x2APIC
        0x82F,  # CMCI absent
        0x831,  # ICR2 folded into 64-bit ICR
        0x83F,  # SELF_IPI write-only
        0x840,  # beyond 0x3F0
    ],
)
def test_x2apic_read_gp(msr: int) -> None:
    _, (lapic,), _ = make()
    to_x2apic(lapic)
    assert gp(lapic.msr_read, msr) == 13


@pytest.mark.parametrize(
    ("msr", "value"),
    [
        (0x802, 0),  # ID read-only
        (0x803, 0),  # LVR read-only
        (0x80A, 0),  # PPR read-only
        (0x80D, 0),  # LDR read-only
        (0x80E, 0),  # DFR absent
        (0x810, 0),  # ISR read-only
        (0x828, 1),  # ESR: only 0 may be written
        (0x82F, 0),  # CMCI absent
        (0x831, 0),  # ICR2 absent
        (0x839, 0),  # TMCCT read-only
        (0x808, 1 << 32),  # bits 63:32 reserved
        (0x83F, 0x100),  # SELF_IPI bits 31:8 reserved
        (0x830, 1 << 13),  # ICR reserved bit
        (0x830, 1 << 20),
    ],
)
def test_x2apic_write_gp(msr: int, value: int) -> None:
    _, (lapic,), _ = make()
    to_x2apic(lapic)
    assert gp(lapic.msr_write, msr, value) == 13


def test_x2apic_msrs_gp_in_xapic_mode() -> None:
    _, (lapic,), _ = make()
    assert gp(lapic.msr_read, 0x802) == 13
    assert gp(lapic.msr_write, 0x808, 0) == 13


def test_x2apic_icr_self_ipi_and_eoi() -> None:
    _, (a, b), (_, hb) = make(2)
    for lapic in (a, b):
        to_x2apic(lapic)
        lapic.msr_write(0x80F, A.APIC_SPIV_APIC_ENABLED | 0xFF)
    a.msr_write(0x830, (1 << 32) | A.APIC_ICR_BUSY | 0x66)
    assert a.msr_read(0x830) == (1 << 32) | 0x66  # BUSY cleared, 64-bit ICR
    assert b.pending_vector() == 0x66
    a.msr_write(0x83F, 0x77)
    assert a.pending_vector() == 0x77
    assert a.ack_interrupt() == 0x77
    a.msr_write(0x80B, 0)
    assert a.msr_read(0x810 + 3) == 0 and a.msr_read(0x80A) == 0
    a.msr_write(0x828, 0)
    assert a.msr_read(0x828) == 0
    a.msr_write(0x830, (0xFFFFFFFF << 32) | A.APIC_DM_NMI)  # x2APIC broadcast
    assert hb.nmis == 1


def test_x2apic_logical_cluster() -> None:
    _, lapics, _ = make(18)
    for lapic in lapics:
        to_x2apic(lapic)
        lapic.msr_write(0x80F, A.APIC_SPIV_APIC_ENABLED | 0xFF)
    # cluster 1 holds x2APIC IDs 16..31; bits 0 and 1 select IDs 16 and 17
    lapics[0].msr_write(0x830, ((1 << 16 | 0b11) << 32) | A.APIC_DEST_LOGICAL | 0x44)
    got = [i for i, lapic in enumerate(lapics) if lapic.pending_vector() == 0x44]
    assert got == [16, 17]


def test_xapic_self_ipi_register_is_not_decoded() -> None:
    _, (lapic,), _ = make()
    enable(lapic)
    wr(lapic, A.APIC_SELF_IPI, 0x77)
    assert lapic.pending_vector() is None


# --- INIT reset, snapshot/restore ----------------------------------------------------------------


def test_init_reset_keeps_base_and_id() -> None:
    _, (_, ap), _ = make(2)
    enable(ap)
    wr(ap, A.APIC_ID, 0x07000000)
    wr(ap, A.APIC_TASKPRI, 0x30)
    ap.accept_irq(0x99)
    ap.set_apic_base(ap.get_apic_base() | 0x1000_0000)  # relocate within MAXPHYADDR
    ap.reset(init_event=True)
    assert ap.get_apic_base() == 0x1000_0000 | A.APIC_DEFAULT_PHYS_BASE | A.MSR_IA32_APICBASE_ENABLE
    assert rd(ap, A.APIC_ID) == 0x07000000
    assert rd(ap, A.APIC_TASKPRI) == 0 and rd(ap, A.APIC_SPIV) == 0xFF
    assert ap.pending_vector() is None
    ap.reset(init_event=False)
    assert (
        rd(ap, A.APIC_ID) == 1 << 24
        and ap.get_apic_base() == 0xFEE00000 | A.MSR_IA32_APICBASE_ENABLE
    )


def test_snapshot_restore_round_trip_is_exact() -> None:
    _, (lapic,), (host,) = make()
    enable(lapic)
    wr(lapic, A.APIC_TDCR, 0b0000)
    wr(lapic, A.APIC_LVTT, A.APIC_LVT_TIMER_PERIODIC | 0x40)
    wr(lapic, A.APIC_TMICT, 100)  # period 200 ns
    lapic.accept_irq(0x55)
    lapic.ack_interrupt()
    lapic.accept_irq(0x33)
    host.t = 123
    state = lapic.snapshot()
    assert len(state.regs) == 1024
    assert int.from_bytes(state.regs[A.APIC_TMCCT : A.APIC_TMCCT + 4], "little") == 38
    assert state.timer_remaining_ns == 77

    _, (other,), (host2,) = make()
    host2.t = 123
    other.restore(state)
    assert other.snapshot() == state
    assert other.next_deadline() == 200
    assert other.pending_vector() is None  # 0x33 is below in-service 0x55
    assert rd(other, A.APIC_PROCPRI) == 0x50
    wr(other, A.APIC_EOI, 0)
    assert other.pending_vector() == 0x33


def test_restore_from_bare_kvm_bytes_uses_tmcct() -> None:
    _, (lapic,), (host,) = make()
    enable(lapic)
    wr(lapic, A.APIC_TDCR, 0b1011)
    wr(lapic, A.APIC_LVTT, 0x40)
    wr(lapic, A.APIC_TMICT, 100)
    host.t = 30
    regs = lapic.snapshot().regs
    _, (other,), (host2,) = make()
    host2.t = 1000
    other.restore(regs)
    assert other.next_deadline() == 1070
    assert isinstance(lapic.snapshot(), LapicState)


def test_restore_in_x2apic_mode_forces_id_and_ldr() -> None:
    _, (_, ap), _ = make(2)
    to_x2apic(ap)
    regs = bytearray(ap.snapshot().regs)
    regs[A.APIC_ID : A.APIC_ID + 4] = (0x55).to_bytes(4, "little")
    ap.restore(bytes(regs))
    assert ap.msr_read(0x802) == 1 and ap.msr_read(0x80D) == (1 << 1)
