#!/usr/bin/env bash
# Tests of the nbdkit filter (capi/nbdkit/cowbackup.c) with real nbdkit, qemu-io and qemu-img:
#   1. point in time: nbdkit's file plugin + the filter serve a 256 MiB image on a Unix socket;
#      4 qemu-io clients write, zero and discard at random offsets throughout a throttled
#      backup; the backup == a copy of the image taken before nbdkit started
#      (qemu-img compare), the hook had to copy, and the live image holds exactly the
#      clients' changes.
#   2. kill -9 mid-backup: PATH.status still says "running", never "completed"; a restart
#      onto the existing PATH is refused at start-up and leaves it untouched;
#      backup-overwrite=true replaces it and completes.
#   3. a failing copy-before-write: the backup's target on a 4 MiB tmpfs; a client write
#      whose hook copy needs more fails with ENOSPC at the client, the image keeps its old
#      data there, and the backup ends "failed: ...", not "completed".
#   4. incremental: bitmap=PATH during a full backup and after it, then sync=bitmap: the
#      second backup holds exactly the clusters written since the first started, and the
#      first + the second == the image at the second start.
# Usage: capi/nbdkit/test.sh [BUILD_DIR]   (default build/plain; the filter is
# BUILD_DIR/capi/nbdkit/nbdkit-cowbackup-filter.so). Every wait has a time limit. Skips
# (exit 0, with the reason) only when nbdkit or the qemu tools cannot be installed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
build=${1:-$root/build/plain}
filter=$build/capi/nbdkit/nbdkit-cowbackup-filter.so
lib="python3 $here/testlib.py"

"$root/scripts/deps.sh"
for tool in nbdkit qemu-io qemu-img python3 cmp; do
    if ! command -v "$tool" >/dev/null; then
        echo "nbdkit test: SKIPPED: $tool is not installed and could not be installed"
        exit 0
    fi
done
if [ ! -f /usr/include/nbdkit-filter.h ] && ! pkg-config --exists nbdkit 2>/dev/null; then
    echo "nbdkit test: SKIPPED: nbdkit's filter header (nbdkit-plugin-dev) is not installed"
    exit 0
fi
if [ ! -f "$filter" ]; then
    echo "nbdkit test: FAILED: $filter was not built (meson -Dnbdkit=auto found nbdkit?)" >&2
    exit 1
fi
echo "nbdkit test: $(nbdkit --version), $(qemu-io --version | head -n1), filter $filter"

tmp=$(mktemp -d /tmp/cowbackup-nbdkit-XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    if mountpoint -q "$tmp/small" 2>/dev/null; then umount "$tmp/small" || true; fi
    rm -rf "$tmp"
}
trap cleanup EXIT
cd "$tmp"
start_time=$(date +%s)

