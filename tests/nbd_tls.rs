//! NBD over TLS (src/nbd/tls.rs): our server and client with each other and with the
//! real tools (nbdinfo, nbdcopy, qemu-img, qemu-nbd, nbdkit), client authorization by
//! subject DN and fingerprint, plaintext clients refused before learning anything, the
//! insecure-address rule, 0600 sockets, and bounded resources (idle timeout, write payloads,
//! client deadlines). The certificates are made by `openssl` in each test. A test skips,
//! saying why, only when a tool is not installed.
#![cfg(feature = "tls")]

mod common;
#[path = "support/pki.rs"]
mod pki;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Rng;
use cowbackup::nbd::proto::*;
use cowbackup::nbd::{ClientTls, Server, ServerOptions, ServerTls};
use cowbackup::{BlockDriver, MemDriver, NbdDriver, NbdOptions};

fn have(tool: &str) -> bool {
    // `openssl version` (it has no --version).
    let arg = if tool == "openssl" { "version" } else { "--version" };
    Command::new(tool).arg(arg).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

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

/// Run a command (120 s limit); (success, stdout, stderr).
fn try_run(prog: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new("timeout").arg("120").arg(prog).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[track_caller]
fn run(prog: &str, args: &[&str]) -> String {
    let (ok, out, err) = try_run(prog, args);
    assert!(ok, "{prog} {args:?} failed: {out}{err}");
    out
}

/// A throwaway PKI in a temp dir: a CA, a server certificate for `localhost` and
/// 127.0.0.1, client certificates for alice and bob, laid out as GnuTLS tools want them:
/// `server/` (ca-cert, server-cert, server-key), `alice/` and `bob/` (ca-cert,
/// client-cert, client-key), `anon/` (ca-cert only).
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        pki::make(dir.path());
        Pki { dir }
    }
    fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn s(&self, name: &str) -> String {
        self.p(name).to_str().unwrap().to_owned()
    }
    /// `sha256:HEX` of a PEM certificate.
    fn fingerprint(&self, cert: &str) -> String {
        let out = run("openssl", &["x509", "-in", &self.s(cert), "-noout", "-fingerprint", "-sha256"]);
        let hex = out.trim().rsplit('=').next().unwrap().replace(':', "").to_lowercase();
        format!("sha256:{hex}")
    }
    fn server_tls(&self, client_certs: bool) -> ServerTls {
        let ca = self.p("ca-cert.pem");
        ServerTls::from_pem_files(
            &self.p("server-cert.pem"),
            &self.p("server-key.pem"),
            client_certs.then_some(ca.as_path()),
        )
        .unwrap()
    }
    fn client(&self, who: Option<&str>) -> ClientTls {
        ClientTls {
            ca_pem: Some(self.p("ca-cert.pem")),
            cert_pem: who.map(|w| self.p(&format!("{w}-cert.pem"))),
            key_pem: who.map(|w| self.p(&format!("{w}-key.pem"))),
            ..Default::default()
        }
    }
}

fn data(n: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; n];
    Rng::new(seed).fill(&mut v[..n / 2]); // second half zero: holes in the reply
    v
}

/// A server with TLS on loopback TCP exporting "disk" (read-only) and "rw" (writable).
fn tls_server(tls: ServerTls) -> (Server, Vec<u8>, Arc<MemDriver>) {
    let opts = ServerOptions { tls: Some(tls), ..Default::default() };
    let server = Server::start_with("tcp:127.0.0.1:0", opts).unwrap();
    let content = data(4 << 20, 7);
    let disk = Arc::new(MemDriver::new(content.len() as u64).unwrap());
    disk.write_at(&content, 0).unwrap();
    server.add("disk", disk, false).unwrap();
    let rw = Arc::new(MemDriver::new(1 << 20).unwrap());
    server.add("rw", rw.clone(), true).unwrap();
    (server, content, rw)
}

fn port(server: &Server) -> u16 {
    server.address().rsplit(':').next().unwrap().parse().unwrap()
}

