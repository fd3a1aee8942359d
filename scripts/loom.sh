#!/usr/bin/env bash
# Model-check the claim machinery with loom: the real Claims (claim, wait on overlap,
# release clean or dirty, wake_all), the hook's loop and the hook gate, against a hook,
# a worker and cancel, in every interleaving up to LOOM_MAX_PREEMPTIONS preemptions per
# execution (src/job/claims/loom_tests.rs). Stable toolchain; its own target dir.
#
#   scripts/loom.sh            LOOM_MAX_PREEMPTIONS=3 (about a minute of checking here)
#   scripts/loom.sh --quick    LOOM_MAX_PREEMPTIONS=2 (CI: seconds, after the build)
#   LOOM_MAX_PREEMPTIONS=5 scripts/loom.sh     deeper; unset bound: LOOM_MAX_PREEMPTIONS=none
#
# Each test runs in its own process (a failing loom model aborts its process), so every
# failure is listed. Exits non-zero when any model fails.
set -euo pipefail
cd "$(dirname "$0")/.."

bound=3
for arg in "$@"; do
    case "$arg" in
        --quick) bound=2 ;;
        *) echo "usage: $0 [--quick]" >&2; exit 2 ;;
    esac
done
bound=${LOOM_MAX_PREEMPTIONS:-$bound}
if [ "$bound" = none ]; then
    unset LOOM_MAX_PREEMPTIONS
else
    export LOOM_MAX_PREEMPTIONS=$bound
fi

export RUSTFLAGS="--cfg loom"
export CARGO_TARGET_DIR=${LOOM_TARGET_DIR:-$PWD/target/loom}
start=$(date +%s)
echo "loom: building the model tests (RUSTFLAGS='$RUSTFLAGS', target dir $CARGO_TARGET_DIR)"
bin=$(cargo test -p cowbackup --release --lib --no-run --message-format=json 2>/dev/null \
    | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
if [ -z "$bin" ]; then
    cargo test -p cowbackup --release --lib --no-run # show the error
    echo "loom: build failed" >&2
    exit 1
fi
echo "loom: built in $(($(date +%s) - start)) s; LOOM_MAX_PREEMPTIONS=$bound"

mapfile -t tests < <("$bin" loom_tests --list 2>/dev/null | sed -n 's/: test$//p')
if [ "${#tests[@]}" -eq 0 ]; then
    echo "loom: no model tests found in $bin" >&2
    exit 1
fi
failed=()
for t in "${tests[@]}"; do
    t0=$(date +%s)
    if RUST_BACKTRACE=0 "$bin" --exact "$t" --test-threads=1 >"$CARGO_TARGET_DIR/loom-last.log" 2>&1; then
        echo "loom: ok     $t ($(($(date +%s) - t0)) s)"
    else
        echo "loom: FAILED $t ($(($(date +%s) - t0)) s):"
        grep -E "panicked at|assertion|left:|right:|deadlock|Causality|violation" "$CARGO_TARGET_DIR/loom-last.log" \
            | grep -v "scheduler.rs\|panicking.rs\|outside a Loom" | head -8 | sed 's/^/    /'
        failed+=("$t")
    fi
done
echo "loom: ${#tests[@]} models, ${#failed[@]} failed, $(($(date +%s) - start)) s in all"
[ "${#failed[@]}" -eq 0 ]
