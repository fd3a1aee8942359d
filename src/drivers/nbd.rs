//! `NbdDriver`: a block device on an NBD server (`qemu-nbd`, `nbdkit`, `nbd-server`,
//! cowbackup's own `nbd::Server`), so a backup can be written to, or read from, remote
//! storage or any image format a server understands (a qcow2 image behind `qemu-nbd`).
//!
//! The driver speaks the fixed newstyle handshake with `NBD_OPT_GO` (falling back to
//! `NBD_OPT_EXPORT_NAME` on old servers), structured replies and the `base:allocation`
//! metadata context, through the wire format of [`crate::nbd::proto`]. Every reply is
//! checked against its request (cookie, offsets inside the request, negotiated context);
//! a connection that sends anything else is closed and the request fails with `EIO`.
//!
//! # Connections
//!
//! Requests are synchronous on a connection: one request, its whole reply, the next. The
//! driver keeps a small pool of connections; each call takes one for its duration, so
//! calls from several threads (a job's workers and the host's hook) run in parallel when
//! the server advertises `NBD_FLAG_CAN_MULTI_CONN` (up to [`NbdOptions::connections`]
//! connections, opened on demand). Without it, the spec gives no consistency between
//! connections, so the driver uses exactly one and calls take turns on it.
//!
//! # TLS and deadlines
//!
//! `nbds://` and `nbds+unix://` URIs (cargo feature `tls`) send `NBD_OPT_STARTTLS` first on
//! every connection and verify the server's certificate ([`crate::nbd::ClientTls`]: CA,
//! host name or IP, `localhost` for Unix sockets, optional pinned SHA-256); a server that
//! refuses fails the connect (`ENOTSUP`), never a plaintext fallback. Connecting plus the
//! whole handshake, and every request with its whole reply, must finish within
//! [`NbdOptions::timeout`] (`ETIMEDOUT`), however slowly a server trickles its bytes; a
//! handshake option gets at most 1024 replies. So a job stuck on a dead or hostile NBD
//! target notices a cancel within that timeout (30 s by default).
//!
//! A connection that fails (the server died, a timeout, a protocol violation) is closed;
//! the next call opens a new one. A write acknowledged on a lost connection and not yet
//! covered by a flush may be lost with it: the next [`BlockDriver::flush`] then fails with
//! `EIO` (once), so a job never reports success over writes that may be gone.

use std::fmt;
use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::driver::{write_zero_buffers, BlockDriver, BlockStatus, StatusFlags};
use crate::error::{Error, ErrorKind};
use crate::nbd::proto::{
    self, check_chunk, encode_client_flags, nbd_to_errno, parse_chunk, read_chunk_payload, read_export_name_reply,
    read_greeting, read_option_reply, read_reply_header, Chunk, ChunkHeader, ClientFlags, ClientOption, CommandFlags,
    Extent, HandshakeFlags, Info, InfoRequest, Limits, MetaContextRequest, OptionReplyBody, ProtoError, ReplyHeader,
    Request, TransmissionFlags, CMD_BLOCK_STATUS, CMD_DISC, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES,
    CONTEXT_BASE_ALLOCATION, INFO_BLOCK_SIZE, MAX_STRING, OPT_GO, OPT_SET_META_CONTEXT, OPT_STRUCTURED_REPLY,
    REPLY_TYPE_OFFSET_DATA, REP_ERR_INVALID, REP_ERR_PLATFORM, REP_ERR_POLICY, REP_ERR_SHUTDOWN, REP_ERR_TLS_REQD,
    REP_ERR_UNKNOWN, REP_ERR_UNSUP, STATE_HOLE, STATE_ZERO,
};

/// The NBD port assigned by IANA, used when a `nbd://` URI names none.
pub const NBD_DEFAULT_PORT: u16 = 10809;

/// The largest request the driver sends when the server names no maximum (the spec's
/// advice), and the most it sends even when the server allows more.
pub const NBD_MAX_REQUEST: u32 = 32 << 20;

/// Most bytes one `TRIM`, `WRITE_ZEROES` or `BLOCK_STATUS` request covers (they carry no
/// payload; larger ranges are split).
const MAX_NO_PAYLOAD: u64 = 1 << 30;

/// Most `BLOCK_STATUS` round trips [`BlockDriver::reads_as_zero`] spends before answering
/// `false`.
const ZERO_PROBES: usize = 64;

// ---------------------------------------------------------------------------------------
// URIs
// ---------------------------------------------------------------------------------------

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddress {
    /// TCP: a host name or IP address (IPv6 without brackets) and a port.
    Tcp {
        /// Host name or address.
        host: String,
        /// Port (default [`NBD_DEFAULT_PORT`]).
        port: u16,
    },
    /// A Unix domain socket: a path, or (first byte NUL) a Linux abstract socket name.
    Unix(PathBuf),
}

impl fmt::Display for NbdAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NbdAddress::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            NbdAddress::Tcp { host, port } => write!(f, "{host}:{port}"),
            NbdAddress::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A parsed NBD URI (the NBD project's `doc/uri.md`): `nbd://host[:port]/export` or
/// `nbd+unix:///export?socket=PATH`.
///
/// The export name is the path after its first `/`, percent-decoded (`nbd://h` and
/// `nbd://h/` name the default export ""; `nbd://h//x` names "/x"). The TLS schemes
/// `nbds://` and `nbds+unix://` (cargo feature `tls`) take the query parameters
/// `tls-hostname=NAME` (the name the server's certificate must carry) and
/// `tls-certificates=DIR` (libnbd's and QEMU's layout: `DIR/ca-cert.pem`, and
/// `DIR/client-cert.pem` + `DIR/client-key.pem` when present). Userinfo, fragments and
/// other query parameters than these and `socket` (for the `+unix` schemes only, required
/// there) are refused: the spec asks clients to diagnose parameters they do not understand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// The server.
    pub address: NbdAddress,
    /// The export name (may be empty: the server's default export).
    pub export: String,
    /// `nbds://` or `nbds+unix://`: TLS is required.
    pub tls: bool,
    /// `tls-hostname=`: the name to verify in the server's certificate.
    pub tls_hostname: Option<String>,
    /// `tls-certificates=`: a directory with `ca-cert.pem` (and optionally
    /// `client-cert.pem`, `client-key.pem`).
    pub tls_certificates: Option<PathBuf>,
}

fn bad_uri(uri: &str, why: impl fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, format!("invalid NBD URI \"{}\": {why}", uri.escape_debug()))
}

fn percent_decode(uri: &str, s: &str, what: &str) -> io::Result<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                Some(v) if hex.is_some_and(|h| h.bytes().all(|c| c.is_ascii_hexdigit())) => out.push(v),
                _ => return Err(bad_uri(uri, format!("bad percent-encoding in the {what}"))),
            }
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

