#!/usr/bin/env bash
# Soak: random configurations of live backups until the time is up.
#   scripts/soak.sh MINUTES   (default 5)
# Runs the model-based random test (tests/model.rs: random cluster sizes, workers, chunks,
# speeds, sync modes, pauses, cancels, transient target faults with Stop + resume, bitmap
# marks, snapshot view reads) for the whole budget, then the point-in-time stress in a loop.
# Prints runs and failures; a failure prints the seed that replays it
# (COWBACKUP_MODEL_SEED=N cargo test --release --test model).
set -uo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-5}
secs=$((minutes * 60))
cargo build --release --tests -q || exit 1
start=$(date +%s)
runs=0
fails=0
while [ $(($(date +%s) - start)) -lt "$secs" ]; do
    left=$((secs - ($(date +%s) - start)))
    chunk=$((left < 120 ? left : 120))
    [ "$chunk" -lt 5 ] && break
    if COWBACKUP_MODEL_SECS=$chunk cargo test --release -q --test model -- --nocapture 2>&1 | tee /tmp/cowbackup-soak.log | grep -E "^model:|replay with"; then :; fi
    if grep -q "replay with" /tmp/cowbackup-soak.log; then fails=$((fails + 1)); fi
    if ! cargo test --release -q --test point_in_time >/tmp/cowbackup-soak-pit.log 2>&1; then
        fails=$((fails + 1))
        grep -E "panicked|differs" /tmp/cowbackup-soak-pit.log | head -5
    fi
    runs=$((runs + 1))
done
echo "soak: $runs rounds in $(($(date +%s) - start)) s, $fails failed"
[ "$fails" -eq 0 ]
