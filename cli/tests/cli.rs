//! The `cowbackup` command driven as a user would: real files, real processes, and the
//! real peers (qemu-img, qemu-nbd, qemu-storage-daemon, nbdinfo) where they are installed
//! (each test that needs one skips with a reason when it is missing).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use cowbackup::{BlockDriver, DirtyBitmap, NbdDriver};

#[path = "../../tests/support/pki.rs"]
mod pki;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_cowbackup");
const MIB: u64 = 1 << 20;

/// Runs the command. A bitmap file this test opened and closed may still be locked for a
/// moment (a child that another test thread forked meanwhile holds a copy of its descriptor,
/// and so its flock, until that child's exec closes it): a run that failed only because the
/// bitmap "is already open" is retried for up to 5 s (a test that expects that failure
/// still gets it, later).
fn cowbackup(args: &[&str]) -> Output {
    let mut out = Command::new(BIN).args(args).stdin(Stdio::null()).output().expect("run cowbackup");
    for _ in 0..50 {
        if out.status.code() != Some(1) || !String::from_utf8_lossy(&out.stderr).contains("is already open") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        out = Command::new(BIN).args(args).stdin(Stdio::null()).output().expect("run cowbackup");
    }
    eprintln!(
        "$ cowbackup {}\n-> {:?}\nstdout: {}\nstderr: {}",
        args.join(" "),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn ok(args: &[&str]) -> Output {
    let out = cowbackup(args);
    assert_eq!(out.status.code(), Some(0), "cowbackup {args:?} failed");
    out
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}

/// The command failed with `code` and one error line `cowbackup: error: …` containing `needle`.
fn fails(args: &[&str], code: i32, needle: &str) -> Output {
    let out = cowbackup(args);
    assert_eq!(out.status.code(), Some(code), "cowbackup {args:?}: wrong exit status");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(needle), "stderr {err:?} lacks {needle:?}");
    if code == 1 {
        let lines: Vec<_> = err.lines().collect();
        assert_eq!(lines.len(), 1, "one error line, got {err:?}");
        assert!(lines[0].starts_with("cowbackup: error: "), "{err:?}");
    }
    out
}

fn have(tool: &str) -> bool {
    Command::new(tool).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok()
}

macro_rules! need {
    ($($tool:expr),+) => {
        $(if !have($tool) {
            eprintln!("skipped: {} is not installed", $tool);
            return;
        })+
    };
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A deterministic image: data in some places, holes elsewhere.
fn make_image(path: &Path, size: u64, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; size as usize];
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut off = 0usize;
    while off < data.len() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let run = (((x >> 8) % 300) as usize + 1) * 4096;
        let end = (off + run).min(data.len());
        if x % 3 != 0 {
            for (i, b) in data[off..end].iter_mut().enumerate() {
                *b = (x >> (i % 56)) as u8 | 1;
            }
        }
        off = end;
    }
    std::fs::write(path, &data).unwrap();
    data
}

fn wait_child(child: &mut Child, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} did not exit within 120 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn kill(child: &Child, sig: i32) {
    // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn full_backup_is_the_image_and_json_counts_add_up() {
    let dir = tempdir();
    let src = dir.path().join("src.img");
    let dst = dir.path().join("dst.img");
    let data = make_image(&src, 24 * MIB, 1);
    let out = ok(&["backup", p(&src), p(&dst), "--json", "--cluster-size", "128K", "--workers", "3"]);
    assert_eq!(std::fs::read(&dst).unwrap(), data);
    let v = json(&out);
    assert_eq!(v["result"], "completed");
    assert_eq!(v["size"], 24 * MIB);
    assert_eq!(v["cluster_size"], 128 * 1024);
    assert_eq!(v["target_kind"], "file");
    let sum = ["bytes_copied", "bytes_zero", "bytes_skipped", "bytes_failed"]
        .iter()
        .map(|k| v[k].as_u64().unwrap())
        .sum::<u64>();
    assert_eq!(sum, 24 * MIB);
    assert!(v["bytes_copied"].as_u64().unwrap() > 0 && v["bytes_zero"].as_u64().unwrap() > 0);
    assert!(v["seconds"].as_f64().unwrap() >= 0.0);
    // The new target is sparse where the image reads zero, and a peer agrees on content.
    if have("qemu-img") {
        let st = Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", p(&src), p(&dst)]).status();
        assert!(st.unwrap().success());
    }
}

#[test]
fn sync_top_speed_max_chunk_and_progress_lines() {
    let dir = tempdir();
    let src = dir.path().join("src.img");
    let dst = dir.path().join("dst.img");
    let data = make_image(&src, 8 * MIB, 2);
    let out = ok(&[
        "backup",
        p(&src),
        p(&dst),
        "--sync",
        "top",
        "--speed",
        "1G",
        "--max-chunk",
        "256K",
        "--progress=always",
        "--json",
    ]);
    assert_eq!(std::fs::read(&dst).unwrap(), data);
    let v = json(&out);
    assert_eq!(v["sync"], "top");
    // Not a terminal, progress forced: plain lines ending at 100 %.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.lines().last().unwrap().starts_with("progress: 100.0% (8388608/8388608 bytes)"), "{err}");
    // -p alone draws only on a terminal: nothing on a pipe.
    let dst2 = dir.path().join("dst2.img");
    let out = ok(&["backup", "-p", p(&src), p(&dst2)]);
    assert!(out.stderr.is_empty() && out.stdout.is_empty());
}

