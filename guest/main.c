/* The dirtying guest: writes one word into each page of a region of `dirty_mib` MiB,
 * round after round, at `rate_mibps` MiB/s of pages (0: as fast as it can), so a
 * pre-copy migration always has dirty pages to resend. Time comes from the PIT's
 * interrupt, which QEMU emulates against its virtual clock (it stops while the VM is
 * paused). With nothing to write (idle, or ahead of its rate) the vCPU halts until the
 * next tick, as an idle OS does, instead of spinning a host core. */
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

/* The PIT interrupts (IRQ0, vector 0x20 once the PIC is remapped) TICK_HZ times a
 * second; entry.S counts them in irq_ticks. */
#define PIT_DIVISOR 1193u /* ~1000 Hz */
volatile u32 irq_ticks;

struct idt_entry {
    unsigned short offset_lo, selector;
    unsigned char zero, flags;
    unsigned short offset_hi;
} __attribute__((packed));

struct idt_ptr {
    unsigned short limit;
    u32 base;
} __attribute__((packed));

static struct idt_entry idt[256];
extern void irq0_stub(void);
extern void ignore_stub(void);

static void idt_set(int vector, void (*handler)(void), unsigned short cs) {
    u32 at = (u32)handler;
    idt[vector].offset_lo = (unsigned short)(at & 0xffffu);
    idt[vector].selector = cs;
    idt[vector].zero = 0;
    idt[vector].flags = 0x8e; /* present, ring 0, 32-bit interrupt gate */
    idt[vector].offset_hi = (unsigned short)(at >> 16);
}

static void interrupts_init(void) {
    unsigned short cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs)); /* the loader's flat code segment */
    for (int v = 0; v < 256; v++) idt_set(v, ignore_stub, cs);
    idt_set(0x20, irq0_stub, cs);
    struct idt_ptr ptr = {sizeof(idt) - 1, (u32)idt};
    __asm__ volatile("lidt %0" ::"m"(ptr));
    /* PICs: vectors 0x20-0x2f, every line masked but the PIT's */
    outb(0x20, 0x11); outb(0xa0, 0x11);
    outb(0x21, 0x20); outb(0xa1, 0x28);
    outb(0x21, 0x04); outb(0xa1, 0x02);
    outb(0x21, 0x01); outb(0xa1, 0x01);
    outb(0x21, 0xfe); outb(0xa1, 0xff);
    /* PIT channel 0, lo/hi, mode 2 (rate generator) */
    outb(0x43, 0x34);
    outb(0x40, PIT_DIVISOR & 0xffu);
    outb(0x40, PIT_DIVISOR >> 8);
    __asm__ volatile("sti");
}

/* Time since the PIT started, in PIT input cycles (PIT_HZ a second). */
static u64 ticks(void) { return (u64)irq_ticks * PIT_DIVISOR; }

/* Sleep until the next interrupt (sti;hlt: no tick is lost between the two). */
static void halt(void) { __asm__ volatile("sti; hlt" ::: "memory"); }

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
    interrupts_init();
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
        if (!region_pages) {
            halt();
            continue;
        }
        /* the budget allows rate MiB/s worth of pages since boot; bursts of 64 pages */
        if (rate_mibps && written * PIT_HZ >= elapsed * pages_per_s) {
            halt();
            continue;
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
