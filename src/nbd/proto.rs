//! The NBD wire format: one parser and encoder for both ends of a connection.
//!
//! This module knows the bytes of the NBD protocol (NetworkBlockDevice/nbd `doc/proto.md`)
//! for what cowbackup speaks: the fixed newstyle handshake; the options `EXPORT_NAME`,
//! `ABORT`, `LIST`, `INFO`, `GO`, `STRUCTURED_REPLY`, `LIST_META_CONTEXT` and
//! `SET_META_CONTEXT`; the commands `READ`, `WRITE`, `DISC`, `FLUSH`, `TRIM`,
//! `WRITE_ZEROES` and `BLOCK_STATUS`; simple replies and structured reply chunks
//! (`NONE`, `OFFSET_DATA`, `OFFSET_HOLE`, `BLOCK_STATUS`, `ERROR`, `ERROR_OFFSET`).
//! It does no I/O policy of its own: the server ([`super::Server`]) and the client driver
//! call it to turn bytes into values and values into bytes.
//!
//! # Hardening
//!
//! Every parser takes a byte slice or a [`Read`]er plus explicit [`Limits`]; it never
//! panics, never allocates more than the limits allow (a length field is checked before
//! anything is allocated for it, and buffers grow only as bytes actually arrive), and
//! reports every malformed input as a [`ProtoError`]. [`fuzz_server_input`] and
//! [`fuzz_client_input`] drive all of them from one byte string, for fuzzers.
//!
//! # Server side
//!
//! Write [`encode_greeting`], then [`read_client_flags`]; loop on [`read_option`] +
//! [`ClientOption::parse`] and answer with [`encode_option_reply`] / [`encode_rep_info`] /
//! [`encode_rep_server`] / [`encode_rep_meta_context`] / [`encode_rep_error`] (or
//! [`encode_export_name_reply`]). In transmission, loop on [`read_request`] (and
//! [`read_payload`] for `WRITE`), answering with [`encode_simple_reply`] or structured
//! chunks ([`encode_offset_data_header`], [`encode_offset_hole`], [`encode_block_status`],
//! [`encode_error_chunk`], [`encode_none_chunk`]).
//!
//! # Client side
//!
//! ```no_run
//! # fn main() -> std::io::Result<()> {
//! use std::io::Write;
//! use cowbackup::nbd::proto::*;
//! let mut s = std::os::unix::net::UnixStream::connect("/tmp/nbd.sock")?;
//! let limits = Limits::default();
//! let hs = read_greeting(&mut s)?;                      // NBDMAGIC IHAVEOPT flags
//! assert!(hs.contains(HandshakeFlags::FIXED_NEWSTYLE));
//! s.write_all(&encode_client_flags(ClientFlags::FIXED_NEWSTYLE | ClientFlags::NO_ZEROES))?;
//! let mut out = Vec::new();
//! ClientOption::StructuredReply.encode(&mut out)?;
//! ClientOption::SetMetaContext(MetaContextRequest {
//!     export: "disk".into(),
//!     queries: vec![CONTEXT_BASE_ALLOCATION.into()],
//! })
//! .encode(&mut out)?;
//! ClientOption::Go(InfoRequest { name: "disk".into(), info: vec![INFO_BLOCK_SIZE] }).encode(&mut out)?;
//! s.write_all(&out)?;
//! let (mut size, mut base_allocation) = (0, None);
//! loop {
//!     let reply = read_option_reply(&mut s, &limits)?;
//!     match reply.parse()? {
//!         OptionReplyBody::MetaContext { id, name } if name == CONTEXT_BASE_ALLOCATION => base_allocation = Some(id),
//!         OptionReplyBody::Info(Info::Export { size: sz, .. }) => size = sz,
//!         OptionReplyBody::Ack if reply.option == OPT_GO => break,  // transmission phase
//!         OptionReplyBody::Error { code, message } => {
//!             return Err(std::io::Error::other(format!("option {}: error {code:#x}: {message}", reply.option)))
//!         }
//!         _ => {}
//!     }
//! }
//! // A structured read: one request, chunks until DONE.
//! let req = Request { flags: CommandFlags::empty(), command: CMD_READ, cookie: 1, offset: 0, len: 4096 };
//! s.write_all(&req.encode())?;
//! let mut buf = vec![0u8; 4096];
//! loop {
//!     match read_reply_header(&mut s)? {
//!         ReplyHeader::Simple { error, .. } => { assert_eq!(error, 0); break; } // only without structured replies
//!         ReplyHeader::Chunk(h) => {
//!             let payload = read_chunk_payload(&mut s, &h, &limits)?;
//!             match parse_chunk(&h, &payload)? {
//!                 Chunk::OffsetData { offset, data } => {
//!                     let at = (offset - req.offset) as usize; // check it lies in the request!
//!                     buf[at..at + data.len()].copy_from_slice(data);
//!                 }
//!                 Chunk::OffsetHole { offset, len } => {
//!                     let at = (offset - req.offset) as usize;
//!                     buf[at..at + len as usize].fill(0);
//!                 }
//!                 Chunk::Error { error, message, .. } => {
//!                     return Err(std::io::Error::from_raw_os_error(nbd_to_errno(error)));
//!                 }
//!                 _ => {}
//!             }
//!             if h.is_done() { break; }
//!         }
//!     }
//! }
//! # let _ = (size, base_allocation); Ok(()) }
//! ```
//!
//! A client must check what it is given against what it asked ([`check_chunk`] does this
//! for a request: the cookie, offsets inside the request, extents for a negotiated context).

use std::fmt;
use std::io::{self, Read};

// ---------------------------------------------------------------------------------------
// Constants of the protocol
// ---------------------------------------------------------------------------------------

/// `"NBDMAGIC"`: first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `"IHAVEOPT"`: newstyle magic after `NBDMAGIC`, and the magic of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

bitflags::bitflags! {
    /// Handshake flags the server sends after `IHAVEOPT` (16 bits).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct HandshakeFlags: u16 {
        /// `NBD_FLAG_FIXED_NEWSTYLE`.
        const FIXED_NEWSTYLE = 1 << 0;
        /// `NBD_FLAG_NO_ZEROES`: the 124 zero bytes after `EXPORT_NAME` can be left out.
        const NO_ZEROES = 1 << 1;
    }

    /// Client flags, the client's answer to the greeting (32 bits).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct ClientFlags: u32 {
        /// `NBD_FLAG_C_FIXED_NEWSTYLE`.
        const FIXED_NEWSTYLE = 1 << 0;
        /// `NBD_FLAG_C_NO_ZEROES`.
        const NO_ZEROES = 1 << 1;
    }

    /// Transmission flags of an export (16 bits).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct TransmissionFlags: u16 {
        /// `NBD_FLAG_HAS_FLAGS`: always set.
        const HAS_FLAGS = 1 << 0;
        /// `NBD_FLAG_READ_ONLY`.
        const READ_ONLY = 1 << 1;
        /// `NBD_FLAG_SEND_FLUSH`.
        const SEND_FLUSH = 1 << 2;
        /// `NBD_FLAG_SEND_FUA`.
        const SEND_FUA = 1 << 3;
        /// `NBD_FLAG_ROTATIONAL`.
        const ROTATIONAL = 1 << 4;
        /// `NBD_FLAG_SEND_TRIM`.
        const SEND_TRIM = 1 << 5;
        /// `NBD_FLAG_SEND_WRITE_ZEROES`.
        const SEND_WRITE_ZEROES = 1 << 6;
        /// `NBD_FLAG_SEND_DF`.
        const SEND_DF = 1 << 7;
        /// `NBD_FLAG_CAN_MULTI_CONN`: several connections see one consistent export.
        const CAN_MULTI_CONN = 1 << 8;
        /// `NBD_FLAG_SEND_RESIZE`.
        const SEND_RESIZE = 1 << 9;
        /// `NBD_FLAG_SEND_CACHE`.
        const SEND_CACHE = 1 << 10;
        /// `NBD_FLAG_SEND_FAST_ZERO`.
        const SEND_FAST_ZERO = 1 << 11;
        /// `NBD_FLAG_BLOCK_STAT_PAYLOAD`.
        const BLOCK_STAT_PAYLOAD = 1 << 12;
    }

    /// Command flags of a request (16 bits).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct CommandFlags: u16 {
        /// `NBD_CMD_FLAG_FUA`: force unit access.
        const FUA = 1 << 0;
        /// `NBD_CMD_FLAG_NO_HOLE`: write zeroes without punching a hole.
        const NO_HOLE = 1 << 1;
        /// `NBD_CMD_FLAG_DF`: don't fragment a structured read reply.
        const DF = 1 << 2;
        /// `NBD_CMD_FLAG_REQ_ONE`: one extent per block status chunk.
        const REQ_ONE = 1 << 3;
        /// `NBD_CMD_FLAG_FAST_ZERO`.
        const FAST_ZERO = 1 << 4;
        /// `NBD_CMD_FLAG_PAYLOAD_LEN` (extended headers only).
        const PAYLOAD_LEN = 1 << 5;
    }

    /// Flags of a structured reply chunk (16 bits).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct ReplyFlags: u16 {
        /// `NBD_REPLY_FLAG_DONE`: the last chunk of the reply.
        const DONE = 1 << 0;
    }
}

