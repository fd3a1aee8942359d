//! NBD: serve snapshot views, drivers and dirty bitmaps to the ecosystem's clients
//! (`qemu-img`, `nbdcopy`, `nbdinfo`, libnbd, the Linux kernel), and the wire format the
//! client driver shares.
//!
//! - [`proto`]: the wire format, one parser and encoder for both ends, hardened for
//!   hostile peers (limits, no panics, errors as values).
//! - [`Server`]: the server (`server.rs`): exports, `base:allocation` and
//!   `qemu:dirty-bitmap:NAME` contexts, one thread per connection.
//! - [`tls`] (cargo feature `tls`, default): `NBD_OPT_STARTTLS` with X.509 credentials and
//!   an allow-list of client identities, shared by the server and the `nbds://` client.

pub mod proto;
mod server;
#[cfg(feature = "tls")]
pub mod tls;

pub use server::{Server, ServerOptions};
#[cfg(feature = "tls")]
pub use tls::{ClientTls, ServerTls};
