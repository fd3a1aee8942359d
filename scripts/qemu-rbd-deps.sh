#!/usr/bin/env bash
# Installs qemu-block-extra (QEMU's rbd: driver module for qemu-nbd and qemu-img) of the exact
# build of the installed qemu-utils: QEMU loads block modules only from its own build. When
# qemu-utils comes from a suite the machine's apt sources do not list (bookworm-backports on
# these machines), that one install uses an apt configuration of its own (a private sources
# dir with the system's sources plus that suite, private package lists under a temp dir):
# the system's apt sources are left alone. Only needed for the NBD route into Ceph and the
# bench's qemu-img comparison; prints why and exits 0 when it cannot (callers then skip those).
set -uo pipefail
[ "$(id -u)" = 0 ] || { echo "qemu-rbd-deps: not root; skipping qemu-block-extra" >&2; exit 0; }
command -v dpkg-query >/dev/null || exit 0
ver=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null) || { echo "qemu-rbd-deps: qemu-utils is not installed" >&2; exit 0; }
have=$(dpkg-query -W -f='${Status} ${Version}' qemu-block-extra 2>/dev/null || true)
[ "$have" = "install ok installed $ver" ] && exit 0
export DEBIAN_FRONTEND=noninteractive
if apt-get install -y -qq --no-install-recommends "qemu-block-extra=$ver" >/dev/null 2>&1; then exit 0; fi
suite=
case "$ver" in *~bpo12*) suite=bookworm-backports ;; *~bpo13*) suite=trixie-backports ;; esac
[ -n "$suite" ] || { echo "qemu-rbd-deps: no qemu-block-extra=$ver in the apt sources" >&2; exit 0; }
tmp=$(mktemp -d /tmp/qemu-rbd-apt.XXXXXX); trap 'rm -rf -- "$tmp"' EXIT
mkdir -p "$tmp/sources.list.d" "$tmp/lists/partial"
cp /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list "$tmp/sources.list.d/" 2>/dev/null
[ -f /etc/apt/sources.list ] && cp /etc/apt/sources.list "$tmp/sources.list.d/system.list"
printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: %s\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
    "$suite" > "$tmp/sources.list.d/backports.sources"
apt_opts=(-o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$tmp/sources.list.d" -o "Dir::State::Lists=$tmp/lists")
if apt-get "${apt_opts[@]}" update -qq >/dev/null 2>&1 \
    && apt-get "${apt_opts[@]}" install -y -qq --no-install-recommends "qemu-block-extra=$ver" >/dev/null; then
    echo "qemu-rbd-deps: installed qemu-block-extra $ver from $suite"
else
    echo "qemu-rbd-deps: could not install qemu-block-extra=$ver (from $suite); the NBD route into Ceph is skipped" >&2
fi
exit 0