fn connect_tls(uri: &str, tls: ClientTls) -> std::io::Result<NbdDriver> {
    NbdDriver::connect_with(uri, &NbdOptions { tls: Some(tls), timeout: Duration::from_secs(20), ..Default::default() })
}

fn errno(e: &std::io::Error) -> i32 {
    cowbackup::errno_of(e)
}

#[test]
fn our_client_and_server_over_tls_with_and_without_client_certs() {
    need!("openssl");
    let pki = Pki::new();
    // Server certificate only.
    let (server, content, rw) = tls_server(pki.server_tls(false));
    let p = port(&server);
    let d = connect_tls(&format!("nbds://localhost:{p}/disk"), pki.client(None)).unwrap();
    assert_eq!(d.size(), content.len() as u64);
    let mut buf = vec![0u8; content.len()];
    d.read_at(&mut buf, 0).unwrap();
    assert!(buf == content, "data over TLS differs");
    // Multi-conn: several connections, all TLS.
    std::thread::scope(|s| {
        for i in 0..4u64 {
            let d = &d;
            let content = &content;
            s.spawn(move || {
                let mut b = vec![0u8; 1 << 20];
                d.read_at(&mut b, i << 20).unwrap();
                assert!(b[..] == content[(i << 20) as usize..((i + 1) << 20) as usize]);
            });
        }
    });
    // Writes over TLS; by IP address (the certificate has IP:127.0.0.1).
    let w = connect_tls(&format!("nbds://127.0.0.1:{p}/rw"), pki.client(None)).unwrap();
    w.write_at(&[0xab; 8192], 4096).unwrap();
    w.flush().unwrap();
    let mut b = [0u8; 8192];
    rw.read_at(&mut b, 4096).unwrap();
    assert_eq!(b, [0xab; 8192]);
    // A plaintext URI to a TLS server: refused (TLS required), no export info.
    let e = NbdDriver::connect(&format!("nbd://127.0.0.1:{p}/disk")).unwrap_err();
    assert_eq!(errno(&e), libc::EACCES, "{e}");
    assert!(e.to_string().contains("requires TLS"), "{e}");
    // The wrong name: the certificate is for localhost/127.0.0.1, not for "example".
    let mut t = pki.client(None);
    t.hostname = Some("example".into());
    let e = connect_tls(&format!("nbds://127.0.0.1:{p}/disk"), t).unwrap_err();
    assert!(e.to_string().contains("TLS"), "{e}");
    // A pinned fingerprint: the server's passes, another fails.
    let fp = pki.fingerprint("server-cert.pem");
    let pin = cowbackup::nbd::tls::parse_fingerprint(&fp).unwrap();
    let t = ClientTls { pin_sha256: Some(pin), ..Default::default() };
    connect_tls(&format!("nbds://127.0.0.1:{p}/disk"), t).unwrap();
    let t = ClientTls { pin_sha256: Some([1; 32]), ..Default::default() };
    assert!(connect_tls(&format!("nbds://127.0.0.1:{p}/disk"), t).is_err());
    NbdDriver::connect_tls(&format!("nbds://localhost:{p}/disk"), pki.client(None)).unwrap();
    // tls-certificates=DIR in the URI (libnbd's layout).
    let uri = format!("nbds://localhost:{p}/disk?tls-certificates={}", pki.s("anon"));
    NbdDriver::connect(&uri).unwrap();
    drop((d, w));
    server.stop();

    // Client certificates required and an allow-list: alice by DN, bob not listed.
    let mut tls = pki.server_tls(true);
    tls.allow("CN=alice,O=cowbackup").unwrap();
    let (server, _, _) = tls_server(tls);
    let uri = format!("nbds://localhost:{}/disk", port(&server));
    connect_tls(&uri, pki.client(Some("alice"))).unwrap();
    assert!(connect_tls(&uri, pki.client(Some("bob"))).is_err(), "bob is not on the allow-list");
    assert!(connect_tls(&uri, pki.client(None)).is_err(), "a client without a certificate");
    server.stop();
    // bob by fingerprint.
    let mut tls = pki.server_tls(true);
    tls.allow(&pki.fingerprint("bob-cert.pem")).unwrap();
    let (server, _, _) = tls_server(tls);
    let uri = format!("nbds://localhost:{}/disk", port(&server));
    connect_tls(&uri, pki.client(Some("bob"))).unwrap();
    assert!(connect_tls(&uri, pki.client(Some("alice"))).is_err());
    server.stop();
}

