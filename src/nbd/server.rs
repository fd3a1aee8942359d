//! The NBD server: exports drivers (snapshot views, any [`BlockDriver`]) and dirty
//! bitmaps to NBD clients.
//!
//! # Threads
//!
//! - `cowbackup-nbd-accept`: accepts connections, starts one thread per connection, joins
//!   the threads of finished connections.
//! - `cowbackup-nbd-<n>` (`n` = 1, 2, … per server): one per connection, runs the
//!   handshake and then serves requests one at a time, calling the export's driver on this
//!   thread. Driver methods are therefore called from several threads at once (one per
//!   connected client), as [`BlockDriver`] allows.
//!
//! [`Server::stop`] (and drop) shuts the listening socket and every connection down and
//! joins every thread; a driver call in progress finishes first.
//!
//! # Hardening
//!
//! At most [`ServerOptions::max_connections`] connections at once (more are closed at
//! once); the whole handshake (TLS included) must finish within
//! [`ServerOptions::handshake_timeout`] and within [`ServerOptions::max_options`] options;
//! option data is bounded (64 KiB); in transmission each request (header and payload) must
//! arrive within [`ServerOptions::idle_timeout`], else the connection is closed, so idle
//! clients give their slot back; a read longer than [`ServerOptions::max_payload`] gets
//! `NBD_EINVAL` (`NBD_EOVERFLOW` with `DF`) and a longer write payload closes the
//! connection (it cannot be skipped safely); a write payload is buffered as it arrives
//! (1 MiB steps), and read and dropped in 16 KiB pieces when the write will fail anyway
//! (read-only export, out of range); every range is checked against the export size, with
//! overflow, before the driver sees it. A connection's buffers never exceed `max_payload`
//! plus a header.
//!
//! # Security
//!
//! With [`ServerOptions::tls`], every option before `NBD_OPT_STARTTLS` gets
//! `NBD_REP_ERR_TLS_REQD` and no information, and client certificates are checked against
//! the CA and allow-list of [`super::tls::ServerTls`]. Unix sockets are created 0600; a
//! TCP address that is not loopback needs TLS or [`ServerOptions::insecure`].

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::proto::*;
use crate::{buffer_is_zero, errno_of, BlockDriver, DirtyBitmap, Error, ErrorKind, Result, StatusFlags};

/// Tunables and security of a [`Server`]; `ServerOptions::default()` is what
/// [`Server::start`] uses (no TLS; loopback TCP or Unix sockets only).
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Most connections served at once (default 16); further clients are disconnected
    /// at once.
    pub max_connections: usize,
    /// Longest a connection in transmission may wait for, or take to send, one request
    /// (header and payload) before it is closed (default 5 minutes), so idle clients
    /// cannot hold the [`ServerOptions::max_connections`] slots forever.
    pub idle_timeout: Duration,
    /// TLS credentials and client authorization (default none). With TLS, a client must
    /// send `NBD_OPT_STARTTLS` first: any other option before it gets
    /// `NBD_REP_ERR_TLS_REQD` and no information (no export list, names, sizes); after it
    /// the whole session is encrypted (TLS 1.3 or 1.2), with no way back to plaintext.
    #[cfg(feature = "tls")]
    pub tls: Option<super::tls::ServerTls>,
    /// Allow a TCP address that is not loopback without TLS (default `false`: such a
    /// server refuses to start with `EPERM`, since anyone who reaches the port could read
    /// and write every export).
    pub insecure: bool,
    /// Largest read or write payload (default 32 MiB, advertised in `NBD_INFO_BLOCK_SIZE`).
    pub max_payload: u32,
    /// Time a client has for the whole handshake (default 30 s).
    pub handshake_timeout: Duration,
    /// Most options a client may send before entering transmission (default 4096).
    pub max_options: u32,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            max_connections: 16,
            idle_timeout: Duration::from_secs(300),
            #[cfg(feature = "tls")]
            tls: None,
            insecure: false,
            max_payload: DEFAULT_MAX_PAYLOAD,
            handshake_timeout: Duration::from_secs(30),
            max_options: 4096,
        }
    }
}

/// One export: a driver, whether clients may write, and its bitmaps.
struct Export {
    driver: Arc<dyn BlockDriver>,
    writable: bool,
    /// Bitmaps by name, served as `qemu:dirty-bitmap:NAME`. Lock: this RwLock.
    bitmaps: RwLock<BTreeMap<String, Arc<DirtyBitmap>>>,
}

/// A connection known to the server: a handle to shut its socket down, its thread, and
/// the export it is attached to (for [`Server::remove`]).
struct Conn {
    stream: Stream,
    thread: Option<JoinHandle<()>>,
    /// Export name once in transmission. Lock: the `conns` mutex.
    export: Option<String>,
    /// Set by the connection thread when it is about to exit.
    done: Arc<AtomicBool>,
}

/// What the server's threads share.
struct Shared {
    options: ServerOptions,
    limits: Limits,
    /// Exports by name. Lock: this RwLock (held only for lookups and changes, never across I/O).
    exports: RwLock<BTreeMap<String, Arc<Export>>>,
    /// Live connections by id. Lock: this mutex (never held across I/O other than `shutdown`).
    conns: Mutex<HashMap<u64, Conn>>,
    /// Set once by `stop`: the accept thread exits, connections end.
    stopping: AtomicBool,
    /// Connection ids (thread names).
    next_conn: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read_lock<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}

fn write_lock<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}

/// A connected socket, Unix or TCP.
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }
    fn shutdown(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
        }
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_write_timeout(t),
            Stream::Tcp(s) => s.set_write_timeout(t),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A connection's byte stream: the socket, or TLS over it after `NBD_OPT_STARTTLS`.