impl NbdUri {
    /// Parse an NBD URI. Errors (`InvalidInput`, `EINVAL`) say what is wrong.
    pub fn parse(uri: &str) -> io::Result<NbdUri> {
        let Some((scheme, rest)) = uri.split_once("://") else {
            return Err(bad_uri(uri, "expected nbd://host[:port]/export or nbd+unix:///export?socket=PATH"));
        };
        let (unix, tls) = match scheme.to_ascii_lowercase().as_str() {
            "nbd" => (false, false),
            "nbd+unix" => (true, false),
            "nbds" => (false, true),
            "nbds+unix" => (true, true),
            "nbd+vsock" | "nbds+vsock" => return Err(bad_uri(uri, "vsock is not supported")),
            other => {
                return Err(bad_uri(
                    uri,
                    format!("unknown scheme \"{}\" (nbd:// or nbd+unix://)", other.escape_debug()),
                ))
            }
        };
        if rest.contains('#') {
            return Err(bad_uri(uri, "a fragment (#) is not allowed"));
        }
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = percent_decode(uri, path, "export name")?;
        let export = match String::from_utf8(export) {
            Ok(s) if !s.contains('\0') && s.len() <= MAX_STRING as usize => s,
            Ok(s) if s.contains('\0') => return Err(bad_uri(uri, "the export name contains NUL")),
            Ok(_) => return Err(bad_uri(uri, format!("the export name is longer than {MAX_STRING} bytes"))),
            Err(_) => return Err(bad_uri(uri, "the export name is not UTF-8")),
        };
        let mut socket: Option<Vec<u8>> = None;
        let mut tls_hostname: Option<String> = None;
        let mut tls_certificates: Option<PathBuf> = None;
        for param in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = param.split_once('=').unwrap_or((param, ""));
            let key = percent_decode(uri, key, "query")?;
            match &key[..] {
                b"socket" if unix => {
                    if socket.is_some() {
                        return Err(bad_uri(uri, "the socket parameter is given twice"));
                    }
                    socket = Some(percent_decode(uri, value, "socket parameter")?);
                }
                b"socket" => return Err(bad_uri(uri, "socket= is only for nbd+unix:// URIs")),
                b"tls-hostname" if tls => {
                    let v = String::from_utf8(percent_decode(uri, value, "tls-hostname")?)
                        .map_err(|_| bad_uri(uri, "tls-hostname is not UTF-8"))?;
                    if v.is_empty() || tls_hostname.is_some() {
                        return Err(bad_uri(uri, "tls-hostname is empty or given twice"));
                    }
                    tls_hostname = Some(v);
                }
                b"tls-certificates" if tls => {
                    let v = percent_decode(uri, value, "tls-certificates")?;
                    if v.is_empty() || tls_certificates.is_some() {
                        return Err(bad_uri(uri, "tls-certificates is empty or given twice"));
                    }
                    tls_certificates = Some(PathBuf::from(std::ffi::OsStr::from_bytes(&v)));
                }
                k if k.starts_with(b"tls") && !tls => {
                    return Err(bad_uri(uri, "TLS parameters need an nbds:// or nbds+unix:// URI"))
                }
                k => {
                    return Err(bad_uri(
                        uri,
                        format!("unknown query parameter \"{}\"", String::from_utf8_lossy(k).escape_debug()),
                    ))
                }
            }
        }
        if authority.contains('@') {
            return Err(bad_uri(uri, "userinfo (user@) is not supported"));
        }
        let address = if unix {
            if !authority.is_empty() {
                return Err(bad_uri(uri, "an nbd+unix URI has no host: nbd+unix:///export?socket=PATH"));
            }
            match socket {
                Some(s) if !s.is_empty() => NbdAddress::Unix(PathBuf::from(std::ffi::OsStr::from_bytes(&s))),
                Some(_) => return Err(bad_uri(uri, "the socket parameter is empty")),
                None => return Err(bad_uri(uri, "nbd+unix needs ?socket=PATH")),
            }
        } else {
            let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
                let Some((host, after)) = rest.split_once(']') else {
                    return Err(bad_uri(uri, "unclosed [ in the host"));
                };
                match after {
                    "" => (host, None),
                    p => match p.strip_prefix(':') {
                        Some(p) => (host, Some(p)),
                        None => return Err(bad_uri(uri, "junk after the IPv6 address")),
                    },
                }
            } else {
                match authority.split_once(':') {
                    Some((h, p)) => (h, Some(p)),
                    None => (authority, None),
                }
            };
            if host.is_empty() {
                return Err(bad_uri(uri, "no host: nbd://host[:port]/export"));
            }
            if !host.bytes().all(|c| c.is_ascii_alphanumeric() || b"-._:".contains(&c)) {
                return Err(bad_uri(uri, format!("bad host \"{}\"", host.escape_debug())));
            }
            let port = match port {
                None | Some("") => NBD_DEFAULT_PORT,
                Some(p) => match p.parse::<u16>() {
                    Ok(n) if n > 0 && p.bytes().all(|c| c.is_ascii_digit()) => n,
                    _ => return Err(bad_uri(uri, format!("bad port \"{}\"", p.escape_debug()))),
                },
            };
            NbdAddress::Tcp { host: host.to_owned(), port }
        };
        Ok(NbdUri { address, export, tls, tls_hostname, tls_certificates })
    }
}

// ---------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------

/// How [`NbdDriver::connect_with`] connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdOptions {
    /// Allow writes when the export allows them (default `true`). With `false`, or when
    /// the server says the export is read-only, the driver is read-only: writes, zeroing
    /// and trim fail with `EROFS`.
    pub write: bool,
    /// Most connections when the server advertises `CAN_MULTI_CONN` (default 4, at least 1).
    pub connections: usize,
    /// Deadline of connecting plus the whole handshake (TLS included), and of every
    /// request with its whole reply (default 30 s): a server that stops answering, or
    /// trickles its answer a byte at a time, fails the request with `ETIMEDOUT` instead of
    /// hanging it. This is also the bound on how long a job stuck on an NBD target takes to
    /// notice a cancel.
    pub timeout: Duration,
    /// TLS settings for `nbds://` and `nbds+unix://` URIs (CA, client certificate,
    /// hostname, pinned fingerprint); `None` with such a URI needs `tls-certificates=DIR`
    /// in the URI. Setting it with a plaintext `nbd://` URI is an error (`EINVAL`).
    #[cfg(feature = "tls")]
    pub tls: Option<crate::nbd::tls::ClientTls>,
}

impl Default for NbdOptions {
    fn default() -> Self {
        NbdOptions {
            write: true,
            connections: 4,
            timeout: Duration::from_secs(30),
            #[cfg(feature = "tls")]
            tls: None,
        }
    }
}

/// Most replies the client accepts to one handshake option (INFO items, meta contexts):
/// a server sending them without end fails the handshake instead of holding it.
const MAX_OPTION_REPLIES: usize = 1024;

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

/// An error with an errno and a message (`errno_of` returns `errno`).
fn err(errno: i32, msg: String) -> io::Error {
    io::Error::from(Error::new(ErrorKind::Io, errno, msg))
}

/// The errno of a failed connection: an OS error keeps its code; an end of stream is
/// `ECONNRESET`; a receive or send timeout (`EAGAIN` from `SO_RCVTIMEO`) is `ETIMEDOUT`.
fn transport_errno(e: &io::Error) -> i32 {
    match e.raw_os_error() {
        Some(libc::EAGAIN) => libc::ETIMEDOUT,
        Some(code) if code > 0 => code,
        _ => match e.kind() {
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => libc::ECONNRESET,
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => libc::ETIMEDOUT,
            _ => libc::EIO,
        },
    }
}

/// A failed request. `fatal`: the connection can no longer be trusted (closed, out of
/// step, or the peer broke the protocol) and must be dropped; otherwise the server
/// answered the request with an error and the connection goes on.
struct ReqError {
    err: io::Error,
    fatal: bool,
}

impl ReqError {
    fn server(err: io::Error) -> Self {
        ReqError { err, fatal: false }
    }
}

// ---------------------------------------------------------------------------------------
// Streams
// ---------------------------------------------------------------------------------------