#[test]
fn bad_tls_settings_are_einval() {
    need!("openssl");
    let pki = Pki::new();
    let e = ServerTls::from_pem_files(&pki.p("nope.pem"), &pki.p("server-key.pem"), None).unwrap_err();
    assert_eq!(e.errno(), libc::ENOENT);
    let e = ServerTls::from_pem_files(&pki.p("server-key.pem"), &pki.p("server-key.pem"), None).unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL, "{e}");
    // A key that does not belong to the certificate.
    let e = ServerTls::from_pem_files(&pki.p("server-cert.pem"), &pki.p("alice-key.pem"), None).unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL, "{e}");
    let mut t = pki.server_tls(false);
    assert_eq!(t.allow("CN=x").unwrap_err().errno(), libc::EINVAL, "allow without a CA");
    let mut t2 = pki.server_tls(true);
    for bad in ["", "sha256:12", "garbage"] {
        assert_eq!(t2.allow(bad).unwrap_err().errno(), libc::EINVAL, "{bad:?}");
    }
    let _ = &mut t;
    // TLS settings with a plaintext URI; a client certificate without its key.
    let e = NbdDriver::connect_with(
        "nbd://127.0.0.1:1/x",
        &NbdOptions { tls: Some(pki.client(None)), ..Default::default() },
    )
    .unwrap_err();
    assert_eq!(errno(&e), libc::EINVAL);
    let t = ClientTls { key_pem: None, ..pki.client(Some("alice")) };
    let e = connect_tls("nbds://127.0.0.1:1/x", t).unwrap_err();
    assert_eq!(errno(&e), libc::EINVAL, "{e}");
}

/// Raw plaintext client: every option before STARTTLS gets ERR_TLS_REQD and no data.
#[test]
fn plaintext_clients_learn_nothing() {
    need!("openssl");
    let pki = Pki::new();
    let (server, _, _) = tls_server(pki.server_tls(false));
    let mut s = TcpStream::connect(server.address().strip_prefix("tcp:").unwrap()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&1u32.to_be_bytes()).unwrap(); // FIXED_NEWSTYLE
    let option = |s: &mut TcpStream, code: u32, data: &[u8]| -> (u32, Vec<u8>) {
        let mut o = Vec::new();
        o.extend_from_slice(b"IHAVEOPT");
        o.extend_from_slice(&code.to_be_bytes());
        o.extend_from_slice(&(data.len() as u32).to_be_bytes());
        o.extend_from_slice(data);
        s.write_all(&o).unwrap();
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        let typ = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut body = vec![0u8; len as usize];
        s.read_exact(&mut body).unwrap();
        (typ, body)
    };
    let mut go = Vec::new();
    go.extend_from_slice(&4u32.to_be_bytes());
    go.extend_from_slice(b"disk");
    go.extend_from_slice(&0u16.to_be_bytes());
    for (code, data) in [
        (OPT_LIST, &[][..]),
        (OPT_INFO, &go[..]),
        (OPT_GO, &go[..]),
        (OPT_STRUCTURED_REPLY, &[][..]),
        (OPT_LIST_META_CONTEXT, &[0, 0, 0, 4, b'd', b'i', b's', b'k', 0, 0, 0, 0][..]),
        (99, &[][..]),
    ] {
        let (typ, body) = option(&mut s, code, data);
        assert_eq!(typ, REP_ERR_TLS_REQD, "option {code}");
        let text = String::from_utf8_lossy(&body);
        assert!(!text.contains("disk") && !text.contains("rw"), "option {code} leaked {text:?}");
    }
    // STARTTLS with data is invalid; EXPORT_NAME just closes.
    assert_eq!(option(&mut s, OPT_STARTTLS, b"x").0, REP_ERR_INVALID);
    let mut o = Vec::new();
    o.extend_from_slice(b"IHAVEOPT");
    o.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
    o.extend_from_slice(&4u32.to_be_bytes());
    o.extend_from_slice(b"disk");
    s.write_all(&o).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "EXPORT_NAME before TLS got {} bytes", rest.len());
    server.stop();
}

