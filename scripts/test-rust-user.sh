#!/usr/bin/env bash
# A Rust user's first build, as a new user makes it: a fresh cargo project outside the
# repository with cowbackup as a path dependency. It must build an rlib only (no cbindgen,
# no libcowbackup.so / .a: those are the C library's, capi/), and the crate docs' host write
# path must compile with `?` both ways and run. Prints the time of that first build.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/cowbackup-rust-user.XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"
cargo new -q --vcs none app
cd app
printf 'cowbackup = { path = "%s" }\n' "$root" >>Cargo.toml
cat >src/main.rs <<'RS'
use std::sync::Arc;

use cowbackup::*;

fn host_write(job: &Job, disk: &MemDriver, data: &[u8], offset: u64) -> std::io::Result<()> {
    job.cow_before_write(offset, data.len() as u64)?;
    disk.write_at(data, offset)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let disk = Arc::new(MemDriver::from_bytes(&[0x11; 1 << 20])?);
    let backup = Arc::new(MemDriver::new(1 << 20)?);
    let job = Arc::new(backup_start(disk.clone(), backup.clone(), BackupOptions::default())?);
    let j = job.clone();
    let d = disk.clone();
    std::thread::spawn(move || host_write(&j, &d, &[0x22; 4096], 8192)).join().expect("writer")?;
    job.wait()?;
    assert_eq!(backup.to_vec(), vec![0x11; 1 << 20]);
    println!("backup ok");
    Ok(())
}
RS
start=$(date +%s)
CARGO_TARGET_DIR="$work/target" cargo build -q
echo "rust-user: first build of a fresh project took $(($(date +%s) - start)) s"
CARGO_TARGET_DIR="$work/target" cargo run -q | grep -qx "backup ok"
if CARGO_TARGET_DIR="$work/target" cargo tree -q --prefix none | grep -q '^cbindgen'; then
    echo "rust-user: FAILED: a Rust user builds cbindgen" >&2; exit 1
fi
if find "$work/target" -name 'libcowbackup*.so' -o -name 'libcowbackup*.a' | grep -q .; then
    echo "rust-user: FAILED: a Rust user builds the C library" >&2; exit 1
fi
echo "rust-user: ok (rlib only, the docs' write path compiles and runs)"
