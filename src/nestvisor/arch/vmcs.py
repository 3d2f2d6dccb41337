"""The VMCS as KVM lays it out in memory: struct vmcs12 (arch/x86/kvm/vmx/vmcs12.h).

One row per field: its name (KVM's vmcs12 member), its VMCS encoding (SDM Appendix B) and
its byte offset in the packed 998-byte struct. The width and the type come from the
encoding (SDM 25.11.2): bits 14:13 width, bits 11:10 type, bit 0 the high half of a
64-bit field. `RARE` is KVM's sync_vmcs02_to_vmcs12_rare set, copied from vmcs02 lazily.
"""

from __future__ import annotations

from dataclasses import dataclass

VMCS12_REVISION = 0x11E57ED0
VMCS12_SIZE = 0x1000
VMCS12_STRUCT_SIZE = 998

# Header words before the field area (struct vmcs_hdr, abort, launch_state)
OFF_REVISION = 0
OFF_ABORT = 4
OFF_LAUNCH_STATE = 8
SHADOW_VMCS_BIT = 1 << 31

WIDTH_16, WIDTH_64, WIDTH_32, WIDTH_NATURAL = 0, 1, 2, 3
TYPE_CONTROL, TYPE_READONLY, TYPE_GUEST, TYPE_HOST = 0, 1, 2, 3

