#!/usr/bin/env bash
# Make sure the servers the tests talk to are up: RabbitMQ (127.0.0.1:5672) and PostgreSQL
# (127.0.0.1:5432). Starts them if they are installed but stopped, installs RabbitMQ from
# Debian if it is missing, and says clearly what it could not provide.
set -euo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  local port=$1 what=$2 i
  for i in $(seq 1 90); do
    port_open "$port" && return 0
    sleep 1
  done
  echo "ensure-services: $what did not come up on 127.0.0.1:$port" >&2
  return 1
}

if ! port_open 5672; then
  if ! command -v rabbitmq-server >/dev/null 2>&1; then
    if [[ $(id -u) -eq 0 ]]; then
      echo "ensure-services: installing rabbitmq-server"
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends rabbitmq-server >/dev/null
    else
      echo "ensure-services: RabbitMQ is not running and not installed (apt-get install rabbitmq-server)" >&2
      exit 1
    fi
  fi
  echo "ensure-services: starting RabbitMQ"
  rabbitmq-server -detached || true
  wait_port 5672 RabbitMQ
fi
# the broker accepts connections a moment before rabbitmqctl works; the tests need both
for i in $(seq 1 60); do
  rabbitmqctl -q status >/dev/null 2>&1 && break
  sleep 1
done
rabbitmqctl -q status >/dev/null 2>&1 || { echo "ensure-services: rabbitmqctl cannot reach the broker" >&2; exit 1; }

if ! port_open 5432; then
  if command -v pg_ctlcluster >/dev/null 2>&1; then
    echo "ensure-services: starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
    wait_port 5432 PostgreSQL
  else
    echo "ensure-services: PostgreSQL is not running on 127.0.0.1:5432 and pg_ctlcluster is missing" >&2
    exit 1
  fi
fi
echo "ensure-services: RabbitMQ and PostgreSQL are up"
