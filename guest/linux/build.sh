#!/usr/bin/env bash
# Build Ferry's Linux test guest from Debian's packages: the distribution's cloud kernel and an
# initramfs of busybox-static, the kernel's virtio modules and init.sh as /init, plus an empty raw
# disk image. Downloads with `apt-get download` (no install), unpacks with `dpkg-deb -x`; the
# packages and the result are cached in guest/build/linux (git-ignored) and rebuilt only when
# init.sh or this script changes.
#
#   guest/linux/build.sh [OUT_DIR]    # prints the output directory: vmlinuz, initrd.gz, disk.raw
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${1:-$HERE/../build/linux}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
KERNEL_META="${FERRY_LINUX_KERNEL_PACKAGE:-linux-image-cloud-amd64}"
DISK_MIB="${FERRY_LINUX_DISK_MIB:-32}"
MODULES=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk)

exec 9>"$OUT/.lock"
flock 9  # test workers and scripts may build at once

stamp="$(cat "$HERE/init.sh" "$HERE/build.sh" | sha256sum | cut -c1-16)"
if [[ -s "$OUT/vmlinuz" && -s "$OUT/initrd.gz" && -s "$OUT/disk.raw" && "$(cat "$OUT/.stamp" 2>/dev/null)" == "$stamp" ]]; then
  echo "$OUT"
  exit 0
fi

debs="$OUT/debs"
mkdir -p "$debs"
if ! ls "$debs"/linux-image-*.deb >/dev/null 2>&1 || ! ls "$debs"/busybox-static_*.deb >/dev/null 2>&1; then
  command -v apt-get >/dev/null || { echo "build.sh: apt-get is needed to fetch the kernel and busybox" >&2; exit 1; }
  # the metapackage names the current kernel package
  kernel="$(apt-cache depends "$KERNEL_META" 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')"
  [[ -n "$kernel" ]] || { echo "build.sh: no kernel package behind $KERNEL_META (apt-get update?)" >&2; exit 1; }
  # apt's sandbox user cannot write here: download as root without it, quietly
  (cd "$debs" && apt-get download -q -o APT::Sandbox::User=root "$kernel" busybox-static >/dev/null)
fi

work="$(mktemp -d "$OUT/.work.XXXXXX")"
trap 'rm -rf "$work"' EXIT
for deb in "$debs"/*.deb; do dpkg-deb -x "$deb" "$work/pkg"; done

root="$work/root"
mkdir -p "$root"/{bin,dev,proc,sys,run,lib/modules}
cp "$work/pkg/bin/busybox" "$root/bin/busybox"
for m in "${MODULES[@]}"; do
  ko="$(find "$work/pkg/lib/modules" -name "$m.ko" | head -1)"
  [[ -n "$ko" ]] || { echo "build.sh: module $m.ko not in the kernel package" >&2; exit 1; }
  cp "$ko" "$root/lib/modules/"
done
install -m 0755 "$HERE/init.sh" "$root/init"
# busybox packs the archive itself (the cpio command is not installed)
(cd "$root" && find . | "$root/bin/busybox" cpio -o -H newc 2>/dev/null | gzip -9 >"$work/initrd.gz")
cp "$(ls "$work"/pkg/boot/vmlinuz-* | head -1)" "$work/vmlinuz"
truncate -s "${DISK_MIB}M" "$work/disk.raw"
mv "$work/vmlinuz" "$work/initrd.gz" "$work/disk.raw" "$OUT/"
echo "$stamp" >"$OUT/.stamp"
echo "$OUT"
