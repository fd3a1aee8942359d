//! Where a claimed run of clusters is **copied**: read the source, find the zero
//! clusters, write the rest to the target (zero clusters as `write_zeroes`, or not
//! at all when the target already reads zeroes).
//!
//! Between two files ([`BlockDriver::as_file_driver`]) the data goes by copy offload
//! (`copy_file_range`: in the kernel, or a reflink clone) instead: each cluster's first
//! [`PROBE`] bytes are read to tell data from zeroes (a cluster whose probe is zero is
//! read whole and checked), so zero clusters are still found exactly, while the data
//! itself never passes through our buffers.

use std::ops::Range;

use crate::buf::AlignedBuf;
use crate::drivers::file::unsupported;
use crate::error::{Error, Op, Result, Side};
use crate::job::Geometry;
use crate::trace::{TraceEvent, TraceFn};
use crate::zero::buffer_is_zero;
use crate::{BlockDriver, FileDriver};

/// Bytes read from the head of each cluster to tell data from zeroes under copy offload.
pub(crate) const PROBE: usize = 4096;

/// What one copied run amounted to, in bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Copied {
    /// Data read and written to the target.
    pub data: u64,
    /// Clusters that read as zero.
    pub zero: u64,
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
}

impl Copier<'_> {
    /// Copy clusters `clusters` (a claim held by the caller) from source to target.
    pub fn copy(&self, clusters: Range<u64>, buf: &mut AlignedBuf) -> Result<Copied> {
        if let (Some(s), Some(t)) = (self.source.as_file_driver(), self.target.as_file_driver()) {
            return self.copy_offload(s, t, clusters, buf);
        }
        self.copy_buffered(clusters, buf)
    }

    /// Read the run into `buf`, find its zero clusters, write the rest from `buf`.
    fn copy_buffered(&self, clusters: Range<u64>, buf: &mut AlignedBuf) -> Result<Copied> {
        let (off, len) = self.geo.byte_range(clusters);
        let data = buf.slice_mut(len as usize);
        self.source.read_at(data, off).map_err(|e| Error::io(Side::Source, Op::Read, off, len, &e))?;

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
                self.target.write_at(&data[pos..end], at).map_err(|e| Error::io(Side::Target, Op::Write, at, n, &e))?;
                out.data += n;
            }
            pos = end;
        }
        Ok(out)
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

    /// Copy offload between two files: probe each cluster for zeroes, then zero the
    /// zero runs and `copy_file_range` the data runs; a data run the kernel cannot
    /// offload is read and written instead.
    fn copy_offload(
        &self,
        s: &FileDriver,
        t: &FileDriver,
        clusters: Range<u64>,
        buf: &mut AlignedBuf,
    ) -> Result<Copied> {
        let (off, len) = self.geo.byte_range(clusters);
        let end = off + len;
        let cs = self.geo.cluster_size;
        let mut out = Copied::default();
        // The run being gathered: its start and whether it is zero.
        let mut run: Option<(u64, bool)> = None;
        let mut pos = off;
        while pos < end {
            let n = (end - pos).min(cs);
            let probe = (n as usize).min(PROBE);
            let head = buf.slice_mut(probe);
            s.read_at(head, pos).map_err(|e| Error::io(Side::Source, Op::Read, pos, probe as u64, &e))?;
            let zero = buffer_is_zero(head) && {
                let all = buf.slice_mut(n as usize);
                s.read_at(all, pos).map_err(|e| Error::io(Side::Source, Op::Read, pos, n, &e))?;
                buffer_is_zero(all)
            };
            match run {
                Some((start, z)) if z != zero => {
                    self.finish_run(s, t, start, pos - start, z, buf, &mut out)?;
                    run = Some((pos, zero));
                }
                Some(_) => {}
                None => run = Some((pos, zero)),
            }
            pos += n;
        }
        if let Some((start, z)) = run {
            self.finish_run(s, t, start, end - start, z, buf, &mut out)?;
        }
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn finish_run(
        &self,
        s: &FileDriver,
        t: &FileDriver,
        at: u64,
        n: u64,
        zero: bool,
        buf: &mut AlignedBuf,
        out: &mut Copied,
    ) -> Result<()> {
        if zero {
            return self.zero_run(at, n, out);
        }
        match s.copy_range_to(t, at, n) {
            Ok(()) => {}
            Err(e) if unsupported(&e) => {
                let data = buf.slice_mut(n as usize);
                s.read_at(data, at).map_err(|e| Error::io(Side::Source, Op::Read, at, n, &e))?;
                t.write_at(data, at).map_err(|e| Error::io(Side::Target, Op::Write, at, n, &e))?;
            }
            // The kernel does not say which side failed: report it on the source
            // when reading there fails too, else on the target.
            Err(e) => {
                let data = buf.slice_mut(n as usize);
                let side = if s.read_at(data, at).is_err() { Side::Source } else { Side::Target };
                return Err(Error::io(side, Op::Write, at, n, &e));
            }
        }
        out.data += n;
        Ok(())
    }
}
