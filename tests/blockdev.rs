//! Block devices through real loop devices: size from the device (BLKGETSIZE64), all data
//! by block status, zeroing by fallocate on the device, a live backup from and into one.
//! Skipped, with the reason printed, where loop devices cannot be set up (not root, no
//! /dev/loop-control in a container).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use common::{assert_same, contents, Rng};
use cowbackup::{backup_start, BackupOptions, BlockDriver, FileDriver, OpenFlags, StatusFlags};

const MIB: u64 = 1 << 20;

/// A loop device over a file; detached on drop.
struct Loop(PathBuf);

impl Loop {
    fn attach(file: &Path) -> Result<Loop, String> {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .map_err(|e| format!("losetup not runnable: {e}"))?;
        if !out.status.success() {
            return Err(format!("losetup failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        Ok(Loop(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

#[test]
fn backup_from_and_into_loop_devices() {
    let dir = tempfile::tempdir().unwrap();
    let size = 16 * MIB;
    let mut rng = Rng::new(42);
    let mut data = rng.bytes(size as usize);
    data[..2 * MIB as usize].fill(0);
    let src_file = dir.path().join("src.img");
    std::fs::write(&src_file, &data).unwrap();
    let dst_file = dir.path().join("dst.img");
    std::fs::write(&dst_file, vec![0xEE; size as usize]).unwrap();
    let (src_dev, dst_dev) = match (Loop::attach(&src_file), Loop::attach(&dst_file)) {
        (Ok(s), Ok(d)) => (s, d),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("skipped: no loop device: {e}");
            return;
        }
    };
    let source = Arc::new(FileDriver::open(&src_dev.0, OpenFlags::WRITE).unwrap());
    let target = Arc::new(FileDriver::open(&dst_dev.0, OpenFlags::WRITE).unwrap());
    // The size comes from the device, not from the node's metadata (0 for a block device).
    assert_eq!(std::fs::metadata(&src_dev.0).unwrap().len(), 0);
    assert_eq!(source.size(), size);
    assert_eq!(source.block_status(0, size).unwrap().flags, StatusFlags::DATA);
    assert!(source.storage_id().is_some() && source.storage_id() != target.storage_id());
    let job =
        backup_start(source.clone(), target.clone(), BackupOptions { speed: 32 * MIB, ..Default::default() }).unwrap();
    let mut writes = 0;
    while job.wait_timeout(std::time::Duration::ZERO).is_none() {
        let len = 512 * (1 + rng.below(256));
        let off = 512 * rng.below((size - len) / 512);
        job.cow_before_write(off, len).unwrap();
        source.write_at(&rng.bytes(len as usize), off).unwrap();
        writes += 1;
    }
    job.wait().unwrap();
    assert!(writes > 0 && job.info().cow_requests > 0);
    assert_eq!(job.info().bytes_zero, 2 * MIB, "the zero clusters were zeroed on the device");
    assert_same("loop target", &contents(&*target), &data);
    // The same file behind a second node is refused.
    let again = Arc::new(FileDriver::open(&src_dev.0, OpenFlags::empty()).unwrap());
    assert!(backup_start(source, again, BackupOptions::default()).is_err());
}
