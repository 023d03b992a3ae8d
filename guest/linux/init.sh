#!/bin/busybox sh
# /init of Ferry's Linux test guest (guest/linux/build.sh packs it with busybox and the kernel's
# virtio modules). It dirties memory and writes records to its disk, and reports on the serial
# console, once per record, a line the tests parse:
#   FERRY boot=BOOT n=N up=UPTIME blk=B sha=SHA256
# BOOT: the kernel's boot id (the same line after a migration: not rebooted); N: the counter;
# UPTIME: the guest's own uptime in seconds; B: the 4 KiB block of /dev/vda that record N was
# written to, after fsync; SHA: the sha256 of that block as written. A block's content names its
# record (seq=N blk=B), so the disk can be checked against these lines from outside.
# Kernel command line: ferry_blocks=COUNT (blocks written in turn, default 256),
# ferry_dirty_mib=M (tmpfs rewritten per round, default 8), ferry_period=S (sleep per round).
/bin/busybox mkdir -p /bin /proc /sys /dev /run
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs -o size=96m run /run

blocks=256; dirty_mib=8; period=0.2
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    ferry_blocks=*) blocks="${arg#*=}" ;;
    ferry_dirty_mib=*) dirty_mib="${arg#*=}" ;;
    ferry_period=*) period="${arg#*=}" ;;
  esac
done

# the virtio modules in dependency order (a second pass picks up any that needed another)
for pass in 1 2; do
  for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk; do
    grep -q "^$m " /proc/modules || insmod "/lib/modules/$m.ko" 2>/dev/null
  done
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
boot="$(cut -c1-8 /proc/sys/kernel/random/boot_id)"
[ -b /dev/vda ] || echo "FERRY-ERROR boot=$boot no disk /dev/vda"

n=0
while :; do
  n=$((n + 1))
  # memory: rewrite part of a tmpfs file every round (its pages are dirtied in guest RAM)
  dd if=/dev/zero of=/run/dirty bs=1M count="$dirty_mib" conv=notrunc 2>/dev/null
  blk=$((n % blocks))
  rec="$(printf 'ferry seq=%010d blk=%06d\n' "$n" "$blk")"
  # 32 bytes a line, 128 lines: one 4 KiB block that names its record
  yes "$rec" 2>/dev/null | head -n 128 >/run/block
  if [ -b /dev/vda ] && dd if=/run/block of=/dev/vda bs=4096 seek="$blk" count=1 conv=notrunc,fsync 2>/dev/null; then
    sha="$(sha256sum /run/block | cut -d' ' -f1)"
  else
    sha=none
  fi
  read up _ </proc/uptime
  echo "FERRY boot=$boot n=$n up=$up blk=$blk sha=$sha"
  sleep "$period"
done