#[test]
fn an_existing_target_is_never_replaced_without_overwrite() {
    let dir = tempdir();
    let src = dir.path().join("src.img");
    let dst = dir.path().join("dst.img");
    let data = make_image(&src, 2 * MIB, 3);
    std::fs::write(&dst, b"precious").unwrap();
    fails(&["backup", p(&src), p(&dst)], 1, "exists; pass --overwrite");
    assert_eq!(std::fs::read(&dst).unwrap(), b"precious");
    ok(&["backup", "--overwrite", p(&src), p(&dst)]);
    assert_eq!(std::fs::read(&dst).unwrap(), data);
}

#[test]
fn usage_errors_exit_2_and_change_nothing() {
    let dir = tempdir();
    let src = dir.path().join("src.img");
    let dst = dir.path().join("dst.img");
    make_image(&src, MIB, 4);
    let s = p(&src);
    let d = p(&dst);
    fails(&["backup", s], 2, "<DST>");
    fails(&["backup", s, d, "--incremental"], 2, "--bitmap");
    fails(&["backup", s, d, "--cluster-size", "3K"], 2, "cluster_size");
    fails(&["backup", s, d, "--cluster-size", "64Q"], 2, "suffix");
    fails(&["backup", s, d, "--workers", "0"], 2, "workers");
    fails(&["backup", s, d, "--sync", "sideways"], 2, "sideways");
    fails(&["bitmap", "create", p(&dir.path().join("b"))], 2, "--size");
    fails(&["nonsense"], 2, "nonsense");
    assert!(!dst.exists(), "a usage error created the target");
    assert!(!dir.path().join("b").exists());
    // --help of every subcommand works.
    for sub in [
        &["backup"][..],
        &["bitmap", "dump"],
        &["serve"],
        &["ctl"],
        &["pull"],
        &["verify"],
        &["restore"],
        &["consolidate"],
    ] {
        let mut a = sub.to_vec();
        a.push("--help");
        let out = ok(&a);
        assert!(String::from_utf8_lossy(&out.stdout).contains("Usage: cowbackup"));
    }
}

#[test]
fn failures_exit_1_with_one_line() {
    let dir = tempdir();
    let missing = dir.path().join("missing.img");
    let dst = dir.path().join("dst.img");
    fails(&["backup", p(&missing), p(&dst)], 1, "missing.img");
    let sock = dir.path().join("nobody.sock");
    let uri = format!("nbd+unix:///?socket={}", p(&sock));
    fails(&["backup", &uri, p(&dst)], 1, "nobody.sock");
    assert!(!dst.exists());
    fails(&["bitmap", "info", p(&missing)], 1, "missing.img");
}

/// Marks `ranges` in the bitmap file and writes new data there in the image, as a host's
/// write path does (mark first, then write). Returns the image's new contents.
fn host_writes(img: &Path, bitmap: &Path, ranges: &[(u64, u64)], byte: u8) -> Vec<u8> {
    let bm = DirtyBitmap::open(bitmap).unwrap();
    let mut data = std::fs::read(img).unwrap();
    for &(off, len) in ranges {
        bm.mark(off, len).unwrap();
        data[off as usize..(off + len) as usize].fill(byte);
    }
    drop(bm);
    std::fs::write(img, &data).unwrap();
    data
}

