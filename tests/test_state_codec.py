"""The nested-state codecs without a VM: kvm_nested_state round trips, svm-v2 and its
conversions, field-by-name decoding, and every SET rule fired alone from a valid default
(KVM selftests' nested_set_state_test style), with a meta-test that no rule is left out."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import state_blobs as B
from hypothesis import given, settings
from hypothesis import strategies as st

from nestvisor.arch import kvm_uapi as U
from nestvisor.arch import svm as S
from nestvisor.arch import vmcs as V
from nestvisor.state import fields as F
from nestvisor.state import nested_state as NS
from nestvisor.state import svm_v2 as V2

ALL_RULES = (NS.GENERIC_RULES, NS.VMX_RULES, NS.SVM_RULES, NS.SVM_STATE_RULES, V2.SVM_V2_RULES)
U64 = st.integers(0, 2**64 - 1)


def _sized(raw: bytes) -> bytes:
    """`raw` with its size field telling its true length (what every GET writes)."""
    return raw[:4] + len(raw).to_bytes(4, "little") + raw[8:]


# ---- kvm_nested_state ----------------------------------------------------------------------

@settings(max_examples=200)
@given(st.binary(min_size=NS.HEADER_SIZE, max_size=NS.VMX_MAX_SIZE + 64).map(_sized))
def test_encode_decode_is_byte_exact_for_every_size(blob: bytes) -> None:
    assert NS.NestedState.decode(blob).encode() == blob


@given(st.binary(min_size=NS.HEADER_SIZE, max_size=NS.VMX_MAX_SIZE), st.booleans(), st.booleans(),
       st.booleans(), st.integers(1, 64))
def test_violations_never_raise(blob: bytes, vmx: bool, smm: bool, svme: bool, maxphyaddr: int) -> None:
    facts = NS.VcpuFacts(has_vmx=vmx, has_svm=not vmx, in_smm=smm, efer_svme=svme, maxphyaddr=maxphyaddr)
    ns = NS.NestedState.decode(blob)
    for rules in ALL_RULES:
        assert all(v.errno for v in NS.violations(rules, ns, facts))
        NS.first_violation(rules, ns, facts)


def test_a_short_blob_is_a_value_error_with_the_sizes() -> None:
    with pytest.raises(ValueError, match="127 bytes"):
        NS.NestedState.decode(bytes(127))


# ---- svm-v2 --------------------------------------------------------------------------------

def _kvm_blob(flags: int, vmcb_pa: int, gpat: int, control: bytes, save: bytes) -> bytes:
    ns = NS.NestedState(format=U.KVM_STATE_NESTED_FORMAT_SVM, size=NS.SVM_MAX_SIZE, flags=flags)
    ns.vmcb_pa, ns.gpat = vmcb_pa, gpat
    return ns.with_data(NS.SVM_CONTROL_OFFSET, control).with_data(NS.SVM_SAVE_OFFSET, save).encode()


@settings(max_examples=100)
@given(st.integers(0, 0xFFFF), U64, U64, st.binary(min_size=S.CONTROL_SIZE, max_size=S.CONTROL_SIZE),
       st.binary(min_size=S.SAVE_SIZE, max_size=S.SAVE_SIZE), st.binary(min_size=S.SAVE_SIZE, max_size=S.SAVE_SIZE))
def test_v2_conversion_round_trips(flags: int, vmcb_pa: int, gpat: int, control: bytes, l1: bytes,
                                   l2: bytes) -> None:
    kvm = _kvm_blob(flags, vmcb_pa, gpat, control, l1)
    v2 = V2.kvm_to_v2(kvm, l2)
    assert len(v2) == V2.V2_SIZE
    assert V2.v2_to_kvm(v2) == (kvm, l2)
    assert V2.kvm_to_v2(*V2.v2_to_kvm(v2)) == v2
    assert NS.NestedState.decode(v2).encode() == v2


@given(st.integers(0, 0xFFFF), U64, U64)
def test_v2_header_only_round_trips(flags: int, vmcb_pa: int, gpat: int) -> None:
    ns = NS.NestedState(format=U.KVM_STATE_NESTED_FORMAT_SVM, flags=flags)
    ns.vmcb_pa, ns.gpat = vmcb_pa, gpat
    kvm = ns.encode()
    v2 = V2.kvm_to_v2(kvm, b"")
    assert len(v2) == NS.HEADER_SIZE and V2.version(v2) == V2.VERSION
    assert V2.v2_to_kvm(v2) == (kvm, b"")


def test_v2_layout_offsets_and_contents() -> None:
    v2 = B.v2_guest().encode()
    assert v2[2:4] == V2.KVM_STATE_NESTED_FORMAT_SVM_V2.to_bytes(2, "little")
    assert V2.area_sizes(v2) == (1024, 744)
    assert v2[V2.VMCB12_SAVE_OFFSET:V2.VMCB01_SAVE_OFFSET] == B.L2_SAVE
    assert v2[V2.VMCB01_SAVE_OFFSET:V2.L1_REGS_OFFSET] == B.L1_SAVE
    assert V2.l1_regs(v2) == {"cr0": 0x80000011, "cr3": 0x5000, "cr4": 0x20, "efer": 0x1D00}


def test_v2_to_kvm_writes_the_guest_visible_registers_into_kvms_save_area() -> None:
    # vmcb01 may hold other CR0/EFER than L1 sees; KVM's format has room for L1's view only
    v2 = B.put(B.v2_guest(), V2.L1_REGS_OFFSET, 8, 0x80050033).encode()
    kvm, _ = V2.v2_to_kvm(v2)
    assert NS.svm_save_u(NS.NestedState.decode(kvm), "cr0") == 0x80050033
    assert int.from_bytes(v2[V2.VMCB01_SAVE_OFFSET + S.SAVE["cr0"][0]:][:8], "little") == 0x80000011


@pytest.mark.parametrize("mutate, path", [
    (lambda b: b[:2] + b"\0\0" + b[4:], "format"),
    (lambda b: b[:40] + b"\1" + b[41:], "hdr.svm"),
    (lambda b: b[:4000] + b"\1" + b[4001:], "data.svm.vmcb12"),
    (lambda b: b[:4] + (4000).to_bytes(4, "little") + b[8:4000], "size"),
    (lambda b: b + b"\0", "size"),
])
def test_kvm_to_v2_refuses_what_it_cannot_carry(mutate: Callable[[bytes], bytes], path: str) -> None:
    with pytest.raises(ValueError, match=f"^{path}:"):
        V2.kvm_to_v2(mutate(B.svm_guest().encode()), B.L2_SAVE)


def test_kvm_to_v2_needs_the_l2_save_area() -> None:
    with pytest.raises(ValueError, match="^l2_save: 0 bytes"):
        V2.kvm_to_v2(B.svm_guest().encode(), b"")


@pytest.mark.parametrize("offset, value, path", [
    (V2.V2_HDR_OFFSET, 2, "hdr.svm_v2.version"),
    (V2.V2_HDR_OFFSET + 4, 1023, "hdr.svm_v2"),
    (V2.V2_RESERVED_OFFSET, 1, "hdr.svm_v2"),
    (2, 1, "format"),
])
def test_v2_to_kvm_refuses_other_layouts(offset: int, value: int, path: str) -> None:
    v2 = B.put(B.v2_guest(), offset, 2, value).encode()
    with pytest.raises(ValueError, match=f"^{path}"):
        V2.v2_to_kvm(v2)


# ---- fields by name ------------------------------------------------------------------------

def test_vmx_fields_by_name_only_where_the_areas_are() -> None:
    off = F.by_path(B.vmx_off().encode())
    assert off["hdr.vmx.vmcs12_pa"] == NS.INVALID_GPA and off["size"] == 128
    assert not any(p.startswith("vmcs12.") for p in off)
    root = F.by_path(B.vmx_root().encode())
    assert root["vmcs12.guest_rip"] == 0x401000 and root["vmcs12.hdr"] == V.VMCS12_REVISION
    assert all(f"vmcs12.{f.name}" in root for f in V.FIELDS)
    assert not any(p.startswith("shadow_vmcs12.") for p in root)
    guest = F.by_path(B.vmx_guest().encode())
    assert guest["shadow_vmcs12.hdr"] == V.VMCS12_REVISION | V.SHADOW_VMCS_BIT


def test_vmx_with_the_struct_alone_decodes_vmcs12() -> None:
    ns = B.vmx_root()
    ns.size = NS.HEADER_SIZE + NS.VMCS12_STRUCT_SIZE     # what SET needs: sizeof(struct vmcs12)
    assert F.by_path(ns.encode())["vmcs12.guest_pml_index"] == 0


def test_svm_and_v2_fields_by_name() -> None:
    svm = F.by_path(B.svm_guest().encode())
    assert svm["vmcb12.control.exit_code"] == S.EXIT["CPUID"] and svm["vmcb01.save.rip"] == 0x1234
    assert svm["vmcb01.save.cs.selector"] == 0 and svm["hdr.svm.vmcb_pa"] == B.VMCB_PA
    assert all(f"vmcb12.control.{name}" in svm for name, _, _ in S.CONTROL_FIELDS)
    assert F.by_path(B.svm_outside().encode()).keys() == {"flags", "format", "size", "hdr.svm.vmcb_pa",
                                                         "hdr.svm.gpat"}
    v2 = F.by_path(B.v2_guest().encode())
    assert v2["vmcb12.save.rip"] == 0x9000 and v2["vmcb01.save.rip"] == 0x1234
    assert v2["l1.efer"] == 0x1D00 and v2["hdr.svm_v2.version"] == 1
    assert isinstance(v2["vmcb12.control.insn_bytes"], bytes)


def test_field_offsets_cover_each_area_without_overlap() -> None:
    for rows, size in ((F.CONTROL_ROWS, S.CONTROL_SIZE), (F.SAVE_ROWS, S.SAVE_SIZE)):
        end = 0
        for _, off, width in rows:
            assert off == end
            end = off + width
        assert end == size


@pytest.mark.parametrize("blob, message", [
    (bytes(100), "truncated: 100 bytes"),
    (B.vmx_root().encode()[:2000], "truncated: size says 4224"),
    (bytes.fromhex("00000700") + (128).to_bytes(4, "little") + bytes(120), "format: 0x7"),
    (bytes(4) + (100).to_bytes(4, "little") + bytes(120), "size: 100 is smaller"),
])
def test_undecodable_blobs_are_one_sentence(blob: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        F.decode(blob)


@given(st.binary(min_size=0, max_size=5000))
def test_decode_raises_only_value_error(blob: bytes) -> None:
    try:
        F.decode(blob)
    except ValueError:
        pass


def test_diff_names_changed_fields() -> None:
    a = B.vmx_guest()
    b = B.put_vmcs12(a, "guest_rip", 0x402000)
    b.vmcs12_pa = 0x14000
    assert F.diff(a.encode(), b.encode()) == [("hdr.vmx.vmcs12_pa", B.VMCS12_PA, 0x14000),
                                              ("vmcs12.guest_rip", 0x401000, 0x402000)]
    gone = F.diff(B.vmx_guest().encode(), B.vmx_off().encode())
    assert ("vmcs12.guest_rip", 0x401000, None) in gone


# ---- every SET rule alone, from a valid default ---------------------------------------------

Mutation = Callable[[NS.NestedState], NS.NestedState]


def _set(**changes: int) -> Mutation:
    def mutate(ns: NS.NestedState) -> NS.NestedState:
        for name, value in changes.items():
            setattr(ns, name, value)
        return ns
    return mutate


def _at(offset: int, size: int, value: int) -> Mutation:
    return lambda ns: B.put(ns, offset, size, value)


def _same(ns: NS.NestedState) -> NS.NestedState:
    return ns


_SMM = NS.VcpuFacts(has_vmx=True, in_smm=True)
_V2_L2_CR0 = V2.VMCB12_SAVE_OFFSET + S.SAVE["cr0"][0]
_V2_L1_RFLAGS = V2.VMCB01_SAVE_OFFSET + S.SAVE["rflags"][0]

# (rule table, index, default blob, facts, the one change); the facts are a change too when
# the rule is about the vCPU rather than the blob
CASES: list[tuple[tuple[NS.Rule, ...], int, Callable[[], NS.NestedState], NS.VcpuFacts, Mutation]] = [
    (NS.GENERIC_RULES, 0, B.vmx_off, B.VMX_FACTS, _set(size=100)),
    (NS.GENERIC_RULES, 1, B.vmx_off, B.VMX_FACTS, _set(flags=0x1000)),
    (NS.GENERIC_RULES, 2, B.vmx_guest, B.VMX_FACTS, _set(flags=U.KVM_STATE_NESTED_RUN_PENDING)),
    (NS.VMX_RULES, 0, B.vmx_root, B.VMX_FACTS, _set(format=U.KVM_STATE_NESTED_FORMAT_SVM)),
    (NS.VMX_RULES, 1, B.vmx_off, _SMM, _set(smm_flags=U.KVM_STATE_NESTED_SMM_VMXON)),
    (NS.VMX_RULES, 2, B.vmx_off, B.VMX_FACTS, _set(vmcs12_pa=B.VMCS12_PA)),
    (NS.VMX_RULES, 3, B.vmx_off, B.VMX_FACTS, _set(flags=B.GIF)),
    (NS.VMX_RULES, 4, B.vmx_guest, NS.VcpuFacts(), _same),
    (NS.VMX_RULES, 5, B.vmx_guest, B.VMX_FACTS, _set(vmxon_pa=B.VMXON_PA | 0x10)),
    # SMM_GUEST_MODE with GUEST_MODE is also "SMM flags outside SMM" or "guest mode in SMM",
    # whichever the vCPU is: the rule KVM stops at is this one (first_violation)
    (NS.VMX_RULES, 6, B.vmx_guest, B.VMX_FACTS, _set(smm_flags=U.KVM_STATE_NESTED_SMM_GUEST_MODE
                                                      | U.KVM_STATE_NESTED_SMM_VMXON)),
    (NS.VMX_RULES, 7, B.vmx_root, _SMM, _set(smm_flags=0x4)),
    (NS.VMX_RULES, 8, B.vmx_guest, B.VMX_FACTS, _set(vmx_flags=0x2)),
    (NS.VMX_RULES, 9, B.vmx_guest, _SMM, _same),
    (NS.VMX_RULES, 10, B.vmx_root, B.VMX_FACTS, _set(smm_flags=U.KVM_STATE_NESTED_SMM_VMXON)),
    (NS.VMX_RULES, 11, B.vmx_root, _SMM, _set(smm_flags=U.KVM_STATE_NESTED_SMM_GUEST_MODE)),
    (NS.VMX_RULES, 12, B.vmx_guest, B.VMX_FACTS, _set(flags=B.GM | U.KVM_STATE_NESTED_EVMCS)),
    (NS.VMX_RULES, 13, B.vmx_root, B.VMX_FACTS, _set(size=NS.HEADER_SIZE + NS.VMCS12_STRUCT_SIZE - 1)),
    (NS.VMX_RULES, 14, B.vmx_root, B.VMX_FACTS, _set(vmcs12_pa=B.VMXON_PA)),
    (NS.VMX_RULES, 15, B.vmx_root, B.VMX_FACTS, _set(vmcs12_pa=NS.INVALID_GPA)),
    (NS.VMX_RULES, 16, B.vmx_root, B.VMX_FACTS, _at(NS.VMX_VMCS12_OFFSET, 4, 0x11E57ED1)),
    (NS.VMX_RULES, 17, B.vmx_guest, B.VMX_FACTS, _set(size=NS.VMX_SHADOW_OFFSET + NS.VMCS12_STRUCT_SIZE - 1)),
    (NS.VMX_RULES, 18, B.vmx_guest, B.VMX_FACTS, _at(NS.VMX_SHADOW_OFFSET, 4, V.VMCS12_REVISION)),
    (NS.SVM_RULES, 0, B.svm_guest, B.SVM_FACTS, _set(format=U.KVM_STATE_NESTED_FORMAT_VMX)),
    (NS.SVM_RULES, 1, B.svm_outside, B.SVM_FACTS, _set(flags=B.GIF | U.KVM_STATE_NESTED_MTF_PENDING)),
    (NS.SVM_RULES, 2, B.svm_guest, dataclasses.replace(B.SVM_FACTS, efer_svme=False), _same),
    (NS.SVM_RULES, 3, B.svm_guest, dataclasses.replace(B.SVM_FACTS, in_smm=True), _same),
    (NS.SVM_RULES, 4, B.svm_guest, B.SVM_FACTS, _set(vmxon_pa=B.VMCB_PA + 8)),
    (NS.SVM_RULES, 5, B.svm_guest, B.SVM_FACTS, _set(size=NS.SVM_MAX_SIZE - 1)),
    (NS.SVM_STATE_RULES, 0, B.svm_guest, dataclasses.replace(B.SVM_FACTS, cr0=0x20000011), _same),
    (NS.SVM_STATE_RULES, 1, B.svm_guest, B.SVM_FACTS, _at(NS.SVM_SAVE_OFFSET + S.SAVE["cr0"][0], 8, 0x11)),
    (V2.SVM_V2_RULES, 0, B.v2_guest, B.SVM_FACTS, _set(format=U.KVM_STATE_NESTED_FORMAT_SVM)),
    (V2.SVM_V2_RULES, 1, B.v2_guest, B.SVM_FACTS, _at(V2.V2_HDR_OFFSET, 4, 2)),
    (V2.SVM_V2_RULES, 2, B.v2_guest, B.SVM_FACTS, _at(V2.V2_HDR_OFFSET + 4, 2, 2048)),
    (V2.SVM_V2_RULES, 3, B.v2_guest, B.SVM_FACTS, _at(V2.V2_HDR_OFFSET + 6, 2, 1024)),
    (V2.SVM_V2_RULES, 4, B.v2_guest, B.SVM_FACTS, _at(127, 1, 1)),
    (V2.SVM_V2_RULES, 5, B.v2_guest, B.SVM_FACTS, _set(size=NS.SVM_MAX_SIZE)),
    (V2.SVM_V2_RULES, 6, B.v2_guest, B.SVM_FACTS, _set(flags=B.GM | U.KVM_STATE_NESTED_EVMCS)),
    (V2.SVM_V2_RULES, 7, B.v2_guest, dataclasses.replace(B.SVM_FACTS, efer_svme=False), _same),
    (V2.SVM_V2_RULES, 8, B.v2_guest, dataclasses.replace(B.SVM_FACTS, in_smm=True), _same),
    (V2.SVM_V2_RULES, 9, B.v2_guest, B.SVM_FACTS, _set(size=NS.HEADER_SIZE)),
    (V2.SVM_V2_RULES, 10, B.v2_guest, B.SVM_FACTS, _set(vmxon_pa=1 << 52)),
    (V2.SVM_V2_RULES, 11, B.v2_guest, B.SVM_FACTS, _at(_V2_L2_CR0, 8, 0xA0000011)),
    (V2.SVM_V2_RULES, 12, B.v2_guest, B.SVM_FACTS, _at(V2.L1_REGS_OFFSET, 8, 0x11)),
    (V2.SVM_V2_RULES, 13, B.v2_guest, B.SVM_FACTS, _at(_V2_L1_RFLAGS, 8, 0x20002)),
    (V2.SVM_V2_RULES, 14, B.v2_guest, B.SVM_FACTS, _at(V2.L1_REGS_OFFSET + 24, 8, 0xD00)),
]
# Rules that cannot fire alone: the first_violation is still the rule (see the CASES comment)
NOT_ALONE = {NS.VMX_RULES[6]}


def _case_id(case: tuple) -> str:
    rules, index = case[0], case[1]
    return f"{rules[index].source}:{index}:{rules[index].name[:40]}"


@pytest.mark.parametrize("rules, index, default, facts, mutate", CASES, ids=[_case_id(c) for c in CASES])
def test_each_rule_fires_alone_from_a_valid_default(rules: tuple[NS.Rule, ...], index: int,
                                                    default: Callable[[], NS.NestedState], facts: NS.VcpuFacts,
                                                    mutate: Mutation) -> None:
    family = {NS.GENERIC_RULES: NS.GENERIC_RULES + NS.VMX_RULES}.get(rules, rules)
    base_facts = B.VMX_FACTS if family[0] in NS.GENERIC_RULES + NS.VMX_RULES else B.SVM_FACTS
    valid = NS.NestedState.decode(default().encode())
    assert NS.violations(family, valid, base_facts) == []
    ns = mutate(valid)
    broken = NS.violations(rules, ns, facts)
    first = NS.first_violation(rules, ns, facts)
    assert first is not None and first.rule is rules[index]
    if rules[index] not in NOT_ALONE:
        assert [v.rule for v in broken] == [rules[index]]


def test_every_rule_has_a_case() -> None:
    covered = {id(rules[index]) for rules, index, *_ in CASES}
    missing = [r.name for rules in ALL_RULES for r in rules if id(r) not in covered]
    assert missing == []