enum Transport {
    Plain(Stream),
    #[cfg(feature = "tls")]
    Tls(Box<rustls::StreamOwned<rustls::ServerConnection, Stream>>),
    /// Only while upgrading (never read or written).
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    Gone,
}

impl Transport {
    fn sock(&self) -> Option<&Stream> {
        match self {
            Transport::Plain(s) => Some(s),
            #[cfg(feature = "tls")]
            Transport::Tls(t) => Some(&t.sock),
            Transport::Gone => None,
        }
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.sock().map_or(Ok(()), |s| s.set_read_timeout(t))
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.sock().map_or(Ok(()), |s| s.set_write_timeout(t))
    }
    fn shutdown(&self) {
        if let Some(s) = self.sock() {
            s.shutdown();
        }
    }
    fn is_tls(&self) -> bool {
        #[cfg(feature = "tls")]
        {
            matches!(self, Transport::Tls(_))
        }
        #[cfg(not(feature = "tls"))]
        {
            false
        }
    }
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "connection closed")
}

impl Read for Transport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(s) => s.read(buf),
            #[cfg(feature = "tls")]
            Transport::Tls(t) => t.read(buf),
            Transport::Gone => Err(gone()),
        }
    }
}

impl Write for Transport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(s) => s.write(buf),
            #[cfg(feature = "tls")]
            Transport::Tls(t) => t.write(buf),
            Transport::Gone => Err(gone()),
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

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    fn accept(&self) -> io::Result<Stream> {
        Ok(match self {
            Listener::Unix(l) => Stream::Unix(l.accept()?.0),
            Listener::Tcp(l) => {
                let s = l.accept()?.0;
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }
        })
    }
    fn fd(&self) -> i32 {
        match self {
            Listener::Unix(l) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }
}

/// An NBD server (see the module documentation for its threads and limits).
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::sync::Arc;
/// use cowbackup::{nbd::Server, DirtyBitmap, MemDriver};
/// let server = Server::start("unix:/tmp/cowbackup.sock")?;
/// let disk = Arc::new(MemDriver::new(1 << 20)?);
/// server.add("disk", disk, false)?;
/// let bitmap = DirtyBitmap::new(1 << 20, 65536)?;
/// server.add_bitmap("disk", "b0", bitmap)?;  // qemu:dirty-bitmap:b0
/// // nbdinfo --map=qemu:dirty-bitmap:b0 'nbd+unix:///disk?socket=/tmp/cowbackup.sock'
/// server.stop();
/// # Ok(()) }
/// ```
///
/// All methods take `&self` and may be called from any thread.
pub struct Server {
    shared: Arc<Shared>,
    address: String,
    /// The listening socket's fd (for shutdown) and the accept thread. Lock: this mutex.
    accept: Mutex<Option<(i32, JoinHandle<()>)>>,
    /// A Unix socket path this server created (removed by `stop` if it is still ours).
    unix_path: Option<(PathBuf, u64, u64)>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("address", &self.address).finish_non_exhaustive()
    }
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::invalid(msg)
}

fn os_error(errno: i32, msg: impl Into<String>) -> Error {
    Error::new(if errno == libc::EINVAL { ErrorKind::InvalidInput } else { ErrorKind::Io }, errno, msg)
}

fn from_io(what: &str, e: &io::Error) -> Error {
    os_error(errno_of(e), format!("{what}: {e}"))
}

/// Whether `o` configures TLS.
fn tls_on(o: &ServerOptions) -> bool {
    #[cfg(feature = "tls")]
    {
        o.tls.is_some()
    }
    #[cfg(not(feature = "tls"))]
    {
        let _ = o;
        false
    }
}

