/* The dirtying guest: writes one word into each page of a region of `dirty_mib` MiB,
 * round after round, at `rate_mibps` MiB/s of pages (0: as fast as it can), so a
 * pre-copy migration always has dirty pages to resend. Time comes from the PIT,
 * which QEMU emulates against its virtual clock (it stops while the VM is paused). */
#include "status.h"

typedef unsigned int u32;
typedef unsigned long long u64;

#define PAGE 4096u
#define REGION_START 0x00400000u /* 4 MiB, above the kernel, stack and multiboot data */
#define PIT_HZ 1193182u

struct multiboot_info {
    u32 flags, mem_lower, mem_upper, boot_device, cmdline;
};

static inline void outb(unsigned short port, unsigned char v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline unsigned char inb(unsigned short port) {
    unsigned char v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static void serial_puts(const char *s) {
    while (*s) outb(0x3f8, (unsigned char)*s++);
}

static void serial_putu(u32 v) {
    char buf[11];
    int i = 10;
    buf[i] = 0;
    do { buf[--i] = (char)('0' + v % 10); v /= 10; } while (v && i);
    serial_puts(&buf[i]);
}

/* PIT channel 0 in mode 2 counting down from 65536; ticks() accumulates the deltas,
 * so it must be called at least every 55 ms (every loop iteration does). */
static u32 pit_last;
static u64 pit_total;

static void pit_init(void) {
    outb(0x43, 0x34); /* channel 0, lo/hi, mode 2 */
    outb(0x40, 0);
    outb(0x40, 0);
    pit_last = 0;
}

static u64 ticks(void) {
    outb(0x43, 0x00); /* latch channel 0 */
    u32 lo = inb(0x40), hi = inb(0x40);
    u32 now = (hi << 8) | lo;
    pit_total += (pit_last - now) & 0xffffu;
    pit_last = now;
    return pit_total;
}

/* Find "key=<digits>" in the command line; `fallback` if absent. */
static u32 param(const char *cmdline, const char *key, u32 fallback) {
    for (const char *p = cmdline; p && *p; p++) {
        if (p != cmdline && p[-1] != ' ') continue;
        const char *k = key, *q = p;
        while (*k && *q == *k) { k++; q++; }
        if (*k || *q != '=') continue;
        u32 v = 0;
        for (q++; *q >= '0' && *q <= '9'; q++) v = v * 10 + (u32)(*q - '0');
        return v;
    }
    return fallback;
}

void guest_main(u32 magic, struct multiboot_info *mbi) {
    volatile struct status *st = (volatile struct status *)STATUS_ADDR;
    const char *cmdline = (magic == 0x2BADB002u && (mbi->flags & 4)) ? (const char *)mbi->cmdline : 0;
    u32 dirty_mib = param(cmdline, "dirty_mib", 0);
    u32 rate_mibps = param(cmdline, "rate_mibps", 0);

    /* never run past the end of RAM (mem_upper: KiB above 1 MiB) */
    u32 ram_end = (mbi->flags & 1) ? 0x100000u + mbi->mem_upper * 1024u : 0x800000u;
    u32 region_pages = dirty_mib * (1024u * 1024u / PAGE);
    u32 max_pages = ram_end > REGION_START + 0x10000u ? (ram_end - REGION_START - 0x10000u) / PAGE : 0;
    if (region_pages > max_pages) region_pages = max_pages;

    st->heartbeat = 0;
    st->uptime_ms = 0;
    st->pages = 0;
    st->magic = STATUS_MAGIC;
    pit_init();
    serial_puts("ferry-guest: dirty_pages=");
    serial_putu(region_pages);
    serial_puts(" rate_mibps=");
    serial_putu(rate_mibps);
    serial_puts("\n");

    u64 start = ticks();
    u64 written = 0; /* pages */
    u32 next = 0, ms = 0;
    /* multiplications only: 64-bit division would need libgcc */
    u64 pages_per_s = (u64)rate_mibps * (1024u * 1024u / PAGE);
    for (;;) {
        u64 elapsed = ticks() - start;
        st->heartbeat++;
        while ((u64)(ms + 1) * PIT_HZ <= elapsed * 1000u) ms++;
        st->uptime_ms = ms;
        if (!region_pages) continue;
        /* the budget allows rate MiB/s worth of pages since boot; bursts of 64 pages */
        if (rate_mibps) {
            if (written * PIT_HZ >= elapsed * pages_per_s) {
                __asm__ volatile("pause");
                continue;
            }
        }
        for (u32 i = 0; i < 64; i++) {
            volatile u32 *word = (volatile u32 *)(REGION_START + next * PAGE);
            *word = (u32)written + i;
            if (++next == region_pages) next = 0;
        }
        written += 64;
        st->pages = (u32)written;
    }
}
