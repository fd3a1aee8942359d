//! The NBD server (src/nbd/server.rs) against real clients: nbdinfo, nbdcopy, qemu-img,
//! libnbd from Python, a differential check against qemu-nbd, and hostile raw-socket
//! clients. A test skips (with a printed reason) only when a tool is not installed.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{until, until_for, Rng};
use cowbackup::nbd::proto::*;
use cowbackup::nbd::{Server, ServerOptions};
use cowbackup::{backup_start, BackupOptions, BlockDriver, DirtyBitmap, FileDriver, MemDriver, SyncMode};

const TIMEOUT: Duration = Duration::from_secs(20);

fn have(tool: &str) -> bool {
    let arg = if tool.ends_with("python3") { "-c" } else { "--version" };
    let mut c = Command::new(tool);
    c.arg(arg);
    if arg == "-c" {
        c.arg("import nbd");
    }
    c.stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// Skip the test (return) with a message when a tool is missing.
macro_rules! need {
    ($($tool:expr),+) => {
        for t in [$($tool),+] {
            if !have(t) {
                eprintln!("SKIP {}: {t} is not installed (scripts/deps.sh installs it)", module_path!());
                return;
            }
        }
    };
}

/// Run a command with a time limit (coreutils `timeout`); its stdout, or panic with stderr.
#[track_caller]
fn run(prog: &str, args: &[&str]) -> String {
    let out = Command::new("timeout")
        .arg("120")
        .arg(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {prog}: {e}"));
    assert!(
        out.status.success(),
        "{prog} {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn socket_of(server: &Server) -> PathBuf {
    PathBuf::from(server.address().strip_prefix("unix:").expect("a unix server"))
}

fn uri(server: &Server, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", socket_of(server).display())
}

/// Parse `nbdinfo --map` output: (offset, length, type) per line.
fn parse_map(out: &str) -> Vec<(u64, u64, u32)> {
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].parse().unwrap(), f[1].parse().unwrap(), f[2].parse().unwrap())
        })
        .collect()
}

const K: u64 = 1024;
const M: u64 = 1024 * 1024;

#[test]
fn nbdinfo_list_map_and_dirty_bitmap() {
    need!("nbdinfo");
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&format!("unix:{}", dir.path().join("s.sock").display())).unwrap();
    assert_eq!(server.address(), format!("unix:{}", dir.path().join("s.sock").display()));
    let disk = Arc::new(MemDriver::new(4 * M).unwrap());
    disk.write_at(&[1; 64 * 1024], 0).unwrap();
    disk.write_at(&[2; 128 * 1024], M).unwrap();
    let other = Arc::new(MemDriver::new(M).unwrap());
    server.add("disk", disk.clone(), false).unwrap();
    server.add("other", other, true).unwrap();
    let bm = DirtyBitmap::new(4 * M, 64 * K).unwrap();
    bm.mark(256 * K, 64 * K).unwrap();
    bm.mark(3 * M, 100 * K).unwrap();
    server.add_bitmap("disk", "b0", bm.clone()).unwrap();

    let list = run("nbdinfo", &["--list", &uri(&server, "")]);
    assert!(list.contains("export=\"disk\"") && list.contains("export=\"other\""), "{list}");

    let info = run("nbdinfo", &[&uri(&server, "disk")]);
    assert!(info.contains("can_multi_conn: true") && info.contains("is_read_only: true"), "{info}");
    assert!(info.contains("base:allocation") && info.contains("qemu:dirty-bitmap:b0"), "{info}");
    let info = run("nbdinfo", &[&uri(&server, "other")]);
    assert!(info.contains("can_multi_conn: false") && info.contains("is_read_only: false"), "{info}");

    let map = parse_map(&run("nbdinfo", &["--map", &uri(&server, "disk")]));
    assert_eq!(map, vec![(0, 64 * K, 0), (64 * K, M - 64 * K, 3), (M, 128 * K, 0), (M + 128 * K, 3 * M - 128 * K, 3)]);

    let map = parse_map(&run("nbdinfo", &["--map=qemu:dirty-bitmap:b0", &uri(&server, "disk")]));
    assert_eq!(
        map,
        vec![
            (0, 256 * K, 0),
            (256 * K, 64 * K, 1),
            (320 * K, 3 * M - 320 * K, 0),
            (3 * M, 128 * K, 1),
            (3 * M + 128 * K, M - 128 * K, 0)
        ]
    );
    // Marks made later are served live.
    bm.mark(0, 1).unwrap();
    let map = parse_map(&run("nbdinfo", &["--map=qemu:dirty-bitmap:b0", &uri(&server, "disk")]));
    assert_eq!(map[0], (0, 64 * K, 1));

    // remove: gone from the list.
    server.remove("other").unwrap();
    let list = run("nbdinfo", &["--list", &uri(&server, "")]);
    assert!(list.contains("export=\"disk\"") && !list.contains("export=\"other\""), "{list}");
    server.stop();
    assert!(!socket_of(&server).exists(), "stop removes the socket file");
}

