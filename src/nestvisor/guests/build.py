"""Build the bundled guests into multiboot kernels with the system's GNU binutils.

``build(name)`` assembles ``src/<name>.S`` (which ``.include``s the shared
``src/*.h``), links it as ELF64 at 1 MiB with ``src/guest.ld`` and converts the
result with ``objcopy -O elf32-i386``: multiboot v1 loaders, QEMU's included,
accept only ELF32, and the 32-bit entry code reaches the 64-bit code by itself.
This is the recipe kvm-unit-tests uses for its ``.flat`` files.

Kernels are cached in ``$NESTVISOR_BUILD_DIR`` (default
``~/.cache/nestvisor/guests``) under a name keyed by a hash of every source
file, the recipe and the assembler's version, so an edit rebuilds and nothing
else does.

    python -m nestvisor.guests.build selftest demo     # prints one path per guest
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SRC_DIR = Path(__file__).resolve().parent / "src"
LINKER_SCRIPT = SRC_DIR / "guest.ld"

# Bump when the commands below change, so cached kernels built the old way are not reused.
RECIPE_VERSION = 1

_NAME_RE = re.compile(r"^[a-z0-9_]+$")


class GuestBuildError(RuntimeError):
    """A guest could not be built: missing tool, unknown guest, or assembler/linker error."""


def build_dir() -> Path:
    """Where built kernels are cached: ``$NESTVISOR_BUILD_DIR`` or ``~/.cache/nestvisor/guests``."""
    env = os.environ.get("NESTVISOR_BUILD_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nestvisor" / "guests"


def available() -> list[str]:
    """Names of the guests that can be built (one per ``src/<name>.S``)."""
    return sorted(p.stem for p in SRC_DIR.glob("*.S"))


def _tool(name: str) -> str:
    # A cross binutils (non-x86 host) is preferred over a native one that cannot emit x86-64.
    for candidate in (f"x86_64-linux-gnu-{name}", name):
        path = shutil.which(candidate)
        if path:
            return path
    raise GuestBuildError(
        f"GNU '{name}' not found on PATH: the bundled guests are built with binutils "
        f"(as, ld, objcopy); install it, e.g. 'apt-get install binutils'"
    )


def _run(cmd: list[str], what: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise GuestBuildError(f"{what} failed ({' '.join(cmd)}):\n{detail}")
    return proc.stdout


def _sources() -> list[Path]:
    return sorted(p for p in SRC_DIR.iterdir() if p.suffix in (".S", ".h", ".ld"))


def source_hash(name: str, assembler_version: str = "") -> str:
    """Hash of everything the kernel depends on: all sources (shared headers included), the recipe."""
    h = hashlib.sha256()
    h.update(f"nestvisor-guest:{name}:recipe{RECIPE_VERSION}:{assembler_version}\n".encode())
    for path in _sources():
        data = path.read_bytes()
        h.update(f"{path.name}:{len(data)}\n".encode())
        h.update(data)
    return h.hexdigest()


def build(name: str) -> Path:
    """Build guest ``name`` (or reuse the cached kernel) and return the ELF32 multiboot kernel's path."""
    if not _NAME_RE.match(name) or not (SRC_DIR / f"{name}.S").is_file():
        raise GuestBuildError(
            f"unknown guest {name!r}: the bundled guests are {', '.join(available())}"
        )
    as_ = _tool("as")
    ld = _tool("ld")
    objcopy = _tool("objcopy")
    version = _run([as_, "--version"], "as --version").splitlines()[0]
    out_dir = build_dir()
    target = out_dir / f"{name}-{source_hash(name, version)[:16]}.elf"
    if target.is_file():
        return target

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=out_dir) as tmp:
        obj = Path(tmp) / f"{name}.o"
        elf64 = Path(tmp) / f"{name}.elf64"
        elf32 = Path(tmp) / f"{name}.elf"
        _run([as_, "--64", "-I", str(SRC_DIR), "-o", str(obj), str(SRC_DIR / f"{name}.S")],
             f"assembling guest {name!r}")
        ld_cmd = [ld, "-m", "elf_x86_64", "-nostdlib", "--build-id=none",
                  "-z", "max-page-size=4096", "-T", str(LINKER_SCRIPT), "-o", str(elf64), str(obj)]
        # One RWX segment is intended (code and data share pages); binutils >= 2.39 warns about it.
        if "--no-warn-rwx-segments" in _run([ld, "--help"], "ld --help"):
            ld_cmd.insert(1, "--no-warn-rwx-segments")
        _run(ld_cmd, f"linking guest {name!r}")
        _run([objcopy, "-O", "elf32-i386", str(elf64), str(elf32)], f"converting guest {name!r}")
        # Atomic: a concurrent build of the same sources writes the same bytes.
        os.replace(elf32, target)
    return target


def main(argv: list[str] | None = None) -> int:
    """``python -m nestvisor.guests.build [NAME...]``: build (all by default), print the paths."""
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(f"usage: python -m nestvisor.guests.build [NAME...]\nguests: {' '.join(available())}")
        return 0
    try:
        for name in args or available():
            print(build(name))
    except GuestBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