/// `NBD_OPT_EXPORT_NAME`: choose an export and enter transmission (old way, no error reply).
pub const OPT_EXPORT_NAME: u32 = 1;
/// `NBD_OPT_ABORT`: end the negotiation.
pub const OPT_ABORT: u32 = 2;
/// `NBD_OPT_LIST`: list the exports.
pub const OPT_LIST: u32 = 3;
/// `NBD_OPT_STARTTLS`: upgrade the connection to TLS (cargo feature `tls`; a server
/// without TLS configured answers `NBD_REP_ERR_UNSUP`).
pub const OPT_STARTTLS: u32 = 5;
/// `NBD_OPT_INFO`: describe an export.
pub const OPT_INFO: u32 = 6;
/// `NBD_OPT_GO`: describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// `NBD_OPT_STRUCTURED_REPLY`.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// `NBD_OPT_LIST_META_CONTEXT`.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// `NBD_OPT_SET_META_CONTEXT`.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// `NBD_OPT_EXTENDED_HEADERS` (not supported by cowbackup).
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// `NBD_REP_ACK`.
pub const REP_ACK: u32 = 1;
/// `NBD_REP_SERVER`: one export of a `LIST`.
pub const REP_SERVER: u32 = 2;
/// `NBD_REP_INFO`.
pub const REP_INFO: u32 = 3;
/// `NBD_REP_META_CONTEXT`.
pub const REP_META_CONTEXT: u32 = 4;
/// Bit 31 of an option reply type: an error.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// `NBD_REP_ERR_UNSUP`: unknown option.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// `NBD_REP_ERR_POLICY`.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
/// `NBD_REP_ERR_INVALID`: syntactically or semantically invalid option.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// `NBD_REP_ERR_PLATFORM`.
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
/// `NBD_REP_ERR_TLS_REQD`.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
/// `NBD_REP_ERR_UNKNOWN`: no such export.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
/// `NBD_REP_ERR_SHUTDOWN`.
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
/// `NBD_REP_ERR_BLOCK_SIZE_REQD`.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
/// `NBD_REP_ERR_TOO_BIG`.
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

/// `NBD_INFO_EXPORT`: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// `NBD_INFO_NAME`.
pub const INFO_NAME: u16 = 1;
/// `NBD_INFO_DESCRIPTION`.
pub const INFO_DESCRIPTION: u16 = 2;
/// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum payload size.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// `NBD_CMD_READ`.
pub const CMD_READ: u16 = 0;
/// `NBD_CMD_WRITE`.
pub const CMD_WRITE: u16 = 1;
/// `NBD_CMD_DISC`: disconnect.
pub const CMD_DISC: u16 = 2;
/// `NBD_CMD_FLUSH`.
pub const CMD_FLUSH: u16 = 3;
/// `NBD_CMD_TRIM`.
pub const CMD_TRIM: u16 = 4;
/// `NBD_CMD_CACHE` (not advertised by cowbackup).
pub const CMD_CACHE: u16 = 5;
/// `NBD_CMD_WRITE_ZEROES`.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// `NBD_CMD_BLOCK_STATUS`.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// `NBD_REPLY_TYPE_NONE`.
pub const REPLY_TYPE_NONE: u16 = 0;
/// `NBD_REPLY_TYPE_OFFSET_DATA`: 64-bit offset, then data.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// `NBD_REPLY_TYPE_OFFSET_HOLE`: 64-bit offset, 32-bit length of zeroes.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// `NBD_REPLY_TYPE_BLOCK_STATUS`: 32-bit context id, then (length, flags) descriptors.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Bit 15 of a chunk type: an error chunk.
pub const REPLY_TYPE_FLAG_ERROR: u16 = 1 << 15;
/// `NBD_REPLY_TYPE_ERROR`: 32-bit error, 16-bit message length, message.
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_FLAG_ERROR | 1;
/// `NBD_REPLY_TYPE_ERROR_OFFSET`: as `ERROR`, then the 64-bit offset it applies to.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_FLAG_ERROR | 2;

/// `NBD_EPERM`: operation not permitted (write to a read-only export).
pub const NBD_EPERM: u32 = 1;
/// `NBD_EIO`.
pub const NBD_EIO: u32 = 5;
/// `NBD_ENOMEM`.
pub const NBD_ENOMEM: u32 = 12;
/// `NBD_EINVAL`: invalid argument (out of range, not served).
pub const NBD_EINVAL: u32 = 22;
/// `NBD_ENOSPC`: write past the end, or no space.
pub const NBD_ENOSPC: u32 = 28;
/// `NBD_EOVERFLOW`: value too large (oversized request without payload).
pub const NBD_EOVERFLOW: u32 = 75;
/// `NBD_ENOTSUP`.
pub const NBD_ENOTSUP: u32 = 95;
/// `NBD_ESHUTDOWN`: the server is shutting down.
pub const NBD_ESHUTDOWN: u32 = 108;

/// The `base:allocation` metadata context.
pub const CONTEXT_BASE_ALLOCATION: &str = "base:allocation";
/// The prefix of QEMU's dirty bitmap contexts: `qemu:dirty-bitmap:NAME`.
pub const CONTEXT_QEMU_DIRTY_BITMAP: &str = "qemu:dirty-bitmap:";
/// `base:allocation` flag `NBD_STATE_HOLE`: not allocated.
pub const STATE_HOLE: u32 = 1;
/// `base:allocation` flag `NBD_STATE_ZERO`: reads as zeroes.
pub const STATE_ZERO: u32 = 2;
/// `qemu:dirty-bitmap:` flag: the extent is dirty.
pub const STATE_DIRTY: u32 = 1;

/// Longest string (export name, query, message) the spec allows.
pub const MAX_STRING: u32 = 4096;
/// The maximum payload cowbackup advertises and accepts by default: 32 MiB.
pub const DEFAULT_MAX_PAYLOAD: u32 = 32 << 20;
/// Length of the server greeting: `NBDMAGIC`, `IHAVEOPT`, 16-bit flags.
pub const GREETING_LEN: usize = 18;
/// Length of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Length of the reply to `EXPORT_NAME` with the 124 zero bytes.
pub const EXPORT_NAME_REPLY_LEN: usize = 134;

// ---------------------------------------------------------------------------------------
// Limits and errors
// ---------------------------------------------------------------------------------------

/// What a parser may accept; anything larger is a [`ProtoError::TooLarge`] before any
/// allocation is made for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest option request data, and largest option reply data (default 64 KiB).
    pub max_option_len: u32,
    /// Longest string (default and spec maximum: 4096 bytes).
    pub max_string: u32,
    /// Most queries in one meta context option (default 1024).
    pub max_queries: u32,
    /// Most info requests in one `INFO`/`GO` (default 64).
    pub max_info_requests: u16,
    /// Largest request payload (`WRITE`) and read length (default 32 MiB).
    pub max_payload: u32,
    /// Most descriptors in one block status chunk (default 2^20, the spec's bound).
    pub max_extents: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_option_len: 64 << 10,
            max_string: MAX_STRING,
            max_queries: 1024,
            max_info_requests: 64,
            max_payload: DEFAULT_MAX_PAYLOAD,
            max_extents: 1 << 20,
        }
    }
}

impl Limits {
    /// Largest chunk payload a client accepts: a maximum read plus its 8-byte offset, or a
    /// block status chunk of `max_extents` descriptors.
    pub fn max_chunk_len(&self) -> u64 {
        (u64::from(self.max_payload) + 8).max(4 + 8 * u64::from(self.max_extents))
    }
}

/// A protocol error: the peer sent something the spec does not allow, or more than the
/// [`Limits`], or the stream failed.
#[non_exhaustive]
#[derive(Debug)]
pub enum ProtoError {
    /// Reading the stream failed (`UnexpectedEof` when it ended inside a message).
    Io(io::Error),
    /// A magic number is wrong.
    BadMagic {
        /// Which magic.
        what: &'static str,
        /// What was received.
        got: u64,
    },
    /// A length is above its limit (nothing was allocated for it).
    TooLarge {
        /// What is too large.
        what: &'static str,
        /// Its length.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// The bytes do not form a valid message.
    Malformed(String),
}

/// `Result` of the protocol functions.
pub type Result<T> = std::result::Result<T, ProtoError>;

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtoError::Io(e) => write!(f, "NBD: {e}"),
            ProtoError::BadMagic { what, got } => write!(f, "NBD: bad {what} magic {got:#x}"),
            ProtoError::TooLarge { what, len, limit } => {
                write!(f, "NBD: {what} of {len} bytes exceeds the limit of {limit}")
            }
            ProtoError::Malformed(m) => write!(f, "NBD: malformed message: {m}"),
        }
    }
}

impl std::error::Error for ProtoError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ProtoError::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for ProtoError {
    fn from(e: io::Error) -> Self {
        ProtoError::Io(e)
    }
}

impl From<ProtoError> for io::Error {
    /// Stream errors pass through; protocol violations become `InvalidData` (`EINVAL`
    /// family) with the message.
    fn from(e: ProtoError) -> Self {
        match e {
            ProtoError::Io(e) => e,
            other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
        }
    }
}

