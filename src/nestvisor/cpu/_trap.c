/*
 * The hooks of a nestvisor execution context.
 *
 * unicorn can hook only a few instructions (IN, OUT, CPUID, RDTSC, ...). Everything else
 * the L0 must see (RDMSR, WRMSR, MOV CR/DR, HLT, INVLPG, PAUSE, ...) is trapped at its
 * address. Two costs must stay off the guest's straight-line code:
 *   - the clock: counting instructions one by one (unicorn's `count`) runs every
 *     instruction through a helper call and walks the whole code-hook list each time;
 *   - trap sites: unicorn walks the whole code-hook list at every hooked instruction, so
 *     the list must hold only addresses where a trapped instruction really starts.
 * So the clock is kept per translation block: nv_block_hook adds the block's instruction
 * count (decoded once by Python, with the offset of each instruction) and stops emulation
 * when the budget is spent, or before a block that would run past a hard limit (which
 * Python then reaches one instruction at a time). Inside a block the clock is exact all the
 * same: an instruction's time is the count before its block plus the block's instructions
 * that start before it (clock_at); that is what RDTSC answers, what Python reads in a trap
 * or an I/O callback (nv_clock), and how many a stopped run retired (nv_retired). Sites get
 * one code hook each (nv_site_hook), registered when Python counts a block and finds a
 * trapped instruction in it (the block is then translated again, with the hook); the block
 * hook also tells Python every linear page a block starts or ends on the first time it
 * runs, so the sites already found in that physical page are hooked at their new address.
 * A third hook, on code fetch during translation, notices when a scanned page is
 * translated again (self-modifying or newly written code) so Python can rescan it.
 * A fourth, on data accesses, is installed only while CR0.AM = 1, because any memory hook
 * sends every access through unicorn's slow path: it raises #AC (nv_align_hook).
 *
 * No unicorn header is needed: the hook signatures are unicorn's public ABI.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

enum nv_action {
    NV_CONTINUE = 0,     /* not a trap after all: let unicorn execute it */
    NV_HANDLED = 1,      /* emulated, RIP already moved */
    NV_STOP_BEFORE = 2,  /* stop emulation before this instruction */
    NV_HANDLED_STOP = 3, /* emulated, then stop emulation */
    NV_SKIP = 0x100,     /* | length: emulated, RIP moves past the instruction here */
};

#define NV_STI_SITE 0xFF
#define NV_RDMSR_SITE 0x80   /* | the instruction's length */
#define NV_PAUSE_SITE 0x40   /* | the instruction's length */
#define NV_WRMSR_SITE 0x20   /* | the instruction's length */

/* x2APIC ICR (SDM 11.12.9, KVM X2APIC_ICR_RESERVED_BITS) */
#define MSR_X2APIC_ICR 0x830
#define ICR_RESERVED ((0xFFFu << 20) | (0x3u << 16) | (1u << 13))
#define ICR_BUSY 0x1000u
#define ICR_MODE_MASK 0x700u
#define ICR_DM_NMI 0x400u
#define ICR_DEST_LOGICAL 0x800u
#define ICR_SHORT_MASK 0xC0000u
#define ICR_DEST_SELF 0x40000u

#define MSR_X2APIC_TMCCT 0x839
#define APIC_TMCCT 0x390
#define APIC_ICR 0x300
#define APIC_ICR2 0x310
#define XAPIC_BROADCAST 0xFFu
#define NV_TMCCT_MSR 1    /* fast_tmcct bits: answer RDMSR 0x839 (x2APIC mode) */
#define NV_TMCCT_MMIO 2   /* answer a 32-bit read of the xAPIC page at 0x390 */

enum nv_stop { NV_STOP_NONE = 0, NV_STOP_BUDGET = 1, NV_STOP_SITE = 2, NV_STOP_RETRY = 3, NV_STOP_PAUSE = 4 };

/* on_count's answer when it hooked trap sites in the block: the block, translated without
 * them, must be translated again */
#define NV_COUNT_RETRY (-2)

typedef int (*nv_emu_stop_fn)(void *uc);
typedef int (*nv_py_page_fn)(uint64_t addr);
typedef int (*nv_py_site_fn)(uint64_t addr);
typedef int (*nv_py_recheck_fn)(void);
typedef int (*nv_py_count_fn)(uint64_t addr, uint32_t size);   /* fills nv_trap.offsets */
typedef int (*nv_reg_write_fn)(void *uc, int regid, const void *value);
typedef void (*nv_raise_fn)(void *env, int vector, int error_code);
typedef bool (*nv_restore_fn)(void *cpu, uintptr_t host_pc, bool will_exit);
typedef void (*nv_interrupt_fn)(void *env, int vector, int is_hw);
typedef uint64_t (*nv_py_mmio_read_fn)(uint64_t offset, uint32_t size);
typedef void (*nv_py_mmio_write_fn)(uint64_t offset, uint32_t size, uint64_t value);
typedef int (*nv_emu_start_fn)(void *uc, uint64_t begin, uint64_t until, uint64_t timeout, size_t count);
typedef int (*nv_ctl_fn)(void *uc, int control, ...);

