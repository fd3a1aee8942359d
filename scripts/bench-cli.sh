#!/usr/bin/env bash
# Bench of the `cowbackup` command: `cowbackup backup` of an offline image against
# `qemu-img convert -n -m 8 -W` into the same kind of target (a new sparse file on the same
# filesystem), warm page cache for both, median of 3 runs each, in one run side by side.
# Goal (issue 25): cowbackup >= 0.95x qemu-img's throughput.
#   scripts/bench-cli.sh [SIZE_MIB]   (default 1024; BENCH_DIR=dir for the images)
# The image: 3/4 random data in runs of 64 KiB .. 4 MiB, 1/4 zeroes (written, not holes).
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib=${1:-1024}
command -v qemu-img >/dev/null || { echo "bench-cli: skipped: qemu-img is not installed"; exit 0; }
cargo build --release -q -p cowbackup-cli
bin=$PWD/target/release/cowbackup
dir=$(mktemp -d "${BENCH_DIR:-${TMPDIR:-/tmp}}/bench-cli.XXXXXX")
trap 'rm -rf "$dir"' EXIT
src=$dir/src.img
python3 - "$src" "$size_mib" <<'PY'
import os, random, sys
path, mib = sys.argv[1], int(sys.argv[2])
rng = random.Random(42)
size = mib << 20
with open(path, "wb") as f:
    off = 0
    while off < size:
        run = min(rng.choice([64, 256, 1024, 4096]) << 10, size - off)
        f.write(os.urandom(run) if rng.random() < 0.75 else bytes(run))
        off += run
PY
cat "$src" >/dev/null   # warm the cache for both tools
median() { sort -n | sed -n 2p; }
time_of() { local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null; t1=$(date +%s.%N); echo "$t1 - $t0" | bc -l; }
runs_cb=() runs_qi=()
for i in 1 2 3; do
    rm -f "$dir/cb.img" "$dir/qi.img"
    runs_cb+=("$(time_of "$bin" backup "$src" "$dir/cb.img")")
    cmp "$src" "$dir/cb.img"
    qemu-img create -q -f raw "$dir/qi.img" "${size_mib}M"
    runs_qi+=("$(time_of qemu-img convert -n -m 8 -W -f raw -O raw "$src" "$dir/qi.img")")
    cmp "$src" "$dir/qi.img"
done
cb=$(printf '%s\n' "${runs_cb[@]}" | median)
qi=$(printf '%s\n' "${runs_qi[@]}" | median)
printf 'image %d MiB (3/4 data, 1/4 zeroes), warm cache, median of 3\n' "$size_mib"
printf '  cowbackup backup           %6.3f s  %7.1f MiB/s   runs: %s\n' "$cb" "$(echo "$size_mib / $cb" | bc -l)" "${runs_cb[*]}"
printf '  qemu-img convert -n -m 8 -W %6.3f s  %7.1f MiB/s   runs: %s\n' "$qi" "$(echo "$size_mib / $qi" | bc -l)" "${runs_qi[*]}"
printf '  ratio (cowbackup / qemu-img throughput): %.2f (goal >= 0.95)\n' "$(echo "$qi / $cb" | bc -l)"
