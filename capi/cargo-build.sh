#!/bin/sh
# Used by meson.build: build the Rust static library with cargo and copy it to meson's
# output path. Usage: cargo-build.sh CARGO MANIFEST TARGET_DIR OUTPUT [FEATURES]
# FEATURES: extra cargo features, comma-separated ("rbd"), or "none" / absent for none.
set -eu
cargo=$1 manifest=$2 target_dir=$3 output=$4 features=${5:-none}
if [ "$features" = none ]; then
    "$cargo" build --release --manifest-path "$manifest" --target-dir "$target_dir"
else
    "$cargo" build --release --manifest-path "$manifest" --target-dir "$target_dir" --features "$features"
fi
cp "$target_dir/release/libcowbackup.a" "$output"
