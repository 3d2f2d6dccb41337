"""Nested VMX: the bundled L1 hypervisor (vmxtest, vmxdemo) on the vmx profile, the vmcs12
layout, the capability MSRs and the decoding of VMX instructions."""

from __future__ import annotations

import dataclasses
import shutil

import pytest

from nestvisor import Kvm
from nestvisor.arch import vmcs as V
from nestvisor.arch import vmx as X
from nestvisor.cpu.decode import Op, decode
from nestvisor.guests import tap
from nestvisor.guests.build import build
from nestvisor.kvm.vmx.checks import check_eptp
from nestvisor.kvm.vmx.nested import NestedVmx
from nestvisor.kvm.vmx.vmcs12 import Vmcs12
from nestvisor.platform.machine import Machine

needs_as = pytest.mark.skipif(shutil.which("as") is None, reason="needs GNU binutils")


def _run(name: str, eager: bool = False) -> tuple[Machine, str, object]:
    out = bytearray()
    m = Machine(build(name), serial_out=out.extend)
    m.vcpus[0].nested.eager_sync = eager
    result = m.run(max_instructions=500_000_000)
    return m, out.decode(), result


@needs_as
def test_vmxtest_guest_passes():
    m, text, result = _run("vmxtest")
    parsed = tap.parse(text)
    assert parsed.complete and not parsed.failed, text
    assert len(parsed.tests) == 37
    assert result.status == 1, text
    stats = m.vcpus[0].nested.stats
    # every nested exit the guest caused, by reason (SDM Appendix C numbers, as L1 saw them)
    assert stats["exit_CPUID"] == 20   # 10 without EPT, 10 under an identity EPT
    for reason in ("IO_INSTRUCTION", "HLT", "MSR_READ", "CR_ACCESS", "EXCEPTION_NMI",
                   "EXTERNAL_INTERRUPT", "TRIPLE_FAULT", "INVALID_STATE", "INTERRUPT_WINDOW", "INVD", "PREEMPTION_TIMER",
                   "INVEPT", "INVVPID"):
        assert stats[f"exit_{reason}"] >= 1, reason
    # under L1's EPT: a page past the map and a read-only page; write-only and memory type 7
    assert stats["exit_EPT_VIOLATION"] == 2 and stats["exit_EPT_MISCONFIG"] == 2
    # in L1: 8 in the INVEPT test, 14 by the EPT tests; two of the INVVPIDs fault (#GP, #SS)
    assert stats["INVEPT"] == 22 and stats["INVVPID"] == 13


@needs_as
def test_failed_entry_checks_are_traced_with_values():
    m, text, _ = _run("vmxtest")
    failed = [f for name, f in m.vm.trace_log if name == "kvm_nested_vmenter_failed"]
    by_check = {f["check"]: f for f in reversed(failed)}   # the first of each
    pin = by_check["pin-based controls allowed by IA32_VMX_TRUE_PINBASED_CTLS"]
    assert pin["source"] == "nested_check_vm_execution_controls"
    assert pin["values"]["pin"] & (1 << 20)
    host = by_check["host_cr0 satisfies IA32_VMX_CR0_FIXED0/1"]
    assert not host["values"]["host_cr0"] & (1 << 5)
    assert by_check["guest activity state is active or HLT"]["values"] == {"activity": 2}
    assert by_check["enable VPID needs a VPID other than 0"]["source"] == "nested_check_vm_execution_controls"
    memtype = by_check["EPTP memory type is UC or WB as IA32_VMX_EPT_VPID_CAP allows"]
    assert memtype["source"] == "nested_vmx_check_eptp" and memtype["values"]["memtype"] == 1
    assert by_check["EPTP reserved bits 11:7 and 63:MAXPHYADDR are 0"]["values"]["eptp"] & (1 << 7)
    exits = [f for name, f in m.vm.trace_log if name == "kvm_nested_vmexit"]
    assert {"reason": 0x80000021, "qual": 0, "vcpu": 0} in exits


