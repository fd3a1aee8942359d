//! What a Rust host writes first compiles as it reads: `?` in both directions between
//! cowbackup's `Result` and `io::Result`, a glob import that keeps `Result<T, E>`, and a
//! `Job` shared across threads in an `Arc`.
use cowbackup::*;
use std::sync::Arc;

// After the glob import, the two-parameter `Result` is still std's.
fn parse(s: &str) -> Result<u64, std::num::ParseIntError> {
    s.parse()
}

fn host_write_io(job: &Job, disk: &MemDriver, data: &[u8], offset: u64) -> std::io::Result<()> {
    job.cow_before_write(offset, data.len() as u64)?;
    disk.write_at(data, offset)
}

fn host_write_cb(job: &Job, disk: &MemDriver, data: &[u8], offset: u64) -> cowbackup::Result<()> {
    job.cow_before_write(offset, data.len() as u64)?;
    disk.write_at(data, offset)?;
    Ok(())
}

fn assert_send_sync<T: Send + Sync>() {}

#[test]
fn question_mark_both_ways_and_a_shared_job() {
    assert_send_sync::<Job>();
    assert_send_sync::<DirtyBitmap>();
    assert_send_sync::<FileDriver>();
    assert_eq!(parse("42").unwrap(), 42);
    let source = Arc::new(MemDriver::from_bytes(&[7u8; 1 << 20]).unwrap());
    let target = Arc::new(MemDriver::new(1 << 20).unwrap());
    let job = Arc::new(backup_start(source.clone(), target.clone(), BackupOptions::default()).unwrap());
    let t = {
        let (job, source) = (job.clone(), source.clone());
        std::thread::spawn(move || host_write_io(&job, &source, &[1; 4096], 0))
    };
    t.join().unwrap().unwrap();
    host_write_cb(&job, &source, &[2; 4096], 65536).unwrap();
    job.wait().unwrap();
    assert_eq!(target.to_vec(), vec![7u8; 1 << 20]);
}

#[test]
fn errors_keep_their_kind_and_errno_across_the_conversions() {
    // A cowbackup error through io::Error and back is the same error.
    let e = Error::invalid("cluster_size 3 is not a power of two");
    let io: std::io::Error = e.clone().into();
    assert_eq!(io.kind(), std::io::ErrorKind::InvalidInput);
    let back: Error = io.into();
    assert_eq!(back, e);
    // A plain OS error keeps its errno.
    let back: Error = std::io::Error::from_raw_os_error(libc::ENOSPC).into();
    assert_eq!((back.kind(), back.errno()), (ErrorKind::Io, libc::ENOSPC));
    // A driver's out-of-range read through `?` is -EINVAL for C.
    let d = MemDriver::new(4096).unwrap();
    let r: cowbackup::Result<()> = (|| {
        d.read_at(&mut [0; 10], 4090)?;
        Ok(())
    })();
    assert_eq!(r.unwrap_err().errno(), libc::EINVAL);
}
