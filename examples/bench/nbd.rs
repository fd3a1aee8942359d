//! NBD scenarios: a backup through the NBD client driver into `qemu-nbd` next to
//! `qemu-img convert` into the same `qemu-nbd` export.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cowbackup::{backup_start, BackupOptions, BlockDriver, FileDriver, JobState, NbdDriver, OpenFlags};

use crate::util::*;
use crate::Args;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// True when `tool --version` runs.
fn have(tool: &str) -> bool {
    // `openssl version` (it has no --version).
    let arg = if tool == "openssl" { "version" } else { "--version" };
    Command::new(tool).arg(arg).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// A server process on a Unix socket, stopped (SIGTERM, then SIGKILL) and reaped on drop.
pub struct Proc {
    child: Option<Child>,
    pub socket: PathBuf,
}

impl Proc {
    /// Spawn `cmd` and wait (at most 30 s) until `socket` accepts connections.
    pub fn start(mut cmd: Command, socket: &Path) -> Result<Proc, String> {
        let _ = std::fs::remove_file(socket);
        let child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().map_err(err)?;
        let mut p = Proc { child: Some(child), socket: socket.to_path_buf() };
        let t = Instant::now();
        while !(socket.exists() && std::os::unix::net::UnixStream::connect(socket).is_ok()) {
            if let Ok(Some(st)) = p.child.as_mut().expect("child until drop").try_wait() {
                return Err(format!("{cmd:?} exited: {st}"));
            }
            if t.elapsed() > Duration::from_secs(30) {
                return Err(format!("{cmd:?} did not listen within 30 s"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(p)
    }

    /// `qemu-nbd --persistent --shared=4` serving the raw file `image`.
    pub fn qemu_nbd(image: &Path, socket: &Path, read_only: bool) -> Result<Proc, String> {
        let mut cmd = Command::new("qemu-nbd");
        cmd.args(["-f", "raw", "--persistent", "--shared=4", "-k"]).arg(socket);
        if read_only {
            cmd.arg("-r");
        }
        cmd.arg(image);
        Proc::start(cmd, socket)
    }

    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child, not yet reaped.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let t = Instant::now();
            while c.try_wait().ok().flatten().is_none() {
                if t.elapsed() > Duration::from_secs(10) {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// One backup of `src` through the NBD client into the export at `uri` with `workers`
/// workers (otherwise the default options); seconds.
fn backup_into_nbd(src: &Path, uri: &str, workers: usize) -> Result<f64, String> {
    let t = Instant::now();
    let source = Arc::new(FileDriver::open(src, OpenFlags::empty()).map_err(err)?);
    let target = Arc::new(NbdDriver::connect(uri).map_err(err)?);
    if target.size() != source.size() {
        return Err(format!("export size {} != source size {}", target.size(), source.size()));
    }
    let job = backup_start(source, target, BackupOptions { workers, ..Default::default() }).map_err(err)?;
    job.wait().map_err(err)?;
    if job.info().state != JobState::Completed {
        return Err(format!("job ended {:?}", job.info().state));
    }
    Ok(t.elapsed().as_secs_f64())
}

/// `qemu-img convert -n` of `src` into the export at `uri`; seconds.
fn convert_into_nbd(src: &Path, uri: &str) -> Result<f64, String> {
    let t = Instant::now();
    let out = Command::new("qemu-img")
        .args(["convert", "-n", "-m", "8", "-W", "-f", "raw", "-O", "raw"])
        .arg(src)
        .arg(uri)
        .output()
        .map_err(err)?;
    if !out.status.success() {
        return Err(format!("qemu-img convert failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(t.elapsed().as_secs_f64())
}

/// A backup through the client driver (default options, and 4 workers: one connection
/// each) into `qemu-nbd` serving a new sparse raw file, next to `qemu-img convert -n -m 8 -W` into a `qemu-nbd` serving a new sparse raw file the same
/// way, runs interleaved, on tmpfs and (unless `--no-disk`) the disk directory. Random data
/// (no zero clusters to skip: both write everything). Each cowbackup target is checked
/// against the source byte for byte.
pub fn client(a: &Args, rows: &mut Vec<Row>) -> Result<(), String> {
    if !have("qemu-nbd") || !have("qemu-img") {
        return Err("qemu-nbd and qemu-img are needed".into());
    }
    let mut dirs = vec![("tmpfs", a.shm_dir.clone())];
    if a.disk {
        dirs.push(("disk", a.disk_dir.clone()));
    }
    for (where_, dir) in dirs {
        std::fs::create_dir_all(&dir).map_err(err)?;
        let src = dir.join("bench-nbd-src.img");
        let dst = dir.join("bench-nbd-dst.img");
        let sock = dir.join("bench-nbd.sock");
        eprint!("nbd-client ({where_}): {} random ", fmt_bytes(a.size));
        make_image(&src, a.size, Data::Random).map_err(err)?;
        let (mut cow, mut cow4, mut qemu) = (vec![], vec![], vec![]);
        let mut res = Ok(());
        for _ in 0..a.runs {
            // workers 0: qemu-img convert.
            let one = |workers: usize| -> Result<f64, String> {
                let _ = std::fs::remove_file(&dst);
                create_new(&dst, a.size).map_err(err)?;
                let server = Proc::qemu_nbd(&dst, &sock, false)?;
                let secs = if workers > 0 {
                    backup_into_nbd(&src, &server.uri(), workers)?
                } else {
                    convert_into_nbd(&src, &server.uri())?
                };
                drop(server);
                if workers > 0 {
                    if let Some(at) = first_difference(&src, &dst).map_err(err)? {
                        return Err(format!("VERIFY FAILED: the NBD backup differs at {at}"));
                    }
                }
                Ok(secs)
            };
            let default_workers = BackupOptions::default().workers;
            res = one(default_workers)
                .map(|s| cow.push(s))
                .and_then(|_| one(0).map(|s| qemu.push(s)))
                .and_then(|_| one(4).map(|s| cow4.push(s)));
            if res.is_err() {
                break;
            }
            eprint!(".");
        }
        eprintln!();
        for p in [&src, &dst, &sock] {
            let _ = std::fs::remove_file(p);
        }
        res?;
        let (c, c4, q) = (summary(&cow), summary(&cow4), summary(&qemu));
        for (s, label) in [(c, "defaults (2 workers)"), (c4, "4 workers")] {
            let ratio = q.median / s.median;
            rows.push(Row {
                scenario: format!(
                    "NBD client ({where_}): {} random into qemu-nbd (raw, --shared=4), new sparse file",
                    fmt_bytes(a.size)
                ),
                cowbackup: format!("{}, {label}", fmt_rate(a.size, s)),
                baseline: format!("qemu-img convert -n -m 8 -W into the same kind of export: {}", fmt_secs(q)),
                ratio: format!("{ratio:.2}×"),
                target: check(ratio >= 1.0, "≥ 1.0×"),
            });
        }
    }
    Ok(())
}

/// `nbdcopy URI dst` (dst: an existing sparse file of the export's size); seconds.
fn nbdcopy(uri: &str, dst: &Path, size: u64) -> Result<f64, String> {
    let _ = std::fs::remove_file(dst);
    create_new(dst, size).map_err(err)?;
    let t = Instant::now();
    let out = Command::new("nbdcopy").arg(uri).arg(dst).output().map_err(err)?;
    if !out.status.success() {
        return Err(format!("nbdcopy {uri} failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(t.elapsed().as_secs_f64())
}

/// `nbdcopy` from cowbackup's `nbd::Server` exporting a quiet raw file (read-only, a
/// `FileDriver`) next to `nbdcopy` from `qemu-nbd -r --shared=4` exporting the same file,
/// runs interleaved, into a new sparse file on the same filesystem; tmpfs and (unless
/// `--no-disk`) the disk directory, with the page cache dropped before each disk run.
/// Each copy is checked against the source byte for byte.
pub fn server(a: &Args, rows: &mut Vec<Row>) -> Result<(), String> {
    if !have("qemu-nbd") || !have("nbdcopy") {
        return Err("qemu-nbd and nbdcopy are needed".into());
    }
    let mut dirs = vec![("tmpfs", a.shm_dir.clone())];
    if a.disk {
        dirs.push(("disk", a.disk_dir.clone()));
    }
    for (where_, dir) in dirs {
        std::fs::create_dir_all(&dir).map_err(err)?;
        let src = dir.join("bench-nbds-src.img");
        let dst = dir.join("bench-nbds-dst.img");
        let (ours_sock, qemu_sock) = (dir.join("bench-nbds-ours.sock"), dir.join("bench-nbds-qemu.sock"));
        eprint!("nbd-server ({where_}): {} random ", fmt_bytes(a.size));
        make_image(&src, a.size, Data::Random).map_err(err)?;
        let cold = || if where_ == "disk" { drop_caches() } else { true };
        let (mut ours, mut qemu) = (vec![], vec![]);
        let mut run = || -> Result<(), String> {
            let server = cowbackup::nbd::Server::start(&format!("unix:{}", ours_sock.display())).map_err(err)?;
            server.add("", Arc::new(FileDriver::open(&src, OpenFlags::empty()).map_err(err)?), false).map_err(err)?;
            let q = Proc::qemu_nbd(&src, &qemu_sock, true)?;
            let ours_uri = format!("nbd+unix:///?socket={}", ours_sock.display());
            for _ in 0..a.runs {
                cold();
                ours.push(nbdcopy(&ours_uri, &dst, a.size)?);
                if let Some(at) = first_difference(&src, &dst).map_err(err)? {
                    return Err(format!("VERIFY FAILED: nbdcopy from our server differs at {at}"));
                }
                cold();
                qemu.push(nbdcopy(&q.uri(), &dst, a.size)?);
                eprint!(".");
            }
            server.stop();
            Ok(())
        };
        let res = run();
        eprintln!();
        for p in [&src, &dst, &ours_sock, &qemu_sock] {
            let _ = std::fs::remove_file(p);
        }
        res?;
        let (o, q) = (summary(&ours), summary(&qemu));
        let ratio = q.median / o.median;
        rows.push(Row {
            scenario: format!("NBD server ({where_}): nbdcopy of a quiet {} random raw file", fmt_bytes(a.size)),
            cowbackup: format!("nbd::Server: {}", fmt_rate(a.size, o)),
            baseline: format!("qemu-nbd -r --shared=4, same file: {}", fmt_rate(a.size, q)),
            ratio: format!("{ratio:.2}×"),
            target: check(ratio >= 1.0, "≥ 1.0×"),
        });
    }
    Ok(())
}

/// Make a throwaway PKI in `dir` with openssl: `server/` (ca-cert, server-cert, server-key,
/// the layout of qemu's tls-creds-x509) and `client/` (ca-cert only, for
/// `tls-certificates=`). The server certificate names `localhost`.
fn make_pki(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir.join("server")).map_err(err)?;
    std::fs::create_dir_all(dir.join("client")).map_err(err)?;
    let ossl = |args: &[&str]| -> Result<(), String> {
        let out = Command::new("openssl").args(args).current_dir(dir).output().map_err(err)?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr)))
        }
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    let mut a = vec!["req", "-x509"];
    a.extend(ec);
    a.extend(["-keyout", "ca-key.pem", "-out", "client/ca-cert.pem", "-days", "2", "-subj", "/CN=bench CA"]);
    a.extend(["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
    ossl(&a)?;
    std::fs::copy(dir.join("client/ca-cert.pem"), dir.join("server/ca-cert.pem")).map_err(err)?;
    std::fs::write(dir.join("server.ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
        .map_err(err)?;
    let mut a = vec!["req"];
    a.extend(ec);
    a.extend(["-keyout", "server/server-key.pem", "-out", "server.csr", "-subj", "/CN=localhost"]);
    ossl(&a)?;
    ossl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "client/ca-cert.pem",
        "-CAkey",
        "ca-key.pem",
        "-CAcreateserial",
        "-out",
        "server/server-cert.pem",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    ])
}

/// `--only tls`: nbdcopy reading a quiet random raw file (tmpfs) from cowbackup's
/// `nbd::Server` in plaintext and over TLS (`nbds+unix://…?tls-certificates=`), and from
/// `qemu-nbd -r` in plaintext and with `--tls-creds`, runs interleaved; each copy checked.
/// Target: ours over TLS ≥ 0.8× ours in plaintext.
pub fn tls(a: &Args, rows: &mut Vec<Row>) -> Result<(), String> {
    for tool in ["qemu-nbd", "nbdcopy", "openssl"] {
        if !have(tool) {
            return Err(format!("{tool} is needed"));
        }
    }
    let dir = a.shm_dir.join("bench-tls");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(err)?;
    let res = (|| -> Result<(), String> {
        make_pki(&dir)?;
        let src = dir.join("src.img");
        let dst = dir.join("dst.img");
        eprint!("tls: {} random ", fmt_bytes(a.size));
        make_image(&src, a.size, Data::Random).map_err(err)?;
        let ca = |f: &str| dir.join("server").join(f);
        let server_tls = cowbackup::nbd::ServerTls::from_pem_files(&ca("server-cert.pem"), &ca("server-key.pem"), None)
            .map_err(err)?;
        let opts = cowbackup::nbd::ServerOptions { tls: Some(server_tls), ..Default::default() };
        let plain_sock = dir.join("ours-plain.sock");
        let tls_sock = dir.join("ours-tls.sock");
        let plain = cowbackup::nbd::Server::start(&format!("unix:{}", plain_sock.display())).map_err(err)?;
        let tls = cowbackup::nbd::Server::start_with(&format!("unix:{}", tls_sock.display()), opts).map_err(err)?;
        for s in [&plain, &tls] {
            s.add("", Arc::new(FileDriver::open(&src, OpenFlags::empty()).map_err(err)?), false).map_err(err)?;
        }
        let q_plain = Proc::qemu_nbd(&src, &dir.join("q-plain.sock"), true)?;
        let q_tls_sock = dir.join("q-tls.sock");
        let mut cmd = Command::new("qemu-nbd");
        cmd.arg("--object")
            .arg(format!("tls-creds-x509,id=tls0,endpoint=server,dir={},verify-peer=no", dir.join("server").display()))
            .args(["--tls-creds", "tls0", "-f", "raw", "--persistent", "--shared=4", "-r", "-k"])
            .arg(&q_tls_sock)
            .arg(&src);
        let q_tls = Proc::start(cmd, &q_tls_sock)?;
        let certs = dir.join("client");
        let tls_uri =
            |sock: &Path| format!("nbds+unix:///?socket={}&tls-certificates={}", sock.display(), certs.display());
        let uris = [
            format!("nbd+unix:///?socket={}", plain_sock.display()),
            tls_uri(&tls_sock),
            q_plain.uri(),
            tls_uri(&q_tls_sock),
        ];
        let mut times: [Vec<f64>; 4] = Default::default();
        // CPU seconds of our two modes: the client (nbdcopy, a child reaped in the copy)
        // and the server (this process: its connection threads; nothing else runs here
        // meanwhile).
        let mut cpu: [Vec<(f64, f64)>; 2] = Default::default();
        for _ in 0..a.runs {
            for (i, uri) in uris.iter().enumerate() {
                let before = (cpu_secs(&rusage(libc::RUSAGE_CHILDREN)), cpu_secs(&rusage(libc::RUSAGE_SELF)));
                times[i].push(nbdcopy(uri, &dst, a.size)?);
                if i < 2 {
                    let c = cpu_secs(&rusage(libc::RUSAGE_CHILDREN)) - before.0;
                    cpu[i].push((c, cpu_secs(&rusage(libc::RUSAGE_SELF)) - before.1));
                }
                if let Some(at) = first_difference(&src, &dst).map_err(err)? {
                    return Err(format!("VERIFY FAILED: nbdcopy from {uri} differs at {at}"));
                }
            }
            eprint!(".");
        }
        eprintln!();
        plain.stop();
        tls.stop();
        drop((q_plain, q_tls));
        let s: Vec<_> = times.iter().map(|t| summary(t)).collect();
        let ours = s[0].median / s[1].median;
        let qemu = s[2].median / s[3].median;
        // Medians of the client's and the server's CPU seconds per mode.
        let med = |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| summary(&v.iter().map(f).collect::<Vec<_>>()).median;
        let (pc, ps) = (med(&cpu[0], |c| c.0), med(&cpu[0], |c| c.1));
        let (tc, ts) = (med(&cpu[1], |c| c.0), med(&cpu[1], |c| c.1));
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        // Plaintext keeps every core busy (busy ≈ 1): then the client's extra CPU for
        // decrypting alone adds its share of wall time, even with a server whose TLS cost
        // nothing. The ratio such a server could reach, on this machine:
        let busy = (pc + ps) / (s[0].median * cores);
        let bound = (pc + ps) / (pc + ps + (tc - pc).max(0.0));
        eprintln!(
            "tls: CPU seconds (median), client nbdcopy / our server: plaintext {pc:.2} / {ps:.2}, TLS {tc:.2} / {ts:.2}; \
             plaintext keeps {:.0} % of {cores} cores busy; with a server whose TLS cost nothing the client's \
             decryption alone would leave at most {bound:.2}× of plaintext",
            busy * 100.0
        );
        rows.push(Row {
            scenario: format!("NBD over TLS (tmpfs): nbdcopy of a quiet {} random raw file", fmt_bytes(a.size)),
            cowbackup: format!("nbd::Server TLS: {} (plaintext {})", fmt_rate(a.size, s[1]), fmt_rate(a.size, s[0])),
            baseline: format!(
                "qemu-nbd --tls-creds: {} (plaintext {}): {qemu:.2}× of plaintext",
                fmt_rate(a.size, s[3]),
                fmt_rate(a.size, s[2])
            ),
            ratio: format!(
                "{ours:.2}× of plaintext (CPU s client/server: plaintext {pc:.2}/{ps:.2}, TLS {tc:.2}/{ts:.2}; \
                 a free server: ≤ {bound:.2}×)"
            ),
            target: check(ours >= 0.8, "TLS ≥ 0.8× plaintext"),
        });
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    res
}