/// Create a listening Unix socket at `path` with mode 0600 from the start: the socket's
/// inode mode is set before `bind` creates the file (bind applies it, minus the umask), so
/// there is no moment when another user could connect. The caller may widen it later.
fn bind_unix_private(path: &std::path::Path) -> io::Result<UnixListener> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::io::FromRawFd;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; zeroed is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, &b) in addr.sun_path.iter_mut().zip(bytes) {
        *d = b as libc::c_char;
    }
    // SAFETY: plain socket(2) call.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket we own; the listener closes it on every path below.
    let listener = unsafe { UnixListener::from_raw_fd(fd) };
    // SAFETY: `fd` is open (owned by `listener`). Linux applies the socket inode's mode to
    // the file bind creates.
    if unsafe { libc::fchmod(fd, 0o600) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un and `len` is within it.
    if unsafe { libc::bind(fd, (&addr as *const libc::sockaddr_un).cast(), len as libc::socklen_t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // Belt and braces: whatever the kernel did, the file ends up 0600 (never wider).
    let _ = fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600));
    // SAFETY: `fd` is a bound socket.
    if unsafe { libc::listen(fd, 128) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(listener)
}

fn check_name(what: &str, name: &str) -> Result<()> {
    if name.len() > MAX_STRING as usize || name.contains('\0') {
        return Err(invalid(format!("{what} {name:?}: at most {MAX_STRING} bytes, no NUL")));
    }
    Ok(())
}

impl Server {
    /// Start a server on `address`: `"unix:PATH"` (a Unix socket created at `PATH`, mode
    /// 0600: only this user may connect until the caller widens it) or `"tcp:HOST:PORT"`
    /// (`PORT` 0 picks a free port; [`Server::address`] says which). Without TLS (see
    /// [`Server::start_with`] and [`ServerOptions::tls`]) a TCP address must be loopback.
    /// The server exports nothing until [`Server::add`].
    ///
    /// # Errors
    /// `InvalidInput` (EINVAL) for a malformed address; `EPERM` for a TCP address that is
    /// not loopback without TLS or [`ServerOptions::insecure`]; `EADDRINUSE` when a server already
    /// listens there; `EEXIST` when `PATH` exists and is not a socket (never removed); a
    /// stale socket file (nobody listening) is replaced. Other socket errors as errno.
    pub fn start(address: &str) -> Result<Server> {
        Server::start_with(address, ServerOptions::default())
    }

    /// [`Server::start`] with explicit [`ServerOptions`] (TLS, client authorization, the
    /// insecure switch, limits). Errors as [`Server::start`]; `EINVAL` also for a zero
    /// limit or timeout.
    pub fn start_with(address: &str, options: ServerOptions) -> Result<Server> {
        if options.max_connections == 0
            || options.max_payload < 4096
            || options.max_options == 0
            || options.idle_timeout.is_zero()
            || options.handshake_timeout.is_zero()
        {
            return Err(invalid(
                "NBD server options: max_connections, max_options, idle_timeout and handshake_timeout must be > 0, \
                 max_payload >= 4096",
            ));
        }
        let (listener, bound, unix_path) = if let Some(path) = address.strip_prefix("unix:") {
            if path.is_empty() || path.contains('\0') {
                return Err(invalid(format!("NBD server address {address:?}: empty socket path or NUL")));
            }
            let path = PathBuf::from(path);
            match fs::symlink_metadata(&path) {
                Ok(m) if m.file_type().is_socket() => {
                    if UnixStream::connect(&path).is_ok() {
                        return Err(os_error(
                            libc::EADDRINUSE,
                            format!("NBD server: a server already listens on {}", path.display()),
                        ));
                    }
                    fs::remove_file(&path)
                        .map_err(|e| from_io(&format!("removing stale socket {}", path.display()), &e))?;
                }
                Ok(_) => {
                    return Err(os_error(
                        libc::EEXIST,
                        format!("NBD server: {} exists and is not a socket", path.display()),
                    ));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(from_io(&format!("NBD server: {}", path.display()), &e)),
            }
            let l =
                bind_unix_private(&path).map_err(|e| from_io(&format!("NBD server: bind {}", path.display()), &e))?;
            let id = fs::symlink_metadata(&path).map(|m| (m.dev(), m.ino())).unwrap_or((0, 0));
            (Listener::Unix(l), format!("unix:{}", path.display()), Some((path, id.0, id.1)))
        } else if let Some(hp) = address.strip_prefix("tcp:") {
            let addrs: Vec<_> =
                hp.to_socket_addrs().map_err(|e| invalid(format!("NBD server address {address:?}: {e}")))?.collect();
            if addrs.is_empty() {
                return Err(invalid(format!("NBD server address {address:?}: resolves to nothing")));
            }
            let l = TcpListener::bind(&addrs[..]).map_err(|e| from_io(&format!("NBD server: bind {hp}"), &e))?;
            let local = l.local_addr().map_err(|e| from_io("NBD server: local address", &e))?;
            if !local.ip().is_loopback() && !tls_on(&options) && !options.insecure {
                return Err(os_error(
                    libc::EPERM,
                    format!(
                        "NBD server: {local} is reachable from other machines: configure TLS, or set the \
                         insecure option to serve every export in plaintext to anyone who reaches it"
                    ),
                ));
            }
            (Listener::Tcp(l), format!("tcp:{local}"), None)
        } else {
            return Err(invalid(format!(
                "NBD server address {address:?}: expected \"unix:PATH\" or \"tcp:HOST:PORT\""
            )));
        };
        let limits = Limits { max_payload: options.max_payload, ..Limits::default() };
        let shared = Arc::new(Shared {
            options,
            limits,
            exports: RwLock::new(BTreeMap::new()),
            conns: Mutex::new(HashMap::new()),
            stopping: AtomicBool::new(false),
            next_conn: AtomicU64::new(1),
        });
        let fd = listener.fd();
        let s2 = shared.clone();
        let thread = std::thread::Builder::new()
            .name("cowbackup-nbd-accept".into())
            .spawn(move || accept_loop(s2, listener))
            .map_err(|e| from_io("NBD server: spawning the accept thread", &e))?;
        Ok(Server { shared, address: bound, accept: Mutex::new(Some((fd, thread))), unix_path })
    }

    /// The address as bound: `"unix:PATH"` or `"tcp:IP:PORT"` (the real port when 0 was asked).
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Export `driver` as `name` (any string up to 4096 bytes without NUL; `""` is the
    /// default export of clients that give no name). Read-only unless `writable`; read-only
    /// exports advertise `CAN_MULTI_CONN`. Clients that connect from now on see it.
    ///
    /// # Errors
    /// `EINVAL` for a bad name; `EEXIST` when `name` is already exported.
    pub fn add(&self, name: &str, driver: Arc<dyn BlockDriver>, writable: bool) -> Result<()> {
        check_name("export name", name)?;
        let mut exports = write_lock(&self.shared.exports);
        if exports.contains_key(name) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                libc::EEXIST,
                format!("NBD export {name:?} already exists"),
            ));
        }
        exports.insert(name.to_owned(), Arc::new(Export { driver, writable, bitmaps: RwLock::new(BTreeMap::new()) }));
        Ok(())
    }

    /// Serve `bitmap` on export `export` as the metadata context
    /// `qemu:dirty-bitmap:NAME`: extents with flag 1 are dirty, 0 clean (QEMU's meaning).
    /// The server reads the bitmap live (frozen ∪ new marks while a job uses it).
    ///
    /// # Errors
    /// `ENOENT` when there is no such export; `EINVAL` for a bad name or a bitmap whose
    /// size differs from the export's; `EEXIST` for a name already used on that export.
    pub fn add_bitmap(&self, export: &str, name: &str, bitmap: Arc<DirtyBitmap>) -> Result<()> {
        check_name("bitmap name", name)?;
        if CONTEXT_QEMU_DIRTY_BITMAP.len() + name.len() > MAX_STRING as usize || name.is_empty() {
            return Err(invalid(format!("bitmap name {name:?}: empty or too long for a context name")));
        }
        let exports = read_lock(&self.shared.exports);
        let Some(e) = exports.get(export) else {
            return Err(Error::new(ErrorKind::InvalidInput, libc::ENOENT, format!("no NBD export {export:?}")));
        };
        if bitmap.size() != e.driver.size() {
            return Err(invalid(format!(
                "bitmap {name:?} covers {} bytes, export {export:?} has {}",
                bitmap.size(),
                e.driver.size()
            )));
        }
        let mut bitmaps = write_lock(&e.bitmaps);
        if bitmaps.contains_key(name) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                libc::EEXIST,
                format!("export {export:?} already has bitmap {name:?}"),
            ));
        }
        bitmaps.insert(name.to_owned(), bitmap);
        Ok(())
    }

    /// Stop exporting `name`: it is no longer listed or opened, and the clients connected
    /// to it are disconnected (their current request finishes first). The server drops its
    /// references to the driver and bitmaps once those connections end.
    ///
    /// # Errors
    /// `ENOENT` when there is no such export.
    pub fn remove(&self, name: &str) -> Result<()> {
        if write_lock(&self.shared.exports).remove(name).is_none() {
            return Err(Error::new(ErrorKind::InvalidInput, libc::ENOENT, format!("no NBD export {name:?}")));
        }
        for c in lock(&self.shared.conns).values() {
            if c.export.as_deref() == Some(name) {
                c.stream.shutdown();
            }
        }
        Ok(())
    }

    /// The names of the exports, sorted.
    pub fn exports(&self) -> Vec<String> {
        read_lock(&self.shared.exports).keys().cloned().collect()
    }

    /// Number of connections being served now.
    pub fn connections(&self) -> usize {
        lock(&self.shared.conns).values().filter(|c| !c.done.load(Ordering::Acquire)).count()
    }

    /// Stop the server: close the listening socket (and remove its Unix socket file),
    /// disconnect every client and join every thread. Idempotent; also done on drop.
    pub fn stop(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        let accept = lock(&self.accept).take();
        if let Some((fd, thread)) = accept {
            // SAFETY: `fd` is the listening socket, owned by the accept thread, which is still
            // running (not joined yet), so the fd is open; shutdown makes its accept() fail.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
            let _ = thread.join();
            if let Some((path, dev, ino)) = &self.unix_path {
                if let Ok(m) = fs::symlink_metadata(path) {
                    if m.file_type().is_socket() && m.dev() == *dev && m.ino() == *ino {
                        let _ = fs::remove_file(path);
                    }
                }
            }
        }
        // The accept thread is gone: no new connections. Disconnect and join the rest.
        let conns: Vec<Conn> = lock(&self.shared.conns).drain().map(|(_, c)| c).collect();
        for c in &conns {
            c.stream.shutdown();
        }
        for mut c in conns {
            if let Some(t) = c.thread.take() {
                let _ = t.join();
            }
        }
        write_lock(&self.shared.exports).clear();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(shared: Arc<Shared>, listener: Listener) {
    loop {
        let stream = listener.accept();
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        reap(&shared);
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::EBADF)) {
                    return; // the listening socket was shut down
                }
                // EMFILE, ECONNABORTED...: keep serving, without spinning.
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        let mut conns = lock(&shared.conns);
        let live = conns.values().filter(|c| !c.done.load(Ordering::Acquire)).count();
        if live >= shared.options.max_connections || shared.stopping.load(Ordering::SeqCst) {
            drop(conns);
            stream.shutdown();
            continue;
        }
        let Ok(handle) = stream.try_clone() else { continue };
        let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
        let done = Arc::new(AtomicBool::new(false));
        let (s2, d2) = (shared.clone(), done.clone());
        let spawned = std::thread::Builder::new().name(format!("cowbackup-nbd-{id}")).spawn(move || {
            let mut conn = Connection::new(s2.clone(), id, stream);
            // A panic in a driver ends this connection only.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| conn.run()));
            conn.stream.shutdown();
            d2.store(true, Ordering::Release);
        });
        match spawned {
            Ok(t) => {
                conns.insert(id, Conn { stream: handle, thread: Some(t), export: None, done });
            }
            Err(_) => handle.shutdown(),
        }
    }
}

