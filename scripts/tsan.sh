#!/usr/bin/env bash
# ThreadSanitizer over the job's threads: the point-in-time stress, control and job
# integration tests built with -Zsanitizer=thread (std rebuilt with it: -Zbuild-std), on
# the nightly toolchain, in their own target dir (target/tsan). A data race fails the run.
#
#   scripts/tsan.sh            point_in_time, control, job (and the Miri smoke test)
#   scripts/tsan.sh --quick    CI: control and job, and the smoke test
#   scripts/tsan.sh TEST...    other integration tests, e.g. scripts/tsan.sh snapshot lifecycle
#
# Without the nightly toolchain and its rust-src component: prints why and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."

skip() { echo "tsan: skipped: $*"; exit 0; }
tests=()
quick=0
for arg in "$@"; do
    case "$arg" in
        --quick) quick=1 ;;
        -*) echo "usage: $0 [--quick] [TEST...]" >&2; exit 2 ;;
        *) tests+=("$arg") ;;
    esac
done
if [ "${#tests[@]}" -eq 0 ]; then
    if [ "$quick" = 1 ]; then tests=(control job miri_smoke); else tests=(point_in_time control job miri_smoke); fi
fi

command -v rustup >/dev/null || skip "no rustup, so no nightly toolchain"
rustup run nightly rustc --version >/dev/null 2>&1 || skip "no nightly toolchain (rustup toolchain install nightly)"
if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
    rustup component add --toolchain nightly rust-src >/dev/null 2>&1 \
        || skip "the nightly rust-src component (needed by -Zbuild-std) cannot be installed"
fi
host=$(rustup run nightly rustc -vV | sed -n 's/^host: //p')
case "$host" in
    x86_64-unknown-linux-gnu | aarch64-unknown-linux-gnu) ;;
    *) skip "ThreadSanitizer is not supported on $host here" ;;
esac

export RUSTFLAGS="-Zsanitizer=thread -Cforce-frame-pointers=yes"
export RUSTDOCFLAGS="$RUSTFLAGS"
export CARGO_TARGET_DIR=${TSAN_TARGET_DIR:-$PWD/target/tsan}
export TSAN_OPTIONS="${TSAN_OPTIONS:-halt_on_error=1 second_deadlock_stack=1}"
args=()
for t in "${tests[@]}"; do args+=(--test "$t"); done
start=$(date +%s)
echo "tsan: ${tests[*]} (target dir $CARGO_TARGET_DIR, TSAN_OPTIONS=$TSAN_OPTIONS)"
cargo=(cargo +nightly test -p cowbackup -Zbuild-std --target "$host" --release "${args[@]}")
# Build first, and make sure the test binaries really are instrumented (a TSan run of
# uninstrumented code would find nothing and say so with confidence).
mapfile -t bins < <("${cargo[@]}" --no-run --message-format=json \
    | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p')
if [ "${#bins[@]}" -eq 0 ]; then
    "${cargo[@]}" --no-run # show the error
    echo "tsan: build failed" >&2
    exit 1
fi
for b in "${bins[@]}"; do
    if ! nm "$b" 2>/dev/null | grep __tsan_init >/dev/null; then
        echo "tsan: $b is not instrumented with ThreadSanitizer" >&2
        exit 1
    fi
done
echo "tsan: built and checked instrumented in $(($(date +%s) - start)) s"
"${cargo[@]}" -- --test-threads=2
echo "tsan: no data race reported, $(($(date +%s) - start)) s"