_FIELDS: tuple[tuple[str, int, int], ...] = (
    # 64-bit control fields
    ("io_bitmap_a", 0x2000, 40), ("io_bitmap_b", 0x2002, 48), ("msr_bitmap", 0x2004, 56),
    ("vm_exit_msr_store_addr", 0x2006, 64), ("vm_exit_msr_load_addr", 0x2008, 72),
    ("vm_entry_msr_load_addr", 0x200A, 80), ("tsc_offset", 0x2010, 88),
    ("virtual_apic_page_addr", 0x2012, 96), ("apic_access_addr", 0x2014, 104),
    ("posted_intr_desc_addr", 0x2016, 112), ("ept_pointer", 0x201A, 120),
    ("eoi_exit_bitmap0", 0x201C, 128), ("eoi_exit_bitmap1", 0x201E, 136),
    ("eoi_exit_bitmap2", 0x2020, 144), ("eoi_exit_bitmap3", 0x2022, 152),
    ("xss_exit_bitmap", 0x202C, 160), ("guest_physical_address", 0x2400, 168),
    ("vmcs_link_pointer", 0x2800, 176), ("guest_ia32_debugctl", 0x2802, 184),
    ("guest_ia32_pat", 0x2804, 192), ("guest_ia32_efer", 0x2806, 200),
    ("guest_ia32_perf_global_ctrl", 0x2808, 208), ("guest_pdptr0", 0x280A, 216),
    ("guest_pdptr1", 0x280C, 224), ("guest_pdptr2", 0x280E, 232), ("guest_pdptr3", 0x2810, 240),
    ("guest_bndcfgs", 0x2812, 248), ("host_ia32_pat", 0x2C00, 256), ("host_ia32_efer", 0x2C02, 264),
    ("host_ia32_perf_global_ctrl", 0x2C04, 272), ("vmread_bitmap", 0x2026, 280),
    ("vmwrite_bitmap", 0x2028, 288), ("vm_function_control", 0x2018, 296),
    ("eptp_list_address", 0x2024, 304), ("pml_address", 0x200E, 312),
    ("encls_exiting_bitmap", 0x202E, 320), ("tsc_multiplier", 0x2032, 328),
    # natural-width fields
    ("cr0_guest_host_mask", 0x6000, 344), ("cr4_guest_host_mask", 0x6002, 352),
    ("cr0_read_shadow", 0x6004, 360), ("cr4_read_shadow", 0x6006, 368),
    ("exit_qualification", 0x6400, 408), ("guest_linear_address", 0x640A, 416),
    ("guest_cr0", 0x6800, 424), ("guest_cr3", 0x6802, 432), ("guest_cr4", 0x6804, 440),
    ("guest_es_base", 0x6806, 448), ("guest_cs_base", 0x6808, 456), ("guest_ss_base", 0x680A, 464),
    ("guest_ds_base", 0x680C, 472), ("guest_fs_base", 0x680E, 480), ("guest_gs_base", 0x6810, 488),
    ("guest_ldtr_base", 0x6812, 496), ("guest_tr_base", 0x6814, 504),
    ("guest_gdtr_base", 0x6816, 512), ("guest_idtr_base", 0x6818, 520),
    ("guest_dr7", 0x681A, 528), ("guest_rsp", 0x681C, 536), ("guest_rip", 0x681E, 544),
    ("guest_rflags", 0x6820, 552), ("guest_pending_dbg_exceptions", 0x6822, 560),
    ("guest_sysenter_esp", 0x6824, 568), ("guest_sysenter_eip", 0x6826, 576),
    ("host_cr0", 0x6C00, 584), ("host_cr3", 0x6C02, 592), ("host_cr4", 0x6C04, 600),
    ("host_fs_base", 0x6C06, 608), ("host_gs_base", 0x6C08, 616), ("host_tr_base", 0x6C0A, 624),
    ("host_gdtr_base", 0x6C0C, 632), ("host_idtr_base", 0x6C0E, 640),
    ("host_ia32_sysenter_esp", 0x6C10, 648), ("host_ia32_sysenter_eip", 0x6C12, 656),
    ("host_rsp", 0x6C14, 664), ("host_rip", 0x6C16, 672),
    ("host_s_cet", 0x6C18, 680), ("host_ssp", 0x6C1A, 688), ("host_ssp_tbl", 0x6C1C, 696),
    ("guest_s_cet", 0x6828, 704), ("guest_ssp", 0x682A, 712), ("guest_ssp_tbl", 0x682C, 720),
    # 32-bit fields
    ("pin_based_vm_exec_control", 0x4000, 744), ("cpu_based_vm_exec_control", 0x4002, 748),
    ("exception_bitmap", 0x4004, 752), ("page_fault_error_code_mask", 0x4006, 756),
    ("page_fault_error_code_match", 0x4008, 760), ("cr3_target_count", 0x400A, 764),
    ("vm_exit_controls", 0x400C, 768), ("vm_exit_msr_store_count", 0x400E, 772),
    ("vm_exit_msr_load_count", 0x4010, 776), ("vm_entry_controls", 0x4012, 780),
    ("vm_entry_msr_load_count", 0x4014, 784), ("vm_entry_intr_info_field", 0x4016, 788),
    ("vm_entry_exception_error_code", 0x4018, 792), ("vm_entry_instruction_len", 0x401A, 796),
    ("tpr_threshold", 0x401C, 800), ("secondary_vm_exec_control", 0x401E, 804),
    ("vm_instruction_error", 0x4400, 808), ("vm_exit_reason", 0x4402, 812),
    ("vm_exit_intr_info", 0x4404, 816), ("vm_exit_intr_error_code", 0x4406, 820),
    ("idt_vectoring_info_field", 0x4408, 824), ("idt_vectoring_error_code", 0x440A, 828),
    ("vm_exit_instruction_len", 0x440C, 832), ("vmx_instruction_info", 0x440E, 836),
    ("guest_es_limit", 0x4800, 840), ("guest_cs_limit", 0x4802, 844), ("guest_ss_limit", 0x4804, 848),
    ("guest_ds_limit", 0x4806, 852), ("guest_fs_limit", 0x4808, 856), ("guest_gs_limit", 0x480A, 860),
    ("guest_ldtr_limit", 0x480C, 864), ("guest_tr_limit", 0x480E, 868),
    ("guest_gdtr_limit", 0x4810, 872), ("guest_idtr_limit", 0x4812, 876),
    ("guest_es_ar_bytes", 0x4814, 880), ("guest_cs_ar_bytes", 0x4816, 884),
    ("guest_ss_ar_bytes", 0x4818, 888), ("guest_ds_ar_bytes", 0x481A, 892),
    ("guest_fs_ar_bytes", 0x481C, 896), ("guest_gs_ar_bytes", 0x481E, 900),
    ("guest_ldtr_ar_bytes", 0x4820, 904), ("guest_tr_ar_bytes", 0x4822, 908),
    ("guest_interruptibility_info", 0x4824, 912), ("guest_activity_state", 0x4826, 916),
    ("guest_sysenter_cs", 0x482A, 920), ("host_ia32_sysenter_cs", 0x4C00, 924),
    ("vmx_preemption_timer_value", 0x482E, 928),
    # 16-bit fields
    ("virtual_processor_id", 0x0000, 960), ("posted_intr_nv", 0x0002, 962),
    ("guest_es_selector", 0x0800, 964), ("guest_cs_selector", 0x0802, 966),
    ("guest_ss_selector", 0x0804, 968), ("guest_ds_selector", 0x0806, 970),
    ("guest_fs_selector", 0x0808, 972), ("guest_gs_selector", 0x080A, 974),
    ("guest_ldtr_selector", 0x080C, 976), ("guest_tr_selector", 0x080E, 978),
    ("guest_intr_status", 0x0810, 980), ("host_es_selector", 0x0C00, 982),
    ("host_cs_selector", 0x0C02, 984), ("host_ss_selector", 0x0C04, 986),
    ("host_ds_selector", 0x0C06, 988), ("host_fs_selector", 0x0C08, 990),
    ("host_gs_selector", 0x0C0A, 992), ("host_tr_selector", 0x0C0C, 994),
    ("guest_pml_index", 0x0812, 996),
)

