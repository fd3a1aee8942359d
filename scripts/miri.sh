#!/usr/bin/env bash
# Miri: the unit tests and a small point-in-time backup through the Rust API and the C ABI
# (tests/miri_smoke.rs: MemDriver, a C-style driver, cowbackup_* calls, the job's threads),
# interpreted with checks for undefined behaviour, data races and leaks. Nightly toolchain,
# own target dir (target/miri). Tests Miri cannot run (real files and their syscalls,
# impossible allocations) are marked #[cfg_attr(miri, ignore = "why")].
#
#   scripts/miri.sh            unit tests + smoke test
#   scripts/miri.sh --quick    CI: the smoke test and the unit tests of the claim code,
#                              bitmaps, buffers and the ffi driver layer
#   MIRIFLAGS=-Zmiri-many-seeds=0..8 scripts/miri.sh     more schedules (with -Zmiri-disable-isolation)
#
# Without the nightly toolchain and its miri component: prints why and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."

skip() { echo "miri: skipped: $*"; exit 0; }
quick=0
for arg in "$@"; do
    case "$arg" in
        --quick) quick=1 ;;
        *) echo "usage: $0 [--quick]" >&2; exit 2 ;;
    esac
done

command -v rustup >/dev/null || skip "no rustup, so no nightly toolchain"
rustup run nightly rustc --version >/dev/null 2>&1 || skip "no nightly toolchain (rustup toolchain install nightly)"
if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^miri'; then
    rustup component add --toolchain nightly miri rust-src >/dev/null 2>&1 \
        || skip "the nightly miri component cannot be installed"
fi

export CARGO_TARGET_DIR=${MIRI_TARGET_DIR:-$PWD/target/miri}
# Isolation off: the tests read the clock and /dev/urandom (uuids) like the library does.
export MIRIFLAGS=${MIRIFLAGS:--Zmiri-disable-isolation}
start=$(date +%s)
cargo +nightly miri setup >/dev/null 2>&1 || skip "cargo miri setup failed (no rust-src?)"
echo "miri: MIRIFLAGS=$MIRIFLAGS, target dir $CARGO_TARGET_DIR"
if [ "$quick" = 1 ]; then
    cargo +nightly miri test -p cowbackup --test miri_smoke
    cargo +nightly miri test -p cowbackup --lib -- --skip loom_tests bitmap:: claims:: buf:: zero:: ffi:: reentry::
else
    cargo +nightly miri test -p cowbackup --test miri_smoke
    cargo +nightly miri test -p cowbackup --lib -- --skip loom_tests
fi
echo "miri: no undefined behaviour, data race or leak found, $(($(date +%s) - start)) s"
