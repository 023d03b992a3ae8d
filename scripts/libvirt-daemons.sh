#!/usr/bin/env bash
# Two (or more) real libvirt daemons on one machine, one per simulated Ferry host.
#
#   scripts/libvirt-daemons.sh start [HOST...]   # idempotent; default hosts: a b
#   scripts/libvirt-daemons.sh stop [HOST...]    # destroys their domains, stops the daemons
#   scripts/libvirt-daemons.sh status [HOST...]
#   scripts/libvirt-daemons.sh uri HOST          # prints the connection URI of HOST's daemon
#
# libvirt refuses to migrate to "the same host", so each daemon runs in its own mount namespace
# where /etc/libvirt, /run/libvirt, /var/lib/libvirt, /var/log/libvirt and /var/cache/libvirt are
# bind mounts of a per-host directory, with its own host_uuid and migration port range. The
# sockets live outside those mounts ($STATE/HOST/sock) so clients and the other daemon (for
# peer-to-peer migration) reach them. Needs root, util-linux (unshare) and libvirt-daemon.
# State: $FERRY_LIBVIRT_STATE (default /tmp/ferry-libvirt). Migration ports: from
# $FERRY_LIBVIRT_PORT_BASE (default 49152), 100 per host. With $FERRY_LIBVIRT_TLS_DIR, each
# daemon takes its migration TLS credentials from $FERRY_LIBVIRT_TLS_DIR/HOST (QEMU's x509
# layout) and refuses migrations in clear text (migrate_tls_force).
set -euo pipefail