#[test]
fn insecure_addresses_and_socket_modes() {
    // 0.0.0.0 without TLS: EPERM unless insecure.
    let e = Server::start("tcp:0.0.0.0:0").unwrap_err();
    assert_eq!(e.errno(), libc::EPERM, "{e}");
    assert!(e.to_string().contains("insecure"), "{e}");
    let s = Server::start_with("tcp:0.0.0.0:0", ServerOptions { insecure: true, ..Default::default() }).unwrap();
    s.stop();
    // Loopback is fine without TLS.
    Server::start("tcp:127.0.0.1:0").unwrap().stop();
    // Unix sockets are created 0600 whatever the umask.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    let s = Server::start(&format!("unix:{}", path.display())).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
    s.stop();
}

/// An idle client past the handshake is closed after the idle timeout, so the slots free up.
#[test]
fn idle_connections_are_closed_and_slots_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    let opts = ServerOptions { max_connections: 2, idle_timeout: Duration::from_millis(500), ..Default::default() };
    let server = Server::start_with(&format!("unix:{}", path.display()), opts).unwrap();
    server.add("d", Arc::new(MemDriver::new(1 << 20).unwrap()), false).unwrap();
    let uri = format!("nbd+unix:///d?socket={}", path.display());
    let hold: Vec<NbdDriver> = (0..2).map(|_| NbdDriver::connect(&uri).unwrap()).collect();
    // Both slots are taken by idle clients; within the idle timeout (plus slack for a
    // loaded machine) they are closed and a new client gets in.
    let start = Instant::now();
    loop {
        if server.connections() == 0 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "idle connections never closed");
        std::thread::sleep(Duration::from_millis(50));
    }
    let d = NbdDriver::connect(&uri).unwrap();
    let mut b = [1u8; 512];
    d.read_at(&mut b, 0).unwrap();
    // An idled driver finds its connection closed (that request fails) and reconnects
    // on the next one.
    if let Err(e) = hold[0].read_at(&mut b, 0) {
        assert!([libc::EPIPE, libc::ECONNRESET].contains(&errno(&e)), "{e}");
        hold[0].read_at(&mut b, 0).unwrap();
    }
    server.stop();
}

/// WRITE headers claiming 32 MiB with no payload cost no memory up front; a read-only
/// export drains the payload in small pieces and answers EPERM.
#[test]
fn write_payloads_grow_as_data_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    let server = Server::start(&format!("unix:{}", path.display())).unwrap();
    server.add("ro", Arc::new(MemDriver::new(64 << 20).unwrap()), false).unwrap();
    let rss = || -> u64 {
        let s = std::fs::read_to_string("/proc/self/status").unwrap();
        let l = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
    };
    let connect = || {
        let mut s = UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        s.write_all(&3u32.to_be_bytes()).unwrap(); // FIXED_NEWSTYLE | NO_ZEROES
        let mut o = Vec::new();
        o.extend_from_slice(b"IHAVEOPT");
        o.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
        o.extend_from_slice(&2u32.to_be_bytes());
        o.extend_from_slice(b"ro");
        s.write_all(&o).unwrap();
        let mut r = [0u8; 10];
        s.read_exact(&mut r).unwrap();
        s
    };
    let before = rss();
    let mut socks = Vec::new();
    for _ in 0..12 {
        let mut s = connect();
        let req = Request { flags: CommandFlags::empty(), command: CMD_WRITE, cookie: 9, offset: 0, len: 32 << 20 };
        s.write_all(&req.encode()).unwrap();
        socks.push(s);
    }
    std::thread::sleep(Duration::from_millis(500));
    let grown = rss().saturating_sub(before);
    assert!(grown < 64 << 20, "12 WRITE headers of 32 MiB grew RSS by {} MiB", grown >> 20);
    // Send one payload in full: the read-only export answers EPERM after draining it.
    let s = &mut socks[0];
    let chunk = vec![0x55u8; 1 << 20];
    for _ in 0..32 {
        s.write_all(&chunk).unwrap();
    }
    let mut reply = [0u8; 16];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(u32::from_be_bytes(reply[4..8].try_into().unwrap()), NBD_EPERM);
    drop(socks);
    server.stop();
}

