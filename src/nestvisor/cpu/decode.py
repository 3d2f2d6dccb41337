"""Exact decoding of the instructions the L0 traps (SDM Vol. 2, chapter 2 and the opcode map).

Only the trapped opcodes are decoded; anything else at a site is reported as None and runs
natively. Decoding is by hand rather than through capstone because it sits on the path of
every trapped instruction.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class Op(IntEnum):
    RDMSR = 1
    WRMSR = 2
    MOV_TO_CR = 3
    MOV_FROM_CR = 4
    MOV_TO_DR = 5
    MOV_FROM_DR = 6
    CPUID = 7
    RDTSC = 8
    RDTSCP = 9
    HLT = 10
    PAUSE = 11
    IN = 12
    OUT = 13
    INS = 14
    OUTS = 15
    INVLPG = 16
    LMSW = 17
    CLTS = 18
    XSETBV = 19
    INVD = 33
    WBINVD = 34
    STI = 35
    MOV_SS = 36              # MOV SS / POP SS: noted for "blocking by MOV SS"
    # VMX instructions: the substrate raises #UD for them; they are decoded from the #UD
    VMCALL = 20
    VMLAUNCH = 21
    VMRESUME = 22
    VMXOFF = 23
    VMFUNC = 24
    VMPTRLD = 25
    VMCLEAR = 26
    VMXON = 27
    VMPTRST = 28
    VMREAD = 29
    VMWRITE = 30
    INVEPT = 31
    INVVPID = 32
    # SVM instructions: #UD in the substrate (its EFER.SVME stays 0), decoded at their sites
    VMRUN = 40
    VMMCALL = 41
    VMLOAD = 42
    VMSAVE = 43
    STGI = 44
    CLGI = 45
    SKINIT = 46
    INVLPGA = 47
    RSM = 48                 # #UD outside SMM; decoded from the #UD for the SVM RSM intercept


@dataclass(frozen=True, slots=True)
class MemOperand:
    """A ModRM memory operand: seg:[base + index*scale + disp] (rip_relative: base is RIP)."""

    base: int | None
    index: int | None
    scale: int
    disp: int
    rip_relative: bool
    seg: int          # segment register number (0=ES 1=CS 2=SS 3=DS 4=FS 5=GS)
    addr_size: int    # 2, 4 or 8 bytes


@dataclass(frozen=True, slots=True)
class Insn:
    op: Op
    length: int
    reg: int = 0              # general register operand (MOV CR/DR, LMSW register form)
    crn: int = 0              # control or debug register number
    size: int = 0             # I/O operand size in bytes
    port: int | None = None   # immediate port; None means DX
    rep: bool = False
    addr_size: int = 8
    seg: int = 3              # segment of the source operand of OUTS (DS unless overridden)
    mem: MemOperand | None = None
    rm: int = 0               # register form of a ModRM r/m operand (VMREAD/VMWRITE), when mem is None


_SEG_PREFIX = {0x26: 0, 0x2E: 1, 0x36: 2, 0x3E: 3, 0x64: 4, 0x65: 5}


def _modrm_mem(code: bytes, i: int, bits: int, asize: int, rex: int, seg: int | None) -> tuple[MemOperand, int]:
    """Decode the memory form of the ModRM at code[i]; returns the operand and the index after it."""
    modrm = code[i]
    mod, rm = modrm >> 6, modrm & 7
    i += 1
    if asize == 2:
        # 16-bit addressing (SDM Table 2-1)
        bases = ((3, 6), (3, 7), (5, 6), (5, 7), (6, None), (7, None), (5, None), (3, None))
        base, index = bases[rm]
        disp = 0
        if mod == 0 and rm == 6:
            base, index = None, None
            disp = int.from_bytes(code[i:i + 2], "little", signed=True)
            i += 2
        elif mod == 1:
            disp = int.from_bytes(code[i:i + 1], "little", signed=True)
            i += 1
        elif mod == 2:
            disp = int.from_bytes(code[i:i + 2], "little", signed=True)
            i += 2
        default_seg = 2 if base == 5 else 3
        return MemOperand(base, index, 1, disp, False, default_seg if seg is None else seg, 2), i
    base: int | None = rm | ((rex & 1) << 3)
    index = None
    scale = 1
    rip_rel = False
    if rm == 4:
        sib = code[i]
        i += 1
        scale = 1 << (sib >> 6)
        idx = ((sib >> 3) & 7) | ((rex & 2) << 2)
        index = None if idx == 4 else idx
        base = (sib & 7) | ((rex & 1) << 3)
        if (sib & 7) == 5 and mod == 0:
            base = None
            disp = int.from_bytes(code[i:i + 4], "little", signed=True)
            i += 4
            return MemOperand(base, index, scale, disp, False, 3 if seg is None else seg, asize), i
    elif rm == 5 and mod == 0:
        disp = int.from_bytes(code[i:i + 4], "little", signed=True)
        i += 4
        # SDM 2.2.1.6: RIP-relative in 64-bit mode, absolute disp32 otherwise
        return MemOperand(None, None, 1, disp, bits == 64, 3 if seg is None else seg, asize), i
    disp = 0
    if mod == 1:
        disp = int.from_bytes(code[i:i + 1], "little", signed=True)
        i += 1
    elif mod == 2:
        disp = int.from_bytes(code[i:i + 4], "little", signed=True)
        i += 4
    default_seg = 2 if base in (4, 5) else 3
    return MemOperand(base, index, scale, disp, rip_rel, default_seg if seg is None else seg, asize), i


def decode(code: bytes, bits: int) -> Insn | None:
    """Decode the trapped instruction at the start of `code` in `bits`-bit code, or None."""
    try:
        return _decode(code, bits)
    except IndexError:
        return None


def _decode(code: bytes, bits: int) -> Insn | None:
    i = 0
    opsize16 = bits == 16
    asize = {16: 2, 32: 4, 64: 8}[bits]
    rep = False
    rep_byte = 0
    seg: int | None = None
    rex = 0
    while i < 15:
        b = code[i]
        if b == 0x66:
            opsize16 = bits != 16
        elif b == 0x67:
            asize = 4 if bits in (16, 64) else 2
        elif b in (0xF2, 0xF3):
            rep = True
            rep_byte = b
        elif b in _SEG_PREFIX:
            seg = _SEG_PREFIX[b]
        elif b == 0xF0:
            pass
        else:
            break
        i += 1
    if bits == 64 and 0x40 <= code[i] <= 0x4F:
        rex = code[i] & 0xF
        i += 1
    b = code[i]
    i += 1
    if b == 0xF4:
        return Insn(Op.HLT, i)
    if b == 0xFB:
        return Insn(Op.STI, i)
    if b == 0x17 and bits != 64:
        return Insn(Op.MOV_SS, i)
    if b == 0x8E and (code[i] >> 3) & 7 == 2:
        if code[i] >> 6 == 3:
            return Insn(Op.MOV_SS, i + 1)
        _, end = _modrm_mem(code, i, bits, asize, rex, seg)
        return Insn(Op.MOV_SS, end)
    if b == 0x90 and rep_byte == 0xF3 and not rex & 1:
        return Insn(Op.PAUSE, i)
    if b in (0xE4, 0xE5, 0xE6, 0xE7):
        size = 1 if b in (0xE4, 0xE6) else (2 if opsize16 else 4)
        return Insn(Op.IN if b < 0xE6 else Op.OUT, i + 1, size=size, port=code[i])
    if b in (0xEC, 0xED, 0xEE, 0xEF):
        size = 1 if b in (0xEC, 0xEE) else (2 if opsize16 else 4)
        return Insn(Op.IN if b < 0xEE else Op.OUT, i, size=size)
    if b in (0x6C, 0x6D, 0x6E, 0x6F):
        size = 1 if b in (0x6C, 0x6E) else (2 if opsize16 else 4)
        return Insn(Op.INS if b < 0x6E else Op.OUTS, i, size=size, rep=rep, addr_size=asize,
                    seg=3 if seg is None else seg)
    if b != 0x0F:
        return None
    b = code[i]
    i += 1
    simple = {0x30: Op.WRMSR, 0x32: Op.RDMSR, 0x31: Op.RDTSC, 0xA2: Op.CPUID, 0x06: Op.CLTS, 0xAA: Op.RSM,
              0x08: Op.INVD, 0x09: Op.WBINVD}
    if b in simple:
        return Insn(simple[b], i)
    if b in (0x20, 0x21, 0x22, 0x23):
        # SDM "MOV—Move to/from Control Registers": mod is ignored, always a register operand
        modrm = code[i]
        crn = ((modrm >> 3) & 7) | ((rex & 4) << 1)
        reg = (modrm & 7) | ((rex & 1) << 3)
        op = {0x20: Op.MOV_FROM_CR, 0x21: Op.MOV_FROM_DR, 0x22: Op.MOV_TO_CR, 0x23: Op.MOV_TO_DR}[b]
        return Insn(op, i + 1, reg=reg, crn=crn)
    if b == 0x01:
        modrm = code[i]
        if modrm in _VMX_0F01:
            return Insn(_VMX_0F01[modrm], i + 1)
        if modrm in _SVM_0F01:
            return Insn(_SVM_0F01[modrm], i + 1)
        if modrm == 0xD1:
            return Insn(Op.XSETBV, i + 1)
        if modrm == 0xF9:
            return Insn(Op.RDTSCP, i + 1)
        reg, mod = (modrm >> 3) & 7, modrm >> 6
        if reg == 7 and mod != 3:
            mem, end = _modrm_mem(code, i, bits, asize, rex, seg)
            return Insn(Op.INVLPG, end, mem=mem)
        if reg == 6:
            if mod == 3:
                return Insn(Op.LMSW, i + 1, reg=(modrm & 7) | ((rex & 1) << 3))
            mem, end = _modrm_mem(code, i, bits, asize, rex, seg)
            return Insn(Op.LMSW, end, mem=mem)
        return None
    if b == 0xC7:
        # SDM "VMPTRLD/VMCLEAR/VMXON" (0F C7 /6 m64, by prefix) and "VMPTRST" (0F C7 /7 m64)
        modrm = code[i]
        reg, mod = (modrm >> 3) & 7, modrm >> 6
        if mod == 3 or reg not in (6, 7):
            return None
        if reg == 7:
            op = Op.VMPTRST
        else:
            op = {0xF3: Op.VMXON}.get(rep_byte, Op.VMCLEAR if opsize16 != (bits == 16) else Op.VMPTRLD)
        mem, end = _modrm_mem(code, i, bits, asize, rex, seg)
        return Insn(op, end, mem=mem)
    if b in (0x78, 0x79) and not rep_byte and opsize16 == (bits == 16):
        # SDM "VMREAD" (0F 78 /r: r/m <- field reg) and "VMWRITE" (0F 79 /r: field reg <- r/m)
        modrm = code[i]
        reg = ((modrm >> 3) & 7) | ((rex & 4) << 1)
        if modrm >> 6 == 3:
            return Insn(Op.VMREAD if b == 0x78 else Op.VMWRITE, i + 1, reg=reg, rm=(modrm & 7) | ((rex & 1) << 3))
        mem, end = _modrm_mem(code, i, bits, asize, rex, seg)
        return Insn(Op.VMREAD if b == 0x78 else Op.VMWRITE, end, reg=reg, mem=mem)
    if b == 0x38 and code[i] in (0x80, 0x81) and opsize16 != (bits == 16):
        # SDM "INVEPT"/"INVVPID" (66 0F 38 80/81 /r: type in reg, descriptor m128)
        op = Op.INVEPT if code[i] == 0x80 else Op.INVVPID
        modrm = code[i + 1]
        if modrm >> 6 == 3:
            return None
        mem, end = _modrm_mem(code, i + 1, bits, asize, rex, seg)
        return Insn(op, end, reg=((modrm >> 3) & 7) | ((rex & 4) << 1), mem=mem)
    return None


# SDM "VMCALL", "VMLAUNCH/VMRESUME", "VMXOFF", "VMFUNC": 0F 01 C1..C4, D4
_VMX_0F01 = {0xC1: Op.VMCALL, 0xC2: Op.VMLAUNCH, 0xC3: Op.VMRESUME, 0xC4: Op.VMXOFF, 0xD4: Op.VMFUNC}
# APM vol. 3 "VMRUN" .. "INVLPGA": 0F 01 D8..DF
_SVM_0F01 = {0xD8: Op.VMRUN, 0xD9: Op.VMMCALL, 0xDA: Op.VMLOAD, 0xDB: Op.VMSAVE, 0xDC: Op.STGI, 0xDD: Op.CLGI,
             0xDE: Op.SKINIT, 0xDF: Op.INVLPGA}
SVM_OPS = frozenset(_SVM_0F01.values())
VMX_OPS = frozenset((Op.VMCALL, Op.VMLAUNCH, Op.VMRESUME, Op.VMXOFF, Op.VMFUNC, Op.VMPTRLD, Op.VMCLEAR,
                     Op.VMXON, Op.VMPTRST, Op.VMREAD, Op.VMWRITE, Op.INVEPT, Op.INVVPID))