/// Join the threads of finished connections.
fn reap(shared: &Shared) {
    let finished: Vec<Conn> = {
        let mut conns = lock(&shared.conns);
        let ids: Vec<u64> = conns.iter().filter(|(_, c)| c.done.load(Ordering::Acquire)).map(|(id, _)| *id).collect();
        ids.into_iter().filter_map(|id| conns.remove(&id)).collect()
    };
    for mut c in finished {
        if let Some(t) = c.thread.take() {
            let _ = t.join();
        }
    }
}

/// A metadata context selected by `SET_META_CONTEXT`.
#[derive(Clone)]
enum Context {
    Allocation,
    Bitmap(Arc<DirtyBitmap>),
}

/// The stream during the handshake: every read waits at most until the deadline, so a
/// client sending a byte now and then cannot hold its connection longer than that.
struct Deadlined<'a> {
    stream: &'a mut Transport,
    deadline: Instant,
}

impl Read for Deadlined<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "NBD peer too slow (deadline passed)"));
        }
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

/// Room kept before the data in the I/O buffer for a reply header (simple: 16 bytes,
/// OFFSET_DATA: 28), so a read reply goes out in one write without a copy.
const HEADROOM: usize = 32;

/// Why the handshake ended.
enum Negotiated {
    /// Transmission with this export.
    Go(String, Arc<Export>),
    /// The client aborted or must be disconnected.
    Close,
}

struct Connection {
    shared: Arc<Shared>,
    id: u64,
    stream: Transport,
    structured: bool,
    no_zeroes: bool,
    /// The contexts of the last SET_META_CONTEXT and the export it named.
    meta: Option<(String, Vec<(u32, Context)>)>,
    out: Vec<u8>,
    buf: Vec<u8>,
}