/// A connected socket. Writes go through `send(MSG_NOSIGNAL)`: a server that went away
/// gives `EPIPE`, never a `SIGPIPE` that would kill a C or Python host process.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn connect(addr: &NbdAddress, timeout: Duration) -> io::Result<Stream> {
        let s = match addr {
            NbdAddress::Tcp { host, port } => {
                let mut last = None;
                let mut stream = None;
                for sa in (host.as_str(), *port).to_socket_addrs()? {
                    match TcpStream::connect_timeout(&sa, timeout) {
                        Ok(s) => {
                            stream = Some(s);
                            break;
                        }
                        Err(e) => last = Some(e),
                    }
                }
                let s = match stream {
                    Some(s) => s,
                    None => {
                        return Err(
                            last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address for the host"))
                        )
                    }
                };
                s.set_nodelay(true)?;
                Stream::Tcp(s)
            }
            NbdAddress::Unix(path) => {
                let bytes = path.as_os_str().as_bytes();
                let s = if let Some(name) = bytes.strip_prefix(b"\0") {
                    connect_abstract(name)?
                } else {
                    UnixStream::connect(path)?
                };
                Stream::Unix(s)
            }
        };
        s.set_timeouts(timeout)?;
        Ok(s)
    }

    fn set_timeouts(&self, timeout: Duration) -> io::Result<()> {
        let t = Some(timeout.max(Duration::from_millis(1)));
        match self {
            Stream::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Stream::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }

    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    fn fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn connect_abstract(name: &[u8]) -> io::Result<UnixStream> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    UnixStream::connect_addr(&addr)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn connect_abstract(_name: &[u8]) -> io::Result<UnixStream> {
    Err(io::Error::new(io::ErrorKind::Unsupported, "abstract Unix sockets are Linux only"))
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for `buf.len()` bytes of reads for the duration of the
        // call; the fd is owned by `self` and open.
        let n = unsafe { libc::send(self.fd(), buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A socket with an optional overall deadline: while one is set, every read and write
/// waits at most until it (a server trickling bytes cannot stretch a request or the
/// handshake), and past it fails with `TimedOut`.
struct Sock {
    s: Stream,
    deadline: Option<std::time::Instant>,
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "deadline passed")
}

impl Sock {
    /// Bound the next socket wait by the deadline.
    fn arm(&self, read: bool) -> io::Result<()> {
        let Some(d) = self.deadline else { return Ok(()) };
        let left = d.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(timed_out());
        }
        let t = Some(left.max(Duration::from_millis(1)));
        match (&self.s, read) {
            (Stream::Tcp(s), true) => s.set_read_timeout(t),
            (Stream::Tcp(s), false) => s.set_write_timeout(t),
            (Stream::Unix(s), true) => s.set_read_timeout(t),
            (Stream::Unix(s), false) => s.set_write_timeout(t),
        }
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.arm(true)?;
        self.s.read(buf)
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.arm(false)?;
        self.s.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A connection's byte stream: the socket, or TLS over it (`nbds://`).
enum Transport {
    Plain(Sock),
    #[cfg(feature = "tls")]
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, Sock>>),
    /// Only while upgrading to TLS.
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    Gone,
}

impl Transport {
    fn set_deadline(&mut self, d: Option<std::time::Instant>) {
        match self {
            Transport::Plain(s) => s.deadline = d,
            #[cfg(feature = "tls")]
            Transport::Tls(t) => t.sock.deadline = d,
            Transport::Gone => {}
        }
    }
}

fn not_connected() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "connection closed")
}

impl Read for Transport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(s) => s.read(buf),
            #[cfg(feature = "tls")]
            Transport::Tls(t) => t.read(buf),
            Transport::Gone => Err(not_connected()),
        }
    }
}

impl Write for Transport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(s) => s.write(buf),
            #[cfg(feature = "tls")]
            Transport::Tls(t) => t.write(buf),
            Transport::Gone => Err(not_connected()),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Transport::Plain(_) | Transport::Gone => Ok(()),
            #[cfg(feature = "tls")]
            Transport::Tls(t) => t.flush(),
        }
    }
}

/// The TLS configuration a driver's connections share (`None`: plaintext).
#[cfg(feature = "tls")]
type TlsConfig = Option<crate::nbd::tls::ClientTlsConfig>;
#[cfg(not(feature = "tls"))]
type TlsConfig = Option<std::convert::Infallible>;

// ---------------------------------------------------------------------------------------
// One connection
// ---------------------------------------------------------------------------------------

/// What the handshake learned about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ExportInfo {
    size: u64,
    flags: TransmissionFlags,
    min_block: u32,
    preferred_block: u32,
    max_block: u32,
    structured: bool,
    base_allocation: bool,
}

