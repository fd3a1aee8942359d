//! Generates the C header `cowbackup.h` from the library's `src/ffi` with cbindgen, into
//! `OUT_DIR` only (never into the source tree). `capi/tests/header.rs` compares it with the
//! committed `include/cowbackup.h`; `scripts/update-header.sh` refreshes that copy.

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=../src/ffi");
    println!("cargo:rerun-if-changed=cbindgen.toml");

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let header = out_dir.join("cowbackup.h");
    // Integration tests find the generated header through this variable.
    println!("cargo:rustc-env=COWBACKUP_GENERATED_HEADER={}", header.display());

    let capi = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = capi.parent().expect("capi/ lives in the repository").to_path_buf();
    let mut config = cbindgen::Config::from_file(capi.join("cbindgen.toml")).expect("capi/cbindgen.toml is valid");
    // The version macros come from Cargo.toml, the one place the version is written.
    let version = |name: &str| env::var(name).unwrap_or_else(|_| panic!("cargo sets {name}"));
    config.after_includes = Some(format!(
        "\n/** The version of the header: the cowbackup release it came with (compare cowbackup_version()). */\n\
         #define COWBACKUP_VERSION_MAJOR {}\n#define COWBACKUP_VERSION_MINOR {}\n#define COWBACKUP_VERSION_PATCH {}",
        version("CARGO_PKG_VERSION_MAJOR"),
        version("CARGO_PKG_VERSION_MINOR"),
        version("CARGO_PKG_VERSION_PATCH"),
    ));
    // Only the C ABI module: the Rust core's public constants are not part of the header.
    cbindgen::Builder::new()
        .with_config(config)
        .with_src(root.join("src/ffi/mod.rs"))
        .generate()
        .expect("cbindgen could not generate the header from src/ffi")
        .write_to_file(&header);
}
