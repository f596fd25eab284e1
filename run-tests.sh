#!/usr/bin/env bash
# Runs every check and test: formatting and lints, Rust unit and integration tests, the
# interoperability tests (tests/interop) against a real `ferrule serve` with third-party
# clients, the scale-out tests (tests/cluster: instances over RabbitMQ and Redis Cluster),
# a fuzz smoke run and the hostile-input tests.
# Installs what the tests need when it is missing (Debian/Ubuntu; root or sudo).
set -euo pipefail
cd "$(dirname "$0")"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
# Free disk, in the log: a full disk fails a build far from its cause.
disk_free() { df -Ph . | awk 'NR == 2 { print "    disk: " $4 " free of " $2 }'; }
disk_free

# System packages the tests drive: `command` => package.
declare -A need=(
  [redis-server]=redis-server
  [rabbitmq-server]=rabbitmq-server
  [mosquitto_pub]=mosquitto-clients
  [mosquitto]=mosquitto
  [coap-client-notls]=libcoap3-bin
  [coap-client-openssl]=libcoap3-bin
  [curl]=curl
  [openssl]=openssl
)
missing=()
for cmd in "${!need[@]}"; do
  # rabbitmq-server lives in /usr/sbin, which a user's PATH may lack.
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("${need[$cmd]}")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing ${missing[*]}"
  as_root apt-get update -qq
  # shellcheck disable=SC2046
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(printf '%s\n' "${missing[@]}" | sort -u) >/dev/null
fi

echo "==> Python test clients (tests/requirements.txt)"
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -r tests/requirements.txt

echo "==> cargo fmt --check, cargo clippy -D warnings"
# Both ship with the toolchain's default profile; a toolchain without them cannot fetch
# them here (no rustup server), so they are skipped loudly rather than failing the run.
if cargo fmt --version >/dev/null 2>&1; then
  cargo fmt --all --check
else
  echo "WARNING: rustfmt is not installed: formatting NOT checked" >&2
fi
if cargo clippy --version >/dev/null 2>&1; then
  cargo clippy --workspace --all-targets -- -D warnings
else
  echo "WARNING: clippy is not installed: lints NOT checked" >&2
fi

echo "==> cargo build"
cargo build --workspace --all-targets
disk_free

echo "==> benchmark harness, smoke mode (tiny counts; no timing is asserted)"
timeout 600 python3 tests/loadgen/bench.py --smoke

echo "==> cargo test"
# A hung test must fail the run, not eat CI's time budget.
timeout 1800 cargo test --workspace

echo "==> interoperability tests"
FERRULE_BIN="$PWD/target/debug/ferrule" timeout 1800 python3 -m pytest -q tests/interop

echo "==> scale-out tests (3 instances over RabbitMQ and a Redis Cluster on private loopback ports)"
FERRULE_BIN="$PWD/target/debug/ferrule" timeout 900 python3 -m pytest -q tests/cluster

echo "==> hostile-input tests (raw-socket attacks against a real ferrule serve)"
FERRULE_BIN="$PWD/target/debug/ferrule" timeout 600 python3 -m pytest -q tests/hostile

if [ "${FERRULE_FREE_DISK:-0}" = 1 ]; then
  # Set by .ci/run: nothing below needs the debug build, and the fuzz build is as large.
  echo "==> removing the debug build before the fuzz build (FERRULE_FREE_DISK=1)"
  rm -rf target/debug
  disk_free
fi

echo "==> fuzz targets, smoke run (fixed seeds, a fixed number of runs per target)"
timeout 1800 fuzz/run.sh smoke