#define NV_RECHECK_MAX 64

/* A translation block's instructions: how many, and where each starts (offset from the block). */
struct nv_block {
    uint32_t n;
    uint16_t off[];
};

struct nv_trap {
    /* fields read and written from Python through ctypes: keep in sync with native.py */
    uint64_t icount;
    uint64_t budget;
    uint32_t stop_reason;
    uint32_t recheck_count;
    uint64_t recheck[NV_RECHECK_MAX];  /* physical pages translated again since last check */
    nv_emu_stop_fn emu_stop;
    nv_py_page_fn on_page;
    nv_py_site_fn on_site;
    nv_py_recheck_fn on_recheck;
    nv_py_count_fn on_count;
    /* RDTSC answered here, without Python: TSC = tsc_base + icount (the vCPU's instruction
     * clock plus its TSC offsets), at the sites Python registered with nv_fast_rdtsc, while
     * fast_tsc is set (no CR4.TSD, no RDTSC exiting to L1) */
    nv_reg_write_fn reg_write;
    int32_t reg_rax, reg_rdx, reg_rip;
    uint32_t fast_tsc;
    uint64_t tsc_base;
    /* STI sites Python registered run natively (no callback) unless sti_watch is set: an
     * interrupt waits for the window STI opens */
    uint32_t sti_watch;
    /* Alignment check, in nv_align_hook: QEMU's live CPU state (CPUX86State) with its hflags
     * (CPL in bits 1:0) and eflags (AC is kept there, not in the lazily computed flags), and
     * QEMU's raise_exception_err. Unicorn puts RIP back at the instruction before it calls a
     * memory hook, so raising there abandons the access and reaches UC_HOOK_INTR exactly as
     * a fault QEMU finds itself (#PF, #GP) does */
    void *env;
    const uint32_t *hflags;
    const uint64_t *eflags;
    nv_raise_fn raise_exception_err;
    uint64_t ac_flag;
    int32_t ac_vector;
    /* on_count writes a block's instruction offsets to `offsets`. env->eip and CS's base say
     * where the CPU stands (QEMU's block address is base + EIP): EIP is current in a hook and
     * after a run, and in an I/O callback once nv_sync_io_pc has run. */
    uint16_t *offsets;
    uint32_t offsets_cap;
    const uint64_t *eip;
    const uint64_t *cs_base;
    /* stop before a block that would run past this count (the budget is only checked at
     * block starts, so a run may pass it) */
    uint64_t limit;
    /* QEMU's CPUState, its mem_io_pc and cpu_restore_state, for nv_sync_io_pc */
    void *cpu;
    uintptr_t *mem_io_pc;
    nv_restore_fn restore_state;
    /* An NMI or external interrupt to deliver before the next block runs (vector + 1; 0 =
     * none), by QEMU's do_interrupt_x86_hardirq (seg_helper.c): inside the run a fault
     * while delivering reaches UC_HOOK_INTR like any other. Cleared before the call, so
     * Python can tell "delivered or faulted" from "the run never reached a block". */
    int32_t inject;
    nv_interrupt_fn do_interrupt;
    /* NMIs latched while the hook may deliver them itself (nmi_native: outside guest mode,
     * GIF set): one is taken at the first block start where neither an NMI (HF2_NMI_MASK,
     * cleared by IRET) nor an STI/MOV SS shadow blocks it; nmi_taken counts them */
    uint32_t nmi_pending;
    uint32_t nmi_native;
    uint32_t nmi_taken;
    uint32_t *hflags2;
    uint32_t hf_inhibit_irq;
    uint32_t hf2_nmi;
    /* The APIC timer's current count (TMCCT) answered here while the timer counts down in
     * this run (KVM apic_get_tmcct: min(target - now, period) / divisor, now = clock_base +
     * the instruction clock), at RDMSR sites Python registered with nv_fast_rdmsr and in
     * the xAPIC page's read callback. At or after the target the timer fires: Python. */
    uint32_t fast_tmcct;
    uint64_t clock_base;
    uint64_t tmcct_target;
    uint64_t tmcct_period;
    uint64_t tmcct_divisor;
    uint64_t *regs;   /* CPUX86State.regs: ECX says which MSR */
    nv_py_mmio_read_fn apic_read;   /* every other read of the xAPIC page */
    /* PAUSE at sites Python registered with nv_fast_pause, while pause_yield is set (other
     * vCPUs to yield to, no L1 to intercept it): retired here, and the run stops
     * (NV_STOP_PAUSE) so the vCPU gives up its slice */
    uint32_t pause_yield;
    /* An x2APIC ICR write that sends this vCPU an NMI, at WRMSR sites Python registered with
     * nv_fast_wrmsr (KVM's handle_fastpath_set_x2apic_icr_irqoff): taken here while
     * icr_self_nmi is set (every APIC in x2APIC mode, NMIs taken by the hook) and the clock
     * is before lapic_quiet_until (no timer event the LAPIC would catch up first). The ICR
     * value waits in icr_value (icr_written) for Python's LAPIC; icr_fast counts them. */
    uint32_t icr_self_nmi;
    uint32_t x2apic_id;
    uint64_t lapic_quiet_until;
    uint64_t icr_value;
    uint32_t icr_written;
    uint32_t icr_fast;
    /* The same for the xAPIC page's ICR2 and ICR writes (xapic_self_nmi: no other APIC
     * answers this one's xAPIC ID as a physical destination); icr_value starts as the
     * LAPIC's ICR2:ICR and apic_write takes every other write of the page. */
    uint32_t xapic_self_nmi;
    uint32_t xapic_id;
    nv_py_mmio_write_fn apic_write;
    /* nv_run: unicorn's uc_emu_start and uc_ctl (the TB_FLUSH code), and QEMU's
     * env->old_exception */
    nv_emu_start_fn emu_start;
    nv_ctl_fn ctl;
    int32_t ctl_tb_flush;
    int32_t *old_exception;
    /* set by nv_run when the run left something for Python: an NMI taken or still pending,
     * an ICR value or a count of fast ICR writes, an event it did not deliver */
    uint32_t attention;
    /* private */
    uint64_t last_page;
    uint64_t *keys;       /* known linear page number + 1 (0 = empty slot) */
    uint8_t **vals;       /* unused payload, kept for the shared open-addressing helpers */
    uint32_t cap, used;
    uint64_t *pkeys;      /* scanned physical page numbers + 1 */
    uint32_t pcap, pused;
    uint64_t *ckeys;      /* block key: (address << 12 | size) + 1 */
    uint32_t *cvals;      /* instructions in that block (also in cblocks, read on every block) */
    struct nv_block **cblocks;
    uint32_t ccap, cused;
    /* the running block: its instructions (NULL until its hook counted it), the count
     * before it, its linear address and size */
    const struct nv_block *block;
    uint64_t block_icount;
    uint64_t block_addr;
    uint32_t block_size;
    uint64_t mru_key;     /* the block counted last (ckeys key, 0 = none) */
    const struct nv_block *mru_block;
    uint64_t *fkeys;      /* native site: linear address + 1 */
    uint8_t *fvals;       /* RDTSC: its length; NV_STI_SITE: an STI */
    uint32_t fcap, fused;
};

