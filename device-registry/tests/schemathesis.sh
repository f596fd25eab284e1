#!/usr/bin/env bash
# Runs schemathesis (PyPI `schemathesis`, 4.x) with its default checks against a live
# management API, using the corrected Hono spec in device-registry/openapi/.
#
#   device-registry/tests/schemathesis.sh BASE_URL TOKEN [extra schemathesis args]
#       e.g. BASE_URL=http://127.0.0.1:28080 (the API lives under BASE_URL/v1)
#   device-registry/tests/schemathesis.sh
#       starts `cargo run -p ferrule-device-registry --example serve` on a free port with
#       an embedded store in a temp dir, runs against it, and stops it.
#
# Exit status is schemathesis's (0 = all checks passed).
set -euo pipefail
crate_dir=$(cd "$(dirname "$0")/.." && pwd)
spec="$crate_dir/openapi/hono-device-registry-v1.yaml"
max_examples=${SCHEMATHESIS_MAX_EXAMPLES:-50}
# schemathesis keeps a cache directory (.schemathesis/) in its working directory: run it
# in a scratch directory so the repository stays clean.
work=$(mktemp -d)
server=
cleanup() {
    if [[ -n $server ]]; then kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

if [[ $# -ge 2 ]]; then
    base=$1 token=$2; shift 2
else
    token="schemathesis-token-$RANDOM$RANDOM$RANDOM"
    log=$work/serve.log
    cargo build -q -p ferrule-device-registry --example serve
    cargo run -q -p ferrule-device-registry --example serve -- --port 0 --token "$token" >"$log" 2>&1 &
    server=$!
    for _ in $(seq 1 300); do
        grep -q '^listening on ' "$log" && break
        kill -0 $server 2>/dev/null || { cat "$log"; echo "serve example exited" >&2; exit 1; }
        sleep 0.1
    done
    base=$(sed -n 's/^listening on //p' "$log" | head -1)
    [[ -n $base ]] || { cat "$log"; echo "serve example did not start" >&2; exit 1; }
fi

command -v schemathesis >/dev/null || { echo "schemathesis not found: pip install schemathesis" >&2; exit 1; }
cd "$work"
schemathesis --config-file "$crate_dir/tests/schemathesis.toml" run "$spec" \
    --url "$base/v1" \
    -H "Authorization: Bearer $token" \
    --max-examples "$max_examples" \
    --seed "${SCHEMATHESIS_SEED:-1}" \
    "$@"
