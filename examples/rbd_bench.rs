//! Bench: a full backup into Ceph RBD, side by side in one run, on one throw-away cluster
//! (scripts/ceph-up.sh: one mon, one mgr, one memstore OSD on 127.0.0.1):
//!
//! - `rbd import` of the source file (Ceph's own tool, the reference);
//! - cowbackup's job into the native driver (`RbdDriver`, librbd);
//! - cowbackup's job into qemu-nbd's `rbd:` export through `NbdDriver` (when QEMU's rbd module,
//!   qemu-block-extra, is installed: scripts/qemu-rbd-deps.sh);
//! - `qemu-img convert -n` into `rbd:` (same condition).
//!
//! Each time includes connecting and closing. The source is a raw file: random data with a
//! zero quarter (every method skips zeroes into a new image). The native result is read back
//! and compared. Run: `cargo run --release --features rbd --example rbd_bench -- [--size MIB]
//! [--rounds N]` (as root, with the Ceph packages: scripts/deps.sh). Numbers on a shared,
//! loaded machine are noisy: rounds alternate the methods.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cowbackup::{backup_start, BackupOptions, BlockDriver, FileDriver, NbdDriver, NbdOptions, OpenFlags, RbdDriver};

const M: u64 = 1 << 20;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Cluster {
    dir: PathBuf,
    conf: PathBuf,
    root: PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(self.root.join("scripts/ceph-down.sh")).env("CEPH_DIR", &self.dir).status();
    }
}

impl Cluster {
    fn rbd(&self, args: &[&str]) -> Result<(), String> {
        let st = Command::new("rbd").arg("-c").arg(&self.conf).args(args).status().map_err(|e| e.to_string())?;
        if st.success() {
            Ok(())
        } else {
            Err(format!("rbd {args:?} failed: {st}"))
        }
    }
}

/// qemu-nbd serving `rbd:rbd/IMAGE` on 127.0.0.1; killed (by its pid) on drop.
struct QemuNbd(Child);

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn qemu_rbd_available() -> bool {
    Command::new("qemu-img")
        .arg("--help")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(" rbd"))
        .unwrap_or(false)
}

fn secs(f: impl FnOnce() -> Result<(), String>) -> Result<f64, String> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed().as_secs_f64())
}

/// A backup job from the file `src` into `target`; `tuned`: 4 workers and 16 MiB chunks (four
/// 4 MiB RBD objects per request, which librbd writes in parallel), else the defaults.
fn job(src: &Path, target: Arc<dyn BlockDriver>, tuned: bool) -> Result<(), String> {
    let source = Arc::new(FileDriver::open(src, OpenFlags::empty()).map_err(|e| e.to_string())?);
    let opts = if tuned {
        BackupOptions { workers: 4, max_chunk: 16 * M, ..Default::default() }
    } else {
        BackupOptions::default()
    };
    let j = backup_start(source, target, opts).map_err(|e| e.to_string())?;
    j.wait().map_err(|e| e.to_string())
}

