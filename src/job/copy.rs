//! Where a claimed run of clusters is **copied**: read the source once, find the zero
//! clusters in the buffer just read, write the rest to the target (zero clusters as
//! `write_zeroes`, or not at all when the target already reads zeroes).
//!
//! Between two files on a filesystem that clones extents or copies on the server
//! ([`FileDriver::copy_offload_pays`]: XFS, Btrfs, NFS, ...) the data runs go to the
//! target by copy offload (`copy_file_range`) instead of `pwrite`: the read is still
//! needed to find zeroes exactly, the clone spares the write and the space. Elsewhere
//! (ext4, tmpfs) `copy_file_range` copies the bytes through the page cache, the same
//! two memory copies as writing the buffer already read, so the buffer is written
//! (measurements in PERFORMANCE.md).

use std::ops::Range;

use super::writeback::Writeback;
use crate::buf::AlignedBuf;
use crate::error::{Error, Op, Result, Side};
use crate::job::Geometry;
use crate::trace::{TraceEvent, TraceFn};
use crate::zero::buffer_is_zero;
use crate::{BlockDriver, FileDriver};

/// What one copied run amounted to, in bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Copied {
    /// Data read and written to the target.
    pub data: u64,
    /// Clusters that read as zero.
    pub zero: u64,
    /// Start the target's writeback of the run now (writeback.rs).
    pub write_back: bool,
}

/// The source, target and geometry a copy needs.
pub(crate) struct Copier<'a> {
    pub source: &'a dyn BlockDriver,
    pub target: &'a dyn BlockDriver,
    pub geo: &'a Geometry,
    /// The target reads zeroes wherever the job has not written yet.
    pub target_zero: bool,
    /// The job's trace sink and id, for `ZeroClusters` events.
    pub trace: Option<&'a TraceFn>,
    pub job: u64,
    /// A job writing a manifest: each run put in the target is recorded (its digests
    /// computed from the buffer already read; zero runs as zeroes).
    pub record: Option<&'a crate::repo::Recorder>,
    /// Copy offload pays between the source and target files
    /// ([`FileDriver::copy_offload_pays`], asked once per job: an `fstatfs` per chunk cost
    /// a syscall per isolated cluster of an incremental).
    pub offload_pays: bool,
    /// Where the source's old data is read: a descriptor of the source file without
    /// readahead ([`FileDriver::exact_reader`]), or `None`: the source driver itself.
    pub reader: Option<&'a FileDriver>,
    /// The job's pacing: while the host writes clusters not yet copied, reads from a disk
    /// ([`Copier::reader`]) go in pieces of [`HOST_READ_PIECE`] (see there).
    pub pace: Option<&'a super::priority::HostPace>,
    /// Which runs have their target's writeback started at once (writeback.rs).
    pub writeback: super::writeback::Writeback,
}

/// While the host writes clusters not yet copied, the job reads a disk in pieces of this
/// size: a hook's read of old data then waits behind at most one piece per worker at the
/// device, not a whole chunk per worker (a 1 MiB read is ~2.5 ms of a 400 MiB/s disk, so
/// two of them put the hook's p99 at 3.4x the idle disk's; PERFORMANCE.md, issue 26).
pub(crate) const HOST_READ_PIECE: usize = 256 << 10;

/// Whether copy offload pays from `source` to `target` (both files; see [`Copier`]).
pub(crate) fn offload_pays(source: &dyn BlockDriver, target: &dyn BlockDriver) -> bool {
    match (source.as_file_driver(), target.as_file_driver()) {
        (Some(s), Some(t)) => s.copy_offload_pays(t),
        _ => false,
    }
}

