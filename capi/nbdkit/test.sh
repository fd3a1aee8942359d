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
#      first + the second == the image at the second start; PATH.extents lists exactly them,
#      and the README's restore (full, then the incremental's extents) gives that image.
#   5. a plugin that is not fully parallel (noparallel filter): calls are serialized.
#   6. daemon mode (the README's command, no -f): every bad parameter, a bitmap of another
#      disk, a corrupt or busy bitmap make nbdkit exit non-zero at once with the reason, with
#      no daemon and no file left; PATH.status says running when nbdkit returns, then
#      running N%; --run and -f keep their exit status.
#   7. a second, unprivileged user (added when root) plants symlinks at PATH.status,
#      PATH.status.tmp and PATH.extents, pre-creates PATH.status(.tmp) in a sticky directory,
#      and swaps PATH for a symlink during backup-overwrite=true's start: nothing is followed,
#      every file is root 0600.
#   8. the control socket: capi/nbdkit/test-control.sh (test_control.py says what it checks).
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
wait_status t1-backup.raw.status '^running' 30
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
wait_status t2-backup.raw.status '^running' 30
sleep 1
kill -9 "$nbdkit_pid"
wait "$nbdkit_pid" 2>/dev/null || true
status=$(cat t2-backup.raw.status 2>/dev/null || echo "(absent)")
case $status in running|running\ [0-9]*%) ;; *) fail "t2: after kill -9 the status is '$status', expected 'running'" ;; esac
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
    wait_status small/backup.raw.status '^running' 30
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
wait_status t4-full.raw.status '^running' 30
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
wait_status t4-incr.raw.status '^running' 30
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
# PATH.extents: the full backup's copy set is the whole disk, the incremental's exactly the
# dirty clusters; the README's restore (full, then each incremental's extents) == the image
# at the incremental's start.
[ "$(grep -v '^#' t4-full.raw.extents)" = "0 $size" ] || fail "t4: full extents: $(cat t4-full.raw.extents)"
ext_bytes=$(grep -v '^#' t4-incr.raw.extents | awk '{s += $2} END {print s + 0}')
[ "$ext_bytes" -eq $((dirty * 65536)) ] \
    || fail "t4: t4-incr.raw.extents holds $ext_bytes bytes, the dirty clusters are $((dirty * 65536))"
for f in t4-full.raw t4-full.raw.status t4-full.raw.extents t4-incr.raw.extents disk.bitmap; do
    [ "$(stat -c %a "$f")" = 600 ] || fail "t4: $f has mode $(stat -c %a "$f"), not 600"
done
mkdir restore
cp --sparse=always t4-full.raw restore/disk.raw                        # README: the restore
grep -v '^#' t4-incr.raw.extents | while read -r off len; do
    dd if=t4-incr.raw of=restore/disk.raw iflag=skip_bytes,count_bytes oflag=seek_bytes \
       skip="$off" seek="$off" count="$len" bs=1M conv=notrunc status=none
done
qemu-img compare -f raw -F raw t4-start2.img restore/disk.raw >/dev/null \
    || fail "t4: full + the incremental's extents != the image at the incremental's start"
ok "restore: full + t4-incr.raw over its $(grep -vc '^#' t4-incr.raw.extents) extents == the image at the incremental's start (qemu-img compare); files 0600"
rm -rf restore

echo "=== 5. a plugin that is not fully parallel: the filter serializes its calls into it"
# nbdkit's noparallel filter below ours makes the final thread model serialize_all_requests:
# nbdkit then serializes the clients' requests, and the filter also serializes the job's reads
# against them.
more_filters=(--filter=noparallel)
cp --sparse=always disk.img t5-start.img
mkdir t5 && $lib gen 7 2 25 "$size" 40 t5
start_nbdkit t5 disk.img backup="$tmp/t5-backup.raw" speed=48M serialize=all-requests
grep -q 'calls into the plugin are serialized' t5.log || fail "t5: the filter did not see the thread model"
wait_status t5-backup.raw.status '^running' 30
run_clients t5 t5
wait_status t5-backup.raw.status '^(completed|failed)' 300
grep -qx completed t5-backup.raw.status || fail "t5: status is '$(cat t5-backup.raw.status)'"
stop_nbdkit
more_filters=()
qemu-img compare -f raw -F raw t5-start.img t5-backup.raw >/dev/null || fail "t5: the backup differs"
$lib expect t5-start.img t5-expect.img t5/ops.json
cmp disk.img t5-expect.img || fail "t5: the live image does not hold exactly the clients' changes"
ok "serialized plugin: backup == the image at start-up, live image == start + the clients' operations"