static uint64_t hash64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    return x;
}

static int64_t find_slot(uint64_t *keys, uint32_t cap, uint64_t key)
{
    uint32_t mask = cap - 1, i = (uint32_t)hash64(key) & mask;
    for (;;) {
        if (keys[i] == key || keys[i] == 0)
            return i;
        i = (i + 1) & mask;
    }
}

struct nv_trap *nv_new(void)
{
    struct nv_trap *t = calloc(1, sizeof(*t));
    if (!t)
        return NULL;
    t->cap = 1024;
    t->keys = calloc(t->cap, sizeof(uint64_t));
    t->vals = calloc(t->cap, sizeof(uint8_t *));
    t->pcap = 1024;
    t->pkeys = calloc(t->pcap, sizeof(uint64_t));
    t->ccap = 4096;
    t->ckeys = calloc(t->ccap, sizeof(uint64_t));
    t->cvals = calloc(t->ccap, sizeof(uint32_t));
    t->cblocks = calloc(t->ccap, sizeof(struct nv_block *));
    t->fcap = 256;
    t->fkeys = calloc(t->fcap, sizeof(uint64_t));
    t->fvals = calloc(t->fcap, sizeof(uint8_t));
    t->last_page = UINT64_MAX;
    t->budget = UINT64_MAX;
    t->limit = UINT64_MAX;
    return t;
}

static void clear_pages(struct nv_trap *t)
{
    for (uint32_t i = 0; i < t->cap; i++) {
        free(t->vals[i]);
        t->vals[i] = NULL;
        t->keys[i] = 0;
    }
    t->used = 0;
    t->last_page = UINT64_MAX;
    /* fast sites are linear addresses too */
    memset(t->fkeys, 0, t->fcap * sizeof(uint64_t));
    t->fused = 0;
}

void nv_flush_counts(struct nv_trap *t);

