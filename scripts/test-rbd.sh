#!/usr/bin/env bash
# The RBD driver's tests against a real throw-away Ceph cluster (tests/rbd.rs; the tests start
# and stop their clusters with scripts/ceph-up.sh / ceph-down.sh): clippy and the tests with the
# cargo feature rbd. Skips, saying why, when librbd-dev or the Ceph packages are not installed
# (scripts/deps.sh installs them as root). About a minute of test time on a 2-core machine.
# Then the cowbackup command built with the feature rbd (scripts/test-rbd-cli.sh, ~40 s).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f /usr/include/rbd/librbd.h ] || [ ! -f /usr/include/rados/librados.h ]; then
    echo "test-rbd: SKIPPED: librbd-dev is not installed (scripts/deps.sh installs it as root)"
    exit 0
fi
if ! command -v ceph-mon >/dev/null || ! command -v ceph-osd >/dev/null || ! command -v rbd >/dev/null; then
    echo "test-rbd: SKIPPED: the Ceph packages are not installed (ceph-mon ceph-osd ceph-mgr ceph-common; scripts/deps.sh)"
    exit 0
fi
echo "--- cargo clippy --features rbd"
cargo clippy --all-targets --release --features rbd -- -D warnings
echo "--- cargo test --features rbd (the driver's unit tests, tests/rbd.rs)"
cargo test --release --features rbd --lib drivers::rbd
cargo test --release --features rbd --test rbd -- --nocapture
echo "--- the cowbackup command with the feature rbd (scripts/test-rbd-cli.sh)"
cargo clippy -p cowbackup-cli --all-targets --release --features rbd -- -D warnings
scripts/test-rbd-cli.sh
