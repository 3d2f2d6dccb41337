"""vmcs12: L1's VMCS as a 4 KiB image in KVM's layout; the image is the source of truth."""

from __future__ import annotations

import struct

from ...arch import vmcs as V

_FMT = {2: struct.Struct("<H"), 4: struct.Struct("<I"), 8: struct.Struct("<Q")}
_U32 = _FMT[4]


def _all_fields() -> tuple[struct.Struct, tuple[str, ...]]:
    """One struct for every field, with the padding between them: a snapshot is one unpack."""
    fmt, names, at = "<", [], 0
    for f in sorted(V.FIELDS, key=lambda f: f.offset):
        if f.offset > at:
            fmt += f"{f.offset - at}x"
        fmt += {2: "H", 4: "I", 8: "Q"}[f.size]
        names.append(f.name)
        at = f.offset + f.size
    return struct.Struct(fmt), tuple(names)


_ALL, _NAMES = _all_fields()


class Vmcs12:
    """The cached vmcs12 (KVM's cached_vmcs12): fields by name or by `arch.vmcs.Field`."""

    __slots__ = ("data",)

    def __init__(self, data: bytes | bytearray | None = None) -> None:
        self.data = bytearray(data) if data is not None else bytearray(V.VMCS12_SIZE)

    @property
    def revision(self) -> int:
        return _U32.unpack_from(self.data, V.OFF_REVISION)[0] & ~V.SHADOW_VMCS_BIT

    @property
    def shadow(self) -> bool:
        return bool(_U32.unpack_from(self.data, V.OFF_REVISION)[0] & V.SHADOW_VMCS_BIT)

    @property
    def launch_state(self) -> int:
        return _U32.unpack_from(self.data, V.OFF_LAUNCH_STATE)[0]

    @launch_state.setter
    def launch_state(self, value: int) -> None:
        _U32.pack_into(self.data, V.OFF_LAUNCH_STATE, value)

    def read(self, f: V.Field) -> int:
        return _FMT[f.size].unpack_from(self.data, f.offset)[0]

    def write(self, f: V.Field, value: int) -> None:
        _FMT[f.size].pack_into(self.data, f.offset, value & ((1 << (8 * f.size)) - 1))

    def __getitem__(self, name: str) -> int:
        return self.read(V.BY_NAME[name])

    def __setitem__(self, name: str, value: int) -> None:
        self.write(V.BY_NAME[name], value)

    def fields(self) -> dict[str, int]:
        """Every field by name, read at once (the entry checks and vmcs02 set-up use this)."""
        return dict(zip(_NAMES, _ALL.unpack_from(self.data, 0), strict=True))
