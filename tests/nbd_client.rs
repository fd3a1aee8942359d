//! The NBD client driver against real servers: `qemu-nbd` serving raw and qcow2 images
//! and `nbdkit memory`. A live backup into them (checked with `qemu-img compare`),
//! zeroing, trim and flush, block status of a sparse image, read-only exports, server
//! errors, timeouts, and a server that dies during a job. Each test skips, with the reason
//! printed, only when a tool is not installed (`scripts/deps.sh` installs them).

mod common;

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{assert_same, wait_end, Rng};
use cowbackup::{
    backup_start, errno_of, BackupOptions, BlockDriver, FileDriver, JobState, NbdDriver, NbdOptions, StatusFlags,
};

const MIB: u64 = 1 << 20;

/// True when `tool --version` runs; else prints why the test skips.
fn have(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIPPED: {tool} is not installed (scripts/deps.sh installs it)");
    }
    ok
}

/// A server process on a Unix socket; stopped (SIGTERM, then SIGKILL) and reaped on drop.
struct Server {
    child: Option<Child>,
    socket: PathBuf,
    what: String,
}

impl Server {
    /// Start `cmd` (which must listen on `socket`) and wait, at most 20 s, until it accepts.
    fn start(mut cmd: Command, socket: &Path) -> Server {
        let _ = std::fs::remove_file(socket);
        let what = format!("{cmd:?}");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let mut s = Server { child: Some(child), socket: socket.to_path_buf(), what };
        let t = Instant::now();
        loop {
            if socket.exists() && std::os::unix::net::UnixStream::connect(socket).is_ok() {
                return s;
            }
            if let Some(st) = s.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("{} exited at start: {st}", s.what);
            }
            assert!(t.elapsed() < Duration::from_secs(20), "{} did not listen within 20 s", s.what);
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `qemu-nbd --persistent --shared=4` serving `image` in `format`.
    fn qemu_nbd(image: &Path, format: &str, socket: &Path, extra: &[&str]) -> Server {
        let mut cmd = Command::new("qemu-nbd");
        cmd.args(["-f", format, "--persistent", "--shared=4", "-k"]).arg(socket).args(extra).arg(image);
        Server::start(cmd, socket)
    }

    /// `nbdkit` in the foreground with `args` (plugin, filters, parameters).
    fn nbdkit(socket: &Path, args: &[&str]) -> Server {
        let mut cmd = Command::new("nbdkit");
        cmd.args(["-f", "-U"]).arg(socket).args(args);
        Server::start(cmd, socket)
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid (not yet reaped: still in `self.child`).
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// SIGTERM (a clean close of the image), SIGKILL after 10 s; reaped.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGCONT) };
        // SAFETY: as above.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        while child.try_wait().ok().flatten().is_none() {
            if t.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGKILL: the server dies at once, mid-request if there is one.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed: {text}");
    text
}

/// A raw image with random data, zero stretches and holes.
fn make_source(path: &Path, size: u64, seed: u64) -> Arc<FileDriver> {
    let d = FileDriver::create(path, size).unwrap();
    let mut rng = Rng::new(seed);
    let mut off = 0;
    while off < size {
        let n = (MIB / 2).min(size - off);
        match rng.below(4) {
            0 => {} // hole
            1 => d.write_at(&vec![0u8; n as usize], off).unwrap(),
            _ => d.write_at(&rng.bytes(n as usize), off).unwrap(),
        }
        off += n;
    }
    Arc::new(d)
}

/// A live backup of a written-to source into an NBD export, verified with qemu-img compare.
fn live_backup_into(format: &str) {
    if !(have("qemu-nbd") && have("qemu-img")) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 48 * MIB;
    let src_path = dir.path().join("source.raw");
    let source = make_source(&src_path, size, 7);
    let pit = dir.path().join("pit.raw");
    std::fs::copy(&src_path, &pit).unwrap();
    let target = dir.path().join(format!("target.{format}"));
    run(Command::new("qemu-img").args(["create", "-q", "-f", format]).arg(&target).arg(size.to_string()));
    let sock = dir.path().join("nbd.sock");
    let mut server = Server::qemu_nbd(&target, format, &sock, &[]);
    let nbd = Arc::new(NbdDriver::connect(&server.uri("")).unwrap());
    assert_eq!(nbd.size(), size);
    assert!(!nbd.is_read_only());
    assert_eq!(nbd.max_connections(), 4, "qemu-nbd --shared=4 advertises multi-conn");
    assert!(nbd.has_block_status());

    let opts = BackupOptions { workers: 4, speed: 24 * MIB, ..Default::default() };
    let job = backup_start(source.clone(), nbd.clone(), opts).unwrap();
    let stop = AtomicBool::new(false);
    let writes = std::thread::scope(|s| {
        let writers: Vec<_> = (0..3u64)
            .map(|w| {
                let (job, source, stop) = (&job, &source, &stop);
                s.spawn(move || {
                    let mut rng = Rng::new(100 + w);
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let len = 4096 * (1 + rng.below(32));
                        let off = rng.below((size - len) / 4096) * 4096;
                        job.cow_before_write(off, len).unwrap();
                        source.write_at(&rng.bytes(len as usize), off).unwrap();
                        n += 1;
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    n
                })
            })
            .collect();
        let r = wait_end(&job, Duration::from_secs(120));
        stop.store(true, Ordering::Relaxed);
        r.unwrap();
        writers.into_iter().map(|h| h.join().unwrap()).sum::<u64>()
    });
    let info = job.info();
    assert_eq!(info.state, JobState::Completed);
    assert!(writes > 20, "the writers wrote during the job ({writes} writes)");
    assert!(info.cow_requests > 0, "some writes had to copy first: {info:?}");
    assert!(nbd.open_connections() > 1, "the job used several connections");
    drop(job);
    drop(nbd);
    server.stop();
    // The image is the source as it was at backup_start; the source itself has moved on.
    let out = run(Command::new("qemu-img").args(["compare", "-f", format, "-F", "raw"]).arg(&target).arg(&pit));
    assert!(out.contains("Images are identical"), "{out}");
    let moved =
        Command::new("qemu-img").args(["compare", "-q", "-f", "raw", "-F", "raw"]).arg(&src_path).arg(&pit).status();
    assert_eq!(moved.unwrap().code(), Some(1), "the source changed during the job");
}

#[test]
fn live_backup_into_qemu_nbd_raw() {
    live_backup_into("raw");
}

#[test]
fn live_backup_into_qemu_nbd_qcow2() {
    live_backup_into("qcow2");
}

#[test]
fn nbdkit_memory_write_zeroes_trim_flush_and_large_requests() {
    if !have("nbdkit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let _server = Server::nbdkit(&sock, &["memory", "size=80M"]);
    let d = NbdDriver::connect(&format!("nbd+unix:///?socket={}", sock.display())).unwrap();
    assert_eq!(d.size(), 80 * MIB);
    assert!(d.max_connections() > 1);
    assert!(d.reads_as_zero(), "a fresh memory export reads as zeroes");
    // 40 MiB: more than one request (32 MiB at most each).
    let mut rng = Rng::new(1);
    let data = rng.bytes(40 << 20);
    d.write_at(&data, 3 * MIB + 512).unwrap();
    assert!(!d.reads_as_zero());
    let mut back = vec![0u8; data.len()];
    d.read_at(&mut back, 3 * MIB + 512).unwrap();
    assert_same("40 MiB read back", &back, &data);
    // write_zeroes: the range reads as zeroes, around it the data stays.
    d.write_zeroes_at(4 * MIB, 2 * MIB + 100).unwrap();
    let mut got = vec![1u8; 4 * MIB as usize];
    d.read_at(&mut got, 3 * MIB).unwrap();
    let mut expect = vec![0u8; 4 * MIB as usize];
    expect[512..].copy_from_slice(&data[..(4 * MIB - 512) as usize]);
    expect[MIB as usize..(3 * MIB + 100) as usize].fill(0);
    assert_same("after write_zeroes", &got, &expect);
    // trim (discard): reads back zeroes on nbdkit memory, and block status shows a hole.
    d.discard(16 * MIB, 8 * MIB).unwrap();
    let mut t = vec![1u8; 8 * MIB as usize];
    d.read_at(&mut t, 16 * MIB).unwrap();
    assert!(t.iter().all(|&b| b == 0), "trimmed range reads zeroes");
    let st = d.block_status(16 * MIB, 8 * MIB).unwrap();
    assert!(st.flags.contains(StatusFlags::ZERO) && !st.flags.contains(StatusFlags::DATA), "{st:?}");
    let st = d.block_status(30 * MIB, MIB).unwrap();
    assert_eq!(st.flags, StatusFlags::DATA, "{st:?}");
    d.flush().unwrap();
    // Concurrent I/O from many threads, each on its own region, over the connection pool.
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let d = &d;
            s.spawn(move || {
                let mut rng = Rng::new(50 + t);
                for i in 0..20u64 {
                    let off = 48 * MIB + t * 4 * MIB + (i % 4) * MIB;
                    let buf = rng.bytes(MIB as usize);
                    d.write_at(&buf, off).unwrap();
                    let mut b = vec![0u8; MIB as usize];
                    d.read_at(&mut b, off).unwrap();
                    assert_same("concurrent read back", &b, &buf);
                }
            });
        }
    });
    assert!(d.open_connections() > 1 && d.open_connections() <= d.max_connections());
    d.flush().unwrap();
    // Out of range: EINVAL before anything is sent.
    let e = d.read_at(&mut [0u8; 2], 80 * MIB - 1).unwrap_err();
    assert_eq!(errno_of(&e), libc::EINVAL);
}