/// Where a request's reply goes.
enum Sink<'a> {
    /// Nothing but success or an error (write, flush, trim, write zeroes).
    None,
    /// The data of a read.
    Read(&'a mut [u8]),
    /// The `base:allocation` extents of a block status request.
    Status(&'a mut Vec<Extent>),
}

/// One connection in transmission phase. Protected by the pool: only the thread that took
/// it from the pool uses it.
struct Conn {
    /// Reads and writes (writes go to the inner transport, past the read buffer).
    io: BufReader<Transport>,
    /// A handle on the socket to shut it down.
    handle: Stream,
    structured: bool,
    /// The id the server gave `base:allocation` on this connection.
    base_allocation: Option<u32>,
    next_cookie: u64,
    /// Sequence number of the last write acknowledged on this connection (0: none).
    last_write: u64,
}

impl Conn {
    /// Connect and negotiate: greeting, structured replies, `base:allocation`, `GO` (or
    /// `EXPORT_NAME` for servers without `GO`).
    fn open(addr: &NbdAddress, export: &str, timeout: Duration, tls: &TlsConfig) -> io::Result<(Conn, ExportInfo)> {
        // One deadline for connecting and the whole handshake.
        let deadline = std::time::Instant::now() + timeout;
        let stream = Stream::connect(addr, timeout)?;
        let handle = stream.try_clone()?;
        let mut conn = Conn {
            io: BufReader::with_capacity(64 << 10, Transport::Plain(Sock { s: stream, deadline: Some(deadline) })),
            handle,
            structured: false,
            base_allocation: None,
            next_cookie: 1,
            last_write: 0,
        };
        let info = conn.handshake(export, tls, deadline).map_err(|e| match e {
            ProtoError::Io(e) => {
                let timed_out = matches!(e.raw_os_error(), Some(libc::EAGAIN))
                    || (e.raw_os_error().is_none()
                        && matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock));
                if timed_out {
                    err(libc::ETIMEDOUT, format!("handshake not finished within {timeout:?}: {e}"))
                } else {
                    e
                }
            }
            other => io::Error::new(io::ErrorKind::InvalidData, format!("handshake: {other}")),
        })?;
        conn.io.get_mut().set_deadline(None);
        Ok((conn, info))
    }

    fn send_option(&mut self, opt: &ClientOption) -> proto::Result<()> {
        let mut out = Vec::new();
        opt.encode(&mut out)?;
        self.io.get_mut().write_all(&out)?;
        Ok(())
    }

    /// `NBD_OPT_STARTTLS`, then the TLS handshake; everything after runs over TLS.
    #[cfg(feature = "tls")]
    fn start_tls(&mut self, tls: &crate::nbd::tls::ClientTlsConfig, deadline: std::time::Instant) -> proto::Result<()> {
        self.send_option(&ClientOption::Other { code: proto::OPT_STARTTLS, data: Vec::new() })?;
        let r = read_option_reply(&mut self.io, &Limits::default())?;
        expect_option(r.option, proto::OPT_STARTTLS)?;
        match r.parse()? {
            OptionReplyBody::Ack => {}
            OptionReplyBody::Error { message, .. } => {
                return Err(ProtoError::Io(err(
                    libc::ENOTSUP,
                    format!("the server does not offer TLS (STARTTLS refused: {message})"),
                )))
            }
            _ => return Err(ProtoError::Malformed("unexpected reply to STARTTLS".into())),
        }
        if !self.io.buffer().is_empty() {
            return Err(ProtoError::Malformed("data after the STARTTLS reply".into()));
        }
        let io = std::mem::replace(&mut self.io, BufReader::new(Transport::Gone));
        let Transport::Plain(sock) = io.into_inner() else {
            return Err(ProtoError::Malformed("STARTTLS twice".into()));
        };
        let t = tls.connect(sock, deadline, |_, _| Ok(())).map_err(|e| match e.kind() {
            io::ErrorKind::InvalidData => ProtoError::Io(err(libc::EIO, format!("TLS handshake failed: {e}"))),
            _ => ProtoError::Io(e),
        })?;
        self.io = BufReader::with_capacity(64 << 10, Transport::Tls(Box::new(t)));
        Ok(())
    }

    fn handshake(&mut self, export: &str, tls: &TlsConfig, deadline: std::time::Instant) -> proto::Result<ExportInfo> {
        let limits = Limits::default();
        let hs = read_greeting(&mut self.io)?;
        let no_zeroes = hs.contains(HandshakeFlags::NO_ZEROES);
        let mut cflags = ClientFlags::FIXED_NEWSTYLE;
        if no_zeroes {
            cflags |= ClientFlags::NO_ZEROES;
        }
        self.io.get_mut().write_all(&encode_client_flags(cflags))?;
        #[cfg(feature = "tls")]
        if let Some(tls) = tls {
            if !hs.contains(HandshakeFlags::FIXED_NEWSTYLE) {
                return Err(ProtoError::Io(err(libc::ENOTSUP, "the server is not fixed-newstyle: no TLS".into())));
            }
            self.start_tls(tls, deadline)?;
        }
        #[cfg(not(feature = "tls"))]
        let _ = (tls, deadline);

        // Structured replies: an error reply just means simple replies.
        self.send_option(&ClientOption::StructuredReply)?;
        let r = read_option_reply(&mut self.io, &limits)?;
        expect_option(r.option, OPT_STRUCTURED_REPLY)?;
        match r.parse()? {
            OptionReplyBody::Ack => self.structured = true,
            OptionReplyBody::Error { .. } => {}
            _ => return Err(ProtoError::Malformed("unexpected reply to STRUCTURED_REPLY".into())),
        }

        if self.structured {
            self.send_option(&ClientOption::SetMetaContext(MetaContextRequest {
                export: export.to_owned(),
                queries: vec![CONTEXT_BASE_ALLOCATION.into()],
            }))?;
            for n in 0.. {
                if n == MAX_OPTION_REPLIES {
                    return Err(ProtoError::Malformed("too many replies to SET_META_CONTEXT".into()));
                }
                let r = read_option_reply(&mut self.io, &limits)?;
                expect_option(r.option, OPT_SET_META_CONTEXT)?;
                match r.parse()? {
                    OptionReplyBody::MetaContext { id, name } if name == CONTEXT_BASE_ALLOCATION => {
                        self.base_allocation = Some(id);
                    }
                    OptionReplyBody::MetaContext { name, .. } => {
                        return Err(ProtoError::Malformed(format!("server set a context not asked for: {name}")));
                    }
                    OptionReplyBody::Ack | OptionReplyBody::Error { .. } => break,
                    _ => {}
                }
            }
        }

        self.send_option(&ClientOption::Go(InfoRequest { name: export.to_owned(), info: vec![INFO_BLOCK_SIZE] }))?;
        let mut export_info = None;
        let mut blocks = None;
        for n in 0.. {
            if n == MAX_OPTION_REPLIES {
                return Err(ProtoError::Malformed("too many replies to GO".into()));
            }
            let r = read_option_reply(&mut self.io, &limits)?;
            expect_option(r.option, OPT_GO)?;
            match r.parse()? {
                OptionReplyBody::Info(Info::Export { size, flags }) => export_info = Some((size, flags)),
                OptionReplyBody::Info(Info::BlockSize { min, preferred, max }) => blocks = Some((min, preferred, max)),
                OptionReplyBody::Info(_) | OptionReplyBody::Other { .. } => {}
                OptionReplyBody::Ack => break,
                OptionReplyBody::Error { code, .. } if code == REP_ERR_UNSUP => {
                    // A server without GO (older than the spec's 2017 extension): the old way.
                    // It closes the connection when the export does not exist.
                    self.send_option(&ClientOption::ExportName(export.to_owned()))?;
                    let (size, flags) = read_export_name_reply(&mut self.io, no_zeroes).map_err(|e| match e {
                        ProtoError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                            ProtoError::Io(io::Error::new(
                                io::ErrorKind::NotFound,
                                format!("the server closed the connection: no export named \"{export}\"?"),
                            ))
                        }
                        e => e,
                    })?;
                    export_info = Some((size, flags));
                    break;
                }
                OptionReplyBody::Error { code, message } => {
                    let (errno, what) = match code {
                        REP_ERR_UNKNOWN => (libc::ENOENT, "no such export"),
                        REP_ERR_POLICY => (libc::EACCES, "refused by the server's policy"),
                        REP_ERR_TLS_REQD => (libc::EACCES, "the server requires TLS (use an nbds:// URI)"),
                        REP_ERR_SHUTDOWN => (libc::ESHUTDOWN, "the server is shutting down"),
                        REP_ERR_PLATFORM => (libc::ENOTSUP, "not supported by the server's platform"),
                        REP_ERR_INVALID => (libc::EINVAL, "invalid request"),
                        _ => (libc::EINVAL, "refused"),
                    };
                    let msg = if message.is_empty() { String::new() } else { format!(": {message}") };
                    return Err(ProtoError::Io(err(errno, format!("export \"{export}\": {what}{msg}"))));
                }
                _ => return Err(ProtoError::Malformed("unexpected reply to GO".into())),
            }
        }
        let Some((size, flags)) = export_info else {
            return Err(ProtoError::Malformed("GO acknowledged without NBD_INFO_EXPORT".into()));
        };
        let (mut min_block, mut preferred_block, mut max_block) = (1, 4096, NBD_MAX_REQUEST);
        if let Some((min, preferred, max)) = blocks {
            let valid = min.is_power_of_two()
                && min <= 64 << 10
                && preferred.is_power_of_two()
                && preferred >= min
                && (max == u32::MAX || (max >= preferred.max(min) && max % min == 0));
            if !valid {
                return Err(ProtoError::Malformed(format!("invalid block sizes {min}/{preferred}/{max}")));
            }
            (min_block, preferred_block, max_block) = (min, preferred, max);
        }
        Ok(ExportInfo {
            size,
            flags,
            min_block,
            preferred_block,
            max_block,
            structured: self.structured,
            base_allocation: self.base_allocation.is_some(),
        })
    }

    /// Send one request (its cookie is set here) and read its whole reply into `sink`.
    fn request(&mut self, req: Request, payload: &[u8], sink: Sink<'_>, timeout: Duration) -> Result<(), ReqError> {
        // The whole request and its whole reply within the timeout.
        self.io.get_mut().set_deadline(Some(std::time::Instant::now() + timeout));
        let r = self.request_inner(req, payload, sink);
        self.io.get_mut().set_deadline(None);
        r
    }

    fn request_inner(&mut self, mut req: Request, payload: &[u8], mut sink: Sink<'_>) -> Result<(), ReqError> {
        req.cookie = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1);
        let header = req.encode();
        let sent = if payload.len() <= 64 << 10 {
            let mut b = Vec::with_capacity(header.len() + payload.len());
            b.extend_from_slice(&header);
            b.extend_from_slice(payload);
            self.io.get_mut().write_all(&b)
        } else {
            let w = self.io.get_mut();
            w.write_all(&header).and_then(|()| w.write_all(payload))
        };
        sent.map_err(|e| fatal_io("send", e))?;
        if self.structured {
            self.structured_reply(&req, &mut sink)
        } else {
            self.simple_reply(&req, &mut sink)
        }
    }

    fn simple_reply(&mut self, req: &Request, sink: &mut Sink<'_>) -> Result<(), ReqError> {
        match read_reply_header(&mut self.io).map_err(fatal)? {
            ReplyHeader::Simple { error, cookie } => {
                if cookie != req.cookie {
                    return Err(fatal(ProtoError::Malformed(format!(
                        "reply for cookie {cookie:#x}, expected {:#x}",
                        req.cookie
                    ))));
                }
                if error != 0 {
                    return Err(ReqError::server(server_error(error, "")));
                }
                if let Sink::Read(buf) = sink {
                    self.io.read_exact(buf).map_err(|e| fatal_io("receive", e))?;
                }
                Ok(())
            }
            ReplyHeader::Chunk(_) => {
                Err(fatal(ProtoError::Malformed("structured reply chunk without structured replies".into())))
            }
        }
    }

    fn structured_reply(&mut self, req: &Request, sink: &mut Sink<'_>) -> Result<(), ReqError> {
        let limits = Limits::default();
        let contexts: Vec<u32> = self.base_allocation.into_iter().collect();
        let mut covered: Vec<(u64, u64)> = Vec::new();
        let mut error: Option<io::Error> = None;
        let mut got_status = false;
        loop {
            let h = match read_reply_header(&mut self.io).map_err(fatal)? {
                ReplyHeader::Chunk(h) => h,
                ReplyHeader::Simple { error: e, cookie } => {
                    // Allowed for errors, and for success of commands without reply data.
                    if cookie != req.cookie {
                        return Err(fatal(ProtoError::Malformed(format!(
                            "reply for cookie {cookie:#x}, expected {:#x}",
                            req.cookie
                        ))));
                    }
                    if e != 0 {
                        return Err(ReqError::server(server_error(e, "")));
                    }
                    if matches!(sink, Sink::None) && covered.is_empty() {
                        return Ok(());
                    }
                    return Err(fatal(ProtoError::Malformed("simple reply to a read or block status".into())));
                }
            };
            if h.reply_type == REPLY_TYPE_OFFSET_DATA {
                if let Sink::Read(buf) = sink {
                    self.read_data_chunk(req, &h, buf, &mut covered)?;
                    if h.is_done() {
                        break;
                    }
                    continue;
                }
            }
            let payload = read_chunk_payload(&mut self.io, &h, &limits).map_err(fatal)?;
            let chunk = parse_chunk(&h, &payload).map_err(fatal)?;
            check_chunk(req, &h, &chunk, &contexts).map_err(fatal)?;
            match chunk {
                Chunk::OffsetHole { offset, len } => {
                    if let Sink::Read(buf) = sink {
                        let at = (offset - req.offset) as usize;
                        buf[at..at + len as usize].fill(0);
                        covered.push((offset, u64::from(len)));
                    }
                }
                Chunk::BlockStatus { extents, .. } => {
                    if let Sink::Status(out) = sink {
                        if got_status {
                            return Err(fatal(ProtoError::Malformed("two block status chunks for one context".into())));
                        }
                        got_status = true;
                        out.extend_from_slice(&extents);
                    }
                }
                Chunk::Error { error: code, message, .. } => {
                    if error.is_none() {
                        error = Some(server_error(code, &message));
                    }
                }
                Chunk::OffsetData { .. } | Chunk::None | Chunk::Other { .. } => {}
            }
            if h.is_done() {
                break;
            }
        }
        if let Some(e) = error {
            return Err(ReqError::server(e));
        }
        match sink {
            Sink::Read(_) => {
                covered.sort_unstable();
                let mut at = req.offset;
                for (off, len) in covered {
                    if off != at {
                        return Err(fatal(ProtoError::Malformed("read reply with gaps or overlapping chunks".into())));
                    }
                    at += len;
                }
                if at != req.offset + u64::from(req.len) {
                    return Err(fatal(ProtoError::Malformed("read reply does not cover the request".into())));
                }
            }
            Sink::Status(_) if !got_status => {
                return Err(fatal(ProtoError::Malformed("block status reply without base:allocation".into())));
            }
            _ => {}
        }
        Ok(())
    }

    /// Read an `OFFSET_DATA` chunk straight into the read buffer, after checking that it
    /// lies inside the request.
    fn read_data_chunk(
        &mut self,
        req: &Request,
        h: &ChunkHeader,
        buf: &mut [u8],
        covered: &mut Vec<(u64, u64)>,
    ) -> Result<(), ReqError> {
        if h.cookie != req.cookie {
            return Err(fatal(ProtoError::Malformed(format!(
                "reply for cookie {:#x}, expected {:#x}",
                h.cookie, req.cookie
            ))));
        }
        if h.len <= 8 {
            return Err(fatal(ProtoError::Malformed("OFFSET_DATA chunk without data".into())));
        }
        let mut off = [0u8; 8];
        self.io.read_exact(&mut off).map_err(|e| fatal_io("receive", e))?;
        let offset = u64::from_be_bytes(off);
        let n = u64::from(h.len - 8);
        let end = req.offset + u64::from(req.len);
        if offset < req.offset || offset.checked_add(n).map_or(true, |e| e > end) {
            return Err(fatal(ProtoError::Malformed("OFFSET_DATA outside the read request".into())));
        }
        let at = (offset - req.offset) as usize;
        self.io.read_exact(&mut buf[at..at + n as usize]).map_err(|e| fatal_io("receive", e))?;
        covered.push((offset, n));
        Ok(())
    }

    /// Say goodbye: `NBD_CMD_DISC` (no reply), then close.
    fn disconnect(mut self) {
        let req = Request { flags: CommandFlags::empty(), command: CMD_DISC, cookie: 0, offset: 0, len: 0 };
        self.io.get_mut().set_deadline(Some(std::time::Instant::now() + Duration::from_secs(1)));
        let _ = self.io.get_mut().write_all(&req.encode());
        #[cfg(feature = "tls")]
        if let Transport::Tls(t) = self.io.get_mut() {
            t.conn.send_close_notify();
            let _ = t.conn.write_tls(&mut t.sock);
        }
        self.handle.shutdown();
    }
}

