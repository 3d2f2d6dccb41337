"""`nestvisor-qemu`: the part of qemu-system-x86_64's command line that kvm-unit-tests uses.

With this as $QEMU, kvm-unit-tests' run_tests.sh runs its x86 tests on nestvisor. What the
scripts need (kvm-unit-tests x86/run, scripts/arch-run.bash, scripts/runtime.bash):

- `--help` prints a first line "QEMU emulator version X.Y.Z ..." (search_qemu_binary greps
  "QEMU"; env_params splits the first line of `-h` on spaces and dots into the version);
- `-device '?'` lists "pc-testdev" (with its quotes: x86/run greps `"pc-testdev"`) and
  "pci-testdev";
- a probe with `-kernel _NO_FILE_4Uhere_` fails with "could not load kernel" on the line that
  names the file (runtime.bash premature_failure);
- the exit status is the isa-debug-exit status, 0 when the guest never wrote it, and every
  stderr line of a good run says "warning" (arch-run.bash run_qemu maps 1 to success only then).

Options that only concern QEMU's own devices and front ends are accepted and ignored; unknown
options get a warning line and are ignored.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from nestvisor.arch.cpuid import FEATURES as CPUID_FEATURES

PROG = "qemu-system-x86_64"
# The version of the reference oracle (shared reference §5, QEMU 7.2): arch-run.bash env_params
# exports QEMU_MAJOR/MINOR/MICRO from it into the tests' environment.
QEMU_VERSION = "7.2.0"
NESTVISOR_VERSION = "0.1.0"

# `-device help`: name and bus, in QEMU's format (qdev_print_devinfo: name "x", bus y).
DEVICES: dict[str, tuple[str, str]] = {
    "isa-debug-exit": ("ISA", "exits the machine with status (value << 1) | 1"),
    "pc-testdev": ("ISA", "accepted; kvm-unit-tests' vmx/svm suites do not use it"),
    "pci-testdev": ("PCI", "accepted; kvm-unit-tests' vmx/svm suites do not use it"),
    "testdev": ("ISA", "accepted"),
}

# Options followed by an argument. The ones not parsed below are accepted and ignored.
OPTIONS_WITH_ARG = frozenset({
    "kernel", "append", "initrd", "smp", "m", "cpu", "machine", "M", "accel", "device",
    "serial", "global", "display", "vnc", "vga", "net", "netdev", "nic", "monitor", "mon",
    "chardev", "name", "rtc", "boot", "qmp", "pidfile", "D", "d", "L", "bios", "k", "object",
    "uuid", "icount", "overcommit", "msg", "sandbox", "trace", "numa", "smbios", "fw_cfg",
    "parallel", "audiodev", "drive", "usbdevice", "watchdog-action", "action",
})
OPTIONS_FLAG = frozenset({
    "no-reboot", "no-shutdown", "nodefaults", "no-user-config", "enable-kvm", "nographic",
    "no-hpet", "no-acpi", "snapshot", "daemonize", "full-screen", "no-fd-bootchk", "usb",
})
OPTIONS_UNSUPPORTED_WITH_ARG = frozenset({"incoming", "loadvm", "gdb"})
OPTIONS_UNSUPPORTED_FLAG = frozenset({"S", "s"})

# QEMU -cpu models that nestvisor maps onto a profile; any other model is the "base" profile.
# "max" and "host" carry everything the accelerator offers, here the default Intel profile.
MODEL_PROFILES = {"max": "vmx", "host": "vmx"}
TRUE_WORDS = frozenset({"on", "yes", "true"})
FALSE_WORDS = frozenset({"off", "no", "false"})

MiB = 1 << 20
SIZE_SUFFIXES = {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class UsageError(ValueError):
    """A command-line value QEMU would reject; the message is one sentence."""


@dataclass
class QemuConfig:
    """What the command line asked for."""

    kernel: str | None = None
    append: str = ""
    initrd: list[str] = field(default_factory=list)
    smp: int = 1
    memory: int = 128 * MiB  # QEMU's default -m
    cpu_model: str = "qemu64"  # QEMU's default x86-64 model
    cpu_features: dict[str, Any] = field(default_factory=dict)
    serial: str = "stdio"
    devices: list[str] = field(default_factory=list)
    debug_exit: tuple[int, int] | None = None
    help: bool = False
    version: bool = False
    device_help: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def profile(self) -> str:
        return cpu_profile(self.cpu_model, self.cpu_features)

    @property
    def kvm_features(self) -> dict[str, bool]:
        """The -cpu overrides for Kvm(features=...): CPUID flags nestvisor models. vmx and svm
        are carried by the profile, so whether nested virtualization is advertised stays the
        profile's decision (DESIGN decision 7)."""
        return {k: v for k, v in self.cpu_features.items()
                if k in CPUID_FEATURES and k not in ("vmx", "svm") and isinstance(v, bool)}