fn malformed<T>(msg: impl Into<String>) -> Result<T> {
    Err(ProtoError::Malformed(msg.into()))
}

fn check_len(what: &'static str, len: u64, limit: u64) -> Result<()> {
    if len > limit {
        return Err(ProtoError::TooLarge { what, len, limit });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Byte helpers
// ---------------------------------------------------------------------------------------

/// A reader over a byte slice that fails (never panics) when the bytes run out.
struct Bytes<'a> {
    buf: &'a [u8],
}

impl<'a> Bytes<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Bytes { buf }
    }
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.buf.len() {
            return malformed(format!("{what}: needs {n} bytes, {} left", self.buf.len()));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u16(&mut self, what: &str) -> Result<u16> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    /// A string of `len` bytes (UTF-8, no NUL, at most `limit`).
    fn string(&mut self, len: u64, limit: u32, what: &'static str) -> Result<String> {
        check_len(what, len, u64::from(limit))?;
        let b = self.take(len as usize, what)?;
        parse_string(b, what)
    }
    /// A string preceded by its 32-bit length.
    fn string32(&mut self, limit: u32, what: &'static str) -> Result<String> {
        let len = self.u32(what)?;
        self.string(u64::from(len), limit, what)
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
    fn remaining(&self) -> usize {
        self.buf.len()
    }
    fn finish(&self, what: &str) -> Result<()> {
        if !self.buf.is_empty() {
            return malformed(format!("{what}: {} trailing bytes", self.buf.len()));
        }
        Ok(())
    }
}

fn parse_string(b: &[u8], what: &str) -> Result<String> {
    match std::str::from_utf8(b) {
        Ok(s) if !s.contains('\0') => Ok(s.to_owned()),
        Ok(_) => malformed(format!("{what}: contains NUL")),
        Err(_) => malformed(format!("{what}: not UTF-8")),
    }
}

fn read_array<const N: usize, R: Read + ?Sized>(r: &mut R) -> Result<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)?;
    Ok(b)
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// Read exactly `len` bytes into `buf` (cleared first). `len` is checked against `limit`
/// before anything is allocated, and `buf` grows only as bytes arrive, so a peer that
/// announces a large length and sends nothing costs nothing.
pub fn read_bounded<R: Read + ?Sized>(
    r: &mut R,
    len: u64,
    limit: u64,
    what: &'static str,
    buf: &mut Vec<u8>,
) -> Result<()> {
    check_len(what, len, limit)?;
    buf.clear();
    let got = r.take(len).read_to_end(buf)?;
    if (got as u64) < len {
        return Err(ProtoError::Io(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("{what}: stream ended after {got} of {len} bytes"),
        )));
    }
    Ok(())
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn check_string(s: &str, what: &'static str) -> Result<()> {
    check_len(what, s.len() as u64, u64::from(MAX_STRING))?;
    if s.contains('\0') {
        return malformed(format!("{what}: contains NUL"));
    }
    Ok(())
}

/// `s` cut to at most `max` bytes at a character boundary (error messages).
fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

// ---------------------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------------------

/// The server's greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn encode_greeting(flags: HandshakeFlags) -> [u8; GREETING_LEN] {
    let mut b = [0u8; GREETING_LEN];
    b[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..].copy_from_slice(&flags.bits().to_be_bytes());
    b
}

/// Parse the server's greeting (client side). Oldstyle servers (`NBDMAGIC` followed by
/// the oldstyle magic) and servers without fixed newstyle are rejected.
pub fn parse_greeting(b: &[u8; GREETING_LEN]) -> Result<HandshakeFlags> {
    let magic = be_u64(b, 0);
    if magic != NBDMAGIC {
        return Err(ProtoError::BadMagic { what: "NBDMAGIC", got: magic });
    }
    let opt = be_u64(b, 8);
    if opt != IHAVEOPT {
        return Err(ProtoError::BadMagic { what: "IHAVEOPT (oldstyle servers are not supported)", got: opt });
    }
    let flags = HandshakeFlags::from_bits_retain(be_u16(b, 16));
    if !flags.contains(HandshakeFlags::FIXED_NEWSTYLE) {
        return malformed("server does not speak fixed newstyle");
    }
    Ok(flags)
}

/// Read and parse the server's greeting (client side).
pub fn read_greeting<R: Read + ?Sized>(r: &mut R) -> Result<HandshakeFlags> {
    parse_greeting(&read_array::<GREETING_LEN, R>(r)?)
}

/// The client flags, the client's answer to the greeting.
pub fn encode_client_flags(flags: ClientFlags) -> [u8; 4] {
    flags.bits().to_be_bytes()
}

/// Parse the client flags (server side): unknown bits are an error (the spec says the
/// server must then close), and so is a client without fixed newstyle.
pub fn parse_client_flags(b: [u8; 4]) -> Result<ClientFlags> {
    let raw = u32::from_be_bytes(b);
    let Some(flags) = ClientFlags::from_bits(raw) else {
        return malformed(format!("unknown client flags {raw:#x}"));
    };
    if !flags.contains(ClientFlags::FIXED_NEWSTYLE) {
        return malformed("client does not speak fixed newstyle");
    }
    Ok(flags)
}

/// Read and parse the client flags (server side).
pub fn read_client_flags<R: Read + ?Sized>(r: &mut R) -> Result<ClientFlags> {
    parse_client_flags(read_array::<4, R>(r)?)
}

// ---------------------------------------------------------------------------------------
// Options (client → server)
// ---------------------------------------------------------------------------------------

/// The 16-byte header of an option request: `IHAVEOPT`, option code, data length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option (`OPT_*`).
    pub code: u32,
    /// Length of the data that follows.
    pub len: u32,
}

/// Parse an option header.
pub fn parse_option_header(b: &[u8; 16]) -> Result<OptionHeader> {
    let magic = be_u64(b, 0);
    if magic != IHAVEOPT {
        return Err(ProtoError::BadMagic { what: "option (IHAVEOPT)", got: magic });
    }
    Ok(OptionHeader { code: be_u32(b, 8), len: be_u32(b, 12) })
}

/// Read one option request: the header and its data (server side). A length above
/// `limits.max_option_len` is [`ProtoError::TooLarge`] and its data is left unread (the
/// server answers `NBD_REP_ERR_TOO_BIG` and disconnects).
pub fn read_option<R: Read + ?Sized>(r: &mut R, limits: &Limits) -> Result<(OptionHeader, Vec<u8>)> {
    let header = parse_option_header(&read_array::<16, R>(r)?)?;
    let mut data = Vec::new();
    read_bounded(r, u64::from(header.len), u64::from(limits.max_option_len), "option data", &mut data)?;
    Ok((header, data))
}

/// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InfoRequest {
    /// The export name ("" = the default export).
    pub name: String,
    /// The `INFO_*` items asked for.
    pub info: Vec<u16>,
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MetaContextRequest {
    /// The export the contexts are for.
    pub export: String,
    /// The queries (`base:allocation`, `qemu:dirty-bitmap:NAME`, `qemu:` ...).
    pub queries: Vec<String>,
}

/// An option request, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    /// `NBD_OPT_EXPORT_NAME` with the name.
    ExportName(String),
    /// `NBD_OPT_ABORT`.
    Abort,
    /// `NBD_OPT_LIST`.
    List,
    /// `NBD_OPT_INFO`.
    Info(InfoRequest),
    /// `NBD_OPT_GO`.
    Go(InfoRequest),
    /// `NBD_OPT_STRUCTURED_REPLY`.
    StructuredReply,
    /// `NBD_OPT_LIST_META_CONTEXT`.
    ListMetaContext(MetaContextRequest),
    /// `NBD_OPT_SET_META_CONTEXT`.
    SetMetaContext(MetaContextRequest),
    /// Any other option, with its raw data (the server answers `NBD_REP_ERR_UNSUP`).
    Other {
        /// The option code.
        code: u32,
        /// Its data.
        data: Vec<u8>,
    },
}

impl ClientOption {
    /// The option code (`OPT_*`).
    pub fn code(&self) -> u32 {
        match self {
            ClientOption::ExportName(_) => OPT_EXPORT_NAME,
            ClientOption::Abort => OPT_ABORT,
            ClientOption::List => OPT_LIST,
            ClientOption::Info(_) => OPT_INFO,
            ClientOption::Go(_) => OPT_GO,
            ClientOption::StructuredReply => OPT_STRUCTURED_REPLY,
            ClientOption::ListMetaContext(_) => OPT_LIST_META_CONTEXT,
            ClientOption::SetMetaContext(_) => OPT_SET_META_CONTEXT,
            ClientOption::Other { code, .. } => *code,
        }
    }

