//! The repository side of a backup: manifests (what a completed backup holds, with a
//! digest per copied cluster), `verify`, and backup chains read back as a block device.
//!
//! - [`format`]: the manifest file (docs/manifest.md), [`Manifest`].
//! - [`digest`]: the hash (BLAKE3), behind one function.
//! - record.rs: what a running job records (fed by job/copy.rs) and the manifest write.
//! - [`verify()`](verify::verify): check a target against its manifest.
//! - [`Chain`]: a full backup and its incrementals as one read-only `BlockDriver`;
//!   restore is a backup job with it as the source, instant access its NBD export.
//! - [`consolidate()`]: merge part of a chain into one backup, crash-safe.
//!   [`Chain::open_drivers`] and [`consolidate_drivers()`] take the backups' targets from
//!   the caller (RBD images, NBD exports, devices: targets a manifest cannot name).

mod chain;
mod consolidate;
pub mod digest;
pub mod format;
mod record;
mod verify;

pub use chain::Chain;
pub use consolidate::{consolidate, consolidate_drivers};
pub use format::{BitmapRef, Manifest, Run, MANIFEST_VERSION};
pub(crate) use record::{ManifestPlan, Recorder};
pub use verify::{verify, verify_report, verify_with, VerifyReport};