def parse_size(text: str, default_unit: str = "m") -> int:
    """A QEMU size: a number with an optional B/K/M/G/T suffix, MiB when none (qemu_strtosz_MiB)."""
    s = text.strip().lower()
    unit = default_unit
    if s and s[-1] in SIZE_SUFFIXES:
        unit, s = s[-1], s[:-1]
    try:
        value = float(s) if "." in s else int(s, 0)
    except ValueError:
        raise UsageError(f"invalid size '{text}'") from None
    size = int(value * SIZE_SUFFIXES[unit])
    if size <= 0:
        raise UsageError(f"invalid size '{text}': must be positive")
    return size


def _split_opts(text: str) -> tuple[str | None, dict[str, str]]:
    """QEMU option syntax "first,key=value,flag": the first bare word and the key=value pairs."""
    first: str | None = None
    props: dict[str, str] = {}
    for i, part in enumerate(text.split(",")):
        if "=" in part:
            key, value = part.split("=", 1)
            props[key] = value
        elif i == 0:
            first = part
        elif part:
            props[part] = "on"
    return first, props


def parse_memory(text: str) -> int:
    """-m [size=]N[,slots=..,maxmem=..]."""
    first, props = _split_opts(text)
    value = props.get("size", first)
    if value is None:
        raise UsageError(f"-m {text}: no size given")
    return parse_size(value)


def parse_smp(text: str) -> int:
    """-smp [cpus=]N[,sockets=..,cores=..,threads=..,maxcpus=..] (QEMU smp_parse)."""
    first, props = _split_opts(text)
    try:
        if first is not None or "cpus" in props:
            cpus = int(props.get("cpus", first or "0"), 0)
        else:
            cpus = 1
            for key in ("sockets", "dies", "clusters", "cores", "threads"):
                cpus *= int(props.get(key, "1"), 0)
    except ValueError:
        raise UsageError(f"-smp {text}: not a number of CPUs") from None
    if cpus < 1:
        raise UsageError(f"-smp {text}: at least one CPU is needed")
    return cpus


def parse_cpu(text: str) -> tuple[str, dict[str, Any]]:
    """-cpu MODEL[,+feat][,-feat][,feat][,prop=value]: the model and the feature overrides.

    Feature names are canonical with '-' (QEMU feat2prop turns '_' into '-'); on/off words
    become booleans, other values stay strings (vendor=GenuineIntel, phys-bits=36).
    """
    parts = text.split(",")
    model = parts[0] or "qemu64"
    features: dict[str, Any] = {}
    for part in parts[1:]:
        if not part:
            continue
        if part[0] in "+-":
            features[part[1:].replace("_", "-")] = part[0] == "+"
        elif "=" in part:
            key, value = part.split("=", 1)
            low = value.lower()
            features[key.replace("_", "-")] = (
                True if low in TRUE_WORDS else False if low in FALSE_WORDS else value
            )
        else:
            features[part.replace("_", "-")] = True
    return model, features


