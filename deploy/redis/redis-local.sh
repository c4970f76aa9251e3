#!/usr/bin/env bash
# Local Redis for tests, benchmarks and demos: a standalone server or a 3-node Redis Cluster on
# loopback ports, each node with its own directory under DIR. No persistence, no replicas.
#
#   redis-local.sh standalone DIR PORT          start one server
#   redis-local.sh standalone-tls DIR PORT      start one server that speaks only TLS on PORT
#                                               and requires a client certificate; makes a
#                                               test CA and certificates in DIR/tls (openssl):
#                                               ca.crt, server.crt/key, client.crt/key
#   redis-local.sh cluster DIR PORT PORT PORT   start 3 (or more) nodes and join them
#   redis-local.sh cluster-tls DIR PORT PORT PORT
#                                               the same, speaking only TLS (clients and the
#                                               cluster bus), certificates as standalone-tls
#   redis-local.sh kill-node DIR PORT           SIGKILL one node (failure drills)
#   redis-local.sh start-node DIR PORT          start a node again with its saved config
#   redis-local.sh stop DIR                     stop every node started under DIR
#
# Environment: REDIS_SERVER, REDIS_CLI (binaries), REDIS_NODE_TIMEOUT_MS (cluster, 1500),
# REDIS_PASSWORD (AUTH for the default user; none when unset).
set -euo pipefail
SERVER=${REDIS_SERVER:-redis-server}
CLI=${REDIS_CLI:-redis-cli}
TIMEOUT_MS=${REDIS_NODE_TIMEOUT_MS:-1500}
if [ -n "${REDIS_PASSWORD:-}" ]; then
  export REDISCLI_AUTH="$REDIS_PASSWORD"  # redis-cli authenticates with it
  AUTH_ARGS=(--requirepass "$REDIS_PASSWORD" --masterauth "$REDIS_PASSWORD")
else
  AUTH_ARGS=()
fi

CLI_TLS=()

die() { echo "redis-local.sh: $*" >&2; exit 2; }

wait_up() {  # PORT [LOG: its last lines go into the error]
  for _ in $(seq 1 100); do
    "$CLI" -h 127.0.0.1 -p "$1" "${CLI_TLS[@]}" ping >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  die "node 127.0.0.1:$1 did not answer PING within 5 s${2:+: $(tail -n 2 "$2" 2>/dev/null)}"
}

make_certs() {  # DIR: a CA, and a server and a client certificate it signed, for 127.0.0.1
  command -v openssl >/dev/null || die "openssl is not installed (apt-get install openssl)"
  mkdir -p "$1"
  (
    cd "$1"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 7 \
      -subj "/CN=hps local test CA"
    for who in server client; do
      openssl req -newkey rsa:2048 -nodes -keyout "$who.key" -out "$who.csr" -subj "/CN=127.0.0.1"
      printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >"$who.ext"
      openssl x509 -req -in "$who.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 7 \
        -out "$who.crt" -extfile "$who.ext"
    done
  ) >"$1/openssl.log" 2>&1 || die "making test certificates failed: $(tail -n 3 "$1/openssl.log")"
}

start_node() {  # DIR PORT MODE(no|yes|tls|cluster-tls): yes = a cluster node
  local d="$1/$2"
  mkdir -p "$d"
  local args=(--bind 127.0.0.1 --dir "$d" --daemonize yes
    --pidfile "$d/redis.pid" --logfile "$d/redis.log" --save "" --appendonly no
    --protected-mode yes "${AUTH_ARGS[@]}")
  if [ "$3" = tls ] || [ "$3" = cluster-tls ] || [ -f "$d/tls" ]; then
    local t="$1/tls"
    touch "$d/tls"  # start-node starts it with TLS again
    args+=(--port 0 --tls-port "$2" --tls-cert-file "$t/server.crt" --tls-key-file "$t/server.key"
      --tls-ca-cert-file "$t/ca.crt" --tls-auth-clients yes --tls-cluster yes)
    CLI_TLS=(--tls --cacert "$t/ca.crt" --cert "$t/client.crt" --key "$t/client.key")
  else
    args+=(--port "$2")
    CLI_TLS=()
  fi
  if [ "$3" = yes ] || [ "$3" = cluster-tls ] || [ -f "$d/nodes.conf" ]; then
    args+=(--cluster-enabled yes --cluster-config-file "$d/nodes.conf"
      --cluster-node-timeout "$TIMEOUT_MS" --cluster-require-full-coverage no
      --cluster-allow-reads-when-down yes)
  fi
  "$SERVER" "${args[@]}"
  wait_up "$2" "$d/redis.log"
}

stop_node() {  # DIR/PORT SIGNAL
  local pidfile="$1/redis.pid"
  [ -f "$pidfile" ] || return 0
  local pid
  pid=$(cat "$pidfile")
  kill "-$2" "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || break
    # A zombie (exited, not yet reaped by a non-reaping init) is stopped too.
    case "$(ps -o stat= -p "$pid" 2>/dev/null)" in Z*) break ;; esac
    sleep 0.05
  done
  rm -f "$pidfile"
}

cmd=${1:-}; shift || true
case "$cmd" in
  standalone)
    [ $# -eq 2 ] || die "usage: standalone DIR PORT"
    start_node "$1" "$2" no ;;
  standalone-tls)
    [ $# -eq 2 ] || die "usage: standalone-tls DIR PORT"
    make_certs "$1/tls"
    start_node "$1" "$2" tls ;;
  cluster|cluster-tls)
    [ $# -ge 4 ] || die "usage: $cmd DIR PORT PORT PORT..."
    dir=$1; shift
    mode=yes
    if [ "$cmd" = cluster-tls ]; then make_certs "$dir/tls"; mode=cluster-tls; fi
    for p in "$@"; do  # a node also listens on its port + 10000 (the cluster bus)
      [ "$p" -le 55535 ] 2>/dev/null || die "cluster port $p: must be a number <= 55535 (its bus port is $p + 10000)"
    done
    addrs=()
    for p in "$@"; do start_node "$dir" "$p" "$mode"; addrs+=("127.0.0.1:$p"); done
    "$CLI" "${CLI_TLS[@]}" --cluster create "${addrs[@]}" --cluster-replicas 0 --cluster-yes >"$dir/create.log" 2>&1 \
      || die "cluster create failed: $(tail -n 5 "$dir/create.log")"
    for _ in $(seq 1 100); do
      ok=1
      for p in "$@"; do
        "$CLI" -h 127.0.0.1 -p "$p" "${CLI_TLS[@]}" cluster info | grep -q 'cluster_state:ok' || ok=0
      done
      [ $ok = 1 ] && exit 0
      sleep 0.1
    done
    die "cluster did not reach cluster_state:ok" ;;
  kill-node)
    [ $# -eq 2 ] || die "usage: kill-node DIR PORT"
    stop_node "$1/$2" KILL ;;
  start-node)
    [ $# -eq 2 ] || die "usage: start-node DIR PORT"
    start_node "$1" "$2" no ;;
  stop)
    [ $# -eq 1 ] || die "usage: stop DIR"
    for d in "$1"/*/; do [ -d "$d" ] && stop_node "${d%/}" TERM; done ;;
  *) die "unknown command '$cmd' (standalone, standalone-tls, cluster, cluster-tls, kill-node, start-node, stop)" ;;
esac
