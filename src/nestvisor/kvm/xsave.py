"""struct kvm_xsave and struct kvm_xcrs: the layouts and the rules KVM applies on SET.

kvm_xsave is 4096 bytes (`__u32 region[1024]`): the 512-byte FXSAVE legacy region, the
64-byte XSAVE header at 512 (XSTATE_BV, XCOMP_BV, 48 reserved bytes), then the extended
components, none of which this CPU has (CPUID.(EAX=0DH,ECX=0):EAX = 3: x87 and SSE only).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ..cpu import fpu
from .errors import einval

KVM_XSAVE_SIZE = 4096
XSAVE_HDR_OFFSET = 512
XSAVE_HDR_SIZE = 64
XFEATURE_MASK_FP, XFEATURE_MASK_SSE, XFEATURE_MASK_YMM = 1, 2, 4
XCR_XFEATURE_ENABLED_MASK = 0
KVM_MAX_XCRS = 16
_MXCSR_OFFSET = 24
_HDR = struct.Struct("<QQ48s")   # xstate_bv, xcomp_bv, reserved
assert _HDR.size == XSAVE_HDR_SIZE


@dataclass
class Xcrs:
    """struct kvm_xcrs: `xcrs` maps XCR index to value (KVM only has XCR0)."""

    xcrs: dict[int, int] = field(default_factory=dict)
    flags: int = 0


def supported_xcr0(cpuid: dict[tuple[int, int], tuple[int, int, int, int]]) -> int:
    """KVM guest_supported_xcr0: CPUID.(EAX=0DH,ECX=0):EDX:EAX."""
    a, _, _, d = cpuid.get((0xD, 0), (0, 0, 0, 0))
    return a | (d << 32)


def encode(image: bytes) -> bytes:
    """kvm_xsave from an FXSAVE image. XSTATE_BV always has x87 and SSE: this model keeps
    no "init state" tracking (KVM sets a bit only for a component not in its init state,
    and a restore with the bit set loads the same values)."""
    out = bytearray(KVM_XSAVE_SIZE)
    out[:fpu.FXSAVE_SIZE] = image
    _HDR.pack_into(out, XSAVE_HDR_OFFSET, XFEATURE_MASK_FP | XFEATURE_MASK_SSE, 0, bytes(48))
    return bytes(out)


def decode(blob: bytes | bytearray | memoryview, supported: int) -> bytes:
    """The FXSAVE image to load from a kvm_xsave, after KVM's checks (EINVAL on a bad one):
    fpu_copy_uabi_to_guest_fpstate and copy_uabi_to_xstate (validate_user_xstate_header,
    then MXCSR's reserved bits). A component whose XSTATE_BV bit is clear is loaded in its
    init state, as XRSTOR does."""
    if len(blob) != KVM_XSAVE_SIZE:
        raise einval(f"kvm_xsave is {KVM_XSAVE_SIZE} bytes, not {len(blob)} (struct kvm_xsave)")
    xstate_bv, xcomp_bv, reserved = _HDR.unpack_from(blob, XSAVE_HDR_OFFSET)
    if xstate_bv & ~supported:
        raise einval(f"header.xfeatures {xstate_bv:#x} has components this CPU lacks "
                     f"(supported {supported:#x}; fpu_copy_uabi_to_guest_fpstate)")
    if xcomp_bv:
        raise einval("header.xcomp_bv must be 0: the standard format only (validate_user_xstate_header)")
    if any(reserved):
        raise einval("header reserved bytes must be 0 (validate_user_xstate_header)")
    image = bytearray(blob[:fpu.FXSAVE_SIZE])
    mxcsr = struct.unpack_from("<I", image, _MXCSR_OFFSET)[0]
    if xstate_bv & (XFEATURE_MASK_FP | XFEATURE_MASK_SSE | XFEATURE_MASK_YMM) and mxcsr & ~fpu.MXCSR_MASK:
        raise einval(f"mxcsr {mxcsr:#x} has reserved bits set (copy_uabi_to_xstate)")
    if not xstate_bv & XFEATURE_MASK_FP:
        # SDM 13.6: x87 init state: FCW 037FH, FSW/FTW/FOP/FIP/FDP and ST0-7 zero
        struct.pack_into("<HHBxHQQ", image, 0, fpu.FCW_INIT, 0, 0, 0, 0, 0)
        image[32:160] = bytes(128)
    if not xstate_bv & (XFEATURE_MASK_SSE | XFEATURE_MASK_YMM):
        struct.pack_into("<I", image, _MXCSR_OFFSET, fpu.MXCSR_INIT)
    if not xstate_bv & XFEATURE_MASK_SSE:
        image[160:416] = bytes(256)
    return bytes(image)


def check_xcrs(xcrs: Xcrs, supported: int) -> int | None:
    """KVM kvm_vcpu_ioctl_x86_set_xcrs + __kvm_set_xcr: the XCR0 to load (None: the table
    has no XCR0, which KVM accepts and ignores), or EINVAL."""
    if len(xcrs.xcrs) > KVM_MAX_XCRS or xcrs.flags:
        raise einval("nr_xcrs above KVM_MAX_XCRS or flags set (kvm_vcpu_ioctl_x86_set_xcrs)")
    if XCR_XFEATURE_ENABLED_MASK not in xcrs.xcrs:
        return None
    xcr0 = xcrs.xcrs[XCR_XFEATURE_ENABLED_MASK]
    if not xcr0 & XFEATURE_MASK_FP:
        raise einval(f"xcr0 {xcr0:#x}: bit 0 (x87) must be set (__kvm_set_xcr)")
    if xcr0 & XFEATURE_MASK_YMM and not xcr0 & XFEATURE_MASK_SSE:
        raise einval(f"xcr0 {xcr0:#x}: AVX without SSE (__kvm_set_xcr)")
    if xcr0 & ~(supported | XFEATURE_MASK_FP):
        raise einval(f"xcr0 {xcr0:#x} has bits outside guest_supported_xcr0 {supported:#x} (__kvm_set_xcr)")
    return xcr0