/// The point-in-time image of a live device, served by a sync=None job's snapshot view,
/// copied by qemu-img convert and by nbdcopy while writer threads keep writing.
#[test]
fn live_view_qemu_img_convert_and_nbdcopy() {
    need!("qemu-img", "nbdcopy");
    let dir = tempfile::tempdir().unwrap();
    let size = 32 * M;
    let src_path = dir.path().join("src.img");
    let source = Arc::new(FileDriver::create(&src_path, size).unwrap());
    let mut rng = Rng::new(7);
    // Data with holes: every other MiB written.
    for i in (0..size / M).step_by(2) {
        source.write_at(&rng.bytes(M as usize), i * M).unwrap();
    }
    let reference = dir.path().join("ref.img");
    std::fs::copy(&src_path, &reference).unwrap();
    let scratch = Arc::new(FileDriver::create(dir.path().join("scratch.img"), size).unwrap());
    let opts = BackupOptions { sync: SyncMode::None, ..Default::default() };
    let job = backup_start(source.clone(), scratch, opts).unwrap();
    let view = job.snapshot().unwrap();
    let server = Server::start(&format!("unix:{}", dir.path().join("s.sock").display())).unwrap();
    server.add("view", view, false).unwrap();

    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let (job, source, stop) = (&job, &source, &stop);
            s.spawn(move || {
                let mut rng = Rng::new(100 + t);
                while !stop.load(Ordering::Relaxed) {
                    let len = (1 + rng.below(16)) * 4096;
                    let off = rng.below((size - len) / 4096) * 4096;
                    job.cow_before_write(off, len).unwrap();
                    source.write_at(&rng.bytes(len as usize), off).unwrap();
                }
            });
        }
        let out1 = dir.path().join("convert.img");
        run("qemu-img", &["convert", "-f", "raw", "-O", "raw", &uri(&server, "view"), out1.to_str().unwrap()]);
        let out2 = dir.path().join("nbdcopy.img");
        std::fs::File::create(&out2).unwrap().set_len(size).unwrap();
        run("nbdcopy", &[&uri(&server, "view"), out2.to_str().unwrap()]);
        stop.store(true, Ordering::Relaxed);
        for out in [&out1, &out2] {
            run("qemu-img", &["compare", "-f", "raw", "-F", "raw", reference.to_str().unwrap(), out.to_str().unwrap()]);
        }
    });
    assert!(job.info().cow_requests > 0, "the writers ran during the copies");
    // The source did change: the copies are the point in time, not the present.
    let now = common::contents(&*source);
    assert_ne!(now, std::fs::read(&reference).unwrap());
    job.cancel();
}

/// Entries (start, length, zero, data) of `qemu-img map --output=json`, adjacent equal
/// entries merged.
fn qemu_map(target: &str) -> Vec<(u64, u64, bool, bool)> {
    let out = run("qemu-img", &["map", "--output=json", "-f", "raw", target]);
    let field = |entry: &str, name: &str| -> String {
        let at = entry.find(&format!("\"{name}\":")).unwrap_or_else(|| panic!("{name} in {entry}")) + name.len() + 3;
        entry[at..].trim_start().split([',', '}']).next().unwrap().trim().to_string()
    };
    let mut v: Vec<(u64, u64, bool, bool)> = Vec::new();
    for entry in out.split('{').skip(1) {
        let e = (
            field(entry, "start").parse().unwrap(),
            field(entry, "length").parse().unwrap(),
            field(entry, "zero") == "true",
            field(entry, "data") == "true",
        );
        match v.last_mut() {
            Some(l) if l.2 == e.2 && l.3 == e.3 && l.0 + l.1 == e.0 => l.1 += e.1,
            _ => v.push(e),
        }
    }
    v
}

#[test]
fn qemu_img_map_matches_source_holes() {
    need!("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sparse.img");
    let f = Arc::new(FileDriver::create(&path, 16 * M).unwrap());
    f.write_at(&[7; 65536], 0).unwrap();
    f.write_at(&[8; 3 * 65536], 5 * M).unwrap();
    f.write_at(&[9; 4096], 16 * M - 4096).unwrap();
    let server = Server::start(&format!("unix:{}", dir.path().join("s.sock").display())).unwrap();
    server.add("sparse", f, false).unwrap();
    let direct = qemu_map(path.to_str().unwrap());
    let served = qemu_map(&uri(&server, "sparse"));
    assert!(direct.iter().any(|e| !e.3), "the file has holes: {direct:?}");
    assert_eq!(served, direct);
}

const PY_CLIENT: &str = r#"
import errno, sys, nbd
uri, expect_path = sys.argv[1], sys.argv[2]
expect = open(expect_path, "rb").read()
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.add_meta_context("qemu:dirty-bitmap:b0")
h.connect_uri(uri)
assert h.can_meta_context("base:allocation")
assert h.can_meta_context("qemu:dirty-bitmap:b0")
print("size", h.get_size())
print("multi_conn", h.can_multi_conn(), "read_only", h.is_read_only())
seen = {}
def cb(ctx, offset, entries, err):
    seen.setdefault(ctx, []).extend(entries)
    return 0
