#!/usr/bin/env bash
# Installs the system tools the tests and examples use, on a fresh Debian machine:
# the NBD peers (nbdkit + its plugin headers for the filter, libnbd's nbdinfo/nbdcopy/nbdsh,
# python3-libnbd for Debian's /usr/bin/python3), valgrind, openssl (throwaway TLS certificates),
# and for the RBD driver librbd-dev plus a throw-away Ceph cluster's daemons and tools
# (ceph-mon, ceph-osd, ceph-mgr, ceph-common, uuid-runtime: scripts/ceph-up.sh). Never qemu-system-x86 (it
# would replace the newer qemu-img on these machines). Idempotent; installs only what is
# missing; prints what it could not install and exits 0 (each test then skips with a reason).
set -uo pipefail
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo -n "$@"; else return 1; fi; }
missing=()
need() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed' || missing+=("$1"); }
command -v dpkg-query >/dev/null || { echo "deps: not a Debian machine; install nbdkit, libnbd tools, valgrind yourself" >&2; exit 0; }
for p in nbdkit nbdkit-plugin-dev libnbd-bin python3-libnbd valgrind pkg-config openssl \
         librbd-dev ceph-mon ceph-osd ceph-mgr ceph-common uuid-runtime; do need "$p"; done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "--- deps: apt-get install ${missing[*]}"
if command -v apt-get >/dev/null \
    && (as_root apt-get update -qq || true) \
    && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
    exit 0
fi
echo "deps: could not install ${missing[*]} (not root, or no network); tests that need them skip" >&2
exit 0
