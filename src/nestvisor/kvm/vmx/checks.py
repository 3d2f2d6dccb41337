"""VM-entry consistency checks, in KVM's order (nested_vmx_check_controls,
nested_vmx_check_address_space_size, nested_vmx_check_host_state,
nested_vmx_check_guest_state; SDM 27.2-27.3).

Each check is one `cc` line: its name is KVM's CC() expression in words, and the first
failure is returned as a `CheckFailure` carrying the offending values, which becomes the
kvm_nested_vmenter_failed trace event. The evaluator is shared with nested SVM
(..nested_checks).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from ...arch import ept as E
from ...arch import vmx as X
from ...arch.vmcs import VMCS12_REVISION
from ..msr import canonical
from ..nested_checks import CheckFailure, cc, run
from .caps import VmxCaps

_PAT_TYPES = frozenset((0, 1, 4, 5, 6, 7))
# EPTP memory types and page-walk lengths (field values) with the capability bit offering each
_EPTP_MEMTYPE_CAP = {E.MEMTYPE_UC: X.EPT_CAP_MEMTYPE_UC, E.MEMTYPE_WB: X.EPT_CAP_MEMTYPE_WB}
_EPTP_WALK_CAP = {3 << E.EPTP_WALK_LENGTH_SHIFT: X.EPT_CAP_WALK_LENGTH_4,
                  4 << E.EPTP_WALK_LENGTH_SHIFT: X.EPT_CAP_WALK_LENGTH_5}
CR0_PE, CR0_WP, CR0_PG = 1, 1 << 16, 1 << 31
CR4_PAE, CR4_PCIDE, CR4_CET, CR4_LA57 = 1 << 5, 1 << 17, 1 << 23, 1 << 12
EFER_LME, EFER_LMA = 1 << 8, 1 << 10
EFER_VALID = 1 | (1 << 8) | (1 << 10) | (1 << 11)   # SCE LME LMA NXE (what the vCPU supports)


def page_address_valid(gpa: int, maxphyaddr: int) -> bool:
    """KVM page_address_valid: page-aligned and below MAXPHYADDR."""
    return not gpa & 0xFFF and not gpa >> maxphyaddr


def _pat_valid(value: int) -> bool:
    return all((value >> (8 * i)) & 0xFF in _PAT_TYPES for i in range(8))


def _eptp(eptp: int, caps: VmxCaps, maxphyaddr: int) -> None:
    """KVM nested_vmx_check_eptp (SDM 25.6.11): a memory type and a page-walk length the
    capability MSR offers, A/D flags only if offered, reserved bits 11:7 and 63:MAXPHYADDR 0."""
    src = "nested_vmx_check_eptp"
    memtype = eptp & E.EPTP_MEMTYPE_MASK
    cc(not caps.ept_vpid & _EPTP_MEMTYPE_CAP.get(memtype, 0),
       "EPTP memory type is UC or WB as IA32_VMX_EPT_VPID_CAP allows", src, eptp=eptp, memtype=memtype)
    walk = eptp & E.EPTP_WALK_LENGTH_MASK
    cc(not caps.ept_vpid & _EPTP_WALK_CAP.get(walk, 0), "EPTP page-walk length is one IA32_VMX_EPT_VPID_CAP allows",
       src, eptp=eptp, walk_length=(walk >> E.EPTP_WALK_LENGTH_SHIFT) + 1)
    cc(bool(eptp >> maxphyaddr) or bool(eptp & E.EPTP_RESERVED_LOW),
       "EPTP reserved bits 11:7 and 63:MAXPHYADDR are 0", src, eptp=eptp, maxphyaddr=maxphyaddr)
    cc(bool(eptp & E.EPTP_AD_ENABLE) and not caps.ept_vpid & X.EPT_CAP_AD,
       "EPTP A/D enable needs EPT A/D flags in IA32_VMX_EPT_VPID_CAP", src, eptp=eptp)


def _msr_list(v12: Mapping[str, int], count: str, addr: str, caps: VmxCaps, maxphyaddr: int, src: str) -> None:
    n, a = v12[count], v12[addr]
    if n == 0:
        return
    limit = (((caps.misc >> 25) & 7) + 1) * 512
    cc(n > limit, f"{count} within MISC's list limit", src, count=n, limit=limit)
    cc(bool(a & 0xF) or bool(a >> maxphyaddr) or bool((a + n * 16 - 1) >> maxphyaddr),
       f"{addr} 16-byte aligned and the list below MAXPHYADDR", src, addr=a, count=n)


def _controls(v12: Mapping[str, int], caps: VmxCaps, maxphyaddr: int) -> None:
    src = "nested_check_vm_execution_controls"
    pin, cpu = v12["pin_based_vm_exec_control"], v12["cpu_based_vm_exec_control"]
    cc(not caps.true_pin.allows(pin), "pin-based controls allowed by IA32_VMX_TRUE_PINBASED_CTLS", src,
       pin=pin, low=caps.true_pin.low, high=caps.true_pin.high)
    cc(not caps.true_proc.allows(cpu), "processor-based controls allowed by IA32_VMX_TRUE_PROCBASED_CTLS", src,
       cpu=cpu, low=caps.true_proc.low, high=caps.true_proc.high)
    sec = v12["secondary_vm_exec_control"] if cpu & X.CPU_ACTIVATE_SECONDARY else 0
    if cpu & X.CPU_ACTIVATE_SECONDARY:
        cc(not caps.proc2.allows(sec), "secondary controls allowed by IA32_VMX_PROCBASED_CTLS2", src,
           secondary=sec, high=caps.proc2.high)
    cc(bool(sec & X.SEC_UNRESTRICTED_GUEST) and not sec & X.SEC_EPT, "unrestricted guest needs enable EPT",
       "SDM 27.2.1.1", secondary=sec)
    if sec & X.SEC_SHADOW_VMCS:
        for name in ("vmread_bitmap", "vmwrite_bitmap"):
            cc(not page_address_valid(v12[name], maxphyaddr), f"{name} is a valid page address",
               "nested_vmx_check_shadow_vmcs_controls", **{name: v12[name]})
    cc(v12["cr3_target_count"] > (caps.misc >> 16) & 0x1FF, "cr3_target_count within MISC[24:16]", src,
       cr3_target_count=v12["cr3_target_count"])
    if cpu & X.CPU_USE_IO_BITMAPS:
        for name in ("io_bitmap_a", "io_bitmap_b"):
            cc(not page_address_valid(v12[name], maxphyaddr), f"{name} is a valid page address",
               "nested_vmx_check_io_bitmap_controls", **{name: v12[name]})
    if cpu & X.CPU_USE_MSR_BITMAPS:
        cc(not page_address_valid(v12["msr_bitmap"], maxphyaddr), "msr_bitmap is a valid page address",
           "nested_vmx_check_msr_bitmap_controls", msr_bitmap=v12["msr_bitmap"])
    cc(bool(pin & X.PIN_VIRTUAL_NMIS) and not pin & X.PIN_NMI_EXITING,
       "virtual NMIs need NMI exiting", "nested_vmx_check_nmi_controls", pin=pin)
    cc(bool(cpu & X.CPU_NMI_WINDOW) and not pin & X.PIN_VIRTUAL_NMIS,
       "NMI-window exiting needs virtual NMIs", "nested_vmx_check_nmi_controls", cpu=cpu)
    cc(bool(sec & X.SEC_VPID) and not v12["virtual_processor_id"], "enable VPID needs a VPID other than 0", src)
    exit_ctl = v12["vm_exit_controls"]
    cc(bool(exit_ctl & X.EXIT_SAVE_PREEMPTION_TIMER) and not pin & X.PIN_PREEMPTION_TIMER,
       "save-preemption-timer needs the preemption timer", src, exit=exit_ctl)
    if sec & X.SEC_EPT:
        _eptp(v12["ept_pointer"], caps, maxphyaddr)
    src = "nested_check_vm_exit_controls"
    cc(not caps.true_exit.allows(exit_ctl), "VM-exit controls allowed by IA32_VMX_TRUE_EXIT_CTLS", src,
       exit=exit_ctl, low=caps.true_exit.low, high=caps.true_exit.high)
    _msr_list(v12, "vm_exit_msr_load_count", "vm_exit_msr_load_addr", caps, maxphyaddr, src)
    _msr_list(v12, "vm_exit_msr_store_count", "vm_exit_msr_store_addr", caps, maxphyaddr, src)
    src = "nested_check_vm_entry_controls"
    entry = v12["vm_entry_controls"]
    cc(not caps.true_entry.allows(entry), "VM-entry controls allowed by IA32_VMX_TRUE_ENTRY_CTLS", src,
       entry=entry, low=caps.true_entry.low, high=caps.true_entry.high)
    info = v12["vm_entry_intr_info_field"]
    if info & X.INTR_INFO_VALID:
        kind, vector = info & 0x700, info & 0xFF
        cc(kind == X.INTR_TYPE_RESERVED or kind == X.INTR_TYPE_OTHER_EVENT,
           "injected event type is not reserved (or MTF, not supported)", src, intr_info=info)
        cc(kind == X.INTR_TYPE_NMI and vector != 2, "injected NMI has vector 2", src, intr_info=info)
        cc(kind == X.INTR_TYPE_HARD_EXCEPTION and vector > 31, "injected exception vector <= 31", src, intr_info=info)
        has_ec = bool(info & X.INTR_INFO_DELIVER_CODE)
        urg = bool(cpu & X.CPU_ACTIVATE_SECONDARY and sec & X.SEC_UNRESTRICTED_GUEST)
        prot = not urg or bool(v12["guest_cr0"] & CR0_PE)
        if not prot or kind != X.INTR_TYPE_HARD_EXCEPTION:
            cc(has_ec, "error code delivered only for a protected-mode hardware exception", src, intr_info=info)
        else:
            cc(has_ec != (vector in X.EXCEPTIONS_WITH_ERROR_CODE),
               "deliver-error-code matches the vector", src, intr_info=info)
        if has_ec:
            ec = v12["vm_entry_exception_error_code"]
            cc(bool(ec >> 16), "injected error code bits 31:16 are 0", src, error_code=ec)
        cc(bool(info & X.INTR_INFO_RESERVED), "interruption-information bits 30:12 are 0", src, intr_info=info)
        if kind in (X.INTR_TYPE_SOFT_INTR, X.INTR_TYPE_PRIV_SW_EXCEPTION, X.INTR_TYPE_SOFT_EXCEPTION):
            n = v12["vm_entry_instruction_len"]
            cc(n > 15 or n == 0, "software event instruction length 1..15", src, length=n)
    _msr_list(v12, "vm_entry_msr_load_count", "vm_entry_msr_load_addr", caps, maxphyaddr, src)


def _host(v12: Mapping[str, int], caps: VmxCaps, maxphyaddr: int, l1_lma: bool) -> None:
    exit_ctl = v12["vm_exit_controls"]
    ia32e = bool(exit_ctl & X.EXIT_HOST_ADDR_SPACE_SIZE)
    cc(ia32e != l1_lma, "host address-space size equals the current EFER.LMA",
       "nested_vmx_check_address_space_size", exit=exit_ctl, lma=int(l1_lma))
    src = "nested_vmx_check_host_state"
    cr0, cr3, cr4 = v12["host_cr0"], v12["host_cr3"], v12["host_cr4"]
    cc((cr0 & caps.cr0_fixed0) != caps.cr0_fixed0 or bool(cr0 & ~caps.cr0_fixed1 & 0xFFFFFFFF) or bool(cr0 >> 32),
       "host_cr0 satisfies IA32_VMX_CR0_FIXED0/1", src, host_cr0=cr0)
    cc((cr4 & caps.cr4_fixed0) != caps.cr4_fixed0 or bool(cr4 & ~caps.cr4_fixed1),
       "host_cr4 satisfies IA32_VMX_CR4_FIXED0/1", src, host_cr4=cr4)
    cc(bool(cr3 >> maxphyaddr), "host_cr3 below MAXPHYADDR", src, host_cr3=cr3)
    cc(bool(cr4 & CR4_CET) and not cr0 & CR0_WP, "host CR4.CET needs CR0.WP", src, host_cr4=cr4)
    for name in ("host_ia32_sysenter_esp", "host_ia32_sysenter_eip"):
        cc(not canonical(v12[name]), f"{name} is canonical", src, **{name: v12[name]})
    if exit_ctl & X.EXIT_LOAD_IA32_PAT:
        cc(not _pat_valid(v12["host_ia32_pat"]), "host_ia32_pat is a valid PAT", src, host_ia32_pat=v12["host_ia32_pat"])
    if ia32e:
        cc(not cr4 & CR4_PAE, "64-bit host needs CR4.PAE", src, host_cr4=cr4)
    else:
        cc(bool(v12["vm_entry_controls"] & X.ENTRY_IA32E_MODE), "32-bit host cannot enter an IA-32e guest", src,
           entry=v12["vm_entry_controls"])
        cc(bool(cr4 & CR4_PCIDE), "32-bit host has CR4.PCIDE = 0", src, host_cr4=cr4)
        cc(bool(v12["host_rip"] >> 32), "32-bit host RIP bits 63:32 are 0", src, host_rip=v12["host_rip"])
    for seg in ("es", "cs", "ss", "ds", "fs", "gs", "tr"):
        sel = v12[f"host_{seg}_selector"]
        cc(bool(sel & 7), f"host {seg.upper()} selector has RPL = 0 and TI = 0", src, selector=sel)
    cc(v12["host_cs_selector"] == 0, "host CS selector is not null", src)
    cc(v12["host_tr_selector"] == 0, "host TR selector is not null", src)
    cc(v12["host_ss_selector"] == 0 and not ia32e, "host SS selector is not null (32-bit host)", src)
    for name in ("host_fs_base", "host_gs_base", "host_gdtr_base", "host_idtr_base", "host_tr_base"):
        cc(not canonical(v12[name]), f"{name} is canonical", src, **{name: v12[name]})
    cc(not canonical(v12["host_rip"], 57 if cr4 & CR4_LA57 else 48), "host_rip is canonical", src,
       host_rip=v12["host_rip"])
    if exit_ctl & X.EXIT_LOAD_IA32_EFER:
        efer = v12["host_ia32_efer"]
        cc(bool(efer & ~EFER_VALID), "host_ia32_efer is a valid EFER", src, host_ia32_efer=efer)
        cc(bool(efer & EFER_LMA) != ia32e or bool(efer & EFER_LME) != ia32e,
           "host EFER.LMA and EFER.LME equal the host address-space size", src, host_ia32_efer=efer)


def _guest(v12: Mapping[str, int], caps: VmxCaps, run_pending: bool, maxphyaddr: int,
           read_u32: Callable[[int], int | None]) -> None:
    src = "nested_vmx_check_guest_state"
    entry = v12["vm_entry_controls"]
    ia32e = bool(entry & X.ENTRY_IA32E_MODE)
    cr0, cr4 = v12["guest_cr0"], v12["guest_cr4"]
    urg = _unrestricted(v12)
    # KVM nested_guest_cr0_valid: an unrestricted guest may clear PE and PG
    fixed0 = caps.cr0_fixed0 & ~(CR0_PE | CR0_PG) if urg else caps.cr0_fixed0
    cc((cr0 & fixed0) != fixed0 or bool(cr0 >> 32),
       "guest_cr0 satisfies IA32_VMX_CR0_FIXED0/1", src, guest_cr0=cr0)
    if entry & X.ENTRY_LOAD_DEBUG_CONTROLS:
        cc(bool(v12["guest_dr7"] >> 32), "guest_dr7 bits 63:32 are 0", src, guest_dr7=v12["guest_dr7"])
    for name in ("guest_sysenter_esp", "guest_sysenter_eip"):
        cc(not canonical(v12[name]), f"{name} is canonical", src, **{name: v12[name]})
    cc((cr4 & caps.cr4_fixed0) != caps.cr4_fixed0 or bool(cr4 & ~caps.cr4_fixed1),
       "guest_cr4 satisfies IA32_VMX_CR4_FIXED0/1", src, guest_cr4=cr4)
    cc(bool(cr4 & CR4_CET) and not cr0 & CR0_WP, "guest CR4.CET needs CR0.WP", src, guest_cr4=cr4)
    if entry & X.ENTRY_LOAD_IA32_PAT:
        cc(not _pat_valid(v12["guest_ia32_pat"]), "guest_ia32_pat is a valid PAT", src,
           guest_ia32_pat=v12["guest_ia32_pat"])
    link = v12["vmcs_link_pointer"]
    if link != 0xFFFFFFFFFFFFFFFF:
        # nested_vmx_check_vmcs_link_ptr: a VMCS region whose shadow bit matches "VMCS shadowing"
        cc(not page_address_valid(link, maxphyaddr), "VMCS link pointer is a valid page address", src, link=link)
        hdr = read_u32(link)
        cc(hdr is None or hdr & 0x7FFFFFFF != VMCS12_REVISION, "VMCS link pointer page has the VMCS revision",
           src, link=link, header=hdr or 0)
        cpu = v12["cpu_based_vm_exec_control"]
        shadowing = bool(cpu & X.CPU_ACTIVATE_SECONDARY and v12["secondary_vm_exec_control"] & X.SEC_SHADOW_VMCS)
        cc(bool(hdr >> 31) != shadowing, "VMCS link pointer page's shadow bit matches VMCS shadowing", src,
           header=hdr)
    cc(bool(cr0 & CR0_PG) and not cr0 & CR0_PE, "guest CR0.PG needs CR0.PE", src, guest_cr0=cr0)
    if ia32e:
        cc(not cr4 & CR4_PAE or not cr0 & CR0_PG, "IA-32e guest needs CR4.PAE and CR0.PG", src,
           guest_cr0=cr0, guest_cr4=cr4)
    if run_pending and entry & X.ENTRY_LOAD_IA32_EFER:
        efer = v12["guest_ia32_efer"]
        cc(bool(efer & ~EFER_VALID), "guest_ia32_efer is a valid EFER", src, guest_ia32_efer=efer)
        cc(bool(efer & EFER_LMA) != ia32e, "guest EFER.LMA equals the IA-32e mode guest control", src,
           guest_ia32_efer=efer)
        cc(bool(cr0 & CR0_PG) and bool(efer & EFER_LME) != ia32e,
           "guest EFER.LME equals the IA-32e mode guest control when CR0.PG", src, guest_ia32_efer=efer)
    act = v12["guest_activity_state"]
    cc(act not in (X.ACTIVITY_ACTIVE, X.ACTIVITY_HLT), "guest activity state is active or HLT", src,
       activity=act)
    cc(bool(v12["guest_cr3"] >> maxphyaddr), "guest_cr3 below MAXPHYADDR", "nested_vmx_load_cr3",
       guest_cr3=v12["guest_cr3"])
    _segments(v12, ia32e, urg)
    _rip_rflags_and_events(v12, ia32e)


def _g_ok(limit: int, ar: int) -> bool:
    """SDM 27.3.1.2: G must be 0 if any of limit bits 11:0 is 0, and 1 if any of 31:20 is 1."""
    g = bool(ar & (1 << 15))
    return not ((limit & 0xFFF) != 0xFFF and g) and not (limit >> 20 and not g)


def _unrestricted(v12: Mapping[str, int]) -> bool:
    return bool(v12["cpu_based_vm_exec_control"] & X.CPU_ACTIVATE_SECONDARY
                and v12["secondary_vm_exec_control"] & X.SEC_UNRESTRICTED_GUEST)


def _segments(v12: Mapping[str, int], ia32e: bool, urg: bool) -> None:
    """SDM 27.3.1.2 (not a virtual-8086 guest; `urg`: "unrestricted guest" relaxes the RPL
    and DPL rules and allows a real-mode CS); the CPU performs these, so a failure is a
    VM-entry failure exit with qualification 0."""
    src = "SDM 27.3.1.2"
    sel = {s: v12[f"guest_{s}_selector"] for s in ("es", "cs", "ss", "ds", "fs", "gs", "ldtr", "tr")}
    ar = {s: v12[f"guest_{s}_ar_bytes"] for s in sel}
    usable = {s: not ar[s] & 0x10000 for s in sel}
    cc(bool(sel["tr"] & 4), "guest TR selector has TI = 0", src, selector=sel["tr"])
    cc(usable["ldtr"] and bool(sel["ldtr"] & 4), "guest LDTR selector has TI = 0", src, selector=sel["ldtr"])
    if not urg:
        cc((sel["ss"] & 3) != (sel["cs"] & 3), "guest SS.RPL equals CS.RPL", src, ss=sel["ss"], cs=sel["cs"])
    for s in ("tr", "fs", "gs") + (("ldtr",) if usable["ldtr"] else ()):
        cc(not canonical(v12[f"guest_{s}_base"]), f"guest {s.upper()} base is canonical", src,
           base=v12[f"guest_{s}_base"])
    for s in ("cs", "ss", "ds", "es"):
        if s == "cs" or usable[s]:
            cc(bool(v12[f"guest_{s}_base"] >> 32), f"guest {s.upper()} base bits 63:32 are 0", src,
               base=v12[f"guest_{s}_base"])
    a = ar["cs"]
    cs_types = (3, 9, 11, 13, 15) if urg else (9, 11, 13, 15)
    cc((a & 0xF) not in cs_types, "guest CS type is an accessed code segment (or, unrestricted, data)",
       src, ar=a)
    cc(not a & 0x10, "guest CS is a code or data segment (S = 1)", src, ar=a)
    ss_dpl = (ar["ss"] >> 5) & 3
    if (a & 0xF) == 3:
        cc((a >> 5) & 3 != 0, "guest CS of type 3 has DPL 0", src, ar=a)
    elif (a & 0xF) in (9, 11):
        cc((a >> 5) & 3 != ss_dpl, "guest non-conforming CS.DPL equals SS.DPL", src, cs_ar=a, ss_ar=ar["ss"])
    else:
        cc((a >> 5) & 3 > ss_dpl, "guest conforming CS.DPL is at most SS.DPL", src, cs_ar=a, ss_ar=ar["ss"])
    cc(not a & 0x80, "guest CS is present", src, ar=a)
    cc(ia32e and bool(a & (1 << 13)) and bool(a & (1 << 14)), "guest 64-bit CS has D/B = 0", src, ar=a)
    if usable["ss"]:
        cc((ar["ss"] & 0xF) not in (3, 7), "guest SS type is a read/write data segment", src, ar=ar["ss"])
    if not urg:
        cc(ss_dpl != sel["ss"] & 3, "guest SS.DPL equals SS.RPL", src, ss=sel["ss"], ar=ar["ss"])
    if not v12["guest_cr0"] & CR0_PE or (ar["cs"] & 0xF) == 3:
        cc(ss_dpl != 0, "guest SS.DPL is 0 in real mode or with a CS of type 3", src, ar=ar["ss"])
    for s in ("es", "cs", "ss", "ds", "fs", "gs"):
        if s != "cs" and not usable[s]:
            continue
        a = ar[s]
        if s not in ("cs", "ss"):
            cc(not a & 1, f"guest {s.upper()} type is accessed", src, ar=a)
            cc(bool(a & 8) and not a & 2, f"guest {s.upper()} code segment is readable", src, ar=a)
            cc(not a & 0x10, f"guest {s.upper()} is a code or data segment (S = 1)", src, ar=a)
            cc(not a & 0x80, f"guest {s.upper()} is present", src, ar=a)
            if (a & 0xF) < 12 and not urg:
                cc((a >> 5) & 3 < sel[s] & 3, f"guest {s.upper()}.DPL is at least its RPL", src, ar=a, selector=sel[s])
        cc(bool(a & 0xF00) or bool(a >> 17), f"guest {s.upper()} access-rights reserved bits are 0", src, ar=a)
        cc(not _g_ok(v12[f"guest_{s}_limit"], a), f"guest {s.upper()} limit agrees with G", src,
           limit=v12[f"guest_{s}_limit"], ar=a)
    a = ar["tr"]
    cc(not usable["tr"], "guest TR is usable", src, ar=a)
    cc((a & 0xF) != 11 and (ia32e or (a & 0xF) != 3), "guest TR type is a busy TSS", src, ar=a)
    cc(bool(a & 0x10) or not a & 0x80 or bool(a & 0xF00) or bool(a >> 17) or not _g_ok(v12["guest_tr_limit"], a),
       "guest TR is a present system segment with valid limit and reserved bits 0", src,
       ar=a, limit=v12["guest_tr_limit"])
    if usable["ldtr"]:
        a = ar["ldtr"]
        cc((a & 0xF) != 2 or bool(a & 0x10) or not a & 0x80 or bool(a & 0xF00) or bool(a >> 17)
           or not _g_ok(v12["guest_ldtr_limit"], a),
           "guest LDTR is a present LDT with valid limit and reserved bits 0", src, ar=a)
    for t in ("gdtr", "idtr"):
        cc(not canonical(v12[f"guest_{t}_base"]), f"guest {t.upper()} base is canonical", "SDM 27.3.1.3",
           base=v12[f"guest_{t}_base"])
        cc(bool(v12[f"guest_{t}_limit"] >> 16), f"guest {t.upper()} limit bits 31:16 are 0", "SDM 27.3.1.3",
           limit=v12[f"guest_{t}_limit"])


def _rip_rflags_and_events(v12: Mapping[str, int], ia32e: bool) -> None:
    """SDM 27.3.1.4 and 27.3.1.5."""
    rip, rflags = v12["guest_rip"], v12["guest_rflags"]
    long_cs = ia32e and bool(v12["guest_cs_ar_bytes"] & (1 << 13))
    if long_cs:
        cc(not canonical(rip), "guest RIP is canonical", "SDM 27.3.1.4", rip=rip)
    else:
        cc(bool(rip >> 32), "guest RIP bits 63:32 are 0 outside 64-bit mode", "SDM 27.3.1.4", rip=rip)
    cc(bool(rflags & ~0x3F7FD7) or not rflags & 2, "guest RFLAGS reserved bits are as defined", "SDM 27.3.1.4",
       rflags=rflags)
    cc((ia32e or not v12["guest_cr0"] & CR0_PE) and bool(rflags & (1 << 17)),
       "guest RFLAGS.VM is 0 in IA-32e mode and real mode", "SDM 27.3.1.4", rflags=rflags)
    info = v12["vm_entry_intr_info_field"]
    injecting = bool(info & X.INTR_INFO_VALID)
    kind = info & 0x700
    if injecting and kind == X.INTR_TYPE_EXT_INTR:
        cc(not rflags & (1 << 9), "guest RFLAGS.IF is 1 when injecting an external interrupt", "SDM 27.3.1.4",
           rflags=rflags)
    src = "SDM 27.3.1.5"
    intr = v12["guest_interruptibility_info"]
    if v12["guest_activity_state"] == X.ACTIVITY_HLT:
        cc(bool(v12["guest_ss_ar_bytes"] & 0x60), "guest in HLT activity has SS.DPL = 0", src,
           ss_ar=v12["guest_ss_ar_bytes"])
    cc(bool(intr >> 5), "guest interruptibility reserved bits 31:5 are 0", src, intr=intr)
    cc(intr & 3 == 3, "guest blocking by STI and by MOV SS are not both set", src, intr=intr)
    cc(not rflags & (1 << 9) and bool(intr & X.GUEST_INTR_STATE_STI),
       "guest blocking by STI needs RFLAGS.IF = 1", src, intr=intr, rflags=rflags)
    if injecting and kind in (X.INTR_TYPE_EXT_INTR, X.INTR_TYPE_NMI):
        cc(bool(intr & 3), "no STI/MOV SS blocking when injecting an interrupt or NMI", src, intr=intr)
    cc(bool(intr & X.GUEST_INTR_STATE_SMI), "guest blocking by SMI is 0 outside SMM", src, intr=intr)
    if injecting and kind == X.INTR_TYPE_NMI:
        cc(bool(intr & X.GUEST_INTR_STATE_NMI), "no NMI blocking when injecting an NMI", src, intr=intr)
    pend = v12["guest_pending_dbg_exceptions"]
    cc(bool(pend & ~0x1500F), "guest pending debug exceptions reserved bits are 0", src, pending=pend)


def check_controls(v12: Mapping[str, int], caps: VmxCaps, maxphyaddr: int) -> CheckFailure | None:
    """Failure means VMfailValid(7)."""
    return run(_controls, v12, caps, maxphyaddr)


def check_eptp(eptp: int, caps: VmxCaps, maxphyaddr: int) -> CheckFailure | None:
    """KVM nested_vmx_check_eptp, for VM entry and for INVEPT's single-context descriptor."""
    return run(_eptp, eptp, caps, maxphyaddr)