@needs_as
def test_lazy_and_eager_sync_give_the_same_run():
    m_lazy, text_lazy, r_lazy = _run("vmxdemo", eager=False)
    m_eager, text_eager, r_eager = _run("vmxdemo", eager=True)
    assert text_lazy == text_eager and "vmxdemo:   CPUID 400" in text_lazy
    assert r_lazy.clock == r_eager.clock and r_lazy.status == r_eager.status == 1
    lazy, eager = m_lazy.vcpus[0].nested.stats, m_eager.vcpus[0].nested.stats
    assert lazy["exits"] == eager["exits"] == 1217
    # L1 reads a rare field only at its 9 VMCALL exits: only those sync the rare fields
    assert lazy["rare_syncs"] == 9 and eager["rare_syncs"] == 1217
    assert lazy["fields_copied"] + lazy["fields_copied_rare"] < eager["fields_copied"]
    # vmcs02 is loaded in full at VMLAUNCH only: L1 then changes just RIP between exits
    assert lazy["vmcs02_full_loads"] == 1 and lazy["vmcs02_partial_loads"] == 1216


def test_vmcs12_layout_is_kvms():
    assert len(V.FIELDS) == 147
    assert max(f.offset + f.size for f in V.FIELDS) == V.VMCS12_STRUCT_SIZE == 998
    spans = sorted((f.offset, f.offset + f.size) for f in V.FIELDS)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert V.BY_NAME["guest_rip"].offset == 544 and V.BY_NAME["guest_pml_index"].offset == 996
    assert V.vmcs_field_index(0x681E) == 0x079A   # ROL16(GUEST_RIP, 6)
    assert V.lookup(0x2011) == (V.BY_NAME["tsc_offset"], True)
    assert V.lookup(0x6008) is None and V.lookup(0x18000) is None
    assert V.vmcs_enum() == 0x32
    v = Vmcs12()
    v["guest_cs_ar_bytes"] = 0xA09B
    assert v.data[884:888] == (0xA09B).to_bytes(4, "little")


def test_vmx_capability_msrs_are_consistent():
    vcpu = Kvm().create_vm().create_vcpu(0)
    msr = vcpu.get_msrs(list(range(X.IA32_VMX_BASIC, X.IA32_VMX_VMFUNC + 1)))
    assert msr[X.IA32_VMX_BASIC] & 0x7FFFFFFF == V.VMCS12_REVISION
    assert msr[X.IA32_VMX_BASIC] & X.BASIC_TRUE_CTLS
    for ctl, true in ((X.IA32_VMX_PINBASED_CTLS, X.IA32_VMX_TRUE_PINBASED_CTLS),
                      (X.IA32_VMX_PROCBASED_CTLS, X.IA32_VMX_TRUE_PROCBASED_CTLS),
                      (X.IA32_VMX_EXIT_CTLS, X.IA32_VMX_TRUE_EXIT_CTLS),
                      (X.IA32_VMX_ENTRY_CTLS, X.IA32_VMX_TRUE_ENTRY_CTLS)):
        low, high = msr[ctl] & 0xFFFFFFFF, msr[ctl] >> 32
        tlow, thigh = msr[true] & 0xFFFFFFFF, msr[true] >> 32
        assert low & ~high == 0 and tlow & ~low == 0 and thigh == high
    # only the secondary controls that are implemented
    assert msr[X.IA32_VMX_PROCBASED_CTLS2] >> 32 == (X.SEC_EPT | X.SEC_RDTSCP | X.SEC_VPID | X.SEC_WBINVD_EXITING
                                                     | X.SEC_UNRESTRICTED_GUEST | X.SEC_SHADOW_VMCS)
    # 4-level EPT with WB/UC roots, 2M/1G pages, execute-only, A/D; every INVEPT and INVVPID type
    assert msr[X.IA32_VMX_EPT_VPID_CAP] == 0x00000F0106334141
    assert msr[X.IA32_VMX_CR0_FIXED0] == 0x80000021 and msr[X.IA32_VMX_CR4_FIXED0] == 0x2000
    assert msr[X.IA32_VMX_CR4_FIXED1] & 0x2000


_EPTP = 0x1000 | 6 | (3 << 3)   # WB, 4-level


