/*
 * The per-instruction hook of a nestvisor execution context.
 *
 * unicorn can hook only a few instructions (IN, OUT, CPUID, RDTSC, ...). Everything else
 * the L0 must see (RDMSR, WRMSR, MOV CR/DR, HLT, INVLPG, PAUSE, ...) is trapped at its
 * address. Registering one unicorn code hook per address does not scale: with an
 * instruction budget (our deterministic clock) unicorn walks the whole code-hook list on
 * every instruction. So one C hook does three things per instruction:
 *   1. counts it and stops emulation when the budget is spent (the clock);
 *   2. on entering a linear page it has no record for, asks Python to scan that page;
 *   3. calls Python only when the address is a recorded trap site (a bitmap lookup).
 * A second hook, on code fetch during translation, notices when a page that was scanned
 * is translated again (self-modifying or newly written code) so Python can rescan it.
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
    NV_HANDLED = 1,      /* emulated, RIP already moved: counts as retired */
    NV_STOP_BEFORE = 2,  /* stop emulation before this instruction */
    NV_HANDLED_STOP = 3, /* emulated and retired, then stop emulation */
};

enum nv_stop { NV_STOP_NONE = 0, NV_STOP_BUDGET = 1, NV_STOP_SITE = 2 };

typedef int (*nv_emu_stop_fn)(void *uc);
typedef int (*nv_py_page_fn)(uint64_t addr);
typedef int (*nv_py_site_fn)(uint64_t addr);
typedef int (*nv_py_recheck_fn)(void);

#define NV_RECHECK_MAX 64

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
    /* private */
    uint64_t last_page;
    uint8_t *last_bitmap;
    uint64_t *keys;       /* linear page number + 1 (0 = empty slot) */
    uint8_t **vals;       /* 512-byte site bitmap, or NULL for a page without sites */
    uint32_t cap, used;
    uint64_t *pkeys;      /* scanned physical page numbers + 1 */
    uint32_t pcap, pused;
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
    t->last_page = UINT64_MAX;
    t->budget = UINT64_MAX;
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
    t->last_bitmap = NULL;
}

void nv_free(struct nv_trap *t)
{
    if (!t)
        return;
    clear_pages(t);
    free(t->keys);
    free(t->vals);
    free(t->pkeys);
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

/* Record the trap sites of a linear page: `bitmap` is 512 bytes, or NULL for none. */
int nv_set_page(struct nv_trap *t, uint64_t linear_page, const uint8_t *bitmap)
{
    if ((t->used + 1) * 2 > t->cap)
        grow(t);
    uint64_t key = linear_page + 1;
    int64_t s = find_slot(t->keys, t->cap, key);
    if (t->keys[s] == 0)
        t->used++;
    t->keys[s] = key;
    free(t->vals[s]);
    t->vals[s] = NULL;
    if (bitmap) {
        t->vals[s] = malloc(512);
        memcpy(t->vals[s], bitmap, 512);
    }
    t->last_page = UINT64_MAX;
    return 0;
}

/* Drop one linear page record (its physical page changed). Open addressing: rehash. */
void nv_drop_page(struct nv_trap *t, uint64_t linear_page)
{
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

void nv_code_hook(void *uc, uint64_t addr, uint32_t size, struct nv_trap *t)
{
    (void)size;
    if (t->icount >= t->budget) {
        t->stop_reason = NV_STOP_BUDGET;
        t->emu_stop(uc);
        return;
    }
    if (t->recheck_count) {
        if (t->on_recheck() != 0) {
            t->stop_reason = NV_STOP_SITE;
            t->emu_stop(uc);
            return;
        }
    }
    uint64_t page = addr >> 12;
    if (page != t->last_page) {
        int64_t s = find_slot(t->keys, t->cap, page + 1);
        if (t->keys[s] == 0) {
            if (t->on_page(addr) != 0) {
                t->stop_reason = NV_STOP_SITE;
                t->emu_stop(uc);
                return;
            }
            s = find_slot(t->keys, t->cap, page + 1);
        }
        t->last_page = page;
        t->last_bitmap = t->keys[s] ? t->vals[s] : NULL;
    }
    uint32_t off = (uint32_t)(addr & 0xfff);
    if (t->last_bitmap && ((t->last_bitmap[off >> 3] >> (off & 7)) & 1)) {
        int act = t->on_site(addr);
        switch (act) {
        case NV_HANDLED:
            t->icount++;
            return;
        case NV_STOP_BEFORE:
            t->stop_reason = NV_STOP_SITE;
            t->emu_stop(uc);
            return;
        case NV_HANDLED_STOP:
            t->icount++;
            t->stop_reason = NV_STOP_SITE;
            t->emu_stop(uc);
            return;
        default:
            break;
        }
    }
    t->icount++;
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
