//! When a copied run's target pages go to the disk **at once** instead of at the job's
//! final flush.
//!
//! A job writes its target through the page cache and flushes it once at the end. Left to
//! itself the kernel starts writeback only past `dirty_background_ratio` (10 % of memory:
//! gigabytes on a host), so a backup of data that is already in memory is two phases in
//! series: the copy, bound by the CPU, then the flush, bound by the disk. Starting the
//! writeback of each run as soon as it is copied (`sync_file_range(SYNC_FILE_RANGE_WRITE)`,
//! which queues the pages and returns) overlaps the two, and keeps the host's dirty memory
//! small while a long backup runs.
//!
//! But when the job reads the source from a device, the target's writes compete with the
//! source's reads, and on one disk the reads then wait behind writes the kernel would have
//! written in one sweep at the end: measured slower (PERFORMANCE.md, "Early writeback"). So
//! the writeback starts early only for runs whose source bytes came from memory: a source
//! on tmpfs/ramfs, or a run read entirely from the page cache (`preadv2(RWF_NOWAIT)`
//! succeeded, `FileDriver::read_at_cached`). Sources that are not files (NBD, RBD,
//! a chain of backups) never: where their reads go is not known. Only the workers start
//! writeback; a hook's copies are left to the final flush, and its reads skip the probe.

use crate::BlockDriver;

/// Which copied runs have their target's writeback started at once (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Writeback {
    /// Never: the target has no page cache to write back (tmpfs, `O_DIRECT`, not a
    /// file), or where the source reads from is not known.
    Never,
    /// Runs read entirely from the source's page cache.
    WhenCached,
    /// Every run: the source is in memory (tmpfs, ramfs).
    Always,
}

impl Writeback {
    /// The rule for a job copying `source` to `target`, asked once at its start.
    pub(crate) fn for_job(source: &dyn BlockDriver, target: &dyn BlockDriver) -> Writeback {
        let (Some(s), Some(t)) = (source.as_file_driver(), target.as_file_driver()) else {
            return Writeback::Never;
        };
        if !t.writes_through_page_cache() {
            return Writeback::Never;
        }
        match s.in_memory() {
            Some(true) => Writeback::Always,
            // Not in memory: its reads wait for a device unless they skip the page cache
            // (`reads_from_a_device`, without asking `fstatfs` a second time).
            Some(false) if s.uses_page_cache() => Writeback::WhenCached,
            _ => Writeback::Never,
        }
    }

    /// Whether a copied run whose source bytes all came from the page cache (`cached`)
    /// has its writeback started now.
    pub(crate) fn for_run(self, cached: bool) -> bool {
        match self {
            Writeback::Never => false,
            Writeback::WhenCached => cached,
            Writeback::Always => true,
        }
    }
}

/// Start writing back `len` bytes at `offset` of `target` (a file, per [`Writeback`]).
pub(crate) fn start(target: &dyn BlockDriver, offset: u64, len: u64) {
    if let Some(t) = target.as_file_driver() {
        t.start_writeback(offset, len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FileDriver, MemDriver, OpenFlags};

    fn file(dir: &std::path::Path, name: &str, flags: OpenFlags) -> FileDriver {
        let p = dir.join(name);
        std::fs::write(&p, vec![7u8; 1 << 20]).unwrap();
        FileDriver::open(&p, flags | OpenFlags::WRITE).unwrap()
    }

    #[test]
    #[cfg_attr(miri, ignore = "real files: fstatfs is not supported by Miri")]
    fn the_rule_follows_where_source_and_target_live() {
        let shm = tempfile::tempdir_in("/dev/shm").unwrap();
        let disk = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let (mem_src, mem_dst) = (file(shm.path(), "s", OpenFlags::empty()), file(shm.path(), "t", OpenFlags::empty()));
        let (disk_src, disk_dst) =
            (file(disk.path(), "s", OpenFlags::empty()), file(disk.path(), "t", OpenFlags::empty()));
        if disk_src.in_memory() != Some(false) {
            eprintln!("skipped: the checkout is on tmpfs");
            return;
        }
        let direct_dst = file(disk.path(), "d", OpenFlags::DIRECT);
        let memory = MemDriver::new(1 << 20).unwrap();
        assert_eq!(Writeback::for_job(&mem_src, &disk_dst), Writeback::Always);
        assert_eq!(Writeback::for_job(&disk_src, &disk_dst), Writeback::WhenCached);
        assert_eq!(Writeback::for_job(&disk_src, &mem_dst), Writeback::Never, "tmpfs has no writeback");
        assert_eq!(Writeback::for_job(&mem_src, &direct_dst), Writeback::Never, "O_DIRECT writes skip the cache");
        assert_eq!(Writeback::for_job(&memory, &disk_dst), Writeback::Never, "a source that is not a file");
        assert_eq!(Writeback::for_job(&disk_src, &memory), Writeback::Never, "a target that is not a file");
    }
}