    /// Parse the data of option `code` (server side). Errors mean `NBD_REP_ERR_INVALID`
    /// (or, for `EXPORT_NAME`, a disconnect).
    pub fn parse(code: u32, data: &[u8], limits: &Limits) -> Result<ClientOption> {
        let mut b = Bytes::new(data);
        let opt = match code {
            OPT_EXPORT_NAME => {
                ClientOption::ExportName(b.string(data.len() as u64, limits.max_string, "export name")?)
            }
            OPT_ABORT | OPT_LIST | OPT_STRUCTURED_REPLY => {
                b.finish("option that takes no data")?;
                match code {
                    OPT_ABORT => ClientOption::Abort,
                    OPT_LIST => ClientOption::List,
                    _ => ClientOption::StructuredReply,
                }
            }
            OPT_INFO | OPT_GO => {
                let name = b.string32(limits.max_string, "export name")?;
                let n = b.u16("number of info requests")?;
                check_len("info requests", u64::from(n), u64::from(limits.max_info_requests))?;
                if usize::from(n) * 2 != b.remaining() {
                    return malformed(format!("{n} info requests in {} bytes", b.remaining()));
                }
                let mut info = Vec::with_capacity(usize::from(n));
                for _ in 0..n {
                    info.push(b.u16("info request")?);
                }
                let req = InfoRequest { name, info };
                if code == OPT_INFO {
                    ClientOption::Info(req)
                } else {
                    ClientOption::Go(req)
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let export = b.string32(limits.max_string, "export name")?;
                let n = b.u32("number of queries")?;
                check_len("meta context queries", u64::from(n), u64::from(limits.max_queries))?;
                // Each query takes at least its 4-byte length: bounds the allocation by the data.
                let mut queries = Vec::with_capacity((n as usize).min(b.remaining() / 4));
                for _ in 0..n {
                    queries.push(b.string32(limits.max_string, "meta context query")?);
                }
                b.finish("meta context option")?;
                let req = MetaContextRequest { export, queries };
                if code == OPT_LIST_META_CONTEXT {
                    ClientOption::ListMetaContext(req)
                } else {
                    ClientOption::SetMetaContext(req)
                }
            }
            _ => ClientOption::Other { code, data: data.to_vec() },
        };
        Ok(opt)
    }

    /// Append the option request (header and data) to `out` (client side). Strings
    /// longer than 4096 bytes or with NUL are an error; nothing is appended then.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<()> {
        let mut data = Vec::new();
        match self {
            ClientOption::ExportName(name) => {
                check_string(name, "export name")?;
                data.extend_from_slice(name.as_bytes());
            }
            ClientOption::Abort | ClientOption::List | ClientOption::StructuredReply => {}
            ClientOption::Info(req) | ClientOption::Go(req) => {
                check_string(&req.name, "export name")?;
                let n = u16::try_from(req.info.len()).map_err(|_| ProtoError::TooLarge {
                    what: "info requests",
                    len: req.info.len() as u64,
                    limit: 65535,
                })?;
                put_u32(&mut data, req.name.len() as u32);
                data.extend_from_slice(req.name.as_bytes());
                put_u16(&mut data, n);
                for i in &req.info {
                    put_u16(&mut data, *i);
                }
            }
            ClientOption::ListMetaContext(req) | ClientOption::SetMetaContext(req) => {
                check_string(&req.export, "export name")?;
                put_u32(&mut data, req.export.len() as u32);
                data.extend_from_slice(req.export.as_bytes());
                put_u32(&mut data, req.queries.len() as u32);
                for q in &req.queries {
                    check_string(q, "meta context query")?;
                    put_u32(&mut data, q.len() as u32);
                    data.extend_from_slice(q.as_bytes());
                }
            }
            ClientOption::Other { data: d, .. } => data.extend_from_slice(d),
        }
        let len = u32::try_from(data.len()).map_err(|_| ProtoError::TooLarge {
            what: "option data",
            len: data.len() as u64,
            limit: u64::from(u32::MAX),
        })?;
        put_u64(out, IHAVEOPT);
        put_u32(out, self.code());
        put_u32(out, len);
        out.extend_from_slice(&data);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Option replies (server → client)
// ---------------------------------------------------------------------------------------

/// An `NBD_REP_INFO` item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    /// `NBD_INFO_EXPORT`.
    Export {
        /// Export size in bytes.
        size: u64,
        /// Transmission flags.
        flags: TransmissionFlags,
    },
    /// `NBD_INFO_NAME`.
    Name(String),
    /// `NBD_INFO_DESCRIPTION`.
    Description(String),
    /// `NBD_INFO_BLOCK_SIZE`.
    BlockSize {
        /// Minimum block size.
        min: u32,
        /// Preferred block size.
        preferred: u32,
        /// Maximum payload size.
        max: u32,
    },
    /// An info type this module does not know (clients must ignore it).
    Other {
        /// The info type.
        kind: u16,
        /// Its data.
        data: Vec<u8>,
    },
}

impl Info {
    /// Append the reply data of this item (type + fields), without the option reply header.
    fn encode_data(&self, out: &mut Vec<u8>) {
        match self {
            Info::Export { size, flags } => {
                put_u16(out, INFO_EXPORT);
                put_u64(out, *size);
                put_u16(out, flags.bits());
            }
            Info::Name(s) | Info::Description(s) => {
                put_u16(out, if matches!(self, Info::Name(_)) { INFO_NAME } else { INFO_DESCRIPTION });
                out.extend_from_slice(truncate_str(s, MAX_STRING as usize).as_bytes());
            }
            Info::BlockSize { min, preferred, max } => {
                put_u16(out, INFO_BLOCK_SIZE);
                put_u32(out, *min);
                put_u32(out, *preferred);
                put_u32(out, *max);
            }
            Info::Other { kind, data } => {
                put_u16(out, *kind);
                out.extend_from_slice(data);
            }
        }
    }

    /// Parse the data of an `NBD_REP_INFO` reply (client side).
    pub fn parse(data: &[u8]) -> Result<Info> {
        let mut b = Bytes::new(data);
        let kind = b.u16("info type")?;
        let info = match kind {
            INFO_EXPORT => {
                let size = b.u64("export size")?;
                let flags = TransmissionFlags::from_bits_retain(b.u16("transmission flags")?);
                b.finish("NBD_INFO_EXPORT")?;
                Info::Export { size, flags }
            }
            INFO_NAME | INFO_DESCRIPTION => {
                let rest = b.rest();
                check_len("info string", rest.len() as u64, u64::from(MAX_STRING))?;
                let s = String::from_utf8_lossy(rest).into_owned();
                if kind == INFO_NAME {
                    Info::Name(s)
                } else {
                    Info::Description(s)
                }
            }
            INFO_BLOCK_SIZE => {
                let min = b.u32("minimum block size")?;
                let preferred = b.u32("preferred block size")?;
                let max = b.u32("maximum payload")?;
                b.finish("NBD_INFO_BLOCK_SIZE")?;
                Info::BlockSize { min, preferred, max }
            }
            _ => Info::Other { kind, data: b.rest().to_vec() },
        };
        Ok(info)
    }
}

/// Append an option reply: magic, option, reply type, data length, data.
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) {
    put_u64(out, OPTION_REPLY_MAGIC);
    put_u32(out, option);
    put_u32(out, reply_type);
    put_u32(out, data.len() as u32);
    out.extend_from_slice(data);
}

/// Append `NBD_REP_ACK` for `option`.
pub fn encode_rep_ack(out: &mut Vec<u8>, option: u32) {
    encode_option_reply(out, option, REP_ACK, &[]);
}

/// Append `NBD_REP_SERVER` (one export of a `LIST`): name and description.
pub fn encode_rep_server(out: &mut Vec<u8>, option: u32, name: &str, description: &str) {
    let name = truncate_str(name, MAX_STRING as usize);
    let description = truncate_str(description, MAX_STRING as usize);
    let mut data = Vec::with_capacity(4 + name.len() + description.len());
    put_u32(&mut data, name.len() as u32);
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(description.as_bytes());
    encode_option_reply(out, option, REP_SERVER, &data);
}

/// Append `NBD_REP_INFO` with one item.
pub fn encode_rep_info(out: &mut Vec<u8>, option: u32, info: &Info) {
    let mut data = Vec::new();
    info.encode_data(&mut data);
    encode_option_reply(out, option, REP_INFO, &data);
}

/// Append `NBD_REP_META_CONTEXT`: a context id and its name.
pub fn encode_rep_meta_context(out: &mut Vec<u8>, option: u32, id: u32, name: &str) {
    let name = truncate_str(name, MAX_STRING as usize);
    let mut data = Vec::with_capacity(4 + name.len());
    put_u32(&mut data, id);
    data.extend_from_slice(name.as_bytes());
    encode_option_reply(out, option, REP_META_CONTEXT, &data);
}

/// Append an error reply (`REP_ERR_*`) with a message for humans (cut to 4096 bytes).
pub fn encode_rep_error(out: &mut Vec<u8>, option: u32, error: u32, message: &str) {
    encode_option_reply(out, option, error | REP_FLAG_ERROR, truncate_str(message, MAX_STRING as usize).as_bytes());
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, transmission flags, and 124 zero bytes
/// unless both sides agreed on `NO_ZEROES`.
pub fn encode_export_name_reply(out: &mut Vec<u8>, size: u64, flags: TransmissionFlags, no_zeroes: bool) {
    put_u64(out, size);
    put_u16(out, flags.bits());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
}

/// Read the reply to `NBD_OPT_EXPORT_NAME` (client side): size and transmission flags.
/// (A server without the export closes the connection instead: `UnexpectedEof`.)
pub fn read_export_name_reply<R: Read + ?Sized>(r: &mut R, no_zeroes: bool) -> Result<(u64, TransmissionFlags)> {
    let b = read_array::<10, R>(r)?;
    if !no_zeroes {
        read_array::<124, R>(r)?;
    }
    Ok((be_u64(&b, 0), TransmissionFlags::from_bits_retain(be_u16(&b, 8))))
}

/// An option reply as received (client side): see [`OptionReply::parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionReply {
    /// The option it answers.
    pub option: u32,
    /// `REP_*`.
    pub reply_type: u32,
    /// The reply data.
    pub data: Vec<u8>,
}

