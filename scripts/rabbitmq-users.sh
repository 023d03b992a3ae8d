#!/usr/bin/env bash
# Create one RabbitMQ user per Ferry service, each with least-privilege permissions.
#
# Usage:
#   FERRY_HOSTS="host-a host-b" FERRY_CLIENTS="ops-alice" scripts/rabbitmq-users.sh
#   DRY_RUN=1 scripts/rabbitmq-users.sh        # print the rabbitmqctl commands only
#
# Variables:
#   FERRY_HOSTS          hypervisor hosts (default: host-a host-b); '*' makes one user per
#                        service for every host, ferry-<service> (Kubernetes: a DaemonSet's pods
#                        share one Secret, so one user per service, not per node)
#   FERRY_SERVICES       per-host services (default: sensor managed_object migration_policy hypervisor_adapter)
#   FERRY_CLIENTS        operator/API clients allowed on the bus (default: none)
#   FERRY_RMQ_VHOST      virtual host (default: /)
#   FERRY_RMQ_PASSWORDS  directory where generated passwords are written, one 0600 file per
#                        user, ready for `kubectl create secret generic --from-file` (default: ./rabbitmq-passwords)
#   FERRY_RMQ_SHARED_CONFIGURE
#                        1 (default): every user may (re)declare the shared exchanges and the
#                        dead-letter queue, which AmqpBus.connect() does on start-up; 0 once the
#                        topology is pre-created by an admin and the bus declares passively
#   FERRY_RMQ_OPS_USER   a user that may read the dead-letter queue (default: ferry-ops; empty: none)
#   RABBITMQCTL          the rabbitmqctl command (default: rabbitmqctl)
#   DRY_RUN              1 to print instead of run
#
# Existing users keep their password (delete the user, or change_password, to rotate).
#
# What each user may touch (RabbitMQ checks configure/write/read against these regexes):
#   configure  declare/delete: its own queues and, with SHARED_CONFIGURE, the shared topology
#   write      publish to ferry and ferry.dlx; bind its own queues (queue.bind needs write on the queue)
#   read       consume its own queues; bind from ferry (queue.bind needs read on the exchange)
# Queues:   ferry.<host>.<service> (durable, quorum), reply.<identity with dots>.<hex> (exclusive).
# Clients additionally get topic permissions on the ferry exchange: they may publish only the
# public contract, coordinator queries, host commands and VM events, and bind only their own
# reply key and migration status keys.
set -euo pipefail

HOSTS=${FERRY_HOSTS:-"host-a host-b"}
SERVICES=${FERRY_SERVICES:-"sensor managed_object migration_policy hypervisor_adapter"}
CLIENTS=${FERRY_CLIENTS:-""}
VHOST=${FERRY_RMQ_VHOST:-/}
PASSWORDS=${FERRY_RMQ_PASSWORDS:-./rabbitmq-passwords}
SHARED_CONFIGURE=${FERRY_RMQ_SHARED_CONFIGURE:-1}
OPS_USER=${FERRY_RMQ_OPS_USER-ferry-ops}
CTL=${RABBITMQCTL:-rabbitmqctl}
DRY_RUN=${DRY_RUN:-0}

EXCHANGE='ferry'
DLX='ferry\.dlx'
DLQ='ferry\.dead-letter'

run() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '%q ' "$CTL" "$@"
    printf '\n'
  else
    "$CTL" "$@"
  fi
}

# regex-escape a name (dots are the only metacharacter our names may carry, but be thorough)
esc() { printf '%s' "$1" | sed 's/[][\\.^$*+?(){}|]/\\&/g'; }

user_exists() {
  [[ $DRY_RUN == 1 ]] && return 1
  "$CTL" list_users --silent | awk '{print $1}' | grep -qxF -- "$1"
}

