/* The status block at a fixed guest-physical address, read from the host with
 * QMP `human-monitor-command` "xp /4xw 0x80000" or libvirt's memoryPeek.
 * Keep in sync with ferry_hypervisor_adapter/drivers/guest.py. */
#ifndef FERRY_GUEST_STATUS_H
#define FERRY_GUEST_STATUS_H

#define STATUS_ADDR 0x00080000u /* 512 KiB: conventional memory, unused once we run */
#define STATUS_MAGIC 0xFE44A001u

struct status {
    unsigned int magic;     /* STATUS_MAGIC once the guest runs */
    unsigned int heartbeat; /* +1 on every loop iteration, also while idle or rate-limited (each tick) */
    unsigned int uptime_ms; /* PIT time since boot */
    unsigned int pages;     /* pages dirtied so far */
};

#endif
