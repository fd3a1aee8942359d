//! The built-in drivers.

pub mod fault;
pub mod file;
pub mod memory;