void nv_free(struct nv_trap *t)
{
    if (!t)
        return;
    clear_pages(t);
    nv_flush_counts(t);
    free(t->keys);
    free(t->vals);
    free(t->pkeys);
    free(t->ckeys);
    free(t->cvals);
    free(t->cblocks);
    free(t->fkeys);
    free(t->fvals);
    free(t);
}

/* Forget every linear page record: the linear->physical map changed (CR3, INVLPG, mode). */
void nv_flush(struct nv_trap *t)
{
    clear_pages(t);
}

static void grow(struct nv_trap *t)
{
    uint32_t oldcap = t->cap;
    uint64_t *ok = t->keys;
    uint8_t **ov = t->vals;
    t->cap = oldcap * 2;
    t->keys = calloc(t->cap, sizeof(uint64_t));
    t->vals = calloc(t->cap, sizeof(uint8_t *));
    for (uint32_t i = 0; i < oldcap; i++) {
        if (ok[i]) {
            int64_t s = find_slot(t->keys, t->cap, ok[i]);
            t->keys[s] = ok[i];
            t->vals[s] = ov[i];
        }
    }
    free(ok);
    free(ov);
}

/* Record that a linear page has been scanned (its sites are hooked). */
int nv_set_page(struct nv_trap *t, uint64_t linear_page)
{
    if ((t->used + 1) * 2 > t->cap)
        grow(t);
    uint64_t key = linear_page + 1;
    int64_t s = find_slot(t->keys, t->cap, key);
    if (t->keys[s] == 0)
        t->used++;
    t->keys[s] = key;
    t->last_page = UINT64_MAX;
    return 0;
}

/* Drop one linear page record (its physical page changed). Open addressing: rehash. */
void nv_drop_page(struct nv_trap *t, uint64_t linear_page)
{
    memset(t->fkeys, 0, t->fcap * sizeof(uint64_t));   /* rare: drop every fast site */
    t->fused = 0;
    int64_t s = find_slot(t->keys, t->cap, linear_page + 1);
    if (t->keys[s] == 0)
        return;
    free(t->vals[s]);
    t->vals[s] = NULL;
    t->keys[s] = 0;
    t->used--;
    uint32_t mask = t->cap - 1;
    for (uint32_t i = ((uint32_t)s + 1) & mask; t->keys[i]; i = (i + 1) & mask) {
        uint64_t k = t->keys[i];
        uint8_t *v = t->vals[i];
        t->keys[i] = 0;
        t->vals[i] = NULL;
        int64_t n = find_slot(t->keys, t->cap, k);
        t->keys[n] = k;
        t->vals[n] = v;
    }
    t->last_page = UINT64_MAX;
}

static void put_native(struct nv_trap *t, uint64_t addr, uint8_t val);

/* Answer RDTSC at this linear address natively from now on (until the next flush). */
void nv_fast_rdtsc(struct nv_trap *t, uint64_t addr, uint32_t len)
{
    put_native(t, addr, (uint8_t)len);
}

/* Answer the RDMSR at this linear address here when it reads TMCCT (see fast_tmcct). */
void nv_fast_rdmsr(struct nv_trap *t, uint64_t addr, uint32_t len)
{
    put_native(t, addr, (uint8_t)(NV_RDMSR_SITE | len));
}

/* Take the x2APIC ICR writes of the WRMSR at this linear address here (see icr_self_nmi). */
void nv_fast_wrmsr(struct nv_trap *t, uint64_t addr, uint32_t len)
{
    put_native(t, addr, (uint8_t)(NV_WRMSR_SITE | len));
}

/* Whether WRMSR's EDX:EAX is an ICR value Python's LAPIC would turn into exactly one NMI for
 * this vCPU (KVM kvm_x2apic_icr_write -> kvm_apic_send_ipi, physical or self). */
static bool icr_self_nmi(const struct nv_trap *t, uint64_t value)
{
    uint32_t lo = (uint32_t)value, dest = (uint32_t)(value >> 32);
    if ((lo & ICR_RESERVED) || (lo & ICR_MODE_MASK) != ICR_DM_NMI)
        return false;
    if ((lo & ICR_SHORT_MASK) == ICR_DEST_SELF)
        return true;
    return (lo & ICR_SHORT_MASK) == 0 && !(lo & ICR_DEST_LOGICAL) && dest == t->x2apic_id;
}

/* Retire the PAUSE at this linear address here and stop (see pause_yield). */
void nv_fast_pause(struct nv_trap *t, uint64_t addr, uint32_t len)
{
    put_native(t, addr, (uint8_t)(NV_PAUSE_SITE | len));
}

/* Let the STI at this linear address run without a callback while sti_watch is clear. */
void nv_passive_sti(struct nv_trap *t, uint64_t addr)
{
    put_native(t, addr, NV_STI_SITE);
}

