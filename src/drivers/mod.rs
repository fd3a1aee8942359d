//! The built-in drivers.

pub mod file;
pub mod memory;
