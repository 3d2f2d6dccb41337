"""QEMU fw_cfg, the legacy port interface: selector at 0x510 (16-bit), data at 0x511 (bytes).

Interface and keys: QEMU docs/specs/fw_cfg.rst and include/standard-headers/linux/qemu_fw_cfg.h.
Numbers are stored little endian (QEMU fw_cfg_add_i16/i32/i64). Selecting a key rewinds the
data offset; reading past an item's end, or reading an absent key, gives 0.
"""

from __future__ import annotations

import struct

FW_CFG_PORT_SEL = 0x510
FW_CFG_PORT_DATA = 0x511

FW_CFG_SIGNATURE = 0x00
FW_CFG_ID = 0x01
FW_CFG_RAM_SIZE = 0x03
FW_CFG_NOGRAPHIC = 0x04
FW_CFG_NB_CPUS = 0x05
FW_CFG_MAX_CPUS = 0x0F
FW_CFG_FILE_DIR = 0x19

FW_CFG_ID_TRADITIONAL = 1  # bit 0: the port interface; bit 1 (DMA) is not offered
FW_CFG_ARCH_LOCAL = 0x8000
FW_CFG_ENTRY_MASK = 0x3FFF  # QEMU: the key without WRITE_CHANNEL (0x4000) and ARCH_LOCAL


class FwCfg:
    def __init__(self, *, ram_size: int, nb_cpus: int, max_cpus: int | None = None) -> None:
        self.items: dict[int, bytes] = {
            FW_CFG_SIGNATURE: b"QEMU",
            FW_CFG_ID: struct.pack("<I", FW_CFG_ID_TRADITIONAL),
            FW_CFG_RAM_SIZE: struct.pack("<Q", ram_size),
            FW_CFG_NOGRAPHIC: struct.pack("<H", 1),
            FW_CFG_NB_CPUS: struct.pack("<H", nb_cpus),
            FW_CFG_MAX_CPUS: struct.pack("<H", max_cpus if max_cpus is not None else nb_cpus),
            FW_CFG_FILE_DIR: struct.pack(">I", 0),  # the file directory is big endian: no files
        }
        self.selector = 0
        self.offset = 0

    def pio_write(self, port: int, size: int, value: int) -> None:
        if port == FW_CFG_PORT_SEL:
            self.selector = value & 0xFFFF
            self.offset = 0
        # Data writes: QEMU 2.4+ ignores them (fw_cfg.rst "Writing to the data port").

    def pio_read(self, port: int, size: int) -> int:
        if port != FW_CFG_PORT_DATA:
            return (1 << (8 * size)) - 1  # the selector register is write-only
        # QEMU fw_cfg_comb_read: one data byte per access, whatever the access width.
        # QEMU fw_cfg_select: ARCH_LOCAL keys (0x8000) are a second table, empty here.
        arch_local = self.selector & FW_CFG_ARCH_LOCAL
        item = b"" if arch_local else self.items.get(self.selector & FW_CFG_ENTRY_MASK, b"")
        if self.offset < len(item):
            byte = item[self.offset]
            self.offset += 1
            return byte
        return 0