static void put_native(struct nv_trap *t, uint64_t addr, uint8_t val)
{
    if ((t->fused + 1) * 2 > t->fcap) {
        /* full: start over; Python registers sites again as they run */
        memset(t->fkeys, 0, t->fcap * sizeof(uint64_t));
        t->fused = 0;
    }
    int64_t s = find_slot(t->fkeys, t->fcap, addr + 1);
    if (!t->fkeys[s]) {
        t->fkeys[s] = addr + 1;
        t->fvals[s] = val;
        t->fused++;
    }
}

/* Remember that a physical page was scanned, so a later translation of it is noticed. */
void nv_mark_scanned(struct nv_trap *t, uint64_t phys_page)
{
    if ((t->pused + 1) * 2 > t->pcap) {
        uint32_t oldcap = t->pcap;
        uint64_t *ok = t->pkeys;
        t->pcap = oldcap * 2;
        t->pkeys = calloc(t->pcap, sizeof(uint64_t));
        for (uint32_t i = 0; i < oldcap; i++)
            if (ok[i])
                t->pkeys[find_slot(t->pkeys, t->pcap, ok[i])] = ok[i];
        free(ok);
    }
    int64_t s = find_slot(t->pkeys, t->pcap, phys_page + 1);
    if (!t->pkeys[s]) {
        t->pkeys[s] = phys_page + 1;
        t->pused++;
    }
}

/* Forget block instruction counts (code changed). */
void nv_flush_counts(struct nv_trap *t)
{
    for (uint32_t i = 0; i < t->ccap; i++) {
        free(t->cblocks[i]);
        t->cblocks[i] = NULL;
        t->ckeys[i] = 0;
    }
    t->cused = 0;
    t->block = NULL;
    t->mru_key = 0;
}

static void put_count(struct nv_trap *t, uint64_t key, struct nv_block *b)
{
    if ((t->cused + 1) * 2 > t->ccap) {
        uint32_t oldcap = t->ccap;
        uint64_t *ok = t->ckeys;
        uint32_t *ov = t->cvals;
        struct nv_block **ob = t->cblocks;
        t->ccap = oldcap * 2;
        t->ckeys = calloc(t->ccap, sizeof(uint64_t));
        t->cvals = calloc(t->ccap, sizeof(uint32_t));
        t->cblocks = calloc(t->ccap, sizeof(struct nv_block *));
        for (uint32_t i = 0; i < oldcap; i++) {
            if (ok[i]) {
                int64_t s = find_slot(t->ckeys, t->ccap, ok[i]);
                t->ckeys[s] = ok[i];
                t->cvals[s] = ov[i];
                t->cblocks[s] = ob[i];
            }
        }
        free(ok);
        free(ov);
        free(ob);
    }
    int64_t s = find_slot(t->ckeys, t->ccap, key);
    if (!t->ckeys[s])
        t->cused++;
    free(t->cblocks[s]);
    t->ckeys[s] = key;
    t->cvals[s] = b->n;
    t->cblocks[s] = b;
}

/* Instructions retired before the one at linear address pc: those before the running block,
 * plus the block's own that start before pc; all of them when pc is not inside it (the
 * block ran to its end, or its hook stopped the run before it ran). */
static uint64_t clock_at(const struct nv_trap *t, uint64_t pc)
{
    const struct nv_block *b = t->block;
    if (!b || pc - t->block_addr >= t->block_size)
        return t->icount;
    uint32_t off = (uint32_t)(pc - t->block_addr), lo = 0, hi = b->n;
    while (lo < hi) {
        uint32_t mid = (lo + hi) / 2;
        if (b->off[mid] < off)
            lo = mid + 1;
        else
            hi = mid;
    }
    return t->block_icount + lo;
}

/* Instructions retired since the run started, where the CPU stands now: at the instruction
 * a hook runs for, or where a run stopped. */
uint64_t nv_clock(struct nv_trap *t)
{
    return clock_at(t, *t->cs_base + *t->eip);
}

/* In a memory-mapped I/O callback EIP may still be where the block started (QEMU syncs it
 * at block starts and hooks only): QEMU's record of the translation gives the accessing
 * instruction (cpu_restore_state, as unicorn does before its memory hooks). mem_io_pc is
 * consumed, so an access that did not come from translated code restores nothing. */
void nv_sync_io_pc(struct nv_trap *t)
{
    uintptr_t pc = *t->mem_io_pc;
    *t->mem_io_pc = 0;
    t->restore_state(t->cpu, pc, false);
}

/* After emulation stopped, perhaps inside a block: the instructions retired since the run
 * started, from which the count goes on when emulation resumes (the block's whole count was
 * added when it began). */
uint64_t nv_retired(struct nv_trap *t)
{
    t->icount = nv_clock(t);
    t->block = NULL;
    return t->icount;
}

