import struct

import pytest

from nestvisor.platform.debug_exit import DebugExit
from nestvisor.platform.fw_cfg import FwCfg
from nestvisor.platform.pic import PicPair
from nestvisor.platform.pio import PioBus
from nestvisor.platform.serial import COM1_BASE, Serial16550


@pytest.fixture
def uart():
    out = []
    return Serial16550(out.append), out


def test_serial_init_sequence_then_output(uart):
    dev, out = uart
    # kvm-unit-tests serial init: LCR.DLAB, divisor, LCR=3, FCR=0, MCR=3
    dev.pio_write(0x3FB, 1, 0x80)
    dev.pio_write(0x3F8, 1, 0x01)
    dev.pio_write(0x3F9, 1, 0x00)
    assert (dev.pio_read(0x3F8, 1), dev.pio_read(0x3F9, 1)) == (0x01, 0x00)
    dev.pio_write(0x3FB, 1, 0x03)
    dev.pio_write(0x3FA, 1, 0x00)
    dev.pio_write(0x3FC, 1, 0x03)
    assert out == []  # divisor writes are not output
    for ch in b"ok\n":
        assert dev.pio_read(0x3FD, 1) & 0x20  # LSR.THRE: ready
        dev.pio_write(0x3F8, 1, ch)
    assert b"".join(out) == b"ok\n"
    assert (dev.dll, dev.dlm, dev.lcr, dev.mcr) == (1, 0, 3, 3)


def test_serial_register_reads(uart):
    dev, _ = uart
    assert dev.pio_read(0x3FD, 1) == 0x60  # THRE | TEMT
    assert dev.pio_read(0x3FA, 1) == 0x01  # IIR: no interrupt pending
    assert dev.pio_read(0x3F8, 1) == 0  # RBR: nothing received
    dev.pio_write(0x3F9, 1, 0x0F)
    assert dev.pio_read(0x3F9, 1) == 0x0F  # IER with DLAB=0
    dev.pio_write(0x3FF, 1, 0x5A)
    assert dev.pio_read(0x3FF, 1) == 0x5A  # scratch
    dev.pio_write(0x3FB, 1, 0x83)
    assert dev.pio_read(0x3FB, 1) == 0x83


@pytest.mark.parametrize("code, status", [(0, 1), (1, 3), (38, 77), (63, 127)])
def test_debug_exit_status(code, status):
    dev = DebugExit()
    assert dev.status is None
    dev.pio_write(0xF4, 4, code)
    assert dev.status == status  # QEMU debugexit: (val << 1) | 1


def test_debug_exit_value_bounded_by_access_size():
    dev = DebugExit()
    dev.pio_write(0xF4, 1, 0x1FF)
    assert dev.status == (0xFF << 1) | 1


def fw_read(dev: FwCfg, key: int, n: int) -> bytes:
    dev.pio_write(0x510, 2, key)
    return bytes(dev.pio_read(0x511, 1) for _ in range(n))


def test_fw_cfg_items():
    dev = FwCfg(ram_size=4 << 30, nb_cpus=2)
    assert fw_read(dev, 0x00, 4) == b"QEMU"
    assert struct.unpack("<I", fw_read(dev, 0x01, 4))[0] == 1
    assert struct.unpack("<Q", fw_read(dev, 0x03, 8))[0] == 4 << 30
    assert struct.unpack("<H", fw_read(dev, 0x05, 2))[0] == 2
    assert struct.unpack("<H", fw_read(dev, 0x0F, 2))[0] == 2


def test_fw_cfg_reselect_rewinds_and_past_end_is_zero():
    dev = FwCfg(ram_size=128 << 20, nb_cpus=1)
    assert fw_read(dev, 0x00, 2) == b"QE"
    assert fw_read(dev, 0x00, 6) == b"QEMU\0\0"
    assert fw_read(dev, 0x11, 8) == bytes(8)  # absent key (MAX_RAM): zeros -> "no limit"
    assert fw_read(dev, 0x8000, 2) == bytes(2)  # arch-local table is empty


def test_pic_icw_sequence_then_mask():
    pic = PicPair()
    # Linux/BIOS style init: ICW1=0x11 (edge, cascade, ICW4), ICW2 base, ICW3, ICW4
    for port, value in ((0x20, 0x11), (0x21, 0x20), (0x21, 0x04), (0x21, 0x01),
                        (0xA0, 0x11), (0xA1, 0x28), (0xA1, 0x02), (0xA1, 0x01)):
        pic.pio_write(port, 1, value)
    assert (pic.master.vector_base, pic.slave.vector_base) == (0x20, 0x28)
    assert (pic.master.icw3, pic.slave.icw3, pic.master.icw4) == (0x04, 0x02, 0x01)
    assert pic.pio_read(0x21, 1) == 0  # ICW1 cleared the mask
    pic.pio_write(0x21, 1, 0xFF)  # kvm-unit-tests: mask everything
    pic.pio_write(0xA1, 1, 0xFF)
    assert (pic.pio_read(0x21, 1), pic.pio_read(0xA1, 1)) == (0xFF, 0xFF)
    assert pic.pio_read(0x20, 1) == 0  # IRR


def test_pic_mask_without_init():
    pic = PicPair()
    pic.pio_write(0xA1, 1, 0xFB)
    assert pic.pio_read(0xA1, 1) == 0xFB and pic.pio_read(0x21, 1) == 0


def test_bus_dispatch_and_unassigned_ports():
    out = []
    bus = PioBus()
    bus.register(Serial16550(out.append), COM1_BASE, 8)
    bus.write(0x3F8, 1, ord("A"))
    assert out == [b"A"]
    assert bus.read(0x80, 1) == 0xFF
    assert bus.read(0x4FFF, 2) == 0xFFFF
    assert bus.read(0x9000, 4) == 0xFFFFFFFF
    bus.write(0x80, 1, 0)
    bus.write(0x80, 1, 0)
    assert bus.unassigned.writes[0x80] == 2 and bus.unassigned.reads[0x4FFF] == 1
    with pytest.raises(ValueError, match="already assigned"):
        bus.register(DebugExit(), 0x3FC, 4)
