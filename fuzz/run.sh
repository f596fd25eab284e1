#!/usr/bin/env bash
# Builds and runs Ferrule's fuzz targets (see README.md).
#
#   fuzz/run.sh smoke                  # build, then every target ~7 s over its seeds (CI)
#   fuzz/run.sh long SECONDS [TARGET…] # every (or the named) target for SECONDS each
#   fuzz/run.sh repro TARGET FILE…     # run a target on saved inputs (a crash reproduces)
#   fuzz/run.sh build                  # only build
#
# Exit status: non-zero if a build fails or a target crashes, leaks past the memory
# limit or times out on an input. Crashing inputs are kept under fuzz/artifacts/TARGET/.
#
# Environment:
#   FUZZ_SMOKE_MAX_SECONDS  cap on each smoke target, for slow machines (default 30; a
#                       smoke run is otherwise a fixed number of executions per target)
#   FUZZ_JOBS           targets fuzzed at once in long mode (default 1; the machine has 2 cores)
#   FUZZ_RSS_LIMIT_MB   libFuzzer -rss_limit_mb (and -malloc_limit_mb) (default 2048)
#   FUZZ_TIMEOUT        libFuzzer -timeout: seconds one input may take (default 10)
#   FUZZ_KEEP_GOING     1: in long mode, keep fuzzing after a finding (libFuzzer -fork=1
#                       -ignore_crashes=1 …): every crashing input is kept, the run goes on
#   FUZZ_SANITIZER      address (default) or none: faster, but an oversized allocation is
#                       then only caught once its memory is touched (-rss_limit_mb)
#   FUZZ_TARGET_DIR     cargo target directory (default fuzz/target); keep it between CI
#                       runs to skip the cold build
#   FUZZ_CARGO_LOCK     lock file that serialises cargo builds with other work on this
#                       machine (default /tmp/ferrule-cargo.lock; empty: no lock). Do not
#                       call this script while holding that lock yourself: it would wait
#                       for itself.
set -euo pipefail

FUZZ_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$FUZZ_DIR")"
TARGETS=(amqp_scan amqp_frames amqp_decode amqp_address dtls_front coap_request coap_block1 mqtt_topic http_request request_id)
SMOKE_MAX_SECONDS="${FUZZ_SMOKE_MAX_SECONDS:-30}"
JOBS="${FUZZ_JOBS:-1}"
RSS_LIMIT_MB="${FUZZ_RSS_LIMIT_MB:-2048}"
TIMEOUT="${FUZZ_TIMEOUT:-10}"
SANITIZER="${FUZZ_SANITIZER:-address}"
KEEP_GOING="${FUZZ_KEEP_GOING:-0}"
TARGET_DIR="${FUZZ_TARGET_DIR:-$FUZZ_DIR/target}"
CARGO_LOCK="${FUZZ_CARGO_LOCK-/tmp/ferrule-cargo.lock}"

log() { printf '[fuzz %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# cargo, serialised with other builds on this machine when a lock file is configured.
locked_cargo() {
    if [[ -n "$CARGO_LOCK" ]] && command -v flock >/dev/null; then
        flock "$CARGO_LOCK" cargo "$@"
    else
        cargo "$@"
    fi
}

ensure_cargo_fuzz() {
    if cargo fuzz --version >/dev/null 2>&1; then
        return
    fi
    log "installing cargo-fuzz (crates.io)"
    locked_cargo install cargo-fuzz --version '^0.13' --locked
}

build() {
    ensure_cargo_fuzz
    log "building ${#TARGETS[@]} targets (sanitizer: $SANITIZER, debug assertions on)"
    local started=$SECONDS
    # cargo fuzz passes -Z flags to rustc; RUSTC_BOOTSTRAP lets the stable toolchain take them.
    (cd "$ROOT" && export RUSTC_BOOTSTRAP=1 && locked_cargo fuzz build --fuzz-dir "$FUZZ_DIR" \
        --sanitizer "$SANITIZER" --debug-assertions --target-dir "$TARGET_DIR")
    log "built in $((SECONDS - started)) s"
}

binary() {
    local triple
    triple="$(rustc -vV | sed -n 's/^host: //p')"
    echo "$TARGET_DIR/$triple/release/$1"
}

# Largest input per target: frame streams and block-wise uploads need room for several units.
max_len() {
    case "$1" in
        amqp_frames | amqp_decode | coap_block1) echo 16384 ;;
        *) echo 4096 ;;
    esac
}

# run_target TARGET LOG WORK_CORPUS LIBFUZZER_FLAGS…: fuzzes; new inputs go to WORK_CORPUS,
# the committed seeds are read only. Returns libFuzzer's exit status.
run_target() {
    local target=$1 logfile=$2 work=$3
    shift 3
    local artifacts="$FUZZ_DIR/artifacts/$target" corpora=("$work" "$FUZZ_DIR/corpus/$target")
    mkdir -p "$work" "$artifacts"
    # Reproducers of past findings run first, as part of the corpus: a regression fails at once.
    [[ ! -d "$FUZZ_DIR/artifacts-found/$target" ]] || corpora+=("$FUZZ_DIR/artifacts-found/$target")
    "$(binary "$target")" "${corpora[@]}" "$@" \
        -timeout="$TIMEOUT" -rss_limit_mb="$RSS_LIMIT_MB" -malloc_limit_mb="$RSS_LIMIT_MB" \
        -max_len="$(max_len "$target")" -artifact_prefix="$artifacts/" -print_final_stats=1 >"$logfile" 2>&1
}

