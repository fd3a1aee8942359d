//! The identity of the disk a bitmap belongs to (`BackupOptions::disk_id`), and the root
//! digest of the last manifest written with the bitmap (the parent of the next incremental).

use super::format::MAX_DISK_ID;
use super::{busy_error, lock, DirtyBitmap};
use crate::error::{Error, Result};

impl DirtyBitmap {
    /// The disk id the bitmap was created for, when one was recorded (by the first job
    /// that gave one). Thread-safe.
    pub fn disk_id(&self) -> Option<String> {
        let st = lock(&self.state);
        match &st.disk {
            Some(d) => {
                let n = d.header.disk_id[0] as usize;
                (n > 0).then(|| String::from_utf8_lossy(&d.header.disk_id[1..1 + n]).into_owned())
            }
            None => st.disk_id.clone(),
        }
    }

    /// Check `id` against the bitmap's disk id, or adopt it when the bitmap has none
    /// (persistent: written to the file's header and flushed before this returns).
    ///
    /// Errors: `InvalidInput` (EINVAL) when the bitmap belongs to another disk, when `id`
    /// is empty or longer than 128 bytes; `Busy` when a job uses the bitmap (adoption
    /// only); the I/O error of writing the header.
    pub(crate) fn adopt_disk_id(&self, id: &str) -> Result<()> {
        if id.is_empty() || id.len() > MAX_DISK_ID {
            return Err(Error::invalid(format!("disk_id must be 1 to {MAX_DISK_ID} bytes, got {}", id.len())));
        }
        if let Some(have) = self.disk_id() {
            if have != id {
                return Err(Error::invalid(format!(
                    "the dirty bitmap belongs to disk {have:?}, not to disk {id:?}: an incremental from another \
                     disk's bitmap would be wrong"
                )));
            }
            return Ok(());
        }
        let mut st = lock(&self.state);
        if st.busy {
            return Err(busy_error("record a disk id"));
        }
        match st.disk.as_mut() {
            None => {
                st.disk_id = Some(id.to_string());
                Ok(())
            }
            Some(d) => {
                let old = d.header.disk_id;
                d.header.disk_id = [0; 1 + MAX_DISK_ID];
                d.header.disk_id[0] = id.len() as u8;
                d.header.disk_id[1..1 + id.len()].copy_from_slice(id.as_bytes());
                d.header_dirty = true;
                let batch = d.open_batch();
                let (mut st, r) = self.commit(st, &batch);
                if r.is_err() {
                    if let Some(d) = st.disk.as_mut() {
                        d.header.disk_id = old;
                    }
                }
                r
            }
        }
    }

    /// Root digest of the last manifest written by a completed job with this bitmap.
    pub(crate) fn last_manifest_root(&self) -> Option<[u8; 32]> {
        lock(&self.state).last_root
    }

    pub(crate) fn set_last_manifest_root(&self, root: [u8; 32]) {
        lock(&self.state).last_root = Some(root);
    }
}