@pytest.mark.parametrize("eptp, check", [
    (_EPTP, None),
    (_EPTP | (1 << 6), None),                                          # A/D flags are offered
    (_EPTP & ~7, None),                                                # UC
    (_EPTP & ~7 | 1, "EPTP memory type is UC or WB as IA32_VMX_EPT_VPID_CAP allows"),
    (_EPTP & ~7 | 7, "EPTP memory type is UC or WB as IA32_VMX_EPT_VPID_CAP allows"),
    (_EPTP & ~0x38 | (4 << 3), "EPTP page-walk length is one IA32_VMX_EPT_VPID_CAP allows"),   # 5-level
    (_EPTP & ~0x38, "EPTP page-walk length is one IA32_VMX_EPT_VPID_CAP allows"),
    (_EPTP | (1 << 11), "EPTP reserved bits 11:7 and 63:MAXPHYADDR are 0"),
    (_EPTP | (1 << 63), "EPTP reserved bits 11:7 and 63:MAXPHYADDR are 0"),
])
def test_eptp_checks(eptp, check):
    caps = Kvm().create_vm().create_vcpu(0).nested.caps
    failure = check_eptp(eptp, caps, 40)
    assert (failure and failure.name) == check
    if failure is not None:
        assert failure.source == "nested_vmx_check_eptp" and failure.values["eptp"] == eptp


def test_eptp_ad_needs_the_capability():
    caps = Kvm().create_vm().create_vcpu(0).nested.caps
    without_ad = dataclasses.replace(caps, ept_vpid=caps.ept_vpid & ~X.EPT_CAP_AD)
    assert check_eptp(_EPTP | (1 << 6), without_ad, 40).name == "EPTP A/D enable needs EPT A/D flags in IA32_VMX_EPT_VPID_CAP"


def test_vmx_msrs_absent_without_vmx():
    vcpu = Kvm(profile="svm").create_vm().create_vcpu(0)
    assert not isinstance(vcpu.nested, NestedVmx)
    assert vcpu.get_msrs([X.IA32_VMX_BASIC]) == {}


@pytest.mark.parametrize("code, bits, op, length", [
    ("f30fc73424", 64, Op.VMXON, 5),          # vmxon (%rsp)
    ("660fc735aabb0000", 64, Op.VMCLEAR, 8),  # vmclear disp32(%rip)
    ("0fc735aabb0000", 64, Op.VMPTRLD, 7),
    ("0fc73f", 64, Op.VMPTRST, 3),
    ("480f78c3", 64, Op.VMREAD, 4),
    ("0f79d8", 32, Op.VMWRITE, 3),
    ("660f388008", 64, Op.INVEPT, 5),
    ("0f01c2", 64, Op.VMLAUNCH, 3),
    ("0f01c3", 64, Op.VMRESUME, 3),
    ("0f01c4", 64, Op.VMXOFF, 3),
])
def test_vmx_instructions_decode(code, bits, op, length):
    insn = decode(bytes.fromhex(code), bits)
    assert insn is not None and insn.op == op and insn.length == length


def test_vmread_register_operands():
    insn = decode(bytes.fromhex("4c0f78c3"), 64)   # vmread %r8, %rbx: field in r8, value to rbx
    assert insn.reg == 8 and insn.rm == 3 and insn.mem is None


@needs_as
def test_l1_and_l2_share_the_sse_state():
    # VM entry and exit switch neither x87/SSE nor XCR0 (SDM 26.3, 27.5): what L2 leaves in
    # XMM3 is what L1 finds after the next nested exit
    from unicorn import x86_const as UX
    m = Machine(build("vmxdemo"), serial_out=lambda b: None)
    vcpu = m.vcpus[0]
    limit = 0
    while not vcpu.nested.guest_mode:
        limit += 97
        m.run(max_instructions=limit)
    value = 0x0123456789ABCDEF_FEDCBA9876543210
    vcpu.ctx.uc.reg_write(UX.UC_X86_REG_XMM3, value)
    while vcpu.nested.guest_mode:
        limit += 7
        m.run(max_instructions=limit)
    assert vcpu.ctx is vcpu.ctx01 and vcpu.ctx01.uc.reg_read(UX.UC_X86_REG_XMM3) == value
