//! What the subcommands share: errors with their exit status, sizes with suffixes,
//! opening sources and targets, signals, JSON output.

use std::fmt;
use std::io::{self, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::sync::Arc;

use cowbackup::{BlockDriver, FileDriver, NbdDriver, NbdOptions, OpenFlags};

/// A failure of the command: `Usage` exits 2 (as clap's own errors), `Failed` exits 1.
#[derive(Debug)]
pub enum CliError {
    /// The command line asks for something impossible (checked before anything is done).
    Usage(String),
    /// The work was tried and failed.
    Failed(String),
}

impl CliError {
    /// The exit status: 2 for usage errors, 1 for failures.
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Usage(_) => 2,
            CliError::Failed(_) => 1,
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // One line: messages of nested errors may carry newlines.
        let msg = match self {
            CliError::Usage(m) | CliError::Failed(m) => m,
        };
        f.write_str(&msg.replace('\n', "; "))
    }
}

/// The command's result type.
pub type CliResult<T> = Result<T, CliError>;

/// A failure with a message.
pub fn failed(msg: impl Into<String>) -> CliError {
    CliError::Failed(msg.into())
}

/// A usage error with a message.
pub fn usage(msg: impl Into<String>) -> CliError {
    CliError::Usage(msg.into())
}

/// Parse a byte count: digits with an optional binary suffix `K`, `M`, `G`, `T`, `P`, `E`
/// (also `k`, `KiB`, `KB`, `B`): `64K` = 65536, `1M` = 1048576.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    if num.is_empty() {
        return Err(format!("{s:?} is not a size (expected digits with an optional K, M, G, T suffix)"));
    }
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is too large"))?;
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        "e" | "eb" | "eib" => 60,
        _ => return Err(format!("{s:?}: unknown size suffix {suffix:?} (use K, M, G, T)")),
    };
    n.checked_mul(1u64 << shift).ok_or_else(|| format!("{s:?} is too large"))
}

/// True for the NBD URI schemes the library's client speaks.
pub fn is_nbd_uri(s: &str) -> bool {
    ["nbd://", "nbd+unix://", "nbds://", "nbds+unix://", "nbd+tcp://", "nbds+tcp://"].iter().any(|p| s.starts_with(p))
}

/// The RBD image `spec` (`rbd:POOL/IMAGE[@SNAP][:id=NAME]`), with librados's default conf
/// search (`$CEPH_CONF`, `/etc/ceph/ceph.conf`, ...); `what` names it in errors.
#[cfg(feature = "rbd")]
pub fn open_rbd(what: &str, spec: &str, write: bool) -> CliResult<Arc<dyn BlockDriver>> {
    Ok(Arc::new(cowbackup::RbdDriver::open(spec, None, write).map_err(|e| failed(format!("{what} {spec}: {e}")))?))
}

#[cfg(not(feature = "rbd"))]
pub fn open_rbd(what: &str, spec: &str, _write: bool) -> CliResult<Arc<dyn BlockDriver>> {
    Err(failed(format!(
        "{what} {spec}: this cowbackup was built without RBD support (cargo build --features rbd, needs librbd-dev)"
    )))
}

/// Open a source: an NBD URI (read-only connection), an RBD image `rbd:POOL/IMAGE` (built
/// with the feature `rbd`), or an image file / block device (read-only).
pub fn open_source(src: &str, direct: bool) -> CliResult<Arc<dyn BlockDriver>> {
    if is_nbd_uri(src) {
        let opts = NbdOptions { write: false, ..NbdOptions::default() };
        let d = NbdDriver::connect_with(src, &opts).map_err(|e| failed(format!("source {src}: {e}")))?;
        return Ok(Arc::new(d));
    }
    if src.starts_with("rbd:") {
        return open_rbd("source", src, false);
    }
    let flags = if direct { OpenFlags::DIRECT } else { OpenFlags::empty() };
    let d = FileDriver::open(src, flags).map_err(|e| failed(format!("source: {e}")))?;
    Ok(Arc::new(d))
}

/// What kind of target `open_target` opened (for the summary and for cleanup).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    /// A file this command created (new, or replaced with `--overwrite`).
    NewFile,
    /// An existing block device.
    BlockDevice,
    /// An NBD export.
    Nbd,
    /// An existing RBD image.
    Rbd,
}

