#!/bin/sh
# Refresh the committed include/cowbackup.h from the header capi/build.rs generates
# (cbindgen, from src/ffi) into cargo's OUT_DIR. capi/tests/header.rs fails until this has
# been run.
set -eu
cd "$(dirname "$0")/.."
out_dir=$(cargo build -p cowbackup-capi --message-format=json 2>/dev/null \
    | grep '"reason":"build-script-executed"' | grep '"package_id":"[^"]*cowbackup-capi' \
    | sed 's/.*"out_dir":"\([^"]*\)".*/\1/' | tail -n 1)
if [ -z "$out_dir" ] || [ ! -f "$out_dir/cowbackup.h" ]; then
    echo "update-header: cargo build did not produce cowbackup.h (run cargo build -p cowbackup-capi to see why)" >&2
    exit 1
fi
cp "$out_dir/cowbackup.h" include/cowbackup.h
echo "include/cowbackup.h updated from $out_dir/cowbackup.h"