def cpu_profile(model: str, features: dict[str, Any]) -> str:
    """The nestvisor profile for a QEMU CPU: +svm selects "svm", +vmx "vmx", -vmx drops to "base"."""
    if features.get("svm") is True:
        return "svm"
    if features.get("vmx") is True:
        return "vmx"
    profile = MODEL_PROFILES.get(model, "base")
    if profile == "vmx" and features.get("vmx") is False:
        return "base"
    return profile


def _parse_device(cfg: QemuConfig, text: str) -> None:
    if text in ("?", "help"):
        cfg.device_help = True
        return
    driver, props = _split_opts(text)
    driver = props.pop("driver", driver) or ""
    if "help" in props or driver in ("?", "help"):
        cfg.device_help = True
        return
    cfg.devices.append(driver)
    if driver == "isa-debug-exit":
        try:  # QEMU hw/misc/debugexit.c defaults: iobase 0x501, iosize 2
            cfg.debug_exit = (int(props.get("iobase", "0x501"), 0), int(props.get("iosize", "2"), 0))
        except ValueError:
            raise UsageError(f"-device {text}: iobase and iosize must be numbers") from None
        if cfg.debug_exit[1] not in (1, 2, 4):
            raise UsageError(f"-device {text}: iosize must be 1, 2 or 4")
    elif driver not in DEVICES:
        cfg.warnings.append(f"-device {driver}: not emulated by nestvisor, ignored")


def parse_args(argv: Sequence[str]) -> QemuConfig:
    """Parse a qemu-system-x86_64 command line (without the program name); raises UsageError."""
    cfg = QemuConfig()
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith("-") or arg == "-":
            cfg.warnings.append(f"disk image '{arg}' ignored: nestvisor boots -kernel only")
            continue
        name = arg.lstrip("-")
        if name in ("h", "help"):
            cfg.help = True
            continue
        if name == "version":
            cfg.version = True
            continue
        if name in OPTIONS_FLAG:
            continue
        if name in OPTIONS_UNSUPPORTED_FLAG:
            cfg.warnings.append(f"option {arg} is not supported by nestvisor, ignored")
            continue
        takes_arg = name in OPTIONS_WITH_ARG or name in OPTIONS_UNSUPPORTED_WITH_ARG
        if not takes_arg:
            # Unknown: QEMU would refuse it. Take a following non-option word as its argument.
            value = ""
            if i < len(args) and not args[i].startswith("-"):
                value = " " + args[i]
                i += 1
            cfg.warnings.append(f"unknown option {arg}{value} ignored")
            continue
        if i >= len(args):
            raise UsageError(f"{arg}: requires an argument")
        value = args[i]
        i += 1
        if name in OPTIONS_UNSUPPORTED_WITH_ARG:
            cfg.warnings.append(f"option {arg} {value} is not supported by nestvisor, ignored")
        elif name == "kernel":
            cfg.kernel = value
        elif name == "append":
            cfg.append = value
        elif name == "initrd":
            # QEMU multiboot: modules separated by ',' (',,' is a literal comma).
            cfg.initrd = [m.replace("\0", ",") for m in value.replace(",,", "\0").split(",") if m]
        elif name == "smp":
            cfg.smp = parse_smp(value)
        elif name == "m":
            cfg.memory = parse_memory(value)
        elif name == "cpu":
            if value in ("?", "help"):
                cfg.warnings.append("-cpu help: models max, host and qemu64 (any other is 'base')")
                continue
            cfg.cpu_model, cfg.cpu_features = parse_cpu(value)
            for key, val in cfg.cpu_features.items():
                if key not in CPUID_FEATURES or not isinstance(val, bool):
                    shown = key if isinstance(val, bool) else f"{key}={val}"
                    cfg.warnings.append(f"-cpu {shown}: not modelled by nestvisor, ignored")
        elif name == "device":
            _parse_device(cfg, value)
        elif name == "serial":
            cfg.serial = value
        # Everything else (-machine, -accel, -global, -display, -name, ...) changes nothing here.
    return cfg