impl Connection {
    fn new(shared: Arc<Shared>, id: u64, stream: Stream) -> Self {
        Connection {
            shared,
            id,
            stream: Transport::Plain(stream),
            structured: false,
            no_zeroes: false,
            meta: None,
            out: Vec::new(),
            buf: Vec::new(),
        }
    }

    fn send(&mut self) -> io::Result<()> {
        let r = self.stream.write_all(&self.out);
        self.out.clear();
        r
    }

    /// How long one send may block on a client that does not read.
    fn write_timeout(&self) -> Duration {
        self.shared.options.handshake_timeout.max(Duration::from_secs(60))
    }

    /// After the ACK of `NBD_OPT_STARTTLS`: the TLS handshake (within the handshake
    /// deadline) and the allow-list check; on error the connection closes.
    #[cfg(feature = "tls")]
    fn start_tls(&mut self, deadline: Instant) -> io::Result<()> {
        let shared = self.shared.clone();
        let Some(tls) = shared.options.tls.as_ref() else { return Err(gone()) };
        let Transport::Plain(sock) = std::mem::replace(&mut self.stream, Transport::Gone) else {
            return Err(gone());
        };
        let t = tls.accept(sock, deadline, |s, d| {
            s.set_read_timeout(Some(d))?;
            s.set_write_timeout(Some(d))
        })?;
        t.sock.set_write_timeout(Some(self.write_timeout()))?;
        self.stream = Transport::Tls(Box::new(t));
        Ok(())
    }

    #[cfg(not(feature = "tls"))]
    fn start_tls(&mut self, _deadline: Instant) -> io::Result<()> {
        Err(gone())
    }

    fn run(&mut self) {
        let deadline = Instant::now() + self.shared.options.handshake_timeout;
        // A client that never reads cannot hold a thread forever either.
        let _ = self.stream.set_write_timeout(Some(self.write_timeout()));
        let negotiated = match self.handshake(deadline) {
            Ok(n) => n,
            Err(_) => return,
        };
        let Negotiated::Go(name, export) = negotiated else { return };
        if self.shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        {
            let mut conns = lock(&self.shared.conns);
            if let Some(c) = conns.get_mut(&self.id) {
                c.export = Some(name.clone());
            }
        }
        // Removed between GO and now? Then don't serve it.
        if !read_lock(&self.shared.exports).get(&name).is_some_and(|e| Arc::ptr_eq(e, &export)) {
            return;
        }
        let contexts = match self.meta.take() {
            Some((n, c)) if n == name => c,
            _ => Vec::new(),
        };
        let _ = self.transmission(&export, &contexts);
    }