# Executions for a smoke run of about 4-8 s per target on one core of the 2-core machine
# (counted, not timed, and with a fixed -seed, so that runs differ as little as libFuzzer
# allows; it is not fully deterministic).
smoke_runs() {
    case "$1" in
        dtls_front) echo 1500000 ;;
        amqp_scan | request_id) echo 600000 ;;
        coap_request) echo 400000 ;;
        http_request | amqp_frames) echo 300000 ;;
        coap_block1) echo 250000 ;;
        mqtt_topic) echo 200000 ;;
        amqp_address) echo 150000 ;;
        amqp_decode) echo 100000 ;;
        *) echo 100000 ;;
    esac
}

# summary TARGET LOG STATUS: one line with executions, rate, corpus and coverage.
summary() {
    local target=$1 logfile=$2 status=$3
    local execs rate cov corpus found
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$logfile" | tail -1 || true)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$logfile" | tail -1 || true)
    if [[ -z "$execs" ]]; then # fork mode: the parent's last progress line
        execs=$(grep -oE '^#[0-9]+: cov' "$logfile" | tail -1 | tr -dc '0-9' || true)
        rate=$(grep -oE 'exec/s: [0-9]+' "$logfile" | tail -1 | tr -dc '0-9' || true)
    fi
    cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+' "$logfile" | tail -1 || true)
    corpus=$(grep -oE 'corp: [0-9]+/[0-9]+[a-zA-Z]*' "$logfile" | tail -1 || true)
    found=$(grep -oE "Test unit written to [^ ]+" "$logfile" | sed 's/Test unit written to //' | tr '\n' ' ' || true)
    printf '%-13s %s execs=%-11s execs/s=%-8s %s %s %s\n' "$target" \
        "$([[ $status == 0 ]] && echo ok || echo "FAILED($status)")" "${execs:-?}" "${rate:-?}" "${cov:-}" "${corpus:-}" \
        "${found:+finding: $found}"
}

smoke() {
    local started=$SECONDS failed=0
    build
    scratch="$(mktemp -d)"
    trap 'rm -rf "${scratch:-}"' EXIT
    for target in "${TARGETS[@]}"; do
        local status=0
        run_target "$target" "$scratch/$target.log" "$scratch/$target" -seed=1 -runs="$(smoke_runs "$target")" \
            -max_total_time="$SMOKE_MAX_SECONDS" || status=$?
        summary "$target" "$scratch/$target.log" "$status"
        if [[ $status != 0 ]]; then
            failed=1
            grep -E -A30 '^==[0-9]+== ?ERROR|panicked at|deadly signal|ERROR: libFuzzer' "$scratch/$target.log" | head -60 >&2 || true
        fi
    done
    log "smoke run done in $((SECONDS - started)) s"
    return $failed
}

long() {
    local seconds=$1
    shift
    local targets=("$@")
    [[ ${#targets[@]} -gt 0 ]] || targets=("${TARGETS[@]}")
    build
    local logs="$FUZZ_DIR/logs/$(date +%Y%m%d-%H%M%S)"
    mkdir -p "$logs"
    log "fuzzing ${#targets[@]} targets for $seconds s each, $JOBS at a time; logs in $logs"
    local names=() keep_going=()
    [[ "$KEEP_GOING" != 1 ]] || keep_going=(-fork=1 -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1)
    for target in "${targets[@]}"; do
        while [[ $(jobs -rp | wc -l) -ge $JOBS ]]; do
            wait -n || true
        done
        log "start $target"
        (
            status=0
            run_target "$target" "$logs/$target.log" "$FUZZ_DIR/corpus-work/$target" -max_total_time="$seconds" \
                "${keep_going[@]}" || status=$?
            echo "$status" >"$logs/$target.status"
        ) &
        names+=("$target")
    done
    wait
    local failed=0
    echo "target        result    executions         rate     coverage            corpus" >&2
    for target in "${names[@]}"; do
        local status
        status=$(cat "$logs/$target.status" 2>/dev/null || echo 1)
        summary "$target" "$logs/$target.log" "$status" | tee -a "$logs/summary.txt"
        [[ $status == 0 ]] || failed=1
    done
    return $failed
}

repro() {
    local target=$1
    shift
    "$(binary "$target")" -rss_limit_mb="$RSS_LIMIT_MB" -malloc_limit_mb="$RSS_LIMIT_MB" -timeout="$TIMEOUT" "$@"
}

case "${1:-}" in
    smoke) smoke ;;
    long)
        [[ "${2:-}" =~ ^[0-9]+$ ]] || { echo "usage: $0 long SECONDS [TARGET...]" >&2; exit 2; }
        long "${@:2}"
        ;;
    repro)
        [[ $# -ge 3 ]] || { echo "usage: $0 repro TARGET FILE..." >&2; exit 2; }
        repro "${@:2}"
        ;;
    build) build ;;
    *)
        sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2
        exit 2
        ;;
esac