fn run() -> Result<(), String> {
    let mut size_mib = 512u64;
    let mut rounds = 2usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--size" => size_mib = val()?.parse().map_err(|e| format!("--size: {e}"))?,
            "--rounds" => rounds = val()?.parse().map_err(|e| format!("--rounds: {e}"))?,
            _ => return Err(format!("usage: rbd_bench [--size MIB] [--rounds N] (unknown {a})")),
        }
    }
    let size = size_mib * M;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::Builder::new().prefix("cowbackup-rbd-bench-").tempdir().map_err(|e| e.to_string())?;
    let src = tmp.path().join("src.img");
    {
        let f = FileDriver::create(&src, size).map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; (4 * M) as usize];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for off in (0..size).step_by(buf.len()) {
            if (off / (4 * M)) % 4 == 3 {
                continue; // a zero quarter, left as holes
            }
            for w in buf.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
            }
            let n = (size - off).min(buf.len() as u64) as usize;
            f.write_at(&buf[..n], off).map_err(|e| e.to_string())?;
        }
        f.flush().map_err(|e| e.to_string())?;
    }
    let dir = tmp.path().join("ceph");
    let out = Command::new(root.join("scripts/ceph-up.sh"))
        .env("CEPH_DIR", &dir)
        .env("MON_PORT", free_port().to_string())
        .env("MON_PORT2", free_port().to_string())
        .env("IMAGE", "")
        .env("OSD_BYTES", ((size * (4 * rounds as u64 + 2)).max(4 << 30)).to_string())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| e.to_string())?;
    let c = Cluster { conf: dir.join("ceph.conf"), dir, root };
    if out.status.code() == Some(77) {
        eprintln!("rbd_bench: SKIPPED: the Ceph packages are missing (scripts/deps.sh)");
        return Ok(());
    }
    if !out.status.success() {
        return Err("ceph-up.sh failed".into());
    }
    let qemu = qemu_rbd_available();
    if !qemu {
        eprintln!("rbd_bench: qemu's rbd module is not installed (scripts/qemu-rbd-deps.sh): no NBD / qemu-img rows");
    }
    let sz = format!("{}K", size / 1024);
    let conf = c.conf.display().to_string();
    let mut rows: Vec<(&str, Vec<f64>)> = vec![
        ("rbd import", vec![]),
        ("cowbackup RbdDriver, default options", vec![]),
        ("cowbackup RbdDriver, 4 workers 16M chunks", vec![]),
        ("cowbackup NbdDriver -> qemu-nbd, 4w 16M", vec![]),
        ("qemu-img convert -n -W -> rbd:", vec![]),
    ];
    for r in 0..rounds {
        let t = secs(|| c.rbd(&["import", "--no-progress", src.to_str().unwrap(), &format!("rbd/imp{r}")]))?;
        rows[0].1.push(t);

        for (row, tuned) in [(1, false), (2, true)] {
            c.rbd(&["create", "--size", &sz, &format!("rbd/native{row}-{r}")])?;
            let spec = format!("rbd:rbd/native{row}-{r}");
            let t = secs(|| {
                let d = Arc::new(RbdDriver::open(&spec, Some(&c.conf), true).map_err(|e| e.to_string())?);
                job(&src, d, tuned)
            })?;
            rows[row].1.push(t);
        }
        let spec = format!("rbd:rbd/native1-{r}");
        if r == 0 {
            let d = RbdDriver::open(&spec, Some(&c.conf), false).map_err(|e| e.to_string())?;
            let s = FileDriver::open(&src, OpenFlags::empty()).map_err(|e| e.to_string())?;
            let (mut a, mut b) = (vec![0u8; (4 * M) as usize], vec![0u8; (4 * M) as usize]);
            for off in (0..size).step_by(a.len()) {
                let n = (size - off).min(a.len() as u64) as usize;
                d.read_at(&mut a[..n], off).map_err(|e| e.to_string())?;
                s.read_at(&mut b[..n], off).map_err(|e| e.to_string())?;
                if a[..n] != b[..n] {
                    return Err(format!("the native backup differs from the source near offset {off}"));
                }
            }
            eprintln!("rbd_bench: native backup read back from the cluster: identical to the source");
        }

        if qemu {
            c.rbd(&["create", "--size", &sz, &format!("rbd/nbd{r}")])?;
            let port = free_port();
            let child = Command::new("qemu-nbd")
                .args(["-f", "raw", "--cache=none", "--discard=unmap", "-b", "127.0.0.1", "-e", "4"])
                .args(["-p", &port.to_string()])
                .arg(format!("rbd:rbd/nbd{r}:conf={conf}:id=admin"))
                .spawn()
                .map_err(|e| e.to_string())?;
            let _nbd = QemuNbd(child);
            let t0 = Instant::now();
            while TcpStream::connect(("127.0.0.1", port)).is_err() {
                if t0.elapsed() > Duration::from_secs(60) {
                    return Err("qemu-nbd did not listen within 60 s".into());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let uri = format!("nbd://127.0.0.1:{port}");
            let t = secs(|| {
                let d = Arc::new(
                    NbdDriver::connect_with(&uri, &NbdOptions { write: true, ..Default::default() })
                        .map_err(|e| e.to_string())?,
                );
                job(&src, d, true)
            })?;
            rows[3].1.push(t);

            c.rbd(&["create", "--size", &sz, &format!("rbd/qimg{r}")])?;
            let t = secs(|| {
                let st = Command::new("qemu-img")
                    .args(["convert", "-n", "-W", "-f", "raw", "-O", "raw"])
                    .arg(&src)
                    .arg(format!("rbd:rbd/qimg{r}:conf={conf}:id=admin"))
                    .status()
                    .map_err(|e| e.to_string())?;
                if st.success() {
                    Ok(())
                } else {
                    Err(format!("qemu-img convert failed: {st}"))
                }
            })?;
            rows[4].1.push(t);
        }
        // Free the OSD's memory for the next round.
        for img in ["imp", "native1-", "native2-", "nbd", "qimg"] {
            let _ = Command::new("rbd")
                .arg("-c")
                .arg(&c.conf)
                .args(["rm", "--no-progress", &format!("rbd/{img}{r}")])
                .stderr(Stdio::null())
                .status();
        }
    }
    let best = |v: &[f64]| v.iter().cloned().fold(f64::INFINITY, f64::min);
    let import = best(&rows[0].1);
    println!("\nfull backup of a {size_mib} MiB raw file (a quarter zeroes) into a new RBD image, best of {rounds}:");
    println!("{:<40} {:>9} {:>10} {:>14}  all runs (s)", "method", "seconds", "MiB/s", "vs rbd import");
    for (name, v) in &rows {
        if v.is_empty() {
            println!("{name:<40} {:>9}", "skipped");
            continue;
        }
        let b = best(v);
        let all: Vec<String> = v.iter().map(|x| format!("{x:.2}")).collect();
        println!("{name:<40} {b:>9.2} {:>10.0} {:>13.2}x  {}", size_mib as f64 / b, import / b, all.join(" "));
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rbd_bench: {e}");
            ExitCode::FAILURE
        }
    }
}