/* One run from EIP: at most about `budget` instructions, never a block past `limit`; the
 * whole translation cache is dropped and the run goes on when a hook hooked new sites in code
 * already translated (NV_STOP_RETRY). Every start has no exception in flight: QEMU's
 * check_exception escalates from env->old_exception, which only do_interrupt_all resets, and
 * unicorn faults internally where no hook sees it. Returns unicorn's error; the instructions
 * retired are then in icount (nv_retired). */
int nv_run(struct nv_trap *t, void *uc, uint64_t budget, uint64_t limit)
{
    t->icount = 0;
    t->budget = budget;
    t->limit = limit;
    t->stop_reason = NV_STOP_NONE;
    for (;;) {
        *t->old_exception = -1;
        int err = t->emu_start(uc, *t->eip, UINT64_MAX, 0, 0);
        if (t->stop_reason != NV_STOP_RETRY) {
            nv_retired(t);
            t->attention = t->nmi_taken || t->nmi_pending || t->icr_written || t->icr_fast || t->inject;
            return err;
        }
        t->ctl(uc, t->ctl_tb_flush);
        t->stop_reason = NV_STOP_NONE;
    }
}

static void stop(void *uc, struct nv_trap *t, uint32_t reason)
{
    t->stop_reason = reason;
    t->emu_stop(uc);
}

/* Make sure a linear page's sites are hooked; true when the block must be translated again. */
static bool known_page(void *uc, struct nv_trap *t, uint64_t page)
{
    if (page == t->last_page)
        return false;
    int64_t s = find_slot(t->keys, t->cap, page + 1);
    if (t->keys[s] == 0) {
        int added = t->on_page(page << 12);
        if (added < 0) {
            stop(uc, t, NV_STOP_SITE);
            return true;
        }
        if (added > 0) {
            stop(uc, t, NV_STOP_RETRY);
            return true;
        }
    }
    t->last_page = page;
    return false;
}

void nv_block_hook(void *uc, uint64_t addr, uint32_t size, struct nv_trap *t)
{
    /* until the block is counted, the clock stands at its first instruction */
    t->block = NULL;
    if (t->inject) {
        int vector = t->inject - 1;
        t->inject = 0;
        t->do_interrupt(t->env, vector, 1);
        /* writing RIP makes unicorn leave this block and go on at the handler */
        uint64_t rip = *t->eip;
        t->reg_write(uc, t->reg_rip, &rip);
        return;
    }
    if (t->nmi_pending && t->nmi_native && !(*t->hflags2 & t->hf2_nmi) && !(*t->hflags & t->hf_inhibit_irq)) {
        t->nmi_pending--;
        t->nmi_taken++;
        *t->hflags2 |= t->hf2_nmi;   /* SDM 6.7.1: NMIs are blocked until the next IRET */
        t->do_interrupt(t->env, 2, 1);
        uint64_t rip = *t->eip;
        t->reg_write(uc, t->reg_rip, &rip);
        return;
    }
    if (t->recheck_count) {
        int r = t->on_recheck();
        if (r) {
            stop(uc, t, r < 0 ? NV_STOP_SITE : NV_STOP_RETRY);
            return;
        }
    }
    if (known_page(uc, t, addr >> 12))
        return;
    if (size > 1 && ((addr + size - 1) >> 12) != (addr >> 12)) {
        uint64_t first = addr >> 12;
        if (known_page(uc, t, (addr + size - 1) >> 12))
            return;
        t->last_page = first;
    }
    uint64_t key = ((addr << 12) | (size & 0xfff)) + 1;
    const struct nv_block *b;
    uint32_t n;
    int64_t s;
    if (key == t->mru_key) {
        /* a loop that is one block */
        b = t->mru_block;
        n = b->n;
    } else if (t->ckeys[s = find_slot(t->ckeys, t->ccap, key)]) {
        n = t->cvals[s];
        b = t->cblocks[s];
    } else {
        int r = t->on_count(addr, size);   /* at least 1, -1 when Python failed, or NV_COUNT_RETRY */
        if (r == NV_COUNT_RETRY) {
            stop(uc, t, NV_STOP_RETRY);
            return;
        }
        n = r < 0 ? 0 : (uint32_t)r < t->offsets_cap ? (uint32_t)r : t->offsets_cap;
        struct nv_block *nb = n ? malloc(sizeof(*nb) + n * sizeof(uint16_t)) : NULL;
        if (!nb) {
            stop(uc, t, NV_STOP_SITE);
            return;
        }
        nb->n = n;
        memcpy(nb->off, t->offsets, n * sizeof(uint16_t));
        put_count(t, key, nb);
        b = nb;
    }
    t->mru_key = key;
    t->mru_block = b;
    if (t->icount >= t->budget || t->icount + n > t->limit) {
        stop(uc, t, NV_STOP_BUDGET);
        return;
    }
    t->block_icount = t->icount;
    t->block_addr = addr;
    t->block_size = size;
    t->block = b;
    t->icount += n;
}