/// An option reply, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionReplyBody {
    /// `NBD_REP_ACK`.
    Ack,
    /// `NBD_REP_SERVER`: an export of a `LIST`.
    Server {
        /// The export name.
        name: String,
        /// Its description (may be empty).
        description: String,
    },
    /// `NBD_REP_INFO`.
    Info(Info),
    /// `NBD_REP_META_CONTEXT`.
    MetaContext {
        /// The context id (to match block status chunks; 0 for `LIST_META_CONTEXT`).
        id: u32,
        /// The context name.
        name: String,
    },
    /// An error reply (`REP_ERR_*`), with the server's message.
    Error {
        /// The reply type, bit 31 set.
        code: u32,
        /// The message (may be empty).
        message: String,
    },
    /// A non-error reply type this module does not know.
    Other {
        /// The reply type.
        reply_type: u32,
    },
}

impl OptionReply {
    /// True for an error reply (bit 31).
    pub fn is_error(&self) -> bool {
        self.reply_type & REP_FLAG_ERROR != 0
    }

    /// Parse the reply data according to its type.
    pub fn parse(&self) -> Result<OptionReplyBody> {
        if self.is_error() {
            let msg = &self.data[..self.data.len().min(MAX_STRING as usize)];
            return Ok(OptionReplyBody::Error {
                code: self.reply_type,
                message: String::from_utf8_lossy(msg).into_owned(),
            });
        }
        let mut b = Bytes::new(&self.data);
        let body = match self.reply_type {
            REP_ACK => {
                b.finish("NBD_REP_ACK")?;
                OptionReplyBody::Ack
            }
            REP_SERVER => {
                let len = b.u32("export name length")?;
                check_len("export name", u64::from(len), u64::from(MAX_STRING))?;
                let name = String::from_utf8_lossy(b.take(len as usize, "export name")?).into_owned();
                let rest = b.rest();
                let description = String::from_utf8_lossy(&rest[..rest.len().min(MAX_STRING as usize)]).into_owned();
                OptionReplyBody::Server { name, description }
            }
            REP_INFO => OptionReplyBody::Info(Info::parse(&self.data)?),
            REP_META_CONTEXT => {
                let id = b.u32("context id")?;
                let rest = b.rest();
                check_len("context name", rest.len() as u64, u64::from(MAX_STRING))?;
                OptionReplyBody::MetaContext { id, name: parse_string(rest, "context name")? }
            }
            other => OptionReplyBody::Other { reply_type: other },
        };
        Ok(body)
    }
}

/// Read one option reply (client side); its data is bounded by `limits.max_option_len`.
pub fn read_option_reply<R: Read + ?Sized>(r: &mut R, limits: &Limits) -> Result<OptionReply> {
    let h = read_array::<20, R>(r)?;
    let magic = be_u64(&h, 0);
    if magic != OPTION_REPLY_MAGIC {
        return Err(ProtoError::BadMagic { what: "option reply", got: magic });
    }
    let mut data = Vec::new();
    read_bounded(r, u64::from(be_u32(&h, 16)), u64::from(limits.max_option_len), "option reply data", &mut data)?;
    Ok(OptionReply { option: be_u32(&h, 8), reply_type: be_u32(&h, 12), data })
}

// ---------------------------------------------------------------------------------------
// Transmission: requests
// ---------------------------------------------------------------------------------------

/// A transmission request header (28 bytes). A `WRITE` is followed by `len` bytes of data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: CommandFlags,
    /// The command (`CMD_*`).
    pub command: u16,
    /// The client's cookie (handle), echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
}

impl Request {
    /// The 28 bytes of the request header.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.bits().to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    /// Parse a request header. Unknown flag bits are kept (the server rejects them).
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Result<Request> {
        let magic = be_u32(b, 0);
        if magic != REQUEST_MAGIC {
            return Err(ProtoError::BadMagic { what: "request", got: u64::from(magic) });
        }
        Ok(Request {
            flags: CommandFlags::from_bits_retain(be_u16(b, 4)),
            command: be_u16(b, 6),
            cookie: be_u64(b, 8),
            offset: be_u64(b, 16),
            len: be_u32(b, 24),
        })
    }

    /// `offset + len`, or `None` when it overflows 64 bits.
    pub fn end(&self) -> Option<u64> {
        self.offset.checked_add(u64::from(self.len))
    }

    /// True when `len` bytes of data follow the header (`WRITE`).
    pub fn has_payload(&self) -> bool {
        self.command == CMD_WRITE
    }
}

/// Read one request header (server side).
pub fn read_request<R: Read + ?Sized>(r: &mut R) -> Result<Request> {
    Request::parse(&read_array::<REQUEST_LEN, R>(r)?)
}

/// Read the payload of `req` (its `len` bytes for a `WRITE`, else nothing) into `buf`,
/// bounded by `limits.max_payload` (server side). Above the limit: [`ProtoError::TooLarge`]
/// with the payload unread (the server must disconnect).
pub fn read_payload<R: Read + ?Sized>(r: &mut R, req: &Request, limits: &Limits, buf: &mut Vec<u8>) -> Result<()> {
    if !req.has_payload() {
        buf.clear();
        return Ok(());
    }
    read_bounded(r, u64::from(req.len), u64::from(limits.max_payload), "write payload", buf)
}

// ---------------------------------------------------------------------------------------
// Transmission: replies
// ---------------------------------------------------------------------------------------

/// One block status descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes (nonzero).
    pub len: u32,
    /// Status flags of the context (`STATE_*`).
    pub flags: u32,
}

/// Append a simple reply header (16 bytes); for a successful `READ` the data follows.
pub fn encode_simple_reply(out: &mut Vec<u8>, cookie: u64, error: u32) {
    put_u32(out, SIMPLE_REPLY_MAGIC);
    put_u32(out, error);
    put_u64(out, cookie);
}

/// Append a structured chunk header (20 bytes); `len` payload bytes follow.
pub fn encode_chunk_header(out: &mut Vec<u8>, flags: ReplyFlags, reply_type: u16, cookie: u64, len: u32) {
    put_u32(out, STRUCTURED_REPLY_MAGIC);
    put_u16(out, flags.bits());
    put_u16(out, reply_type);
    put_u64(out, cookie);
    put_u32(out, len);
}

/// Append the header of an `OFFSET_DATA` chunk and its offset; the caller sends
/// `data_len` bytes of data next. `data_len` must be at most `u32::MAX - 8`.
pub fn encode_offset_data_header(out: &mut Vec<u8>, flags: ReplyFlags, cookie: u64, offset: u64, data_len: u32) {
    encode_chunk_header(out, flags, REPLY_TYPE_OFFSET_DATA, cookie, data_len.saturating_add(8));
    put_u64(out, offset);
}

/// Append an `OFFSET_HOLE` chunk: `len` bytes of zeroes at `offset`.
pub fn encode_offset_hole(out: &mut Vec<u8>, flags: ReplyFlags, cookie: u64, offset: u64, len: u32) {
    encode_chunk_header(out, flags, REPLY_TYPE_OFFSET_HOLE, cookie, 12);
    put_u64(out, offset);
    put_u32(out, len);
}

/// Append a `BLOCK_STATUS` chunk for context `context_id`.
pub fn encode_block_status(out: &mut Vec<u8>, flags: ReplyFlags, cookie: u64, context_id: u32, extents: &[Extent]) {
    let len = 4u64 + 8 * extents.len() as u64;
    encode_chunk_header(out, flags, REPLY_TYPE_BLOCK_STATUS, cookie, len.min(u64::from(u32::MAX)) as u32);
    put_u32(out, context_id);
    for e in extents {
        put_u32(out, e.len);
        put_u32(out, e.flags);
    }
}

/// Append an `ERROR` chunk (`NBD_E*` and a message cut to 4096 bytes).
pub fn encode_error_chunk(out: &mut Vec<u8>, flags: ReplyFlags, cookie: u64, error: u32, message: &str) {
    let msg = truncate_str(message, MAX_STRING as usize);
    encode_chunk_header(out, flags, REPLY_TYPE_ERROR, cookie, 6 + msg.len() as u32);
    put_u32(out, error);
    put_u16(out, msg.len() as u16);
    out.extend_from_slice(msg.as_bytes());
}

/// Append a `NONE` chunk with `DONE`: the end of a reply.
pub fn encode_none_chunk(out: &mut Vec<u8>, cookie: u64) {
    encode_chunk_header(out, ReplyFlags::DONE, REPLY_TYPE_NONE, cookie, 0);
}

/// The header of a structured reply chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Chunk flags.
    pub flags: ReplyFlags,
    /// `REPLY_TYPE_*`.
    pub reply_type: u16,
    /// The request's cookie.
    pub cookie: u64,
    /// Payload length.
    pub len: u32,
}