#[test]
fn incremental_chain_with_a_bitmap_file() {
    let dir = tempdir();
    let src = dir.path().join("disk.img");
    let bm = dir.path().join("disk.bitmap");
    let full = dir.path().join("full.img");
    let inc1 = dir.path().join("inc1.img");
    let inc2 = dir.path().join("inc2.img");
    make_image(&src, 16 * MIB, 5);

    // A full backup with --bitmap creates the bitmap file and anchors the chain.
    let v = json(&ok(&["backup", p(&src), p(&full), "--bitmap", p(&bm), "--granularity", "64K", "--json"]));
    assert_eq!(v["bitmap"]["count"], 0);
    assert_eq!(v["bitmap"]["granularity"], 65536);
    let uuid = v["bitmap"]["uuid"].as_str().unwrap().to_owned();

    let ranges = [(0, 4096), (3 * MIB + 100, 70_000), (16 * MIB - 65536, 65536)];
    let now = host_writes(&src, &bm, &ranges, 0xA5);
    let v = json(&ok(&["backup", p(&src), p(&inc1), "--bitmap", p(&bm), "--incremental", "--json"]));
    assert_eq!(v["sync"], "bitmap");
    assert_eq!(v["result"], "completed");
    // 64 KiB clusters: the first range one cluster, the second crosses two, the last one.
    assert_eq!(v["bytes_copied"].as_u64().unwrap() + v["bytes_zero"].as_u64().unwrap(), 4 * 65536);
    assert_eq!(v["bytes_skipped"], 16 * MIB - 4 * 65536);
    assert_eq!(v["bitmap"]["uuid"], uuid.as_str());
    assert_eq!(v["bitmap"]["count"], 0, "a successful incremental leaves only newer writes");
    let gen1 = v["bitmap"]["generation"].as_u64().unwrap();
    assert!(gen1 > 0);
    // The incremental holds the changed clusters; everything else reads zero.
    let got = std::fs::read(&inc1).unwrap();
    for c in 0..(16 * MIB / 65536) {
        let r = (c * 65536) as usize..((c + 1) * 65536) as usize;
        let dirty = ranges.iter().any(|&(o, l)| o < (c + 1) * 65536 && c * 65536 < o + l);
        if dirty {
            assert_eq!(got[r.clone()], now[r], "cluster {c}");
        } else {
            assert!(got[r].iter().all(|&b| b == 0), "cluster {c} should not be in the incremental");
        }
    }

    // Nothing written since: the next incremental copies nothing, and the chain goes on.
    let v =
        json(&ok(&["backup", p(&src), p(&inc2), "--bitmap", p(&bm), "--incremental", "--json", "--progress=never"]));
    assert_eq!(v["bytes_copied"], 0);
    assert_eq!(v["bitmap"]["generation"].as_u64().unwrap(), gen1);

    // An incremental needs an existing bitmap file; a bitmap of another size is refused.
    fails(
        &["backup", p(&src), p(&dir.path().join("x.img")), "--bitmap", p(&dir.path().join("none")), "--incremental"],
        1,
        "none",
    );
    let small = dir.path().join("small.bitmap");
    ok(&["bitmap", "create", p(&small), "--size", "1M"]);
    fails(&["backup", p(&src), p(&dir.path().join("y.img")), "--bitmap", p(&small), "--incremental"], 1, "covers");
    assert!(!dir.path().join("y.img").exists());
}

#[test]
fn bitmap_create_info_dump_clear_merge() {
    let dir = tempdir();
    let a = dir.path().join("a.bitmap");
    let b = dir.path().join("b.bitmap");
    let img = dir.path().join("img");
    make_image(&img, 4 * MIB, 6);

    let v = json(&ok(&["bitmap", "create", p(&a), "--size", "4M", "--granularity", "64K", "--json"]));
    assert_eq!(v["size"], 4 * MIB);
    assert_eq!(v["granularity"], 65536);
    assert_eq!(v["count"], 0);
    assert_eq!(v["flags"], serde_json::json!(["recording", "persistent"]));
    ok(&["bitmap", "create", p(&b), "--like", p(&img), "--granularity", "4K"]);
    fails(&["bitmap", "create", p(&b), "--size", "1M"], 1, "b.bitmap");

    {
        let bm = DirtyBitmap::open(&a).unwrap();
        bm.mark(0, 1).unwrap();
        bm.mark(65536, 65536).unwrap();
        bm.mark(MIB, 10).unwrap();
        let bm = DirtyBitmap::open(&b).unwrap();
        bm.mark(2 * MIB, 4096).unwrap();
    }
    let text = String::from_utf8(ok(&["bitmap", "dump", p(&a)]).stdout).unwrap();
    assert_eq!(text, format!("0 131072\n{} 65536\n", MIB));
    let v = json(&ok(&["bitmap", "dump", p(&a), "--json"]));
    assert_eq!(v, serde_json::json!([{"offset": 0, "length": 131072}, {"offset": MIB, "length": 65536}]));

    let info = String::from_utf8(ok(&["bitmap", "info", p(&a)]).stdout).unwrap();
    for want in ["size: 4194304", "granularity: 65536", "count: 196608", "generation: 0", "flags: recording,persistent"]
    {
        assert!(info.contains(want), "{info:?} lacks {want:?}");
    }
    let uuid = json(&ok(&["bitmap", "info", p(&a), "--json"]))["uuid"].as_str().unwrap().to_owned();
    assert_eq!(uuid.len(), 36);

    // Merge b (4 KiB granularity) into a (64 KiB): a gains the 64 KiB granule around it.
    let v = json(&ok(&["bitmap", "merge", p(&a), p(&b), "--json"]));
    assert_eq!(v["count"], 4 * 65536);
    assert_eq!(v["generation"], 0, "a merge removes no bits");
    // A source of another size: refused, the destination unchanged.
    let other = dir.path().join("other.bitmap");
    ok(&["bitmap", "create", p(&other), "--size", "8M"]);
    fails(&["bitmap", "merge", p(&a), p(&b), p(&other)], 1, "other.bitmap");
    assert_eq!(json(&ok(&["bitmap", "info", p(&a), "--json"]))["count"], 4 * 65536);

    let v = json(&ok(&["bitmap", "clear", p(&a), "--json"]));
    assert_eq!(v["count"], 0);
    assert_eq!(v["generation"], 1);
    assert_eq!(v["uuid"], uuid.as_str());
    assert!(ok(&["bitmap", "dump", p(&a)]).stdout.is_empty());

    // A bitmap in use by another opener is busy, not damaged.
    let held = DirtyBitmap::open(&b).unwrap();
    fails(&["bitmap", "clear", p(&b)], 1, "b.bitmap");
    drop(held);
    // A file that is not a bitmap.
    fails(&["bitmap", "info", p(&img)], 1, "img");
}

