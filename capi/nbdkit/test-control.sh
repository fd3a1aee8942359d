#!/usr/bin/env bash
# The filter's control socket (control=PATH, QMP) under a real workload: test_control.py
# (what it checks is said at its top), with QEMU's QMP client library qemu.qmp from PyPI,
# installed into the repository's venv (.venv, gitignored; never the system's Python).
# Usage: capi/nbdkit/test-control.sh [BUILD_DIR]  (default build/plain). Run by test.sh.
# Skips (exit 0, with the reason) when a tool it needs is missing and cannot be installed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
build=${1:-$root/build/plain}
filter=$build/capi/nbdkit/nbdkit-cowbackup-filter.so

for tool in nbdkit qemu-img qemu-io nbdinfo python3; do
    if ! command -v "$tool" >/dev/null; then
        echo "control test: SKIPPED: $tool is not installed"
        exit 0
    fi
done
[ -f "$filter" ] || { echo "control test: FAILED: $filter was not built" >&2; exit 1; }

venv=$root/.venv
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" 2>/dev/null || { rm -rf "$venv"; echo "control test: SKIPPED: cannot make a venv (python3-venv)"; exit 0; }
fi
if ! "$venv/bin/python" -c 'import qemu.qmp' 2>/dev/null; then
    # qemu.qmp: QEMU's own QMP client library, so the wire format is checked by a client we
    # did not write.
    "$venv/bin/python" -m pip install --quiet 'qemu.qmp>=0.0.3' \
        || { echo "control test: SKIPPED: cannot install qemu.qmp from PyPI"; exit 0; }
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/cowbackup-control-XXXXXX")
trap 'rm -rf "$tmp"' EXIT
start=$(date +%s)
timeout 1500 "$venv/bin/python" "$here/test_control.py" "$filter" "$tmp" || {
    echo "control test: FAILED; nbdkit's log (tail):" >&2
    grep -v 'debug: cowbackup: \(pread\|pwrite\|zero\|trim\|extents\|flush\)\|debug: file: \(pread\|pwrite\|zero\|trim\|extents\|flush\)' "$tmp/nbdkit.log" 2>/dev/null | tail -n 30 >&2
    exit 1
}
echo "control test: all passed in $(($(date +%s) - start)) s"
