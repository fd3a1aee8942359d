//! Where a claimed run of clusters is **copied**: read the source, find the zero
//! clusters, write the rest to the target (zero clusters as `write_zeroes`, or not
//! at all when the target already reads zeroes).

use std::ops::Range;

use crate::buf::AlignedBuf;
use crate::error::{Error, Op, Result, Side};
use crate::job::Geometry;
use crate::trace::{TraceEvent, TraceFn};
use crate::zero::buffer_is_zero;
use crate::BlockDriver;

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
                if !self.target_zero {
                    self.target
                        .write_zeroes_at(at, n)
                        .map_err(|e| Error::io(Side::Target, Op::WriteZeroes, at, n, &e))?;
                }
                out.zero += n;
                if let Some(sink) = self.trace {
                    sink(&TraceEvent::ZeroClusters { job: self.job, offset: at, len: n });
                }
            } else {
                self.target.write_at(&data[pos..end], at).map_err(|e| Error::io(Side::Target, Op::Write, at, n, &e))?;
                out.data += n;
            }
            pos = end;
        }
        Ok(out)
    }
}