fn expect_option(got: u32, want: u32) -> proto::Result<()> {
    if got != want {
        return Err(ProtoError::Malformed(format!("reply for option {got}, expected {want}")));
    }
    Ok(())
}

fn fatal(e: ProtoError) -> ReqError {
    match e {
        ProtoError::Io(e) => fatal_io("receive", e),
        other => ReqError { err: err(libc::EIO, format!("protocol error: {other}")), fatal: true },
    }
}

fn fatal_io(what: &str, e: io::Error) -> ReqError {
    let errno = transport_errno(&e);
    let why = match errno {
        libc::ETIMEDOUT => "timed out".to_owned(),
        libc::ECONNRESET if e.kind() == io::ErrorKind::UnexpectedEof => "the server closed the connection".to_owned(),
        _ => e.to_string(),
    };
    ReqError { err: err(errno, format!("connection lost ({what}: {why})")), fatal: true }
}

fn server_error(code: u32, message: &str) -> io::Error {
    let errno = nbd_to_errno(code);
    let text = io::Error::from_raw_os_error(errno).to_string();
    let text = text.split(" (os error").next().unwrap_or(&text).to_owned();
    if message.is_empty() {
        err(errno, format!("server error: {text}"))
    } else {
        err(errno, format!("server error: {text}: {message}"))
    }
}

// ---------------------------------------------------------------------------------------
// The driver
// ---------------------------------------------------------------------------------------

/// The connections not in use, and how many are open. Protected by `NbdDriver::pool`.
struct Pool {
    idle: Vec<Conn>,
    open: usize,
}

/// A block device on an NBD server. See the [module docs](self).
///
/// Thread-safe: every method may be called from several threads at once; calls run in
/// parallel on separate connections when the server allows several (`CAN_MULTI_CONN`).
/// Dropping the driver disconnects (`NBD_CMD_DISC`) every idle connection.
pub struct NbdDriver {
    uri: String,
    address: NbdAddress,
    export: String,
    info: ExportInfo,
    writable: bool,
    max_conns: usize,
    /// Largest read or write request: the server's maximum, at most [`NBD_MAX_REQUEST`],
    /// a multiple of the minimum block size.
    max_request: u64,
    timeout: Duration,
    /// TLS for every connection (`nbds://`), built once.
    tls: TlsConfig,
    /// Idle connections and the open count; `freed` is signalled when one is returned.
    pool: Mutex<Pool>,
    freed: Condvar,
    /// Sequence numbers of acknowledged writes (the last one given out).
    write_seq: AtomicU64,
    /// Writes with a sequence number up to this one are covered by a successful flush.
    flushed_upto: AtomicU64,
    /// A connection was lost with a write not covered by a flush; the next flush fails.
    lost_writes: AtomicBool,
}

