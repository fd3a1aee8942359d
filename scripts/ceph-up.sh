#!/bin/bash
# Stand up a throw-away single-node Ceph (Debian 12's 16.2 "Pacific") cluster for the RBD tests and
# bench: 1 mon, 1 mgr, 1 OSD (memstore: data in the OSD's RAM; OSD_STORE=bluestore for a sparse
# file), cephx, everything under $CEPH_DIR, listening on 127.0.0.1 only; no systemd, no containers.
# Then create pool $POOL and (unless IMAGE is empty) RBD image $IMAGE of $SIZE; with NBD=1 also
# export it with qemu-nbd on 127.0.0.1:$NBD_PORT (needs qemu-block-extra of qemu-utils' build).
#
# Usage: CEPH_DIR=/tmp/x [MON_PORT=6789 MON_PORT2=3300 POOL=rbd IMAGE=img SIZE=1G NBD=0 NBD_PORT=10809] scripts/ceph-up.sh
# Prints shell assignments on stdout at the end: CEPH_DIR, CEPH_CONF, RBD_SPEC (POOL/IMAGE), and
# NBD_URI with NBD=1. Progress goes to stderr. Exit 77 (with the reason) when the Ceph packages
# are missing (scripts/deps.sh installs them). On any other failure daemons may be left
# running: always call scripts/ceph-down.sh (same CEPH_DIR) from a trap.
# Adapted from the measured recipe of the cowbackup sessions (up in ~7 s, under 1 GiB).
set -euo pipefail
D=${CEPH_DIR:-/tmp/cowbackup-ceph}
MON_PORT=${MON_PORT:-6789}; MON_PORT2=${MON_PORT2:-3300}
POOL=${POOL:-rbd}; IMAGE=${IMAGE-img}; SIZE=${SIZE:-1G}
NBD=${NBD:-0}; NBD_PORT=${NBD_PORT:-10809}
OSD_STORE=${OSD_STORE:-memstore}
OSD_BYTES=${OSD_BYTES:-$((4<<30))}              # OSD capacity; memstore uses RAM only for data written
T=${CEPH_UP_TIMEOUT:-60}                        # per-step timeout, seconds

for tool in ceph-mon ceph-osd ceph-mgr ceph ceph-authtool monmaptool rbd uuidgen; do
    command -v "$tool" >/dev/null || { echo "ceph-up: $tool is missing (apt-get install ceph-mon ceph-osd ceph-mgr ceph-common uuid-runtime; scripts/deps.sh does)" >&2; exit 77; }
done
[ "$NBD" = 1 ] && ! command -v qemu-nbd >/dev/null && { echo "ceph-up: NBD=1 needs qemu-nbd" >&2; exit 77; }
t0=$(date +%s%N)
cur=start
trap 'echo "ceph-up: FAILED at step \"$cur\"; logs in $D/log" >&2' ERR
step() { cur=$*; printf '[ceph-up %5d ms] %s\n' "$((($(date +%s%N) - t0) / 1000000))" "$*" >&2; }

if [ -e "$D" ]; then echo "ceph-up: $D exists; run scripts/ceph-down.sh first" >&2; exit 1; fi
mkdir -p "$D"/{mon,osd,mgr,log,run}
C=$D/ceph.conf
FSID=$(uuidgen); OSD_UUID=$(uuidgen)
cat > "$C" <<CONF
[global]
fsid = $FSID
mon host = [v2:127.0.0.1:$MON_PORT2,v1:127.0.0.1:$MON_PORT]
public addr = 127.0.0.1
public network = 127.0.0.1/32
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = $D/keyring
run dir = $D/run
pid file = $D/run/\$name.pid
log file = $D/log/\$name.log
mon cluster log file = $D/log/cluster.log
crash dir = $D/crash
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
auth allow insecure global id reclaim = false
[client]
admin socket =
log file = $D/log/client.log
[mon]
admin socket = $D/run/\$name.asok
mon data = $D/mon
mon initial members = a
[osd]
admin socket = $D/run/\$name.asok
osd data = $D/osd
osd objectstore = $OSD_STORE
memstore device bytes = $OSD_BYTES
bluestore block create = true
bluestore block size = $OSD_BYTES
bluestore cache autotune = false
bluestore cache size = 67108864
bluestore fsck on mkfs = false
osd memory target = 939524096
[mgr]
admin socket = $D/run/\$name.asok
mgr data = $D/mgr
mgr initial modules =
CONF

step "keys"
K=$D/keyring
ceph-authtool --create-keyring "$K" --gen-key -n mon. --cap mon 'allow *' >/dev/null
ceph-authtool "$K" --gen-key -n client.admin --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
ceph-authtool "$K" --gen-key -n mgr.x --cap mon 'allow profile mgr' --cap osd 'allow *' --cap mds 'allow *' >/dev/null
ceph-authtool "$K" --gen-key -n osd.0 --cap mon 'allow profile osd' --cap mgr 'allow profile osd' --cap osd 'allow *' >/dev/null
chmod 600 "$K"
monmaptool --create --fsid "$FSID" --addv a "[v2:127.0.0.1:$MON_PORT2,v1:127.0.0.1:$MON_PORT]" "$D/monmap" >/dev/null
step "mon mkfs"
timeout "$T" ceph-mon -c "$C" --mkfs -i a --monmap "$D/monmap" --keyring "$K"
step "mon start"
timeout "$T" ceph-mon -c "$C" -i a          # daemonizes; pid in $D/run/mon.a.pid
step "osd new"
timeout "$T" ceph -c "$C" osd new "$OSD_UUID" 0 >/dev/null 2>>"$D/log/cli.log"
step "osd mkfs"
timeout "$T" ceph-osd -c "$C" -i 0 --mkfs --osd-uuid "$OSD_UUID" 2>>"$D/log/osd-mkfs.log"
step "osd start"
timeout "$T" ceph-osd -c "$C" -i 0 2>>"$D/log/osd-start.log"
step "mgr start"
timeout "$T" ceph-mgr -c "$C" -i x
step "pool create"
timeout "$T" ceph -c "$C" osd pool create "$POOL" 8 8 >/dev/null 2>>"$D/log/cli.log"
step "rbd pool init (waits for the PGs)"
timeout "$T" rbd -c "$C" pool init "$POOL"
if [ -n "$IMAGE" ]; then
    step "rbd create $POOL/$IMAGE $SIZE"
    timeout "$T" rbd -c "$C" create --size "$SIZE" "$POOL/$IMAGE"
fi
if [ "$NBD" = 1 ]; then
    step "qemu-nbd"
    timeout "$T" qemu-nbd --fork --pid-file "$D/run/qemu-nbd.pid" -b 127.0.0.1 -p "$NBD_PORT" -e "${NBD_SHARED:-1}" \
        -f raw --persistent --cache=none --discard=unmap "rbd:$POOL/$IMAGE:conf=$C:id=admin"
fi
step "up"
echo "CEPH_DIR=$D"
echo "CEPH_CONF=$C"
[ -n "$IMAGE" ] && echo "RBD_SPEC=$POOL/$IMAGE"
[ "$NBD" = 1 ] && echo "NBD_URI=nbd://127.0.0.1:$NBD_PORT"
exit 0
