//! The one error type of cowbackup: a kind to match on, an errno for C, and the
//! context of an I/O failure (which device, which operation, where).

use std::fmt;
use std::io;

/// What went wrong, in the terms a caller matches on.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// Bad input: the message names the argument and the problem. Nothing was changed.
    InvalidInput,
    /// An I/O error of the source or the target; [`Error::errno`] has the errno.
    Io,
    /// The job was cancelled before it completed.
    Cancelled,
    /// A copy-before-write call waited longer than the job's `cbw_timeout`.
    TimedOut,
    /// The operation does not fit the job's current state (e.g. pause of a job that has ended).
    Busy,
    /// Memory could not be allocated (the copy bitmap, copy buffers): ENOMEM.
    OutOfMemory,
    /// The call was made from a place where it could only wait for itself (for example
    /// `wait` from inside one of the job's own callbacks): EDEADLK.
    Deadlock,
    /// Stored data failed its checks: a damaged, truncated or foreign dirty bitmap file
    /// (`EBADMSG`). The message says what is wrong and where.
    Corrupt,
}

/// Which device of a job an I/O error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The device being backed up.
    Source,
    /// The device the backup is written to.
    Target,
}

/// The driver operation that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// [`crate::BlockDriver::read_at`]
    Read,
    /// [`crate::BlockDriver::write_at`]
    Write,
    /// [`crate::BlockDriver::write_zeroes_at`]
    WriteZeroes,
    /// [`crate::BlockDriver::flush`]
    Flush,
    /// [`crate::BlockDriver::block_status`]
    BlockStatus,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Source => "source",
            Side::Target => "target",
        })
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::WriteZeroes => "write_zeroes",
            Op::Flush => "flush",
            Op::BlockStatus => "block_status",
        })
    }
}

/// Where an I/O error happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IoContext {
    /// Source or target.
    pub side: Side,
    /// The operation.
    pub op: Op,
    /// Byte offset of the request.
    pub offset: u64,
    /// Length of the request in bytes.
    pub len: u64,
}

/// An error of cowbackup. Cheap to clone: a job's result is kept and handed to every waiter.
#[derive(Clone, PartialEq, Eq)]
pub struct Error {
    kind: ErrorKind,
    errno: i32,
    message: String,
    context: Option<IoContext>,
}

/// `Result` with cowbackup's [`Error`] by default. The second parameter keeps the two-
/// parameter form working, so `use cowbackup::*` does not break `Result<T, E>` elsewhere.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A bad-input error with a message naming the problem.
    pub fn invalid(message: impl Into<String>) -> Error {
        Error { kind: ErrorKind::InvalidInput, errno: libc::EINVAL, message: message.into(), context: None }
    }

    /// The error of a cancelled job.
    pub fn cancelled() -> Error {
        Error { kind: ErrorKind::Cancelled, errno: libc::ECANCELED, message: "job cancelled".into(), context: None }
    }

    /// An error of the given kind and errno with a message.
    pub fn new(kind: ErrorKind, errno: i32, message: impl Into<String>) -> Error {
        Error { kind, errno, message: message.into(), context: None }
    }

    /// An I/O error of a device, with where it happened.
    pub fn io(side: Side, op: Op, offset: u64, len: u64, err: &io::Error) -> Error {
        Error {
            kind: if err.kind() == io::ErrorKind::TimedOut { ErrorKind::TimedOut } else { ErrorKind::Io },
            errno: errno_of(err),
            message: err.to_string(),
            context: Some(IoContext { side, op, offset, len }),
        }
    }

    /// The kind, to match on.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The positive errno (`EIO`, `ENOSPC`, `EINVAL`, `ECANCELED`, ...). The C API returns its negation.
    pub fn errno(&self) -> i32 {
        self.errno
    }

    /// Where the I/O error happened, for I/O errors.
    pub fn context(&self) -> Option<IoContext> {
        self.context
    }

    /// The message without the context.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.context {
            Some(c) => write!(f, "{} {} at offset {} ({} bytes): {}", c.side, c.op, c.offset, c.len, self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Error({:?}, errno {}: {})", self.kind, self.errno, self)
    }
}

impl std::error::Error for Error {}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        let kind = match e.kind {
            ErrorKind::InvalidInput => io::ErrorKind::InvalidInput,
            ErrorKind::TimedOut => io::ErrorKind::TimedOut,
            ErrorKind::Cancelled => io::ErrorKind::Interrupted,
            _ => io::Error::from_raw_os_error(e.errno).kind(),
        };
        io::Error::new(kind, e)
    }
}

/// `?` on a [`crate::BlockDriver`] call (an `io::Result`) inside a function returning
/// cowbackup's [`Result`]: the cowbackup error an `io::Error` carries (one made by
/// `From<Error> for io::Error`) comes back as it was; any other keeps its errno and
/// message, as an [`ErrorKind::Io`] (or `InvalidInput`, `TimedOut`) error without context.
impl From<io::Error> for Error {
    fn from(e: io::Error) -> Error {
        let errno = errno_of(&e);
        let kind = match e.kind() {
            io::ErrorKind::InvalidInput => ErrorKind::InvalidInput,
            io::ErrorKind::TimedOut => ErrorKind::TimedOut,
            io::ErrorKind::OutOfMemory => ErrorKind::OutOfMemory,
            _ => ErrorKind::Io,
        };
        let message = e.to_string();
        if e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
            if let Some(Ok(inner)) = e.into_inner().map(|inner| inner.downcast::<Error>()) {
                return *inner;
            }
        }
        Error { kind, errno, message, context: None }
    }
}

/// The errno of an `io::Error`: its OS code, or the closest errno of its kind.
pub fn errno_of(err: &io::Error) -> i32 {
    if let Some(code) = err.raw_os_error() {
        if code > 0 {
            return code;
        }
    }
    if let Some(inner) = err.get_ref().and_then(|e| e.downcast_ref::<Error>()) {
        return inner.errno;
    }
    match err.kind() {
        io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData => libc::EINVAL,
        io::ErrorKind::TimedOut => libc::ETIMEDOUT,
        io::ErrorKind::PermissionDenied => libc::EACCES,
        io::ErrorKind::NotFound => libc::ENOENT,
        io::ErrorKind::Unsupported => libc::ENOTSUP,
        io::ErrorKind::OutOfMemory => libc::ENOMEM,
        io::ErrorKind::StorageFull => libc::ENOSPC,
        io::ErrorKind::Interrupted => libc::EINTR,
        _ => libc::EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_error_keeps_errno_and_context() {
        let e = Error::io(Side::Target, Op::Write, 4096, 512, &io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(e.kind(), ErrorKind::Io);
        assert_eq!(e.errno(), libc::ENOSPC);
        let s = e.to_string();
        assert!(s.starts_with("target write at offset 4096 (512 bytes): "), "{s}");
        let back: io::Error = e.into();
        assert_eq!(errno_of(&back), libc::ENOSPC);
    }

    #[test]
    fn errno_of_custom_errors() {
        assert_eq!(errno_of(&io::Error::other("x")), libc::EIO);
        assert_eq!(errno_of(&io::Error::new(io::ErrorKind::TimedOut, "x")), libc::ETIMEDOUT);
        assert_eq!(errno_of(&io::Error::from(Error::invalid("bad"))), libc::EINVAL);
    }
}
