#!/bin/sh
# Used by meson.build: build the Rust static library with cargo and copy it to meson's
# output path. Usage: cargo-build.sh CARGO MANIFEST TARGET_DIR OUTPUT
set -eu
cargo=$1 manifest=$2 target_dir=$3 output=$4
"$cargo" build --release --manifest-path "$manifest" --target-dir "$target_dir"
cp "$target_dir/release/libcowbackup.a" "$output"
