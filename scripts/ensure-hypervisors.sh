#!/usr/bin/env bash
# Install (or just check, with --check) what the real hypervisor drivers and their tests need:
# QEMU and libvirt from Debian packages, the guest toolchain, the Python bindings in the venv, and
# the Linux test guest (guest/linux/build.sh: Debian's kernel and busybox, cached in guest/build).
# Exits non-zero and says what is missing when it cannot provide everything.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV_PY="${FERRY_VENV_PY:-$ROOT/.venv/bin/python}"
CHECK_ONLY=0
[[ "${1:-}" == "--check" ]] && CHECK_ONLY=1

APT_PACKAGES=(qemu-system-x86 libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev
              gcc binutils make pkg-config util-linux)
# binary -> package that provides it, for the report
declare -A NEED_BIN=(
  [qemu-system-x86_64]=qemu-system-x86 [libvirtd]=libvirt-daemon [virsh]=libvirt-clients
  [gcc]=gcc [ld]=binutils [make]=make [pkg-config]=pkg-config [unshare]=util-linux
)

missing_bins() {
  local b out=()
  for b in "${!NEED_BIN[@]}"; do
    command -v "$b" >/dev/null 2>&1 || out+=("$b (${NEED_BIN[$b]})")
  done
  # libvirt's QEMU driver is a loadable module, not a binary
  ls /usr/lib/*/libvirt/connection-driver/libvirt_driver_qemu.so >/dev/null 2>&1 \
    || out+=("libvirt_driver_qemu.so (libvirt-daemon-driver-qemu)")
  pkg-config --exists libvirt 2>/dev/null || out+=("libvirt.pc (libvirt-dev)")
  printf '%s\n' "${out[@]}"
}

missing_py() {
  local out=()
  "$VENV_PY" -c 'import qemu.qmp' 2>/dev/null || out+=("qemu.qmp")
  "$VENV_PY" -c 'import libvirt' 2>/dev/null || out+=("libvirt-python")
  printf '%s\n' "${out[@]}"
}

bins="$(missing_bins | sed '/^$/d')"
if [[ -n "$bins" && $CHECK_ONLY -eq 0 ]]; then
  if [[ $(id -u) -ne 0 ]]; then
    echo "ensure-hypervisors: not root, cannot apt-get install; missing:" >&2
    echo "$bins" | sed 's/^/  - /' >&2
    exit 1
  fi
  echo "ensure-hypervisors: installing ${APT_PACKAGES[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || true
  apt-get install -y -qq --no-install-recommends "${APT_PACKAGES[@]}" >/dev/null
  bins="$(missing_bins | sed '/^$/d')"
fi

py="$(missing_py | sed '/^$/d')"
if [[ -n "$py" && $CHECK_ONLY -eq 0 && -z "$bins" ]]; then
  echo "ensure-hypervisors: installing Python packages into the venv"
  "$VENV_PY" -m pip install -q -r "$ROOT/requirements-hypervisors.txt"
  py="$(missing_py | sed '/^$/d')"
fi

# the Linux test guest: Debian's cloud kernel and busybox, downloaded (not installed) and cached
linux_guest=""
if [[ $CHECK_ONLY -eq 0 && -z "$bins" ]]; then
  linux_guest="$(bash "$ROOT/guest/linux/build.sh" 2>&1)" || { echo "$linux_guest" >&2; linux_guest=""; }
fi
[[ -n "$linux_guest" || $CHECK_ONLY -eq 1 ]] || bins="$bins"$'\n'"the Linux test guest (guest/linux/build.sh)"

if [[ -n "$bins$py" ]]; then
  echo "ensure-hypervisors: MISSING (the qemu/libvirt tests will fail; set FERRY_SKIP_HYPERVISORS=1 to skip them):" >&2
  { echo "$bins"; echo "$py"; } | sed '/^$/d; s/^/  - /' >&2
  exit 1
fi
echo "ensure-hypervisors: ok ($(qemu-system-x86_64 --version | head -1); libvirtd $(libvirtd --version | awk '{print $NF}'))"