#[test]
fn write_zeroes_falls_back_to_writes_without_server_support() {
    if !have("nbdkit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    // The nozero filter takes NBD_FLAG_SEND_WRITE_ZEROES away.
    let _server = Server::nbdkit(&sock, &["--filter=nozero", "memory", "size=8M"]);
    let d = NbdDriver::connect(&format!("nbd+unix:///?socket={}", sock.display())).unwrap();
    assert!(!d.transmission_flags().contains(cowbackup::nbd::proto::TransmissionFlags::SEND_WRITE_ZEROES));
    d.write_at(&vec![0xAB; 4 * MIB as usize], 0).unwrap();
    d.write_zeroes_at(MIB, 2 * MIB + 4096).unwrap();
    let mut b = vec![1u8; 4 * MIB as usize];
    d.read_at(&mut b, 0).unwrap();
    let mut want = vec![0xABu8; 4 * MIB as usize];
    want[MIB as usize..(3 * MIB + 4096) as usize].fill(0);
    assert_same("zeroes written as data", &b, &want);
}

#[test]
fn block_status_of_a_sparse_image_through_qemu_nbd() {
    if !have("qemu-nbd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("sparse.raw");
    let f = FileDriver::create(&img, 16 * MIB).unwrap();
    f.write_at(&[0x5A; 65536], MIB).unwrap();
    f.write_at(&[0x33; 3 * 65536], 5 * MIB).unwrap();
    drop(f);
    let sock = dir.path().join("s");
    let _server = Server::qemu_nbd(&img, "raw", &sock, &["-r"]);
    let d = NbdDriver::connect(&format!("nbd+unix:///?socket={}", sock.display())).unwrap();
    assert!(d.has_block_status());
    // Holes are HOLE|ZERO on the wire: ZERO without DATA here.
    let hole = d.block_status(0, 16 * MIB).unwrap();
    assert_eq!(hole.flags, StatusFlags::ZERO, "{hole:?}");
    assert_eq!(hole.len, MIB);
    let data = d.block_status(MIB, 15 * MIB).unwrap();
    assert!(data.flags.contains(StatusFlags::DATA), "{data:?}");
    assert_eq!(data.len, 65536);
    let hole2 = d.block_status(MIB + 65536, 15 * MIB - 65536).unwrap();
    assert_eq!(hole2, cowbackup::BlockStatus { len: 4 * MIB - 65536, flags: StatusFlags::ZERO });
    let data2 = d.block_status(5 * MIB, 11 * MIB).unwrap();
    assert_eq!(data2.len, 3 * 65536);
    assert!(data2.flags.contains(StatusFlags::DATA));
    let tail = d.block_status(5 * MIB + 3 * 65536, 11 * MIB - 3 * 65536).unwrap();
    assert_eq!(tail, cowbackup::BlockStatus { len: 11 * MIB - 3 * 65536, flags: StatusFlags::ZERO });
    // A query shorter than the extent is clipped to it.
    assert_eq!(d.block_status(0, 4096).unwrap(), cowbackup::BlockStatus { len: 4096, flags: StatusFlags::ZERO });
    assert!(!d.reads_as_zero());
    // What qemu-img map sees agrees (a cross-check of the server, not of us).
    if have("qemu-img") {
        let map = run(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw"]).arg(&img));
        assert!(map.contains("\"start\": 1048576, \"length\": 65536, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true"), "{map}");
    }
}

#[test]
fn read_only_exports_refuse_writes() {
    if !have("qemu-nbd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("ro.raw");
    std::fs::write(&img, vec![7u8; 4 * MIB as usize]).unwrap();
    let sock = dir.path().join("s");
    let _server = Server::qemu_nbd(&img, "raw", &sock, &["-r"]);
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let d = NbdDriver::connect(&uri).unwrap();
    assert!(d.is_read_only());
    assert!(d.transmission_flags().contains(cowbackup::nbd::proto::TransmissionFlags::READ_ONLY));
    for (what, e) in [
        ("write", d.write_at(&[1; 512], 0).unwrap_err()),
        ("write_zeroes", d.write_zeroes_at(0, 4096).unwrap_err()),
        ("discard", d.discard(0, 4096).unwrap_err()),
    ] {
        assert!(matches!(errno_of(&e), libc::EROFS | libc::EPERM), "{what}: {e}");
        assert!(e.to_string().contains("read-only"), "{what}: {e}");
    }
    let mut b = vec![0u8; 4096];
    d.read_at(&mut b, 4096).unwrap();
    assert!(b.iter().all(|&x| x == 7));
    d.flush().unwrap();
    // A backup into it fails, with EROFS, and says so.
    let src = Arc::new(cowbackup::MemDriver::new(4 * MIB).unwrap());
    src.write_at(&[1; 4096], 0).unwrap();
    let job = backup_start(src, Arc::new(d), BackupOptions::default()).unwrap();
    let e = wait_end(&job, Duration::from_secs(30)).unwrap_err();
    assert!(matches!(e.errno(), libc::EROFS | libc::EPERM), "{e}");
    std::fs::write(&img, vec![7u8; 4 * MIB as usize]).unwrap();

    // Connected read-only on purpose to a writable export: also EROFS.
    let img2 = dir.path().join("rw.raw");
    std::fs::write(&img2, vec![0u8; MIB as usize]).unwrap();
    let sock2 = dir.path().join("s2");
    let _server2 = Server::qemu_nbd(&img2, "raw", &sock2, &[]);
    let uri2 = format!("nbd+unix:///?socket={}", sock2.display());
    let ro = NbdDriver::connect_with(&uri2, &NbdOptions { write: false, ..Default::default() }).unwrap();
    assert!(ro.is_read_only());
    assert_eq!(errno_of(&ro.write_at(&[1], 0).unwrap_err()), libc::EROFS);
}

#[test]
fn bad_uris_and_missing_exports() {
    for uri in ["", "nbd:/", "nbd://", "file:///x", "nbd+unix:///x", "nbds://h/x", "nbd://h/x?bogus=1"] {
        let e = NbdDriver::connect(uri).unwrap_err();
        assert_eq!(errno_of(&e), libc::EINVAL, "{uri}: {e}");
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{uri}");
    }
    if !have("qemu-nbd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("x.raw");
    std::fs::write(&img, vec![0u8; MIB as usize]).unwrap();
    let sock = dir.path().join("s");
    let _server = Server::qemu_nbd(&img, "raw", &sock, &["-x", "disk0"]);
    let d = NbdDriver::connect(&format!("nbd+unix:///disk0?socket={}", sock.display())).unwrap();
    assert_eq!(d.export_name(), "disk0");
    let e = NbdDriver::connect(&format!("nbd+unix:///nope?socket={}", sock.display())).unwrap_err();
    assert_eq!(errno_of(&e), libc::ENOENT, "{e}");
    assert!(e.to_string().contains("nope"), "{e}");
}

#[test]
fn server_errors_keep_their_errno_and_the_connection() {
    if !have("nbdkit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let _server = Server::nbdkit(
        &sock,
        &["--filter=error", "memory", "size=8M", "error-pwrite=ENOSPC", "error-pwrite-rate=100%"],
    );
    let d = NbdDriver::connect(&format!("nbd+unix:///?socket={}", sock.display())).unwrap();
    for _ in 0..3 {
        let e = d.write_at(&[1; 4096], 0).unwrap_err();
        assert_eq!(errno_of(&e), libc::ENOSPC, "{e}");
        assert!(e.to_string().contains("server error"), "{e}");
    }
    // The connection is still good: reads work, and no new connection was needed.
    let mut b = vec![1u8; 4096];
    d.read_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    assert_eq!(d.open_connections(), 1);
}

#[test]
fn a_stopped_server_times_out_instead_of_hanging() {
    if !have("qemu-nbd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("x.raw");
    std::fs::write(&img, vec![0u8; MIB as usize]).unwrap();
    let sock = dir.path().join("s");
    let server = Server::qemu_nbd(&img, "raw", &sock, &[]);
    let opts = NbdOptions { timeout: Duration::from_millis(700), ..Default::default() };
    let d = NbdDriver::connect_with(&format!("nbd+unix:///?socket={}", sock.display()), &opts).unwrap();
    server.signal(libc::SIGSTOP);
    let t = Instant::now();
    let e = d.read_at(&mut [0u8; 4096], 0).unwrap_err();
    assert_eq!(errno_of(&e), libc::ETIMEDOUT, "{e}");
    assert!(t.elapsed() < Duration::from_secs(10), "took {:?}", t.elapsed());
    server.signal(libc::SIGCONT);
    // The next request opens a fresh connection and works.
    let mut b = [1u8; 4096];
    d.read_at(&mut b, 0).unwrap();
    assert_eq!(b, [0u8; 4096]);
}

#[test]
fn writes_lost_with_a_dead_server_fail_the_next_flush() {
    if !have("qemu-nbd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("x.raw");
    std::fs::write(&img, vec![0u8; MIB as usize]).unwrap();
    let sock = dir.path().join("s");
    let mut server = Server::qemu_nbd(&img, "raw", &sock, &[]);
    let d = NbdDriver::connect(&format!("nbd+unix:///?socket={}", sock.display())).unwrap();
    d.write_at(&[9; 4096], 0).unwrap(); // acknowledged, not flushed
    server.kill();
    let e = d.write_at(&[9; 4096], 4096).unwrap_err();
    assert!(matches!(errno_of(&e), libc::ECONNRESET | libc::EPIPE | libc::ECONNREFUSED), "{e}");
    let _server = Server::qemu_nbd(&img, "raw", &sock, &[]);
    d.write_at(&[9; 4096], 8192).unwrap(); // a new connection
    let e = d.flush().unwrap_err();
    assert_eq!(errno_of(&e), libc::EIO, "{e}");
    assert!(e.to_string().contains("not yet flushed"), "{e}");
    d.flush().unwrap(); // reported once
}

#[test]
fn server_killed_mid_job_fails_the_job() {
    if !(have("qemu-nbd") && have("qemu-img")) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let source = make_source(&dir.path().join("src.raw"), size, 3);
    let target = dir.path().join("t.qcow2");
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&target).arg(size.to_string()));
    let sock = dir.path().join("s");
    let mut server = Server::qemu_nbd(&target, "qcow2", &sock, &[]);
    let opts = NbdOptions { timeout: Duration::from_secs(5), ..Default::default() };
    let nbd = Arc::new(NbdDriver::connect_with(&format!("nbd+unix:///?socket={}", sock.display()), &opts).unwrap());
    let job =
        backup_start(source.clone(), nbd.clone(), BackupOptions { workers: 3, speed: 8 * MIB, ..Default::default() })
            .unwrap();
    common::until_for("some progress", Duration::from_secs(30), || job.info().offset > 2 * MIB);
    server.kill();
    let t = Instant::now();
    let e = wait_end(&job, Duration::from_secs(60)).unwrap_err();
    assert_eq!(job.info().state, JobState::Failed);
    assert!([libc::ECONNRESET, libc::EPIPE, libc::ECONNREFUSED, libc::ENOENT, libc::EIO].contains(&e.errno()), "{e}");
    assert!(e.to_string().contains("NBD"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(30));
}

#[test]
fn client_and_our_own_server() {
    use cowbackup::nbd::Server;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let server = Server::start(&format!("unix:{}", sock.display())).unwrap();
    let mem = Arc::new(cowbackup::MemDriver::new(16 * MIB).unwrap());
    server.add("rw", mem.clone(), true).unwrap();
    let source = Arc::new(cowbackup::MemDriver::new(16 * MIB).unwrap());
    source.write_at(&Rng::new(9).bytes(6 * MIB as usize), MIB).unwrap();
    server.add("ro", source.clone(), false).unwrap();
    let uri = |e: &str| format!("nbd+unix:///{e}?socket={}", sock.display());

    // Read-only export: multi-conn, block status, EROFS.
    let ro = NbdDriver::connect(&uri("ro")).unwrap();
    assert!(ro.is_read_only() && ro.max_connections() == 4 && ro.has_block_status());
    assert_eq!(ro.block_status(0, 16 * MIB).unwrap(), cowbackup::BlockStatus { len: MIB, flags: StatusFlags::ZERO });
    assert_eq!(errno_of(&ro.write_at(&[1], 0).unwrap_err()), libc::EROFS);
    let e = NbdDriver::connect(&uri("none")).unwrap_err();
    assert_eq!(errno_of(&e), libc::ENOENT, "{e}");

    // A backup from the read-only export into the writable one, both through the client.
    let rw = Arc::new(NbdDriver::connect(&uri("rw")).unwrap());
    assert!(!rw.is_read_only());
    let job = backup_start(Arc::new(ro), rw.clone(), BackupOptions { workers: 4, ..Default::default() }).unwrap();
    wait_end(&job, Duration::from_secs(60)).unwrap();
    assert_same("backup over our server", &common::contents(&*mem), &common::contents(&*source));
    rw.write_zeroes_at(MIB, MIB).unwrap();
    rw.discard(2 * MIB, MIB).unwrap();
    rw.flush().unwrap();
    let mut b = vec![1u8; 2 * MIB as usize];
    rw.read_at(&mut b, MIB).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    drop(rw);
    drop(job);
    server.stop();
}

#[test]
fn context_extents_of_an_exported_dirty_bitmap() {
    use cowbackup::nbd::Server;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let server = Server::start(&format!("unix:{}", sock.display())).unwrap();
    let size = 8 * MIB + 4096; // the last granule is short
    server.add("d", Arc::new(cowbackup::MemDriver::new(size).unwrap()), false).unwrap();
    let bm = cowbackup::DirtyBitmap::new(size, 65536).unwrap();
    bm.mark(65536, 1).unwrap();
    bm.mark(2 * 65536, 65536).unwrap();
    bm.mark(5 * MIB + 7, 70_000).unwrap();
    bm.mark(size - 1, 1).unwrap();
    server.add_bitmap("d", "b0", bm).unwrap();
    let nbd = NbdDriver::connect(&format!("nbd+unix:///d?socket={}", sock.display())).unwrap();

    // Adjacent dirty granules merge; the extents cover the range exactly, clipped to it.
    let all = nbd.context_extents("qemu:dirty-bitmap:b0", 0, size).unwrap();
    assert_eq!(
        all,
        vec![
            (0, 65536, 0),
            (65536, 2 * 65536, 1),
            (3 * 65536, 5 * MIB - 3 * 65536, 0),
            (5 * MIB, 2 * 65536, 1),
            (5 * MIB + 2 * 65536, 3 * MIB - 2 * 65536, 0),
            (8 * MIB, 4096, 1),
        ]
    );
    let part = nbd.context_extents("qemu:dirty-bitmap:b0", 100_000, 10).unwrap();
    assert_eq!(part, vec![(100_000, 10, 1)]);
    // base:allocation through the same call: a MemDriver of zeroes reads as holes.
    let base = nbd.context_extents("base:allocation", 0, MIB).unwrap();
    assert_eq!(base.iter().map(|e| e.1).sum::<u64>(), MIB);
    // A context the server does not offer; bad input; the driver's own I/O goes on.
    let e = nbd.context_extents("qemu:dirty-bitmap:nope", 0, size).unwrap_err();
    assert_eq!(errno_of(&e), libc::ENOTSUP, "{e}");
    assert!(e.to_string().contains("qemu:dirty-bitmap:nope"), "{e}");
    assert_eq!(errno_of(&nbd.context_extents("", 0, 1).unwrap_err()), libc::EINVAL);
    assert_eq!(errno_of(&nbd.context_extents("base:allocation", size, 1).unwrap_err()), libc::EINVAL);
    let mut b = [1u8; 4096];
    nbd.read_at(&mut b, 0).unwrap();
    assert_eq!(b, [0u8; 4096]);
    drop(nbd);
    server.stop();
}
