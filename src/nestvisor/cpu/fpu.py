"""The x87/SSE state of an execution context as the 512-byte FXSAVE image, and XCR0.

The image is the 64-bit FXSAVE layout (SDM Vol. 1 Table 10-2, REX.W form; Linux's struct
fxregs_state), which is also the legacy region of KVM_GET_XSAVE: FCW, FSW, the abridged tag
word, FOP, FIP and FDP as 64-bit offsets, MXCSR and MXCSR_MASK, ST0-ST7 in stack order,
XMM0-XMM15. Unicorn exposes the x87 registers physically (FP0-FP7) with a full 2-bit tag
word, so the image is built by rotating by TOP and abridging the tags as FXSAVE does.
"""

from __future__ import annotations

import ctypes
import struct
from typing import TYPE_CHECKING

from unicorn import x86_const as X

from . import context as C

if TYPE_CHECKING:
    from .engine import ExecContext

FXSAVE_SIZE = 512
# QEMU's MXCSR_MASK (helper_fxsave): every MXCSR bit below 16 is supported, DAZ included
MXCSR_MASK = 0xFFFF
FCW_INIT = 0x037F     # FNINIT / XRSTOR init values (SDM 13.6)
MXCSR_INIT = 0x1F80

_HEAD = struct.Struct("<HHBxHQQII")   # fcw fsw ftw(abridged) rsvd fop fip fdp mxcsr mxcsr_mask
_ST_OFFSET, _XMM_OFFSET = 32, 160
_FP = tuple(getattr(X, f"UC_X86_REG_FP{i}") for i in range(8))
_XMM = tuple(getattr(X, f"UC_X86_REG_XMM{i}") for i in range(16))
assert _HEAD.size == _ST_OFFSET   # the header ends where ST0 begins


def read_fxsave(ctx: ExecContext) -> bytes:
    """FXSAVE64 of the context's current x87/SSE state (without touching guest memory)."""
    uc = ctx.uc
    fsw = uc.reg_read(X.UC_X86_REG_FPSW)
    top = (fsw >> 11) & 7
    tags = uc.reg_read(X.UC_X86_REG_FPTAG)
    # SDM 10.5.1.1: the abridged tag has one bit per physical register, 1 = not empty (tag != 11b)
    ftw = sum(1 << i for i in range(8) if (tags >> (2 * i)) & 3 != 3)
    out = bytearray(FXSAVE_SIZE)
    _HEAD.pack_into(out, 0, uc.reg_read(X.UC_X86_REG_FPCW), fsw, ftw, uc.reg_read(X.UC_X86_REG_FOP) & 0x7FF,
                    uc.reg_read(X.UC_X86_REG_FIP), uc.reg_read(X.UC_X86_REG_FDP),
                    uc.reg_read(X.UC_X86_REG_MXCSR), MXCSR_MASK)
    for i in range(8):
        mantissa, exponent = uc.reg_read(_FP[(top + i) & 7])
        struct.pack_into("<QH", out, _ST_OFFSET + 16 * i, mantissa, exponent)
    for i, rid in enumerate(_XMM):
        out[_XMM_OFFSET + 16 * i:_XMM_OFFSET + 16 * i + 16] = uc.reg_read(rid).to_bytes(16, "little")
    return bytes(out)


def write_fxsave(ctx: ExecContext, image: bytes) -> None:
    """FXRSTOR64 of `image` into the context (no checks: the caller applied KVM's rules)."""
    uc = ctx.uc
    fcw, fsw, ftw, fop, fip, fdp, mxcsr, _ = _HEAD.unpack_from(image, 0)
    top = (fsw >> 11) & 7
    uc.reg_write(X.UC_X86_REG_FPCW, fcw)
    uc.reg_write(X.UC_X86_REG_FPSW, fsw)
    # FXRSTOR rebuilds each tag from the abridged bit; unicorn only tells empty (11b) from not
    uc.reg_write(X.UC_X86_REG_FPTAG, sum((0 if ftw >> i & 1 else 3) << (2 * i) for i in range(8)))
    uc.reg_write(X.UC_X86_REG_FOP, fop)
    uc.reg_write(X.UC_X86_REG_FIP, fip)
    uc.reg_write(X.UC_X86_REG_FDP, fdp)
    uc.reg_write(X.UC_X86_REG_MXCSR, mxcsr)
    for i in range(8):
        mantissa, exponent = struct.unpack_from("<QH", image, _ST_OFFSET + 16 * i)
        uc.reg_write(_FP[(top + i) & 7], (mantissa, exponent))
    for i, rid in enumerate(_XMM):
        uc.reg_write(rid, int.from_bytes(image[_XMM_OFFSET + 16 * i:_XMM_OFFSET + 16 * i + 16], "little"))


def read_xcr0(ctx: ExecContext) -> int:
    """XCR0 as XSETBV left it (QEMU CPUX86State.xcr0; XSETBV runs natively)."""
    ctx.ctx.save()
    return ctx.ctx.u64(C.OFF_XCR0)


def write_xcr0(ctx: ExecContext, value: int) -> None:
    """Load XCR0 (only outside run(); the caller checked it as KVM's __kvm_set_xcr does)."""
    ctx.ctx.save()
    ctx.ctx.set_u64(C.OFF_XCR0, value)
    ctx.ctx.restore()


def share(src: ExecContext, dst: ExecContext) -> None:
    """Give `dst` the x87/SSE state and XCR0 of `src`: VM entry and exit switch neither (SDM
    26.3, 27.5; APM 15.5.1), so L1 and L2, each in its own execution context, share them.
    Copied between the two live CPU states (outside run() only)."""
    s, d = src.trap.env, dst.trap.env
    ctypes.memmove(d + C.OFF_FPU, s + C.OFF_FPU, C.OFF_FPU_END - C.OFF_FPU)
    ctypes.memmove(d + C.OFF_XCR0, s + C.OFF_XCR0, 8)