impl fmt::Debug for NbdDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdDriver")
            .field("uri", &self.uri)
            .field("size", &self.info.size)
            .field("flags", &self.info.flags)
            .field("writable", &self.writable)
            .field("max_connections", &self.max_conns)
            .finish()
    }
}

/// A connection taken from the pool; returned (or, when broken, closed) when dropped.
struct Taken<'a> {
    driver: &'a NbdDriver,
    conn: Option<Conn>,
    broken: bool,
}

impl std::ops::Deref for Taken<'_> {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        self.conn.as_ref().expect("a taken connection is present until dropped")
    }
}

impl std::ops::DerefMut for Taken<'_> {
    fn deref_mut(&mut self) -> &mut Conn {
        self.conn.as_mut().expect("a taken connection is present until dropped")
    }
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else { return };
        let d = self.driver;
        // A panic on this thread mid-request leaves the stream out of step: close it too.
        let broken = self.broken || std::thread::panicking();
        if broken {
            if conn.last_write > d.flushed_upto.load(Ordering::Acquire) {
                d.lost_writes.store(true, Ordering::Release);
            }
            conn.handle.shutdown();
        }
        let mut pool = d.lock_pool();
        if broken {
            pool.open -= 1;
        } else {
            pool.idle.push(conn);
        }
        drop(pool);
        d.freed.notify_one();
    }
}

impl NbdDriver {
    /// Connect to the export named by `uri` (`nbd://host[:port]/export`,
    /// `nbd+unix:///export?socket=PATH`; over TLS `nbds://…` / `nbds+unix://…` with
    /// `tls-certificates=DIR`) with the default [`NbdOptions`]: writable when the
    /// export is, up to 4 connections, 30 s timeouts.
    ///
    /// Errors: `EINVAL` (`InvalidInput`) for a bad URI; the connection's errno
    /// (`ECONNREFUSED`, `ENOENT` for a missing socket, `ETIMEDOUT`...); `ENOENT` when the
    /// server has no such export; `EIO` for a peer that breaks the protocol or a failed TLS
    /// handshake (untrusted certificate, wrong name; `ECONNRESET` or `EIO` when the server refuses our certificate); `EACCES` for a
    /// plaintext URI to a server that requires TLS; `ENOTSUP` when the server refuses
    /// STARTTLS; `ETIMEDOUT` when the handshake does not finish in time. Every
    /// message names the URI.
    pub fn connect(uri: &str) -> io::Result<NbdDriver> {
        Self::connect_with(uri, &NbdOptions::default())
    }

    /// Connect over TLS to an `nbds://` or `nbds+unix://` URI with the default options and
    /// the TLS settings `tls` (CA, optional client certificate, hostname, pin). Errors as
    /// [`NbdDriver::connect`]; `EINVAL` for a plaintext URI or TLS files that are not valid.
    #[cfg(feature = "tls")]
    pub fn connect_tls(uri: &str, tls: crate::nbd::ClientTls) -> io::Result<NbdDriver> {
        Self::connect_with(uri, &NbdOptions { tls: Some(tls), ..Default::default() })
    }

    /// Connect with explicit options (see [`NbdOptions`]). Errors as [`NbdDriver::connect`].
    pub fn connect_with(uri: &str, opts: &NbdOptions) -> io::Result<NbdDriver> {
        let parsed = NbdUri::parse(uri)?;
        if opts.timeout.is_zero() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "NBD timeout must not be 0"));
        }
        let tls = tls_config(uri, &parsed, opts)?;
        let (conn, info) =
            Conn::open(&parsed.address, &parsed.export, opts.timeout, &tls).map_err(|e| with_uri(uri, "connect", e))?;
        if info.size == 0 {
            conn.disconnect();
            return Err(err(libc::EINVAL, format!("NBD {uri}: the export is empty (size 0)")));
        }
        let multi = info.flags.contains(TransmissionFlags::CAN_MULTI_CONN);
        let max_conns = if multi { opts.connections.max(1) } else { 1 };
        let max = u64::from(info.max_block.min(NBD_MAX_REQUEST));
        let max_request = (max / u64::from(info.min_block) * u64::from(info.min_block)).max(u64::from(info.min_block));
        Ok(NbdDriver {
            uri: uri.to_owned(),
            address: parsed.address,
            export: parsed.export,
            writable: opts.write && !info.flags.contains(TransmissionFlags::READ_ONLY),
            info,
            max_conns,
            max_request,
            timeout: opts.timeout,
            tls,
            pool: Mutex::new(Pool { idle: vec![conn], open: 1 }),
            freed: Condvar::new(),
            write_seq: AtomicU64::new(0),
            flushed_upto: AtomicU64::new(0),
            lost_writes: AtomicBool::new(false),
        })
    }

    /// The URI the driver was connected with.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The server's address.
    pub fn address(&self) -> &NbdAddress {
        &self.address
    }

    /// The export name.
    pub fn export_name(&self) -> &str {
        &self.export
    }

    /// True when writes fail with `EROFS`: opened without write, or the export is read-only.
    pub fn is_read_only(&self) -> bool {
        !self.writable
    }

    /// The export's transmission flags as the server sent them.
    pub fn transmission_flags(&self) -> TransmissionFlags {
        self.info.flags
    }

    /// The export's block sizes (minimum, preferred, maximum payload), the defaults (1,
    /// 4096, 32 MiB) when the server named none.
    pub fn block_sizes(&self) -> (u32, u32, u32) {
        (self.info.min_block, self.info.preferred_block, self.info.max_block)
    }

    /// True when the server gave the `base:allocation` context (so
    /// [`BlockDriver::block_status`] reports holes and zeroes).
    pub fn has_block_status(&self) -> bool {
        self.info.base_allocation
    }

    /// Most connections this driver opens: [`NbdOptions::connections`] when the server
    /// advertises `CAN_MULTI_CONN`, else 1.
    pub fn max_connections(&self) -> usize {
        self.max_conns
    }

    /// Connections open right now (idle or in use).
    pub fn open_connections(&self) -> usize {
        self.lock_pool().open
    }

    fn lock_pool(&self) -> MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Take an idle connection, or open one when fewer than `max_conns` are open, or wait.
    fn take(&self) -> io::Result<Taken<'_>> {
        let mut pool = self.lock_pool();
        loop {
            if let Some(conn) = pool.idle.pop() {
                return Ok(Taken { driver: self, conn: Some(conn), broken: false });
            }
            if pool.open < self.max_conns {
                pool.open += 1;
                drop(pool);
                return match self.open_conn() {
                    Ok(conn) => Ok(Taken { driver: self, conn: Some(conn), broken: false }),
                    Err(e) => {
                        self.lock_pool().open -= 1;
                        self.freed.notify_one();
                        Err(e)
                    }
                };
            }
            pool = self.freed.wait(pool).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// A new connection to the same export, which must still look the same.
    fn open_conn(&self) -> io::Result<Conn> {
        let (conn, info) = Conn::open(&self.address, &self.export, self.timeout, &self.tls)
            .map_err(|e| with_uri(&self.uri, "connect", e))?;
        if info.size != self.info.size || info.flags != self.info.flags || info.structured != self.info.structured {
            conn.disconnect();
            return Err(err(
                libc::EIO,
                format!(
                    "NBD {}: the export changed (size {} → {}, flags {:?} → {:?})",
                    self.uri, self.info.size, info.size, self.info.flags, info.flags
                ),
            ));
        }
        Ok(conn)
    }

    /// Run one request (`command` on `[offset, offset + len)`, no flags) on a pooled
    /// connection.
    fn run(&self, what: &str, command: u16, offset: u64, len: u32, payload: &[u8], sink: Sink<'_>) -> io::Result<()> {
        let mut conn = self.take().map_err(|e| with_context(&self.uri, what, offset, u64::from(len), e))?;
        let req = Request { flags: CommandFlags::empty(), command, cookie: 0, offset, len };
        match conn.request(req, payload, sink, self.timeout) {
            Ok(()) => {
                if command == CMD_WRITE || command == CMD_WRITE_ZEROES || command == CMD_TRIM {
                    conn.last_write = self.write_seq.fetch_add(1, Ordering::AcqRel) + 1;
                }
                Ok(())
            }
            Err(e) => {
                conn.broken = e.fatal;
                Err(with_context(&self.uri, what, offset, u64::from(len), e.err))
            }
        }
    }

    fn check_range(&self, what: &str, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.info.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "NBD {} {what}: range {offset}+{len} is past the end of the export ({} bytes)",
                    self.uri, self.info.size
                ),
            )),
        }
    }

    fn check_writable(&self, what: &str) -> io::Result<()> {
        if self.writable {
            return Ok(());
        }
        let why = if self.info.flags.contains(TransmissionFlags::READ_ONLY) {
            "the export is read-only"
        } else {
            "the driver was connected read-only (C: COWBACKUP_OPEN_WRITE, Python: write=True)"
        };
        Err(err(libc::EROFS, format!("NBD {} {what}: {why}", self.uri)))
    }

    /// Split `[offset, offset + len)` into requests of at most `max` bytes.
    fn pieces(offset: u64, len: u64, max: u64, mut f: impl FnMut(u64, u32) -> io::Result<()>) -> io::Result<()> {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(max);
            f(offset + done, n as u32)?;
            done += n;
        }
        Ok(())
    }
}