/// Starts `cowbackup serve` and returns it with the URI it printed.
fn serve(args: &[&str]) -> (Child, String) {
    // A bitmap file this test opened and closed may still be locked for a moment: a child
    // that another test thread forked meanwhile holds a copy of its descriptor (and so the
    // flock) until that child's exec closes it. Such a serve is retried, for a bounded time.
    for attempt in 0.. {
        let mut child = Command::new(BIN)
            .arg("serve")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
        if !line.is_empty() {
            return (child, line.trim().to_owned());
        }
        let mut err = String::new();
        child.stderr.as_mut().unwrap().read_to_string(&mut err).unwrap();
        let _ = child.wait();
        if err.contains("is already open") && attempt < 50 {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        panic!("serve printed no URI; stderr: {err}");
    }
    unreachable!()
}

#[test]
fn serve_an_image_over_a_unix_socket_until_sigterm() {
    let dir = tempdir();
    let img = dir.path().join("img");
    let sock = dir.path().join("nbd.sock");
    let data = make_image(&img, 4 * MIB, 7);
    let (mut child, uri) = serve(&[p(&img), "--socket", p(&sock), "--export", "disk"]);
    assert_eq!(uri, format!("nbd+unix:///disk?socket={}", p(&sock)));
    let nbd = NbdDriver::connect(&uri).unwrap();
    assert!(nbd.is_read_only());
    let mut got = vec![0u8; data.len()];
    nbd.read_at(&mut got, 0).unwrap();
    assert_eq!(got, data);
    assert!(nbd.write_at(&[1], 0).is_err());
    drop(nbd);
    // A backup from the served image, by URI.
    let copy = dir.path().join("copy.img");
    ok(&["backup", &uri, p(&copy)]);
    assert_eq!(std::fs::read(&copy).unwrap(), data);
    if have("qemu-img") {
        let st = Command::new("qemu-img").args(["compare", "-f", "raw", p(&img), &uri]).status().unwrap();
        assert!(st.success());
    }
    kill(&child, libc::SIGTERM);
    assert!(wait_child(&mut child, "serve").success());
    assert!(!sock.exists(), "the socket stays behind");
    assert_eq!(std::fs::read(&img).unwrap(), data, "serving changed the image");
}

#[test]
fn serve_tcp_loopback_and_a_bitmap_that_peers_read() {
    let dir = tempdir();
    let img = dir.path().join("img");
    let bm = dir.path().join("bm");
    let data = make_image(&img, 2 * MIB, 8);
    ok(&["bitmap", "create", p(&bm), "--like", p(&img)]);
    DirtyBitmap::open(&bm).unwrap().mark(MIB, 65536).unwrap();
    // Not loopback without --insecure: a usage error, nothing listens.
    fails(&["serve", p(&img), "--tcp", "0.0.0.0:0"], 2, "--insecure");
    let (mut child, uri) =
        serve(&[p(&img), "--tcp", "127.0.0.1:0", "--bitmap", p(&bm), "--bitmap-name", "b0", "--json"]);
    let v: Value = serde_json::from_str(&uri).unwrap();
    let uri = v["uri"].as_str().unwrap().to_owned();
    assert!(uri.starts_with("nbd://127.0.0.1:") && uri.ends_with('/'), "{uri}");
    let nbd = NbdDriver::connect(&uri).unwrap();
    let mut got = vec![0u8; data.len()];
    nbd.read_at(&mut got, 0).unwrap();
    assert_eq!(got, data);
    drop(nbd);
    if have("nbdinfo") {
        let out = Command::new("nbdinfo").args(["--map=qemu:dirty-bitmap:b0", &uri]).output().unwrap();
        let map = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{map}");
        // "OFFSET LENGTH TYPE": the marked granule is dirty (1), the rest clean (0).
        let dirty: Vec<_> = map
            .lines()
            .filter_map(|l| {
                let f: Vec<_> = l.split_whitespace().collect();
                (f.len() >= 3 && f[2] == "1").then(|| (f[0].to_owned(), f[1].to_owned()))
            })
            .collect();
        assert_eq!(dirty, vec![(MIB.to_string(), "65536".to_string())], "{map}");
    }
    kill(&child, libc::SIGINT);
    assert!(wait_child(&mut child, "serve").success());
}

#[test]
fn serve_over_tls_with_an_allow_list() {
    need!("openssl");
    let dir = tempdir();
    let pki = dir.path().join("pki");
    std::fs::create_dir(&pki).unwrap();
    pki::make(&pki);
    let f = |n: &str| pki.join(n).to_str().unwrap().to_owned();
    let img = dir.path().join("img");
    let data = make_image(&img, 2 * MIB, 11);
    // Bad TLS arguments: usage errors before anything listens or opens the image.
    fails(&["serve", p(&img), "--tcp", "127.0.0.1:0", "--tls-cert", &f("server-cert.pem")], 2, "--tls-key");
    fails(&["serve", p(&img), "--tcp", "127.0.0.1:0", "--allow", "CN=alice"], 2, "--tls-ca");
    let missing = dir.path().join("missing.pem");
    fails(
        &["serve", p(&img), "--tcp", "127.0.0.1:0", "--tls-cert", &f("server-cert.pem"), "--tls-key", p(&missing)],
        2,
        "TLS",
    );
    // The server's TLS arguments, with client certificates and alice allowed.
    let (cert, key, ca) = (f("server-cert.pem"), f("server-key.pem"), f("ca-cert.pem"));
    let tls_args = |allow: &'static str| -> Vec<&str> {
        vec!["--tls-cert", &cert, "--tls-key", &key, "--tls-ca", &ca, "--allow", allow]
    };
    let mut args = vec!["serve", p(&img), "--tcp", "127.0.0.1:0"];
    args.extend(tls_args("not an identity"));
    fails(&args, 2, "--allow");
    // With TLS an address that is not loopback needs no --insecure.
    let mut args = vec![p(&img), "--tcp", "0.0.0.0:0", "--json"];
    args.extend(tls_args("CN=alice,O=cowbackup"));
    let (mut child, line) = serve(&args);
    let v: Value = serde_json::from_str(&line).unwrap();
    let uri = v["uri"].as_str().unwrap().to_owned();
    assert!(uri.starts_with("nbds://0.0.0.0:") && uri.ends_with('/'), "{uri}");
    let uri = uri.replace("0.0.0.0", "127.0.0.1");
    let client = |who: &str| cowbackup::NbdOptions {
        write: false,
        tls: Some(cowbackup::nbd::ClientTls {
            ca_pem: Some(pki.join("ca-cert.pem")),
            cert_pem: Some(pki.join(format!("{who}-cert.pem"))),
            key_pem: Some(pki.join(format!("{who}-key.pem"))),
            ..Default::default()
        }),
        ..Default::default()
    };
    // alice is on the allow-list and reads the image.
    let nbd = NbdDriver::connect_with(&uri, &client("alice")).unwrap();
    let mut got = vec![0u8; data.len()];
    nbd.read_at(&mut got, 0).unwrap();
    assert_eq!(got, data);
    drop(nbd);
    // bob's certificate is signed by the same CA but not allowed; a plaintext client
    // is refused before it learns anything.
    assert!(NbdDriver::connect_with(&uri, &client("bob")).is_err(), "bob got in");
    assert!(NbdDriver::connect(&uri.replace("nbds://", "nbd://")).is_err(), "a plaintext client got in");
    if have("nbdcopy") {
        let copy = dir.path().join("copy.img");
        let st =
            Command::new("nbdcopy").arg(format!("{uri}?tls-certificates={}", f("alice"))).arg(&copy).status().unwrap();
        assert!(st.success());
        assert_eq!(std::fs::read(&copy).unwrap(), data);
        let out = Command::new("nbdcopy")
            .arg(format!("{uri}?tls-certificates={}", f("bob")))
            .arg(dir.path().join("bob.img"))
            .output()
            .unwrap();
        assert!(!out.status.success(), "nbdcopy with bob's certificate got in");
    }
    // A backup by URI, as a client names its certificates (libnbd's directory layout).
    let copy = dir.path().join("backup.img");
    ok(&["backup", &format!("{uri}?tls-certificates={}", f("alice")), p(&copy)]);
    assert_eq!(std::fs::read(&copy).unwrap(), data);
    kill(&child, libc::SIGTERM);
    assert!(wait_child(&mut child, "serve").success());
    assert_eq!(std::fs::read(&img).unwrap(), data, "serving changed the image");
}

