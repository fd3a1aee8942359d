#!/usr/bin/env bash
# Bench of the `cowbackup` command: `cowbackup backup` of an offline image against
# `qemu-img convert -n -m 8 -W` into the same kind of target (a new sparse file on the same
# filesystem), warm page cache for both, median of 3 runs each, in one run side by side.
# Goal (issue 25): cowbackup >= 0.95x qemu-img's throughput.
#   scripts/bench-cli.sh [SIZE_MIB]   (default 1024; BENCH_DIR=dir for the images)
# The image: 3/4 random data in runs of 64 KiB .. 4 MiB, 1/4 zeroes (written, not holes).
#
#   scripts/bench-cli.sh pull [SIZE_MIB]
# `cowbackup pull` of a 10 % dirty incremental from QEMU's own pull-mode export
# (qemu-storage-daemon: copy-before-write + snapshot-access fleecing, the bitmap exported
# as qemu:dirty-bitmap:b0) against libnbd (Python) reading the same extents sequentially in
# 4 MiB requests into a file; median of 3. Goal (issue 25): >= 0.9x.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=backup
if [ "${1:-}" = pull ]; then mode=pull; shift; fi
size_mib=${1:-1024}
command -v qemu-img >/dev/null || { echo "bench-cli: skipped: qemu-img is not installed"; exit 0; }
cargo build --release -q -p cowbackup-cli
bin=${CARGO_TARGET_DIR:-$PWD/target}/release/cowbackup
dir=$(mktemp -d "${BENCH_DIR:-${TMPDIR:-/tmp}}/bench-cli.XXXXXX")
qsd=
trap '[ -n "$qsd" ] && kill "$qsd" 2>/dev/null; rm -rf "$dir"' EXIT
median() { sort -n | sed -n 2p; }
time_of() { local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null; t1=$(date +%s.%N); echo "$t1 - $t0" | bc -l; }

if [ $mode = pull ]; then
    for t in qemu-io qemu-storage-daemon; do
        command -v $t >/dev/null || { echo "bench-cli pull: skipped: $t is not installed"; exit 0; }
    done
    /usr/bin/python3 -c 'import nbd' 2>/dev/null || { echo "bench-cli pull: skipped: python3-libnbd is not installed"; exit 0; }
    disk=$dir/disk.qcow2
    qemu-img create -q -f qcow2 "$disk" "${size_mib}M"
    qemu-io -f qcow2 -c "write -P 0x11 0 ${size_mib}M" "$disk" >/dev/null
    qemu-img bitmap --add "$disk" b0
    # 10 % of the disk dirty: 1 MiB extents at random 1 MiB-aligned offsets.
    cmds=$(python3 - "$size_mib" <<'PY'
import random, sys
mib = int(sys.argv[1]); rng = random.Random(7)
for o in sorted(rng.sample(range(mib), max(1, mib // 10))):
    print(f"-c\nwrite -P 0x22 {o}M 1M")
PY
)
    mapfile -t args <<<"$cmds"
    qemu-io -f qcow2 "${args[@]}" "$disk" >/dev/null
    qemu-img create -q -f qcow2 "$dir/fleece.qcow2" "${size_mib}M"
    sock=$dir/nbd.sock
    qemu-storage-daemon \
        --blockdev "driver=file,node-name=disk-file,filename=$disk" \
        --blockdev driver=qcow2,node-name=disk,file=disk-file \
        --blockdev "driver=file,node-name=tmp-file,filename=$dir/fleece.qcow2" \
        --blockdev driver=qcow2,node-name=tmp,file=tmp-file \
        --blockdev '{"driver":"copy-before-write","node-name":"cbw","file":"disk","target":"tmp"}' \
        --blockdev driver=snapshot-access,node-name=acc,file=cbw \
        --nbd-server "addr.type=unix,addr.path=$sock" \
        --export '{"type":"nbd","id":"e0","node-name":"acc","name":"fleece","bitmaps":[{"node":"disk","name":"b0"}]}' &
    qsd=$!
    for _ in $(seq 600); do [ -S "$sock" ] && break; sleep 0.1; done
    uri="nbd+unix:///fleece?socket=$sock"
    cat "$disk" >/dev/null
    runs_cb=() runs_py=()
    for i in 1 2 3; do
        rm -f "$dir/cb.img" "$dir/py.img"
        runs_cb+=("$(time_of "$bin" pull "$uri" "$dir/cb.img" --bitmap b0)")
        runs_py+=("$(time_of /usr/bin/python3 - "$uri" "$dir/py.img" <<'PY'
import nbd, os, sys
uri, out = sys.argv[1], sys.argv[2]
ctx = "qemu:dirty-bitmap:b0"
h = nbd.NBD(); h.add_meta_context(ctx); h.connect_uri(uri)
size = h.get_size(); dirty = []; at = 0
while at < size:
    got = []
    def cb(meta, off, entries, err):
        if meta == ctx:
            got.extend(entries)
    h.block_status(min(size - at, 1 << 30), at, cb)
    for i in range(0, len(got), 2):
        if got[i + 1] & 1:
            dirty.append((at, got[i]))
        at += got[i]
fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
os.ftruncate(fd, size)
for off, ln in dirty:
    end = off + ln
    while off < end:
        n = min(end - off, 4 << 20)
        os.pwrite(fd, h.pread(n, off), off)
        off += n
os.fsync(fd); os.close(fd)
PY
)")
        cmp "$dir/cb.img" "$dir/py.img"
    done
    cb=$(printf '%s\n' "${runs_cb[@]}" | median)
    py=$(printf '%s\n' "${runs_py[@]}" | median)
    dirty_mib=$((size_mib / 10))
    printf 'pull: %d MiB disk, %d MiB dirty in 1 MiB extents, QEMU fleecing export, median of 3\n' "$size_mib" "$dirty_mib"
    printf '  cowbackup pull                  %6.3f s  %7.1f MiB/s   runs: %s\n' "$cb" "$(echo "$dirty_mib / $cb" | bc -l)" "${runs_cb[*]}"
    printf '  libnbd sequential reads (4 MiB) %6.3f s  %7.1f MiB/s   runs: %s\n' "$py" "$(echo "$dirty_mib / $py" | bc -l)" "${runs_py[*]}"
    printf '  ratio (cowbackup / sequential throughput): %.2f (goal >= 0.9)\n' "$(echo "$py / $cb" | bc -l)"
    exit 0
fi
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