    fn handshake(&mut self, deadline: Instant) -> io::Result<Negotiated> {
        let limits = self.shared.limits;
        self.out.extend_from_slice(&encode_greeting(HandshakeFlags::FIXED_NEWSTYLE | HandshakeFlags::NO_ZEROES));
        self.send()?;
        let flags = read_client_flags(&mut Deadlined { stream: &mut self.stream, deadline })?;
        self.no_zeroes = flags.contains(ClientFlags::NO_ZEROES);
        for _ in 0..self.shared.options.max_options {
            let (header, data) = match read_option(&mut Deadlined { stream: &mut self.stream, deadline }, &limits) {
                Ok(x) => x,
                Err(ProtoError::TooLarge { len, limit, .. }) => {
                    // The data cannot be skipped cheaply: say why, then disconnect.
                    encode_rep_error(
                        &mut self.out,
                        0,
                        REP_ERR_TOO_BIG,
                        &format!("option of {len} bytes (limit {limit})"),
                    );
                    let _ = self.send();
                    return Ok(Negotiated::Close);
                }
                Err(e) => return Err(e.into()),
            };
            let code = header.code;
            if self.shared.stopping.load(Ordering::SeqCst) {
                encode_rep_error(&mut self.out, code, REP_ERR_SHUTDOWN, "server is shutting down");
                let _ = self.send();
                return Ok(Negotiated::Close);
            }
            if tls_on(&self.shared.options) && !self.stream.is_tls() {
                // Before TLS: STARTTLS or ABORT, nothing else, and no information at all.
                match code {
                    OPT_STARTTLS if !data.is_empty() => {
                        encode_rep_error(&mut self.out, code, REP_ERR_INVALID, "STARTTLS carries no data");
                        self.send()?;
                    }
                    OPT_STARTTLS => {
                        encode_rep_ack(&mut self.out, code);
                        self.send()?;
                        self.start_tls(deadline)?;
                    }
                    OPT_ABORT => {
                        encode_rep_ack(&mut self.out, code);
                        let _ = self.send();
                        return Ok(Negotiated::Close);
                    }
                    OPT_EXPORT_NAME => return Ok(Negotiated::Close), // no way to report an error
                    _ => {
                        encode_rep_error(
                            &mut self.out,
                            code,
                            REP_ERR_TLS_REQD,
                            "TLS is required: send NBD_OPT_STARTTLS first",
                        );
                        self.send()?;
                    }
                }
                continue;
            }
            if code == OPT_STARTTLS && self.stream.is_tls() {
                encode_rep_error(&mut self.out, code, REP_ERR_INVALID, "TLS is already on");
                self.send()?;
                continue;
            }
            let opt = match ClientOption::parse(code, &data, &limits) {
                Ok(o) => o,
                Err(e) => {
                    if code == OPT_EXPORT_NAME {
                        return Ok(Negotiated::Close); // no way to report an error
                    }
                    encode_rep_error(&mut self.out, code, REP_ERR_INVALID, &e.to_string());
                    self.send()?;
                    continue;
                }
            };
            match opt {
                ClientOption::ExportName(name) => {
                    let Some((name, export)) = self.lookup(&name) else { return Ok(Negotiated::Close) };
                    let size = export.driver.size();
                    let flags = tflags(&export);
                    encode_export_name_reply(&mut self.out, size, flags, self.no_zeroes);
                    self.send()?;
                    return Ok(Negotiated::Go(name, export));
                }
                ClientOption::Abort => {
                    encode_rep_ack(&mut self.out, code);
                    let _ = self.send();
                    return Ok(Negotiated::Close);
                }
                ClientOption::List => {
                    let names: Vec<String> = read_lock(&self.shared.exports).keys().cloned().collect();
                    for n in &names {
                        encode_rep_server(&mut self.out, code, n, "");
                    }
                    encode_rep_ack(&mut self.out, code);
                    self.send()?;
                }
                ClientOption::Info(req) | ClientOption::Go(req) => {
                    let Some((name, export)) = self.lookup(&req.name) else {
                        encode_rep_error(
                            &mut self.out,
                            code,
                            REP_ERR_UNKNOWN,
                            &format!("no export named {:?}", req.name),
                        );
                        self.send()?;
                        continue;
                    };
                    let info = Info::Export { size: export.driver.size(), flags: tflags(&export) };
                    encode_rep_info(&mut self.out, code, &info);
                    if req.info.contains(&INFO_NAME) {
                        encode_rep_info(&mut self.out, code, &Info::Name(name.clone()));
                    }
                    let bs = Info::BlockSize { min: 1, preferred: 4096, max: self.shared.options.max_payload };
                    encode_rep_info(&mut self.out, code, &bs);
                    encode_rep_ack(&mut self.out, code);
                    self.send()?;
                    if code == OPT_GO {
                        return Ok(Negotiated::Go(name, export));
                    }
                }
                ClientOption::StructuredReply => {
                    if self.structured {
                        encode_rep_error(&mut self.out, code, REP_ERR_INVALID, "structured replies already negotiated");
                    } else {
                        self.structured = true;
                        encode_rep_ack(&mut self.out, code);
                    }
                    self.send()?;
                }
                ClientOption::ListMetaContext(req) | ClientOption::SetMetaContext(req) => {
                    let set = code == OPT_SET_META_CONTEXT;
                    if set {
                        self.meta = None;
                    }
                    if !self.structured {
                        encode_rep_error(&mut self.out, code, REP_ERR_INVALID, "negotiate structured replies first");
                        self.send()?;
                        continue;
                    }
                    let Some((name, export)) = self.lookup(&req.export) else {
                        encode_rep_error(
                            &mut self.out,
                            code,
                            REP_ERR_UNKNOWN,
                            &format!("no export named {:?}", req.export),
                        );
                        self.send()?;
                        continue;
                    };
                    let found = match_contexts(&export, &req.queries, set);
                    let mut selected = Vec::new();
                    for (i, (cname, ctx)) in found.into_iter().enumerate() {
                        let id = if set { i as u32 + 1 } else { 0 };
                        encode_rep_meta_context(&mut self.out, code, id, &cname);
                        if set {
                            selected.push((id, ctx));
                        }
                    }
                    encode_rep_ack(&mut self.out, code);
                    self.send()?;
                    if set {
                        self.meta = Some((name, selected));
                    }
                }
                ClientOption::Other { code, .. } => {
                    encode_rep_error(&mut self.out, code, REP_ERR_UNSUP, &format!("option {code} is not supported"));
                    self.send()?;
                }
            }
        }
        encode_rep_error(&mut self.out, 0, REP_ERR_POLICY, "too many options");
        let _ = self.send();
        Ok(Negotiated::Close)
    }

    /// The export called `name`; `""` also finds the only export when there is one.
    fn lookup(&self, name: &str) -> Option<(String, Arc<Export>)> {
        let exports = read_lock(&self.shared.exports);
        if let Some(e) = exports.get(name) {
            return Some((name.to_owned(), e.clone()));
        }
        if name.is_empty() && exports.len() == 1 {
            return exports.iter().next().map(|(n, e)| (n.clone(), e.clone()));
        }
        None
    }
}

/// The transmission flags of an export.
fn tflags(e: &Export) -> TransmissionFlags {
    {
        let mut f = TransmissionFlags::HAS_FLAGS | TransmissionFlags::SEND_FLUSH | TransmissionFlags::SEND_DF;
        if e.writable {
            f |= TransmissionFlags::SEND_FUA | TransmissionFlags::SEND_TRIM | TransmissionFlags::SEND_WRITE_ZEROES;
        } else {
            f |= TransmissionFlags::READ_ONLY | TransmissionFlags::CAN_MULTI_CONN;
        }
        f
    }
}