/// The TLS configuration for `parsed` (built from `opts.tls` and the URI's `tls-*`
/// parameters), `None` for plaintext URIs.
#[cfg(feature = "tls")]
fn tls_config(uri: &str, parsed: &NbdUri, opts: &NbdOptions) -> io::Result<TlsConfig> {
    if !parsed.tls {
        if opts.tls.is_some() {
            return Err(bad_uri(uri, "TLS settings given with a plaintext URI (use nbds:// or nbds+unix://)"));
        }
        return Ok(None);
    }
    if opts.tls.is_none() && parsed.tls_certificates.is_none() {
        return Err(bad_uri(
            uri,
            "nbds:// needs the TLS files: tls-certificates=DIR in the URI, or a CA file (NbdOptions::tls, \
             cowbackup_nbd_open_tls)",
        ));
    }
    let mut t = opts.tls.clone().unwrap_or_default();
    if let Some(dir) = &parsed.tls_certificates {
        if t.ca_pem.is_none() {
            t.ca_pem = Some(dir.join("ca-cert.pem"));
        }
        let (c, k) = (dir.join("client-cert.pem"), dir.join("client-key.pem"));
        if t.cert_pem.is_none() && t.key_pem.is_none() && c.exists() && k.exists() {
            t.cert_pem = Some(c);
            t.key_pem = Some(k);
        }
    }
    if parsed.tls_hostname.is_some() {
        t.hostname = parsed.tls_hostname.clone();
    }
    let host = match &parsed.address {
        NbdAddress::Tcp { host, .. } => Some(host.as_str()),
        NbdAddress::Unix(_) => None,
    };
    t.build(host).map(Some).map_err(|e| with_uri(uri, "TLS setup", io::Error::from(e)))
}

#[cfg(not(feature = "tls"))]
fn tls_config(uri: &str, parsed: &NbdUri, _opts: &NbdOptions) -> io::Result<TlsConfig> {
    if parsed.tls {
        return Err(bad_uri(uri, "this build has no TLS (cargo feature tls)"));
    }
    Ok(None)
}

fn with_uri(uri: &str, what: &str, e: io::Error) -> io::Error {
    let errno = crate::error::errno_of(&e);
    let errno = if errno == libc::EINVAL && e.kind() == io::ErrorKind::InvalidData { libc::EIO } else { errno };
    let msg = e.to_string();
    let msg = msg.split(" (os error").next().unwrap_or(&msg);
    err(errno, format!("NBD {uri} {what}: {msg}"))
}

fn with_context(uri: &str, what: &str, offset: u64, len: u64, e: io::Error) -> io::Error {
    let errno = crate::error::errno_of(&e);
    let msg = e.to_string();
    if msg.starts_with("NBD ") {
        return e;
    }
    err(errno, format!("NBD {uri} {what} at {offset}+{len}: {msg}"))
}

impl Drop for NbdDriver {
    fn drop(&mut self) {
        let idle = std::mem::take(&mut self.lock_pool().idle);
        for conn in idle {
            conn.disconnect();
        }
    }
}

impl BlockDriver for NbdDriver {
    fn size(&self) -> u64 {
        self.info.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check_range("read", offset, buf.len() as u64)?;
        let max = self.max_request as usize;
        for (i, piece) in buf.chunks_mut(max).enumerate() {
            let off = offset + (i * max) as u64;
            let n = piece.len() as u32;
            self.run("read", CMD_READ, off, n, &[], Sink::Read(piece))?;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_range("write", offset, buf.len() as u64)?;
        self.check_writable("write")?;
        let max = self.max_request as usize;
        for (i, piece) in buf.chunks(max).enumerate() {
            let off = offset + (i * max) as u64;
            self.run("write", CMD_WRITE, off, piece.len() as u32, piece, Sink::None)?;
        }
        Ok(())
    }

    /// `NBD_CMD_WRITE_ZEROES` (the server may punch holes) when the server supports it,
    /// else zero buffers written with `NBD_CMD_WRITE`.
    fn write_zeroes_at(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_range("write_zeroes", offset, len)?;
        self.check_writable("write_zeroes")?;
        if !self.info.flags.contains(TransmissionFlags::SEND_WRITE_ZEROES) {
            return write_zero_buffers(self, offset, len);
        }
        Self::pieces(offset, len, MAX_NO_PAYLOAD, |off, n| {
            self.run("write_zeroes", CMD_WRITE_ZEROES, off, n, &[], Sink::None)
        })
    }

    /// `NBD_CMD_FLUSH` on one connection: with `CAN_MULTI_CONN` that covers the writes
    /// acknowledged on every connection (the spec's guarantee); without it there is only
    /// one connection. A server without `SEND_FLUSH` has nothing to flush. Fails with
    /// `EIO` (once) when a connection was lost with writes not covered by a flush.
    fn flush(&self) -> io::Result<()> {
        let upto = self.write_seq.load(Ordering::Acquire);
        if self.info.flags.contains(TransmissionFlags::SEND_FLUSH) && self.writable {
            self.run("flush", CMD_FLUSH, 0, 0, &[], Sink::None)?;
        }
        self.flushed_upto.fetch_max(upto, Ordering::AcqRel);
        if self.lost_writes.swap(false, Ordering::AcqRel) {
            return Err(err(
                libc::EIO,
                format!("NBD {} flush: a connection was lost with writes not yet flushed; they may be lost", self.uri),
            ));
        }
        Ok(())
    }

    /// `base:allocation`: a hole (`NBD_STATE_HOLE`) is not `DATA`, `NBD_STATE_ZERO` is
    /// `ZERO`. Consecutive extents with the same status are merged. A server without
    /// the context: everything is `DATA`.
    fn block_status(&self, offset: u64, len: u64) -> io::Result<BlockStatus> {
        self.check_range("block_status", offset, len)?;
        if !self.info.base_allocation || len == 0 {
            return Ok(BlockStatus { len, flags: StatusFlags::DATA });
        }
        let n = len.min(MAX_NO_PAYLOAD) as u32;
        let mut extents = Vec::new();
        self.run("block_status", CMD_BLOCK_STATUS, offset, n, &[], Sink::Status(&mut extents))?;
        let to_flags = |e: &Extent| {
            let mut f = StatusFlags::empty();
            if e.flags & STATE_HOLE == 0 {
                f |= StatusFlags::DATA;
            }
            if e.flags & STATE_ZERO != 0 {
                f |= StatusFlags::ZERO;
            }
            f
        };
        let flags = to_flags(&extents[0]);
        let mut total = 0u64;
        for e in extents.iter().take_while(|e| to_flags(e) == flags) {
            total += u64::from(e.len);
        }
        Ok(BlockStatus { len: total.clamp(1, len), flags })
    }

    /// `NBD_CMD_TRIM` when the server supports it; else nothing (discard is advisory).
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_range("discard", offset, len)?;
        self.check_writable("discard")?;
        if !self.info.flags.contains(TransmissionFlags::SEND_TRIM) {
            return Ok(());
        }
        Self::pieces(offset, len, MAX_NO_PAYLOAD, |off, n| self.run("trim", CMD_TRIM, off, n, &[], Sink::None))
    }

