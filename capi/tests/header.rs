//! The committed C header must be exactly what cbindgen generates from src/ffi, and its
//! version macros must agree with Cargo.toml and `cowbackup_version()`.
use std::ffi::CStr;
use std::path::Path;

const REFRESH: &str = "scripts/update-header.sh";

fn committed() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../include/cowbackup.h");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}; run {REFRESH}", path.display()))
}

#[test]
fn committed_header_matches_generated() {
    let generated_path = env!("COWBACKUP_GENERATED_HEADER");
    let generated = std::fs::read_to_string(generated_path).expect("build.rs generates the header");
    let committed = committed();
    if generated != committed {
        let line = generated
            .lines()
            .zip(committed.lines())
            .position(|(a, b)| a != b)
            .map_or_else(|| generated.lines().count().min(committed.lines().count()) + 1, |n| n + 1);
        panic!(
            "include/cowbackup.h is out of date with src/ffi (first difference at line {line}; generated: {generated_path}).\n\
             Refresh it with:\n\n    {REFRESH}\n"
        );
    }
}

fn macro_value(header: &str, name: &str) -> String {
    header
        .lines()
        .find_map(|l| l.strip_prefix(&format!("#define {name} ")))
        .unwrap_or_else(|| panic!("{name} is not defined in include/cowbackup.h"))
        .trim()
        .to_string()
}

#[test]
fn version_macros_match_cargo_and_cowbackup_version() {
    let header = committed();
    let macros = ["MAJOR", "MINOR", "PATCH"].map(|p| macro_value(&header, &format!("COWBACKUP_VERSION_{p}")));
    assert_eq!(
        macros,
        [env!("CARGO_PKG_VERSION_MAJOR"), env!("CARGO_PKG_VERSION_MINOR"), env!("CARGO_PKG_VERSION_PATCH")]
    );
    // SAFETY: cowbackup_version returns a static NUL-terminated string.
    let v = unsafe { CStr::from_ptr(cowbackup_core::ffi::cowbackup_version()) }.to_str().unwrap();
    assert_eq!(v, env!("CARGO_PKG_VERSION"));
    assert_eq!(v, macros.join("."));
}