# KVM sync_vmcs02_to_vmcs12_rare: segment state other than CS/SS AR bytes, descriptor
# tables, pending debug exceptions.
RARE: frozenset[str] = frozenset(
    [f"guest_{s}_selector" for s in ("es", "cs", "ss", "ds", "fs", "gs", "ldtr", "tr")]
    + [f"guest_{s}_limit" for s in ("es", "cs", "ss", "ds", "fs", "gs", "ldtr", "tr", "gdtr", "idtr")]
    + [f"guest_{s}_ar_bytes" for s in ("es", "ds", "fs", "gs", "ldtr", "tr")]
    + [f"guest_{s}_base" for s in ("es", "cs", "ss", "ds", "fs", "gs", "ldtr", "tr", "gdtr", "idtr")]
    + ["guest_pending_dbg_exceptions"])
# KVM is_vmcs12_ext_field: a VMREAD of one of these first runs the rare sync.
EXT: frozenset[str] = RARE | {"guest_bndcfgs"}

# KVM vmcs_shadow_fields.h: the fields KVM shadows for L1. A VMWRITE to any other field
# dirties vmcs12 and first runs the rare sync (handle_vmwrite).
SHADOW_RW: frozenset[str] = frozenset((
    "guest_intr_status", "guest_pml_index", "host_fs_selector", "host_gs_selector",
    "cpu_based_vm_exec_control", "pin_based_vm_exec_control", "exception_bitmap",
    "vm_entry_exception_error_code", "vm_entry_intr_info_field", "vm_entry_instruction_len",
    "tpr_threshold", "guest_interruptibility_info", "vmx_preemption_timer_value", "guest_rip",
    "guest_rsp", "guest_cr0", "guest_cr3", "guest_cr4", "guest_rflags", "cr0_guest_host_mask",
    "cr0_read_shadow", "cr4_read_shadow", "host_fs_base", "host_gs_base"))
SHADOW_RO: frozenset[str] = frozenset((
    "vm_exit_reason", "vm_exit_intr_info", "vm_exit_instruction_len", "idt_vectoring_info_field",
    "idt_vectoring_error_code", "vm_exit_intr_error_code", "guest_cs_ar_bytes", "guest_ss_ar_bytes",
    "exit_qualification", "guest_linear_address", "guest_physical_address"))

# SDM 25.4.1: VMWRITE keeps only the defined bits of an access-rights field
AR_BYTES_MASK = 0x1F0FF


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    encoding: int
    offset: int
    size: int        # bytes in vmcs12 (natural width is stored as 8)
    width: int       # WIDTH_*
    type: int        # TYPE_*
    rare: bool
    ext: bool


def width_of(encoding: int) -> int:
    """SDM 25.11.2: bits 14:13 of the encoding."""
    return (encoding >> 13) & 3


def type_of(encoding: int) -> int:
    """SDM 25.11.2: bits 11:10 of the encoding."""
    return (encoding >> 10) & 3


def vmcs_field_index(encoding: int) -> int:
    """KVM's vmcs12 table index: ROL16(encoding, 6)."""
    return ((encoding << 6) | (encoding >> 10)) & 0xFFFF


def _make(name: str, encoding: int, offset: int) -> Field:
    width = width_of(encoding)
    size = {WIDTH_16: 2, WIDTH_32: 4, WIDTH_64: 8, WIDTH_NATURAL: 8}[width]
    return Field(name, encoding, offset, size, width, type_of(encoding), name in RARE, name in EXT)


FIELDS: tuple[Field, ...] = tuple(_make(*row) for row in _FIELDS)
BY_ENCODING: dict[int, Field] = {f.encoding: f for f in FIELDS}
BY_NAME: dict[str, Field] = {f.name: f for f in FIELDS}
ENC: dict[str, int] = {f.name: f.encoding for f in FIELDS}


def lookup(encoding: int) -> tuple[Field, bool] | None:
    """The field an encoding names and whether it is the high half of a 64-bit field (KVM
    get_vmcs12_field_offset: bit 15 and above set, or no field, is unsupported)."""
    if encoding >> 15:
        return None
    f = BY_ENCODING.get(encoding)
    if f is not None:
        return f, False
    f = BY_ENCODING.get(encoding & ~1)
    if f is not None and f.width == WIDTH_64 and encoding & 1:
        return f, True
    return None


def vmcs_enum() -> int:
    """IA32_VMX_VMCS_ENUM as KVM computes it: the highest field index << 1
    (nested_vmx_calc_vmcs_enum_msr)."""
    return max((f.encoding >> 1) & 0x1FF for f in FIELDS) << 1
