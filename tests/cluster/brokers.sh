#!/usr/bin/env bash
# Starts and stops the brokers of the scale-out tests on private loopback ports, as root or
# any user, without system services (Debian packages rabbitmq-server and redis-server):
#   brokers.sh rabbit-start N   RabbitMQ 3.x nodes (AMQP 1.0 on 127.0.0.1:$RABBIT_PORT+i,
#                               management API on $RABBIT_HTTP_PORT+i, guest/guest; AMQP over
#                               TLS on $RABBIT_TLS_PORT+i when RABBIT_TLS_DIR is set)
#   brokers.sh rabbit-stop N    (KEEP=1 brokers.sh rabbit-start N: start again over the data)
#   brokers.sh redis-start N R  Redis Cluster of N nodes with R replicas per master
#                               (127.0.0.1:$REDIS_PORT+i, cluster bus on $REDIS_BUS_PORT+i,
#                               default $REDIS_PORT+200)
#   brokers.sh redis-stop N
# Everything lives under $BASE; nodes are stopped by the PIDs they wrote there.
set -euo pipefail
BASE=${BASE:-${TMPDIR:-/tmp}/ferrule-cluster-test}
RABBIT_PORT=${RABBIT_PORT:-25680}
RABBIT_HTTP_PORT=${RABBIT_HTTP_PORT:-25690}
RABBIT_DIST_PORT=${RABBIT_DIST_PORT:-25700}
# With RABBIT_TLS_DIR (ca.crt, server.crt, server.key): AMQP over TLS on $RABBIT_TLS_PORT+i.
RABBIT_TLS_PORT=${RABBIT_TLS_PORT:-25670}
EPMD_PORT=${EPMD_PORT:-25369}
REDIS_PORT=${REDIS_PORT:-27000}
CMD=$1; COUNT=${2:-1}; REPLICAS=${3:-0}

rabbit_env() {
  local i=$1 d=$BASE/rabbit/n$1
  mkdir -p "$d/home" "$d/log" "$d/mnesia"
  if [ ! -f "$d/home/.erlang.cookie" ]; then
    cp "$BASE/rabbit/cookie" "$d/home/.erlang.cookie"; chmod 400 "$d/home/.erlang.cookie"
  fi
  # The Debian wrapper (/usr/sbin/rabbitmq-server) switches to the rabbitmq user and its
  # home; the real scripts take everything from the environment.
  local sbin; sbin=$(ls -d /usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin | head -1)
  export PATH=$sbin:$PATH HOME=$d/home RABBITMQ_CONF_ENV_FILE=/dev/null
  export RABBITMQ_NODENAME=ferrule$i@localhost RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
  export RABBITMQ_NODE_PORT=$((RABBIT_PORT + i)) RABBITMQ_DIST_PORT=$((RABBIT_DIST_PORT + i))
  export RABBITMQ_MNESIA_BASE=$d/mnesia RABBITMQ_LOG_BASE=$d/log RABBITMQ_PID_FILE=$d/pid
  export RABBITMQ_CONFIG_FILE=$d/rabbitmq.conf RABBITMQ_ENABLED_PLUGINS_FILE=$BASE/rabbit/enabled_plugins
  export ERL_EPMD_PORT=$EPMD_PORT ERL_EPMD_ADDRESS=127.0.0.1
  export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
}

case $CMD in
rabbit-start)
  # KEEP=1: start the nodes again over their data (a broker restart).
  if [ "${KEEP:-0}" != 1 ]; then
    rm -rf "$BASE/rabbit"; mkdir -p "$BASE/rabbit"
    head -c 24 /dev/urandom | base64 | tr -dc A-Za-z0-9 > "$BASE/rabbit/cookie"
    echo "[rabbitmq_amqp1_0,rabbitmq_management]." > "$BASE/rabbit/enabled_plugins"
  fi
  for i in $(seq 1 "$COUNT"); do rm -f "$BASE/rabbit/n$i/stdout.log"; done
  for i in $(seq 1 "$COUNT"); do
    ( rabbit_env "$i"
      { echo "listeners.tcp.1 = 127.0.0.1:$RABBITMQ_NODE_PORT"
        echo "loopback_users = none"
        echo "amqp1_0.default_user = guest"
        echo "log.console = false"
        echo "management.tcp.ip = 127.0.0.1"
        echo "management.tcp.port = $((RABBIT_HTTP_PORT + i))"
        if [ -n "${RABBIT_TLS_DIR:-}" ]; then
          echo "listeners.ssl.1 = 127.0.0.1:$((RABBIT_TLS_PORT + i))"
          echo "ssl_options.cacertfile = $RABBIT_TLS_DIR/ca.crt"
          echo "ssl_options.certfile = $RABBIT_TLS_DIR/server.crt"
          echo "ssl_options.keyfile = $RABBIT_TLS_DIR/server.key"
          echo "ssl_options.verify = verify_none"
          echo "ssl_options.fail_if_no_peer_cert = false"
        fi
        if [ "$COUNT" -gt 1 ]; then
          echo "cluster_formation.peer_discovery_backend = classic_config"
          for j in $(seq 1 "$COUNT"); do echo "cluster_formation.classic_config.nodes.$j = ferrule$j@localhost"; done
        fi; } > "$BASE/rabbit/n$i/rabbitmq.conf"
      cd "$BASE/rabbit/n$i"
      setsid nohup rabbitmq-server > "$BASE/rabbit/n$i/stdout.log" 2>&1 < /dev/null & )
  done
  ( rabbit_env 1
    for _ in $(seq 1 120); do
      rabbitmq-diagnostics -q ping >/dev/null 2>&1 && break
      for i in $(seq 1 "$COUNT"); do
        if grep -q "Kernel pid terminated" "$BASE/rabbit/n$i/stdout.log" 2>/dev/null; then
          echo "RabbitMQ node $i did not start:" >&2; tail -3 "$BASE/rabbit/n$i/stdout.log" >&2; exit 1
        fi
      done
      sleep 0.5
    done
    rabbitmqctl -q await_startup
    rabbitmqctl -q await_online_nodes "$COUNT" --timeout 120 )
  ;;
