import struct
from types import SimpleNamespace

import capstone
import pytest
import unicorn
from unicorn import x86_const as X

from nestvisor.platform import firmware as fw

MBI, ENTRY = 0x9500, 0x4000CC  # kvm-unit-tests vmx.flat's entry


def disasm(code: bytes, addr: int, mode: int) -> list[tuple[str, str]]:
    md = capstone.Cs(capstone.CS_ARCH_X86, mode)
    return [(i.mnemonic, i.op_str) for i in md.disasm(code, addr)]


def test_stub_disassembles_to_the_documented_sequence():
    where = fw.layout()
    stub = fw.build_stub(MBI, ENTRY)
    c16 = stub[: where["code32"] - where["code16"]]
    c32 = stub[where["code32"] - where["code16"]: where["code_end"] - where["code16"]]
    assert disasm(c16, where["code16"], capstone.CS_MODE_16) == [
        ("cli", ""),
        ("lgdt", f"[{where['gdtr']:#x}]"),
        ("mov", "eax, cr0"),
        ("and", "eax, 0x1fffffff"),
        ("or", "eax, 1"),
        ("mov", "cr0, eax"),
        ("ljmp", f"8:{where['code32']:#x}"),
    ]
    assert disasm(c32, where["code32"], capstone.CS_MODE_32) == [
        ("mov", "eax, 0x10"),
        ("mov", "ds, eax"),
        ("mov", "es, eax"),
        ("mov", "fs, eax"),
        ("mov", "gs, eax"),
        ("mov", "ss, eax"),
        ("mov", "eax, 0x2badb002"),
        ("mov", f"ebx, {MBI:#x}"),
        ("ljmp", f"8:{ENTRY:#x}"),
    ]
    # one row per instruction: the table and the bytes agree
    assert len(fw.CODE16) == 7 and len(fw.CODE32) == 9


def decode_descriptor(desc: int) -> dict[str, int]:
    """SDM 3.4.5 descriptor fields."""
    limit = (desc & 0xFFFF) | ((desc >> 32) & 0xF0000)
    base = ((desc >> 16) & 0xFFFFFF) | (((desc >> 56) & 0xFF) << 24)
    return {"base": base, "limit": limit, "type": (desc >> 40) & 0xF, "s": (desc >> 44) & 1,
            "p": (desc >> 47) & 1, "l": (desc >> 53) & 1, "db": (desc >> 54) & 1,
            "g": (desc >> 55) & 1}


def test_gdt_is_flat_32bit_code_and_data():
    where = fw.layout()
    stub = fw.build_stub(MBI, ENTRY)
    limit, base = struct.unpack_from("<HI", stub, where["gdtr"] - fw.STUB_ADDR)
    assert (limit, base) == (8 * 3 - 1, where["gdt"])
    gdt = struct.unpack_from("<3Q", stub, where["gdt"] - fw.STUB_ADDR)
    assert gdt[0] == 0
    code, data = decode_descriptor(gdt[1]), decode_descriptor(gdt[2])
    for d in (code, data):  # multiboot §3.2: offset 0, limit 0xFFFFFFFF, 32-bit
        assert (d["base"], d["limit"], d["g"], d["db"], d["l"], d["p"], d["s"]) == (
            0, 0xFFFFF, 1, 1, 0, 1, 1)
    assert code["type"] == 0xA and data["type"] == 0x2  # execute/read, read/write


def test_stub_runs_to_the_multiboot_entry_state():
    """Execute the stub on unicorn from real mode and check the machine state at the entry."""
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_16)
    uc.mem_map(0, 8 << 20)
    uc.mem_write(fw.STUB_ADDR, fw.build_stub(MBI, ENTRY))
    uc.mem_write(ENTRY, b"\xf4")
    uc.reg_write(X.UC_X86_REG_CR0, 0x60000010)  # reset value (SDM 9.1.1): CD|NW|ET
    uc.reg_write(X.UC_X86_REG_EAX, 0x11111111)
    uc.emu_start(fw.STUB_ADDR, ENTRY, count=100)
    assert uc.reg_read(X.UC_X86_REG_EIP) == ENTRY
    assert uc.reg_read(X.UC_X86_REG_EAX) == 0x2BADB002
    assert uc.reg_read(X.UC_X86_REG_EBX) == MBI
    cr0 = uc.reg_read(X.UC_X86_REG_CR0)
    assert cr0 & 1 and not cr0 & (fw.CR0_PG | fw.CR0_CD | fw.CR0_NW)
    assert uc.reg_read(X.UC_X86_REG_CS) == fw.KERNEL_CS
    for reg in (X.UC_X86_REG_DS, X.UC_X86_REG_ES, X.UC_X86_REG_FS, X.UC_X86_REG_GS,
                X.UC_X86_REG_SS):
        assert uc.reg_read(reg) == fw.KERNEL_DS
    assert not uc.reg_read(X.UC_X86_REG_EFLAGS) & (1 << 9)  # IF clear


def test_enter_stub_sets_real_mode_cs_zero_and_ip():
    seg = SimpleNamespace(selector=0xF000, base=0xFFFF0000, limit=0xFFFF, flags=0x9B00)
    vcpu = SimpleNamespace(sregs=SimpleNamespace(cs=seg), regs=SimpleNamespace(rip=0xFFF0, rflags=2))
    vcpu.get_sregs = lambda: vcpu.sregs
    vcpu.set_sregs = lambda s: setattr(vcpu, "set_sregs_arg", s)
    vcpu.get_regs = lambda: vcpu.regs
    vcpu.set_regs = lambda r: setattr(vcpu, "set_regs_arg", r)
    fw.enter_stub(vcpu)
    cs = vcpu.set_sregs_arg.cs
    assert (cs.selector, cs.base, cs.limit, cs.flags) == (0, 0, 0xFFFF, 0x9B00)
    assert (vcpu.set_regs_arg.rip, vcpu.set_regs_arg.rflags) == (fw.STUB_ADDR, 2)


def test_stub_outside_first_64k_is_refused():
    with pytest.raises(ValueError, match="first 64 KiB"):
        fw.build_stub(MBI, ENTRY, base=0xFFC0)