# Served clusters: [0, 64K) and [128K, 192K). Status and reads inside them work.
h.block_status(65536, 0, cb)
h.block_status(65536, 131072, cb)
for ctx in sorted(seen):
    print("status", ctx, " ".join(map(str, seen[ctx])))
assert h.pread(65536, 0) == expect[0:65536]
assert h.pread(4096, 131072 + 4096) == expect[131072 + 4096:131072 + 8192]
print("reads ok")
# Outside the pull-mode bitmap: the read fails whole with EINVAL (QEMU's mapping of EACCES).
for off, n in ((65536, 4096), (60000, 8192), (900000, 512)):
    try:
        h.pread(n, off)
        print("read outside succeeded", off)
    except nbd.Error as e:
        print("read outside errno", errno.errorcode.get(e.errno, e.errno))
h.shutdown()
"#;

/// libnbd (Python) against a pull-mode view: block status of both contexts, reads, and
/// the error of a read outside the job's bitmap.
#[test]
fn python_libnbd_pull_mode_view() {
    need!("/usr/bin/python3");
    let dir = tempfile::tempdir().unwrap();
    let size = M;
    let mut rng = Rng::new(3);
    let data = rng.bytes(size as usize);
    let source = Arc::new(MemDriver::from_bytes(&data).unwrap());
    let target = Arc::new(MemDriver::new(size).unwrap());
    let bm = DirtyBitmap::new(size, 64 * K).unwrap();
    bm.mark(0, 64 * K).unwrap();
    bm.mark(128 * K, 64 * K).unwrap();
    let opts = BackupOptions {
        sync: SyncMode::None,
        cluster_size: 64 * K,
        bitmap: Some(bm.clone()),
        bitmap_mode: cowbackup::BitmapMode::OnSuccess,
        ..Default::default()
    };
    let job = backup_start(source.clone(), target, opts).unwrap();
    // A write during the job: the view still serves the old data.
    job.cow_before_write(0, 4096).unwrap();
    source.write_at(&[0xee; 4096], 0).unwrap();
    let view = job.snapshot().unwrap();
    let server = Server::start(&format!("unix:{}", dir.path().join("s.sock").display())).unwrap();
    server.add("pull", view, false).unwrap();
    server.add_bitmap("pull", "b0", bm.clone()).unwrap();
    let expect = dir.path().join("expect");
    std::fs::write(&expect, &data).unwrap();
    let out = run("/usr/bin/python3", &["-c", PY_CLIENT, &uri(&server, "pull"), expect.to_str().unwrap()]);
    assert!(out.contains("size 1048576"), "{out}");
    assert!(out.contains("multi_conn True read_only True"), "{out}");
    // base:allocation of a memory driver: data (0). qemu:dirty-bitmap:b0: both served
    // ranges dirty (the 4 KiB written since is dirty too).
    assert!(out.contains("status base:allocation 65536 0 65536 0"), "{out}");
    assert!(out.contains("status qemu:dirty-bitmap:b0 65536 1 65536 1"), "{out}");
    assert!(out.contains("reads ok"), "{out}");
    assert_eq!(out.matches("read outside errno EINVAL").count(), 3, "{out}");
    job.complete().unwrap();
    common::wait_end(&job, TIMEOUT).unwrap();
}

