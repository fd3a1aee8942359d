//! One opener at a time within this process: a registry of the storage behind the open
//! persistent bitmaps. (Across processes the file lock of `file.rs` does it.)

use std::sync::{Arc, Mutex};

use crate::driver::BlockDriver;
use crate::error::{Error, ErrorKind, Result};

/// What identifies the storage of a bitmap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    /// `(st_dev, st_ino)` from [`BlockDriver::storage_id`].
    Storage(u64, u64),
    /// The driver object, for drivers without a storage identity (memory, simulators).
    Object(usize),
}

/// The keys of the open persistent bitmaps of this process. Protected by its mutex.
static OPEN: Mutex<Vec<Key>> = Mutex::new(Vec::new());

/// Held by an open persistent bitmap; releases its key when dropped.
#[derive(Debug)]
pub(super) struct OwnerGuard(Key);

/// Register `driver` as used by a bitmap being opened. Errors: `Busy` (EBUSY) when an open
/// bitmap of this process already uses the same storage or driver object.
pub(super) fn claim(driver: &Arc<dyn BlockDriver>) -> Result<OwnerGuard> {
    let key = match driver.storage_id() {
        Some((dev, ino)) => Key::Storage(dev, ino),
        None => Key::Object(Arc::as_ptr(driver).cast::<()>() as usize),
    };
    let mut open = super::lock(&OPEN);
    if open.contains(&key) {
        return Err(Error::new(
            ErrorKind::Busy,
            libc::EBUSY,
            "dirty bitmap: this file or driver is already open as a bitmap in this process",
        ));
    }
    open.push(key);
    Ok(OwnerGuard(key))
}

impl Drop for OwnerGuard {
    fn drop(&mut self) {
        let mut open = super::lock(&OPEN);
        if let Some(i) = open.iter().position(|k| *k == self.0) {
            open.swap_remove(i);
        }
    }
}