echo "=== 6. daemon mode (no -f): bad parameters and start-up failures make nbdkit exit non-zero"
# refused NAME REGEX ARGS...: the README's daemon-mode command with ARGS must exit non-zero
# (within 60 s) with a message matching REGEX on its stderr, and leave no daemon.
refused() {
    local name=$1 pattern=$2 rc=0; shift 2
    rm -f "$name.sock" "$name.pid"
    timeout 60 nbdkit -U "$tmp/$name.sock" -P "$tmp/$name.pid" --filter="$filter" file "$@" \
        >"$name.out" 2>"$name.err" || rc=$?
    [ "$rc" -ne 124 ] || fail "t6 $name: nbdkit did not return within 60 s"
    [ "$rc" -ne 0 ] || fail "t6 $name: nbdkit exited 0 for: $*"
    grep -Eq "$pattern" "$name.err" || { cat "$name.err" >&2; fail "t6 $name: no message /$pattern/"; }
    if [ -f "$name.pid" ] && kill -0 "$(cat "$name.pid")" 2>/dev/null; then
        fail "t6 $name: a daemon is left (pid $(cat "$name.pid"))"
    fi
    ! pgrep -f "$tmp/$name.sock" >/dev/null || fail "t6 $name: a process still serves $name.sock"
    echo "   refused ($rc): $(grep -E "$pattern" "$name.err" | head -n1 | cut -c1-150)"
}
truncate -s 32M other.img
mkdir t6dir
start_nbdkit t6o other.img bitmap="$tmp/other.bitmap"     # a bitmap of another (32 MiB) disk
stop_nbdkit
head -c 8192 /dev/urandom >garbage.bitmap
b=$tmp/t6-backup.raw
refused bm-other 'belongs to another disk' disk.img backup="$b" bitmap="$tmp/other.bitmap"
[ ! -e "$b" ] || fail "t6: the failed start left $b behind"
grep -q '^failed: .*another disk' "$b.status" || fail "t6: $b.status says '$(cat "$b.status" 2>/dev/null)'"
ok "a bitmap of another disk: exit non-zero, no backup left, $b.status says why"
refused nodir 'directory .*nodir.*(No such file|create it)' disk.img backup="$tmp/nodir/x.raw"
refused cs100k 'cluster-size=100K.*power of two' disk.img backup="$b" cluster-size=100K
refused cs3 'cluster-size=3.*power of two' disk.img backup="$b" cluster-size=3
refused cs-neg 'cluster-size=-1: not a size' disk.img backup="$b" cluster-size=-1
refused cs-huge 'cluster-size=128M' disk.img backup="$b" cluster-size=128M
refused workers-max 'workers=4294967295' disk.img backup="$b" workers=4294967295
refused workers-big 'workers.*4294967296' disk.img backup="$b" workers=4294967296
refused workers-neg 'workers.*negative' disk.img backup="$b" workers=-1
refused speed-neg 'speed=-5: not a size' disk.img backup="$b" speed=-5
refused gran 'bitmap-granularity=1' disk.img bitmap="$tmp/t6.bitmap" bitmap-granularity=1
refused empty 'backup= is empty' disk.img backup=
refused isdir 'already exists' disk.img backup="$tmp/t6dir"
refused isdir-ow 'not a regular file' disk.img backup="$tmp/t6dir" backup-overwrite=true
refused devnull 'not a regular file' disk.img backup=/dev/null backup-overwrite=true
refused toolong 'too long' disk.img backup="$tmp/$(printf 'a%.0s' $(seq 250)).raw"
refused bm-devzero 'bitmap=/dev/zero is not a regular file' disk.img backup="$b" bitmap=/dev/zero
refused bm-dir 'not a regular file' disk.img backup="$b" bitmap="$tmp/t6dir"
refused bm-garbage 'bitmap=.*garbage.bitmap' disk.img backup="$b" bitmap="$tmp/garbage.bitmap"
refused sync-bm 'sync=bitmap needs bitmap' disk.img backup="$b" sync=bitmap
refused never 'bitmap-mode' disk.img backup="$b" bitmap-mode=never
refused cbw 'on-cbw-error=xyz: unknown value' disk.img backup="$b" on-cbw-error=xyz
refused ow-maybe 'backup-overwrite=maybe: not a boolean' disk.img backup="$b" backup-overwrite=maybe
refused twice 'given twice' disk.img backup="$b" backup="$tmp/t6-other.raw"
refused bm-speed 'need backup=PATH' disk.img bitmap="$tmp/t6.bitmap" speed=1M
refused exists 'already exists' disk.img backup="$tmp/other.img"
[ ! -e "$b" ] && [ ! -e "$tmp/t6.bitmap" ] && [ ! -e "$tmp/t6-other.raw" ] \
    || fail "t6: a refused start left a file behind: $(ls "$tmp" | grep t6)"