impl Connection {
    fn transmission(&mut self, export: &Export, contexts: &[(u32, Context)]) -> io::Result<()> {
        let limits = self.shared.limits;
        let size = export.driver.size();
        let known = CommandFlags::FUA | CommandFlags::NO_HOLE | CommandFlags::DF | CommandFlags::REQ_ONE;
        let idle = self.shared.options.idle_timeout;
        loop {
            // The whole request (header and payload) must arrive within the idle timeout.
            let deadline = Instant::now() + idle;
            let req = read_request(&mut Deadlined { stream: &mut self.stream, deadline })?;
            if req.has_payload() {
                if req.len > limits.max_payload {
                    // A payload we will not buffer and cannot skip cheaply: the spec allows
                    // a disconnect for lengths deemed a denial of service.
                    self.simple_or_error(req.cookie, NBD_EINVAL, "write payload larger than the maximum")?;
                    return Ok(());
                }
                let len = req.len as usize;
                let mut input = Deadlined { stream: &mut self.stream, deadline };
                if req.command == CMD_WRITE && export.writable && end_ok(&req, size) {
                    // Grow the buffer as the data arrives: a header alone costs no memory.
                    self.buf.clear();
                    self.buf.resize(HEADROOM, 0);
                    while self.buf.len() < HEADROOM + len {
                        let at = self.buf.len();
                        let step = (HEADROOM + len - at).min(PAYLOAD_STEP);
                        self.buf.resize(at + step, 0);
                        input.read_exact(&mut self.buf[at..])?;
                    }
                } else {
                    // The write fails anyway (read-only export, out of range): read and drop
                    // the payload in small pieces.
                    let mut scratch = [0u8; 16 << 10];
                    let mut left = len;
                    while left > 0 {
                        let n = left.min(scratch.len());
                        input.read_exact(&mut scratch[..n])?;
                        left -= n;
                    }
                }
            }
            if self.shared.stopping.load(Ordering::SeqCst) {
                self.simple_or_error(req.cookie, NBD_ESHUTDOWN, "server is shutting down")?;
                return Ok(());
            }
            if req.command == CMD_DISC {
                return Ok(());
            }
            if !known.contains(req.flags) {
                self.simple_or_error(
                    req.cookie,
                    NBD_EINVAL,
                    &format!("unsupported command flags {:#x}", req.flags.bits()),
                )?;
                continue;
            }
            let end = req.end();
            let in_range = end.is_some_and(|e| e <= size);
            match req.command {
                CMD_READ => {
                    if req.len > limits.max_payload {
                        let e = if req.flags.contains(CommandFlags::DF) { NBD_EOVERFLOW } else { NBD_EINVAL };
                        self.simple_or_error(
                            req.cookie,
                            e,
                            &format!("read of {} bytes exceeds the maximum payload", req.len),
                        )?;
                    } else if !in_range {
                        self.simple_or_error(req.cookie, NBD_EINVAL, &range_msg(&req, size))?;
                    } else {
                        self.read(export, &req)?;
                    }
                }
                CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM => {
                    let result = if !export.writable {
                        Err((NBD_EPERM, "the export is read-only".to_string()))
                    } else if !in_range {
                        let e = if req.command == CMD_TRIM { NBD_EINVAL } else { NBD_ENOSPC };
                        Err((e, range_msg(&req, size)))
                    } else {
                        let d = &export.driver;
                        let r = match req.command {
                            CMD_WRITE => d.write_at(&self.buf[HEADROOM..], req.offset),
                            CMD_WRITE_ZEROES => d.write_zeroes_at(req.offset, u64::from(req.len)),
                            _ => d.discard(req.offset, u64::from(req.len)),
                        };
                        let r = r.and_then(|()| if req.flags.contains(CommandFlags::FUA) { d.flush() } else { Ok(()) });
                        r.map_err(|e| (errno_to_nbd(errno_of(&e)), e.to_string()))
                    };
                    self.status_reply(req.cookie, result)?;
                }
                CMD_FLUSH => {
                    let r = export.driver.flush().map_err(|e| (errno_to_nbd(errno_of(&e)), e.to_string()));
                    self.status_reply(req.cookie, r)?;
                }
                CMD_BLOCK_STATUS => {
                    if !self.structured || contexts.is_empty() {
                        self.simple_or_error(req.cookie, NBD_EINVAL, "no metadata context negotiated")?;
                    } else if req.len == 0 || end.is_none() || req.offset >= size {
                        self.simple_or_error(req.cookie, NBD_EINVAL, &range_msg(&req, size))?;
                    } else {
                        self.block_status(export, &req, contexts)?;
                    }
                }
                _ => {
                    self.simple_or_error(req.cookie, NBD_EINVAL, &format!("unknown command {}", req.command))?;
                }
            }
            // Do not keep a huge buffer around for a connection that made one huge request.
            if self.buf.capacity() > (8 << 20) + HEADROOM {
                self.buf = Vec::new();
            }
        }
    }

    /// An error reply: an ERROR chunk with the message when structured replies are on,
    /// else a simple reply.
    fn simple_or_error(&mut self, cookie: u64, error: u32, msg: &str) -> io::Result<()> {
        if self.structured {
            encode_error_chunk(&mut self.out, ReplyFlags::DONE, cookie, error, msg);
        } else {
            encode_simple_reply(&mut self.out, cookie, error);
        }
        self.send()
    }

    fn status_reply(&mut self, cookie: u64, r: std::result::Result<(), (u32, String)>) -> io::Result<()> {
        match r {
            Ok(()) => {
                // Success without payload is a simple reply even with structured replies on.
                encode_simple_reply(&mut self.out, cookie, 0);
                self.send()
            }
            Err((e, msg)) => self.simple_or_error(cookie, e, &msg),
        }
    }

    fn read(&mut self, export: &Export, req: &Request) -> io::Result<()> {
        let len = req.len as usize;
        if self.buf.len() < HEADROOM + len {
            self.buf.resize(HEADROOM + len, 0);
        }
        let r =
            if len == 0 { Ok(()) } else { export.driver.read_at(&mut self.buf[HEADROOM..HEADROOM + len], req.offset) };
        if let Err(e) = r {
            return self.simple_or_error(req.cookie, errno_to_nbd(errno_of(&e)), &e.to_string());
        }
        let data = &self.buf[HEADROOM..HEADROOM + len];
        let mut header = Vec::with_capacity(HEADROOM);
        if !self.structured {
            encode_simple_reply(&mut header, req.cookie, 0);
        } else if len == 0 {
            encode_none_chunk(&mut header, req.cookie);
        } else if !req.flags.contains(CommandFlags::DF) && buffer_is_zero(data) {
            encode_offset_hole(&mut header, ReplyFlags::DONE, req.cookie, req.offset, req.len);
            return self.stream.write_all(&header);
        } else {
            encode_offset_data_header(&mut header, ReplyFlags::DONE, req.cookie, req.offset, req.len);
        }
        let start = HEADROOM - header.len();
        self.buf[start..HEADROOM].copy_from_slice(&header);
        self.stream.write_all(&self.buf[start..HEADROOM + len])
    }

