/*
 * defs.h - constants shared by the bundled guests (GNU as syntax, no cpp).
 *
 * Every number here is an architectural or platform fact; the source of
 * each group is named in its comment.
 */

/* Multiboot v1 (multiboot spec 3.1.1, 3.2) */
.set MB_HEADER_MAGIC,     0x1BADB002
.set MB_BOOTLOADER_MAGIC, 0x2BADB002
.set MB_HEADER_FLAGS,     0         /* ELF kernel: the loader takes addresses from the ELF headers */

/* GDT selectors, see the table in runtime.h */
.set SEL_CODE32, 0x08
.set SEL_DATA,   0x10
.set SEL_CODE64, 0x18
.set SEL_TSS,    0x28
.set SEL_USER_DATA,   0x38 + 3      /* RPL 3: the selectors CPL-3 code runs with */
.set SEL_USER_CODE64, 0x40 + 3

/* Control register bits (SDM 2.5) */
.set CR0_PE, 1 << 0
.set CR0_NW, 1 << 29
.set CR0_CD, 1 << 30
.set CR0_WP, 1 << 16
.set CR0_AM, 1 << 18
.set CR0_PG, 1 << 31
.set CR4_PAE, 1 << 5

/* RFLAGS (SDM vol. 1, 3.4.3) */
.set RFLAGS_FIXED, 1 << 1
.set RFLAGS_AC,    1 << 18

/* MSRs (SDM vol. 4) */
.set MSR_TSC,            0x00000010
.set MSR_APIC_BASE,      0x0000001B
.set MSR_SYSENTER_ESP,   0x00000175
.set MSR_PAT,            0x00000277
.set MSR_EFER,           0xC0000080
.set MSR_KERNEL_GS_BASE, 0xC0000102
.set EFER_LME, 1 << 8
.set EFER_LMA, 1 << 10
.set PAT_DEFAULT, 0x0007040600070406   /* power-on value, SDM 11.12.4 */

/* Page-table entry bits (SDM 4.5) */
.set PTE_P,   1 << 0
.set PTE_RW,  1 << 1
.set PTE_US,  1 << 2
.set PTE_PWT, 1 << 3
.set PTE_PCD, 1 << 4
.set PTE_PS,  1 << 7

/* Test pages in the 4 KiB-mapped 2 MiB region at 2 MiB (built in runtime.h) */
.set SMALL_REGION, 0x200000
.set NP_PAGE,      0x201000     /* not present: every access is #PF */
.set RO_PAGE,      0x202000     /* present, read-only: a write with CR0.WP=1 is #PF(P|W) */

/* 8250 UART on COM1 (QEMU serial, PC ports) */
.set COM1,     0x3F8
.set UART_LSR, COM1 + 5
.set LSR_THRE, 1 << 5

/* QEMU isa-debug-exit, iobase=0xf4 iosize=4: status = (code << 1) | 1 */
.set DEBUG_EXIT_PORT, 0xF4

/* QEMU fw_cfg (docs/specs/fw_cfg.rst) */
.set FW_CFG_CTL,      0x510
.set FW_CFG_DATA,     0x511
.set FW_CFG_NB_CPUS,  0x05

/* Local xAPIC MMIO (SDM 11.4.1, table 11-1) */
.set APIC_BASE_ADDR, 0xFEE00000
.set APIC_ID,    0x020
.set APIC_VER,   0x030
.set APIC_TPR,   0x080
.set APIC_EOI,   0x0B0
.set APIC_IRR,   0x200    /* 8 registers, 0x10 apart, 32 vectors each */
.set APIC_SPIV,  0x0F0
.set APIC_ICR,   0x300
.set APIC_ICR2,  0x310
.set APIC_LVTT,  0x320
.set APIC_TMICT, 0x380
.set APIC_TMCCT, 0x390
.set APIC_TDCR,  0x3E0
.set APIC_SPIV_ENABLE, 1 << 8
.set ICR_FIXED,   0x000
.set ICR_INIT,    0x500
.set ICR_STARTUP, 0x600
.set ICR_ASSERT,  1 << 14
.set ICR_BUSY,    1 << 12
.set TDCR_DIV1,   0xB

/* Vectors the guests use */
.set VEC_TIMER,    0x40
.set VEC_PING,     0x50     /* BSP -> AP */
.set VEC_PONG,     0x51     /* AP -> BSP, sent by the ping handler */
.set VEC_STI_WINDOW, 0x52   /* the selftest's sti; nop; cli check */
.set VEC_SYSCALL,  0x80     /* int $0x80 */
.set VEC_USER_RET, 0x81     /* int from CPL 3 back to the kernel (the selftest's run_user) */
.set VEC_SPURIOUS, 0xFF

/* AP start-up: the SIPI vector is the 4 KiB page number of the trampoline (SDM 8.4.4.1) */
.set AP_TRAMPOLINE, 0x8000
.set SIPI_VECTOR,   AP_TRAMPOLINE >> 12

/* Exit codes written to the debug-exit port */
.set EXIT_PASS,  0
.set EXIT_FAIL,  1
.set EXIT_ABORT, 63         /* "Bail out!": status 127, as kvm-unit-tests' abort() */
