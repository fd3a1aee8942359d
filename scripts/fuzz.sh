#!/usr/bin/env bash
# Fuzz every target of fuzz/ (cargo-fuzz, libFuzzer, nightly toolchain) for a bounded time.
#   scripts/fuzz.sh [SECONDS]       seconds per target (default 20)
#   FUZZ_TARGETS="capi" scripts/fuzz.sh 600     only some targets
#   FUZZ_UPDATE_CORPUS=1 scripts/fuzz.sh 600    merge what the run found into fuzz/corpus/
#                                               (minimized with -merge=1: new coverage only)
# Each target starts from its committed corpus fuzz/corpus/<target>/ (copied: a plain run
# leaves the repository as it was). A crash stops the script with exit status 1; the input
# is in fuzz/artifacts/<target>/ (replay: cargo +nightly fuzz run -O <target> <file>).
# Without the nightly toolchain or cargo-fuzz it prints "skipped: reason" and exits 0.
# A new target is one more [[bin]] in fuzz/Cargo.toml: this script runs whatever
# `cargo fuzz list` names.
set -uo pipefail
cd "$(dirname "$0")/.."
secs=${1:-20}
if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    echo "fuzz: skipped: no nightly toolchain (rustup toolchain install nightly)"
    exit 0
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    # A fresh machine with nightly: install cargo-fuzz (about a minute), skip only if that fails.
    echo "fuzz: cargo install cargo-fuzz --locked"
    if ! timeout 600 cargo install cargo-fuzz --locked >/dev/null 2>&1 || ! cargo fuzz --version >/dev/null 2>&1; then
        echo "fuzz: skipped: cargo-fuzz is not installed and could not be (cargo install cargo-fuzz)"
        exit 0
    fi
fi
cd fuzz
targets=${FUZZ_TARGETS:-$(cargo +nightly fuzz list)}
# Big allocations fail with ENOMEM in the library (tested); the sanitizer must say NULL too.
export ASAN_OPTIONS=${ASAN_OPTIONS:-allocator_may_return_null=1:detect_leaks=1}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
status=0
for t in $targets; do
    echo "fuzz: building $t"
    if ! cargo +nightly fuzz build -O "$t" 2>&1 | tail -3; then
        echo "fuzz: $t: build failed"
        exit 1
    fi
    case $t in
        bitmap_file) max_len=16384 ;;
        *) max_len=1024 ;;
    esac
    mkdir -p "corpus/$t" "$work/$t"
    cp -r "corpus/$t/." "$work/$t/"
    echo "fuzz: $t for $secs s"
    # -timeout: one input that runs 30 s is a hang (every wait in a target is bounded).
    if cargo +nightly fuzz run -O "$t" "$work/$t" -- -max_total_time="$secs" -max_len="$max_len" \
        -timeout=30 -rss_limit_mb=3072 -print_final_stats=1 >"$work/$t.log" 2>&1; then
        runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$work/$t.log" | grep -o '[0-9]*$')
        cov=$(grep -o 'cov: [0-9]*' "$work/$t.log" | tail -1)
        echo "fuzz: $t: ${runs:-?} runs, $cov, no crash"
        if [ -n "${FUZZ_UPDATE_CORPUS:-}" ]; then
            cargo +nightly fuzz run -O "$t" "corpus/$t" "$work/$t" -- -merge=1 -max_len="$max_len" >/dev/null 2>&1
            echo "fuzz: $t: corpus now $(ls "corpus/$t" | wc -l) files"
        fi
    else
        status=1
        grep -E 'panicked|ERROR|SUMMARY|Test unit written|left:|right:' "$work/$t.log" | head -20
        echo "fuzz: $t: FAILED (full log above the artifact line; replay the input in fuzz/artifacts/$t/)"
    fi
done
exit $status
