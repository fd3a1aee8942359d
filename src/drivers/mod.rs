//! The built-in drivers.

pub mod crash;
pub mod fault;
pub mod file;
pub mod memory;
pub mod nbd;
#[cfg(feature = "rbd")]
pub mod rbd;
