//! NBD: serve snapshot views, drivers and dirty bitmaps to the ecosystem's clients
//! (`qemu-img`, `nbdcopy`, `nbdinfo`, libnbd, the Linux kernel), and the wire format the
//! client driver shares.
//!
//! - [`proto`]: the wire format, one parser and encoder for both ends, hardened for
//!   hostile peers (limits, no panics, errors as values).

pub mod proto;
