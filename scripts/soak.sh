#!/usr/bin/env bash
# Soak: random configurations of live backups until the time is up.
#   scripts/soak.sh MINUTES        (default 5)
#   SOAK_SECS=N scripts/soak.sh    the budget in seconds instead (CI: a short soak)
# Rounds alternate between the model-based random test (tests/model.rs: random cluster
# sizes, workers, chunks, speeds, sync modes, pauses, cancels, transient target faults with
# Stop + resume, bitmap marks, snapshot view reads) on memory devices and the same on
# sparse files in a temp dir (COWBACKUP_MODEL_FILES=1: FileDriver source and target), and
# run the point-in-time stress (tests/point_in_time.rs) after each pair.
# Prints rounds, sequences and mismatches; every mismatch prints the line that replays it
# (COWBACKUP_MODEL_SEED=N [COWBACKUP_MODEL_FILES=1] cargo test --release --test model).
set -uo pipefail
cd "$(dirname "$0")/.."
secs=${SOAK_SECS:-$((${1:-5} * 60))}
cargo build --release --tests -q || exit 1
log=$(mktemp)
trap 'rm -f "$log"' EXIT
start=$(date +%s)
rounds=0
seqs=0
fails=0
round=0
while [ $(($(date +%s) - start)) -lt "$secs" ]; do
    left=$((secs - ($(date +%s) - start)))
    chunk=$((left < 120 ? left : 120))
    # Short budgets: half on memory, half on files.
    [ "$secs" -lt 240 ] && [ "$chunk" -gt $((secs / 2)) ] && [ $((secs / 2)) -ge 5 ] && chunk=$((secs / 2))
    [ "$chunk" -lt 5 ] && break
    if [ $((round % 2)) -eq 0 ]; then devices=0; name=memory; else devices=1; name=files; fi
    round=$((round + 1))
    COWBACKUP_MODEL_FILES=$devices COWBACKUP_MODEL_SECS=$chunk \
        cargo test --release -q --test model -- --nocapture >"$log" 2>&1
    rc=$?
    n=$(grep -o '^model: [0-9]*' "$log" | grep -o '[0-9]*$')
    seqs=$((seqs + ${n:-0}))
    echo "soak: model on $name: ${n:-0} sequences in ${chunk} s"
    if [ "$rc" -ne 0 ] || grep -q "replay with" "$log"; then
        fails=$((fails + 1))
        grep -E "panicked at|seed [0-9]+|replay with|error" "$log" | head -5
    fi
    rounds=$((rounds + 1))
    if [ "$devices" -eq 1 ] && [ $(($(date +%s) - start)) -lt "$secs" ]; then
        if ! cargo test --release -q --test point_in_time >"$log" 2>&1; then
            fails=$((fails + 1))
            grep -E "panicked|differs" "$log" | head -5
        fi
        echo "soak: point-in-time stress done"
    fi
done
echo "soak: $rounds rounds, $seqs model sequences, $fails mismatches in $(($(date +%s) - start)) s"
[ "$fails" -eq 0 ]