STATE="${FERRY_LIBVIRT_STATE:-/tmp/ferry-libvirt}"
cmd="${1:-status}"
shift || true
HOSTS=("$@")
[[ ${#HOSTS[@]} -eq 0 ]] && HOSTS=(a b)

uri_of() { echo "qemu+unix:///system?socket=$STATE/$1/sock/libvirt-sock"; }

daemon_pid() {
  local pidfile="$STATE/$1/libvirtd.pid" pid
  [[ -s "$pidfile" ]] || return 1
  pid="$(cat "$pidfile")"
  [[ -d /proc/$pid ]] && grep -q libvirtd "/proc/$pid/comm" 2>/dev/null && ! grep -q '^State:.*Z' "/proc/$pid/status" \
    && echo "$pid"
}

# its socket takes a connection (a few tries: a daemon under load answers late)
answers() {
  local i
  for i in 1 2 3 4 5; do
    [[ -S "$STATE/$1/sock/libvirt-sock" ]] && virsh -q -c "$(uri_of "$1")" version >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  return 1
}

# a stable per-host UUID, different for every host name
host_uuid() {
  local h
  h="$(printf 'ferry-libvirt-%s' "$1" | sha256sum | cut -c1-32)"
  echo "${h:0:8}-${h:8:4}-4${h:13:3}-8${h:17:3}-${h:20:12}"
}

write_config() {
  local h="$1" idx="$2" d="$STATE/$1"
  mkdir -p "$d"/{etc,run,lib,log,cache,sock}
  cat >"$d/etc/libvirtd.conf" <<CONF
unix_sock_dir = "$d/sock"
unix_sock_group = "root"
unix_sock_rw_perms = "0770"
auth_unix_ro = "none"
auth_unix_rw = "none"
host_uuid = "$(host_uuid "$h")"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
CONF
  # migration ports: a distinct range of 100 per host (Ferry passes an explicit port anyway)
  local port_min=$((${FERRY_LIBVIRT_PORT_BASE:-49152} + idx * 100))
  cat >"$d/etc/qemu.conf" <<CONF
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
migration_port_min = $port_min
migration_port_max = $((port_min + 99))
CONF
  if [[ -n "${FERRY_LIBVIRT_TLS_DIR:-}" ]]; then
    cat >>"$d/etc/qemu.conf" <<CONF
migrate_tls_x509_cert_dir = "$FERRY_LIBVIRT_TLS_DIR/$h"
migrate_tls_x509_verify = 1
migrate_tls_force = 1
CONF
  fi
}

start_one() {
  local h="$1" idx="$2" d="$STATE/$1"
  if daemon_pid "$h" >/dev/null; then
    if answers "$h"; then
      echo "libvirtd[$h] already running (pid $(daemon_pid "$h")): $(uri_of "$h")"
      return 0
    fi
    # alive but deaf: a run killed while it started or stopped this daemon can leave the
    # process without its socket, and every client would fail to connect
    echo "libvirtd[$h] runs (pid $(daemon_pid "$h")) but does not answer on its socket: restarting it" >&2
    stop_one "$h" >/dev/null
  fi
  write_config "$h" "$idx"
  rm -f "$d/sock/"* "$d/libvirtd.pid"
  # the mount points must exist in the parent namespace before bind-mounting over them
  mkdir -p /etc/libvirt /run/libvirt /var/lib/libvirt /var/log/libvirt /var/cache/libvirt
  # libvirt's QEMU driver resolves its built-in default user (libvirt-qemu, group kvm) before it
  # reads qemu.conf's user = "root": give the daemon a passwd/group that has them, without
  # adding users to this machine
  cp /etc/passwd "$d/passwd"
  cp /etc/group "$d/group"
  grep -q '^kvm:' "$d/group" || echo 'kvm:x:64990:' >>"$d/group"
  grep -q '^libvirt-qemu:' "$d/group" || echo 'libvirt-qemu:x:64991:' >>"$d/group"
  grep -q '^libvirt-qemu:' "$d/passwd" \
    || echo 'libvirt-qemu:x:64991:64990:Libvirt Qemu:/var/lib/libvirt:/usr/sbin/nologin' >>"$d/passwd"
  setsid unshare -m --propagation private sh -c "
    set -e
    mount --bind '$d/etc' /etc/libvirt
    mount --bind '$d/run' /run/libvirt
    mount --bind '$d/lib' /var/lib/libvirt
    mount --bind '$d/log' /var/log/libvirt
    mount --bind '$d/cache' /var/cache/libvirt
    mount --bind '$d/passwd' /etc/passwd
    mount --bind '$d/group' /etc/group
    exec libvirtd --config '$d/etc/libvirtd.conf' --pid-file '$d/libvirtd.pid'
  " </dev/null >"$d/daemon.out" 2>&1 &
  local launcher=$!
  # the first start probes QEMU's capabilities (about 8 s); later ones are quick
  for _ in $(seq 1 600); do
    if [[ -S "$d/sock/libvirt-sock" ]] && virsh -q -c "$(uri_of "$h")" version >/dev/null 2>&1; then
      echo "libvirtd[$h] up (pid $(daemon_pid "$h" || echo '?')): $(uri_of "$h")"
      return 0
    fi
    kill -0 "$launcher" 2>/dev/null || break  # it exited: no point in waiting
    sleep 0.1
  done
  echo "libvirtd[$h] did not come up; see $d/daemon.out and $d/log/libvirtd.log" >&2
  tail -20 "$d/daemon.out" "$d/log/libvirtd.log" >&2 2>/dev/null || true
  return 1
}

stop_one() {
  local h="$1" d="$STATE/$1" pid dom
  if pid="$(daemon_pid "$h")"; then
    for dom in $(virsh -q -c "$(uri_of "$h")" list --all --name 2>/dev/null); do
      virsh -q -c "$(uri_of "$h")" destroy "$dom" >/dev/null 2>&1 || true
      virsh -q -c "$(uri_of "$h")" undefine "$dom" >/dev/null 2>&1 || true
    done
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do daemon_pid "$h" >/dev/null || break; sleep 0.1; done
    daemon_pid "$h" >/dev/null && kill -9 "$pid" 2>/dev/null || true
  fi
  # QEMU processes outlive their daemon: end any that are left
  local f qpid
  for f in "$d"/run/qemu/*.pid; do
    [[ -s "$f" ]] || continue
    qpid="$(cat "$f")"
    grep -q qemu "/proc/$qpid/comm" 2>/dev/null && kill -9 "$qpid" 2>/dev/null || true
    rm -f "$f"
  done
  echo "libvirtd[$h] stopped"
}

case "$cmd" in
  start)
    command -v libvirtd >/dev/null || { echo "libvirtd not installed (scripts/ensure-hypervisors.sh)" >&2; exit 1; }
    [[ $(id -u) -eq 0 ]] || { echo "starting the libvirt daemons needs root" >&2; exit 1; }
    i=0
    for h in "${HOSTS[@]}"; do start_one "$h" "$i"; i=$((i + 1)); done
    ;;
  stop)
    for h in "${HOSTS[@]}"; do stop_one "$h"; done
    ;;
  status)
    rc=0
    for h in "${HOSTS[@]}"; do
      if pid="$(daemon_pid "$h")"; then echo "libvirtd[$h] running (pid $pid): $(uri_of "$h")"
      else echo "libvirtd[$h] stopped"; rc=3; fi
    done
    exit $rc
    ;;
  uri)
    uri_of "${HOSTS[0]}"
    ;;
  *)
    echo "usage: $0 start|stop|status|uri [HOST...]" >&2
    exit 2
    ;;
esac