ensure_user() {
  local user=$1
  if user_exists "$user"; then
    echo "user $user exists: keeping its password" >&2
    return
  fi
  local pw
  pw=$(head -c 32 /dev/urandom | base64 | tr -d '/+=\n' | head -c 32)
  if [[ $DRY_RUN == 1 ]]; then
    run add_user "$user" '<password from stdin>'
    return
  fi
  # the password goes through stdin (rabbitmqctl reads it there when omitted), never argv,
  # so it does not show up in the process list
  printf '%s\n' "$pw" | "$CTL" add_user "$user" >/dev/null
  (umask 077 && mkdir -p "$PASSWORDS" && printf '%s' "$pw" >"$PASSWORDS/$user")
  echo "user $user created; password in $PASSWORDS/$user" >&2
}

# permissions <user> <own queue regex alternatives>
permissions() {
  local user=$1 own=$2
  local shared_conf="$EXCHANGE|$DLX|$DLQ"
  local configure
  if [[ $SHARED_CONFIGURE == 1 ]]; then configure="^($shared_conf|$own)\$"; else configure="^($own)\$"; fi
  # write: publish to both exchanges; bind own queues, and the DLQ to the DLX (AmqpBus.connect does)
  local write="^($EXCHANGE|$DLX|$DLQ|$own)\$"
  # read: bind from both exchanges; consume own queues only (never the DLQ)
  local read="^($EXCHANGE|$DLX|$own)\$"
  run set_permissions -p "$VHOST" "$user" "$configure" "$write" "$read"
}

# an endpoint's instance is its identity with dots for slashes plus 8 hex digits
instance() { printf '%s\\.[0-9a-f]+' "$(esc "${1//\//.}")"; }
reply_queues() { printf 'reply\\.%s' "$(instance "$1")"; }

if [[ $VHOST != / ]]; then
  if [[ $DRY_RUN == 1 ]] || ! "$CTL" list_vhosts --silent | grep -qxF -- "$VHOST"; then
    run add_vhost "$VHOST"
  fi
fi

# the coordinator: the shared ferry.coordinator, its private coordinator.<owner>, its reply queues
ensure_user ferry-coordinator
permissions ferry-coordinator "ferry\\.coordinator|coordinator\\..+|$(reply_queues coordinator)"

# FERRY_HOSTS='*' is not globbed against the working directory
set -f
for host in $HOSTS; do
  for service in $SERVICES; do
    if [[ $host == '*' ]]; then
      # any host (node names may hold dots): ferry.<host>.<service>, reply.host.<host>.<service>.<hex>
      user="ferry-$service"
      ensure_user "$user"
      permissions "$user" "ferry\\..+\\.$(esc "$service")|reply\\.host\\..+\\.$(esc "$service")\\.[0-9a-f]+"
    else
      user="ferry-$host-$service"
      ensure_user "$user"
      permissions "$user" "ferry\\.$(esc "$host")\\.$(esc "$service")|$(reply_queues "host/$host/$service")"
    fi
  done
done
set +f

for client in $CLIENTS; do
  user="ferry-client-$client"
  ensure_user "$user"
  # reply.<instance> for answers, watch.<instance> for migration.# status events (ferry_cli.client)
  permissions "$user" "$(reply_queues "client/$client")|watch\\.$(instance "client/$client")"
  # topic authorisation on the ferry exchange. write = routing keys it may publish: the
  # public contract, coordinator queries, and the CLI's host commands and VM events.
  # read = routing keys it may bind with: its own replies and migration status, so a
  # client cannot bind reply.# and read everybody's answers.
  run set_topic_permissions -p "$VHOST" "$user" ferry \
    '^(migration\.requested|migration\.cancel|coordinator\.query|host\.[^.]+\.[^.]+|vm\.[^.]+\.event)$' \
    "^(reply\\.client\\.$(esc "$client")\\.[0-9a-f]+|migration\\.#|migration\\.[a-z_]+)\$"
done

if [[ -n $OPS_USER ]]; then
  ensure_user "$OPS_USER"
  # inspect and drain the dead-letter queue; nothing else
  run set_permissions -p "$VHOST" "$OPS_USER" '^$' '^$' "^($DLQ)\$"
fi
