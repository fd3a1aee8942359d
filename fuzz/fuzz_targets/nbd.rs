//! Fuzz target `nbd`: the NBD handshake and request stream, from both ends.
//!
//! The first byte picks what the rest is:
//! - 0: everything a client could send a server, parsed by `nbd::proto`
//!   (`fuzz_server_input`: client flags, options until GO, requests and payloads);
//! - 1: everything a server could send a client (`fuzz_client_input`: greeting, option
//!   replies, reply headers and chunks checked against a request);
//! - 2 and up: the bytes are sent to a **live** `nbd::Server` (one per process, on a Unix
//!   socket, exporting a 1 MiB writable memory disk and a read-only one with a dirty bitmap)
//!   as one client's whole conversation; then a well-behaved client (`NbdDriver`) must
//!   still connect and read the read-only disk back unchanged. The server must never
//!   panic (its connection threads catch panics, so a panic is detected by a hook that
//!   aborts), never hang (the read of its answer has a time limit) and never stop serving.
#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use cowbackup::drivers::nbd::NbdDriver;
use cowbackup::nbd::{proto, Server};
use cowbackup::{BlockDriver, DirtyBitmap, MemDriver};
use libfuzzer_sys::fuzz_target;

const SIZE: u64 = 1 << 20;

struct Live {
    server: Server,
    socket: String,
    pattern: Vec<u8>,
    _dir: std::path::PathBuf,
}

fn pattern() -> Vec<u8> {
    (0..SIZE as usize).map(|i| (i * 7 + i / 4096) as u8).collect()
}

fn live() -> &'static Live {
    static LIVE: OnceLock<Live> = OnceLock::new();
    LIVE.get_or_init(|| {
        // A panic anywhere (also a caught one in a server thread) is a finding.
        std::panic::set_hook(Box::new(|info| {
            eprintln!("panic: {info}");
            std::process::abort();
        }));
        let dir = std::env::temp_dir().join(format!("cowbackup-fuzz-nbd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("nbd.sock").to_str().unwrap().to_string();
        let server = Server::start(&format!("unix:{socket}")).unwrap();
        let pattern = pattern();
        let ro: Arc<dyn BlockDriver> = Arc::new(MemDriver::from_bytes(&pattern).unwrap());
        let rw: Arc<dyn BlockDriver> = Arc::new(MemDriver::new(SIZE).unwrap());
        server.add("ro", ro, false).unwrap();
        server.add("rw", rw, true).unwrap();
        let bm = DirtyBitmap::new(SIZE, 65536).unwrap();
        bm.mark(65536, 3 * 65536).unwrap();
        server.add_bitmap("ro", "b0", bm).unwrap();
        Live { server, socket, pattern, _dir: dir }
    })
}

fn converse(live: &Live, data: &[u8]) {
    let Ok(mut s) = UnixStream::connect(&live.socket) else {
        panic!("the server stopped accepting connections");
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    // The server may close early (bad magic, limits): a failed write is fine.
    let _ = s.write_all(data);
    let _ = s.shutdown(std::net::Shutdown::Write);
    // Drain its answers until it closes; a server that neither answers nor closes within
    // the time limit after our end of stream is a hang.
    let mut buf = [0u8; 65536];
    let mut total = 0usize;
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                total += n;
                // Bounded: a short conversation cannot make it send without end.
                assert!(total < 256 << 20, "the server sent {total} bytes to a {}-byte conversation", data.len());
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                panic!("the server neither answered nor closed within 10 s")
            }
            Err(_) => break, // reset: it gave up on this client
        }
    }
}

fn check_still_serving(live: &Live) {
    let uri = format!("nbd+unix:///ro?socket={}", live.socket);
    let d = NbdDriver::connect(&uri).expect("a good client cannot connect after the fuzzed one");
    assert_eq!(d.size(), SIZE);
    let mut b = vec![0u8; 8192];
    d.read_at(&mut b, SIZE - 8192).expect("a good client cannot read");
    assert_eq!(&b[..], &live.pattern[(SIZE - 8192) as usize..], "the read-only export changed");
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode {
        0 => {
            proto::fuzz_server_input(rest);
        }
        1 => {
            proto::fuzz_client_input(rest);
        }
        _ => {
            let l = live();
            converse(l, rest);
            check_still_serving(l);
            let _ = l.server.address();
        }
    }
});
