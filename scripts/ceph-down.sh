#!/bin/bash
# Tear down what scripts/ceph-up.sh started under $CEPH_DIR: SIGTERM the processes named by the
# PIDs in $CEPH_DIR/run/*.pid (only those whose command line refers to $CEPH_DIR, against PID
# reuse), wait up to 10 s, SIGKILL leftovers, then remove $CEPH_DIR. qemu-nbd first (it flushes),
# then mgr and osd, then mon. Never touches processes it cannot tie to $CEPH_DIR.
set -uo pipefail
D=${CEPH_DIR:-/tmp/cowbackup-ceph}
[ -d "$D" ] || { echo "ceph-down: $D not there" >&2; exit 0; }
[ -f "$D/ceph.conf" ] || { echo "ceph-down: $D has no ceph.conf, refusing" >&2; exit 1; }
t0=$(date +%s%N)
pids_of() {  # names -> live, verified pids
    local n pid
    for n in "$@"; do
        pid=$(cat "$D/run/$n.pid" 2>/dev/null) || continue
        [[ "$pid" =~ ^[0-9]+$ ]] || continue
        tr '\0' ' ' 2>/dev/null < "/proc/$pid/cmdline" | grep -qF "$D/" && echo "$pid"
    done
}
stop() {  # names...
    local pids p left=
    pids=$(pids_of "$@"); [ -n "$pids" ] || return 0
    kill -TERM $pids 2>/dev/null
    for _ in $(seq 1 100); do
        left=; for p in $pids; do kill -0 "$p" 2>/dev/null && left="$left $p"; done
        [ -z "$left" ] && break; sleep 0.1
    done
    if [ -n "$left" ]; then echo "ceph-down: SIGKILL$left" >&2; kill -KILL $left 2>/dev/null; sleep 0.5; fi
    printf '[ceph-down %5d ms] stopped %s\n' "$((($(date +%s%N) - t0) / 1000000))" "$*" >&2
}
stop qemu-nbd
stop mgr.x osd.0
stop mon.a
rm -rf -- "$D"
printf '[ceph-down %5d ms] removed %s\n' "$((($(date +%s%N) - t0) / 1000000))" "$D" >&2