/* An instruction at clock `at` was emulated in its hook, which moved RIP: unicorn leaves the
 * block there and runs the rest as a new one, whose hook counts on from here. */
static void retire_here(struct nv_trap *t, uint64_t at)
{
    t->icount = at + 1;
    t->block = NULL;
}

/* TMCCT at clock `at` of this run, or -1 when the timer is not counting down then. */
static int64_t tmcct_at(const struct nv_trap *t, uint64_t at)
{
    uint64_t now = t->clock_base + at;
    if (now >= t->tmcct_target)
        return -1;
    uint64_t remaining = t->tmcct_target - now;
    if (remaining > t->tmcct_period)
        remaining = t->tmcct_period;
    return (int64_t)(remaining / t->tmcct_divisor);
}

void nv_site_hook(void *uc, uint64_t addr, uint32_t size, struct nv_trap *t)
{
    (void)size;
    if (t->fused) {
        int64_t s = find_slot(t->fkeys, t->fcap, addr + 1);
        if (t->fkeys[s] && t->fvals[s] == NV_STI_SITE) {
            if (!t->sti_watch)
                return;
        } else if (t->fkeys[s] && (t->fvals[s] & NV_RDMSR_SITE)) {
            /* SDM RDMSR: #GP at CPL > 0, which Python raises */
            if ((t->fast_tmcct & NV_TMCCT_MSR) && (uint32_t)t->regs[1] == MSR_X2APIC_TMCCT && !(*t->hflags & 3)) {
                uint64_t at = clock_at(t, addr);
                int64_t v = tmcct_at(t, at);
                if (v >= 0) {
                    uint64_t lo = (uint64_t)v, hi = 0, rip = *t->eip + (t->fvals[s] & ~NV_RDMSR_SITE);
                    t->reg_write(uc, t->reg_rax, &lo);
                    t->reg_write(uc, t->reg_rdx, &hi);
                    t->reg_write(uc, t->reg_rip, &rip);
                    retire_here(t, at);
                    return;
                }
            }
        } else if (t->fkeys[s] && (t->fvals[s] & NV_WRMSR_SITE)) {
            /* SDM WRMSR: #GP at CPL > 0, which Python raises */
            if (t->icr_self_nmi && t->nmi_native && (uint32_t)t->regs[1] == MSR_X2APIC_ICR && !(*t->hflags & 3)) {
                uint64_t value = (t->regs[0] & 0xffffffffULL) | (t->regs[2] << 32);
                uint64_t at = clock_at(t, addr);
                if (icr_self_nmi(t, value) && t->clock_base + at < t->lapic_quiet_until) {
                    /* KVM process_nmi: two NMIs may be pending, one while an NMI is handled */
                    uint32_t limit = (*t->hflags2 & t->hf2_nmi) ? 1 : 2;
                    t->nmi_pending = t->nmi_pending + 1 < limit ? t->nmi_pending + 1 : limit;
                    t->icr_value = value & ~(uint64_t)ICR_BUSY;
                    t->icr_written = 1;
                    t->icr_fast++;
                    uint64_t rip = *t->eip + (t->fvals[s] & ~NV_WRMSR_SITE);
                    t->reg_write(uc, t->reg_rip, &rip);
                    retire_here(t, at);
                    return;
                }
            }
        } else if (t->fkeys[s] && (t->fvals[s] & NV_PAUSE_SITE)) {
            if (t->pause_yield) {
                uint64_t at = clock_at(t, addr), rip = *t->eip + (t->fvals[s] & ~NV_PAUSE_SITE);
                t->reg_write(uc, t->reg_rip, &rip);
                retire_here(t, at);
                stop(uc, t, NV_STOP_PAUSE);
                return;
            }
        } else if (t->fkeys[s] && t->fast_tsc) {
            /* SDM RDTSC: EDX:EAX = TSC, upper halves of RAX/RDX cleared */
            uint64_t at = clock_at(t, addr), tsc = t->tsc_base + at;
            uint64_t lo = tsc & 0xffffffffULL, hi = tsc >> 32, rip = *t->eip + t->fvals[s];
            t->reg_write(uc, t->reg_rax, &lo);
            t->reg_write(uc, t->reg_rdx, &hi);
            t->reg_write(uc, t->reg_rip, &rip);
            retire_here(t, at);
            return;
        }
    }
    uint64_t at = clock_at(t, addr);
    int r = t->on_site(addr);
    if (r >= NV_SKIP) {
        uint64_t rip = *t->eip + (uint64_t)(r & 0xff);
        t->reg_write(uc, t->reg_rip, &rip);
        retire_here(t, at);
        return;
    }
    switch (r) {
    case NV_HANDLED:
        retire_here(t, at);
        return;
    case NV_STOP_BEFORE:
    case NV_HANDLED_STOP:
        stop(uc, t, NV_STOP_SITE);
        return;
    default:
        return;
    }
}