fail() { echo "nbdkit test: FAILED: $*" >&2; for f in "$tmp"/*.log; do [ -f "$f" ] && { echo "--- tail $f" >&2; grep -v 'debug: cowbackup: \(pread\|pwrite\|zero\|trim\|extents\|can_\|get_size\|block_size\|is_rot\|flush\|cache\)' "$f" | tail -n 25 >&2; }; done; exit 1; }
ok() { echo "ok: $*"; }

# start_nbdkit NAME ARGS...: nbdkit in the foreground (so its pid is ours to kill), verbose,
# serving the file plugin through the filter on $tmp/NAME.sock; waits up to 60 s for the socket.
# $more_filters: filters between this one and the plugin (part 5).
more_filters=()
start_nbdkit() {
    local name=$1; shift
    rm -f "$name.sock"
    nbdkit -f -v -U "$tmp/$name.sock" --filter="$filter" "${more_filters[@]}" file "$@" \
        2>"$tmp/$name.log" &
    nbdkit_pid=$!
    pids+=("$nbdkit_pid")
    local deadline=$(($(date +%s) + 60))
    until [ -S "$name.sock" ]; do
        kill -0 "$nbdkit_pid" 2>/dev/null || fail "nbdkit ($name) exited at start-up"
        [ "$(date +%s)" -lt "$deadline" ] || fail "nbdkit ($name): no socket after 60 s"
        sleep 0.1
    done
}
# stop_nbdkit: SIGTERM, then wait up to 60 s for the exit (a running job is cancelled).
stop_nbdkit() {
    kill -TERM "$nbdkit_pid"
    local deadline=$(($(date +%s) + 60))
    while kill -0 "$nbdkit_pid" 2>/dev/null; do
        [ "$(date +%s)" -lt "$deadline" ] || fail "nbdkit did not exit within 60 s of SIGTERM"
        sleep 0.1
    done
    wait "$nbdkit_pid" || fail "nbdkit exited with status $?"
}
# wait_status FILE REGEX SECONDS: until FILE's line matches REGEX.
wait_status() {
    local deadline=$(($(date +%s) + $3))
    until [ -f "$1" ] && grep -Eq "$2" "$1"; do
        if [ "$(date +%s)" -ge "$deadline" ]; then
            fail "$1 is '$(cat "$1" 2>/dev/null || echo absent)' after $3 s, expected /$2/"
        fi
        sleep 0.2
    done
}
# run_clients NAME OPSDIR: one qemu-io per client*.cmds file, all at once, each within 300 s;
# every operation must succeed.
run_clients() {
    local name=$1 dir=$2 cpids=() i=0
    for cmds in "$dir"/client*.cmds; do
        timeout 300 qemu-io -f raw "nbd+unix:///?socket=$tmp/$name.sock" \
            <"$cmds" >"$dir/out$i.txt" 2>&1 &
        cpids+=($!)
        i=$((i + 1))
    done
    for p in "${cpids[@]}"; do wait "$p" || fail "a qemu-io client exited with $?"; done
    if grep -il 'fail\|error' "$dir"/out*.txt; then
        grep -ih 'fail\|error' "$dir"/out*.txt | head -n 5 >&2
        fail "a client operation failed"
    fi
    local n
    n=$(cat "$dir"/out*.txt | grep -o '\(wrote\|discard\) [0-9]*/' | wc -l)
    local want
    want=$(cat "$dir"/client*.cmds | grep -vc '^sleep')
    [ "$n" -eq "$want" ] || fail "$n of $want client operations reported done"
    echo "   $i clients, $n operations done"
}
# completed_stat LOG FIELD: a number from the filter's "completed: ..." debug line.
completed_stat() {
    sed -n "s/.*cowbackup: backup .* completed: .* \([0-9][0-9]*\) $2.*/\1/p" "$1" | tail -n1
}

# ---- the disk: 256 MiB, random data, written zeroes, a hole, random data at the end
truncate -s 256M disk.img
dd if=/dev/urandom of=disk.img bs=1M count=160 conv=notrunc status=none
dd if=/dev/zero of=disk.img bs=1M seek=160 count=16 conv=notrunc status=none
dd if=/dev/urandom of=disk.img bs=1M seek=224 count=32 conv=notrunc status=none
size=$(stat -c %s disk.img)

echo "=== 1. point in time: 4 clients write, zero and discard during a throttled backup"
cp --sparse=always disk.img t1-start.img
mkdir t1 && $lib gen 1 4 60 "$size" 80 t1
start_nbdkit t1 disk.img backup="$tmp/t1-backup.raw" speed=24M workers=2
wait_status t1-backup.raw.status '^running$' 30
run_clients t1 t1
grep -q '^completed$' t1-backup.raw.status \
    && fail "the backup completed before the clients ended: raise the load or lower speed="
wait_status t1-backup.raw.status '^(completed|failed)' 300
grep -qx completed t1-backup.raw.status || fail "t1: status is '$(cat t1-backup.raw.status)'"
cow=$(completed_stat t1.log 'copy-before-write requests')
[ "${cow:-0}" -gt 0 ] || fail "t1: no copy-before-write request copied anything (cow=${cow:-?})"
ok "backup completed; $cow client requests had to copy old data first"
qemu-img compare -f raw -F raw t1-start.img t1-backup.raw >/dev/null \
    || fail "t1: the backup differs from the image as it was at start-up"
