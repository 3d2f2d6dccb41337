"""The `nestvisor` command.

    nestvisor run KERNEL [--smp N] [-m SIZE] [--append ARGS] [--initrd FILE] [--profile NAME]
                         [--max-insns N]
    nestvisor demo [--arch vmx|svm|engine]
    nestvisor bench [--quick] [--json]
    nestvisor state show|validate|convert|diff ...   (nestvisor.state_cli)

`run` boots a multiboot kernel with COM1 on stdout and exits with the guest's debug-exit status
(as QEMU does); when the machine stops for another reason, one line on stderr says why.
Bad input (a missing or malformed kernel, a bad size) is one error line and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

PROG = "nestvisor"
EXIT_USAGE = 2  # argparse's own status for bad usage


def _size(text: str) -> int:
    from nestvisor.platform.qemu_cmdline import UsageError, parse_size

    try:
        return parse_size(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"'{text}' must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="A software x86 L0 hypervisor.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="boot a multiboot kernel (serial on stdout)")
    run.add_argument("kernel", help="multiboot v1 kernel (ELF32/ELF64, e.g. a kvm-unit-tests .flat)")
    run.add_argument("--smp", type=_positive, default=1, help="number of vCPUs (default 1)")
    run.add_argument("-m", "--memory", type=_size, default=128 << 20,
                     help="RAM size, MiB or with a K/M/G suffix (default 128M)")
    run.add_argument("--append", default="", help="kernel command line arguments")
    run.add_argument("--initrd", action="append", default=[], help="multiboot module (repeatable)")
    run.add_argument("--profile", default="vmx", help="CPU profile: vmx (default), svm, base")
    run.add_argument("--max-insns", type=_positive, default=None,
                     help="stop after this many virtual ns per vCPU (1 instruction = 1 ns)")
    run.set_defaults(func=cmd_run)

    demo_p = sub.add_parser("demo", help="run the bundled nested-virtualization demo")
    demo_p.add_argument("--arch", choices=("vmx", "svm", "engine"), default="vmx",
                        help="vmx: an L1 VMX hypervisor and its L2 (default); svm: an L1 SVM "
                             "hypervisor and its L2; engine: the L0 engine alone, no nesting")
    demo_p.set_defaults(func=demo)

    bench_p = sub.add_parser("bench", help="measure guest MIPS and trapped-instruction cost")
    bench_p.add_argument("--quick", action="store_true", help="10x smaller loops (about a second)")
    bench_p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    bench_p.set_defaults(func=cmd_bench)

    from nestvisor import state_cli

    state_cli.add_parser(sub)
    return parser


def _error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def cmd_run(args: argparse.Namespace) -> int:
    from nestvisor.platform.machine import Machine
    from nestvisor.platform.multiboot import BootError

    try:
        machine = Machine(
            args.kernel, smp=args.smp, memory=args.memory, append=args.append,
            initrd=args.initrd or None, profile=args.profile,
        )
    except BootError as e:
        return _error(str(e))
    result = machine.run(max_instructions=args.max_insns)
    if result.reason != "debug-exit":
        print(f"{PROG}: machine stopped: {result.reason} (clock {result.clock} ns)",
              file=sys.stderr)
    return result.status & 0xFF


def demo(args: argparse.Namespace) -> int:
    """The guided demo; its content lives with the bundled guests (nestvisor.guests.demo)."""
    from nestvisor.guests import demo as guest_demo

    status = guest_demo.run(args)
    return int(status or 0)


def cmd_bench(args: argparse.Namespace) -> int:
    from nestvisor import bench

    return bench.run(args)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
