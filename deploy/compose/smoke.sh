#!/usr/bin/env bash
# Smoke check of a running 3-instance Ferrule cluster (deploy/compose/cluster.yaml):
#   1. every instance answers /health/ready;
#   2. a tenant made through instance 1's management API, its device through instance 2's
#      and the device's credentials through instance 3's (registry in Redis, shared);
#   3. an application on instance 2 (AMQP) receives an event a device sent to instance 1
#      (HTTP) and one sent to instance 3 (HTTP) (RabbitMQ quorum queue event.TENANT);
#   4. telemetry nobody consumes is refused on every instance (503, Redis consumer leases).
# Needs curl and a ferrule binary on the host ($FERRULE, default `ferrule`; it is only a
# client here). Ports default to the compose file's host ports; override for another
# layout: HOST, OPS_PORTS, HTTP_PORTS, AMQP_PORTS, REGISTRY_PORTS (3 each, space-separated),
# TOKEN, APP_PASSWORD (the placeholders of ferrule-cluster.toml unless changed).
set -euo pipefail
FERRULE=${FERRULE:-ferrule}
HOST=${HOST:-127.0.0.1}
read -r -a OPS <<<"${OPS_PORTS:-8088 8098 8108}"
read -r -a HTTP <<<"${HTTP_PORTS:-8080 8090 8100}"
read -r -a AMQP <<<"${AMQP_PORTS:-5672 5682 5692}"
read -r -a REG <<<"${REGISTRY_PORTS:-28080 28090 28100}"
TOKEN=${TOKEN:-change-me-operator-token-0123456789}
APP_PASSWORD=${APP_PASSWORD:-change-me-application-password}
TENANT=${TENANT:-smoke-$(date +%s)-$$}
DEVICE_PASSWORD=smoke-device-password
WORK=$(mktemp -d)
CONSUMER=
cleanup() {
  if [ -n "$CONSUMER" ]; then kill "$CONSUMER" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

step() { printf '== %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

step "readiness"
for i in 0 1 2; do
  ok=
  for _ in $(seq 1 60); do
    if [ "$(curl -s -o /dev/null -w '%{http_code}' "http://$HOST:${OPS[$i]}/health/ready")" = 200 ]; then ok=1; break; fi
    sleep 1
  done
  [ -n "$ok" ] || fail "instance $((i + 1)) (ops port ${OPS[$i]}) not ready within 60 s"
  echo "instance $((i + 1)): ready"
done

step "registry through three instances (tenant $TENANT)"
"$FERRULE" tenant --url "http://$HOST:${REG[0]}" --token "$TOKEN" create "$TENANT" >/dev/null
echo "tenant created through instance 1"
"$FERRULE" device --url "http://$HOST:${REG[1]}" --token "$TOKEN" create "$TENANT" d1 >/dev/null
echo "device d1 created through instance 2"
"$FERRULE" credentials --url "http://$HOST:${REG[2]}" --token "$TOKEN" set "$TENANT" d1 \
  --data "[{\"type\": \"hashed-password\", \"auth-id\": \"d1\", \"secrets\": [{\"pwd-plain\": \"$DEVICE_PASSWORD\"}]}]" >/dev/null
echo "credentials set through instance 3"

post() { # instance-index endpoint body -> HTTP status
  curl -s -o /dev/null -w '%{http_code}' -X POST "http://$HOST:${HTTP[$1]}/$2" \
    -u "d1@$TENANT:$DEVICE_PASSWORD" -H 'content-type: text/plain' --data-binary "$3"
}

step "telemetry without a consumer: 503 on every instance"
for i in 0 1 2; do
  code=$(post "$i" telemetry "nobody listens")
  [ "$code" = 503 ] || fail "instance $((i + 1)): telemetry without a consumer answered $code, expected 503"
  echo "instance $((i + 1)): telemetry -> $code"
done

step "events: devices on instances 1 and 3, the application on instance 2"
FERRULE_AMQP_PASSWORD=$APP_PASSWORD "$FERRULE" consume event "$TENANT" --amqp "$HOST:${AMQP[1]}" \
  --user app --count 2 --timeout 30 >"$WORK/events.jsonl" 2>"$WORK/consume.err" &
CONSUMER=$!
sleep 2
for i in 0 2; do
  code=
  for _ in $(seq 1 10); do
    code=$(post "$i" event "event via instance $((i + 1))")
    [ "$code" = 202 ] && break
    sleep 1
  done
  [ "$code" = 202 ] || fail "instance $((i + 1)): event answered $code, expected 202"
  echo "instance $((i + 1)): event -> $code"
done
wait "$CONSUMER" || fail "consumer: $(cat "$WORK/consume.err")"
CONSUMER=
for i in 1 3; do
  grep -q "event via instance $i" "$WORK/events.jsonl" || fail "event via instance $i not received: $(cat "$WORK/events.jsonl")"
done
echo "application on instance 2 received:"
sed 's/^/  /' "$WORK/events.jsonl"
step "OK"