impl ChunkHeader {
    /// The last chunk of its reply.
    pub fn is_done(&self) -> bool {
        self.flags.contains(ReplyFlags::DONE)
    }
    /// An error chunk (bit 15 of the type), known or not.
    pub fn is_error(&self) -> bool {
        self.reply_type & REPLY_TYPE_FLAG_ERROR != 0
    }
}

/// A reply header (client side).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply; a successful `READ` is followed by the request's `len` bytes.
    Simple {
        /// `NBD_E*` or 0.
        error: u32,
        /// The request's cookie.
        cookie: u64,
    },
    /// A structured reply chunk; `len` payload bytes follow ([`read_chunk_payload`]).
    Chunk(ChunkHeader),
}

/// Read a reply header: a simple reply (16 bytes) or a chunk header (20 bytes).
pub fn read_reply_header<R: Read + ?Sized>(r: &mut R) -> Result<ReplyHeader> {
    let m = read_array::<4, R>(r)?;
    match u32::from_be_bytes(m) {
        SIMPLE_REPLY_MAGIC => {
            let b = read_array::<12, R>(r)?;
            Ok(ReplyHeader::Simple { error: be_u32(&b, 0), cookie: be_u64(&b, 4) })
        }
        STRUCTURED_REPLY_MAGIC => {
            let b = read_array::<16, R>(r)?;
            Ok(ReplyHeader::Chunk(ChunkHeader {
                flags: ReplyFlags::from_bits_retain(be_u16(&b, 0)),
                reply_type: be_u16(&b, 2),
                cookie: be_u64(&b, 4),
                len: be_u32(&b, 12),
            }))
        }
        other => Err(ProtoError::BadMagic { what: "reply", got: u64::from(other) }),
    }
}

/// Read a chunk's payload, bounded by [`Limits::max_chunk_len`].
pub fn read_chunk_payload<R: Read + ?Sized>(r: &mut R, h: &ChunkHeader, limits: &Limits) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    read_bounded(r, u64::from(h.len), limits.max_chunk_len(), "reply chunk", &mut buf)?;
    Ok(buf)
}

/// A structured reply chunk, parsed (borrowing the payload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk<'a> {
    /// `NONE`.
    None,
    /// `OFFSET_DATA`: `data` at `offset`.
    OffsetData {
        /// Export offset of the data.
        offset: u64,
        /// The data.
        data: &'a [u8],
    },
    /// `OFFSET_HOLE`: `len` bytes of zeroes at `offset`.
    OffsetHole {
        /// Export offset.
        offset: u64,
        /// Length (nonzero).
        len: u32,
    },
    /// `BLOCK_STATUS`.
    BlockStatus {
        /// The context id.
        context_id: u32,
        /// The descriptors (at least one, each nonzero).
        extents: Vec<Extent>,
    },
    /// `ERROR` or `ERROR_OFFSET` (or an unknown error type: no message parsed).
    Error {
        /// `NBD_E*` (nonzero).
        error: u32,
        /// The server's message.
        message: String,
        /// For `ERROR_OFFSET`, the offset it applies to.
        offset: Option<u64>,
    },
    /// A non-error chunk type this module does not know.
    Other {
        /// The type.
        reply_type: u16,
        /// The payload.
        data: &'a [u8],
    },
}

/// Parse a chunk payload (`payload.len()` must be `h.len`). Errors for a zero-length hole
/// or extent, a zero error code, a message running past the payload, trailing bytes.
pub fn parse_chunk<'a>(h: &ChunkHeader, payload: &'a [u8]) -> Result<Chunk<'a>> {
    if payload.len() as u64 != u64::from(h.len) {
        return malformed(format!("chunk payload of {} bytes, header says {}", payload.len(), h.len));
    }
    let mut b = Bytes::new(payload);
    let chunk = match h.reply_type {
        REPLY_TYPE_NONE => {
            b.finish("NONE chunk")?;
            if !h.is_done() {
                return malformed("NONE chunk without the DONE flag");
            }
            Chunk::None
        }
        REPLY_TYPE_OFFSET_DATA => {
            let offset = b.u64("OFFSET_DATA offset")?;
            let data = b.rest();
            if data.is_empty() {
                return malformed("OFFSET_DATA chunk without data");
            }
            Chunk::OffsetData { offset, data }
        }
        REPLY_TYPE_OFFSET_HOLE => {
            let offset = b.u64("OFFSET_HOLE offset")?;
            let len = b.u32("OFFSET_HOLE length")?;
            b.finish("OFFSET_HOLE chunk")?;
            if len == 0 {
                return malformed("OFFSET_HOLE of length 0");
            }
            Chunk::OffsetHole { offset, len }
        }
        REPLY_TYPE_BLOCK_STATUS => {
            let context_id = b.u32("context id")?;
            if b.remaining() == 0 || b.remaining() % 8 != 0 {
                return malformed(format!("BLOCK_STATUS descriptors of {} bytes", b.remaining()));
            }
            let mut extents = Vec::with_capacity(b.remaining() / 8);
            while b.remaining() > 0 {
                let len = b.u32("extent length")?;
                let flags = b.u32("extent flags")?;
                if len == 0 {
                    return malformed("block status extent of length 0");
                }
                extents.push(Extent { len, flags });
            }
            Chunk::BlockStatus { context_id, extents }
        }
        t if t & REPLY_TYPE_FLAG_ERROR != 0 => {
            let error = b.u32("error code")?;
            if error == 0 {
                return malformed("error chunk with error 0");
            }
            if t != REPLY_TYPE_ERROR && t != REPLY_TYPE_ERROR_OFFSET {
                return Ok(Chunk::Error { error, message: String::new(), offset: None });
            }
            let mlen = b.u16("error message length")?;
            let message = String::from_utf8_lossy(b.take(usize::from(mlen), "error message")?).into_owned();
            let offset = if t == REPLY_TYPE_ERROR_OFFSET { Some(b.u64("error offset")?) } else { None };
            b.finish("error chunk")?;
            Chunk::Error { error, message, offset }
        }
        t => Chunk::Other { reply_type: t, data: b.rest() },
    };
    Ok(chunk)
}