rabbit-stop)
  pids=()
  for i in $(seq "$COUNT" -1 1); do
    f=$BASE/rabbit/n$i/pid
    if [ -f "$f" ]; then pids+=("$(cat "$f")"); fi
  done
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
  done
  # epmd outlives the nodes (it listens on our private port only) and refuses to stop
  # while a node is still registered.
  for _ in $(seq 1 25); do
    ERL_EPMD_PORT=$EPMD_PORT epmd -kill 2>/dev/null | grep -q "^Killed" && break
    ERL_EPMD_PORT=$EPMD_PORT epmd -names >/dev/null 2>&1 || break
    sleep 0.2
  done
  ;;
redis-start)
  # Cluster bus ports are set explicitly ($REDIS_BUS_PORT+i): Redis's default (port+10000)
  # falls in Linux's ephemeral range, where any outgoing connection can hold it. Every wait
  # is bounded and prints the nodes' logs when it runs out; a creation that does not settle
  # is retried once from scratch.
  REDIS_BUS_PORT=${REDIS_BUS_PORT:-$((REDIS_PORT + 200))}
  redis_nodes_stop() {
    for i in $(seq 1 "$COUNT"); do
      f=$BASE/redis/n$((REDIS_PORT + i))/redis.pid
      [ -f "$f" ] && kill -9 "$(cat "$f")" 2>/dev/null || true
    done
  }
  redis_fail() {
    echo "Redis Cluster did not start: $1" >&2
    for i in $(seq 1 "$COUNT"); do
      echo "--- node $((REDIS_PORT + i)) (bus $((REDIS_BUS_PORT + i)))" >&2
      tail -5 "$BASE/redis/n$((REDIS_PORT + i))/redis.log" >&2 2>/dev/null || true
    done
    tail -5 "$BASE/redis/create.log" >&2 2>/dev/null || true
    ss -ltnp 2>/dev/null | grep -E ":($REDIS_PORT|$REDIS_BUS_PORT)" >&2 || true
    return 1
  }
  redis_try() {
    rm -rf "$BASE/redis"
    local nodes=() i p d
    for i in $(seq 1 "$COUNT"); do
      p=$((REDIS_PORT + i)); d=$BASE/redis/n$p; mkdir -p "$d"
      redis-server --port "$p" --cluster-port $((REDIS_BUS_PORT + i)) --bind 127.0.0.1 \
        --protected-mode yes --dir "$d" --cluster-enabled yes --cluster-config-file nodes.conf \
        --cluster-node-timeout 3000 --appendonly no --save '' \
        --daemonize yes --pidfile "$d/redis.pid" --logfile "$d/redis.log" || { redis_fail "node $p"; return 1; }
      nodes+=("127.0.0.1:$p")
    done
    for i in $(seq 1 "$COUNT"); do
      timeout 30 sh -c "until redis-cli -p $((REDIS_PORT + i)) ping >/dev/null 2>&1; do sleep 0.05; done" \
        || { redis_fail "node $((REDIS_PORT + i)) does not answer"; return 1; }
    done
    timeout 60 redis-cli --cluster create "${nodes[@]}" --cluster-replicas "$REPLICAS" --cluster-yes \
      > "$BASE/redis/create.log" 2>&1 || { redis_fail "cluster create"; return 1; }
    for i in $(seq 1 "$COUNT"); do
      timeout 60 sh -c "until redis-cli -p $((REDIS_PORT + i)) cluster info | tr -d '\r' | grep -q '^cluster_state:ok'; do sleep 0.1; done" \
        || { redis_fail "node $((REDIS_PORT + i)) never reached cluster_state:ok"; return 1; }
    done
    # Replicas attach after the create returns: wait until each one replicates its master,
    # or a test killing a master would find no replica to fail over to.
    local want=$((COUNT / (REPLICAS + 1) * REPLICAS)) up
    for _ in $(seq 1 600); do
      up=0
      for i in $(seq 1 "$COUNT"); do
        redis-cli -p $((REDIS_PORT + i)) info replication | tr -d '\r' | grep -q '^master_link_status:up' && up=$((up + 1))
      done
      [ "$up" -ge "$want" ] && return 0
      sleep 0.1
    done
    redis_fail "$up of $want replicas in sync"
  }
  redis_try || { redis_nodes_stop; echo "retrying once" >&2; redis_try; } || { redis_nodes_stop; exit 1; }
  ;;
redis-stop)
  for i in $(seq 1 "$COUNT"); do
    f=$BASE/redis/n$((REDIS_PORT + i))/redis.pid
    [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
  done
  ;;
*) echo "usage: $0 rabbit-start N | rabbit-stop N | redis-start N R | redis-stop N" >&2; exit 2 ;;
esac