ok "every bad parameter: nbdkit exits non-zero at once with the reason, no daemon, no file"
# The corrected command, as the operator retries it: starts, and PATH.status exists saying
# running when nbdkit returns; then running N% once a second.
rm -f t6.sock t6.pid
nbdkit -U "$tmp/t6.sock" -P "$tmp/t6.pid" --filter="$filter" file disk.img backup="$b" \
    bitmap="$tmp/t6.bitmap" speed=8M 2>t6.err || { cat t6.err >&2; fail "t6: the retry failed"; }
grep -Eq '^running' "$b.status" || fail "t6: when nbdkit returned $b.status was '$(cat "$b.status" 2>/dev/null)'"
ok "daemon mode: the retry starts; PATH.status says '$(cat "$b.status")' as nbdkit returns"
wait_status "$b.status" '^running [0-9]+%$' 30
ok "progress: '$(cat "$b.status")'"
# The bitmap is held by that daemon: a second one is refused before it forks.
refused bm-busy 'bitmap=' disk.img backup="$tmp/t6-second.raw" bitmap="$tmp/t6.bitmap"
[ ! -e "$tmp/t6-second.raw" ] || fail "t6: the refused second start left its backup"
pid=$(cat t6.pid)
kill -TERM "$pid"
deadline=$(($(date +%s) + 60))
while kill -0 "$pid" 2>/dev/null; do
    [ "$(date +%s)" -lt "$deadline" ] || fail "t6: the daemon did not exit within 60 s of SIGTERM"
    sleep 0.1
done
grep -q '^failed: cancelled' "$b.status" || fail "t6: after SIGTERM $b.status is '$(cat "$b.status")'"
ok "a bitmap held by a running daemon is refused; SIGTERM: '$(cut -c1-60 "$b.status")...'"
rm -f "$b" "$b.status" "$b.extents" t6.bitmap
# --run and -f keep nbdkit's own exit status (the filter's wait is for daemon mode only).
rc=0
nbdkit -U - --filter="$filter" file disk.img backup="$tmp/t6-run.raw" --run 'exit 3' 2>t6run.err || rc=$?
[ "$rc" -eq 3 ] || { cat t6run.err >&2; fail "t6: nbdkit --run 'exit 3' exited $rc"; }
rc=0
timeout 60 nbdkit -f -U "$tmp/t6f.sock" --filter="$filter" file disk.img \
    bitmap="$tmp/other.bitmap" backup="$tmp/t6-f.raw" 2>t6f.err || rc=$?
[ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && grep -q 'another disk' t6f.err \
    || { cat t6f.err >&2; fail "t6: -f with a bitmap of another disk: exit $rc"; }
ok "--run keeps the command's exit status (3); -f fails with the reason too"
rm -f t6-run.raw* t6-f.raw* other.img other.bitmap garbage.bitmap

echo "=== 7. files no one else can hijack: a second, unprivileged user attacks"
attacker=cbatk
if [ "$(id -u)" != 0 ]; then
    echo "SKIPPED part 7: needs root (to add the unprivileged user $attacker and run as it)"
elif ! command -v setpriv >/dev/null; then
    echo "SKIPPED part 7: setpriv (util-linux) is not installed"
else
    id -u "$attacker" >/dev/null 2>&1 || useradd -M -s /bin/bash "$attacker" 2>/dev/null \
        || id -u "$attacker" >/dev/null 2>&1 || fail "t7: cannot add the user $attacker"
    as_attacker() { setpriv --reuid="$attacker" --regid="$attacker" --clear-groups -- "$@"; }
    chmod 711 "$tmp"                         # the attacker reaches the shared dirs, nothing else
    printf 'root-owned: IMPORTANT\n' >victim; chmod 600 victim
    victim_sum=$(md5sum <victim)
    # (a) a directory the attacker owns (no sticky bit, so fs.protected_symlinks does not help):
    # symlinks planted at PATH.status, the old fixed PATH.status.tmp and PATH.extents.
    mkdir att && chown "$attacker" att && chmod 755 att
    b=$tmp/att/vm.raw
    for n in status status.tmp extents; do as_attacker ln -s "$tmp/victim" "$b.$n"; done
    start_nbdkit t7a disk.img backup="$b" speed=8M
    wait_status "$b.status" '^running' 30
    stop_nbdkit
    [ "$(md5sum <victim)" = "$victim_sum" ] || fail "t7: the planted symlinks made the filter write the victim"
    for f in "$b" "$b.status" "$b.extents"; do
        [ -f "$f" ] && [ ! -L "$f" ] || fail "t7: $f is not a regular file"
        [ "$(stat -c '%U %a' "$f")" = "root 600" ] || fail "t7: $f is $(stat -c '%U %a' "$f")"
    done
    ok "symlinks planted at PATH.status, PATH.status.tmp, PATH.extents: replaced, not followed; files root 0600"
    # (b) a shared sticky directory (like /tmp): a PATH.status.tmp pre-created by the
    # attacker is not used, and the attacker cannot write PATH.status.
    mkdir shared && chmod 1777 shared
    b=$tmp/shared/vm2.raw
    as_attacker sh -c "umask 000; : >'$b.status.tmp'; : >'$b.status'"
    start_nbdkit t7b disk.img backup="$b" speed=4M
    wait_status "$b.status" '^running' 30
    [ "$(stat -c %U "$b.status")" = root ] || fail "t7: $b.status belongs to $(stat -c %U "$b.status")"
    if as_attacker sh -c "printf 'completed\n' >'$b.status'" 2>/dev/null; then
        fail "t7: the attacker wrote into $b.status"
    fi
    grep -q '^running' "$b.status" || fail "t7: $b.status says '$(cat "$b.status")'"
    as_attacker sh -c "cat '$b' >/dev/null" 2>/dev/null && fail "t7: the attacker can read the backup"
    stop_nbdkit
    ok "pre-created PATH.status(.tmp) by another user: not used; PATH.status root 0600, the backup unreadable to others"
    # (c) backup-overwrite=true: PATH is checked before the fork and a symlink swapped in
    # while the plugin's .after_fork is slow must not be followed (the create is a rename).
    cat >slowplugin.sh <<'SH'
#!/bin/sh
case "$1" in
  get_size) echo 1048576 ;;
  pread) head -c "$3" /dev/zero | tr '\0' 'D' ;;
  after_fork) : >"$(dirname "$0")/after_fork.started"; sleep 3 ;;
  thread_model) echo parallel ;;
  can_write|can_extents) exit 3 ;;
  *) exit 2 ;;
esac
SH
    chmod 755 slowplugin.sh
    b=$tmp/att/vm3.raw
    as_attacker sh -c ": >'$b'"
    rm -f t7c.sock
    nbdkit -f -U "$tmp/t7c.sock" --filter="$filter" sh "$tmp/slowplugin.sh" backup="$b" \
        backup-overwrite=true 2>t7c.log &
    nbdkit_pid=$!
    pids+=("$nbdkit_pid")
    deadline=$(($(date +%s) + 60))               # .config_complete has passed; .after_fork sleeps
    until [ -f after_fork.started ]; do
        [ "$(date +%s)" -lt "$deadline" ] || fail "t7: the plugin's .after_fork did not start"
        sleep 0.1
    done
    as_attacker sh -c "rm -f '$b'; ln -s '$tmp/victim' '$b'"
    wait_status "$b.status" '^(completed|failed)' 60
    stop_nbdkit
    [ "$(md5sum <victim)" = "$victim_sum" ] || fail "t7: backup-overwrite=true followed a swapped-in symlink"
    [ -f "$b" ] && [ ! -L "$b" ] && [ "$(stat -c '%U %a' "$b")" = "root 600" ] \
        || fail "t7: $b is not the filter's own file: $(ls -l "$b")"
    grep -qx completed "$b.status" || fail "t7: overwrite run: '$(cat "$b.status")'"
    [ "$(head -c 1048576 "$b" | tr -d D | wc -c)" -eq 0 ] || fail "t7: $b does not hold the disk"
    ok "backup-overwrite=true with a symlink swapped in after the check: replaced by the backup, victim intact"
    rm -rf att shared victim slowplugin.sh after_fork.started
fi

# 8. The control socket (control=PATH, QMP): backups at run time under a filesystem workload,
#    with QEMU's own QMP client library: capi/nbdkit/test-control.sh.
"$here/test-control.sh" "$build" || fail "the control socket (test-control.sh)"

echo "nbdkit test: all passed in $(($(date +%s) - start_time)) s"