impl Copier<'_> {
    /// Copy clusters `clusters` (a claim held by the caller) from source to target.
    pub fn copy(&self, clusters: Range<u64>, buf: &mut AlignedBuf) -> Result<Copied> {
        let offload = match (self.source.as_file_driver(), self.target.as_file_driver()) {
            (Some(s), Some(t)) if self.offload_pays => Some((s, t)),
            _ => None,
        };
        self.copy_via(clusters, buf, offload)
    }

    /// Read the run into `buf`, find its zero clusters there, and write the rest: by
    /// copy offload from `offload`'s source file to its target file when given, else
    /// (or when the offload fails) from `buf`.
    fn copy_via(
        &self,
        clusters: Range<u64>,
        buf: &mut AlignedBuf,
        offload: Option<(&FileDriver, &FileDriver)>,
    ) -> Result<Copied> {
        let cached = self.read(clusters.clone(), buf)?;
        let (_, len) = self.geo.byte_range(clusters.clone());
        let mut done = self.put(clusters, buf.slice_mut(len as usize), offload)?;
        done.write_back = done.data > 0 && self.writeback.for_run(cached);
        Ok(done)
    }

    /// Read the old data of `clusters` from the source into `buf` (the first half of a
    /// copy; a hook saving into memory stops here, cowbuf.rs). `true` when the job's
    /// writeback rule asks and every byte came from the page cache (writeback.rs).
    pub fn read(&self, clusters: Range<u64>, buf: &mut AlignedBuf) -> Result<bool> {
        let (off, len) = self.geo.byte_range(clusters);
        let data = buf.slice_mut(len as usize);
        let r = match self.reader {
            Some(f) if data.len() > HOST_READ_PIECE && self.pace.is_some_and(|p| p.host_active()) => data
                .chunks_mut(HOST_READ_PIECE)
                .enumerate()
                .try_for_each(|(i, piece)| f.read_at(piece, off + (i * HOST_READ_PIECE) as u64))
                .map(|()| false),
            Some(f) if self.writeback == Writeback::WhenCached => f.read_at_cached(data, off),
            Some(f) => f.read_at(data, off).map(|()| false),
            None => self.source.read_at(data, off).map(|()| false),
        };
        r.map_err(|e| Error::io(Side::Source, Op::Read, off, len, &e))
    }

    /// Write `data`, the old data of `clusters` read before, to the target: zero
    /// clusters as zeroes (or not at all), the rest as data (the second half of a copy).
    pub fn put(
        &self,
        clusters: Range<u64>,
        data: &[u8],
        offload: Option<(&FileDriver, &FileDriver)>,
    ) -> Result<Copied> {
        let (off, _) = self.geo.byte_range(clusters);
        let cs = self.geo.cluster_size as usize;
        let mut out = Copied::default();
        let mut pos = 0usize;
        while pos < data.len() {
            // A maximal run of clusters that are all zero, or all non-zero.
            let zero = buffer_is_zero(&data[pos..(pos + cs).min(data.len())]);
            let mut end = (pos + cs).min(data.len());
            while end < data.len() && buffer_is_zero(&data[end..(end + cs).min(data.len())]) == zero {
                end = (end + cs).min(data.len());
            }
            let at = off + pos as u64;
            let n = (end - pos) as u64;
            if zero {
                self.zero_run(at, n, &mut out)?;
            } else {
                self.write_data(&data[pos..end], at, offload)?;
                out.data += n;
            }
            if let Some(rec) = self.record {
                let first = at >> self.geo.shift;
                if zero {
                    rec.zero(first..self.geo.clusters_of(at, at + n).end);
                } else {
                    rec.data(first, &data[pos..end]);
                }
            }
            pos = end;
        }
        Ok(out)
    }

    /// Put `data`, read from the source at `at`, at `at` in the target.
    fn write_data(&self, data: &[u8], at: u64, offload: Option<(&FileDriver, &FileDriver)>) -> Result<()> {
        let n = data.len() as u64;
        if let Some((s, t)) = offload {
            // Any failure (unsupported here, a full or failing target): write the bytes
            // already read instead; what fails then is the target's and is reported so.
            if s.copy_range_to(t, at, n).is_ok() {
                return Ok(());
            }
        }
        self.target.write_at(data, at).map_err(|e| Error::io(Side::Target, Op::Write, at, n, &e))
    }

    /// A run of clusters that read as zero: `write_zeroes` on the target, or nothing when
    /// the target already reads zeroes there.
    fn zero_run(&self, at: u64, n: u64, out: &mut Copied) -> Result<()> {
        if !self.target_zero {
            self.target.write_zeroes_at(at, n).map_err(|e| Error::io(Side::Target, Op::WriteZeroes, at, n, &e))?;
        }
        out.zero += n;
        if let Some(sink) = self.trace {
            crate::trace::deliver(sink, self.job, &TraceEvent::ZeroClusters { job: self.job, offset: at, len: n });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::OpenFlags;

    const CS: u64 = 64 << 10;

    fn geo(size: u64) -> Geometry {
        Geometry { size, cluster_size: CS, shift: CS.trailing_zeros(), clusters: size.div_ceil(CS), max_run: 16 }
    }

    /// A source of 16 clusters: data, zero, zero, data (zero head), data, ... and a
    /// partly filled last cluster; the expected (data, zero) byte counts.
    fn source(dir: &std::path::Path) -> (FileDriver, Vec<u8>, Copied) {
        let size = 16 * CS - 4096;
        let mut img = vec![0u8; size as usize];
        let mut want = Copied::default();
        for (i, c) in img.chunks_mut(CS as usize).enumerate() {
            let n = c.len() as u64;
            match i % 4 {
                1 | 2 => want.zero += n,
                3 => {
                    // Zero at the head, data at the very end: a head probe would call it zero.
                    *c.last_mut().unwrap() = 0x5a;
                    want.data += n;
                }
                _ => {
                    c.iter_mut().enumerate().for_each(|(j, b)| *b = (j * 7 + i) as u8 | 1);
                    want.data += n;
                }
            }
        }
        let p = dir.join("src");
        std::fs::write(&p, &img).unwrap();
        (FileDriver::open(&p, OpenFlags::empty()).unwrap(), img, want)
    }

    fn contents(d: &FileDriver) -> Vec<u8> {
        let mut v = vec![0u8; d.size() as usize];
        d.read_at(&mut v, 0).unwrap();
        v
    }

    /// The same bytes and the same exact zero clusters whether the data goes by
    /// `copy_file_range` or from the buffer, into a target that reads zeroes or one
    /// holding old data.
    #[test]
    #[cfg_attr(miri, ignore = "real files: copy_file_range and fstatfs are not supported by Miri")]
    fn zero_clusters_found_exactly_with_and_without_offload() {
        let dir = tempfile::tempdir().unwrap();
        let (src, img, want) = source(dir.path());
        let exact = src.exact_reader();
        let g = geo(src.size());
        for offload in [false, true] {
            for target_zero in [true, false] {
                let p = dir.path().join(format!("dst-{offload}-{target_zero}"));
                if target_zero {
                    FileDriver::create(&p, src.size()).unwrap();
                } else {
                    std::fs::write(&p, vec![0xeeu8; src.size() as usize]).unwrap();
                }
                let dst = FileDriver::open(&p, OpenFlags::WRITE).unwrap();
                let c = Copier {
                    source: &src,
                    target: &dst,
                    geo: &g,
                    target_zero,
                    trace: None,
                    job: 1,
                    record: None,
                    offload_pays: offload_pays(&src, &dst),
                    // The job's own descriptor of the source where it has one (a disk).
                    reader: exact.as_ref(),
                    pace: None,
                    writeback: Writeback::for_job(&src, &dst),
                };
                let mut buf = AlignedBuf::new();
                let mut got = Copied::default();
                for run in [0..5, 5..6, 6..16] {
                    let r = c.copy_via(run, &mut buf, offload.then_some((&src, &dst))).unwrap();
                    got.data += r.data;
                    got.zero += r.zero;
                }
                assert_eq!(got, want, "offload {offload}, target_zero {target_zero}");
                assert!(contents(&dst) == img, "offload {offload}, target_zero {target_zero}: content differs");
            }
        }
    }

    /// A clone that fails falls back to writing the buffer, and a failure there is
    /// reported on the target, as a write.
    #[test]
    #[cfg_attr(miri, ignore = "real files: copy_file_range and fstatfs are not supported by Miri")]
    fn failed_offload_is_written_or_reported_on_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let (src, _, _) = source(dir.path());
        let g = geo(src.size());
        let p = dir.path().join("dst");
        FileDriver::create(&p, src.size()).unwrap();
        let ro = FileDriver::open(&p, OpenFlags::empty()).unwrap();
        let c = Copier {
            source: &src,
            target: &ro,
            geo: &g,
            target_zero: true,
            trace: None,
            job: 1,
            record: None,
            offload_pays: false,
            reader: None,
            writeback: Writeback::Never,
            pace: None,
        };
        let e = c.copy_via(0..1, &mut AlignedBuf::new(), Some((&src, &ro))).unwrap_err();
        let ctx = e.context().unwrap();
        assert_eq!((ctx.side, ctx.op, ctx.offset), (Side::Target, Op::Write, 0));
    }

    /// Copy offload is chosen by the filesystem: never on tmpfs or ext4 (where the
    /// kernel copies through the page cache), never across filesystems.
    #[test]
    #[cfg_attr(miri, ignore = "real files: copy_file_range and fstatfs are not supported by Miri")]
    fn offload_only_where_it_clones() {
        let fs_type = |p: &std::path::Path| {
            let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
            // SAFETY: a zeroed statfs is a valid value of this plain C struct.
            let mut st: libc::statfs = unsafe { std::mem::zeroed() };
            // SAFETY: statfs with a NUL-terminated path and a local of the right type.
            assert_eq!(unsafe { libc::statfs(c.as_ptr(), &mut st) }, 0);
            st.f_type as u32
        };
        const PAGE_CACHE_COPY: [u32; 2] = [0x0102_1994, 0xef53]; // tmpfs, ext2/3/4
        let mut dirs = vec![tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap()];
        dirs.extend(tempfile::tempdir_in("/dev/shm").ok());
        let (src, _, _) = source(dirs[0].path());
        for d in &dirs {
            let (s, _, _) = source(d.path());
            let t = FileDriver::create(d.path().join("dst"), s.size()).unwrap();
            if PAGE_CACHE_COPY.contains(&fs_type(d.path())) {
                assert!(!s.copy_offload_pays(&t), "{}", d.path().display());
            }
            if src.storage_id().unwrap().0 != t.storage_id().unwrap().0 {
                assert!(!src.copy_offload_pays(&t), "across filesystems");
            }
        }
    }

    /// While the host writes, a worker reads a disk in pieces of HOST_READ_PIECE: the
    /// buffer holds exactly the source, the last piece short.
    #[test]
    #[cfg_attr(miri, ignore = "real files: posix_fadvise and pread are not supported by Miri")]
    fn piece_reads_while_the_host_writes_read_exactly_the_run() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = dir.path().join("src");
        let size = 3 * HOST_READ_PIECE as u64 + 5 * CS; // 4 pieces, the last one short
        let img: Vec<u8> = (0..size).map(|i| (i / 4096 % 251) as u8 ^ (i % 7) as u8).collect();
        std::fs::write(&path, &img).unwrap();
        let src = FileDriver::open(&path, OpenFlags::empty()).unwrap();
        let Some(reader) = src.exact_reader() else {
            eprintln!("skipped: /var/tmp is on tmpfs");
            return;
        };
        let g = Geometry { max_run: size / CS, ..geo(size) };
        let pace = super::super::priority::HostPace::new(true);
        pace.host_wrote();
        assert!(pace.host_active());
        // Written back first: dirty pages are not dropped from the page cache.
        let evict = std::fs::File::open(&path).unwrap();
        evict.sync_all().unwrap();
        // SAFETY: posix_fadvise on a descriptor we own: the source leaves the page cache.
        let dropped =
            unsafe { libc::posix_fadvise(std::os::fd::AsRawFd::as_raw_fd(&evict), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(dropped, 0);
        let c = Copier {
            source: &src,
            target: &src,
            geo: &g,
            target_zero: false,
            trace: None,
            job: 1,
            record: None,
            offload_pays: false,
            reader: Some(&reader),
            writeback: Writeback::Never,
            pace: Some(&pace),
        };
        let mut buf = AlignedBuf::new();
        buf.try_reserve(size as usize).unwrap();
        assert!(!c.read(0..g.clusters, &mut buf).unwrap());
        assert!(buf.slice_mut(size as usize) == &img[..]);
    }
}
