import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from nestvisor.platform import qemu_cmdline as qc

# x86/run + scripts/arch-run.bash for the [svm] section (x86/unittests.cfg: smp 2, -cpu max,+svm -m 4g)
SVM_LINE = (
    "--no-reboot -nodefaults -global kvm-pit.lost_tick_policy=discard -device pc-testdev "
    "-device isa-debug-exit,iobase=0xf4,iosize=0x4 -display none -serial stdio "
    "-device pci-testdev -machine accel=tcg -kernel x86/svm.flat -smp 2 -cpu max,+svm -m 4g "
    "-initrd /tmp/tmp.env"
)
VMX_LINE = (
    "--no-reboot -nodefaults -device pc-testdev -device isa-debug-exit,iobase=0xf4,iosize=0x4 "
    "-vnc none -serial stdio -device pci-testdev -machine accel=kvm -kernel x86/vmx.flat -smp 1 "
    "-cpu max,+vmx -append '-exit_monitor_from_l2_test -ept_access* -vmx_smp*'"
)


def test_parse_svm_run_tests_command_line():
    cfg = qc.parse_args(shlex.split(SVM_LINE))
    assert cfg.kernel == "x86/svm.flat"
    assert cfg.smp == 2
    assert cfg.memory == 4 << 30
    assert cfg.initrd == ["/tmp/tmp.env"]
    assert (cfg.cpu_model, cfg.cpu_features, cfg.profile) == ("max", {"svm": True}, "svm")
    assert cfg.debug_exit == (0xF4, 4)
    assert cfg.devices == ["pc-testdev", "isa-debug-exit", "pci-testdev"]
    assert cfg.serial == "stdio"
    assert cfg.warnings == []  # a clean run prints nothing on stderr


def test_parse_vmx_command_line_with_append():
    cfg = qc.parse_args(shlex.split(VMX_LINE))
    assert cfg.append == "-exit_monitor_from_l2_test -ept_access* -vmx_smp*"
    assert cfg.profile == "vmx" and cfg.memory == 128 << 20 and cfg.initrd == []
    assert cfg.warnings == []


@pytest.mark.parametrize("text, size", [
    ("4g", 4 << 30), ("4G", 4 << 30), ("2048", 2048 << 20), ("512M", 512 << 20),
    ("size=1G", 1 << 30), ("2560,slots=2,maxmem=8G", 2560 << 20), ("1024k", 1 << 20),
])
def test_memory_sizes(text, size):
    assert qc.parse_memory(text) == size


@pytest.mark.parametrize("text", ["lots", "0", "-1G", "size="])
def test_bad_memory_sizes(text):
    with pytest.raises(qc.UsageError):
        qc.parse_memory(text)


@pytest.mark.parametrize("text, cpus", [("2", 2), ("cpus=4", 4), ("4,maxcpus=8", 4),
                                        ("sockets=2,cores=2", 4)])
def test_smp(text, cpus):
    assert qc.parse_smp(text) == cpus


@pytest.mark.parametrize("text, model, features, profile", [
    ("max,+vmx", "max", {"vmx": True}, "vmx"),
    ("max", "max", {}, "vmx"),
    ("max,-vmx", "max", {"vmx": False}, "base"),
    ("host,+svm", "host", {"svm": True}, "svm"),
    ("qemu64,+x2apic,+tsc_deadline", "qemu64", {"x2apic": True, "tsc-deadline": True}, "base"),
    ("IvyBridge,phys-bits=36,host-phys-bits=off,+vmx", "IvyBridge",
     {"phys-bits": "36", "host-phys-bits": False, "vmx": True}, "vmx"),
    ("max,host-phys-bits,+vmx", "max", {"host-phys-bits": True, "vmx": True}, "vmx"),
])
def test_cpu_models_and_features(text, model, features, profile):
    got_model, got_features = qc.parse_cpu(text)
    assert (got_model, got_features) == (model, features)
    assert qc.cpu_profile(got_model, got_features) == profile


def test_features_for_kvm_and_warnings_for_the_rest():
    cfg = qc.parse_args(["-cpu", "IvyBridge,phys-bits=36,+x2apic,-tsc-deadline,+vmx,+hv_vpindex"])
    assert cfg.kvm_features == {"x2apic": True, "tsc-deadline": False}
    assert cfg.profile == "vmx"
    assert cfg.warnings == ["-cpu phys-bits=36: not modelled by nestvisor, ignored",
                            "-cpu hv-vpindex: not modelled by nestvisor, ignored"]


def test_no_cpu_option_is_qemu64_base_profile():
    assert qc.parse_args(["-kernel", "k"]).profile == "base"


def test_help_names_qemu_and_a_parsable_version(capsys):
    assert qc.main(["--help"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "QEMU" in first
    # arch-run.bash env_params: IFS='[ .]' read -r _ _ _ MAJOR MINOR MICRO rest
    fields = first.replace(".", " ").split()
    assert fields[:3] == ["QEMU", "emulator", "version"] and all(f.isdigit() for f in fields[3:6])


@pytest.mark.parametrize("arg", ["?", "help"])
def test_device_list_matches_run_scripts_grep(capsys, arg):
    assert qc.main(["-device", arg]) == 0
    out = capsys.readouterr().out
    # x86/run: grep -F -e '"testdev"' -e '"pc-testdev"', then grep -F pci-testdev / pc-testdev
    assert '"pc-testdev"' in out and '"testdev"' in out
    assert "pci-testdev" in out and '"isa-debug-exit"' in out


def test_missing_kernel_probe(capsys):
    argv = shlex.split(VMX_LINE.replace("x86/vmx.flat", "_NO_FILE_4Uhere_"))
    assert qc.main(argv) == 1
    err = capsys.readouterr().err
    # runtime.bash premature_failure: the line naming the file says "could not load kernel"
    lines = [ln for ln in err.splitlines() if "_NO_FILE_4Uhere_" in ln]
    assert lines and "could not load kernel" in lines[0]


def test_unknown_option_warns_and_is_ignored(capsys):
    cfg = qc.parse_args(["-frobnicate", "x", "-kernel", "k", "-S"])
    assert cfg.kernel == "k"
    assert len(cfg.warnings) == 2
    qc.main(["-frobnicate", "x", "-kernel", "/nonexistent/k"])
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("qemu-system-x86_64: warning:") and "-frobnicate" in err[0]


def test_bad_values_are_one_line_errors(capsys):
    assert qc.main(["-kernel", "k", "-smp", "zero"]) == 1
    assert qc.main(["-kernel", "k", "-m", "big"]) == 1
    assert qc.main(["-kernel"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("qemu-system-x86_64: ") for line in err)


def test_unknown_device_warns():
    cfg = qc.parse_args(["-device", "edu", "-device", "intel-iommu,intremap=on"])
    assert [w.split(":")[0] for w in cfg.warnings] == ["-device edu", "-device intel-iommu"]


def test_entry_point_runs_as_a_process():
    proc = subprocess.run(
        [sys.executable, "-m", "nestvisor.platform.qemu_cmdline", "-kernel", "_NO_FILE_4Uhere_"],
        capture_output=True, text=True, check=False,
        env={**os.environ, "PYTHONPATH": str(Path(qc.__file__).parents[2])},
    )
    assert proc.returncode == 1
    assert proc.stderr == ("qemu-system-x86_64: could not load kernel '_NO_FILE_4Uhere_': "
                           "No such file or directory\n")
