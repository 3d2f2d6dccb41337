"""`nestvisor state`: decode, validate, convert and compare kvm_nested_state blobs offline.

    nestvisor state show BLOB [--json]
    nestvisor state validate BLOB --profile NAME
    nestvisor state convert BLOB --to svm-v2|svm [-o OUT] [--l2-save FILE]
    nestvisor state diff A B

Exit status: 0 success (valid, no difference); 1 the answer is "no" (rules violated, blobs
differ); 2 bad input (a missing file, a truncated blob, a format nobody defines), reported as
one sentence on stderr.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from collections.abc import Callable

from nestvisor.arch import kvm_uapi as U
from nestvisor.arch import svm as S
from nestvisor.arch import vmcs as V
from nestvisor.arch import vmx as X
from nestvisor.state import fields as F
from nestvisor.state import nested_state as NS
from nestvisor.state import svm_v2 as V2

EXIT_NO = 1
EXIT_BAD = 2
_V2 = V2.KVM_STATE_NESTED_FORMAT_SVM_V2

VALIDATE_HELP = """\
Apply KVM_SET_NESTED_STATE's rules to BLOB without a VM: the generic ioctl rules, then
vmx_set_nested_state's (a profile with VMX) or svm_set_nested_state's (a profile with SVM;
svm-v2 blobs get svm-v2's rules), then, for a guest-mode blob, the VMCS/VMCB entry checks
KVM runs on it. Assumed of the vCPU the blob is loaded into: the profile's CPUID and
MAXPHYADDR; not in SMM; EFER.SVME=1 and, as its current (L2's) CR0, the CR0 of the blob's
save area (L1's for KVM's SVM format, vmcb12's for svm-v2), since KVM's SVM format does not
carry L2's registers; guest memory is not in the blob, so a VMCS link pointer other than -1
is judged by the shadow vmcs12 the blob carries, and L1's EFER.LMA is vmcs12's host
address-space size. Prints each broken rule with its errno
name; exit status 0 when valid, 1 when not."""


class BadInput(Exception):
    """One sentence for stderr: what is wrong with the input."""


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    state = sub.add_parser("state", help="decode, validate, convert and diff kvm_nested_state blobs",
                           description=__doc__.split("\n\n")[0])
    cmds = state.add_subparsers(dest="state_command", required=True)

    show = cmds.add_parser("show", help="print every header, vmcs12 and vmcb12 field by name")
    show.add_argument("blob", help="a kvm_nested_state blob (VMX, SVM or svm-v2)")
    show.add_argument("--json", action="store_true",
                      help="one JSON object, area -> field -> value, integers as hex strings")
    show.set_defaults(state_func=cmd_show)

    val = cmds.add_parser("validate", help="apply KVM_SET_NESTED_STATE's rules", description=VALIDATE_HELP)
    val.add_argument("blob")
    val.add_argument("--profile", required=True, help="CPU profile of the vCPU: vmx, svm or base")
    val.set_defaults(state_func=cmd_validate)

    conv = cmds.add_parser("convert", help="convert between KVM's SVM format and svm-v2",
                           description="svm -> svm-v2 needs L2's 744-byte save area (--l2-save, read); "
                           "svm-v2 -> svm writes it to --l2-save when given. OUT defaults to stdout.")
    conv.add_argument("blob")
    conv.add_argument("--to", required=True, choices=("svm-v2", "svm"))
    conv.add_argument("-o", "--output", help="output file (default: stdout, when it is not a terminal)")
    conv.add_argument("--l2-save", help="L2's save area (APM layout, 744 bytes): input for --to svm-v2, "
                      "output for --to svm")
    conv.set_defaults(state_func=cmd_convert)

    d = cmds.add_parser("diff", help="list the fields that differ, old -> new")
    d.add_argument("a")
    d.add_argument("b")
    d.set_defaults(state_func=cmd_diff)
    state.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Dispatch a `state` subcommand; bad input becomes one line on stderr and status 2."""
    handler: Callable[[argparse.Namespace], int] = args.state_func
    try:
        return handler(args)
    except BadInput as e:
        print(f"nestvisor state {args.state_command}: {e}", file=sys.stderr)
        return EXIT_BAD
    except BrokenPipeError:
        # the reader (`| head`) left: not an error of ours, and nothing more to say
        sys.stdout = open(os.devnull, "w")  # flushed and closed at exit
        return 0


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise BadInput(f"cannot read {path}: {e.strerror or e}") from None


def _write(path: str, data: bytes) -> None:
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as e:
        raise BadInput(f"cannot write {path}: {e.strerror or e}") from None


def _load(path: str) -> bytes:
    """The blob in `path`, cut to its `size`; BadInput unless `fields` can decode it."""
    blob = _read(path)
    try:
        ns = F.check_blob(blob)
    except ValueError as e:
        raise BadInput(f"{path}: {e}") from None
    return blob[:ns.size]


# ---- show ----------------------------------------------------------------------------------

def _names(value: int, names: dict[int, str]) -> str:
    return "|".join(n for bit, n in names.items() if value & bit)


def _note(f: F.Field) -> str:
    """A decoding hint for the fields whose numbers are codes or bit sets."""
    v = f.value
    if not isinstance(v, int):
        return ""
    if f.path == "flags":
        return _names(v, NS.FLAG_NAMES)
    if f.path == "format":
        return F.FORMATS.get(v, "")
    if f.path in ("vmcs12.hdr", "shadow_vmcs12.hdr"):
        return f"revision_id={v & ~V.SHADOW_VMCS_BIT:#x} shadow_vmcs={v >> 31}"
    if f.path.endswith("vm_exit_reason"):
        return X.EXIT_REASONS.get(v & 0xFFFF, "")
    if f.path == "vmcb12.control.exit_code":
        return S.EXIT_NAMES.get(v, "")
    return ""


def _text(v: F.Value) -> str:
    if isinstance(v, int):
        return hex(v)
    return f"00 x {len(v)}" if not any(v) else v.hex()


def _json(v: F.Value) -> str:
    return hex(v) if isinstance(v, int) else v.hex()


def cmd_show(args: argparse.Namespace) -> int:
    blob = _load(args.blob)
    fields = F.decode(blob)
    if args.json:
        out: dict[str, dict[str, str]] = {}
        for f in fields:
            out.setdefault(f.area, {})[f.name] = _json(f.value)
        print(json.dumps(out, indent=4))
        return 0
    heads = {area: f"{area}: {size} bytes at {offset}" for area, offset, size in F.layout(blob)}
    area = ""
    for f in fields:
        if f.area != area:
            area = f.area
            print(heads[area])
        note = _note(f)
        print(f"  {f.path:<44} {_text(f.value)}{'  (' + note + ')' if note else ''}")
    return 0


# ---- validate ------------------------------------------------------------------------------

def _entry_checks(profile: str, ns: NS.NestedState, blob: bytes) -> list[str]:
    """The VMCS/VMCB entry checks KVM's SET runs on a guest-mode blob, on a throwaway vCPU of
    the profile (for its CR4/EFER/VMX-capability predicates; it never runs)."""
    import nestvisor
    from nestvisor.kvm.svm.checks import check_controls as svm_controls
    from nestvisor.kvm.svm.checks import check_save
    from nestvisor.kvm.svm.vmcb import Vmcb, copy_control_to_cache, copy_save_to_cache
    from nestvisor.kvm.vmx.checks import check_controls, check_guest_state, check_host_state
    from nestvisor.kvm.vmx.vmcs12 import Vmcs12

    vcpu = nestvisor.Kvm(profile=profile).create_vm().create_vcpu(0)
    maxphyaddr = vcpu.profile.maxphyaddr
    if ns.format == U.KVM_STATE_NESTED_FORMAT_VMX:
        snap = Vmcs12(ns.data(NS.VMX_VMCS12_OFFSET, V.VMCS12_SIZE)).fields()
        caps = vcpu.nested.caps
        shadow = int.from_bytes(ns.data(NS.VMX_SHADOW_OFFSET, 4), "little")
        has_shadow = ns.size >= NS.VMX_SHADOW_OFFSET + NS.VMCS12_STRUCT_SIZE

        def read_u32(gpa: int) -> int | None:
            return shadow if has_shadow and gpa == snap["vmcs_link_pointer"] else None

        # KVM reads L1's EFER.LMA from the vCPU; offline, vmcs12's host address-space size stands in
        l1_lma = bool(snap["vm_exit_controls"] & X.EXIT_HOST_ADDR_SPACE_SIZE)
        fails = [check_controls(snap, caps, maxphyaddr),
                 check_host_state(snap, caps, maxphyaddr, l1_lma)]
        guest = check_guest_state(snap, caps, bool(ns.flags & U.KVM_STATE_NESTED_RUN_PENDING), maxphyaddr,
                                  read_u32)
        fails.append(guest[0] if guest else None)
        return [f"vmcs12: {f}" for f in fails if f is not None]
    kvm_blob, l2_save = V2.v2_to_kvm(blob) if ns.format == _V2 else (blob, b"")
    vmcb = Vmcb(kvm_blob[NS.SVM_CONTROL_OFFSET:NS.SVM_MAX_SIZE])
    has = vcpu.profile.has
    ctl = copy_control_to_cache(vmcb, has_xsave=has("xsave"), has_rdtscp=has("rdtscp"), has_invpcid=False,
                                has_npt=True, has_skinit=False, has_rdpru=False)
    out = []
    failure = svm_controls(ctl, maxphyaddr, npt_enabled=True)
    if failure is not None:
        out.append(f"vmcb12.control: {failure}")
    saves = [("vmcb01.save (L1's)", vmcb)]
    if l2_save:
        l2 = Vmcb(bytes(S.SAVE_OFFSET) + l2_save + bytes(S.VMCB_SIZE - S.SAVE_OFFSET - S.SAVE_SIZE))
        saves.append(("vmcb12.save (L2's)", l2))
    for label, v in saves:
        failure = check_save(copy_save_to_cache(v), maxphyaddr, vcpu.cr4_valid, vcpu.efer_valid)
        if failure is not None:
            out.append(f"{label}: {failure}")
    return out


def _validate(profile_name: str, blob: bytes) -> list[str]:
    from nestvisor.kvm.profiles import get_profile

    try:
        profile = get_profile(profile_name)
    except KeyError:
        raise BadInput(f"no CPU profile named {profile_name!r}") from None
    if len(blob) < NS.HEADER_SIZE:
        raise BadInput(f"truncated: {len(blob)} bytes, the kvm_nested_state header alone is {NS.HEADER_SIZE}")
    ns = NS.NestedState.decode(blob)
    if ns.size > len(blob):
        raise BadInput(f"truncated: size says {ns.size} bytes, the blob has {len(blob)} (SET would fault: EFAULT)")
    svm = profile.has("svm")
    if svm and ns.format == _V2:
        cr0 = int.from_bytes(ns.data(V2.VMCB12_SAVE_OFFSET + S.SAVE["cr0"][0], 8), "little")
        vendor: tuple[NS.Rule, ...] = V2.SVM_V2_RULES
    elif svm:
        cr0 = NS.svm_save_u(ns, "cr0")
        vendor = NS.SVM_RULES + NS.SVM_STATE_RULES
    else:
        cr0, vendor = NS.VcpuFacts.cr0, NS.VMX_RULES
    facts = NS.VcpuFacts(has_vmx=profile.has("vmx"), has_svm=svm, maxphyaddr=profile.maxphyaddr,
                         in_smm=False, efer_svme=True, cr0=cr0)
    broken = [f"{errno.errorcode[v.errno]}: {v}" for v in NS.violations(NS.GENERIC_RULES + vendor, ns, facts)]
    guest = ns.flags & U.KVM_STATE_NESTED_GUEST_MODE
    if not broken and guest and ns.format in (U.KVM_STATE_NESTED_FORMAT_VMX, U.KVM_STATE_NESTED_FORMAT_SVM, _V2):
        broken = [f"EINVAL: {line}" for line in _entry_checks(profile_name, ns, blob)]
    return broken


def cmd_validate(args: argparse.Namespace) -> int:
    broken = _validate(args.profile, _read(args.blob))
    for line in broken:
        print(line)
    if not broken:
        print(f"valid for KVM_SET_NESTED_STATE on profile {args.profile}")
    return EXIT_NO if broken else 0


# ---- convert -------------------------------------------------------------------------------

def cmd_convert(args: argparse.Namespace) -> int:
    blob = _load(args.blob)
    fmt = NS.NestedState.decode(blob).format
    want = U.KVM_STATE_NESTED_FORMAT_SVM if args.to == "svm" else _V2
    if fmt == want:
        raise BadInput(f"{args.blob} is already {args.to}")
    if fmt == U.KVM_STATE_NESTED_FORMAT_VMX:
        raise BadInput(f"{args.blob} is a VMX blob; only SVM blobs convert (svm <-> svm-v2)")
    try:
        if args.to == "svm-v2":
            full = len(blob) > NS.HEADER_SIZE
            if full and not args.l2_save:
                raise BadInput("svm -> svm-v2 of a blob with vmcb12 needs --l2-save FILE "
                               "(L2's 744-byte save area: KVM's format does not carry it)")
            out = V2.kvm_to_v2(blob, _read(args.l2_save) if full else b"")
        else:
            out, l2_save = V2.v2_to_kvm(blob)
            if l2_save and args.l2_save:
                _write(args.l2_save, l2_save)
            elif l2_save:
                print("nestvisor state convert: L2's save area dropped (give --l2-save FILE to keep it)",
                      file=sys.stderr)
    except ValueError as e:
        raise BadInput(f"{args.blob}: {e}") from None
    if args.output:
        _write(args.output, out)
    elif sys.stdout.isatty():
        raise BadInput("refusing to write a binary blob to a terminal; give -o OUT")
    else:
        sys.stdout.buffer.write(out)
        sys.stdout.flush()
    return 0


# ---- diff ----------------------------------------------------------------------------------

def _side(v: F.Value | None) -> str:
    return "absent" if v is None else _text(v)


def cmd_diff(args: argparse.Namespace) -> int:
    changes = F.diff(_load(args.a), _load(args.b))
    for path, old, new in changes:
        print(f"{path}: {_side(old)} -> {_side(new)}")
    return EXIT_NO if changes else 0
