#!/usr/bin/env bash
# Every test of cowbackup: Rust (fmt, clippy, unit, integration, doc, the `cowbackup` command; the model test with its
# 15 s budget), a short soak, loom, and where the nightly toolchain is present Miri,
# ThreadSanitizer and the fuzz targets (CI budget), C (meson: plain, ASan+UBSan, valgrind;
# exports; header drift; the nbdkit filter), the RBD driver against a real throw-away Ceph
# cluster (skipped with the reason without librbd-dev and the Ceph packages) and Python
# (ctypes binding, pytest).
# Installs what it needs on a fresh Debian machine. Exits non-zero when anything fails.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
start=$(date +%s)
stage() { echo; echo "=== $* ($(($(date +%s) - start)) s) ==="; }

stage "system tools (scripts/deps.sh)"
scripts/deps.sh
stage "rustfmt"
cargo fmt --all --check
stage "clippy (the library, the C library and the cowbackup command)"
cargo clippy --workspace --all-targets -- -D warnings
# The library as Rust users build it: no C ABI, no optional feature.
cargo clippy -p cowbackup --lib -- -D warnings
stage "Rust tests"
cargo test --release
stage "a Rust user's fresh project: rlib only (scripts/test-rust-user.sh)"
scripts/test-rust-user.sh
stage "the cowbackup command (cli/: its tests drive the real binary)"
cargo test --release -p cowbackup-cli
stage "loom model of the claim protocol (scripts/loom.sh --quick)"
scripts/loom.sh --quick
stage "Miri (scripts/miri.sh --quick; skipped without the nightly toolchain)"
scripts/miri.sh --quick
stage "ThreadSanitizer (scripts/tsan.sh --quick; skipped without the nightly toolchain)"
scripts/tsan.sh --quick
stage "soak: model on memory and files (scripts/soak.sh, 40 s)"
SOAK_SECS=40 scripts/soak.sh
stage "fuzz: each target 20 s (scripts/fuzz.sh; skipped without nightly + cargo-fuzz)"
scripts/fuzz.sh 20
stage "Ceph RBD driver against a throw-away cluster (scripts/test-rbd.sh)"
scripts/test-rbd.sh
stage "C tests"
scripts/test-c.sh
if [ -x scripts/test-python.sh ]; then
    stage "Python tests"
    scripts/test-python.sh
fi
stage "all tests passed"