/// Kills a child process on drop.
struct Reap(Child);
impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The same dirty bitmap served by qemu-nbd (a qcow2 persistent bitmap written by
/// qemu-io) and by our server: `nbdinfo --map=qemu:dirty-bitmap:b0` prints the same.
#[test]
fn differential_against_qemu_nbd_bitmap() {
    need!("qemu-img", "qemu-io", "qemu-nbd", "nbdinfo");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    let img_s = img.to_str().unwrap();
    let size = 16 * M;
    run("qemu-img", &["create", "-q", "-f", "qcow2", img_s, &size.to_string()]);
    run("qemu-img", &["bitmap", "--add", "-g", "65536", img_s, "b0"]);
    let writes: [(u64, u64); 4] = [(M, 64 * K), (5 * M + 4096, 300 * K), (9 * M, 1), (size - 512, 512)];
    let mut args: Vec<String> = Vec::new();
    for (o, l) in writes {
        args.push("-c".into());
        args.push(format!("write {o} {l}"));
    }
    let mut qargs: Vec<&str> = vec!["-f", "qcow2"];
    qargs.extend(args.iter().map(|s| s.as_str()));
    qargs.push(img_s);
    run("qemu-io", &qargs);

    let qsock = dir.path().join("q.sock");
    let child = Command::new("qemu-nbd")
        .args(["-r", "-f", "qcow2", "-B", "b0", "-x", "d", "-t", "-k", qsock.to_str().unwrap(), img_s])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _reap = Reap(child);
    until_for("qemu-nbd's socket", TIMEOUT, || qsock.exists());
    let quri = format!("nbd+unix:///d?socket={}", qsock.display());
    let theirs = run("nbdinfo", &["--map=qemu:dirty-bitmap:b0", &quri]);

    let bm = DirtyBitmap::new(size, 64 * K).unwrap();
    for (o, l) in writes {
        bm.mark(o, l).unwrap();
    }
    let server = Server::start(&format!("unix:{}", dir.path().join("s.sock").display())).unwrap();
    server.add("d", Arc::new(MemDriver::new(size).unwrap()), false).unwrap();
    server.add_bitmap("d", "b0", bm).unwrap();
    let ours = run("nbdinfo", &["--map=qemu:dirty-bitmap:b0", &uri(&server, "d")]);
    assert!(parse_map(&theirs).iter().any(|e| e.2 == 1), "qemu-nbd reports dirty extents: {theirs}");
    assert_eq!(ours, theirs);
    // And with a block status request that starts mid-granule (nbdinfo --map=... offsets).
    let theirs = run("nbdinfo", &["--map=qemu:dirty-bitmap:b0", "--totals", &quri]);
    let ours = run("nbdinfo", &["--map=qemu:dirty-bitmap:b0", "--totals", &uri(&server, "d")]);
    assert_eq!(ours, theirs);
}

// ---------------------------------------------------------------------------------------
// Raw-socket clients
// ---------------------------------------------------------------------------------------

fn connect(path: &Path) -> UnixStream {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.set_write_timeout(Some(TIMEOUT)).unwrap();
    s
}

/// Greeting + client flags.
fn hello(path: &Path) -> UnixStream {
    let mut s = connect(path);
    read_greeting(&mut s).unwrap();
    s.write_all(&encode_client_flags(ClientFlags::FIXED_NEWSTYLE | ClientFlags::NO_ZEROES)).unwrap();
    s
}

/// A client in transmission with `export` (structured replies if asked); returns the size.
fn go(path: &Path, export: &str, structured: bool) -> (UnixStream, u64) {
    let mut s = hello(path);
    let limits = Limits::default();
    let mut out = Vec::new();
    if structured {
        ClientOption::StructuredReply.encode(&mut out).unwrap();
    }
    ClientOption::Go(InfoRequest { name: export.into(), info: vec![] }).encode(&mut out).unwrap();
    s.write_all(&out).unwrap();
    let mut size = None;
    loop {
        let r = read_option_reply(&mut s, &limits).unwrap();
        match r.parse().unwrap() {
            OptionReplyBody::Info(Info::Export { size: sz, .. }) => size = Some(sz),
            OptionReplyBody::Ack if r.option == OPT_GO => break,
            OptionReplyBody::Ack | OptionReplyBody::Info(_) => {}
            other => panic!("unexpected reply {other:?}"),
        }
    }
    (s, size.unwrap())
}

/// Send a request (and payload); the simple reply's error and data.
fn simple(s: &mut UnixStream, req: Request, payload: &[u8]) -> (u32, Vec<u8>) {
    s.write_all(&req.encode()).unwrap();
    s.write_all(payload).unwrap();
    match read_reply_header(s).unwrap() {
        ReplyHeader::Simple { error, cookie } => {
            assert_eq!(cookie, req.cookie);
            let mut data = vec![0; if error == 0 && req.command == CMD_READ { req.len as usize } else { 0 }];
            s.read_exact(&mut data).unwrap();
            (error, data)
        }
        other => panic!("expected a simple reply, got {other:?}"),
    }
}

fn req(command: u16, offset: u64, len: u32) -> Request {
    Request { flags: CommandFlags::empty(), command, cookie: offset ^ u64::from(len) ^ 0x5a, offset, len }
}

/// True when the peer closed (EOF or reset) within the timeout.
fn closed(s: &mut UnixStream) -> bool {
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(e) => panic!("expected a disconnect, got {e}"),
        }
    }
}