#[test]
fn sigint_cancels_a_backup_and_fails() {
    let dir = tempdir();
    let src = dir.path().join("src.img");
    let dst = dir.path().join("dst.img");
    make_image(&src, 64 * MIB, 9);
    // 1 MiB/s: the backup takes a minute unless cancelled.
    let mut child = Command::new(BIN)
        .args(["backup", p(&src), p(&dst), "--speed", "1M", "--progress=always"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The first progress line says the job runs (and the signal thread is up).
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    assert!(line.starts_with("progress: "), "{line}");
    kill(&child, libc::SIGINT);
    let st = wait_child(&mut child, "backup");
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).unwrap();
    assert_eq!(st.code(), Some(1), "{rest}");
    assert!(rest.contains("cowbackup: error: ") && rest.contains("cancelled by SIGINT"), "{rest}");
}

/// qemu-nbd serving `path` (format `fmt`) on a Unix socket; killed on drop.
struct QemuNbd(Child, PathBuf);

impl QemuNbd {
    fn start(path: &Path, fmt: &str, sock: &Path, read_only: bool) -> QemuNbd {
        let mut cmd = Command::new("qemu-nbd");
        cmd.args(["-t", "-f", fmt, "-k", p(sock), "-x", "d", "-e", "4"]);
        if read_only {
            cmd.arg("-r");
        }
        let child = cmd.arg(path).stdin(Stdio::null()).spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::os::unix::net::UnixStream::connect(sock).is_err() {
            assert!(Instant::now() < deadline, "qemu-nbd did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        QemuNbd(child, sock.to_owned())
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///d?socket={}", p(&self.1))
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        kill(&self.0, libc::SIGTERM);
        wait_child(&mut self.0, "qemu-nbd");
    }
}

#[test]
fn backup_from_and_to_qemu_nbd() {
    need!("qemu-img", "qemu-nbd");
    let dir = tempdir();
    let src = dir.path().join("src.img");
    let data = make_image(&src, 8 * MIB, 10);
    // Into a qcow2 image served writable by qemu-nbd.
    let q = dir.path().join("t.qcow2");
    assert!(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", p(&q), "8M"]).status().unwrap().success());
    {
        let srv = QemuNbd::start(&q, "qcow2", &dir.path().join("t.sock"), false);
        let v = json(&ok(&["backup", p(&src), &srv.uri(), "--json"]));
        assert_eq!(v["target_kind"], "nbd");
    }
    let st = Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "qcow2", p(&src), p(&q)]).status();
    assert!(st.unwrap().success());
    // From the qcow2 served read-only, into a file.
    let back = dir.path().join("back.img");
    {
        let srv = QemuNbd::start(&q, "qcow2", &dir.path().join("s.sock"), true);
        ok(&["backup", &srv.uri(), p(&back)]);
        // A read-only export is no target.
        fails(&["backup", p(&src), &srv.uri()], 1, "read-only");
    }
    assert_eq!(std::fs::read(&back).unwrap(), data);
}

/// qemu-storage-daemon with a QMP monitor on `sock` and a file node `f0`; killed on drop.
struct Qsd(Child);

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn ctl_speaks_qmp_to_qemu_storage_daemon() {
    need!("qemu-storage-daemon");
    let dir = tempdir();
    let img = dir.path().join("img");
    let sock = dir.path().join("qmp.sock");
    make_image(&img, MIB, 11);
    let mut qsd = Qsd(Command::new("qemu-storage-daemon")
        .args(["--chardev", &format!("socket,id=m0,path={},server=on,wait=off", p(&sock))])
        .args(["--monitor", "chardev=m0"])
        .args(["--blockdev", &format!("driver=file,node-name=f0,filename={}", p(&img))])
        .stdin(Stdio::null())
        .spawn()
        .unwrap());
    let deadline = Instant::now() + Duration::from_secs(60);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "qemu-storage-daemon did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let s = p(&sock);
    assert_eq!(json(&ok(&["ctl", s, "query-jobs"])), serde_json::json!([]));
    assert_eq!(json(&ok(&["ctl", s, "query-block-exports"])), serde_json::json!([]));
    // key=value arguments (a number parsed as JSON) and a JSON object.
    assert_eq!(
        json(&ok(&["ctl", s, "block-dirty-bitmap-add", "node=f0", "name=b0", "granularity=131072"])),
        serde_json::json!({})
    );
    let nodes = json(&ok(&["ctl", s, "query-named-block-nodes", r#"{"flat": true}"#]));
    let f0 = nodes.as_array().unwrap().iter().find(|n| n["node-name"] == "f0").expect("node f0");
    assert_eq!(f0["dirty-bitmaps"][0]["name"], "b0");
    assert_eq!(f0["dirty-bitmaps"][0]["granularity"], 131072);
    // A QMP error: exit 1 with its desc.
    fails(&["ctl", s, "block-dirty-bitmap-add", "node=f0", "name=b0"], 1, "b0");
    fails(&["ctl", s, "no-such-command"], 1, "no-such-command");
    // Bad arguments never reach the server.
    fails(&["ctl", s, "query-jobs", "novalue"], 2, "KEY=VALUE");
    fails(&["ctl", p(&dir.path().join("none.sock")), "query-jobs"], 1, "none.sock");
    ok(&["ctl", s, "quit"]);
    assert!(wait_child(&mut qsd.0, "qemu-storage-daemon").success());
}

/// Checks that `got` holds `want` exactly in the `dirty` ranges and zeroes elsewhere.
fn assert_only(got: &[u8], want: &[u8], dirty: &[(u64, u64)]) {
    assert_eq!(got.len(), want.len());
    let mut at = 0usize;
    for &(o, l) in dirty {
        let (o, l) = (o as usize, l as usize);
        assert!(got[at..o].iter().all(|&b| b == 0), "data outside the dirty extents in {at}..{o}");
        assert!(got[o..o + l] == want[o..o + l], "dirty extent {o}+{l} differs");
        at = o + l;
    }
    assert!(got[at..].iter().all(|&b| b == 0), "data after the last dirty extent");
}

#[test]
fn pull_from_our_own_server() {
    let dir = tempdir();
    let img = dir.path().join("img");
    let bm = dir.path().join("bm");
    let sock = dir.path().join("nbd.sock");
    let data = make_image(&img, 8 * MIB, 12);
    ok(&["bitmap", "create", p(&bm), "--like", p(&img), "--granularity", "64K"]);
    {
        let b = DirtyBitmap::open(&bm).unwrap();
        b.mark(0, 1).unwrap();
        b.mark(3 * MIB + 5, 200_000).unwrap();
        b.mark(8 * MIB - 1, 1).unwrap();
    }
    let dirty = [(0, 65536), (3 * MIB, 4 * 65536), (8 * MIB - 65536, 65536)];
    let (mut child, uri) = serve(&[p(&img), "--socket", p(&sock), "--export", "d", "--bitmap", p(&bm)]);
    let out = dir.path().join("inc.img");
    let m = dir.path().join("inc.manifest");
    let v = json(&ok(&["pull", &uri, p(&out), "--bitmap", "bitmap0", "--json", "--manifest", p(&m)]));
    assert_eq!(v["result"], "completed");
    assert_eq!(v["manifest"], p(&m));
    // The manifest holds the pulled extents: verify checks them.
    let r = json(&ok(&["verify", p(&m), "--json"]));
    assert_eq!(r["result"], "ok");
    assert_eq!(r["bytes_checked"], 6 * 65536);
    assert_eq!(v["dirty_bytes"], 6 * 65536);
    assert_eq!(v["dirty_extents"], 3);
    assert_eq!(v["bytes_skipped"], 8 * MIB - 6 * 65536);
    assert_only(&std::fs::read(&out).unwrap(), &data, &dirty);
    // No such bitmap: a clear error, no target.
    let none = dir.path().join("none.img");
    fails(&["pull", &uri, p(&none), "--bitmap", "nope"], 1, "qemu:dirty-bitmap:nope");
    assert!(!none.exists());
    // Not an NBD URI: a usage error.
    fails(&["pull", p(&img), p(&none), "--bitmap", "bitmap0"], 2, "NBD URI");
    kill(&child, libc::SIGTERM);
    assert!(wait_child(&mut child, "serve").success());
}

#[test]
fn pull_from_qemu_storage_daemon_fleecing_export() {
    need!("qemu-img", "qemu-io", "qemu-storage-daemon");
    let dir = tempdir();
    let d = dir.path();
    let disk = d.join("disk.qcow2");
    let fleece = d.join("fleece.qcow2");
    let sock = d.join("nbd.sock");
    let run = |args: &[&str]| {
        let st = Command::new(args[0]).args(&args[1..]).stdout(Stdio::null()).status().unwrap();
        assert!(st.success(), "{args:?}");
    };
    run(&["qemu-img", "create", "-q", "-f", "qcow2", p(&disk), "16M"]);
    run(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 16M", p(&disk)]);
    // A persistent bitmap, then writes that qemu-io records in it.
    run(&["qemu-img", "bitmap", "--add", p(&disk), "b0"]);
    run(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x22 1M 64k", "-c", "write -P 0x33 5M 200k", p(&disk)]);
    run(&["qemu-img", "create", "-q", "-f", "qcow2", p(&fleece), "16M"]);
    // Fleecing: copy-before-write into the scratch image, its snapshot-access node
    // exported with the bitmap (QEMU's pull-mode backup).
    let mut qsd = Qsd(Command::new("qemu-storage-daemon")
        .args(["--blockdev", &format!("driver=file,node-name=disk-file,filename={}", p(&disk))])
        .args(["--blockdev", "driver=qcow2,node-name=disk,file=disk-file"])
        .args(["--blockdev", &format!("driver=file,node-name=tmp-file,filename={}", p(&fleece))])
        .args(["--blockdev", "driver=qcow2,node-name=tmp,file=tmp-file"])
        .args(["--blockdev", r#"{"driver":"copy-before-write","node-name":"cbw","file":"disk","target":"tmp"}"#])
        .args(["--blockdev", "driver=snapshot-access,node-name=acc,file=cbw"])
        .args(["--nbd-server", &format!("addr.type=unix,addr.path={}", p(&sock))])
        .args([
            "--export",
            r#"{"type":"nbd","id":"e0","node-name":"acc","name":"fleece","bitmaps":[{"node":"disk","name":"b0"}]}"#,
        ])
        .stdin(Stdio::null())
        .spawn()
        .unwrap());
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(Instant::now() < deadline, "qemu-storage-daemon did not start");
        assert!(qsd.0.try_wait().unwrap().is_none(), "qemu-storage-daemon exited");
        std::thread::sleep(Duration::from_millis(20));
    }
    let uri = format!("nbd+unix:///fleece?socket={}", p(&sock));
    let out = d.join("inc.img");
    let v = json(&ok(&["pull", &uri, p(&out), "--bitmap", "b0", "--json", "--progress=always"]));
    assert_eq!(v["result"], "completed");
    // 64 KiB at 1 MiB; 200 KiB at 5 MiB = four 64 KiB granules.
    assert_eq!(v["dirty_bytes"], 5 * 65536);
    let mut want = vec![0x11u8; 16 << 20];
    want[1 << 20..(1 << 20) + 65536].fill(0x22);
    want[5 << 20..(5 << 20) + 200 * 1024].fill(0x33);
    assert_only(&std::fs::read(&out).unwrap(), &want, &[(1 << 20, 65536), (5 << 20, 4 * 65536)]);
    drop(qsd);
}

#[test]
fn manifests_verify_restore_serve_chain_consolidate() {
    let dir = tempdir();
    let d = dir.path();
    let (src, bm) = (d.join("disk.img"), d.join("disk.bitmap"));
    let (full, fullm) = (d.join("full.img"), d.join("full.manifest"));
    let (inc, incm) = (d.join("inc1.img"), d.join("inc1.manifest"));
    let t0 = make_image(&src, 8 * MIB, 13);
    let v = json(&ok(&[
        "backup",
        p(&src),
        p(&full),
        "--bitmap",
        p(&bm),
        "--manifest",
        p(&fullm),
        "--disk-id",
        "vm1-disk0",
        "--json",
    ]));
    assert_eq!(v["manifest"], p(&fullm));
    let t1 = host_writes(&src, &bm, &[(MIB, 4096), (6 * MIB + 1, 300_000)], 0x5A);
    ok(&[
        "backup",
        p(&src),
        p(&inc),
        "--bitmap",
        p(&bm),
        "--incremental",
        "--manifest",
        p(&incm),
        "--disk-id",
        "vm1-disk0",
    ]);
    // A manifest is never replaced.
    fails(&["backup", p(&src), p(&d.join("again.img")), "--manifest", p(&fullm)], 1, "full.manifest");

    // verify: the target named in the manifest, or one given.
    let out = ok(&["verify", p(&fullm)]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));
    let v = json(&ok(&["verify", p(&incm), p(&inc), "--json"]));
    assert_eq!(v["result"], "ok");
    assert_eq!(v["mismatched_clusters"], 0);
    assert!(v["clusters_checked"].as_u64().unwrap() >= 6);

    // restore the chain: the point in time of the incremental.
    let r = d.join("restored.img");
    let v = json(&ok(&["restore", p(&fullm), p(&incm), p(&r), "--json"]));
    assert_eq!(v["result"], "completed");
    assert_eq!(std::fs::read(&r).unwrap(), t1);
    // The full backup alone: the first point in time.
    let r0 = d.join("restored0.img");
    ok(&["restore", p(&fullm), p(&r0)]);
    assert_eq!(std::fs::read(&r0).unwrap(), t0);
    // A broken chain (the incremental alone) is refused, nothing created.
    let bad = d.join("bad.img");
    fails(&["restore", p(&incm), p(&bad)], 1, "chain");
    assert!(!bad.exists());
    fails(&["restore", p(&fullm), p(&r0)], 1, "--overwrite");

    // serve --chain: instant access over NBD.
    let sock = d.join("chain.sock");
    let (mut child, uri) = serve(&["--chain", p(&fullm), p(&incm), "--socket", p(&sock)]);
    let nbd = NbdDriver::connect(&uri).unwrap();
    let mut got = vec![0u8; t1.len()];
    nbd.read_at(&mut got, 0).unwrap();
    assert_eq!(got, t1);
    drop(nbd);
    kill(&child, libc::SIGTERM);
    assert!(wait_child(&mut child, "serve").success());

    // consolidate: one backup holding both; verified and restorable on its own.
    let (cimg, cm) = (d.join("merged.img"), d.join("merged.manifest"));
    ok(&["consolidate", p(&fullm), p(&incm), "--target", p(&cimg), "--manifest", p(&cm)]);
    ok(&["verify", p(&cm)]);
    let r2 = d.join("restored2.img");
    ok(&["restore", p(&cm), p(&r2)]);
    assert_eq!(std::fs::read(&r2).unwrap(), t1);

    // Damage: one flipped byte in the incremental's image.
    let mut b = std::fs::read(&inc).unwrap();
    b[MIB as usize] ^= 0xff;
    std::fs::write(&inc, &b).unwrap();
    let out = cowbackup(&["verify", p(&incm), "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let v = json(&out);
    assert_eq!(v["result"], "mismatch");
    assert_eq!(v["mismatched_clusters"], 1);
    assert_eq!(v["mismatches"][0]["offset"], MIB);
    fails(&["verify", p(&incm)], 1, "do not match");
    // restore reads with verification: the damage fails it.
    fails(&["restore", p(&fullm), p(&incm), p(&d.join("r3.img"))], 1, "restore");
}

/// A target that names itself as an RBD image (as `RbdDriver` does), over memory.
struct RbdNamed(cowbackup::MemDriver);

impl BlockDriver for RbdNamed {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn target_spec(&self) -> Option<String> {
        Some("rbd:nopool/noimage".to_string())
    }
}

/// A manifest naming an RBD image: `verify` and `restore` go to that image (and fail
/// clearly here: no such cluster, or a command built without the feature `rbd`).
#[test]
fn verify_and_restore_of_a_manifest_naming_an_rbd_image() {
    let dir = tempdir();
    let d = dir.path();
    let m = d.join("rbd.manifest");
    let src = std::sync::Arc::new(cowbackup::MemDriver::new(MIB).unwrap());
    let target = std::sync::Arc::new(RbdNamed(cowbackup::MemDriver::new(MIB).unwrap()));
    let opts = cowbackup::BackupOptions { manifest: Some(m.clone()), ..Default::default() };
    cowbackup::backup_start(src, target, opts).unwrap().wait().unwrap();
    let conf = d.join("no-ceph.conf");
    for args in [vec!["verify", p(&m)], vec!["restore", p(&m), p(&d.join("out.img"))]] {
        let out =
            Command::new(BIN).args(&args).env("CEPH_CONF", &conf).stdin(Stdio::null()).output().expect("run cowbackup");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains("rbd:nopool/noimage"), "{args:?}: {err}");
        if !cfg!(feature = "rbd") {
            assert!(err.contains("without RBD support") || err.contains("without the RBD driver"), "{err}");
        }
    }
    assert!(!d.join("out.img").exists(), "a failed restore leaves no destination");
}