impl TargetKind {
    /// Name in the JSON summary.
    pub fn name(self) -> &'static str {
        match self {
            TargetKind::NewFile => "file",
            TargetKind::BlockDevice => "block-device",
            TargetKind::Nbd => "nbd",
            TargetKind::Rbd => "rbd",
        }
    }
}

/// Open a target of `size` bytes: an NBD URI (writable export), an existing RBD image
/// `rbd:POOL/IMAGE` of that size (feature `rbd`), an existing block device, or a new sparse
/// file. An existing file is never replaced unless `overwrite`.
pub fn open_target(
    dst: &str,
    size: u64,
    overwrite: bool,
    direct: bool,
) -> CliResult<(Arc<dyn BlockDriver>, TargetKind)> {
    if is_nbd_uri(dst) {
        let d = NbdDriver::connect(dst).map_err(|e| failed(format!("target {dst}: {e}")))?;
        if d.is_read_only() {
            return Err(failed(format!("target {dst}: the NBD export is read-only")));
        }
        return Ok((Arc::new(d), TargetKind::Nbd));
    }
    if dst.starts_with("rbd:") {
        let d = open_rbd("target", dst, true)?;
        if d.size() != size {
            return Err(failed(format!(
                "target {dst}: the RBD image has {} bytes, the source {size}: they must be equal (rbd resize)",
                d.size()
            )));
        }
        return Ok((d, TargetKind::Rbd));
    }
    let path = Path::new(dst);
    let direct_flag = if direct { OpenFlags::DIRECT } else { OpenFlags::empty() };
    match std::fs::metadata(path) {
        Ok(m) if m.file_type().is_block_device() => {
            let d =
                FileDriver::open(path, OpenFlags::WRITE | direct_flag).map_err(|e| failed(format!("target: {e}")))?;
            if d.size() != size {
                return Err(failed(format!(
                    "target {dst}: the block device has {} bytes, the source {size}: they must be equal",
                    d.size()
                )));
            }
            Ok((Arc::new(d), TargetKind::BlockDevice))
        }
        Ok(m) if m.file_type().is_file() && !overwrite => {
            Err(failed(format!("target {dst} exists; pass --overwrite to replace it")))
        }
        _ => {
            let mut flags = OpenFlags::WRITE | direct_flag;
            if overwrite {
                flags |= OpenFlags::OVERWRITE;
            }
            let d = FileDriver::create_with(path, size, flags).map_err(|e| failed(format!("target: {e}")))?;
            Ok((Arc::new(d), TargetKind::NewFile))
        }
    }
}

/// Block SIGINT and SIGTERM in the calling thread (and every thread it starts from now
/// on), so that `wait_signal` receives them. Call first thing in `main`.
pub fn block_signals() {
    // SAFETY: sigset_t is plain data initialised by sigemptyset before use; the pointers
    // are to locals that outlive the calls.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Wait for SIGINT or SIGTERM (blocked by `block_signals`); returns the signal number.
pub fn wait_signal() -> i32 {
    // SAFETY: as in block_signals; sigwait writes the signal number into `sig`.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        let mut sig: libc::c_int = 0;
        loop {
            if libc::sigwait(&set, &mut sig) == 0 {
                return sig;
            }
        }
    }
}

/// The name of a signal number from `wait_signal`.
pub fn signal_name(sig: i32) -> &'static str {
    if sig == libc::SIGINT {
        "SIGINT"
    } else {
        "SIGTERM"
    }
}

/// Print a JSON value on stdout (pretty, one document) and flush.
pub fn print_json(v: &serde_json::Value) -> CliResult<()> {
    let mut out = io::stdout().lock();
    let text = serde_json::to_string_pretty(v).map_err(|e| failed(format!("JSON output: {e}")))?;
    writeln!(out, "{text}").and_then(|_| out.flush()).map_err(|e| failed(format!("writing to stdout: {e}")))
}

/// A uuid as the usual 8-4-4-4-12 hex text.
pub fn uuid_text(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert!(parse_size("").is_err());
        assert!(parse_size("K").is_err());
        assert!(parse_size("1X").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("16E").is_err());
        assert!(parse_size("99999999999999999999").is_err());
    }

    #[test]
    fn uuids() {
        let u = [0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0, 1, 2, 3, 4, 5, 6, 7];
        assert_eq!(uuid_text(&u), "01234567-89ab-cdef-0001-020304050607");
    }
}