/// Check a parsed chunk against the request it answers (client side): the cookie, data
/// and holes inside `[req.offset, req.offset + req.len)`, block status only for a
/// `BLOCK_STATUS` request and with a context id in `contexts`, `REQ_ONE` honoured.
pub fn check_chunk(req: &Request, h: &ChunkHeader, chunk: &Chunk<'_>, contexts: &[u32]) -> Result<()> {
    if h.cookie != req.cookie {
        return malformed(format!("reply for cookie {:#x}, expected {:#x}", h.cookie, req.cookie));
    }
    let end = req.end().unwrap_or(u64::MAX);
    let inside = |off: u64, len: u64| off >= req.offset && off.checked_add(len).is_some_and(|e| e <= end);
    match chunk {
        Chunk::OffsetData { offset, data } if req.command != CMD_READ || !inside(*offset, data.len() as u64) => {
            return malformed("OFFSET_DATA outside the read request");
        }
        Chunk::OffsetHole { offset, len } if req.command != CMD_READ || !inside(*offset, u64::from(*len)) => {
            return malformed("OFFSET_HOLE outside the read request");
        }
        Chunk::BlockStatus { context_id, extents } => {
            if req.command != CMD_BLOCK_STATUS || !contexts.contains(context_id) {
                return malformed(format!("BLOCK_STATUS chunk for context {context_id} not negotiated"));
            }
            if req.flags.contains(CommandFlags::REQ_ONE) && (extents.len() != 1 || extents[0].len > req.len) {
                return malformed("REQ_ONE block status with more than one extent or a longer one");
            }
        }
        Chunk::Error { offset: Some(o), .. } if !inside(*o, 0) => {
            return malformed("ERROR_OFFSET outside the request");
        }
        _ => {}
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// errno mapping
// ---------------------------------------------------------------------------------------

/// Map an errno to an NBD error code the way QEMU's server does: `EPERM`/`EROFS` →
/// `NBD_EPERM`; `EIO`; `ENOMEM`; `ENOSPC`/`EDQUOT`/`EFBIG` → `NBD_ENOSPC`; `EOVERFLOW`;
/// `ENOTSUP`; `ESHUTDOWN`; everything else (`EINVAL`, `EACCES`, `ESTALE`...) → `NBD_EINVAL`.
pub fn errno_to_nbd(errno: i32) -> u32 {
    match errno {
        0 => 0,
        libc::EPERM | libc::EROFS => NBD_EPERM,
        libc::EIO => NBD_EIO,
        libc::ENOMEM => NBD_ENOMEM,
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => NBD_ENOSPC,
        libc::EOVERFLOW => NBD_EOVERFLOW,
        libc::ENOTSUP => NBD_ENOTSUP,
        libc::ESHUTDOWN => NBD_ESHUTDOWN,
        _ => NBD_EINVAL,
    }
}

/// Map an NBD error code to an errno (client side); unknown codes → `EINVAL`, as the
/// spec asks clients to treat them.
pub fn nbd_to_errno(error: u32) -> i32 {
    match error {
        0 => 0,
        NBD_EPERM => libc::EPERM,
        NBD_EIO => libc::EIO,
        NBD_ENOMEM => libc::ENOMEM,
        NBD_ENOSPC => libc::ENOSPC,
        NBD_EOVERFLOW => libc::EOVERFLOW,
        NBD_ENOTSUP => libc::ENOTSUP,
        NBD_ESHUTDOWN => libc::ESHUTDOWN,
        _ => libc::EINVAL,
    }
}

// ---------------------------------------------------------------------------------------
// Fuzzing entry points
// ---------------------------------------------------------------------------------------

/// Parse `data` as everything a client could send a server: client flags, options until
/// `GO`/`EXPORT_NAME`/`ABORT` or an error, then requests with their payloads until an
/// error or the end. Returns the number of messages parsed. Never panics; allocates at
/// most the default [`Limits`] per message. For fuzzers.
pub fn fuzz_server_input(data: &[u8]) -> usize {
    let limits = Limits::default();
    let mut r = data;
    let mut n = 0;
    if read_client_flags(&mut r).is_err() {
        return n;
    }
    loop {
        let Ok((h, d)) = read_option(&mut r, &limits) else { return n };
        n += 1;
        match ClientOption::parse(h.code, &d, &limits) {
            Ok(ClientOption::Go(_)) | Ok(ClientOption::ExportName(_)) => break,
            Ok(ClientOption::Abort) => return n,
            _ => {}
        }
    }
    let mut buf = Vec::new();
    while let Ok(req) = read_request(&mut r) {
        n += 1;
        let _ = req.end();
        if read_payload(&mut r, &req, &limits, &mut buf).is_err() {
            break;
        }
    }
    n
}

/// Parse `data` as everything a server could send a client: the greeting, option
/// replies (each parsed) until an `ACK` of `GO` or an error, then reply headers and
/// chunks (parsed and checked against a `READ` of 64 KiB with cookie 1) until an error
/// or the end. Returns the number of messages parsed. Never panics. For fuzzers.
pub fn fuzz_client_input(data: &[u8]) -> usize {
    let limits = Limits::default();
    let mut r = data;
    let mut n = 0;
    if read_greeting(&mut r).is_err() {
        return n;
    }
    loop {
        let Ok(reply) = read_option_reply(&mut r, &limits) else { return n };
        n += 1;
        if let Ok(OptionReplyBody::Ack) = reply.parse() {
            if reply.option == OPT_GO {
                break;
            }
        }
    }
    let req = Request { flags: CommandFlags::empty(), command: CMD_READ, cookie: 1, offset: 0, len: 65536 };
    while let Ok(h) = read_reply_header(&mut r) {
        n += 1;
        if let ReplyHeader::Chunk(h) = h {
            let Ok(p) = read_chunk_payload(&mut r, &h, &limits) else { break };
            if let Ok(c) = parse_chunk(&h, &p) {
                let _ = check_chunk(&req, &h, &c, &[1]);
            }
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_round_trip() {
        let g = encode_greeting(HandshakeFlags::FIXED_NEWSTYLE | HandshakeFlags::NO_ZEROES);
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(parse_greeting(&g).unwrap(), HandshakeFlags::FIXED_NEWSTYLE | HandshakeFlags::NO_ZEROES);
        let mut bad = g;
        bad[0] = b'X';
        assert!(matches!(parse_greeting(&bad), Err(ProtoError::BadMagic { .. })));
        let old = encode_greeting(HandshakeFlags::empty());
        assert!(matches!(parse_greeting(&old), Err(ProtoError::Malformed(_))));
    }

    #[test]
    fn client_flags() {
        let f = encode_client_flags(ClientFlags::FIXED_NEWSTYLE);
        assert_eq!(parse_client_flags(f).unwrap(), ClientFlags::FIXED_NEWSTYLE);
        assert!(parse_client_flags([0, 0, 0, 0]).is_err());
        assert!(parse_client_flags([0, 0, 0, 5]).is_err());
    }

    fn round_trip(opt: ClientOption) {
        let mut out = Vec::new();
        opt.encode(&mut out).unwrap();
        let mut r = &out[..];
        let (h, data) = read_option(&mut r, &Limits::default()).unwrap();
        assert!(r.is_empty());
        assert_eq!(h.code, opt.code());
        assert_eq!(ClientOption::parse(h.code, &data, &Limits::default()).unwrap(), opt);
    }

    #[test]
    fn options_round_trip() {
        round_trip(ClientOption::ExportName("disk".into()));
        round_trip(ClientOption::Abort);
        round_trip(ClientOption::List);
        round_trip(ClientOption::StructuredReply);
        round_trip(ClientOption::Go(InfoRequest { name: "a".into(), info: vec![INFO_BLOCK_SIZE, INFO_NAME] }));
        round_trip(ClientOption::Info(InfoRequest { name: String::new(), info: vec![] }));
        round_trip(ClientOption::SetMetaContext(MetaContextRequest {
            export: "disk".into(),
            queries: vec![CONTEXT_BASE_ALLOCATION.into(), "qemu:dirty-bitmap:b0".into()],
        }));
        round_trip(ClientOption::ListMetaContext(MetaContextRequest { export: "x".into(), queries: vec![] }));
        round_trip(ClientOption::Other { code: 99, data: vec![1, 2, 3] });
    }

    #[test]
    fn option_limits() {
        let limits = Limits::default();
        // 4 GiB option length: rejected from the header, nothing read or allocated.
        let mut b = Vec::new();
        put_u64(&mut b, IHAVEOPT);
        put_u32(&mut b, OPT_GO);
        put_u32(&mut b, u32::MAX);
        assert!(matches!(read_option(&mut &b[..], &limits), Err(ProtoError::TooLarge { .. })));
        // Truncated data.
        let mut b = Vec::new();
        put_u64(&mut b, IHAVEOPT);
        put_u32(&mut b, OPT_GO);
        put_u32(&mut b, 100);
        b.extend_from_slice(&[0; 10]);
        assert!(matches!(read_option(&mut &b[..], &limits), Err(ProtoError::Io(_))));
        // Bad magic.
        let b = [0u8; 16];
        assert!(matches!(read_option(&mut &b[..], &limits), Err(ProtoError::BadMagic { .. })));
        // A name length longer than the data / the string limit.
        let mut d = Vec::new();
        put_u32(&mut d, 5000);
        assert!(ClientOption::parse(OPT_GO, &d, &limits).is_err());
        let mut d = Vec::new();
        put_u32(&mut d, 10);
        d.extend_from_slice(b"abc");
        assert!(ClientOption::parse(OPT_GO, &d, &limits).is_err());
        // Info count not matching the data.
        let mut d = Vec::new();
        put_u32(&mut d, 0);
        put_u16(&mut d, 3);
        put_u16(&mut d, 1);
        assert!(ClientOption::parse(OPT_INFO, &d, &limits).is_err());
        // A huge query count with little data.
        let mut d = Vec::new();
        put_u32(&mut d, 0);
        put_u32(&mut d, 1000);
        assert!(ClientOption::parse(OPT_SET_META_CONTEXT, &d, &limits).is_err());
        let mut d = Vec::new();
        put_u32(&mut d, 0);
        put_u32(&mut d, u32::MAX);
        assert!(matches!(ClientOption::parse(OPT_SET_META_CONTEXT, &d, &limits), Err(ProtoError::TooLarge { .. })));
        // Data on an option that takes none; invalid UTF-8 and NUL in names.
        assert!(ClientOption::parse(OPT_LIST, &[1], &limits).is_err());
        assert!(ClientOption::parse(OPT_EXPORT_NAME, &[0xff, 0xfe], &limits).is_err());
        assert!(ClientOption::parse(OPT_EXPORT_NAME, b"a\0b", &limits).is_err());
        assert!(ClientOption::parse(OPT_EXPORT_NAME, &vec![b'a'; 5000], &limits).is_err());
        // Encoding refuses over-long strings.
        let mut out = Vec::new();
        assert!(ClientOption::ExportName("x".repeat(5000)).encode(&mut out).is_err());
        assert!(out.is_empty());
    }

    #[test]
    fn option_replies_round_trip() {
        let limits = Limits::default();
        let mut out = Vec::new();
        encode_rep_server(&mut out, OPT_LIST, "disk", "a disk");
        encode_rep_info(&mut out, OPT_GO, &Info::Export { size: 1 << 30, flags: TransmissionFlags::HAS_FLAGS });
        encode_rep_info(&mut out, OPT_GO, &Info::BlockSize { min: 1, preferred: 4096, max: DEFAULT_MAX_PAYLOAD });
        encode_rep_info(&mut out, OPT_GO, &Info::Name("disk".into()));
        encode_rep_info(&mut out, OPT_GO, &Info::Description("d".into()));
        encode_rep_meta_context(&mut out, OPT_SET_META_CONTEXT, 7, CONTEXT_BASE_ALLOCATION);
        encode_rep_error(&mut out, OPT_GO, REP_ERR_UNKNOWN, "no such export");
        encode_rep_ack(&mut out, OPT_GO);
        let mut r = &out[..];
        let mut bodies = Vec::new();
        while !r.is_empty() {
            bodies.push(read_option_reply(&mut r, &limits).unwrap().parse().unwrap());
        }
        assert_eq!(
            bodies,
            vec![
                OptionReplyBody::Server { name: "disk".into(), description: "a disk".into() },
                OptionReplyBody::Info(Info::Export { size: 1 << 30, flags: TransmissionFlags::HAS_FLAGS }),
                OptionReplyBody::Info(Info::BlockSize { min: 1, preferred: 4096, max: DEFAULT_MAX_PAYLOAD }),
                OptionReplyBody::Info(Info::Name("disk".into())),
                OptionReplyBody::Info(Info::Description("d".into())),
                OptionReplyBody::MetaContext { id: 7, name: CONTEXT_BASE_ALLOCATION.into() },
                OptionReplyBody::Error { code: REP_ERR_UNKNOWN, message: "no such export".into() },
                OptionReplyBody::Ack,
            ]
        );
        // Export name reply with and without zeroes.
        for nz in [false, true] {
            let mut out = Vec::new();
            encode_export_name_reply(&mut out, 12345, TransmissionFlags::HAS_FLAGS | TransmissionFlags::READ_ONLY, nz);
            assert_eq!(out.len(), if nz { 10 } else { EXPORT_NAME_REPLY_LEN });
            let (size, flags) = read_export_name_reply(&mut &out[..], nz).unwrap();
            assert_eq!((size, flags), (12345, TransmissionFlags::HAS_FLAGS | TransmissionFlags::READ_ONLY));
        }
    }

    #[test]
    fn requests_round_trip() {
        let req = Request { flags: CommandFlags::FUA, command: CMD_WRITE, cookie: 0xdead, offset: 4096, len: 3 };
        let mut b = req.encode().to_vec();
        b.extend_from_slice(b"abc");
        let mut r = &b[..];
        let got = read_request(&mut r).unwrap();
        assert_eq!(got, req);
        let mut buf = Vec::new();
        read_payload(&mut r, &got, &Limits::default(), &mut buf).unwrap();
        assert_eq!(buf, b"abc");
        let big = Request { flags: CommandFlags::empty(), command: CMD_WRITE, cookie: 1, offset: 0, len: u32::MAX };
        assert!(matches!(
            read_payload(&mut &[][..], &big, &Limits::default(), &mut buf),
            Err(ProtoError::TooLarge { .. })
        ));
        let over = Request { offset: u64::MAX, len: 1, ..big };
        assert_eq!(over.end(), None);
        let mut bad = req.encode();
        bad[0] ^= 1;
        assert!(matches!(Request::parse(&bad), Err(ProtoError::BadMagic { .. })));
    }

    #[test]
    fn replies_round_trip() {
        let limits = Limits::default();
        let mut out = Vec::new();
        encode_offset_data_header(&mut out, ReplyFlags::empty(), 9, 100, 3);
        out.extend_from_slice(b"xyz");
        encode_offset_hole(&mut out, ReplyFlags::empty(), 9, 103, 5);
        encode_block_status(
            &mut out,
            ReplyFlags::empty(),
            9,
            1,
            &[Extent { len: 4096, flags: STATE_HOLE | STATE_ZERO }],
        );
        encode_error_chunk(&mut out, ReplyFlags::empty(), 9, NBD_EINVAL, "nope");
        encode_none_chunk(&mut out, 9);
        encode_simple_reply(&mut out, 9, NBD_EPERM);
        let mut r = &out[..];
        let mut chunks = Vec::new();
        let mut payloads = Vec::new();
        while !r.is_empty() {
            match read_reply_header(&mut r).unwrap() {
                ReplyHeader::Chunk(h) => {
                    let p = read_chunk_payload(&mut r, &h, &limits).unwrap();
                    payloads.push((h, p));
                }
                ReplyHeader::Simple { error, cookie } => assert_eq!((error, cookie), (NBD_EPERM, 9)),
            }
        }
        for (h, p) in &payloads {
            chunks.push(parse_chunk(h, p).unwrap());
        }
        assert_eq!(
            chunks,
            vec![
                Chunk::OffsetData { offset: 100, data: b"xyz" },
                Chunk::OffsetHole { offset: 103, len: 5 },
                Chunk::BlockStatus { context_id: 1, extents: vec![Extent { len: 4096, flags: 3 }] },
                Chunk::Error { error: NBD_EINVAL, message: "nope".into(), offset: None },
                Chunk::None,
            ]
        );
        assert!(payloads[4].0.is_done() && payloads[3].0.is_error());
        let read = Request { flags: CommandFlags::empty(), command: CMD_READ, cookie: 9, offset: 100, len: 8 };
        check_chunk(&read, &payloads[0].0, &chunks[0], &[]).unwrap();
        check_chunk(&read, &payloads[1].0, &chunks[1], &[]).unwrap();
        let short = Request { len: 7, ..read };
        assert!(check_chunk(&short, &payloads[1].0, &chunks[1], &[]).is_err());
        let bs = Request { command: CMD_BLOCK_STATUS, ..read };
        check_chunk(&bs, &payloads[2].0, &chunks[2], &[1]).unwrap();
        assert!(check_chunk(&bs, &payloads[2].0, &chunks[2], &[2]).is_err());
    }

    #[test]
    fn malformed_chunks() {
        let h = |t: u16, len: u32| ChunkHeader { flags: ReplyFlags::empty(), reply_type: t, cookie: 1, len };
        assert!(parse_chunk(&h(REPLY_TYPE_OFFSET_DATA, 8), &[0; 8]).is_err()); // no data
        assert!(parse_chunk(&h(REPLY_TYPE_OFFSET_HOLE, 12), &[0; 12]).is_err()); // length 0
        assert!(parse_chunk(&h(REPLY_TYPE_BLOCK_STATUS, 4), &[0; 4]).is_err()); // no extent
        assert!(parse_chunk(&h(REPLY_TYPE_BLOCK_STATUS, 11), &[0; 11]).is_err());
        assert!(parse_chunk(&h(REPLY_TYPE_ERROR, 6), &[0; 6]).is_err()); // error 0
        assert!(parse_chunk(&h(REPLY_TYPE_ERROR, 6), &[0, 0, 0, 22, 0, 9]).is_err()); // message past the end
        assert!(parse_chunk(&h(REPLY_TYPE_NONE, 0), &[]).is_err()); // NONE without DONE
        assert!(parse_chunk(&h(REPLY_TYPE_NONE, 1), &[]).is_err()); // length mismatch
        let huge = [0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff];
        let mut r = &huge[..];
        let ReplyHeader::Chunk(hh) = read_reply_header(&mut r).unwrap() else { panic!() };
        assert!(matches!(read_chunk_payload(&mut r, &hh, &Limits::default()), Err(ProtoError::TooLarge { .. })));
        assert!(matches!(read_reply_header(&mut &[1u8, 2, 3, 4][..]), Err(ProtoError::BadMagic { .. })));
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(errno_to_nbd(libc::EACCES), NBD_EINVAL);
        assert_eq!(errno_to_nbd(libc::EROFS), NBD_EPERM);
        assert_eq!(errno_to_nbd(libc::EDQUOT), NBD_ENOSPC);
        assert_eq!(errno_to_nbd(libc::ESTALE), NBD_EINVAL);
        for e in [NBD_EPERM, NBD_EIO, NBD_ENOMEM, NBD_EINVAL, NBD_ENOSPC, NBD_EOVERFLOW, NBD_ENOTSUP, NBD_ESHUTDOWN] {
            assert_eq!(errno_to_nbd(nbd_to_errno(e)), e);
        }
        assert_eq!(nbd_to_errno(12345), libc::EINVAL);
    }

    /// A deterministic pseudo-random byte soup (xorshift) through both fuzz entry points,
    /// plus every prefix of a valid session: no panic.
    #[test]
    fn fuzz_smoke() {
        let mut session = encode_client_flags(ClientFlags::FIXED_NEWSTYLE).to_vec();
        ClientOption::StructuredReply.encode(&mut session).unwrap();
        ClientOption::Go(InfoRequest { name: "d".into(), info: vec![] }).encode(&mut session).unwrap();
        session.extend_from_slice(
            &Request { flags: CommandFlags::empty(), command: CMD_WRITE, cookie: 1, offset: 0, len: 4 }.encode(),
        );
        session.extend_from_slice(b"data");
        for i in 0..=session.len() {
            fuzz_server_input(&session[..i]);
        }
        assert_eq!(fuzz_server_input(&session), 3);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for round in 0..2000 {
            let len = (round * 7) % 300;
            let mut data = Vec::with_capacity(len);
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                data.push(x as u8);
            }
            // Half the inputs start with valid magics so the parsers get past them.
            if round % 2 == 0 {
                let mut s = encode_greeting(HandshakeFlags::FIXED_NEWSTYLE).to_vec();
                s.extend_from_slice(&data);
                fuzz_client_input(&s);
                let mut c = encode_client_flags(ClientFlags::FIXED_NEWSTYLE).to_vec();
                c.extend_from_slice(&IHAVEOPT.to_be_bytes());
                c.extend_from_slice(&data);
                fuzz_server_input(&c);
            } else {
                fuzz_client_input(&data);
                fuzz_server_input(&data);
            }
        }
    }
}