/* A read of the xAPIC page (unicorn's MMIO read callback, its RIP synced as in
 * nv_sync_io_pc). */
uint64_t nv_apic_mmio_read(void *uc, uint64_t offset, unsigned size, struct nv_trap *t)
{
    (void)uc;
    nv_sync_io_pc(t);
    if ((t->fast_tmcct & NV_TMCCT_MMIO) && offset == APIC_TMCCT && size == 4) {
        int64_t v = tmcct_at(t, nv_clock(t));
        if (v >= 0)
            return (uint64_t)v;
    }
    return t->apic_read(offset, size);
}

/* Whether a write of `lo` to the xAPIC ICR, with ICR2 in icr_value, is an IPI Python's LAPIC
 * would turn into exactly one NMI for this vCPU (KVM kvm_apic_send_ipi, physical or self). */
static bool xapic_icr_self_nmi(const struct nv_trap *t, uint32_t lo)
{
    uint32_t dest = (uint32_t)(t->icr_value >> 56);
    if ((lo & ICR_MODE_MASK) != ICR_DM_NMI)
        return false;
    if ((lo & ICR_SHORT_MASK) == ICR_DEST_SELF)
        return true;
    return (lo & ICR_SHORT_MASK) == 0 && !(lo & ICR_DEST_LOGICAL) && dest == t->xapic_id && dest != XAPIC_BROADCAST;
}

/* A write of the xAPIC page (unicorn's MMIO write callback): ICR2 and self-NMI ICR writes
 * here while xapic_self_nmi allows them (see icr_self_nmi), the rest in Python. */
void nv_apic_mmio_write(void *uc, uint64_t offset, unsigned size, uint64_t value, struct nv_trap *t)
{
    (void)uc;
    nv_sync_io_pc(t);
    if (t->xapic_self_nmi && t->nmi_native && size == 4 && t->clock_base + nv_clock(t) < t->lapic_quiet_until) {
        if (offset == APIC_ICR2) {
            t->icr_value = ((value & 0xFF000000ULL) << 32) | (t->icr_value & 0xffffffffULL);
            t->icr_written = 1;
            return;
        }
        if (offset == APIC_ICR && xapic_icr_self_nmi(t, (uint32_t)value)) {
            uint32_t limit = (*t->hflags2 & t->hf2_nmi) ? 1 : 2;
            t->nmi_pending = t->nmi_pending + 1 < limit ? t->nmi_pending + 1 : limit;
            t->icr_value = (t->icr_value & ~0xffffffffULL) | ((uint32_t)value & ~ICR_BUSY);
            t->icr_written = 1;
            return;
        }
    }
    t->apic_write(offset, size, value);
}

/* Data read or write, hooked only while CR0.AM = 1 (translations then call it for every
 * access). SDM 6.15 "Interrupt 17": at CPL 3 with RFLAGS.AC = 1, a word, doubleword or
 * quadword not aligned to its size is #AC(0), a fault (QEMU splits wider operands into
 * accesses of these sizes, and the low 12 bits of the physical address are the linear
 * address's). The size test comes first: it is the one that almost always says no. */
void nv_align_hook(void *uc, int type, uint64_t addr, int size, int64_t value, struct nv_trap *t)
{
    (void)uc; (void)type; (void)value;
    if (!(addr & (uint64_t)(size - 1)))
        return;
    if ((*t->hflags & 3) != 3 || !(*t->eflags & t->ac_flag))
        return;
    t->raise_exception_err(t->env, t->ac_vector, 0);
}

/* Code fetch from RAM (mapped without EXEC) during translation. Always allowed. */
bool nv_fetch_hook(void *uc, int type, uint64_t paddr, int size, int64_t value, struct nv_trap *t)
{
    (void)uc; (void)type; (void)size; (void)value;
    uint64_t pp = paddr >> 12;
    int64_t s = find_slot(t->pkeys, t->pcap, pp + 1);
    if (t->pkeys[s]) {
        for (uint32_t i = 0; i < t->recheck_count; i++)
            if (t->recheck[i] == pp)
                return true;
        if (t->recheck_count < NV_RECHECK_MAX)
            t->recheck[t->recheck_count++] = pp;
    }
    return true;
}

/* An importable module, so that the shared object is built and found like any extension. */
static struct PyModuleDef trap_module = {PyModuleDef_HEAD_INIT, "_trap", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__trap(void)
{
    return PyModule_Create(&trap_module);
}
