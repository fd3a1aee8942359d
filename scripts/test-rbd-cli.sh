#!/usr/bin/env bash
# The `cowbackup` command built with the feature rbd, against a real throw-away Ceph cluster
# (scripts/ceph-up.sh): a full backup of a file into an RBD image with a manifest, verify
# of the backup in the cluster, restore of it into a file and into another RBD image, a
# backup from the RBD image, and the refusals (an image of another size, an image that does
# not exist) that change nothing. Checked with Ceph's own `rbd export` and with cmp. Called by scripts/test-rbd.sh
# (which skips, saying why, without librbd-dev or the Ceph packages).
set -euo pipefail
cd "$(dirname "$0")/.."
D=$(mktemp -d /tmp/cowbackup-rbd-cli.XXXXXX)
cleanup() { CEPH_DIR=$D/ceph scripts/ceph-down.sh >/dev/null 2>&1 || true; rm -rf "$D"; }
trap cleanup EXIT

cargo build --release -p cowbackup-cli --features rbd
B=$PWD/target/release/cowbackup
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
eval "$(CEPH_DIR=$D/ceph MON_PORT=$(port) MON_PORT2=$(port) IMAGE=full SIZE=64M scripts/ceph-up.sh)"
export CEPH_CONF
rbd_() { timeout 120 rbd -c "$CEPH_CONF" "$@"; }
fail() { echo "test-rbd-cli: FAILED: $*" >&2; exit 1; }

# A 64 MiB source: random data with zeroed stretches (zero clusters stay holes in Ceph).
head -c $((64 << 20)) /dev/urandom > "$D/src.img"
dd if=/dev/zero of="$D/src.img" bs=1M seek=8 count=8 conv=notrunc status=none
dd if=/dev/zero of="$D/src.img" bs=64K seek=700 count=3 conv=notrunc status=none

echo "--- backup FILE rbd:rbd/full --manifest"
"$B" backup "$D/src.img" rbd:rbd/full --manifest "$D/full.manifest" --json > "$D/backup.json"
grep -Eq '"result": ?"completed"' "$D/backup.json" || fail "backup did not complete: $(cat "$D/backup.json")"
grep -Eq '"target_kind": ?"rbd"' "$D/backup.json" || fail "target kind is not rbd: $(cat "$D/backup.json")"
rbd_ export rbd/full "$D/exported.img" >/dev/null 2>&1
cmp "$D/src.img" "$D/exported.img" || fail "rbd export of the backup differs from the source"

echo "--- verify MANIFEST (re-reads the image the manifest names, in the cluster)"
"$B" verify "$D/full.manifest" || fail "verify of the backup in Ceph"

echo "--- restore MANIFEST FILE"
"$B" restore "$D/full.manifest" "$D/restored.img"
cmp "$D/src.img" "$D/restored.img" || fail "restore differs from the source"

echo "--- restore MANIFEST rbd:rbd/restored (into an existing RBD image)"
rbd_ create --size 64M rbd/restored
"$B" restore "$D/full.manifest" rbd:rbd/restored
rbd_ export rbd/restored "$D/restored-rbd.img" >/dev/null 2>&1
cmp "$D/src.img" "$D/restored-rbd.img" || fail "restore into RBD differs from the source"

echo "--- backup rbd:rbd/full FILE (an RBD image as the source)"
"$B" backup rbd:rbd/full "$D/from-rbd.img"
cmp "$D/src.img" "$D/from-rbd.img" || fail "a backup of the RBD image differs from it"

echo "--- refusals change nothing"
rbd_ create --size 32M rbd/small
if "$B" backup "$D/src.img" rbd:rbd/small 2> "$D/err"; then fail "a backup into an image of another size ran"; fi
grep -q "must be equal" "$D/err" || fail "no size message: $(cat "$D/err")"
rbd_ export rbd/small "$D/small.img" >/dev/null 2>&1
cmp "$D/small.img" <(head -c $((32 << 20)) /dev/zero) || fail "the refused image was written"
if "$B" backup "$D/src.img" rbd:rbd/nosuchimage 2> "$D/err"; then fail "a backup into a missing image ran"; fi
grep -q "rbd:rbd/nosuchimage" "$D/err" || fail "the error does not name the image: $(cat "$D/err")"
echo "test-rbd-cli: ok"
