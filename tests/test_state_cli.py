"""`nestvisor state` on blobs built here: show (text and JSON), validate, convert, diff, and bad
input answered with one sentence and status 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import state_blobs as B

from nestvisor import cli
from nestvisor.state import svm_v2 as V2


def _file(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = cli.main(["state", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_show_vmx_names_header_and_vmcs12_fields(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = _run(capsys, "show", _file(tmp_path, "vmx", B.vmx_guest().encode()))
    assert status == 0
    assert "hdr.vmx.vmcs12_pa" in out and "0x11000" in out
    assert "vmcs12.guest_rip" in out and "0x401000" in out
    assert "shadow_vmcs12.hdr" in out and "GUEST_MODE" in out


def test_show_json_is_hex_strings_by_area(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = _run(capsys, "show", "--json", _file(tmp_path, "svm", B.svm_guest().encode()))
    data = json.loads(out)
    assert status == 0 and out.startswith("{\n    \"header\"")
    assert data["header"]["hdr.svm.vmcb_pa"] == hex(B.VMCB_PA)
    assert data["vmcb12.control"]["exit_code"] == "0x72"
    assert data["vmcb01.save"]["rip"] == "0x1234"


def test_show_header_only_blob(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = _run(capsys, "show", "--json", _file(tmp_path, "off", B.vmx_off().encode()))
    assert status == 0 and list(json.loads(out)) == ["header"]


def test_validate_valid_and_broken(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = _run(capsys, "validate", _file(tmp_path, "root", B.vmx_root().encode()), "--profile", "vmx")
    assert status == 0 and "valid" in out
    bad = B.vmx_root()
    bad.vmcs12_pa = bad.vmxon_pa
    status, out, _ = _run(capsys, "validate", _file(tmp_path, "bad", bad.encode()), "--profile", "vmx")
    assert status == 1 and out.startswith("EINVAL: hdr.vmx.vmcs12_pa: equal to vmxon_pa")
    # a VMX blob on an SVM vCPU is svm_set_nested_state's format rule
    status, out, _ = _run(capsys, "validate", _file(tmp_path, "root", B.vmx_root().encode()), "--profile", "svm")
    assert status == 1 and "format: not KVM_STATE_NESTED_FORMAT_SVM" in out


def test_validate_runs_the_entry_checks_in_guest_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the default vmcs12 has all-zero controls: the first entry check (controls) rejects it
    status, out, _ = _run(capsys, "validate", _file(tmp_path, "g", B.vmx_guest().encode()), "--profile", "vmx")
    assert status == 1 and out.startswith("EINVAL: vmcs12: ")
    status, out, _ = _run(capsys, "validate", _file(tmp_path, "s", B.svm_guest().encode()), "--profile", "svm")
    assert status == 0, out
    status, out, _ = _run(capsys, "validate", _file(tmp_path, "v2", B.v2_guest().encode()), "--profile", "svm")
    assert status == 0, out


def test_convert_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kvm = B.svm_guest().encode()
    src, l2 = _file(tmp_path, "kvm", kvm), _file(tmp_path, "l2", B.L2_SAVE)
    v2, back, l2_out = (str(tmp_path / n) for n in ("v2", "back", "l2out"))
    assert _run(capsys, "convert", src, "--to", "svm-v2", "--l2-save", l2, "-o", v2)[0] == 0
    assert Path(v2).read_bytes() == V2.kvm_to_v2(kvm, B.L2_SAVE)
    assert _run(capsys, "convert", v2, "--to", "svm", "--l2-save", l2_out, "-o", back)[0] == 0
    assert Path(back).read_bytes() == kvm and Path(l2_out).read_bytes() == B.L2_SAVE


def test_convert_needs_l2_save_and_an_svm_blob(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "out")
    status, _, err = _run(capsys, "convert", _file(tmp_path, "kvm", B.svm_guest().encode()), "--to", "svm-v2",
                          "-o", out)
    assert status == 2 and "--l2-save" in err
    status, _, err = _run(capsys, "convert", _file(tmp_path, "vmx", B.vmx_root().encode()), "--to", "svm-v2",
                          "-o", out)
    assert status == 2 and "VMX" in err


def test_diff_lists_changed_fields(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = B.svm_guest()
    b = B.put(a, 128 + 0x70, 8, 0x78)
    status, out, _ = _run(capsys, "diff", _file(tmp_path, "a", a.encode()), _file(tmp_path, "b", b.encode()))
    assert status == 1 and out == "vmcb12.control.exit_code: 0x72 -> 0x78\n"
    assert _run(capsys, "diff", _file(tmp_path, "a", a.encode()), _file(tmp_path, "c", a.encode()))[:2] == (0, "")


@pytest.mark.parametrize("argv", [
    ["show", "{missing}"],
    ["show", "{short}"],
    ["show", "{random}"],
    ["show", "{truncated}"],
    ["validate", "{short}", "--profile", "vmx"],
    ["validate", "{root}", "--profile", "nosuch"],
    ["diff", "{root}", "{random}"],
    ["convert", "{short}", "--to", "svm"],
])
def test_bad_input_is_one_sentence(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    files = {"missing": str(tmp_path / "missing"), "short": _file(tmp_path, "short", bytes(50)),
             "random": _file(tmp_path, "random", bytes(range(256)) * 3),
             "truncated": _file(tmp_path, "truncated", B.vmx_guest().encode()[:5000]),
             "root": _file(tmp_path, "root", B.vmx_root().encode())}
    status, out, err = _run(capsys, *(a.format(**files) for a in argv))
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"nestvisor state {argv[0]}: ") and "Traceback" not in err


def _blobs_from_a_run(name: str, profile: str, fmt: str = "svm") -> tuple[bytes, bytes, object]:
    """Two GETs of a bundled guest while L2 runs, a few nested exits apart, and its vCPU."""
    from nestvisor.guests.build import build
    from nestvisor.platform.machine import Machine

    m = Machine(build(name), profile=profile, serial_out=lambda b: None)
    m.vm.svm_state_format = fmt
    vcpu, limit, blobs = m.vcpus[0], 0, []
    while len(blobs) < 2:
        limit += 97
        m.run(max_instructions=limit)
        if vcpu.nested.guest_mode and (not blobs or vcpu.nested.stats["exits"] > 3):
            blobs.append(vcpu.get_nested_state())
    return blobs[0], blobs[1], vcpu


@pytest.mark.parametrize("name,profile", [("vmxdemo", "vmx"), ("svmdemo", "svm")])
def test_the_commands_on_blobs_of_a_real_run(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             name: str, profile: str) -> None:
    a, b, vcpu = _blobs_from_a_run(name, profile)
    fa, fb = _file(tmp_path, "a", a), _file(tmp_path, "b", b)
    status, out, _ = _run(capsys, "validate", fa, "--profile", profile)
    assert status == 0 and "valid" in out
    status, out, _ = _run(capsys, "show", "--json", fb)
    area = "vmcs12" if profile == "vmx" else "vmcb12.control"
    assert status == 0 and json.loads(out)["header"]["flags"] in ("0x1", "0x101") and area in json.loads(out)
    status, out, _ = _run(capsys, "diff", fa, fb)
    assert status == 1 and ("guest_rip" in out or "exit_code" in out)
    if profile == "svm":   # KVM's format and svm-v2, with L2's save area from the same vCPU
        l2, v2, back = _file(tmp_path, "l2", vcpu.nested.l2_save_area()), str(tmp_path / "v2"), str(tmp_path / "k")
        assert _run(capsys, "convert", fb, "--to", "svm-v2", "--l2-save", l2, "-o", v2)[0] == 0
        vcpu.vm.svm_state_format = "svm-v2"
        assert Path(v2).read_bytes() == vcpu.get_nested_state()   # what GET gives in svm-v2
        assert _run(capsys, "convert", v2, "--to", "svm", "-o", back)[0] == 0
        assert Path(back).read_bytes() == b
