//! A small point-in-time backup through the Rust API and through the C ABI, small
//! enough for Miri (`scripts/miri.sh`), which then checks every unsafe path it takes
//! (the ffi layer, C driver callbacks, buffers, the job's threads) for undefined
//! behaviour, data races and leaks. Also an ordinary test in every `cargo test`.

use std::ffi::{c_int, c_void, CStr};
use std::ptr;
use std::sync::{Arc, Mutex};
use std::thread;

use cowbackup::ffi::*;
use cowbackup::{backup_start, BackupOptions, BlockDriver, JobState, MemDriver};

const CLUSTER: u64 = 4096;
const CLUSTERS: u64 = 6;
const SIZE: u64 = CLUSTER * CLUSTERS;

/// The device as it is at the point in time: every cluster a different byte.
fn old_image() -> Vec<u8> {
    (0..SIZE).map(|i| (i / CLUSTER) as u8 + 1).collect()
}

fn options() -> BackupOptions {
    BackupOptions { cluster_size: CLUSTER, workers: 2, max_chunk: 2 * CLUSTER, ..Default::default() }
}

#[test]
fn rust_api_point_in_time_with_a_concurrent_writer() {
    let source = Arc::new(MemDriver::new(SIZE).unwrap());
    source.write_at(&old_image(), 0).unwrap();
    let target = Arc::new(MemDriver::new(SIZE).unwrap());
    let job = Arc::new(backup_start(source.clone(), target.clone(), options()).unwrap());
    // The host writes every cluster (through the hook) while the workers copy.
    let writer = {
        let (job, source) = (job.clone(), source.clone());
        thread::spawn(move || {
            for c in (0..CLUSTERS).rev() {
                let (off, len) = (c * CLUSTER + 100, 200);
                job.cow_before_write(off, len).unwrap();
                source.write_at(&[0xee; 200], off).unwrap();
            }
        })
    };
    writer.join().unwrap();
    job.wait().unwrap();
    assert_eq!(job.info().state, JobState::Completed);
    let mut got = vec![0; SIZE as usize];
    target.read_at(&mut got, 0).unwrap();
    assert!(got == old_image(), "the target is not the point-in-time image");
}

/// A C driver over a `Vec` (the `opaque`), as a C block layer would write it.
struct CDisk {
    data: Mutex<Vec<u8>>,
    released: *const Mutex<bool>,
}

unsafe extern "C" fn c_read(opaque: *mut c_void, offset: u64, buf: *mut c_void, len: usize) -> c_int {
    // SAFETY: `opaque` is the `CDisk` given to cowbackup_driver_new, alive until `release`;
    // `buf` holds `len` bytes for the duration of the call.
    let (disk, buf) = unsafe { (&*(opaque as *const CDisk), std::slice::from_raw_parts_mut(buf.cast::<u8>(), len)) };
    let data = disk.data.lock().unwrap();
    buf.copy_from_slice(&data[offset as usize..offset as usize + len]);
    0
}

unsafe extern "C" fn c_write(opaque: *mut c_void, offset: u64, buf: *const c_void, len: usize) -> c_int {
    // SAFETY: as in `c_read`.
    let (disk, buf) = unsafe { (&*(opaque as *const CDisk), std::slice::from_raw_parts(buf.cast::<u8>(), len)) };
    disk.data.lock().unwrap()[offset as usize..offset as usize + len].copy_from_slice(buf);
    0
}

unsafe extern "C" fn c_release(opaque: *mut c_void) {
    // SAFETY: called once, after the last op: the box made in `c_driver` is ours again.
    let disk = unsafe { Box::from_raw(opaque.cast::<CDisk>()) };
    // SAFETY: the flag outlives the driver (the test waits for it).
    *unsafe { &*disk.released }.lock().unwrap() = true;
}

fn c_driver(released: &Mutex<bool>) -> *mut cowbackup_driver {
    let ops = cowbackup_driver_ops {
        read: Some(c_read),
        write: Some(c_write),
        write_zeroes: None,
        flush: None,
        block_status: None,
        release: Some(c_release),
        discard: None,
    };
    let opaque = Box::into_raw(Box::new(CDisk { data: Mutex::new(vec![0; SIZE as usize]), released }));
    let mut d = ptr::null_mut();
    // SAFETY: `ops` is a valid table of its own size; `opaque` stays valid until `release`.
    let rc = unsafe {
        cowbackup_driver_new(&ops, std::mem::size_of_val(&ops), opaque.cast(), SIZE, COWBACKUP_DRIVER_SERIALIZE, &mut d)
    };
    assert_eq!(rc, 0);
    d
}