fn vm_rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Hostile clients, one after another and all at once, while a well-behaved client keeps
/// reading and checking: each gets an error or a disconnect, the good client never
/// notices, memory stays bounded, and every connection thread ends.
#[test]
fn hostile_clients() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let size = 8 * M;
    let data = Rng::new(9).bytes(size as usize);
    let server = Server::start(&format!("unix:{}", sock.display())).unwrap();
    server.add("disk", Arc::new(MemDriver::from_bytes(&data).unwrap()), false).unwrap();
    server.add("rw", Arc::new(MemDriver::new(M).unwrap()), true).unwrap();
    let rss_before = vm_rss_kib();

    let abuse_done = AtomicBool::new(false);
    std::thread::scope(|sc| {
        // Ends the good client even when an assertion below fails.
        struct Done<'a>(&'a AtomicBool);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let done_guard = Done(&abuse_done);
        // The well-behaved client: reads and checks random ranges until the abuse ends.
        let good = sc.spawn(|| {
            let (mut s, sz) = go(&sock, "disk", false);
            assert_eq!(sz, size);
            let mut rng = Rng::new(1);
            let mut n = 0u64;
            while !abuse_done.load(Ordering::Relaxed) || n < 10 {
                let len = 1 + rng.below(256 * K) as u32;
                let off = rng.below(size - u64::from(len));
                let (e, got) = simple(&mut s, req(CMD_READ, off, len), &[]);
                assert_eq!(e, 0);
                assert!(got == data[off as usize..off as usize + len as usize], "good client read {off}+{len}");
                n += 1;
            }
            n
        });

        let limits = Limits::default();
        // Bad client flags; garbage instead of an option (bad magic).
        let mut s = connect(&sock);
        read_greeting(&mut s).unwrap();
        s.write_all(&[0, 0, 0, 0]).unwrap();
        assert!(closed(&mut s));
        let mut s = hello(&sock);
        s.write_all(b"GARBAGE!GARBAGE!GARBAGE!").unwrap();
        assert!(closed(&mut s));
        // A command before GO: the request is not an option: disconnect.
        let mut s = hello(&sock);
        s.write_all(&req(CMD_READ, 0, 512).encode()).unwrap();
        assert!(closed(&mut s));

        // Unknown option: NBD_REP_ERR_UNSUP, and the connection goes on; ABORT is acked.
        let mut s = hello(&sock);
        let mut out = Vec::new();
        ClientOption::Other { code: 1234, data: vec![1, 2, 3] }.encode(&mut out).unwrap();
        ClientOption::Abort.encode(&mut out).unwrap();
        s.write_all(&out).unwrap();
        assert_eq!(read_option_reply(&mut s, &limits).unwrap().reply_type, REP_ERR_UNSUP);
        assert_eq!(read_option_reply(&mut s, &limits).unwrap().reply_type, REP_ACK);
        assert!(closed(&mut s));

        // Option length 4 GiB: NBD_REP_ERR_TOO_BIG, then a disconnect (data never read).
        let mut s = hello(&sock);
        let mut h = IHAVEOPT.to_be_bytes().to_vec();
        h.extend_from_slice(&OPT_GO.to_be_bytes());
        h.extend_from_slice(&u32::MAX.to_be_bytes());
        s.write_all(&h).unwrap();
        assert_eq!(read_option_reply(&mut s, &limits).unwrap().reply_type, REP_ERR_TOO_BIG);
        assert!(closed(&mut s));

        // Export name of 1 MiB: as EXPORT_NAME (too big: error + disconnect), as GO with
        // a length field of 1 MiB in a short option (invalid, the connection goes on).
        let mut s = hello(&sock);
        let mut h = IHAVEOPT.to_be_bytes().to_vec();
        h.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
        h.extend_from_slice(&(M as u32).to_be_bytes());
        s.write_all(&h).unwrap();
        let _ = s.write_all(&vec![b'a'; M as usize]);
        // The reply, unless the close (with our unread bytes) reset the connection first.
        if let Ok(r) = read_option_reply(&mut s, &limits) {
            assert_eq!(r.reply_type, REP_ERR_TOO_BIG);
            assert!(closed(&mut s));
        }
        let mut s = hello(&sock);
        let mut d = (M as u32).to_be_bytes().to_vec();
        d.extend_from_slice(b"disk");
        let mut out = Vec::new();
        ClientOption::Other { code: OPT_GO, data: d }.encode(&mut out).unwrap();
        ClientOption::Go(InfoRequest { name: "a".repeat(5000), info: vec![] }).encode(&mut out).unwrap_err();
        ClientOption::Go(InfoRequest { name: "nope".into(), info: vec![] }).encode(&mut out).unwrap();
        s.write_all(&out).unwrap();
        assert_eq!(read_option_reply(&mut s, &limits).unwrap().reply_type, REP_ERR_INVALID);
        assert_eq!(read_option_reply(&mut s, &limits).unwrap().reply_type, REP_ERR_UNKNOWN);
        drop(s);

        // 10 000 options before GO: each answered with an error until the server has had
        // enough (NBD_REP_ERR_POLICY) and disconnects.
        let mut s = hello(&sock);
        let mut opt = Vec::new();
        ClientOption::Other { code: 77, data: vec![] }.encode(&mut opt).unwrap();
        let mut replies = 0;
        let mut last = 0;
        let mut cut = false;
        for _ in 0..10_000 {
            if s.write_all(&opt).is_err() {
                cut = true;
                break;
            }
            match read_option_reply(&mut s, &limits) {
                Ok(r) => {
                    replies += 1;
                    last = r.reply_type;
                    assert!(r.is_error());
                    if r.reply_type == REP_ERR_POLICY {
                        break;
                    }
                }
                // The close may overtake the last reply (a reset drops it).
                Err(_) => {
                    cut = true;
                    break;
                }
            }
        }
        assert!(replies <= 4097 && (last == REP_ERR_POLICY || cut), "{replies} replies, last {last:#x}");
        if !cut {
            assert!(closed(&mut s));
        }

        // In transmission: read of 1 GiB, read past the end, offset overflow, a write to a
        // read-only export, unknown command and flags: error replies; the connection stays usable.
        let (mut s, _) = go(&sock, "disk", false);
        assert_eq!(simple(&mut s, req(CMD_READ, 0, 1 << 30), &[]).0, NBD_EINVAL);
        assert_eq!(simple(&mut s, req(CMD_READ, size - 512, 1024), &[]).0, NBD_EINVAL);
        assert_eq!(simple(&mut s, req(CMD_READ, size, 1), &[]).0, NBD_EINVAL);
        assert_eq!(simple(&mut s, req(CMD_READ, u64::MAX - 100, 4096), &[]).0, NBD_EINVAL);
        assert_eq!(simple(&mut s, req(CMD_WRITE, 0, 4), b"abcd").0, NBD_EPERM);
        assert_eq!(simple(&mut s, req(CMD_TRIM, 0, 4096), &[]).0, NBD_EPERM);
        assert_eq!(simple(&mut s, req(CMD_WRITE_ZEROES, 0, 4096), &[]).0, NBD_EPERM);
        assert_eq!(simple(&mut s, req(99, 0, 4096), &[]).0, NBD_EINVAL);
        let r = Request { flags: CommandFlags::from_bits_retain(0x8000), ..req(CMD_READ, 0, 1) };
        assert_eq!(simple(&mut s, r, &[]).0, NBD_EINVAL);
        assert_eq!(simple(&mut s, req(CMD_BLOCK_STATUS, 0, 4096), &[]).0, NBD_EINVAL);
        let (e, got) = simple(&mut s, req(CMD_READ, 4096, 4096), &[]);
        assert_eq!((e, &got[..]), (0, &data[4096..8192]));
        assert_eq!(simple(&mut s, req(CMD_FLUSH, 0, 0), &[]).0, 0);
        s.write_all(&req(CMD_DISC, 0, 0).encode()).unwrap();
        assert!(closed(&mut s));

        // Structured: the same errors as ERROR chunks with a message; DF read too large: EOVERFLOW.
        let (mut s, _) = go(&sock, "disk", true);
        for (r, want) in [
            (req(CMD_READ, size - 1, 2), NBD_EINVAL),
            (Request { flags: CommandFlags::DF, ..req(CMD_READ, 0, 64 << 20) }, NBD_EOVERFLOW),
        ] {
            s.write_all(&r.encode()).unwrap();
            let ReplyHeader::Chunk(h) = read_reply_header(&mut s).unwrap() else { panic!("not structured") };
            let p = read_chunk_payload(&mut s, &h, &limits).unwrap();
            match parse_chunk(&h, &p).unwrap() {
                Chunk::Error { error, message, .. } => {
                    assert_eq!(error, want);
                    assert!(!message.is_empty());
                }
                other => panic!("{other:?}"),
            }
            assert!(h.is_done());
        }
        drop(s);

        // Writes on a writable export: past the end → ENOSPC; a 1 GiB payload → disconnect.
        let (mut s, _) = go(&sock, "rw", false);
        assert_eq!(simple(&mut s, req(CMD_WRITE, M - 2, 4), b"abcd").0, NBD_ENOSPC);
        assert_eq!(simple(&mut s, req(CMD_WRITE, 0, 4), b"abcd").0, 0);
        s.write_all(&req(CMD_WRITE, 0, 1 << 30).encode()).unwrap();
        let _ = s.write_all(&[0u8; 65536]);
        assert!(closed(&mut s));

        // Disconnects mid-request: half a header; a write header with part of its payload.
        let (mut s, _) = go(&sock, "disk", false);
        s.write_all(&req(CMD_READ, 0, 512).encode()[..10]).unwrap();
        drop(s);
        let (mut s, _) = go(&sock, "rw", false);
        s.write_all(&req(CMD_WRITE, 0, 4096).encode()).unwrap();
        s.write_all(&[1u8; 100]).unwrap();
        drop(s);
        let (s, _) = go(&sock, "disk", false);
        drop(s); // no DISC at all

        // 100 simultaneous connections: those above the limit are closed at once, the
        // others get a greeting; nobody crashes anything.
        let mut many: Vec<UnixStream> = (0..100).map(|_| connect(&sock)).collect();
        let mut greeted = 0;
        for s in &mut many {
            let mut g = [0u8; GREETING_LEN];
            match s.read_exact(&mut g) {
                Ok(()) => {
                    parse_greeting(&g).unwrap();
                    greeted += 1;
                }
                Err(e) => assert!(
                    matches!(e.kind(), std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset),
                    "{e}"
                ),
            }
        }
        assert!(
            (1..=15).contains(&greeted),
            "{greeted} of 100 connections served with a limit of 16 (one is the good client)"
        );
        drop(many);
        drop(done_guard);
        let reads = common::join_within("the good client", good, Duration::from_secs(60));
        assert!(reads >= 10);
    });
    // Every hostile connection's thread ends; then a new client is served again.
    until("connection threads to end", || server.connections() == 0);
    let (mut s, _) = go(&sock, "disk", false);
    assert_eq!(simple(&mut s, req(CMD_READ, 0, 16), &[]).1, data[..16]);
    let grown = vm_rss_kib().saturating_sub(rss_before);
    assert!(grown < 256 * 1024, "VmRSS grew by {grown} KiB during the abuse");
    server.stop();
}

