//! The C library of cowbackup: exports the `cowbackup_*` functions of the library's C ABI
//! module (`cowbackup::ffi`, documented in `include/cowbackup.h`) from `libcowbackup.so`
//! and `libcowbackup.a`. Nothing else lives here: the functions, their panic boundary and
//! their documentation are in `src/ffi/`.

pub use cowbackup_core::ffi::*;
