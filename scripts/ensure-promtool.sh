#!/usr/bin/env bash
# Make sure `promtool` is there to check deploy/prometheus/ (rule syntax and rule unit tests).
# Installs Debian's `prometheus` package, which ships it, when it is missing; says so if it cannot.
set -euo pipefail

command -v promtool >/dev/null 2>&1 && exit 0
if [[ $(id -u) -ne 0 ]]; then
  echo "ensure-promtool: promtool is missing (apt-get install prometheus)" >&2
  exit 1
fi
echo "ensure-promtool: installing prometheus (for promtool)" >&2
export DEBIAN_FRONTEND=noninteractive
# the package lists may be absent or stale on a fresh machine
apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 || {
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null
}
# the package's post-install may start a Prometheus server; only its promtool is wanted here
if command -v systemctl >/dev/null 2>&1; then systemctl stop prometheus >/dev/null 2>&1 || true; fi
command -v promtool >/dev/null 2>&1 || { echo "ensure-promtool: promtool still missing" >&2; exit 1; }
