"""nestvisor's snapshot file: an envelope checked before anything inside is decoded.

Envelope (little endian, 32 bytes, then the payload):

| offset | size | field |
|---|---|---|
| 0 | 8 | magic b"NVSNAP\\r\\n" (the CR LF catches text-mode transfers, as PNG's does) |
| 8 | 4 | version (2; 1 had the vCPU's `ipi_yield`) |
| 12 | 4 | flags: bit 0 = payload is zlib-compressed |
| 16 | 8 | payload size in bytes |
| 24 | 4 | CRC32 of the payload as stored |
| 28 | 4 | reserved, 0 |

Order of checks on load (Firecracker's snapshot rule, STYLE practice 10): magic, version,
flags, the size against the limit and against the file, the CRC; only then is the payload
decompressed (bounded by the limit) and decoded.

Payload: u32 length of a UTF-8 JSON document, the document, then the byte strings it
references. The document is {"kind": <type name>, "blobs": [lengths], "state": <value>}; a
dataclass is an object of its fields, `bytes` is {"blob": index}, dict keys are strings.
Decoding follows the dataclasses' type hints and names the field path of any mismatch.
Nested state inside is KVM's exact blob (a `bytes` field), never re-encoded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import types
import typing
import zlib
from typing import Any, TypeVar

MAGIC = b"NVSNAP\r\n"
VERSION = 2
FLAG_ZLIB = 1
MAX_SIZE = 16 << 30   # a 16 GiB payload: far above any VM nestvisor runs, far below a bogus size
_ENVELOPE = struct.Struct("<8sIIQII")
_U32 = struct.Struct("<I")
assert _ENVELOPE.size == 32

T = TypeVar("T")


class SnapshotError(ValueError):
    """A snapshot file or value that cannot be loaded; the message names the field."""


# ---- values <-> JSON + blobs -------------------------------------------------------------------

def _to_json(value: Any, blobs: list[bytes]) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_json(getattr(value, f.name), blobs) for f in dataclasses.fields(value)}
    if isinstance(value, bytes | bytearray | memoryview):
        blobs.append(bytes(value))
        return {"blob": len(blobs) - 1}
    if isinstance(value, dict):
        return {str(k): _to_json(v, blobs) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_json(v, blobs) for v in value]
    if value is None or isinstance(value, bool | int | str):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a snapshot")


def _from_json(value: Any, tp: Any, path: str, blobs: list[bytes]) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) != 1:
            raise SnapshotError(f"{path}: unsupported union {tp}")
        return _from_json(value, options[0], path, blobs)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise SnapshotError(f"{path}: expected an object for {tp.__name__}")
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp)}
        if set(value) != names:
            raise SnapshotError(f"{path}: fields {sorted(set(value) ^ names)} do not match {tp.__name__}")
        return tp(**{n: _from_json(value[n], hints[n], f"{path}.{n}", blobs) for n in names})
    if tp is bytes:
        if not isinstance(value, dict) or set(value) != {"blob"} or type(value["blob"]) is not int \
                or not 0 <= value["blob"] < len(blobs):
            raise SnapshotError(f"{path}: expected a blob reference")
        return blobs[value["blob"]]
    if origin is dict:
        kt, vt = args
        if not isinstance(value, dict):
            raise SnapshotError(f"{path}: expected an object")
        out = {}
        for k, v in value.items():
            try:
                key = int(k) if kt is int else k
            except ValueError:
                raise SnapshotError(f"{path}: key {k!r} is not an integer") from None
            out[key] = _from_json(v, vt, f"{path}[{k}]", blobs)
        return out
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise SnapshotError(f"{path}: expected a list")
        if origin is list or (len(args) == 2 and args[1] is Ellipsis):
            return origin(_from_json(v, args[0], f"{path}[{i}]", blobs) for i, v in enumerate(value))
        if len(value) != len(args):
            raise SnapshotError(f"{path}: expected {len(args)} items, got {len(value)}")
        return tuple(_from_json(v, t, f"{path}[{i}]", blobs) for i, (v, t) in enumerate(zip(value, args, strict=True)))
    if tp in (int, bool, str):
        if type(value) is not tp:   # exact: JSON true is not an int here, nor 1 a bool
            raise SnapshotError(f"{path}: expected {tp.__name__}, got {type(value).__name__}")
        return value
    raise SnapshotError(f"{path}: unsupported type {tp}")


def encode(state: Any, compress: bool = True) -> bytes:
    """The file image of a snapshot dataclass (VmSnapshot, MachineSnapshot, VcpuState).

    >>> import nestvisor
    >>> from nestvisor.kvm.snapshot import VcpuState
    >>> state = nestvisor.Kvm().create_vm().create_vcpu(0).save_state()
    >>> decode(encode(state), VcpuState) == state
    True
    >>> decode(b"ELF" + encode(state)[3:], VcpuState)
    Traceback (most recent call last):
    ...
    nestvisor.kvm.snapfile.SnapshotError: envelope.magic: not a nestvisor snapshot
    """
    blobs: list[bytes] = []
    doc = {"kind": type(state).__name__, "state": _to_json(state, blobs)}
    doc["blobs"] = [len(b) for b in blobs]
    text = json.dumps(doc, separators=(",", ":")).encode()
    body = b"".join([_U32.pack(len(text)), text, *blobs])
    payload = zlib.compress(body, 1) if compress else body
    head = _ENVELOPE.pack(MAGIC, VERSION, FLAG_ZLIB if compress else 0, len(payload), zlib.crc32(payload), 0)
    return head + payload


def decode(data: bytes | bytearray | memoryview, cls: type[T], max_size: int = MAX_SIZE) -> T:
    """Check the envelope, then decode a `cls` (SnapshotError names what is wrong)."""
    data = memoryview(data)
    if len(data) < _ENVELOPE.size:
        raise SnapshotError(f"envelope: {len(data)} bytes, shorter than the {_ENVELOPE.size}-byte header")
    magic, version, flags, size, crc, reserved = _ENVELOPE.unpack_from(data)
    if magic != MAGIC:
        raise SnapshotError("envelope.magic: not a nestvisor snapshot")
    if version != VERSION:
        raise SnapshotError(f"envelope.version: {version}, this nestvisor reads version {VERSION}")
    if flags & ~FLAG_ZLIB or reserved:
        raise SnapshotError(f"envelope.flags: unknown bits {flags & ~FLAG_ZLIB:#x} or reserved {reserved:#x}")
    if size > max_size:
        raise SnapshotError(f"envelope.size: {size} bytes, above the {max_size}-byte limit")
    if size != len(data) - _ENVELOPE.size:
        raise SnapshotError(f"envelope.size: says {size} bytes, the file holds {len(data) - _ENVELOPE.size}")
    payload = data[_ENVELOPE.size:]
    if zlib.crc32(payload) != crc:
        raise SnapshotError("envelope.crc32: the payload is corrupt")
    if flags & FLAG_ZLIB:
        z = zlib.decompressobj()
        try:
            body = z.decompress(payload, max_size + 1)
        except zlib.error as e:
            raise SnapshotError(f"payload: {e}") from None
        if len(body) > max_size or not z.eof:
            raise SnapshotError(f"payload: decompresses beyond the {max_size}-byte limit or is truncated")
    else:
        body = bytes(payload)
    return _decode_body(body, cls)


def _decode_body(body: bytes, cls: type[T]) -> T:
    if len(body) < _U32.size:
        raise SnapshotError("payload: too short for the document length")
    n = _U32.unpack_from(body)[0]
    try:
        doc = json.loads(body[_U32.size:_U32.size + n])
    except (UnicodeDecodeError, ValueError) as e:
        raise SnapshotError(f"payload.document: {e}") from None
    if not isinstance(doc, dict) or set(doc) != {"kind", "state", "blobs"}:
        raise SnapshotError("payload.document: expected kind, state and blobs")
    if doc["kind"] != cls.__name__:
        raise SnapshotError(f"payload.kind: a {doc['kind']!r} snapshot, not a {cls.__name__}")
    lengths = doc["blobs"]
    if not isinstance(lengths, list) or not all(type(x) is int and x >= 0 for x in lengths):
        raise SnapshotError("payload.blobs: expected a list of lengths")
    off = _U32.size + n
    if off + sum(lengths) != len(body):
        raise SnapshotError(f"payload.blobs: {sum(lengths)} bytes declared, {len(body) - off} present")
    blobs = []
    for length in lengths:
        blobs.append(body[off:off + length])
        off += length
    return _from_json(doc["state"], cls, cls.__name__, blobs)


def save(path: str | os.PathLike[str], state: Any) -> None:
    """Write a snapshot file (through a temporary file, so a crash leaves the old one)."""
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "wb") as f:
        f.write(encode(state))
    os.replace(tmp, path)


def load(path: str | os.PathLike[str], cls: type[T], max_size: int = MAX_SIZE) -> T:
    """Read a snapshot file of type `cls`, refusing a file above the limit before reading it."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_size + _ENVELOPE.size:
            raise SnapshotError(f"envelope.size: the file has {size} bytes, above the {max_size}-byte limit")
        return decode(f.read(), cls, max_size)
