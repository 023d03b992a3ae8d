#!/usr/bin/env bash
# A RabbitMQ cluster of three nodes on this machine, for tests: ferry-c1..3@localhost on AMQP
# ports 5681-5683 (distribution 25681-25683, management off), state under /tmp/ferry-rmq-cluster
# (wiped by stop: every start is a fresh cluster),
# one Erlang cookie of its own. The machine's main broker (rabbit@HOST, 5672) is never touched.
#   scripts/rabbitmq-cluster.sh start|stop|status|urls|kill NODE|restart NODE|ctl NODE ARGS  (NODE: 1-3)
# FERRY_RMQ_CLUSTER_{DIR,PORT,NAME,NODES} make another one beside it, e.g. a single node of one's
# own to restart (NAME=ferry-chaos NODES=1 PORT=5709: ferry-chaos1@localhost on 5710).
set -euo pipefail

BASE=${FERRY_RMQ_CLUSTER_DIR:-/tmp/ferry-rmq-cluster}
PORT0=${FERRY_RMQ_CLUSTER_PORT:-5680}
NAME=${FERRY_RMQ_CLUSTER_NAME:-ferry-c}
mapfile -t NODES < <(seq 1 "${FERRY_RMQ_CLUSTER_NODES:-3}")

# the scripts themselves, not Debian's wrappers (those switch to the rabbitmq user and its HOME)
BIN=/usr/lib/rabbitmq/bin
[[ -x $BIN/rabbitmq-server ]] || BIN=$(dirname "$(command -v rabbitmq-server || echo /usr/sbin/x)")

node_name() { echo "$NAME$1@localhost"; }
amqp_port() { echo $((PORT0 + $1)); }

# every rabbitmq command of a node runs with that node's environment and the cluster's cookie
node_env() {
  local i=$1
  export HOME="$BASE/home"  # the Erlang cookie is read from $HOME/.erlang.cookie
  export RABBITMQ_NODENAME
  RABBITMQ_NODENAME=$(node_name "$i")
  export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
  export RABBITMQ_NODE_PORT
  RABBITMQ_NODE_PORT=$(amqp_port "$i")
  export RABBITMQ_DIST_PORT=$((20000 + PORT0 + i))
  export RABBITMQ_MNESIA_BASE="$BASE/c$i/mnesia"
  export RABBITMQ_LOG_BASE="$BASE/c$i/log"
  export RABBITMQ_PID_FILE="$BASE/c$i/pid"
  export RABBITMQ_CONFIG_FILE="$BASE/c$i/rabbitmq"
  export RABBITMQ_ENABLED_PLUGINS_FILE="$BASE/c$i/enabled_plugins"
  export RABBITMQ_ENABLED_PLUGINS=""
}

ctl() { local i=$1; shift; (node_env "$i"; "$BIN/rabbitmqctl" -q -n "$(node_name "$i")" "$@"); }

prepare() {
  mkdir -p "$BASE/home"
  if [[ ! -s "$BASE/home/.erlang.cookie" ]]; then
    head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' | tr a-f A-F > "$BASE/home/.erlang.cookie"
    chmod 400 "$BASE/home/.erlang.cookie"
  fi
  for i in "${NODES[@]}"; do
    mkdir -p "$BASE/c$i/mnesia" "$BASE/c$i/log"
    : > "$BASE/c$i/enabled_plugins"
    # a lost node is noticed within seconds (quorum queues get a member on each of the three: the
    # default initial group size, 3, is the whole cluster)
    cat > "$BASE/c$i/rabbitmq.conf" <<CONF
listeners.tcp.default = 127.0.0.1:$(amqp_port "$i")
loopback_users = none
net_ticktime = 10
CONF
  done
}

start_node() {
  local i=$1
  # in the background rather than -detached, which exits quietly here when the boot fails
  (node_env "$i"; setsid nohup "$BIN/rabbitmq-server" >"$BASE/c$i/server.out" 2>&1 &)
  # await_startup fails at once while the node is not yet known to epmd
  local n
  for n in $(seq 1 90); do
    ctl "$i" await_startup --timeout 90 >/dev/null 2>&1 && return 0
    sleep 1
  done
  echo "rabbitmq-cluster: $(node_name "$i") did not start (see $BASE/c$i/server.out)" >&2
  return 1
}

up() { ctl "$1" await_startup --timeout 5 >/dev/null 2>&1; }

joined() {
  ctl "$1" cluster_status --formatter json 2>/dev/null | FIRST=$(node_name 1) python3 -c \
    'import json,os,sys; sys.exit(0 if os.environ["FIRST"] in json.load(sys.stdin)["running_nodes"] else 1)'
}

cmd_start() {
  command -v rabbitmq-server >/dev/null || { echo "rabbitmq-cluster: rabbitmq-server is not installed" >&2; exit 2; }
  prepare
  # all at once: a clustered node that boots waits for the peers it last saw
  local pids=() i
  for i in "${NODES[@]}"; do
    up "$i" || { start_node "$i" & pids+=($!); }
  done
  for i in "${pids[@]}"; do wait "$i"; done
  for i in "${NODES[@]:1}"; do
    joined "$i" && continue
    ctl "$i" stop_app >/dev/null
    ctl "$i" reset >/dev/null
    ctl "$i" join_cluster "$(node_name 1)" >/dev/null 2>&1
    ctl "$i" start_app >/dev/null
    ctl "$i" await_startup --timeout 90
  done
  cmd_status
}

cmd_stop() {
  for i in "${NODES[@]}"; do
    if up "$i"; then ctl "$i" stop >/dev/null 2>&1 || true; fi
  done
  for i in "${NODES[@]}"; do cmd_kill "$i"; done  # what did not stop in time
  # the cluster is for tests: each start is a fresh one
  for i in "${NODES[@]}"; do rm -rf "$BASE/c$i/mnesia"; done
}

cmd_status() {
  for i in "${NODES[@]}"; do
    if up "$i"; then echo "$(node_name "$i") up amqp://127.0.0.1:$(amqp_port "$i")"
    else echo "$(node_name "$i") down"; fi
  done
  up 1 && ctl 1 cluster_status --formatter json | python3 -c 'import json,sys; d=json.load(sys.stdin); print("running:", " ".join(sorted(d["running_nodes"])))' || true
}

# the Erlang VM of one node, killed hard (SIGKILL): what a crashed machine looks like
cmd_kill() {
  local i=$1 pid
  pid=$(cat "$BASE/c$i/pid" 2>/dev/null || true)
  # no pid file yet (a node still booting writes it late): ask the node itself
  [[ -n "$pid" ]] || pid=$(ctl "$i" eval 'os:getpid().' 2>/dev/null | tr -dc 0-9 || true)
  [[ -n "$pid" ]] && kill -9 "$pid" 2>/dev/null || true
  rm -f "$BASE/c$i/pid"
}

cmd_restart() { local i=$1; up "$i" && ctl "$i" stop >/dev/null 2>&1 || cmd_kill "$i"; start_node "$i"; }

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  urls) for i in "${NODES[@]}"; do printf '%s' "${sep:-}amqp://guest:guest@127.0.0.1:$(amqp_port "$i")"; sep=,; done; echo ;;
  ctl) shift; ctl "$@" ;;  # ctl NODE ARGS...: rabbitmqctl on one node of the cluster
  kill) cmd_kill "${2:?node 1, 2 or 3}" ;;
  restart) cmd_restart "${2:?node 1, 2 or 3}" ;;
  *) echo "usage: $0 start|stop|status|urls|kill NODE|restart NODE|ctl NODE ARGS" >&2; exit 2 ;;
esac
