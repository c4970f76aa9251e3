#!/bin/sh
# Join the Redis nodes in $REDIS_NODES ("host:port host:port ...") into one Redis Cluster
# with no replicas, unless they already form one; then wait until every slot is served.
# Run once by the compose init service; idempotent, so a restart does no harm.
set -eu

: "${REDIS_NODES:?set REDIS_NODES to the node list, e.g. 'redis-0:7000 redis-1:7000'}"
TIMEOUT="${REDIS_CLUSTER_TIMEOUT:-60}"

first_host=${REDIS_NODES%% *}
first_port=${first_host##*:}
first_host=${first_host%:*}

# redis-cli --cluster create wants addresses; resolve host names once.
addrs=""
for node in $REDIS_NODES; do
    host=${node%:*}
    port=${node##*:}
    ip=$(getent ahostsv4 "$host" | awk 'NR == 1 { print $1 }')
    if [ -z "$ip" ]; then
        echo "cluster-init: cannot resolve Redis node '$host'" >&2
        exit 1
    fi
    waited=0
    until redis-cli -h "$ip" -p "$port" ping >/dev/null 2>&1; do
        waited=$((waited + 1))
        if [ "$waited" -ge "$TIMEOUT" ]; then
            echo "cluster-init: Redis node $node ($ip:$port) did not answer in ${TIMEOUT}s" >&2
            exit 1
        fi
        sleep 1
    done
    addrs="$addrs $ip:$port"
done

state() {
    redis-cli -h "$first_host" -p "$first_port" cluster info | tr -d '\r' \
        | awk -F: '$1 == "cluster_state" { print $2 }'
}

if [ "$(state)" = "ok" ]; then
    echo "cluster-init: the cluster already serves every slot"
    exit 0
fi
# shellcheck disable=SC2086  # one argument per node
redis-cli --cluster create $addrs --cluster-replicas 0 --cluster-yes

waited=0
until [ "$(state)" = "ok" ]; do
    waited=$((waited + 1))
    if [ "$waited" -ge "$TIMEOUT" ]; then
        echo "cluster-init: cluster_state is not ok after ${TIMEOUT}s" >&2
        exit 1
    fi
    sleep 1
done
echo "cluster-init: cluster ready:$addrs"