ok "qemu-img compare: backup == the image before nbdkit started"
stop_nbdkit
$lib expect t1-start.img t1-expect.img t1/ops.json
cmp disk.img t1-expect.img || fail "t1: the live image does not hold exactly the clients' changes"
ok "the live image == the start image + every client operation"
cmp -s disk.img t1-start.img && fail "t1: the clients changed nothing"
rm -f t1-expect.img t1-start.img t1-backup.raw

echo "=== 2. kill -9 mid-backup; no overwrite without backup-overwrite=true"
start_nbdkit t2 disk.img backup="$tmp/t2-backup.raw" speed=4M
wait_status t2-backup.raw.status '^running$' 30
sleep 1
kill -9 "$nbdkit_pid"
wait "$nbdkit_pid" 2>/dev/null || true
status=$(cat t2-backup.raw.status 2>/dev/null || echo "(absent)")
[ "$status" = running ] || fail "t2: after kill -9 the status is '$status', expected 'running'"
ok "after kill -9 mid-backup PATH.status says '$status'"
sum_before=$(md5sum <t2-backup.raw)
if timeout 60 nbdkit -f -U "$tmp/t2b.sock" --filter="$filter" file disk.img \
        backup="$tmp/t2-backup.raw" 2>t2b.err; then
    fail "t2: nbdkit started onto an existing backup PATH"
fi
grep -q 'already exists' t2b.err || { cat t2b.err >&2; fail "t2: no clear message for an existing PATH"; }
[ "$(md5sum <t2-backup.raw)" = "$sum_before" ] || fail "t2: the existing backup was modified"
ok "a restart onto the existing PATH fails at start-up: $(grep -o 'already exists[^(]*' t2b.err)"
start_nbdkit t2c disk.img backup="$tmp/t2-backup.raw" backup-overwrite=true
wait_status t2-backup.raw.status '^(completed|failed)' 300
grep -qx completed t2-backup.raw.status || fail "t2: overwrite run: '$(cat t2-backup.raw.status)'"
stop_nbdkit
qemu-img compare -f raw -F raw disk.img t2-backup.raw >/dev/null || fail "t2: overwritten backup differs"
ok "backup-overwrite=true replaced it with a complete backup"
rm -f t2-backup.raw

echo "=== 3. a failing copy-before-write fails the client's write (target on a 4 MiB tmpfs)"
mkdir small
if mount -t tmpfs -o size=4M tmpfs small 2>t3-mount.err; then
    dd if=disk.img bs=1M skip=100 count=8 status=none | md5sum >t3-before.md5
    start_nbdkit t3 disk.img backup="$tmp/small/backup.raw" speed=1M on-target-error=stop
    wait_status small/backup.raw.status '^running$' 30
    timeout 120 qemu-io -f raw "nbd+unix:///?socket=$tmp/t3.sock" \
        -c "write -P 0x77 $((100 << 20)) $((8 << 20))" >t3-client.txt 2>&1 || true
    grep -q 'No space left on device' t3-client.txt \
        || { cat t3-client.txt >&2; fail "t3: the client's write did not fail with ENOSPC"; }
    ok "client: $(grep -i 'failed' t3-client.txt | head -n1)"
    grep -q 'copy-before-write failed' t3.log || fail "t3: nbdkit did not log the hook's failure"
    dd if=disk.img bs=1M skip=100 count=8 status=none | md5sum | cmp -s - t3-before.md5 \
        || fail "t3: the failed write changed the image"
    ok "the image kept its old data where the write failed"
    grep -q '^completed' small/backup.raw.status && fail "t3: the backup says completed"
    stop_nbdkit
    status=$(cat small/backup.raw.status)
    case $status in
        failed:*) ok "status after nbdkit stopped: $status" ;;
        *) fail "t3: status is '$status', expected 'failed: ...'" ;;
    esac
    umount small
