"""Nested VMX for one vCPU, as KVM's nested.c does it.

L1 runs in the vCPU's first execution context (its state is vmcs01); L2 runs in a second
one (vmcs02), created at the first VM entry. vmcs12 is the cached 4 KiB image of L1's
current VMCS, written back to L1's memory when it is released. A nested VM exit syncs the
common guest fields from vmcs02 into vmcs12 at once and the rare ones (segment state,
descriptor tables) only when L1 can see them (KVM sync_vmcs02_to_vmcs12_rare).
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...arch import msr as M
from ...arch import vmcs as V
from ...arch import vmx as X
from ...arch.x86 import CR0_PG, CR4_LA57, CR4_PAE, RFLAGS_VM, SREG_SS
from ...cpu.context import HF2_NMI, HF_CS64, HF_INHIBIT_IRQ, HF_LMA
from ...cpu.decode import Insn, Op
from ...cpu.engine import DREGS, ExecContext
from ...cpu.ept import Ept, EptViolation
from ...cpu.faults import GuestFault, gp, ud
from ...cpu.paging import is_canonical
from ...cpu.state import SEG_P, ArchState, DescTable, Segment
from ...cpu.tdp import TdpFault, TwoDimensional
from ...state.nested_state import NestedState
from .. import msr as msrs
from ..requests import REQ_GET_NESTED_STATE_PAGES
from . import state as vmx_state
from .caps import PREEMPTION_TIMER_RATE, VmxCaps, nested_vmx_caps
from .checks import (
    CheckFailure,
    check_controls,
    check_eptp,
    check_guest_state,
    check_host_state,
    check_pdptes,
    page_address_valid,
)
from .vmcs12 import Vmcs12

if TYPE_CHECKING:
    from ..vcpu import Vcpu

INVALID_PTR = 0xFFFFFFFFFFFFFFFF
EFER_LME, EFER_LMA = 1 << 8, 1 << 10
CR0_PE, CR0_TS = 1, 1 << 3
CR4_VMXE = 1 << 13
RFLAGS_IF = 1 << 9
_U32 = struct.Struct("<I")
_MSR_ENTRY = struct.Struct("<IIQ")   # SDM 25.7.2 Table 25-15: index, reserved, data
_DESCRIPTOR = struct.Struct("<QQ")   # SDM "INVEPT"/"INVVPID": the 128-bit descriptor

# MSRs whose values VMX does not switch: L2 sees L1's (they live in each execution context).
_SHARED_CPU_MSRS = (M.STAR, M.LSTAR, M.CSTAR, M.SFMASK, M.KERNEL_GS_BASE)

# Exit reason of each VMX instruction executed in L2 (SDM Appendix C names, arch/vmx.py)
_INSN_EXIT = {op: X.EXIT[name] for op, name in (
    (Op.VMCALL, "VMCALL"), (Op.VMCLEAR, "VMCLEAR"), (Op.VMLAUNCH, "VMLAUNCH"), (Op.VMPTRLD, "VMPTRLD"),
    (Op.VMPTRST, "VMPTRST"), (Op.VMREAD, "VMREAD"), (Op.VMRESUME, "VMRESUME"), (Op.VMWRITE, "VMWRITE"),
    (Op.VMXOFF, "VMOFF"), (Op.VMXON, "VMON"), (Op.INVEPT, "INVEPT"), (Op.INVVPID, "INVVPID"),
    (Op.VMFUNC, "VMFUNC"))}
_SEGS = ("es", "cs", "ss", "ds", "fs", "gs", "ldtr", "tr")
# vmcs12 fields whose change needs vmcs02's guest state loaded in full at the next entry:
# guest state other than what every entry loads anyway, and the entry controls (EFER, PAT,
# debug controls)
_FULL_LOAD = frozenset(f.name for f in V.FIELDS if f.type == V.TYPE_GUEST) - {
    "guest_rip", "guest_rsp", "guest_rflags", "guest_interruptibility_info", "guest_activity_state",
    "guest_pending_dbg_exceptions", "vmx_preemption_timer_value", "guest_dr7",
} | {"vm_entry_controls"}


@dataclass(slots=True)
class ExitInfo:
    """A nested VM exit waiting to be performed (SDM 28.2)."""

    reason: int
    qualification: int = 0
    intr_info: int = 0
    intr_error_code: int = 0
    insn_len: int = 0
    insn_info: int = 0
    gpa: int | None = None      # EPT violation/misconfiguration: guest-physical address
    linear: int | None = None   # EPT violation with a valid linear address


def ar_from_segment(s: Segment) -> int:
    """SDM 25.4.1 access-rights format from a descriptor cache; bit 16 = unusable."""
    ar = (s.flags >> 8) & 0xF0FF
    return ar if s.present else ar | 0x10000


def segment_from_vmcs(selector: int, base: int, limit: int, ar: int) -> Segment:
    flags = (ar & 0xF0FF) << 8
    if ar & 0x10000:
        flags &= ~SEG_P
    return Segment(selector, base, limit, flags)


class NestedVmx:
    """KVM's struct nested_vmx for one vCPU."""

    nmi_exit_delivers = True   # SDM 25.2: an NMI that causes a VM exit is not delivered later

    def __init__(self, vcpu: Vcpu) -> None:
        self.v = vcpu
        self.caps: VmxCaps = nested_vmx_caps(vcpu.cr4_fixed1())
        self.vmxon = False
        self.gif = True    # VMX has no global interrupt flag or EFER.SVME (SVM protocol members)
        self.svme = False
        self.vmxon_ptr = INVALID_PTR
        self.current_vmptr = INVALID_PTR
        self.vmcs12: Vmcs12 | None = None
        self.shadow12: Vmcs12 | None = None   # KVM cached_shadow_vmcs12, while L2 runs
        # vmcs02 (the L2 context) holds the guest state of this VMCS as of its last exit; the
        # vmcs12 fields L1 wrote since then are `dirty` (KVM dirty_vmcs12, per field)
        self._vmcs02_of = INVALID_PTR
        self.dirty: set[str] = set()
        self.guest_mode = False
        self.ctx02: ExecContext | None = None
        self.need_rare_sync = False
        self.eager_sync = False          # copy every field on every exit (to compare with lazy)
        self.pending: ExitInfo | None = None
        self.l2_tsc_offset = 0
        self.preemption_deadline: int | None = None   # vCPU clock (ns) when the timer fires
        self._entry_dr6 = 0            # DR6 when L2 was entered (a #DB exit leaves it so)
        self._entry_pending_dbg = 0    # vmcs12 pending debug exceptions loaded at entry
        self.stats: Counter[str] = Counter()

    # ---- helpers --------------------------------------------------------------------------

    @property
    def maxphyaddr(self) -> int:
        return self.v.profile.maxphyaddr

    def _trace(self, event: str, **fields: object) -> None:
        self.v.vm.trace(event, vcpu=self.v.vcpu_id, **fields)

    def _succeed(self) -> None:
        # SDM 31.2 VMsucceed: CF PF AF ZF SF OF cleared
        self.v.ctx.rflags = self.v.ctx.rflags & ~X.RFLAGS_ARITH

    def _fail_invalid(self) -> None:
        # SDM 31.2 VMfailInvalid: CF set, the other five cleared
        self.v.ctx.rflags = (self.v.ctx.rflags & ~X.RFLAGS_ARITH) | X.RFLAGS_CF

    def _fail(self, error: int) -> None:
        """KVM nested_vmx_fail: VMfailValid(error) with a current VMCS, else VMfailInvalid. The
        error goes to vmcs12 even when L2's VMREAD/VMWRITE worked on the shadow VMCS (KVM
        writes get_vmcs12(); VM_INSTRUCTION_ERROR is never shadowed)."""
        v12 = self.vmcs12
        if v12 is None:
            self._fail_invalid()
            return
        self.v.ctx.rflags = (self.v.ctx.rflags & ~X.RFLAGS_ARITH) | X.RFLAGS_ZF
        v12["vm_instruction_error"] = error

    def _check_permission(self) -> int:
        """KVM nested_vmx_check_permission: #UD outside VMX operation, #GP(0) at CPL > 0.
        Returns the operand size of the code (64 or 32), read from the same hidden flags."""
        if not self.vmxon:
            raise ud()
        hf = self.v.ctx.hflags()
        if hf & 3:
            raise gp()
        return 64 if hf & HF_CS64 else 32

    def _operand_address(self, insn: Insn, st: ArchState) -> int:
        """Linear address of a ModRM memory operand (SDM 3.7.5; 64-bit mode ignores segment
        bases other than FS and GS)."""
        m = insn.mem
        assert m is not None
        gprs = self.v.ctx.gprs()
        ea = m.disp
        if m.rip_relative:
            ea += st.rip + insn.length
        if m.base is not None:
            ea += gprs[m.base]
        if m.index is not None:
            ea += gprs[m.index] * m.scale
        ea &= (1 << (8 * m.addr_size)) - 1
        seg = (st.es, st.cs, st.ss, st.ds, st.fs, st.gs)[m.seg]
        if st.code_bits == 64:
            return (ea + (seg.base if m.seg >= 4 else 0)) & 0xFFFFFFFFFFFFFFFF
        return (ea + seg.base) & 0xFFFFFFFF

    def _read_ptr(self, insn: Insn) -> int:
        """The 64-bit VMCS pointer operand (KVM nested_vmx_get_vmptr); faults propagate."""
        st = self.v.ctx.get_state()
        return self.v.linear(st).read_u64(self._operand_address(insn, st))

    def _read_guest_u64(self, gpa: int) -> int | None:
        try:
            return int.from_bytes(self.v.vm.phys.read(gpa, 8), "little")
        except (ValueError, KeyError, IndexError):
            return None

    def read_guest_u32(self, gpa: int) -> int | None:
        try:
            return _U32.unpack(self.v.vm.phys.read(gpa, 4))[0]
        except (ValueError, KeyError, IndexError):
            return None

    def _done(self, insn: Insn) -> None:
        self.v.ctx.rip = self.v.ctx.rip + insn.length

    # ---- VMX instructions in L1 -------------------------------------------------------------

    def emulate(self, insn: Insn) -> None:
        """Execute a VMX instruction for L1 (VMX root operation); GuestFault for #UD/#GP/#PF."""
        self.stats[insn.op.name] += 1
        handler = _HANDLERS.get(insn.op)
        if handler is None:
            raise ud()   # VMFUNC: not advertised (SDM: #UD when not supported)
        handler(self, insn)

    def _vmxon(self, insn: Insn) -> None:
        """KVM handle_vmxon."""
        ctx = self.v.ctx
        st = ctx.get_state()
        if not st.cr4 & CR4_VMXE:
            raise ud()   # SDM VMXON: #UD if CR4.VMXE = 0
        if not st.cr0 & CR0_PE or st.vm86 or (st.long_mode and not st.cs.l):
            raise ud()   # SDM VMXON: #UD in real mode, virtual-8086 mode and compatibility mode
        if st.cpl:
            raise gp()
        if self.vmxon:
            self._fail(X.VMXERR_VMXON_IN_VMX_ROOT_OPERATION)
            return self._done(insn)
        if not self.cr0_valid(st.cr0) or not self.cr4_valid(st.cr4):
            raise gp()   # KVM handle_vmxon: fixed CR0/CR4 bits, after the VM-Fail above
        need = X.FEATURE_CONTROL_LOCKED | X.FEATURE_CONTROL_VMXON_OUTSIDE_SMX
        if self.v.msr_values.get("FEATURE_CONTROL", 0) & need != need:
            raise gp()   # SDM VMXON: IA32_FEATURE_CONTROL must be locked with VMXON enabled
        ptr = self._read_ptr(insn)
        if not page_address_valid(ptr, self.maxphyaddr):
            self._fail_invalid()
            return self._done(insn)
        rev = self.read_guest_u32(ptr)
        if rev is None or rev != V.VMCS12_REVISION:
            self._fail_invalid()   # KVM handle_vmxon: revision (shadow bit included) must match
            return self._done(insn)
        self.vmxon, self.vmxon_ptr = True, ptr
        self._succeed()
        self._done(insn)

    def _vmxoff(self, insn: Insn) -> None:
        """KVM handle_vmxoff -> free_nested."""
        self._check_permission()
        self.release_vmcs12()
        self.vmxon, self.vmxon_ptr = False, INVALID_PTR
        self._succeed()
        self._done(insn)

    def _vmcs_pointer(self, insn: Insn, invalid_address: int, vmxon_pointer: int) -> int | None:
        """The VMCS pointer operand of VMCLEAR/VMPTRLD, or None after VMfailValid: not a
        page-aligned address below MAXPHYADDR, or the VMXON region (SDM VMCLEAR, VMPTRLD)."""
        self._check_permission()
        ptr = self._read_ptr(insn)
        if not page_address_valid(ptr, self.maxphyaddr):
            self._fail(invalid_address)
        elif ptr == self.vmxon_ptr:
            self._fail(vmxon_pointer)
        else:
            return ptr
        self._done(insn)
        return None

    def _vmclear(self, insn: Insn) -> None:
        """KVM handle_vmclear."""
        ptr = self._vmcs_pointer(insn, X.VMXERR_VMCLEAR_INVALID_ADDRESS, X.VMXERR_VMCLEAR_VMXON_POINTER)
        if ptr is None:
            return
        if ptr == self.current_vmptr:
            self.release_vmcs12()
        # KVM handle_vmclear: launch_state = 0 in the guest's region
        if self.v.vm.phys.find(ptr) is not None:
            self.v.vm.phys.write(ptr + V.OFF_LAUNCH_STATE, _U32.pack(0))
        self._succeed()
        self._done(insn)

    def _vmptrld(self, insn: Insn) -> None:
        """KVM handle_vmptrld."""
        ptr = self._vmcs_pointer(insn, X.VMXERR_VMPTRLD_INVALID_ADDRESS, X.VMXERR_VMPTRLD_VMXON_POINTER)
        if ptr is None:
            return
        if ptr != self.current_vmptr:
            if self.v.vm.phys.find(ptr) is None:
                self._fail(X.VMXERR_VMPTRLD_INVALID_ADDRESS)
                return self._done(insn)
            image = Vmcs12(self.v.vm.phys.read(ptr, V.VMCS12_SIZE))
            if image.revision != V.VMCS12_REVISION or (image.shadow and not self.caps.proc2.high & X.SEC_SHADOW_VMCS):
                # SDM VMPTRLD: the revision must match; a shadow VMCS needs VMCS shadowing
                self._fail(X.VMXERR_VMPTRLD_INCORRECT_VMCS_REVISION_ID)
                return self._done(insn)
            self.release_vmcs12()
            self.current_vmptr, self.vmcs12 = ptr, image
        self._succeed()
        self._done(insn)

    def _vmptrst(self, insn: Insn) -> None:
        """KVM handle_vmptrst."""
        self._check_permission()
        st = self.v.ctx.get_state()
        self.v.linear(st).write_u64(self._operand_address(insn, st), self.current_vmptr)
        self._succeed()
        self._done(insn)

    def _field_operand(self, insn: Insn, bits: int) -> int:
        value = self.v.ctx.gpr(insn.reg)
        return value if bits == 64 else value & 0xFFFFFFFF

    def _target(self) -> Vmcs12 | None:
        """The VMCS VMREAD/VMWRITE access: vmcs12, or in L2 the shadow VMCS (SDM 24.10)."""
        return self.shadow12 if self.guest_mode else self.vmcs12

    def _vmread(self, insn: Insn) -> None:
        """KVM handle_vmread."""
        bits = self._check_permission()
        v12 = self._target()
        if v12 is None:
            self._fail_invalid()
            return self._done(insn)
        found = V.lookup(self._field_operand(insn, bits))
        if found is None:
            self._fail(X.VMXERR_UNSUPPORTED_VMCS_COMPONENT)
            return self._done(insn)
        f, high = found
        if f.ext and self.need_rare_sync and not self.guest_mode:
            self.sync_rare()
        value = v12.read(f)
        if high:
            value >>= 32
        if insn.mem is None:
            self.v.ctx.set_gpr(insn.rm, value & (0xFFFFFFFFFFFFFFFF if bits == 64 else 0xFFFFFFFF))
        else:
            st = self.v.ctx.get_state()
            mem = self.v.linear(st)
            addr = self._operand_address(insn, st)
            if bits == 64:
                mem.write_u64(addr, value)
            else:
                mem.write_u32(addr, value)
        self._succeed()
        self._done(insn)

    def _vmwrite(self, insn: Insn) -> None:
        """KVM handle_vmwrite."""
        bits = self._check_permission()
        if insn.mem is None:
            value = self.v.ctx.gpr(insn.rm)
        else:
            st = self.v.ctx.get_state()
            mem = self.v.linear(st)
            addr = self._operand_address(insn, st)
            value = mem.read_u64(addr) if bits == 64 else mem.read_u32(addr)
        if bits != 64:
            value &= 0xFFFFFFFF
        v12 = self._target()
        if v12 is None:
            self._fail_invalid()
            return self._done(insn)
        found = V.lookup(self._field_operand(insn, bits))
        if found is None:
            self._fail(X.VMXERR_UNSUPPORTED_VMCS_COMPONENT)
            return self._done(insn)
        f, high = found
        if f.type == V.TYPE_READONLY and not self.caps.misc & X.MISC_VMWRITE_SHADOW_RO_FIELDS:
            self._fail(X.VMXERR_VMWRITE_READ_ONLY_VMCS_COMPONENT)
            return self._done(insn)
        if f.name not in V.SHADOW_RW and self.need_rare_sync and not self.guest_mode:
            self.sync_rare()   # KVM handle_vmwrite: vmcs12 becomes dirty; bring it up to date first
        if f.name.endswith("_ar_bytes") and f.name.startswith("guest_"):
            value &= V.AR_BYTES_MASK
        if high:
            value = (v12.read(f) & 0xFFFFFFFF) | ((value & 0xFFFFFFFF) << 32)
        v12.write(f, value)
        if not self.guest_mode:
            self.dirty.add(f.name)
        self._succeed()
        self._done(insn)

    def _vmlaunch(self, insn: Insn) -> None:
        self.nested_vmx_run(insn, launch=True)

    def _vmresume(self, insn: Insn) -> None:
        self.nested_vmx_run(insn, launch=False)

    def _invalidation_operands(self, insn: Insn, type_caps: Mapping[int, int]) -> tuple[int, int, int] | None:
        """INVEPT/INVVPID after the permission checks: (type, descriptor bits 63:0, bits
        127:64), or None after VMfailValid(28) for a type IA32_VMX_EPT_VPID_CAP does not offer.
        As KVM handle_invept/handle_invvpid: the type (32 bits outside 64-bit mode) is checked
        before the descriptor is read; reading it can fault."""
        hf = self.v.ctx.hflags()
        if (hf & HF_LMA and not hf & HF_CS64) or self.v.ctx.rflags & RFLAGS_VM:
            raise ud()   # SDM "INVEPT"/"INVVPID": #UD in compatibility and virtual-8086 mode
        kind = self._field_operand(insn, self._check_permission())
        if not self.caps.ept_vpid & type_caps.get(kind, 0):
            self._fail(X.VMXERR_INVALID_OPERAND_TO_INVEPT_INVVPID)
            self._done(insn)
            return None
        st = self.v.ctx.get_state()
        m = insn.mem
        assert m is not None   # the decoder takes only the memory form
        try:
            data = self.v.linear(st).read(self._operand_address(insn, st), _DESCRIPTOR.size)
        except GuestFault as f:
            if f.vector == 13 and m.seg == SREG_SS:
                raise GuestFault(12, 0) from None   # SDM 6.3.1: a non-canonical stack reference is #SS(0)
            raise
        low, high = _DESCRIPTOR.unpack(data)
        return kind, low, high

    def _flush_l2_tlb(self) -> None:
        """L2's cached translations live in its execution context, one TLB for every VPID and
        EPTP: flush all of it, more than the type asks, which the SDM allows ("Operations that
        Need Not Invalidate Cached Mappings": a processor may invalidate any at any time)."""
        if self.ctx02 is not None:
            self.ctx02.flush_tlb()

    def _invept(self, insn: Insn) -> None:
        """KVM handle_invept."""
        if not self.caps.proc2.high & X.SEC_EPT or not self.caps.ept_vpid & X.EPT_CAP_INVEPT:
            raise ud()   # KVM handle_invept: INVEPT needs "enable EPT" and INVEPT advertised
        ops = self._invalidation_operands(insn, X.INVEPT_TYPE_CAP)
        if ops is None:
            return
        kind, eptp, _ = ops
        if kind == X.INVEPT_SINGLE_CONTEXT:
            failure = check_eptp(eptp, self.caps, self.maxphyaddr)
            if failure is not None:
                # KVM's CC() in nested_vmx_check_eptp traces under this name from INVEPT too
                self._trace("kvm_nested_vmenter_failed", check=failure.name, source=failure.source,
                            values=failure.values)
                self._fail(X.VMXERR_INVALID_OPERAND_TO_INVEPT_INVVPID)
                return self._done(insn)
        self._flush_l2_tlb()
        self._succeed()
        self._done(insn)

    def _invvpid(self, insn: Insn) -> None:
        """KVM handle_invvpid."""
        if not self.caps.proc2.high & X.SEC_VPID or not self.caps.ept_vpid & X.VPID_CAP_INVVPID:
            raise ud()   # KVM handle_invvpid: INVVPID needs "enable VPID" and INVVPID advertised
        ops = self._invalidation_operands(insn, X.INVVPID_TYPE_CAP)
        if ops is None:
            return
        kind, vpid, linear = ops
        la57 = bool(self.v.ctx.reg_cr(4) & CR4_LA57)
        # KVM handle_invvpid: VPID bits 63:16 reserved; only all-context takes VPID 0; an
        # individual address must be canonical (is_noncanonical_invlpg_address)
        if vpid > X.VPID_MAX or (vpid == 0 and kind != X.INVVPID_ALL_CONTEXT) or \
                (kind == X.INVVPID_INDIVIDUAL_ADDR and not is_canonical(linear, la57)):
            self._fail(X.VMXERR_INVALID_OPERAND_TO_INVEPT_INVVPID)
            return self._done(insn)
        self._flush_l2_tlb()
        self._succeed()
        self._done(insn)

    # ---- vmcs12 lifetime ----------------------------------------------------------------------

    def release_vmcs12(self) -> None:
        """KVM nested_release_vmcs12: sync the rare fields and write the image back to L1."""
        if self.vmcs12 is None:
            return
        if self.need_rare_sync:
            self.sync_rare()
        if self.v.vm.phys.find(self.current_vmptr) is not None:
            self.v.vm.phys.write(self.current_vmptr, bytes(self.vmcs12.data))
        self.vmcs12, self.current_vmptr = None, INVALID_PTR
        self._vmcs02_of = INVALID_PTR

    def cr0_valid(self, cr0: int) -> bool:
        """KVM nested_host_cr0_valid: CR0 within IA32_VMX_CR0_FIXED0/1."""
        return cr0 & self.caps.cr0_fixed0 == self.caps.cr0_fixed0 and not cr0 & ~self.caps.cr0_fixed1

    def cr4_valid(self, cr4: int) -> bool:
        """KVM nested_cr4_valid: CR4 within IA32_VMX_CR4_FIXED0/1."""
        return cr4 & self.caps.cr4_fixed0 == self.caps.cr4_fixed0 and not cr4 & ~self.caps.cr4_fixed1

    # ---- VM entry -------------------------------------------------------------------------------

    def nested_vmx_run(self, insn: Insn, launch: bool) -> None:
        """KVM nested_vmx_run: the checks in order, then enter L2 (SDM 27.1-27.3)."""
        self._check_permission()
        v12 = self.vmcs12
        if v12 is None or v12.shadow:
            self._fail_invalid()   # KVM nested_vmx_run: no current VMCS, or a shadow VMCS
            return self._done(insn)
        if self.v.mov_ss_blocking():
            self._fail(X.VMXERR_ENTRY_EVENTS_BLOCKED_BY_MOV_SS)   # SDM 27.1
            return self._done(insn)
        if v12.launch_state == launch:
            self._fail(X.VMXERR_VMLAUNCH_NONCLEAR_VMCS if launch else X.VMXERR_VMRESUME_NONLAUNCHED_VMCS)
            return self._done(insn)
        partial = self._vmcs02_of == self.current_vmptr and not self.dirty & _FULL_LOAD
        if not partial and self.need_rare_sync:
            self.sync_rare()   # the full load reads every guest field from vmcs12
        snap = v12.fields()
        failure = check_controls(snap, self.caps, self.maxphyaddr)
        if failure is not None:
            return self._entry_vmfail(insn, failure, X.VMXERR_ENTRY_INVALID_CONTROL_FIELD)
        l1_lma = bool(self.v.ctx.cpu_msr(M.EFER) & EFER_LMA)
        failure = check_host_state(snap, self.caps, self.maxphyaddr, l1_lma)
        if failure is not None:
            return self._entry_vmfail(insn, failure, X.VMXERR_ENTRY_INVALID_HOST_STATE_FIELD)
        self._done(insn)
        failed = check_guest_state(snap, self.caps, True, self.maxphyaddr, self.read_guest_u32)
        if failed is not None:
            fc, qual = failed
            self._trace("kvm_nested_vmenter_failed", check=fc.name, source=fc.source, values=fc.values)
            self.stats["entry_failed"] += 1
            return self._failed_entry_exit(X.EXIT["INVALID_STATE"], qual)
        bad = check_pdptes(snap, self.maxphyaddr, self._read_guest_u64)
        if bad is not None:
            self._trace("kvm_nested_vmenter_failed", check=bad.name, source=bad.source, values=bad.values)
            self.stats["entry_failed"] += 1
            return self._failed_entry_exit(X.EXIT["INVALID_STATE"], X.ENTRY_FAIL_PDPTE)
        self._trace("kvm_nested_vmenter", rip=v12["guest_rip"], vmcs=self.current_vmptr,
                    exit_qual=v12["exit_qualification"], launch=launch)
        self.enter_guest_mode(snap, partial)
        index = self._load_msr_list(v12["vm_entry_msr_load_addr"], v12["vm_entry_msr_load_count"])
        if index:
            return self._failed_entry_exit(X.EXIT["MSR_LOAD_FAIL"], index)
        self.stats["entries"] += 1
        self._cache_shadow_vmcs12(snap)
        self._inject_on_entry(v12)

    def _entry_vmfail(self, insn: Insn, failure: CheckFailure, error: int) -> None:
        self._trace("kvm_nested_vmenter_failed", check=failure.name, source=failure.source, values=failure.values)
        self.stats["entry_vmfail"] += 1
        self._fail(error)
        self._done(insn)

    def enter_guest_mode(self, v12: dict[str, int], partial: bool = False) -> None:
        """KVM prepare_vmcs02 + enter_guest_mode: load vmcs12's guest state (`v12`, a snapshot
        of the current vmcs12) into the L2 context. `partial`: the context already holds this
        VMCS's guest state from its last exit and L1 changed at most RIP, RSP, RFLAGS and the
        event fields, so only those are loaded (KVM prepare_vmcs02_rare is skipped the same
        way unless vmcs12 is dirty)."""
        l1 = self.v.ctx
        if self.ctx02 is None:
            self.ctx02 = self.v.new_context()
            partial = False
        l2 = self.ctx02
        self.stats["vmcs02_partial_loads" if partial else "vmcs02_full_loads"] += 1
        gprs = l1.gprs()
        if partial:
            rsp = v12["guest_rsp"]
            l2.set_gprs(gprs[:4] + [rsp] + gprs[5:])
            l2.rip = v12["guest_rip"]
            l2.rflags = v12["guest_rflags"] | 2
        else:
            self._load_vmcs02(v12, l1, l2, gprs)
        self._load_shared(v12, l1, l2)
        self.dirty.clear()
        cpu = v12["cpu_based_vm_exec_control"]
        self.l2_tsc_offset = v12["tsc_offset"] if cpu & X.CPU_USE_TSC_OFFSETTING else 0
        # SDM 26.5.1: the timer counts down from vmx_preemption_timer_value each time bit X
        # (the rate) of L1's TSC changes, so it reaches 0 where the TSC is a multiple of 2^X
        self.preemption_deadline = None
        if v12["pin_based_vm_exec_control"] & X.PIN_PREEMPTION_TIMER:
            ticks_past = self.v.tsc() & ((1 << PREEMPTION_TIMER_RATE) - 1)
            self.preemption_deadline = \
                self.v.now() - ticks_past + (v12["vmx_preemption_timer_value"] << PREEMPTION_TIMER_RATE)
        self.guest_mode = True
        self.need_rare_sync = False
        sec = v12["secondary_vm_exec_control"] if cpu & X.CPU_ACTIVATE_SECONDARY else 0
        self._load_ept(l2, v12 if sec & X.SEC_EPT else None)
        self.v.switch_context(l2)
        # KVM nested_vmx_run: HLT activity halts at once unless an event is injected or an
        # interrupt window (with IF=1) or an NMI window (no virtual-NMI blocking) ends the halt
        if v12["guest_activity_state"] == X.ACTIVITY_HLT and not v12["vm_entry_intr_info_field"] & X.INTR_INFO_VALID \
                and not (cpu & X.CPU_INTR_WINDOW and v12["guest_rflags"] & RFLAGS_IF) \
                and not (cpu & X.CPU_NMI_WINDOW and not v12["guest_interruptibility_info"] & X.GUEST_INTR_STATE_NMI):
            self.v.halt_in_guest()

    def _load_ept(self, l2: ExecContext, v12: Mapping[str, int] | None) -> None:
        """KVM nested_ept_init_mmu_context: with "enable EPT" (`v12` given), L2's guest-physical
        addresses go through L1's EPT (SDM 29.3); without it L2 shares L1's guest-physical
        space. With EPT and PAE paging the PDPTEs come from the VMCS (SDM 27.3.2.4)."""
        if v12 is None:
            if l2.tdp is not None:
                l2.use_tdp(None)
            return
        eptp = v12["ept_pointer"]
        if not isinstance(l2.tdp, Ept) or l2.tdp.eptp != eptp:
            l2.use_tdp(Ept(self.v.vm.phys, eptp, self.maxphyaddr,
                           exec_only=bool(self.caps.ept_vpid & X.EPT_CAP_EXECUTE_ONLY)))
        pae = v12["guest_cr0"] & CR0_PG and v12["guest_cr4"] & CR4_PAE and not v12["vm_entry_controls"] & X.ENTRY_IA32E_MODE
        l2.tdp.pdptes = tuple(v12[f"guest_pdptr{i}"] for i in range(4)) if pae else None

    def tdp_exit(self, f: TdpFault) -> ExitInfo:
        """SDM 28.2.1: an EPT violation (reason 48, qualification per Table 28-7) or an EPT
        misconfiguration (reason 49); both report the guest-physical address."""
        if isinstance(f, EptViolation):
            return ExitInfo(X.EXIT["EPT_VIOLATION"], qualification=f.qualification, gpa=f.gpa, linear=f.linear)
        return ExitInfo(X.EXIT["EPT_MISCONFIG"], gpa=f.gpa)

    def _load_vmcs02(self, v12: dict[str, int], l1: ExecContext, l2: ExecContext, gprs: list[int]) -> None:
        """Every guest-state field of vmcs12 into the L2 context (KVM prepare_vmcs02 with
        prepare_vmcs02_rare)."""
        entry = v12["vm_entry_controls"]
        l1_efer = l1.cpu_msr(M.EFER)
        if entry & X.ENTRY_LOAD_IA32_EFER:
            efer = v12["guest_ia32_efer"]
        elif entry & X.ENTRY_IA32E_MODE:
            efer = l1_efer | EFER_LMA | EFER_LME   # KVM nested_vmx_calc_efer
        else:
            efer = l1_efer & ~(EFER_LMA | EFER_LME)
        st = ArchState(
            rip=v12["guest_rip"], rsp=v12["guest_rsp"], rflags=v12["guest_rflags"] | 2,
            gdt=DescTable(v12["guest_gdtr_base"], v12["guest_gdtr_limit"]),
            idt=DescTable(v12["guest_idtr_base"], v12["guest_idtr_limit"]),
            cr0=v12["guest_cr0"], cr2=l1.reg_cr(2), cr3=v12["guest_cr3"], cr4=v12["guest_cr4"], efer=efer)
        for s in _SEGS:
            seg = segment_from_vmcs(v12[f"guest_{s}_selector"], v12[f"guest_{s}_base"],
                                    v12[f"guest_{s}_limit"], v12[f"guest_{s}_ar_bytes"])
            setattr(st, "ldt" if s == "ldtr" else s, seg)
        l2.set_state(st)
        l2.set_gprs(gprs[:4] + [st.rsp] + gprs[5:])
        l2.set_cpu_msr(M.IA32_SYSENTER_CS, v12["guest_sysenter_cs"])
        l2.set_cpu_msr(M.IA32_SYSENTER_ESP, v12["guest_sysenter_esp"])
        l2.set_cpu_msr(M.IA32_SYSENTER_EIP, v12["guest_sysenter_eip"])
        l2.set_cpu_msr(M.IA32_PAT, v12["guest_ia32_pat"] if entry & X.ENTRY_LOAD_IA32_PAT else l1.cpu_msr(M.IA32_PAT))

    def _load_shared(self, v12: dict[str, int], l1: ExecContext, l2: ExecContext) -> None:
        """What VM entry takes from L1 or from the event and interruptibility fields every time:
        the MSRs VMX does not switch, debug registers, the interrupt/NMI shadow, the TLB."""
        entry = v12["vm_entry_controls"]
        for index in _SHARED_CPU_MSRS:
            l2.set_cpu_msr(index, l1.cpu_msr(index))
        l2.set_reg_cr(2, l1.reg_cr(2))
        for i in range(5):
            l2.set_reg(DREGS[i], l1.reg(DREGS[i]))
        self._entry_dr6 = l1.reg(DREGS[4])
        self._entry_pending_dbg = v12["guest_pending_dbg_exceptions"]
        l2.set_reg(DREGS[5], v12["guest_dr7"] if entry & X.ENTRY_LOAD_DEBUG_CONTROLS else l1.reg(DREGS[5]))
        intr = v12["guest_interruptibility_info"]
        shadow = intr & (X.GUEST_INTR_STATE_STI | X.GUEST_INTR_STATE_MOV_SS)
        l2.patch_hflags(set_mask=HF_INHIBIT_IRQ if shadow else 0, clear_mask=0 if shadow else HF_INHIBIT_IRQ,
                        set2=HF2_NMI if intr & X.GUEST_INTR_STATE_NMI else 0,
                        clear2=0 if intr & X.GUEST_INTR_STATE_NMI else HF2_NMI)
        # SDM 28.3.3.3: without VPID, VM entry invalidates linear mappings
        l2.flush_tlb()

    def shadowing(self, v12: Mapping[str, int]) -> bool:
        return bool(v12["cpu_based_vm_exec_control"] & X.CPU_ACTIVATE_SECONDARY
                    and v12["secondary_vm_exec_control"] & X.SEC_SHADOW_VMCS)

    def _cache_shadow_vmcs12(self, v12: Mapping[str, int]) -> None:
        """KVM nested_cache_shadow_vmcs12: L2's VMREAD/VMWRITE work on a copy of the VMCS the
        link pointer names, written back at the next nested VM exit."""
        link = v12["vmcs_link_pointer"]
        self.shadow12 = None
        if self.shadowing(v12) and link != INVALID_PTR:
            self.shadow12 = Vmcs12(self.v.vm.phys.read(link, V.VMCS12_SIZE))

    def _flush_shadow_vmcs12(self) -> None:
        """KVM nested_flush_cached_shadow_vmcs12."""
        if self.shadow12 is not None and self.vmcs12 is not None:
            self.v.vm.phys.write(self.vmcs12["vmcs_link_pointer"], bytes(self.shadow12.data))
        self.shadow12 = None

    def l1_wants_vmrw(self, insn: Insn) -> bool:
        """nested_vmx_exit_handled_vmcs_access: VMREAD/VMWRITE in L2 exit unless VMCS shadowing
        covers the field (its bit clear in the VMREAD/VMWRITE bitmap, SDM 25.6.15)."""
        v12 = self.vmcs12
        if v12 is None or not self.shadowing(v12):
            return True
        field = self.v.ctx.gpr(insn.reg)
        if self.v.ctx.code_bits() != 64:
            field &= 0xFFFFFFFF
        if field >> 15:
            return True
        bitmap = v12["vmread_bitmap" if insn.op == Op.VMREAD else "vmwrite_bitmap"]
        try:
            byte = self.v.vm.phys.read(bitmap + field // 8, 1)[0]
        except (ValueError, KeyError, IndexError):
            return True
        return bool(byte >> (field & 7) & 1)

    def _inject_on_entry(self, v12: Vmcs12) -> None:
        """SDM 27.6: deliver the event in the VM-entry interruption-information field."""
        info = v12["vm_entry_intr_info_field"]
        if not info & X.INTR_INFO_VALID:
            self._pending_debug_on_entry(v12)
            return
        ec = v12["vm_entry_exception_error_code"] if info & X.INTR_INFO_DELIVER_CODE else None
        self.v.inject_from_vmcs(info & 0xFF, (info >> 8) & 7, ec, v12["vm_entry_instruction_len"])

    def _pending_debug_on_entry(self, v12: Vmcs12) -> None:
        """SDM 27.7.3: pending debug exceptions (BS, or an enabled breakpoint) without blocking
        by MOV SS raise a #DB trap before L2's first instruction; DR6 takes their bits."""
        pending = v12["guest_pending_dbg_exceptions"]
        if not pending & 0x5000 or v12["guest_interruptibility_info"] & X.GUEST_INTR_STATE_MOV_SS:
            return
        assert self.ctx02 is not None
        self.ctx02.set_reg(DREGS[4], self.ctx02.reg(DREGS[4]) | (pending & 0x400F))
        self._entry_pending_dbg = 0
        self.v.queue_exception(1)

    def _load_msr_list(self, addr: int, count: int) -> int:
        """KVM nested_vmx_load_msr: 0 on success, else the 1-based index of the bad entry."""
        for i in range(count):
            try:
                index, reserved, value = _MSR_ENTRY.unpack(self.v.vm.phys.read(addr + 16 * i, 16))
            except (ValueError, KeyError, IndexError):
                return i + 1
            # KVM nested_vmx_msr_check_common / nested_vmx_load_msr_check
            if reserved or index in (M.FS_BASE, M.GS_BASE, 0x9B) or \
                    (index >> 8 == 0x8 and self.v.lapic.x2apic_mode):
                return i + 1
            try:
                msrs.set_msr(self.v, index, value)
            except GuestFault:
                return i + 1
        return 0

    def _store_msr_list(self, addr: int, count: int) -> bool:
        """KVM nested_vmx_store_msr: False if an entry cannot be stored (a VMX abort)."""
        for i in range(count):
            try:
                index, reserved, _ = _MSR_ENTRY.unpack(self.v.vm.phys.read(addr + 16 * i, 16))
                if reserved or (index >> 8 == 0x8 and self.v.lapic.x2apic_mode):
                    return False
                value = msrs.get_msr(self.v, index)
                self.v.vm.phys.write(addr + 16 * i + 8, value.to_bytes(8, "little"))
            except (GuestFault, ValueError, KeyError, IndexError):
                return False
        return True

    # ---- which exits L1 wants (nested_vmx_l1_wants_exit) -------------------------------------

    def l2_trap(self, insn: Insn, rip: int) -> ExitInfo | None:
        """An instruction L0 trapped while L2 runs: the exit L1 wants, or None (L0 handles it)."""
        v12 = self.vmcs12
        assert v12 is not None
        cpu = v12["cpu_based_vm_exec_control"]
        op = insn.op
        n = insn.length
        if op == Op.CPUID:
            return ExitInfo(X.EXIT["CPUID"], insn_len=n)
        if op == Op.HLT:
            return ExitInfo(X.EXIT["HLT"], insn_len=n) if cpu & X.CPU_HLT_EXITING else None
        sec = v12["secondary_vm_exec_control"] if cpu & X.CPU_ACTIVATE_SECONDARY else 0
        if op == Op.RDTSCP and not sec & X.SEC_RDTSCP:
            raise ud()   # SDM 26.1.1: RDTSCP is #UD unless "enable RDTSCP" is 1
        if op in (Op.RDTSC, Op.RDTSCP):
            return ExitInfo(X.EXIT["RDTSC" if op == Op.RDTSC else "RDTSCP"], insn_len=n) if cpu & X.CPU_RDTSC_EXITING else None
        if op == Op.WBINVD:
            return ExitInfo(X.EXIT["WBINVD"], insn_len=n) if sec & X.SEC_WBINVD_EXITING else None
        if op in (Op.RDMSR, Op.WRMSR):
            return self._msr_exit(insn, cpu, op == Op.WRMSR)
        if op in (Op.IN, Op.OUT, Op.INS, Op.OUTS):
            return self._io_exit(insn, cpu)
        if op in (Op.MOV_TO_CR, Op.MOV_FROM_CR, Op.CLTS, Op.LMSW):
            return self._cr_exit(insn, cpu, v12)
        if op in (Op.MOV_TO_DR, Op.MOV_FROM_DR):
            if not cpu & X.CPU_MOV_DR_EXITING:
                return None
            # SDM Table 28-4: DR number, direction (1 = MOV from DR), register
            qual = insn.crn | ((op == Op.MOV_FROM_DR) << 4) | (insn.reg << 8)
            return ExitInfo(X.EXIT["DR_ACCESS"], qual, insn_len=n)
        if op == Op.INVLPG:
            if not cpu & X.CPU_INVLPG_EXITING:
                return None
            return ExitInfo(X.EXIT["INVLPG"], self._operand_address(insn, self.v.ctx.get_state()), insn_len=n)
        if op == Op.PAUSE:
            return ExitInfo(X.EXIT["PAUSE_INSTRUCTION"], insn_len=n) if cpu & X.CPU_PAUSE_EXITING else None
        if op == Op.XSETBV:
            return ExitInfo(X.EXIT["XSETBV"], insn_len=n)
        if op == Op.INVD:
            return ExitInfo(X.EXIT["INVD"], insn_len=n)
        return None

    def _msr_exit(self, insn: Insn, cpu: int, write: bool) -> ExitInfo | None:
        """KVM nested_vmx_exit_handled_msr (SDM 25.6.9 MSR bitmaps)."""
        reason = X.EXIT["MSR_WRITE" if write else "MSR_READ"]
        if not cpu & X.CPU_USE_MSR_BITMAPS:
            return ExitInfo(reason, insn_len=insn.length)
        index = self.v.ctx.gpr(1) & 0xFFFFFFFF
        bitmap = self.vmcs12["msr_bitmap"] + (2048 if write else 0)
        if index >= 0xC0000000:
            index -= 0xC0000000
            bitmap += 1024
        if index >= 8192:
            return ExitInfo(reason, insn_len=insn.length)
        try:
            byte = self.v.vm.phys.read(bitmap + index // 8, 1)[0]
        except (ValueError, KeyError, IndexError):
            return ExitInfo(reason, insn_len=insn.length)
        return ExitInfo(reason, insn_len=insn.length) if byte >> (index & 7) & 1 else None

    def _io_exit(self, insn: Insn, cpu: int) -> ExitInfo | None:
        """KVM nested_vmx_exit_handled_io (SDM 25.6.4 I/O bitmaps); qualification SDM Table 28-5."""
        port = insn.port if insn.port is not None else self.v.ctx.gpr(2) & 0xFFFF
        if not cpu & X.CPU_USE_IO_BITMAPS:
            wanted = bool(cpu & X.CPU_UNCOND_IO_EXITING)
        else:
            wanted = False
            for p in range(port, port + insn.size):
                if p >= 0x10000:
                    wanted = True
                    break
                base = self.vmcs12["io_bitmap_a" if p < 0x8000 else "io_bitmap_b"]
                try:
                    byte = self.v.vm.phys.read(base + (p & 0x7FFF) // 8, 1)[0]
                except (ValueError, KeyError, IndexError):
                    wanted = True
                    break
                if byte >> (p & 7) & 1:
                    wanted = True
                    break
        if not wanted:
            return None
        string = insn.op in (Op.INS, Op.OUTS)
        qual = (insn.size - 1) | ((insn.op in (Op.IN, Op.INS)) << 3) | (string << 4) | (insn.rep << 5) \
            | ((insn.port is not None) << 6) | (port << 16)
        linear = 0
        if string:
            st = self.v.ctx.get_state()
            reg = 7 if insn.op == Op.INS else 6
            seg = st.es if insn.op == Op.INS else (st.es, st.cs, st.ss, st.ds, st.fs, st.gs)[insn.seg]
            mask = (1 << (8 * insn.addr_size)) - 1
            linear = (seg.base + (self.v.ctx.gpr(reg) & mask)) & 0xFFFFFFFFFFFFFFFF
        info = ExitInfo(X.EXIT["IO_INSTRUCTION"], qual, insn_len=insn.length)
        if string:
            self.vmcs12["guest_linear_address"] = linear
        return info

    def _cr_exit(self, insn: Insn, cpu: int, v12: Vmcs12) -> ExitInfo | None:
        """KVM nested_vmx_exit_handled_cr; qualification SDM Table 28-3."""
        op, n = insn.op, insn.length
        if op == Op.MOV_TO_CR:
            qual = insn.crn | (X.CR_ACCESS_MOV_TO << 4) | (insn.reg << 8)
            value = self.v.ctx.gpr(insn.reg)
            if insn.crn == 0:
                wanted = bool(v12["cr0_guest_host_mask"] & (value ^ v12["cr0_read_shadow"]))
            elif insn.crn == 4:
                wanted = bool(v12["cr4_guest_host_mask"] & (value ^ v12["cr4_read_shadow"]))
            elif insn.crn == 3:
                wanted = bool(cpu & X.CPU_CR3_LOAD_EXITING)
            elif insn.crn == 8:
                wanted = bool(cpu & X.CPU_CR8_LOAD_EXITING)
            else:
                wanted = False
            return ExitInfo(X.EXIT["CR_ACCESS"], qual, insn_len=n) if wanted else None
        if op == Op.MOV_FROM_CR:
            qual = insn.crn | (X.CR_ACCESS_MOV_FROM << 4) | (insn.reg << 8)
            wanted = (insn.crn == 3 and bool(cpu & X.CPU_CR3_STORE_EXITING)) or \
                     (insn.crn == 8 and bool(cpu & X.CPU_CR8_STORE_EXITING))
            return ExitInfo(X.EXIT["CR_ACCESS"], qual, insn_len=n) if wanted else None
        mask, shadow = v12["cr0_guest_host_mask"], v12["cr0_read_shadow"]
        if op == Op.CLTS:
            wanted = bool(mask & CR0_TS and shadow & CR0_TS)
            return ExitInfo(X.EXIT["CR_ACCESS"], X.CR_ACCESS_CLTS << 4, insn_len=n) if wanted else None
        if insn.mem is not None:
            return None   # LMSW from memory: the operand value is not at hand; L0 runs it
        val = self.v.ctx.gpr(insn.reg) & 0xF
        wanted = bool(mask & 0xE & (val ^ shadow)) or (bool(mask & 1) and not shadow & 1 and bool(val & 1))
        qual = (X.CR_ACCESS_LMSW << 4) | (val << 16)
        return ExitInfo(X.EXIT["CR_ACCESS"], qual, insn_len=n) if wanted else None

    def cr_read_value(self, crn: int, real: int) -> int:
        """What MOV from CR0/CR4 returns in L2: guest/host-mask bits from the read shadow."""
        v12 = self.vmcs12
        assert v12 is not None
        if crn == 0:
            mask, shadow = v12["cr0_guest_host_mask"], v12["cr0_read_shadow"]
        elif crn == 4:
            mask, shadow = v12["cr4_guest_host_mask"], v12["cr4_read_shadow"]
        else:
            return real
        return (real & ~mask) | (shadow & mask)

    def cr_write_value(self, crn: int, value: int, real: int) -> int:
        """An L2 MOV to CR0/CR4 that does not exit leaves the bits L1 owns unchanged (SDM 26.3)."""
        v12 = self.vmcs12
        assert v12 is not None
        mask = v12["cr0_guest_host_mask"] if crn == 0 else v12["cr4_guest_host_mask"] if crn == 4 else 0
        return (value & ~mask) | (real & mask)

    def insn_exit(self, insn: Insn) -> ExitInfo:
        """A VMX instruction executed in L2 always exits to L1, with its instruction information
        (SDM Table 28-13/28-14) and the displacement as the qualification."""
        info = 0
        qual = 0
        if insn.mem is not None:
            m = insn.mem
            info |= {1: 0, 2: 1, 4: 2, 8: 3}[m.scale] | ({2: 0, 4: 1, 8: 2}[m.addr_size] << 7) | (m.seg << 15)
            info |= (m.index << 18) if m.index is not None else 1 << 22
            info |= (m.base << 23) if m.base is not None else 1 << 27
            qual = m.disp & 0xFFFFFFFFFFFFFFFF
        else:
            info |= 1 << 10 | (insn.rm << 3)
        if insn.op in (Op.VMREAD, Op.VMWRITE, Op.INVEPT, Op.INVVPID):
            info |= insn.reg << 28
        return ExitInfo(_INSN_EXIT[insn.op], qual, insn_len=insn.length, insn_info=info)

    def exception_exit(self, vector: int, error_code: int | None, payload: int | None,
                       privileged: bool = False) -> ExitInfo | None:
        """KVM nested_vmx_l1_wants_exit for EXCEPTION_NMI; #PF through the PFEC mask/match
        (SDM 25.6.3)."""
        v12 = self.vmcs12
        assert v12 is not None
        bitmap = v12["exception_bitmap"]
        if vector == 14:
            ec = error_code or 0
            match = (ec & v12["page_fault_error_code_mask"]) == v12["page_fault_error_code_match"]
            wanted = match if bitmap >> 14 & 1 else not match
        else:
            wanted = bool(bitmap >> vector & 1)
        if not wanted:
            return None
        if privileged:
            kind = X.INTR_TYPE_PRIV_SW_EXCEPTION   # INT1
        elif vector in (3, 4):
            kind = X.INTR_TYPE_SOFT_EXCEPTION      # INT3, INTO
        else:
            kind = X.INTR_TYPE_HARD_EXCEPTION
        info = vector | kind | X.INTR_INFO_VALID
        if error_code is not None and self.v.ctx.get_state().protected:
            info |= X.INTR_INFO_DELIVER_CODE
        qual = (payload or 0) if vector == 14 else 0
        if vector == 1 and not privileged:
            qual = self._db_payload()
        return ExitInfo(X.EXIT["EXCEPTION_NMI"], qual, info, (error_code or 0) & 0xFFFF)

    def _db_payload(self) -> int:
        """SDM 28.2.1 Table 28-1: a #DB exit reports B0-B3, BD and BS in the qualification and
        leaves DR6 alone. The substrate already wrote them into L2's DR6 (B0-B3 fresh, BS
        set): take them out, add the pending debug exceptions VM entry loaded, and put DR6
        back as it was at entry."""
        assert self.ctx02 is not None
        dr6 = self.ctx02.reg(DREGS[4])
        qual = (dr6 & 0x600F) | (self._entry_pending_dbg & 0x600F)
        self.ctx02.set_reg(DREGS[4], self._entry_dr6)
        self._entry_pending_dbg = 0
        return qual

    def event_exit(self, kind: str, vector: int | None = None) -> ExitInfo:
        """The exit for an event L1 intercepts: "PREEMPTION_TIMER", "NMI", "INTR" (with the
        acknowledged `vector`), "INTR_WINDOW", "NMI_WINDOW", "TRIPLE_FAULT" (SDM 28.2.1, 28.2.2)."""
        if kind == "NMI":
            return ExitInfo(X.EXIT["EXCEPTION_NMI"], intr_info=2 | X.INTR_TYPE_NMI | X.INTR_INFO_VALID)
        if kind == "INTR":
            return ExitInfo(X.EXIT["EXTERNAL_INTERRUPT"], intr_info=0 if vector is None else vector | X.INTR_INFO_VALID)
        return ExitInfo(X.EXIT[{"PREEMPTION_TIMER": "PREEMPTION_TIMER", "INTR_WINDOW": "INTERRUPT_WINDOW",
                                "NMI_WINDOW": "NMI_WINDOW", "TRIPLE_FAULT": "TRIPLE_FAULT"}[kind]])

    def virq_pending(self) -> bool:
        return False   # no virtual-interrupt delivery (APICv) is offered

    def virtual_tpr(self) -> bool:
        return False   # no TPR shadow: L2's CR8 is the APIC's TPR unless CR8 exiting catches it

    def physical_if(self) -> bool:
        return True   # SDM 25.2: "external-interrupt exiting" ignores RFLAGS.IF

    def rdtsc_exiting(self) -> bool:
        v12 = self.vmcs12
        return v12 is not None and bool(v12["cpu_based_vm_exec_control"] & X.CPU_RDTSC_EXITING)

    def exits_on_intr(self) -> bool:
        v12 = self.vmcs12
        return v12 is not None and bool(v12["pin_based_vm_exec_control"] & X.PIN_EXT_INTR_MASK)

    def exits_on_nmi(self) -> bool:
        v12 = self.vmcs12
        return v12 is not None and bool(v12["pin_based_vm_exec_control"] & X.PIN_NMI_EXITING)

    def intr_window_exiting(self) -> bool:
        v12 = self.vmcs12
        return v12 is not None and bool(v12["cpu_based_vm_exec_control"] & X.CPU_INTR_WINDOW)

    def nmi_window_exiting(self) -> bool:
        v12 = self.vmcs12
        return v12 is not None and bool(v12["cpu_based_vm_exec_control"] & X.CPU_NMI_WINDOW)

    def ack_intr_on_exit(self) -> bool:
        v12 = self.vmcs12
        return v12 is not None and bool(v12["vm_exit_controls"] & X.EXIT_ACK_INTR_ON_EXIT)

    # ---- nested VM exit -------------------------------------------------------------------------

    def vmexit(self, e: ExitInfo) -> None:
        """KVM nested_vmx_vmexit: sync vmcs02 -> vmcs12, write the exit information, load L1's
        host state (SDM 28.2-28.5)."""
        v12 = self.vmcs12
        assert v12 is not None and self.ctx02 is not None
        l2 = self.ctx02
        st = l2.get_state()
        copied = self._sync_common(v12, st, l2)
        if self.eager_sync:
            copied += self.sync_rare()
        else:
            self.need_rare_sync = True
        # SDM 28.2: exit information; KVM prepare_vmcs12
        v12["vm_exit_reason"] = e.reason
        v12["exit_qualification"] = e.qualification
        v12["vm_exit_intr_info"] = e.intr_info
        v12["vm_exit_intr_error_code"] = e.intr_error_code
        v12["vm_exit_instruction_len"] = e.insn_len
        v12["vmx_instruction_info"] = e.insn_info
        v12["idt_vectoring_info_field"] = 0
        if e.gpa is not None:
            v12["guest_physical_address"] = e.gpa
        if e.linear is not None:
            v12["guest_linear_address"] = e.linear
        v12.launch_state = 1
        v12["vm_entry_intr_info_field"] = v12["vm_entry_intr_info_field"] & ~X.INTR_INFO_VALID
        copied += 8
        self.stats["exits"] += 1
        self.stats[f"exit_{X.EXIT_REASONS.get(e.reason, e.reason)}"] += 1
        self.stats["fields_copied"] += copied
        self._trace("kvm_nested_vmexit", reason=e.reason, rip=st.rip, qual=e.qualification,
                    intr_info=e.intr_info, fields_copied=copied)
        gprs = l2.gprs()
        self._vmcs02_of = self.current_vmptr
        self.dirty.clear()
        abort = not self._store_msr_list(v12["vm_exit_msr_store_addr"], v12["vm_exit_msr_store_count"])
        self._leave_guest_mode(gprs, from_l2=True)
        if abort or self._load_msr_list(v12["vm_exit_msr_load_addr"], v12["vm_exit_msr_load_count"]):
            self.v.vmx_abort()   # SDM 28.7: a VMX abort; KVM turns it into a triple fault

    def _sync_common(self, v12: Vmcs12, st: ArchState, l2: ExecContext) -> int:
        """KVM sync_vmcs02_to_vmcs12: the fields synced on every exit; returns how many."""
        m0, m4 = v12["cr0_guest_host_mask"], v12["cr4_guest_host_mask"]
        v12["guest_cr0"] = (st.cr0 & ~m0) | (v12["guest_cr0"] & m0)
        v12["guest_cr4"] = (st.cr4 & ~m4) | (v12["guest_cr4"] & m4)
        v12["guest_cr3"] = st.cr3
        v12["guest_rsp"] = st.rsp
        v12["guest_rip"] = st.rip
        v12["guest_rflags"] = st.rflags
        v12["guest_cs_ar_bytes"] = ar_from_segment(st.cs)
        v12["guest_ss_ar_bytes"] = ar_from_segment(st.ss)
        hf, hf2 = l2.hflags(), l2.hflags2()
        v12["guest_interruptibility_info"] = (X.GUEST_INTR_STATE_STI if hf & HF_INHIBIT_IRQ else 0) \
            | (X.GUEST_INTR_STATE_NMI if hf2 & HF2_NMI else 0)
        v12["guest_activity_state"] = X.ACTIVITY_HLT if self.v.halted_in_guest() else X.ACTIVITY_ACTIVE
        entry = v12["vm_entry_controls"]
        v12["vm_entry_controls"] = (entry & ~X.ENTRY_IA32E_MODE) | (X.ENTRY_IA32E_MODE if st.efer & EFER_LMA else 0)
        v12["guest_sysenter_cs"] = l2.cpu_msr(M.IA32_SYSENTER_CS)
        v12["guest_sysenter_esp"] = l2.cpu_msr(M.IA32_SYSENTER_ESP)
        v12["guest_sysenter_eip"] = l2.cpu_msr(M.IA32_SYSENTER_EIP)
        n = 16
        exit_ctl = v12["vm_exit_controls"]
        if exit_ctl & X.EXIT_SAVE_DEBUG_CONTROLS:
            v12["guest_dr7"] = l2.reg(DREGS[5])
            n += 1
        if exit_ctl & X.EXIT_SAVE_IA32_EFER:
            v12["guest_ia32_efer"] = st.efer
            n += 1
        if exit_ctl & X.EXIT_SAVE_IA32_PAT:
            v12["guest_ia32_pat"] = l2.cpu_msr(M.IA32_PAT)
            n += 1
        if l2.tdp is not None and st.cr0 & CR0_PG and st.cr4 & CR4_PAE and not st.efer & EFER_LMA:
            # KVM sync_vmcs02_to_vmcs12: with EPT, PAE paging's PDPTE registers go to vmcs12
            pdptes = l2.tdp.pdptes or self._pdptes_from_memory(l2.tdp, st.cr3)
            for i, pdpte in enumerate(pdptes):
                v12[f"guest_pdptr{i}"] = pdpte
            n += 4
        if self.preemption_deadline is not None and exit_ctl & X.EXIT_SAVE_PREEMPTION_TIMER:
            # KVM vmx_get_preemption_timer_value: the time left in whole timer periods, rounded down
            left = max(0, self.preemption_deadline - self.v.now())
            v12["vmx_preemption_timer_value"] = left >> PREEMPTION_TIMER_RATE
            n += 1
        return n

    @staticmethod
    def _pdptes_from_memory(tdp: TwoDimensional, cr3: int) -> tuple[int, ...]:
        """The PDPTEs L2's last MOV to CR3 loaded (SDM 4.4.1), through EPT; 0 where EPT
        refuses the read."""
        out = []
        for i in range(4):
            try:
                out.append(struct.unpack("<Q", tdp.data().read((cr3 & 0xFFFFFFE0) + 8 * i, 8))[0])
            except TdpFault:
                out.append(0)
        return tuple(out)

    def preemption_timer_expired(self) -> bool:
        return self.preemption_deadline is not None and self.v.now() >= self.preemption_deadline

    def sync_rare(self) -> int:
        """KVM sync_vmcs02_to_vmcs12_rare: segment state and descriptor tables from vmcs02."""
        v12 = self.vmcs12
        self.need_rare_sync = False
        if v12 is None or self.ctx02 is None:
            return 0
        st = self.ctx02.get_state()
        n = 0
        for s in _SEGS:
            seg = getattr(st, "ldt" if s == "ldtr" else s)
            v12[f"guest_{s}_selector"] = seg.selector
            v12[f"guest_{s}_base"] = seg.base
            v12[f"guest_{s}_limit"] = seg.limit
            n += 3
            if s not in ("cs", "ss"):
                v12[f"guest_{s}_ar_bytes"] = ar_from_segment(seg)
                n += 1
        v12["guest_gdtr_base"], v12["guest_gdtr_limit"] = st.gdt.base, st.gdt.limit
        v12["guest_idtr_base"], v12["guest_idtr_limit"] = st.idt.base, st.idt.limit
        v12["guest_pending_dbg_exceptions"] = 0
        self.stats["rare_syncs"] += 1
        self.stats["fields_copied_rare"] += n + 5
        return n + 5

    def _leave_guest_mode(self, l2_gprs: list[int], from_l2: bool) -> None:
        """KVM load_vmcs12_host_state (SDM 28.5). `from_l2`: L2 ran, so the state VMX does not
        switch (GPRs, shared MSRs, debug registers, CR2) comes back from its context."""
        v12 = self.vmcs12
        assert v12 is not None
        l1 = self.v.ctx01
        l2 = self.ctx02 if from_l2 else None
        exit_ctl = v12["vm_exit_controls"]
        ia32e = bool(exit_ctl & X.EXIT_HOST_ADDR_SPACE_SIZE)
        efer = l1.cpu_msr(M.EFER)
        if exit_ctl & X.EXIT_LOAD_IA32_EFER:
            efer = v12["host_ia32_efer"]
        elif ia32e:
            efer |= EFER_LMA | EFER_LME
        else:
            efer &= ~(EFER_LMA | EFER_LME)
        code = (1 << 15) | (1 << 12) | (0xB << 8) | (1 << 23) | ((1 << 21) if ia32e else (1 << 22))
        data = (1 << 15) | (1 << 12) | (0x3 << 8) | (1 << 23) | (1 << 22)

        def dseg(name: str, base: int = 0) -> Segment:
            sel = v12[f"host_{name}_selector"]
            return Segment(sel, base, 0xFFFFFFFF, data if sel else data & ~SEG_P)

        st = ArchState(
            rip=v12["host_rip"], rsp=v12["host_rsp"], rflags=2,
            cs=Segment(v12["host_cs_selector"], 0, 0xFFFFFFFF, code),
            ss=Segment(v12["host_ss_selector"], 0, 0xFFFFFFFF, data),
            ds=dseg("ds"), es=dseg("es"), fs=dseg("fs", v12["host_fs_base"]), gs=dseg("gs", v12["host_gs_base"]),
            tr=Segment(v12["host_tr_selector"], v12["host_tr_base"], 0x67, (1 << 15) | (0xB << 8)),
            ldt=Segment(0, 0, 0, 0x2 << 8),
            gdt=DescTable(v12["host_gdtr_base"], 0xFFFF), idt=DescTable(v12["host_idtr_base"], 0xFFFF),
            cr0=v12["host_cr0"], cr2=l2.reg_cr(2) if l2 is not None else l1.reg_cr(2),
            cr3=v12["host_cr3"], cr4=v12["host_cr4"], efer=efer)
        l1.set_state(st)
        l1.set_gprs(l2_gprs[:4] + [st.rsp] + l2_gprs[5:])
        l1.set_cpu_msr(M.IA32_SYSENTER_CS, v12["host_ia32_sysenter_cs"])
        l1.set_cpu_msr(M.IA32_SYSENTER_ESP, v12["host_ia32_sysenter_esp"])
        l1.set_cpu_msr(M.IA32_SYSENTER_EIP, v12["host_ia32_sysenter_eip"])
        if exit_ctl & X.EXIT_LOAD_IA32_PAT:
            l1.set_cpu_msr(M.IA32_PAT, v12["host_ia32_pat"])
        if l2 is not None:
            for index in _SHARED_CPU_MSRS:
                l1.set_cpu_msr(index, l2.cpu_msr(index))
            for i in range(5):
                l1.set_reg(DREGS[i], l2.reg(DREGS[i]))
        l1.set_reg(DREGS[5], 0x400)
        l1.patch_hflags(clear_mask=HF_INHIBIT_IRQ)
        self._flush_shadow_vmcs12()
        self.v.requests.discard(REQ_GET_NESTED_STATE_PAGES)   # KVM: a nested VM exit cancels it
        self.guest_mode = False
        self.l2_tsc_offset = 0
        self.preemption_deadline = None
        self.v.switch_context(l1)

    # ---- nested state (kvm/vmx/state.py) --------------------------------------------------------

    def get_state(self, user_size: int) -> bytes | int:
        return vmx_state.get_nested_state(self, user_size)

    def set_state(self, ns: NestedState) -> None:
        vmx_state.set_nested_state(self, ns)

    def trace_failed(self, failure: CheckFailure) -> None:
        self._trace("kvm_nested_vmenter_failed", check=failure.name, source=failure.source, values=failure.values)

    def sync_for_save(self) -> None:
        """KVM vmx_get_nested_state in guest mode: sync_vmcs02_to_vmcs12 and the rare fields."""
        assert self.vmcs12 is not None and self.ctx02 is not None
        self._sync_common(self.vmcs12, self.ctx02.get_state(), self.ctx02)
        self.sync_rare()

    def leave_nested(self) -> None:
        """KVM vmx_leave_nested + free_nested: out of L2 (L1's host state loaded, no exit
        information written), out of VMX operation, vmcs12 dropped without write-back."""
        if self.guest_mode:
            assert self.ctx02 is not None
            self._leave_guest_mode(self.ctx02.gprs(), from_l2=True)
        self.v.requests.discard(REQ_GET_NESTED_STATE_PAGES)
        self.vmxon, self.vmxon_ptr = False, INVALID_PTR
        self.vmcs12, self.shadow12, self.current_vmptr = None, None, INVALID_PTR
        self._vmcs02_of = INVALID_PTR
        self.dirty.clear()
        self.need_rare_sync = False
        self.pending = None

    def enter_from_state(self, shadow: Vmcs12 | None, run_pending: bool, deadline_tsc: int | None) -> None:
        """KVM nested_vmx_enter_non_root_mode(from_vmentry=false): vmcs02 from the restored
        vmcs12, no MSR-load list, the entry's event only if the entry was still pending, the
        preemption timer from the saved deadline (in L1 TSC units), the vmcs12 pages at the
        first run."""
        v12 = self.vmcs12
        assert v12 is not None
        snap = v12.fields()
        self.enter_guest_mode(snap)
        self.shadow12 = shadow
        if deadline_tsc is not None and self.preemption_deadline is not None:
            self.preemption_deadline = deadline_tsc - self.v.tsc_offset
        if run_pending:
            self._inject_on_entry(v12)
        if not self.v.vm.nested_pages_at_set:   # else SET checked them with the other rules
            self.v.requests.add(REQ_GET_NESTED_STATE_PAGES)

    def missing_pages(self, snap: Mapping[str, int] | None = None) -> str | None:
        """KVM nested_get_vmcs12_pages: the first page vmcs12 (or `snap`) uses that guest
        memory does not back (bitmaps the controls enable), or None."""
        if snap is None:
            assert self.vmcs12 is not None
            snap = self.vmcs12.fields()
        cpu = snap["cpu_based_vm_exec_control"]
        used = []
        if cpu & X.CPU_USE_MSR_BITMAPS:
            used.append("msr_bitmap")
        if cpu & X.CPU_USE_IO_BITMAPS:
            used += ["io_bitmap_a", "io_bitmap_b"]
        if self.shadowing(snap):
            used += ["vmread_bitmap", "vmwrite_bitmap"]
        for name in used:
            if self.v.vm.phys.find(snap[name]) is None:
                return name
        return None

    def get_nested_state_pages(self) -> bool:
        """KVM_REQ_GET_NESTED_STATE_PAGES before the first run after SET: False when a page
        is still missing (KVM_EXIT_INTERNAL_ERROR)."""
        return not self.guest_mode or self.missing_pages() is None

    def _failed_entry_exit(self, reason: int, qual: int) -> None:
        """SDM 27.8: a VM-entry failure loads L1's host state; only the exit reason and
        qualification change in vmcs12, and the VMCS stays unlaunched."""
        v12 = self.vmcs12
        assert v12 is not None
        v12["vm_exit_reason"] = reason | X.EXIT_REASON_FAILED_VMENTRY
        v12["exit_qualification"] = qual
        self.stats["exits"] += 1
        self.stats[f"exit_{X.EXIT_REASONS.get(reason, reason)}"] += 1
        self._trace("kvm_nested_vmexit", reason=reason | X.EXIT_REASON_FAILED_VMENTRY, qual=qual)
        self._leave_guest_mode(self.v.ctx01.gprs(), from_l2=self.guest_mode)


_HANDLERS = {
    Op.VMXON: NestedVmx._vmxon,
    Op.VMXOFF: NestedVmx._vmxoff,
    Op.VMCLEAR: NestedVmx._vmclear,
    Op.VMPTRLD: NestedVmx._vmptrld,
    Op.VMPTRST: NestedVmx._vmptrst,
    Op.VMREAD: NestedVmx._vmread,
    Op.VMWRITE: NestedVmx._vmwrite,
    Op.VMLAUNCH: NestedVmx._vmlaunch,
    Op.VMRESUME: NestedVmx._vmresume,
    Op.INVEPT: NestedVmx._invept,
    Op.INVVPID: NestedVmx._invvpid,
}