def check_host_state(v12: Mapping[str, int], caps: VmxCaps, maxphyaddr: int, l1_lma: bool) -> CheckFailure | None:
    """Failure means VMfailValid(8)."""
    return run(_host, v12, caps, maxphyaddr, l1_lma)


def check_guest_state(v12: Mapping[str, int], caps: VmxCaps, run_pending: bool, maxphyaddr: int,
                      read_u32: Callable[[int], int | None]) -> tuple[CheckFailure, int] | None:
    """Failure means a VM-entry failure exit (reason 33) with the returned qualification;
    `read_u32` reads guest-physical memory (None where nothing backs it)."""
    f = run(_guest, v12, caps, run_pending, maxphyaddr, read_u32)
    if f is None:
        return None
    qual = X.ENTRY_FAIL_VMCS_LINK_PTR if f.name.startswith("VMCS link pointer") else X.ENTRY_FAIL_DEFAULT
    return f, qual


def _has_ept(v12: Mapping[str, int]) -> bool:
    return bool(v12["cpu_based_vm_exec_control"] & X.CPU_ACTIVATE_SECONDARY
                and v12["secondary_vm_exec_control"] & X.SEC_EPT)


def check_pdptes(v12: Mapping[str, int], maxphyaddr: int,
                 read_u64: Callable[[int], int | None]) -> CheckFailure | None:
    """KVM nested_vmx_load_cr3 -> load_pdptrs: with PAE paging (not IA-32e), each present
    PDPTE has no reserved bit set (SDM 4.4.1); with "enable EPT" they are the VMCS's
    GUEST_PDPTRn fields (SDM 27.3.1.6), else read through guest CR3. Failure: a VM-entry
    failure exit with qualification ENTRY_FAIL_PDPTE."""
    cr0, cr4 = v12["guest_cr0"], v12["guest_cr4"]
    if not cr0 & CR0_PG or not cr4 & CR4_PAE or v12["vm_entry_controls"] & X.ENTRY_IA32E_MODE:
        return None
    reserved = (((1 << 64) - 1) >> maxphyaddr << maxphyaddr) | 0x1E6   # 63:MAXPHYADDR, 8:5, 2:1
    base = v12["guest_cr3"] & 0xFFFFFFE0
    from_vmcs = _has_ept(v12)
    for i in range(4):
        pdpte = v12[f"guest_pdptr{i}"] if from_vmcs else read_u64(base + 8 * i)
        if pdpte is None or (pdpte & 1 and pdpte & reserved):
            return CheckFailure("guest PDPTEs have no reserved bits set (PAE paging)", "load_pdptrs",
                                {"index": i, "pdpte": pdpte or 0})
    return None