/// A handle that may cross threads: the C API's handles are thread-safe.
#[derive(Clone, Copy)]
struct Shared<T>(*mut T);
// SAFETY: cowbackup_job and cowbackup_driver may be used from any thread (capi/README.md).
unsafe impl<T> Send for Shared<T> {}

#[test]
fn c_abi_point_in_time_with_a_c_driver_target() {
    let released = Mutex::new(false);
    // SAFETY: every pointer passed below is valid (or NULL on purpose), every handle is
    // freed exactly once, buffers outlive the calls.
    unsafe {
        let mut source = ptr::null_mut();
        assert_eq!(cowbackup_memory_new(SIZE, &mut source), 0);
        let old = old_image();
        assert_eq!(cowbackup_driver_write(source, 0, old.as_ptr().cast(), old.len()), 0);
        let target = c_driver(&released);

        // Bad input: -EINVAL with a message, nothing written.
        assert_eq!(cowbackup_memory_new(SIZE, ptr::null_mut()), -libc::EINVAL);
        let msg = CStr::from_ptr(cowbackup_last_error());
        assert!(!msg.to_bytes().is_empty());
        let o = cowbackup_options_new();
        assert_eq!(cowbackup_options_set_cluster_size(o, 3), -libc::EINVAL);
        assert_eq!(cowbackup_options_set_cluster_size(o, CLUSTER), 0);
        assert_eq!(cowbackup_options_set_workers(o, 2), 0);
        assert_eq!(cowbackup_options_set_max_chunk(o, 2 * CLUSTER), 0);

        let mut job = ptr::null_mut();
        assert_eq!(cowbackup_backup_start(source, target, o, &mut job), 0);
        cowbackup_options_free(o);
        cowbackup_driver_free(target); // the job holds its own reference
        let (j, s) = (Shared(job), Shared(source));
        let writer = thread::spawn(move || {
            let (j, s) = (j, s);
            let new = [0xeeu8; 300];
            for c in 0..CLUSTERS {
                let off = c * CLUSTER + 1000;
                assert_eq!(cowbackup_cow_before_write(j.0, off, new.len() as u64), 0);
                assert_eq!(cowbackup_driver_write(s.0, off, new.as_ptr().cast(), new.len()), 0);
            }
        });
        writer.join().unwrap();
        assert_eq!(cowbackup_job_wait(job), 0);
        let mut info: cowbackup_job_info = std::mem::zeroed();
        assert_eq!(cowbackup_job_query(job, &mut info), 0);
        assert_eq!(info.state, COWBACKUP_JOB_COMPLETED);
        assert_eq!(info.offset, SIZE);
        assert!(!*released.lock().unwrap(), "the job let go of its target too early");
        cowbackup_job_free(job);
        assert!(*released.lock().unwrap(), "release was not called when the last reference went");
        cowbackup_driver_free(source);
        cowbackup_job_free(ptr::null_mut());
        cowbackup_driver_free(ptr::null_mut());
    }
}

#[test]
fn c_abi_target_read_back_through_the_api() {
    // SAFETY: as in the test above.
    unsafe {
        let (mut source, mut target) = (ptr::null_mut(), ptr::null_mut());
        assert_eq!(cowbackup_memory_new(SIZE, &mut source), 0);
        assert_eq!(cowbackup_memory_new(SIZE, &mut target), 0);
        let old = old_image();
        assert_eq!(cowbackup_driver_write(source, 0, old.as_ptr().cast(), old.len()), 0);
        let mut job = ptr::null_mut();
        assert_eq!(cowbackup_backup_start(source, target, ptr::null(), &mut job), 0);
        // Before the copy gets there (or after): the hook keeps the old data.
        assert_eq!(cowbackup_cow_before_write(job, SIZE - 10, 10), 0);
        assert_eq!(cowbackup_driver_write(source, SIZE - 10, [9u8; 10].as_ptr().cast(), 10), 0);
        assert_eq!(cowbackup_cow_before_write(job, SIZE, 1), -libc::EINVAL);
        assert_eq!(cowbackup_job_wait(job), 0);
        let mut got = vec![0u8; SIZE as usize];
        assert_eq!(cowbackup_driver_read(target, 0, got.as_mut_ptr().cast(), got.len()), 0);
        assert!(got == old, "the target is not the point-in-time image");
        cowbackup_job_free(job);
        cowbackup_driver_free(target);
        cowbackup_driver_free(source);
    }
}