/// A handshake that never finishes is cut off after the handshake timeout.
#[test]
fn handshake_timeout_and_connection_limit() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let opts =
        ServerOptions { max_connections: 2, handshake_timeout: Duration::from_millis(300), ..Default::default() };
    let server = Server::start_with(&format!("unix:{}", sock.display()), opts).unwrap();
    server.add("", Arc::new(MemDriver::new(M).unwrap()), false).unwrap();
    let mut idle = connect(&sock);
    let t = Instant::now();
    assert!(closed(&mut idle));
    assert!(t.elapsed() < TIMEOUT);
    until("the idle connection to end", || server.connections() == 0);
    // A slow client (a byte every 100 ms) is cut off at the deadline too, not per byte.
    let mut slow = hello(&sock);
    let t = Instant::now();
    let mut header = IHAVEOPT.to_be_bytes().to_vec();
    header.extend_from_slice(&OPT_LIST.to_be_bytes());
    header.extend_from_slice(&0u32.to_be_bytes());
    for b in &header {
        if slow.write_all(&[*b]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut g = Vec::new();
    let _ = slow.read_to_end(&mut g); // EOF (or a reset) once the server gave up
    until("the slow connection to end", || server.connections() == 0);
    assert!(t.elapsed() < Duration::from_secs(5), "cut off after {:?}", t.elapsed());
    assert!(read_option_reply(&mut &g[..], &Limits::default()).is_err(), "no reply to the slow option");
    // Two clients in transmission fill the server; a third is closed at once.
    let (mut a, _) = go(&sock, "", false);
    let (_b, _) = go(&sock, "", false);
    let mut c = connect(&sock);
    assert!(closed(&mut c));
    assert_eq!(simple(&mut a, req(CMD_READ, 0, 4096), &[]).0, 0);
}

#[test]
fn start_stop_and_addresses() {
    let dir = tempfile::tempdir().unwrap();
    // A path that exists and is not a socket: refused, the file untouched.
    let file = dir.path().join("precious");
    std::fs::write(&file, b"keep me").unwrap();
    let e = Server::start(&format!("unix:{}", file.display())).unwrap_err();
    assert_eq!(e.errno(), libc::EEXIST);
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    for bad in ["", "unix:", "tcp:", "tcp:nohost", "udp:1.2.3.4:5", "tcp:127.0.0.1:99999"] {
        assert_eq!(Server::start(bad).unwrap_err().errno(), libc::EINVAL, "{bad:?}");
    }
    // A live server's socket: EADDRINUSE; a stale socket file is replaced.
    let sock = dir.path().join("s.sock");
    let a = Server::start(&format!("unix:{}", sock.display())).unwrap();
    assert_eq!(Server::start(&format!("unix:{}", sock.display())).unwrap_err().errno(), libc::EADDRINUSE);
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let b = Server::start(&format!("unix:{}", stale.display())).unwrap();
    drop(b);
    assert!(!stale.exists());

    // Exports: names, duplicates, bitmaps of the wrong size, unknown names.
    let d: Arc<dyn BlockDriver> = Arc::new(MemDriver::new(M).unwrap());
    a.add("x", d.clone(), false).unwrap();
    assert_eq!(a.add("x", d.clone(), false).unwrap_err().errno(), libc::EEXIST);
    assert_eq!(a.add("a\0b", d.clone(), false).unwrap_err().errno(), libc::EINVAL);
    assert_eq!(a.add(&"n".repeat(5000), d.clone(), false).unwrap_err().errno(), libc::EINVAL);
    assert_eq!(a.add_bitmap("x", "b", DirtyBitmap::new(2 * M, 65536).unwrap()).unwrap_err().errno(), libc::EINVAL);
    assert_eq!(a.add_bitmap("y", "b", DirtyBitmap::new(M, 65536).unwrap()).unwrap_err().errno(), libc::ENOENT);
    a.add_bitmap("x", "b", DirtyBitmap::new(M, 65536).unwrap()).unwrap();
    assert_eq!(a.add_bitmap("x", "b", DirtyBitmap::new(M, 65536).unwrap()).unwrap_err().errno(), libc::EEXIST);
    assert_eq!(a.remove("y").unwrap_err().errno(), libc::ENOENT);
    assert_eq!(a.exports(), vec!["x".to_string()]);

    // remove disconnects the clients of that export; stop disconnects the rest.
    let (mut c1, _) = go(&sock, "x", false);
    a.remove("x").unwrap();
    assert!(closed(&mut c1));
    a.add("x", d.clone(), false).unwrap();
    let (mut c2, _) = go(&sock, "x", false);
    let t = Instant::now();
    a.stop();
    assert!(t.elapsed() < TIMEOUT);
    assert!(closed(&mut c2));
    assert!(!sock.exists());
    a.stop(); // idempotent
    assert_eq!(Arc::strong_count(&d), 1, "the server dropped its driver references");

    // TCP, port 0: the bound port is reported and serves.
    let t = Server::start("tcp:127.0.0.1:0").unwrap();
    let addr = t.address().strip_prefix("tcp:").unwrap().to_string();
    assert!(addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"), "{addr}");
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    assert!(read_greeting(&mut s).unwrap().contains(HandshakeFlags::FIXED_NEWSTYLE));
}

/// A writable export: qemu-img convert writes an image into it through NBD (write,
/// write_zeroes, flush), the memory driver then holds the image.
#[test]
fn writable_export_qemu_img_convert_into() {
    need!("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let size = 8 * M;
    let src = dir.path().join("src.img");
    let mut rng = Rng::new(11);
    let mut bytes = vec![0u8; size as usize];
    rng.fill(&mut bytes[..2 * M as usize]);
    rng.fill(&mut bytes[5 * M as usize..6 * M as usize]);
    std::fs::write(&src, &bytes).unwrap();
    let target = Arc::new(MemDriver::from_bytes(&vec![0x55; size as usize]).unwrap());
    let server = Server::start(&format!("unix:{}", dir.path().join("s.sock").display())).unwrap();
    server.add("t", target.clone(), true).unwrap();
    run("qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", src.to_str().unwrap(), &uri(&server, "t")]);
    assert!(target.to_vec() == bytes, "the export holds the converted image");
}

/// LIST_META_CONTEXT with prefix queries (`qemu:`, `qemu:dirty-bitmap:`, `base:`), and
/// SET_META_CONTEXT with exact names only; unknown namespaces are ignored.
#[test]
fn meta_context_queries() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let server = Server::start(&format!("unix:{}", sock.display())).unwrap();
    server.add("d", Arc::new(MemDriver::new(M).unwrap()), false).unwrap();
    for b in ["b1", "b0"] {
        server.add_bitmap("d", b, DirtyBitmap::new(M, 65536).unwrap()).unwrap();
    }
    let limits = Limits::default();
    let mut s = hello(&sock);
    let ask = |s: &mut UnixStream, set: bool, queries: &[&str]| -> Vec<(u32, String)> {
        let req = MetaContextRequest { export: "d".into(), queries: queries.iter().map(|q| q.to_string()).collect() };
        let mut out = Vec::new();
        if set { ClientOption::SetMetaContext(req) } else { ClientOption::ListMetaContext(req) }
            .encode(&mut out)
            .unwrap();
        s.write_all(&out).unwrap();
        let mut v = Vec::new();
        loop {
            match read_option_reply(s, &limits).unwrap().parse().unwrap() {
                OptionReplyBody::MetaContext { id, name } => v.push((id, name)),
                OptionReplyBody::Ack => return v,
                OptionReplyBody::Error { code, .. } => {
                    v.push((code, String::new()));
                    return v;
                }
                other => panic!("{other:?}"),
            }
        }
    };
    // Before STRUCTURED_REPLY: invalid.
    assert_eq!(ask(&mut s, false, &[]), vec![(REP_ERR_INVALID, String::new())]);
    let mut out = Vec::new();
    ClientOption::StructuredReply.encode(&mut out).unwrap();
    s.write_all(&out).unwrap();
    assert_eq!(read_option_reply(&mut s, &limits).unwrap().reply_type, REP_ACK);
    let names = |v: Vec<(u32, String)>| v.into_iter().map(|(_, n)| n).collect::<Vec<_>>();
    let all = vec!["base:allocation", "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"];
    assert_eq!(names(ask(&mut s, false, &[])), all);
    assert_eq!(names(ask(&mut s, false, &["qemu:"])), all[1..]);
    assert_eq!(names(ask(&mut s, false, &["qemu:dirty-bitmap:"])), all[1..]);
    assert_eq!(names(ask(&mut s, false, &["base:", "x-other:thing"])), all[..1]);
    assert_eq!(names(ask(&mut s, false, &["qemu:dirty-bitmap:b1", "qemu:dirty-bitmap:zz"])), all[2..]);
    // SET: exact names, ids nonzero and distinct; wildcards select nothing.
    assert!(ask(&mut s, true, &["qemu:"]).is_empty());
    let set = ask(&mut s, true, &["qemu:dirty-bitmap:b1", "base:allocation"]);
    assert_eq!(set.len(), 2);
    assert!(set.iter().all(|(id, _)| *id != 0) && set[0].0 != set[1].0);
}