/// A server that answers the handshake and then trickles a reply one byte every 200 ms:
/// the client's request deadline ends the read (ETIMEDOUT), however many bytes trickle.
#[test]
fn client_deadlines_bound_trickling_and_silent_servers() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        // Connection 1: greeting then silence (handshake timeout).
        let (mut s, _) = l.accept().unwrap();
        let mut g = Vec::new();
        g.extend_from_slice(b"NBDMAGIC");
        g.extend_from_slice(b"IHAVEOPT");
        g.extend_from_slice(&3u16.to_be_bytes());
        s.write_all(&g).unwrap();
        let mut sink = [0u8; 4096];
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        while s.read(&mut sink).is_ok_and(|n| n > 0) {}
        // Connection 2: greeting then one byte per 200 ms forever (until the client leaves).
        let (mut s, _) = l.accept().unwrap();
        s.write_all(&g).unwrap();
        let _ = s.set_read_timeout(Some(Duration::from_millis(10)));
        for _ in 0..500 {
            let _ = s.read(&mut sink);
            if s.write_all(&[0]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let uri = format!("nbd://127.0.0.1:{}/x", addr.port());
    let opts = NbdOptions { timeout: Duration::from_millis(1500), ..Default::default() };
    let start = Instant::now();
    let e = NbdDriver::connect_with(&uri, &opts).unwrap_err();
    assert_eq!(errno(&e), libc::ETIMEDOUT, "{e}");
    let e = NbdDriver::connect_with(&uri, &opts).unwrap_err();
    assert_eq!(errno(&e), libc::ETIMEDOUT, "{e}");
    // Both bounded by the deadline, not by the trickle (which would last 100 s).
    assert!(start.elapsed() < Duration::from_secs(30), "took {:?}", start.elapsed());
    t.join().unwrap();
}

// ---------------------------------------------------------------------------------------
// Interop with the real tools
// ---------------------------------------------------------------------------------------

#[test]
fn nbdinfo_and_nbdcopy_over_tls() {
    need!("openssl", "nbdinfo", "nbdcopy");
    let pki = Pki::new();
    let mut tls = pki.server_tls(true);
    tls.allow("CN=alice,O=cowbackup").unwrap();
    let (server, content, _) = tls_server(tls);
    let p = port(&server);
    let uri = |who: &str| format!("nbds://localhost:{p}/disk?tls-certificates={}", pki.s(who));
    let info = run("nbdinfo", &["--json", &uri("alice")]);
    assert!(info.contains(&format!("\"export-size\": {}", content.len())), "{info}");
    let out = pki.p("copy.img");
    run("nbdcopy", &[&uri("alice"), out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == content, "nbdcopy over TLS copied other data");
    // bob's certificate is not on the allow-list; a client without one is refused too.
    let (ok, _, _) = try_run("nbdinfo", &[&uri("bob")]);
    assert!(!ok, "bob got in");
    let (ok, _, _) = try_run("nbdinfo", &[&uri("anon")]);
    assert!(!ok, "a client without a certificate got in");
    // Plaintext: nbdinfo --list learns no export name.
    let (ok, out, err) = try_run("nbdinfo", &["--list", &format!("nbd://localhost:{p}")]);
    assert!(!ok || !out.contains("disk"), "plaintext --list: {out}{err}");
    assert!(!out.contains("disk") && !err.contains("\"disk\""), "plaintext --list leaked: {out}{err}");
    server.stop();

    // Server certificate only: a client without a certificate gets in.
    let (server, content, _) = tls_server(pki.server_tls(false));
    let u = format!("nbds://localhost:{}/disk?tls-certificates={}", port(&server), pki.s("anon"));
    let out = pki.p("copy2.img");
    run("nbdcopy", &[&u, out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == content);
    server.stop();
}

#[test]
fn qemu_img_over_tls() {
    need!("openssl", "qemu-img");
    let pki = Pki::new();
    let mut tls = pki.server_tls(true);
    tls.allow("CN=alice,O=cowbackup").unwrap();
    let (server, content, _) = tls_server(tls);
    let p = port(&server);
    let obj = |who: &str| format!("tls-creds-x509,id=tls0,endpoint=client,dir={}", pki.s(who));
    let src = format!("json:{{\"driver\":\"nbd\",\"host\":\"localhost\",\"port\":\"{p}\",\"export\":\"disk\",\"tls-creds\":\"tls0\"}}");
    let out = pki.p("q.raw");
    run("qemu-img", &["convert", "--object", &obj("alice"), "-O", "raw", &src, out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == content, "qemu-img convert over TLS");
    let map = run("qemu-img", &["map", "--output=json", "--object", &obj("alice"), &src]);
    // The map covers the whole export (block status over TLS).
    let num = |after: &str, key: &str| -> u64 {
        let i = after.find(key).unwrap() + key.len();
        after[i..].trim_start().split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
    };
    let end = map.split('{').skip(1).map(|e| num(e, "\"start\":") + num(e, "\"length\":")).max().unwrap();
    assert_eq!(end, content.len() as u64, "{map}");
    let (ok, _, _) = try_run("qemu-img", &["info", "--object", &obj("bob"), &src]);
    assert!(!ok, "bob got in through qemu-img");
    server.stop();
}

/// Start a server process and wait until `probe` connects (bounded).
fn spawn_until(mut c: Command, probe: impl Fn() -> bool) -> Child {
    let mut child = c.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let start = Instant::now();
    while !probe() {
        if let Ok(Some(st)) = child.try_wait() {
            let mut e = String::new();
            child.stderr.take().unwrap().read_to_string(&mut e).unwrap();
            panic!("server exited {st}: {e}");
        }
        assert!(start.elapsed() < Duration::from_secs(60), "server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn our_client_against_qemu_nbd_and_nbdkit_with_tls() {
    need!("openssl", "qemu-nbd", "qemu-img");
    let pki = Pki::new();
    let img = pki.p("disk.raw");
    let content = data(2 << 20, 3);
    std::fs::write(&img, &content).unwrap();
    let sock = pki.p("q.sock");
    let mut c = Command::new("qemu-nbd");
    c.args([
        "--object",
        &format!("tls-creds-x509,id=tls0,endpoint=server,dir={},verify-peer=no", pki.s("server")),
        "--tls-creds",
        "tls0",
        "--persistent",
        "--shared=4",
        "-f",
        "raw",
        "-x",
        "disk",
        "-k",
        sock.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    let _q = Kill(spawn_until(c, || UnixStream::connect(&sock).is_ok()));
    let uri = format!("nbds+unix:///disk?socket={}", sock.display());
    let d = connect_tls(&uri, pki.client(None)).unwrap();
    let mut b = vec![0u8; content.len()];
    d.read_at(&mut b, 0).unwrap();
    assert!(b == content, "reading qemu-nbd over TLS");
    drop(d);
    // Plaintext to qemu-nbd --tls-creds: refused.
    let e = NbdDriver::connect(&format!("nbd+unix:///disk?socket={}", sock.display())).unwrap_err();
    assert_eq!(errno(&e), libc::EACCES, "{e}");

    if !have("nbdkit") {
        eprintln!("SKIP nbdkit part: nbdkit is not installed");
        return;
    }
    let ksock = pki.p("k.sock");
    let mut c = Command::new("nbdkit");
    c.args([
        "-f",
        "--tls=require",
        &format!("--tls-certificates={}", pki.s("server")),
        "--tls-verify-peer",
        "-U",
        ksock.to_str().unwrap(),
        "file",
        img.to_str().unwrap(),
    ]);
    let _k = Kill(spawn_until(c, || UnixStream::connect(&ksock).is_ok()));
    let uri = format!("nbds+unix:///?socket={}", ksock.display());
    let d = connect_tls(&uri, pki.client(Some("alice"))).unwrap();
    let mut b = vec![0u8; content.len()];
    d.read_at(&mut b, 0).unwrap();
    assert!(b == content, "reading nbdkit over TLS");
    d.write_at(&[7u8; 4096], 0).unwrap();
    d.flush().unwrap();
    assert_eq!(std::fs::read(&img).unwrap()[..4096], [7u8; 4096]);
    // nbdkit --tls-verify-peer refuses a client without a certificate.
    assert!(connect_tls(&uri, pki.client(None)).is_err());
    let _ = Path::new("");
}

// ---------------------------------------------------------------------------------------
// A hostile server against our client (the evil_server.py findings)
// ---------------------------------------------------------------------------------------

const REPMAGIC: u64 = 0x0003_e889_0455_65a9;

fn rep(s: &mut UnixStream, opt: u32, typ: u32, data: &[u8]) -> std::io::Result<()> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&REPMAGIC.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&typ.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b)
}

/// Serve one connection's handshake per `scenario` on a Unix socket; for "ok"-style
/// scenarios go on to transmission, where "trickle_write" answers writes one byte per
/// 300 ms. Every loop ends when the client goes away or after 120 s.
fn evil_server(scenario: &'static str) -> (tempfile::TempDir, String, std::thread::JoinHandle<()>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("evil.sock");
    let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let t = std::thread::spawn(move || {
        let end = Instant::now() + Duration::from_secs(120);
        l.set_nonblocking(true).unwrap();
        while Instant::now() < end {
            let mut s = match l.accept() {
                Ok((s, _)) => s,
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
            };
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let _ = evil_conn(&mut s, scenario, end);
            if scenario != "trickle_write" {
                return; // one connection per scenario
            }
        }
    });
    (dir, format!("nbd+unix:///?socket={}", path.display()), t)
}

fn evil_conn(s: &mut UnixStream, scenario: &str, end: Instant) -> std::io::Result<()> {
    let mut g = Vec::new();
    g.extend_from_slice(b"NBDMAGICIHAVEOPT");
    g.extend_from_slice(&3u16.to_be_bytes());
    s.write_all(&g)?;
    let mut f = [0u8; 4];
    s.read_exact(&mut f)?;
    loop {
        let mut h = [0u8; 16];
        s.read_exact(&mut h)?;
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        match opt {
            OPT_STRUCTURED_REPLY => rep(s, opt, 1, &[])?,
            OPT_SET_META_CONTEXT if scenario == "meta_flood" => {
                // Valid-looking replies, never an ACK, as fast as the client reads.
                while Instant::now() < end {
                    let mut d = 4u32.to_be_bytes().to_vec();
                    d.extend_from_slice(b"junk");
                    rep(s, opt, 2, &d)?;
                }
                return Ok(());
            }
            OPT_SET_META_CONTEXT => {
                let mut d = 1u32.to_be_bytes().to_vec();
                d.extend_from_slice(b"base:allocation");
                rep(s, opt, 4, &d)?;
                rep(s, opt, 1, &[])?;
            }
            OPT_GO if scenario == "endless_info" => {
                // An unknown INFO every 100 ms, never an ACK.
                while Instant::now() < end {
                    rep(s, opt, 3, &[0x77, 0x77, b'j', b'u', b'n', b'k'])?;
                    std::thread::sleep(Duration::from_millis(100));
                }
                return Ok(());
            }
            OPT_GO => {
                let mut d = 0u16.to_be_bytes().to_vec();
                d.extend_from_slice(&(1u64 << 20).to_be_bytes());
                d.extend_from_slice(&(1u16 | 4 | 0x100).to_be_bytes());
                rep(s, opt, 3, &d)?;
                rep(s, opt, 1, &[])?;
                break;
            }
            _ => rep(s, opt, 0x8000_0001, &[])?,
        }
    }
    // Transmission: reads answered at once, writes trickled.
    loop {
        let mut h = [0u8; 28];
        s.read_exact(&mut h)?;
        let cmd = u16::from_be_bytes(h[6..8].try_into().unwrap());
        let cookie = &h[8..16];
        let len = u32::from_be_bytes(h[24..28].try_into().unwrap());
        if cmd == CMD_WRITE {
            let mut p = vec![0u8; len as usize];
            s.read_exact(&mut p)?;
        }
        if cmd == CMD_DISC {
            return Ok(());
        }
        let mut reply = 0x6744_6698u32.to_be_bytes().to_vec();
        reply.extend_from_slice(&0u32.to_be_bytes());
        reply.extend_from_slice(cookie);
        for b in reply {
            if Instant::now() > end {
                return Ok(());
            }
            s.write_all(&[b])?;
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

#[test]
fn endless_handshake_replies_are_bounded() {
    let opts = NbdOptions { timeout: Duration::from_secs(2), ..Default::default() };
    // Endless INFO replies (slow): the handshake deadline ends it with ETIMEDOUT.
    let (_d, uri, t) = evil_server("endless_info");
    let start = Instant::now();
    let e = NbdDriver::connect_with(&uri, &opts).unwrap_err();
    assert_eq!(errno(&e), libc::ETIMEDOUT, "{e}");
    assert!(start.elapsed() < Duration::from_secs(30), "{:?}", start.elapsed());
    t.join().unwrap();
    // A flood of meta contexts (fast): cut after a bounded number of replies.
    let (_d, uri, t) = evil_server("meta_flood");
    let e = NbdDriver::connect_with(&uri, &opts).unwrap_err();
    assert!([libc::EIO, libc::ETIMEDOUT].contains(&errno(&e)), "{e}");
    t.join().unwrap();
}

/// A backup job whose NBD target trickles every write reply: cancel + wait return within
/// the driver's request timeout (plus slack for a loaded machine), not the trickle's time.
#[test]
fn cancel_unblocks_a_job_stuck_on_a_trickling_nbd_target() {
    let (_d, uri, _t) = evil_server("trickle_write");
    let opts = NbdOptions { timeout: Duration::from_secs(2), ..Default::default() };
    let target = Arc::new(NbdDriver::connect_with(&uri, &opts).unwrap());
    let src = Arc::new(MemDriver::new(1 << 20).unwrap());
    src.write_at(&data(1 << 20, 9)[..], 0).unwrap();
    let job = cowbackup::backup_start(src, target, cowbackup::BackupOptions::default()).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let start = Instant::now();
    job.cancel();
    let _ = job.wait();
    let took = start.elapsed();
    // The bound: one request timeout (2 s here, 30 s by default) per write in flight, which
    // run in parallel; 20 s leaves room for a loaded machine.
    assert!(took < Duration::from_secs(20), "cancel + wait took {took:?}");
}

/// nbds:// to a server without TLS: STARTTLS is refused and the open fails (ENOTSUP), never a
/// plaintext fallback.
#[test]
fn no_plaintext_fallback_when_the_server_has_no_tls() {
    need!("openssl");
    let pki = Pki::new();
    let server = Server::start("tcp:127.0.0.1:0").unwrap();
    server.add("disk", Arc::new(MemDriver::new(1 << 20).unwrap()), false).unwrap();
    let e = connect_tls(&format!("nbds://localhost:{}/disk", port(&server)), pki.client(None)).unwrap_err();
    assert_eq!(errno(&e), libc::ENOTSUP, "{e}");
    server.stop();
}