    /// Asks `base:allocation` now: true when the whole export reports `NBD_STATE_ZERO`
    /// (found in at most 64 requests); false without the context or on any error.
    fn reads_as_zero(&self) -> bool {
        if !self.info.base_allocation {
            return false;
        }
        let mut at = 0;
        for _ in 0..ZERO_PROBES {
            if at >= self.info.size {
                return true;
            }
            match self.block_status(at, self.info.size - at) {
                Ok(s) if s.flags.contains(StatusFlags::ZERO) => at += s.len,
                _ => return false,
            }
        }
        at >= self.info.size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(uri: &str) -> NbdUri {
        NbdUri::parse(uri).unwrap_or_else(|e| panic!("{uri}: {e}"))
    }

    fn tcp(host: &str, port: u16) -> NbdAddress {
        NbdAddress::Tcp { host: host.into(), port }
    }

    #[test]
    fn uris_of_the_spec() {
        assert_eq!(
            parse("nbd://example.com/disk"),
            NbdUri {
                address: tcp("example.com", 10809),
                export: "disk".into(),
                tls: false,
                tls_hostname: None,
                tls_certificates: None
            }
        );
        assert_eq!(parse("nbd://example.com/").export, "");
        assert_eq!(parse("nbd://example.com").export, "");
        assert_eq!(parse("nbd://example.com//disk").export, "/disk");
        assert_eq!(parse("nbd://example.com/hello%20world").export, "hello world");
        assert_eq!(parse("nbd://127.0.0.1:1234/x").address, tcp("127.0.0.1", 1234));
        assert_eq!(parse("nbd://[::1]:1234/x").address, tcp("::1", 1234));
        assert_eq!(parse("nbd://[::1]/x").address, tcp("::1", 10809));
        assert_eq!(parse("nbd://h:/x").address, tcp("h", 10809));
        assert_eq!(
            parse("nbd+unix:///disk?socket=/tmp/nbd.sock"),
            NbdUri {
                address: NbdAddress::Unix("/tmp/nbd.sock".into()),
                export: "disk".into(),
                tls: false,
                tls_hostname: None,
                tls_certificates: None
            }
        );
        assert_eq!(parse("nbd+unix://?socket=s").export, "");
        assert_eq!(parse("nbd+unix:///?socket=a%20b").address, NbdAddress::Unix("a b".into()));
        assert_eq!(parse("nbd+unix:///?socket=%00/abstract").address, NbdAddress::Unix("\0/abstract".into()));
    }

    #[test]
    fn bad_uris_are_einval_with_the_reason() {
        for (uri, why) in [
            ("", "expected nbd://"),
            ("disk.img", "expected nbd://"),
            ("http://h/x", "unknown scheme"),
            ("nbds://h/x?tls-foo=1", "unknown query parameter"),
            ("nbds://h/x?tls-hostname=", "empty"),
            ("nbds+unix:///x?tls-certificates=/a&tls-certificates=/b&socket=s", "twice"),
            ("nbds+unix:///x", "socket=PATH"),
            ("nbd+vsock://1/x", "vsock"),
            ("nbd:///x", "no host"),
            ("nbd://h:0/x", "bad port"),
            ("nbd://h:99999/x", "bad port"),
            ("nbd://h:+1/x", "bad port"),
            ("nbd://h:x/x", "bad port"),
            ("nbd://[::1/x", "unclosed"),
            ("nbd://u@h/x", "userinfo"),
            ("nbd://h/x#frag", "fragment"),
            ("nbd://h/x?socket=s", "only for nbd+unix"),
            ("nbd://h/x?foo=1", "unknown query parameter"),
            ("nbd://h/x?tls-type=x509", "TLS"),
            ("nbd://h/%zz", "percent"),
            ("nbd://h/%4", "percent"),
            ("nbd://h/a%00b", "NUL"),
            ("nbd://h/%ff", "UTF-8"),
            ("nbd+unix:///x", "socket=PATH"),
            ("nbd+unix:///x?socket=", "empty"),
            ("nbd+unix://host/x?socket=s", "no host"),
            ("nbd+unix:///x?socket=a&socket=b", "twice"),
            ("nbd://h h/x", "bad host"),
        ] {
            let e = NbdUri::parse(uri).expect_err(uri);
            assert_eq!(crate::error::errno_of(&e), libc::EINVAL, "{uri}");
            assert!(e.to_string().contains(why), "{uri}: {e}");
        }
        let t = NbdUri::parse("nbds+unix:///d?socket=/s&tls-hostname=srv&tls-certificates=/pki").unwrap();
        assert!(t.tls);
        assert_eq!(t.address, NbdAddress::Unix("/s".into()));
        assert_eq!(t.tls_hostname.as_deref(), Some("srv"));
        assert_eq!(t.tls_certificates, Some(PathBuf::from("/pki")));
        let t = NbdUri::parse("nbds://h:99/d").unwrap();
        assert!(t.tls && t.tls_hostname.is_none());
        assert_eq!(t.address, tcp("h", 99));
        let long = format!("nbd://h/{}", "x".repeat(4097));
        assert!(NbdUri::parse(&long).unwrap_err().to_string().contains("longer than"));
    }

    #[test]
    #[cfg_attr(miri, ignore = "sockets: Miri supports only AF_INET/AF_INET6 without connect")]
    fn refused_connections_fail_fast_with_their_errno() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.sock");
        let uri = format!("nbd+unix:///x?socket={}", missing.display());
        let e = NbdDriver::connect(&uri).unwrap_err();
        assert_eq!(crate::error::errno_of(&e), libc::ENOENT, "{e}");
        assert!(e.to_string().contains(&uri), "{e}");
        // A port nobody listens on (bound, then closed).
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let e = NbdDriver::connect(&format!("nbd://127.0.0.1:{port}/")).unwrap_err();
        assert_eq!(crate::error::errno_of(&e), libc::ECONNREFUSED, "{e}");
    }

    #[test]
    #[cfg_attr(miri, ignore = "sockets: Miri supports only AF_INET/AF_INET6 without connect")]
    fn a_peer_that_is_not_nbd_is_an_error_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.write_all(b"HTTP/1.0 200 OK\r\n\r\nhello world").unwrap();
            let mut b = [0u8; 64];
            let _ = s.read(&mut b);
        });
        let opts = NbdOptions { timeout: Duration::from_secs(5), ..Default::default() };
        let e = NbdDriver::connect_with(&format!("nbd+unix:///?socket={}", path.display()), &opts).unwrap_err();
        assert_eq!(crate::error::errno_of(&e), libc::EIO, "{e}");
        assert!(e.to_string().contains("magic"), "{e}");
        t.join().unwrap();
    }
}