def help_text() -> str:
    return "\n".join((
        f"QEMU emulator version {QEMU_VERSION} (nestvisor {NESTVISOR_VERSION}, "
        "a QEMU-compatible front end)",
        "usage: qemu-system-x86_64 [options] -kernel FILE",
        "",
        "nestvisor runs multiboot kernels on a software x86 hypervisor; these options act:",
        "-kernel FILE      multiboot v1 kernel (ELF32, ELF64 or a.out-kludge)",
        "-append ARGS      kernel command line (the kernel sees 'FILE ARGS')",
        "-initrd FILE[,..] multiboot modules",
        "-smp N            number of vCPUs",
        "-m SIZE           RAM (MiB, or with a K/M/G/T suffix)",
        "-cpu MODEL[,+f,-f] CPU model: max/host (Intel VMX profile), +svm for AMD SVM",
        "-device isa-debug-exit,iobase=A,iosize=N   exit device",
        "-serial stdio|none|file:PATH   COM1",
        "Accepted and ignored: -machine -accel -enable-kvm -global -display -vnc -vga -net",
        "-monitor -chardev -name -nodefaults -no-reboot -no-user-config -nographic",
        "",
    ))


def device_help_text() -> str:
    lines = ["Misc devices:"]
    lines += [f'name "{name}", bus {bus}-bus, desc "{desc}"' for name, (bus, desc) in DEVICES.items()]
    return "\n".join(lines) + "\n"


def _serial_sink(spec: str) -> Any:
    from nestvisor.platform.machine import StdoutSink

    if spec in ("none", "null"):
        return lambda data: None
    if spec.startswith("file:"):
        return StdoutSink(open(spec[5:], "wb"))  # noqa: SIM115 - lives as long as the process
    if spec != "stdio":
        print(f"{PROG}: warning: -serial {spec}: not supported, using stdio", file=sys.stderr)
    return StdoutSink()


def main(argv: Sequence[str] | None = None) -> int:
    """Run like qemu-system-x86_64; returns the process exit status."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        cfg = parse_args(args)
    except UsageError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    if cfg.help or cfg.version:
        sys.stdout.write(help_text() if cfg.help else help_text().splitlines()[0] + "\n")
        return 0
    if cfg.device_help:
        sys.stdout.write(device_help_text())
        return 0
    for warning in cfg.warnings:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    if cfg.kernel is None:
        print(f"{PROG}: no -kernel given: nestvisor boots multiboot kernels only", file=sys.stderr)
        return 1
    # Checked before anything heavy is imported: the probe with _NO_FILE_4Uhere_ runs per test.
    if not os.path.isfile(cfg.kernel):
        reason = "No such file or directory" if not os.path.exists(cfg.kernel) else "not a file"
        print(f"{PROG}: could not load kernel '{cfg.kernel}': {reason}", file=sys.stderr)
        return 1

    from nestvisor.platform.machine import Machine
    from nestvisor.platform.multiboot import BootError

    try:
        machine = Machine(
            cfg.kernel, smp=cfg.smp, memory=cfg.memory, append=cfg.append,
            initrd=cfg.initrd or None, profile=cfg.profile, cpu_features=cfg.kvm_features,
            serial_out=_serial_sink(cfg.serial), debug_exit=cfg.debug_exit,
        )
    except BootError as e:
        text = str(e)
        if not text.startswith("could not load"):
            text = f"could not load kernel '{cfg.kernel}': {text}"
        print(f"{PROG}: {text}", file=sys.stderr)
        return 1
    result = machine.run()
    if result.reason != "debug-exit":
        print(f"{PROG}: nestvisor: machine stopped: {result.reason}", file=sys.stderr)
    return result.status & 0xFF  # the process status is 8 bits, as QEMU's exit()


if __name__ == "__main__":
    sys.exit(main())
