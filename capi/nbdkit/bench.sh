#!/usr/bin/env bash
# Benchmark of the nbdkit filter, every figure next to its baseline from the same run:
#   client writes: nbdcopy writes SIZE of random data into nbdkit's file plugin over a Unix
#     socket, (a) without the filter, (b) through the filter while a backup runs at speed=
#     THROTTLE (the whole write overlaps the backup: hook cost), (c) while a backup runs
#     unthrottled (hook + competition for the disk), (d) through the filter after its backup
#     completed (the filter's own cost);
#   backup: the filter's backup of the idle SIZE disk (from nbdkit start to PATH.status
#     "completed"), next to cp and qemu-img convert of the same image into a new file.
# Each figure is the median of RUNS runs. Files go to DIR (default /var/tmp: a real disk;
# the page cache holds them, this measures the CPU path, not the disk).
# Usage: capi/nbdkit/bench.sh [BUILD_DIR]   env: SIZE_MIB=512 RUNS=3 THROTTLE=64M DIR=/var/tmp
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
build=${1:-$root/build/plain}
filter=$build/capi/nbdkit/nbdkit-cowbackup-filter.so
size_mib=${SIZE_MIB:-512}
runs=${RUNS:-3}
throttle=${THROTTLE:-64M}
"$root/scripts/deps.sh"
for tool in nbdkit nbdcopy qemu-img python3; do
    command -v "$tool" >/dev/null || { echo "bench: $tool is missing" >&2; exit 1; }
done
[ -f "$filter" ] || { echo "bench: $filter not built (ninja -C $build)" >&2; exit 1; }

tmp=$(mktemp -d "${DIR:-/var/tmp}/cowbackup-nbdkit-bench-XXXXXX")
nbdkit_pid=
cleanup() { [ -n "$nbdkit_pid" ] && kill -9 "$nbdkit_pid" 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT
cd "$tmp"

now() { date +%s.%N; }
mibs() { python3 -c "import sys; print(f'{$size_mib / float(sys.argv[1]):.0f}')" "$1"; }
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }

start_nbdkit() { # ARGS... after the plugin; without --filter when the first is "nofilter"
    local f=(--filter="$filter")
    if [ "$1" = nofilter ]; then f=(); shift; fi
    rm -f sock
    nbdkit -f -U "$tmp/sock" "${f[@]}" file disk.img "$@" 2>nbdkit.log &
    nbdkit_pid=$!
    local deadline=$(($(date +%s) + 60))
    until [ -S sock ]; do
        kill -0 "$nbdkit_pid" 2>/dev/null || { cat nbdkit.log >&2; exit 1; }
        [ "$(date +%s)" -lt "$deadline" ] || { echo "bench: no socket" >&2; exit 1; }
        sleep 0.02
    done
}
stop_nbdkit() {
    kill -TERM "$nbdkit_pid"
    timeout 120 tail --pid="$nbdkit_pid" -f /dev/null || kill -9 "$nbdkit_pid"
    wait "$nbdkit_pid" 2>/dev/null || true
    nbdkit_pid=
}
wait_completed() { # PATH.status, SECONDS
    local deadline=$(($(date +%s) + $2))
    until grep -qx completed "$1" 2>/dev/null; do
        if grep -q '^failed' "$1" 2>/dev/null || [ "$(date +%s)" -ge "$deadline" ]; then
            echo "bench: backup not completed: $(cat "$1" 2>/dev/null)" >&2; exit 1
        fi
        sleep 0.01
    done
}
write_seconds() { # nbdcopy the payload into the export; prints the seconds
    local t0 t1
    t0=$(now)
    timeout 600 nbdcopy payload.raw "nbd+unix:///?socket=$tmp/sock"
    t1=$(now)
    python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$t0" "$t1"
}

echo "bench: $size_mib MiB, median of $runs runs, in $tmp ($(df -T . | awk 'NR==2 {print $2}')), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
dd if=/dev/urandom of=disk.img bs=1M count="$size_mib" status=none
dd if=/dev/urandom of=payload.raw bs=1M count="$size_mib" status=none
cp disk.img pristine.img

declare -A res
for r in $(seq "$runs"); do
    cp pristine.img disk.img   # every run writes over the same data
    start_nbdkit nofilter
    res[nofilter]+=" $(write_seconds)"
    stop_nbdkit

    rm -f b.raw b.raw.status
    start_nbdkit backup="$tmp/b.raw" speed="$throttle"
    res[throttled]+=" $(write_seconds)"
    echo "run $r: no filter ${res[nofilter]##* } s, throttled backup ${res[throttled]##* } s" >&2
    stop_nbdkit

    rm -f b.raw b.raw.status
    start_nbdkit backup="$tmp/b.raw"
    res[unthrottled]+=" $(write_seconds)"
    stop_nbdkit

    # The backup alone (idle disk), then writes through the filter after it completed.
    rm -f b.raw b.raw.status
    t0=$(now)
    start_nbdkit backup="$tmp/b.raw"
    wait_completed b.raw.status 600
    t1=$(now)
    res[backup]+=" $(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$t0" "$t1")"
    res[after]+=" $(write_seconds)"
    stop_nbdkit
    # Every nbdcopy above wrote the payload over the whole disk: that is what it held.
    cmp -s b.raw payload.raw || { echo "bench: the backup differs from the image" >&2; exit 1; }

    rm -f c.raw; t0=$(now); cp disk.img c.raw; sync -f c.raw 2>/dev/null || true; t1=$(now)
    res[cp]+=" $(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$t0" "$t1")"
    rm -f c.raw; t0=$(now); qemu-img convert -f raw -O raw disk.img c.raw; t1=$(now)
    res[qemu]+=" $(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$t0" "$t1")"
    rm -f c.raw
done

row() { # label, key, baseline key (or empty)
    local m b
    # shellcheck disable=SC2086
    m=$(median ${res[$2]})
    if [ -n "${3:-}" ]; then
        # shellcheck disable=SC2086
        b=$(median ${res[$3]})
        printf '| %s | %s s, %s MiB/s | %s |\n' "$1" "$m" "$(mibs "$m")" \
            "$(python3 -c "import sys; print(f'{float(sys.argv[1]) / float(sys.argv[2]):.2f}')" "$b" "$m")x"
    else
        printf '| %s | %s s, %s MiB/s | 1 |\n' "$1" "$m" "$(mibs "$m")"
    fi
}
echo
echo "| client writes (nbdcopy, $size_mib MiB random into the export) | time, throughput | throughput vs no filter |"
echo "|---|---|---|"
row "nbdkit file, no filter" nofilter
row "filter, backup running at speed=$throttle" throttled nofilter
row "filter, backup running unthrottled" unthrottled nofilter
row "filter, backup completed" after nofilter
echo
echo "| copy of the idle $size_mib MiB disk into a new file | time, throughput | throughput vs the filter backup |"
echo "|---|---|---|"
row "filter backup (nbdkit start to status completed)" backup
row "cp" cp backup
row "qemu-img convert -f raw -O raw" qemu backup
echo
echo "runs (s): $(for k in nofilter throttled unthrottled after backup cp qemu; do printf '%s:%s; ' "$k" "${res[$k]}"; done)"
