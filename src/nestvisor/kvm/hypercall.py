"""KVM's paravirtual hypercalls (arch/x86/kvm/x86.c kvm_emulate_hypercall).

VMCALL and VMMCALL both reach here from L1 (KVM handles either opcode on either vendor):
RAX holds the number, RBX/RCX/RDX/RSI the arguments, and RAX receives the result.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .vcpu import Vcpu

# include/uapi/linux/kvm_para.h
KVM_HC_VAPIC_POLL_IRQ = 1
KVM_HC_MMU_OP = 2
KVM_HC_FEATURES = 3
KVM_HC_PPC_MAP_MAGIC_PAGE = 4
KVM_HC_KICK_CPU = 5
KVM_HC_MIPS_GET_CLOCK_FREQ = 6
KVM_HC_MIPS_EXIT_VM = 7
KVM_HC_MIPS_CONSOLE_OUTPUT = 8
KVM_HC_CLOCK_PAIRING = 9
KVM_HC_SEND_IPI = 10
KVM_HC_SCHED_YIELD = 11
KVM_HC_MAP_GPA_RANGE = 12
KVM_ENOSYS = 1000
KVM_EFAULT = 14
KVM_EINVAL = 22
KVM_E2BIG = 7
KVM_EPERM = 1
KVM_EOPNOTSUPP = 95

HYPERCALL_OPCODES = (bytes.fromhex("0f01c1"), bytes.fromhex("0f01d9"))   # VMCALL, VMMCALL


def _send_ipi(v: Vcpu, bitmap_low: int, bitmap_high: int, min_id: int, icr: int, op_64_bit: bool) -> int:
    """KVM kvm_pv_send_ipi: a fixed IPI to APIC IDs min + bit, for the bits of two bitmaps."""
    if icr & (1 << 11) or icr & (3 << 18):
        return -KVM_EINVAL   # logical destination or a shorthand is refused
    cluster = 64 if op_64_bit else 32
    ids = {lap.x2apic_id for lap in v.vm.apic_bus.lapics}
    max_id = max(ids, default=0)
    count = 0
    for bitmap, base in ((bitmap_low, min_id), (bitmap_high, min_id + cluster)):
        if base > max_id:
            continue   # __pv_send_ipi: nothing to do beyond the highest APIC ID
        for i in range(min(cluster, max_id - base + 1)):
            if bitmap >> i & 1 and base + i in ids:
                count += v.vm.apic_bus.deliver_irq(dest_id=base + i, dest_mode=0, delivery_mode=(icr >> 8) & 7,
                                                   vector=icr & 0xFF, trigger_mode=(icr >> 15) & 1,
                                                   level=bool(icr & (1 << 14)), src=v.lapic)
    return count


def emulate_hypercall(v: Vcpu, long_mode: bool, cpl: int) -> None:
    """Run one hypercall on `v`'s registers; the caller moves RIP past the instruction."""
    ctx = v.ctx
    mask = 0xFFFFFFFFFFFFFFFF if long_mode else 0xFFFFFFFF
    nr = ctx.gpr(0) & mask
    a0, a1, a2, a3 = (ctx.gpr(r) & mask for r in (3, 1, 2, 6))   # RBX, RCX, RDX, RSI
    if cpl != 0:
        ret = -KVM_EPERM
    elif nr in (KVM_HC_VAPIC_POLL_IRQ, KVM_HC_KICK_CPU, KVM_HC_SCHED_YIELD):
        ret = 0
    elif nr == KVM_HC_SEND_IPI:
        ret = _send_ipi(v, a0, a1, a2, a3, long_mode)
    elif nr == KVM_HC_CLOCK_PAIRING:
        ret = -KVM_EOPNOTSUPP
    else:
        ret = -KVM_ENOSYS
    v.stats[f"hypercall_{nr}"] += 1
    ctx.set_gpr(0, ret & mask)