    fn block_status(&mut self, export: &Export, req: &Request, contexts: &[(u32, Context)]) -> io::Result<()> {
        let size = export.driver.size();
        let end = (req.offset + u64::from(req.len)).min(size);
        let one = req.flags.contains(CommandFlags::REQ_ONE);
        // Bounded: at most this many descriptors per chunk (the spec's SHOULD is 2^20).
        let max_extents = if one { 1 } else { 1 << 16 };
        let mut chunks: Vec<(u32, Vec<Extent>)> = Vec::with_capacity(contexts.len());
        for (id, ctx) in contexts {
            let extents = match ctx {
                Context::Allocation => allocation_extents(&*export.driver, req.offset, end, max_extents),
                Context::Bitmap(bm) => Ok(bitmap_extents(bm, req.offset, end, max_extents)),
            };
            match extents {
                Ok(x) => chunks.push((*id, x)),
                Err(e) => return self.simple_or_error(req.cookie, errno_to_nbd(errno_of(&e)), &e.to_string()),
            }
        }
        let n = chunks.len();
        for (i, (id, extents)) in chunks.iter().enumerate() {
            let flags = if i + 1 == n { ReplyFlags::DONE } else { ReplyFlags::empty() };
            encode_block_status(&mut self.out, flags, req.cookie, *id, extents);
        }
        self.send()
    }
}

/// How much a write payload's buffer grows at a time.
const PAYLOAD_STEP: usize = 1 << 20;

/// Whether `req` ends inside an export of `size` bytes.
fn end_ok(req: &Request, size: u64) -> bool {
    req.end().is_some_and(|e| e <= size)
}

fn range_msg(req: &Request, size: u64) -> String {
    format!("request {}+{} is outside the export ({size} bytes)", req.offset, req.len)
}

/// Push an extent, merging it with the previous one when the flags agree.
fn push_extent(v: &mut Vec<Extent>, len: u32, flags: u32) {
    if let Some(last) = v.last_mut() {
        if last.flags == flags {
            if let Some(sum) = last.len.checked_add(len) {
                last.len = sum;
                return;
            }
        }
    }
    v.push(Extent { len, flags });
}

/// `base:allocation` of `[offset, end)` from the driver's block status: not DATA →
/// `STATE_HOLE`, ZERO → `STATE_ZERO`. Stops after `max` extents.
fn allocation_extents(d: &dyn BlockDriver, offset: u64, end: u64, max: usize) -> io::Result<Vec<Extent>> {
    let mut v = Vec::new();
    let mut pos = offset;
    while pos < end {
        let st = d.block_status(pos, end - pos)?;
        let len = st.len.clamp(1, end - pos);
        let mut flags = 0;
        if !st.flags.contains(StatusFlags::DATA) {
            flags |= STATE_HOLE;
        }
        if st.flags.contains(StatusFlags::ZERO) {
            flags |= STATE_ZERO;
        }
        let can_merge = v.last().is_some_and(|e: &Extent| e.flags == flags);
        if !can_merge && v.len() == max {
            break;
        }
        push_extent(&mut v, len as u32, flags);
        pos += len;
    }
    Ok(v)
}

/// `qemu:dirty-bitmap:` extents of `[offset, end)`: 1 = dirty, 0 = clean.
fn bitmap_extents(bm: &DirtyBitmap, offset: u64, end: u64, max: usize) -> Vec<Extent> {
    let mut v = Vec::new();
    let mut pos = offset;
    while pos < end && v.len() < max {
        match bm.next_dirty(pos) {
            Some((d, dlen)) if d < end => {
                if d > pos {
                    push_extent(&mut v, (d - pos) as u32, 0);
                    if v.len() == max {
                        break;
                    }
                }
                let de = (d + dlen).min(end);
                push_extent(&mut v, (de - d) as u32, STATE_DIRTY);
                pos = de;
            }
            _ => {
                push_extent(&mut v, (end - pos) as u32, 0);
                pos = end;
            }
        }
    }
    v
}

/// The contexts of `export` that `queries` select. `SET` takes exact names only
/// (`base:allocation`, `qemu:dirty-bitmap:NAME`); `LIST` also takes `base:`, `qemu:` and
/// `qemu:dirty-bitmap:` as wildcards, and no query at all means every context.
fn match_contexts(export: &Export, queries: &[String], set: bool) -> Vec<(String, Context)> {
    let bitmaps = read_lock(&export.bitmaps);
    let mut out: Vec<(String, Context)> = Vec::new();
    let mut allocation = false;
    let mut all_bitmaps = false;
    let mut some_bitmaps: Vec<&str> = Vec::new();
    if queries.is_empty() && !set {
        allocation = true;
        all_bitmaps = true;
    }
    for q in queries {
        if q == CONTEXT_BASE_ALLOCATION || (!set && q == "base:") {
            allocation = true;
        } else if !set && (q == "qemu:" || q == CONTEXT_QEMU_DIRTY_BITMAP) {
            all_bitmaps = true;
        } else if let Some(name) = q.strip_prefix(CONTEXT_QEMU_DIRTY_BITMAP) {
            if bitmaps.contains_key(name) && !some_bitmaps.contains(&name) {
                some_bitmaps.push(name);
            }
        }
    }
    if allocation {
        out.push((CONTEXT_BASE_ALLOCATION.into(), Context::Allocation));
    }
    for (name, b) in bitmaps.iter() {
        if all_bitmaps || some_bitmaps.contains(&name.as_str()) {
            out.push((format!("{CONTEXT_QEMU_DIRTY_BITMAP}{name}"), Context::Bitmap(b.clone())));
        }
    }
    out
}