else
    echo "SKIPPED part 3: cannot mount a tmpfs ($(cat t3-mount.err)); needs root"
fi

echo "=== 4. incremental: bitmap= during and after a full backup, then sync=bitmap"
cp --sparse=always disk.img t4-start1.img
mkdir t4a t4b t4c
$lib gen 4 2 30 "$size" 60 t4a   # during the full backup
$lib gen 5 1 20 "$size" 0 t4b    # after it, same daemon
$lib gen 6 2 10 "$size" 50 t4c   # during the incremental
start_nbdkit t4 disk.img backup="$tmp/t4-full.raw" bitmap="$tmp/disk.bitmap" speed=24M
wait_status t4-full.raw.status '^running$' 30
run_clients t4 t4a
wait_status t4-full.raw.status '^(completed|failed)' 300
grep -qx completed t4-full.raw.status || fail "t4: full backup: '$(cat t4-full.raw.status)'"
run_clients t4 t4b
stop_nbdkit
qemu-img compare -f raw -F raw t4-start1.img t4-full.raw >/dev/null || fail "t4: the full backup differs"
ok "full backup with bitmap= == the image at its start"
[ -f disk.bitmap ] || fail "t4: no bitmap file"
cp --sparse=always disk.img t4-start2.img
dirty=$($lib clusters 65536 t4a/ops.json t4b/ops.json)
start_nbdkit t4i disk.img backup="$tmp/t4-incr.raw" bitmap="$tmp/disk.bitmap" sync=bitmap speed=1M
wait_status t4-incr.raw.status '^running$' 30
run_clients t4i t4c
wait_status t4-incr.raw.status '^(completed|failed)' 300
grep -qx completed t4-incr.raw.status || fail "t4: incremental: '$(cat t4-incr.raw.status)'"
stop_nbdkit
copied=$(completed_stat t4i.log copied)
zero=$(completed_stat t4i.log zero)
skipped=$(completed_stat t4i.log skipped)
[ $((copied + zero)) -eq $((dirty * 65536)) ] \
    || fail "t4: the incremental copied $copied + $zero zero bytes, the dirty clusters are $((dirty * 65536))"
ok "the incremental copied $copied bytes + $zero zero bytes = $dirty dirty clusters; skipped $skipped"
$lib incr-check t4-full.raw t4-incr.raw t4-start2.img 65536 t4a/ops.json t4b/ops.json \
    || fail "t4: full + incremental != the image at the incremental's start"
echo "   allocated: full $(du -k t4-full.raw | cut -f1) KiB, incremental $(du -k t4-incr.raw | cut -f1) KiB"

echo "=== 5. a plugin that is not fully parallel: the filter serializes its calls into it"
# nbdkit's noparallel filter below ours makes the final thread model serialize_all_requests:
# nbdkit then serializes the clients' requests, and the filter also serializes the job's reads
# against them.
more_filters=(--filter=noparallel)
cp --sparse=always disk.img t5-start.img
mkdir t5 && $lib gen 7 2 25 "$size" 40 t5
start_nbdkit t5 disk.img backup="$tmp/t5-backup.raw" speed=48M serialize=all-requests
grep -q 'calls into the plugin are serialized' t5.log || fail "t5: the filter did not see the thread model"
wait_status t5-backup.raw.status '^running$' 30
run_clients t5 t5
wait_status t5-backup.raw.status '^(completed|failed)' 300
grep -qx completed t5-backup.raw.status || fail "t5: status is '$(cat t5-backup.raw.status)'"
stop_nbdkit
more_filters=()
qemu-img compare -f raw -F raw t5-start.img t5-backup.raw >/dev/null || fail "t5: the backup differs"
$lib expect t5-start.img t5-expect.img t5/ops.json
cmp disk.img t5-expect.img || fail "t5: the live image does not hold exactly the clients' changes"
ok "serialized plugin: backup == the image at start-up, live image == start + the clients' operations"

echo "nbdkit test: all passed in $(($(date +%s) - start_time)) s"
