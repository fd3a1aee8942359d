//! Fuzz target `capi`: the C ABI driven by a byte string.
//!
//! The input is a program: each step reads an opcode and its arguments from the bytes and
//! makes one `cowbackup_*` call — drivers (memory, C ops with injected faults, files in a
//! scratch directory, snapshot views), options setters with arbitrary values, job start
//! (single and group), the hook with arbitrary offsets and lengths, pause / resume /
//! cancel / set_speed / complete / query / wait / free, dirty bitmaps (memory and file),
//! direct driver I/O — with arbitrary arguments, NULL handles, NULL buffers and sizes.
//! Handles live in a few slots; only live handles or NULL are ever passed (a freed handle
//! would be the caller's undefined behaviour, not the library's).
//!
//! Checked on every call: no crash, no sanitizer report, no panic (libFuzzer aborts on
//! one, even a caught one), and every `int` result is 0 or a negative errno with a
//! message. Checked beyond that:
//! - a job's `wait` result agrees with its `query` state;
//! - a `FULL` job that reports success while the host followed the rules (every write to
//!   its source went through its hook first; nothing else wrote its source or target; its
//!   drivers answer truthfully) left a target equal to the source at the start;
//! - every C driver is released exactly once, when its last reference goes; every
//!   completion callback gets 0 or a negative errno;
//! - the library calls C ops only inside the device.
#![no_main]

use std::ffi::{c_int, c_void, CStr, CString};
use std::path::PathBuf;
use std::ptr::{null, null_mut};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use cowbackup::ffi::*;
use libfuzzer_sys::fuzz_target;

/// Largest device a step makes (a job allocates `workers` x min(max_chunk, size) bytes).
const MAX_DEV: u64 = 2 << 20;
/// Largest buffer of a direct read or write.
const MAX_IO: u64 = 1 << 20;

/// Reads arguments from the input; zeroes once it is used up.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn pick(&mut self, n: usize) -> usize {
        self.byte() as usize % n
    }
    fn flag(&mut self) -> bool {
        self.byte() & 1 != 0
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.byte(), self.byte(), self.byte(), self.byte()])
    }
    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | u64::from(self.u32()) << 32
    }
    /// An offset or length about a device of `size` bytes: the edges and arbitrary values.
    fn num(&mut self, size: u64) -> u64 {
        match self.byte() % 10 {
            0 => 0,
            1 => 1,
            2 => size,
            3 => size.wrapping_sub(1),
            4 => size.wrapping_add(1),
            5 => u64::MAX,
            6 => u64::from(self.u16()) * 512,
            7 => u64::from(self.u16()) * 4096 + u64::from(self.byte()),
            8 => u64::from(self.u32()),
            _ => self.u64(),
        }
    }
    /// A device size: mostly small valid ones, sometimes invalid extremes.
    fn dev_size(&mut self) -> u64 {
        match self.byte() % 8 {
            0 => 0,
            1 => u64::MAX,
            2 => (1 << 40) + 1,
            3 => 1 + u64::from(self.u16()),
            _ => (4096 * (1 + u64::from(self.u16()))).min(MAX_DEV),
        }
    }
    /// A value for a setter: valid-looking or arbitrary.
    fn value(&mut self) -> u64 {
        match self.byte() % 6 {
            0 => 0,
            1 => 1 << (self.byte() % 64),
            2 => u64::from(self.byte()),
            3 => u64::MAX,
            4 => u64::from(self.u32()),
            _ => self.u64(),
        }
    }
    fn empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Print what a step does when `CAPI_FUZZ_TRACE` is set (to read a crashing input).
macro_rules! trace {
    ($($a:tt)*) => {
        if std::env::var_os("CAPI_FUZZ_TRACE").is_some() {
            eprintln!("capi: {}", format!($($a)*));
        }
    };
}

/// Check an `int` result: 0 or a negative errno, with a message for a failure.
#[track_caller]
fn check(rc: c_int, what: &str) -> c_int {
    assert!(rc == 0 || (-4095..0).contains(&rc), "{what} returned {rc}: not 0 or a negative errno");
    if rc < 0 {
        let m = cowbackup_last_error();
        assert!(!m.is_null(), "{what} failed ({rc}) without a message");
        // SAFETY: the library returns a NUL-terminated thread-local string.
        let s = unsafe { CStr::from_ptr(m) };
        assert!(!s.to_bytes().is_empty(), "{what} failed ({rc}) with an empty message");
    }
    rc
}

// ---- a C driver with fault injection -------------------------------------------------

/// C drivers made and released (each must be released exactly once).
static MADE: AtomicUsize = AtomicUsize::new(0);
static RELEASED: AtomicUsize = AtomicUsize::new(0);
/// Completion callbacks run.
static COMPLETIONS: AtomicUsize = AtomicUsize::new(0);

/// The device behind a C driver (`opaque`).
struct Dev {
    data: Mutex<Vec<u8>>,
    /// Fail every `fail_every`-th op (0: never) with `errno` (any value: the library must
    /// turn a non-negative-errno answer into -EIO).
    fail_every: u32,
    errno: c_int,
    ops: AtomicU32,
    /// `block_status` answers `(pnum, status)` from these instead of the truth.
    lie: Option<(u64, u32)>,
}

impl Dev {
    fn fault(&self) -> Option<c_int> {
        let n = self.ops.fetch_add(1, Ordering::Relaxed) + 1;
        (self.fail_every != 0 && n % self.fail_every == 0).then_some(self.errno)
    }
    fn range(&self, off: u64, len: u64) -> std::ops::Range<usize> {
        let size = self.data.lock().unwrap().len() as u64;
        let end = off.checked_add(len).expect("the library passed an overflowing range to an op");
        assert!(end <= size, "the library passed {off}+{len} to an op of a {size}-byte device");
        off as usize..end as usize
    }
}

/// # Safety
/// `opaque` is a `Dev` made by `cdriver`.
unsafe fn dev<'a>(opaque: *mut c_void) -> &'a Dev {
    // SAFETY: caller's guarantee; the Dev lives until `op_release`.
    unsafe { &*(opaque as *const Dev) }
}

unsafe extern "C" fn op_read(opaque: *mut c_void, off: u64, buf: *mut c_void, len: usize) -> c_int {
    // SAFETY: opaque is ours.
    let d = unsafe { dev(opaque) };
    let r = d.range(off, len as u64);
    if let Some(e) = d.fault() {
        return e;
    }
    let data = d.data.lock().unwrap();
    // SAFETY: the library passes a buffer of `len` writable bytes.
    unsafe { std::ptr::copy_nonoverlapping(data[r].as_ptr(), buf as *mut u8, len) };
    0
}

unsafe extern "C" fn op_write(opaque: *mut c_void, off: u64, buf: *const c_void, len: usize) -> c_int {
    // SAFETY: opaque is ours.
    let d = unsafe { dev(opaque) };
    let r = d.range(off, len as u64);
    if let Some(e) = d.fault() {
        return e;
    }
    let mut data = d.data.lock().unwrap();
    // SAFETY: the library passes a buffer of `len` readable bytes.
    data[r].copy_from_slice(unsafe { std::slice::from_raw_parts(buf as *const u8, len) });
    0
}

unsafe extern "C" fn op_zero(opaque: *mut c_void, off: u64, len: u64) -> c_int {
    // SAFETY: opaque is ours.
    let d = unsafe { dev(opaque) };
    let r = d.range(off, len);
    if let Some(e) = d.fault() {
        return e;
    }
    d.data.lock().unwrap()[r].fill(0);
    0
}

unsafe extern "C" fn op_flush(opaque: *mut c_void) -> c_int {
    // SAFETY: opaque is ours.
    unsafe { dev(opaque) }.fault().unwrap_or(0)
}

unsafe extern "C" fn op_status(opaque: *mut c_void, off: u64, len: u64, pnum: *mut u64, status: *mut u32) -> c_int {
    // SAFETY: opaque is ours.
    let d = unsafe { dev(opaque) };
    d.range(off, len);
    if let Some(e) = d.fault() {
        return e;
    }
    let (n, s) = d.lie.unwrap_or((len, COWBACKUP_STATUS_DATA));
    // SAFETY: the library passes valid out-pointers.
    unsafe {
        *pnum = n;
        *status = s;
    }
    0
}

unsafe extern "C" fn op_release(opaque: *mut c_void) {
    // SAFETY: made by Box::into_raw in `cdriver`; the library calls release once.
    drop(unsafe { Box::from_raw(opaque as *mut Dev) });
    RELEASED.fetch_add(1, Ordering::SeqCst);
}

unsafe extern "C" fn on_done(_opaque: *mut c_void, ret: c_int) {
    assert!(ret <= 0 && ret > -4096, "completion callback got {ret}");
    COMPLETIONS.fetch_add(1, Ordering::Relaxed);
}

unsafe extern "C" fn on_trace(_opaque: *mut c_void, ev: *const cowbackup_trace_event) {
    assert!(!ev.is_null());
    // SAFETY: valid during the call.
    let ev = unsafe { &*ev };
    if !ev.message.is_null() {
        // SAFETY: NUL-terminated, valid during the call.
        let _ = unsafe { CStr::from_ptr(ev.message) }.to_bytes().len();
    }
}

// ---- the program's state ---------------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Memory,
    C,
    File,
    View,
}

struct Drv {
    p: *mut cowbackup_driver,
    size: u64,
    /// Identity of the device (one handle per device here).
    id: u32,
    /// Answers truthfully (block_status) — a lying driver voids the point-in-time check.
    honest: bool,
    #[allow(dead_code)]
    kind: Kind,
}

struct JobSlot {
    p: *mut cowbackup_job,
    src: u32,
    tgt: u32,
    tgt_handle: Option<*mut cowbackup_driver>,
    size: u64,
    sync: u32,
    /// The source at the start, when the point-in-time check applies.
    pit: Option<Vec<u8>>,
    /// The host broke a rule: no point-in-time check.
    tainted: bool,
    /// The job discards its source as it copies (discard_source).
    discards: bool,
}

#[derive(Clone, Copy)]
struct Opts {
    p: *mut cowbackup_options,
    sync: u32,
    /// The options make the point-in-time check void (target_is_zero may be a lie).
    trusted: bool,
    /// discard_source: the job discards what it copied from its source.
    discards: bool,
}

struct World {
    drvs: [Option<Drv>; 4],
    opts: [Option<Opts>; 2],
    jobs: [Option<JobSlot>; 3],
    bms: [Option<*mut cowbackup_bitmap>; 2],
    next_id: u32,
    dir: PathBuf,
    /// Devs of C drivers without a release op (a short ops table): freed after everything.
    orphans: Vec<*mut Dev>,
}

fn scratch_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("cowbackup-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("scratch dir");
        d
    })
}

fn cpath(p: PathBuf) -> CString {
    CString::new(p.into_os_string().into_encoded_bytes()).unwrap()
}

impl World {
    fn new() -> World {
        World {
            drvs: Default::default(),
            opts: [None; 2],
            jobs: Default::default(),
            bms: [None; 2],
            next_id: 1,
            dir: scratch_dir().clone(),
            orphans: Vec::new(),
        }
    }

    /// A driver handle or NULL (slot index 4 and empty slots).
    fn drv(&self, i: usize) -> *mut cowbackup_driver {
        self.drvs.get(i).and_then(|d| d.as_ref()).map_or(null_mut(), |d| d.p)
    }
    fn opt(&self, i: usize) -> *mut cowbackup_options {
        self.opts.get(i).and_then(|o| o.as_ref()).map_or(null_mut(), |o| o.p)
    }
    fn job(&self, i: usize) -> *mut cowbackup_job {
        self.jobs.get(i).and_then(|j| j.as_ref()).map_or(null_mut(), |j| j.p)
    }
    fn bm(&self, i: usize) -> *mut cowbackup_bitmap {
        self.bms.get(i).copied().flatten().unwrap_or(null_mut())
    }

    fn put_drv(&mut self, i: usize, p: *mut cowbackup_driver, kind: Kind, honest: bool) {
        self.free_drv(i);
        let mut size = 0;
        // SAFETY: p is a live handle.
        check(unsafe { cowbackup_driver_size(p, &mut size) }, "cowbackup_driver_size");
        let id = self.next_id;
        self.next_id += 1;
        trace!("slot {i}: device {id}, {size} bytes");
        self.drvs[i] = Some(Drv { p, size, id, honest, kind });
    }

    fn free_drv(&mut self, i: usize) {
        if let Some(d) = self.drvs[i].take() {
            for j in self.jobs.iter_mut().flatten() {
                if j.tgt_handle == Some(d.p) {
                    j.tgt_handle = None;
                }
            }
            // SAFETY: live handle, dropped from its slot.
            unsafe { cowbackup_driver_free(d.p) };
        }
    }

    /// Jobs whose copy a write to device `id` breaks unless it goes through their hook.
    fn taint_device(&mut self, id: u32, as_source_too: bool) {
        for j in self.jobs.iter_mut().flatten() {
            if j.tgt == id || (as_source_too && j.src == id) {
                j.tainted = true;
            }
        }
    }

    fn read_all(&self, p: *mut cowbackup_driver, size: u64) -> Option<Vec<u8>> {
        if p.is_null() || size > MAX_DEV {
            return None;
        }
        let mut v = vec![0u8; size as usize];
        // SAFETY: live handle, buffer of `size` bytes.
        let rc = check(unsafe { cowbackup_driver_read(p, 0, v.as_mut_ptr().cast(), v.len()) }, "cowbackup_driver_read");
        (rc == 0).then_some(v)
    }

    fn add_job(&mut self, p: *mut cowbackup_job, src: usize, tgt: usize, o: Option<Opts>) {
        let (sync, trusted, discards) =
            o.map_or((COWBACKUP_SYNC_FULL, true, false), |o| (o.sync, o.trusted, o.discards));
        let (s, t) = (self.drvs[src].as_ref().unwrap(), self.drvs[tgt].as_ref().unwrap());
        let (src_id, tgt_id, size) = (s.id, t.id, s.size);
        let honest = s.honest && t.honest;
        let tgt_handle = t.p;
        // A new job's target that is the source of a running job, or a new job's source
        // that a running job writes: the host's discipline does not cover that.
        let mut tainted = !trusted || !honest;
        for j in self.jobs.iter_mut().flatten() {
            if j.src == tgt_id {
                j.tainted = true;
            }
            if j.tgt == src_id || j.tgt == tgt_id || (j.src == src_id && (j.discards || discards)) {
                tainted = true;
                j.tainted = true;
            }
        }
        let pit = if sync == COWBACKUP_SYNC_FULL && !tainted { self.read_all(self.drv(src), size) } else { None };
        let slot = match self.jobs.iter().position(|j| j.is_none()) {
            Some(i) => i,
            None => {
                self.free_job(0);
                0
            }
        };
        self.jobs[slot] = Some(JobSlot {
            p,
            src: src_id,
            tgt: tgt_id,
            tgt_handle: Some(tgt_handle),
            size,
            sync,
            pit,
            tainted,
            discards,
        });
    }

    fn free_job(&mut self, i: usize) {
        if let Some(j) = self.jobs[i].take() {
            // SAFETY: live job handle, dropped from its slot.
            unsafe { cowbackup_job_free(j.p) };
        }
    }

    /// Wait for a job: end it first when it would never end by itself (paused, sync none,
    /// throttled), so the program always terminates.
    fn wait(&mut self, i: usize, finish: bool) {
        let Some(j) = self.jobs.get(i).and_then(|j| j.as_ref()) else {
            // SAFETY: NULL is allowed.
            assert_eq!(check(unsafe { cowbackup_job_wait(null_mut()) }, "wait"), -libc::EINVAL);
            return;
        };
        let p = j.p;
        // SAFETY: live job handle throughout.
        unsafe {
            if finish {
                check(cowbackup_job_resume(p), "resume");
                check(cowbackup_job_complete(p), "complete");
            }
            let t = Instant::now();
            let mut info = std::mem::zeroed::<cowbackup_job_info>();
            loop {
                check(cowbackup_job_query(p, &mut info), "query");
                assert!(info.state <= COWBACKUP_JOB_CANCELLED, "state {}", info.state);
                assert!(info.offset <= info.len, "offset {} > len {}", info.offset, info.len);
                if info.state >= COWBACKUP_JOB_COMPLETED || t.elapsed() > Duration::from_millis(30) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            if info.state < COWBACKUP_JOB_COMPLETED {
                check(cowbackup_job_cancel(p), "cancel");
            }
            let rc = check(cowbackup_job_wait(p), "wait");
            trace!("job {i} ended: {rc}");
            check(cowbackup_job_query(p, &mut info), "query");
            let want = match rc {
                0 => COWBACKUP_JOB_COMPLETED,
                e if e == -libc::ECANCELED => COWBACKUP_JOB_CANCELLED,
                _ => COWBACKUP_JOB_FAILED,
            };
            assert_eq!(info.state, want, "wait returned {rc} but the job is in state {}", info.state);
            if rc < 0 && rc != -libc::ECANCELED {
                assert_eq!(info.error, rc, "wait and query disagree on the error");
            }
            if rc == 0 && info.state == COWBACKUP_JOB_COMPLETED {
                let j = self.jobs[i].as_ref().unwrap();
                if let (Some(pit), false, Some(t)) = (&j.pit, j.tainted, j.tgt_handle) {
                    assert_eq!(j.sync, COWBACKUP_SYNC_FULL);
                    if let Some(got) = self.read_all(t, j.size) {
                        if let Some(k) = got.iter().zip(pit).position(|(a, b)| a != b) {
                            panic!(
                                "a FULL job reported success but its target differs from the point in time at byte {k}"
                            );
                        }
                    }
                }
            }
        }
    }

    fn cdriver(&mut self, inp: &mut Input) {
        let size = inp.dev_size();
        let fail_every = [0, 0, 0, 1, 2, 3, 7, 50][inp.pick(8)];
        let errno = [-libc::EIO, -libc::ENOSPC, -libc::EINTR, 1, i32::MIN, -100_000][inp.pick(6)];
        let lie = inp.flag().then(|| (inp.num(size), inp.u32() & 7));
        let mut ops = cowbackup_driver_ops {
            read: Some(op_read),
            write: Some(op_write),
            write_zeroes: None,
            flush: None,
            block_status: None,
            release: Some(op_release),
            discard: None,
        };
        let mask = inp.byte();
        if mask & 1 != 0 {
            ops.write_zeroes = Some(op_zero);
        }
        if mask & 2 != 0 {
            ops.flush = Some(op_flush);
        }
        if mask & 4 != 0 {
            ops.block_status = Some(op_status);
        }
        if mask & 8 != 0 {
            ops.discard = Some(op_zero);
        }
        if mask & 16 != 0 {
            ops.read = None;
        }
        // The table sits at the start of a 4096-byte block (the most the library reads);
        // what follows it is zero or, sometimes, garbage (ops of a "newer" caller).
        let mut block = vec![0u64; 512];
        let n = std::mem::size_of::<cowbackup_driver_ops>();
        // SAFETY: block has 4096 bytes, more than the table.
        unsafe { std::ptr::write_unaligned(block.as_mut_ptr() as *mut cowbackup_driver_ops, ops) };
        if mask & 32 != 0 {
            block[n / 8 + inp.pick(8)] = inp.u64();
        }
        let ops_size = match inp.pick(6) {
            0 => n,
            1 => n - 8,
            2 => 16,
            3 => 4096,
            4 => 4097,
            _ => inp.u16() as usize % 4097,
        };
        let size_ok = size > 0 && size <= MAX_DEV;
        let d = Box::into_raw(Box::new(Dev {
            data: Mutex::new(vec![0xA5; if size_ok { size as usize } else { 0 }]),
            fail_every,
            errno,
            ops: AtomicU32::new(0),
            lie,
        }));
        let flags = [0, COWBACKUP_DRIVER_SERIALIZE, 2, u32::MAX][inp.pick(4)];
        let mut out = null_mut();
        let out_p = if inp.byte() == 255 { null_mut() } else { &mut out as *mut _ };
        let ops_p = if inp.byte() == 255 { null() } else { block.as_ptr() as *const cowbackup_driver_ops };
        // A size the Dev does not back would make our ops fail their range checks: only
        // the sizes it backs are offered as valid; others must be refused.
        let size_arg = if size_ok { size } else { 0 };
        // SAFETY: ops points to 4096 readable bytes; out is NULL or valid.
        let rc =
            check(unsafe { cowbackup_driver_new(ops_p, ops_size, d.cast(), size_arg, flags, out_p) }, "driver_new");
        trace!("driver_new size {size_arg} fail_every {fail_every} errno {errno} lie {lie:?} mask {mask:#x} ops_size {ops_size} flags {flags:#x}: {rc}");
        if rc == 0 {
            assert!(size_ok, "driver_new accepted size {size_arg}");
            // A table cut before `release` has none: the Dev is ours to free at the end.
            let release_at = std::mem::offset_of!(cowbackup_driver_ops, release);
            if ops_size >= release_at + 8 {
                MADE.fetch_add(1, Ordering::SeqCst);
            } else {
                self.orphans.push(d);
            }
            let slot = inp.pick(4);
            let honest = lie.is_none();
            self.put_drv(slot, out, Kind::C, honest);
        } else {
            // SAFETY: not taken by the library on failure.
            drop(unsafe { Box::from_raw(d) });
        }
    }

    fn step(&mut self, inp: &mut Input) {
        let op = inp.byte() % 24;
        trace!("step {op}");
        match op {
            0 => {
                let size = inp.dev_size();
                let mut out = null_mut();
                let null_out = inp.byte() == 255;
                // SAFETY: out is NULL or valid.
                let rc = check(
                    unsafe { cowbackup_memory_new(size, if null_out { null_mut() } else { &mut out }) },
                    "memory_new",
                );
                if rc == 0 {
                    assert!(size > 0 && size <= 1 << 40);
                    let slot = inp.pick(4);
                    self.put_drv(slot, out, Kind::Memory, true);
                    let fill = inp.byte();
                    let d = self.drv(slot);
                    if fill != 0 && size <= MAX_DEV {
                        // Some content: one data run.
                        let (o, l) = (inp.num(size) % size, u64::from(inp.u16()) * 16);
                        let l = l.min(size - o) as usize;
                        let buf = vec![fill; l];
                        // SAFETY: live handle, buffer of l bytes.
                        check(unsafe { cowbackup_driver_write(d, o, buf.as_ptr().cast(), l) }, "write");
                    }
                }
            }
            1 => self.cdriver(inp),
            2 => {
                let slot = inp.pick(4);
                self.free_drv(slot);
            }
            3 => {
                let i = inp.pick(2);
                if let Some(o) = self.opts[i].take() {
                    // SAFETY: live options.
                    unsafe { cowbackup_options_free(o.p) };
                }
                let p = cowbackup_options_new();
                assert!(!p.is_null());
                self.opts[i] = Some(Opts { p, sync: COWBACKUP_SYNC_FULL, trusted: true, discards: false });
            }
            4 | 5 => {
                let i = inp.pick(3);
                let o = self.opt(i);
                let v = inp.value();
                let v32 = v as u32;
                // SAFETY: o is NULL or live; callbacks are valid for the program's life.
                let which = inp.pick(14);
                let rc = unsafe {
                    match which {
                        0 => check(cowbackup_options_set_cluster_size(o, v), "set_cluster_size"),
                        1 => {
                            let rc = check(cowbackup_options_set_sync(o, v32 % 5), "set_sync");
                            if rc == 0 {
                                self.opts[i].as_mut().unwrap().sync = v32 % 5;
                            }
                            rc
                        }
                        2 => check(cowbackup_options_set_speed(o, v), "set_speed"),
                        3 => check(cowbackup_options_set_workers(o, v32 % 70), "set_workers"),
                        4 => check(cowbackup_options_set_max_chunk(o, v), "set_max_chunk"),
                        5 => check(cowbackup_options_set_on_source_error(o, v32 % 5), "on_source_error"),
                        6 => check(cowbackup_options_set_on_target_error(o, v32 % 5), "on_target_error"),
                        7 => check(cowbackup_options_set_on_cbw_error(o, v32 % 3), "on_cbw_error"),
                        8 => check(cowbackup_options_set_cbw_timeout(o, v % 50), "cbw_timeout"),
                        9 => {
                            let rc = check(cowbackup_options_set_target_is_zero(o, v32 % 3), "target_is_zero");
                            if rc == 0 && v32 % 3 != 0 {
                                self.opts[i].as_mut().unwrap().trusted = false;
                            }
                            rc
                        }
                        10 => check(
                            cowbackup_options_set_completion(
                                o,
                                inp.flag().then_some(on_done as unsafe extern "C" fn(*mut c_void, c_int)),
                                null_mut(),
                            ),
                            "set_completion",
                        ),
                        11 => {
                            let bm = self.bm(inp.pick(3));
                            check(cowbackup_options_set_bitmap(o, bm, v32 % 4), "set_bitmap")
                        }
                        12 => {
                            let rc = check(cowbackup_options_set_discard_source(o, v32 % 3), "discard_source");
                            if rc == 0 {
                                self.opts[i].as_mut().unwrap().discards = v32 % 3 != 0;
                            }
                            rc
                        }
                        _ => check(
                            cowbackup_options_set_trace(
                                o,
                                inp.flag().then_some(
                                    on_trace as unsafe extern "C" fn(*mut c_void, *const cowbackup_trace_event),
                                ),
                                null_mut(),
                            ),
                            "set_trace",
                        ),
                    }
                };
                trace!("options {i} setter {which} value {v}: {rc}");
                if o.is_null() {
                    assert_eq!(rc, -libc::EINVAL);
                }
            }
            6 | 7 => {
                let (s, t, oi) = (inp.pick(5), inp.pick(5), inp.pick(3));
                let o = self.opt(oi);
                let oo = self.opts.get(oi).and_then(|x| *x);
                let mut out = null_mut();
                let null_out = inp.byte() == 255;
                let (sp, tp) = (self.drv(s), self.drv(t));
                // SAFETY: handles live or NULL; out NULL or valid.
                let rc = check(
                    unsafe { cowbackup_backup_start(sp, tp, o, if null_out { null_mut() } else { &mut out }) },
                    "backup_start",
                );
                trace!("backup_start {s} -> {t} opts {oi} ({:?}): {rc}", oo.map(|o| (o.sync, o.trusted, o.discards)));
                if rc == 0 {
                    assert!(!sp.is_null() && !tp.is_null() && sp != tp);
                    self.add_job(out, s, t, oo);
                }
            }
            8 | 9 | 10 => {
                // The host's write path: every running job of the device first, then the write.
                let i = inp.pick(5);
                let host = inp.byte() % 4 != 0;
                let Some(d) = self.drvs.get(i).and_then(|d| d.as_ref()) else {
                    // SAFETY: NULL handle.
                    assert_eq!(check(unsafe { cowbackup_cow_before_write(null_mut(), 0, 1) }, "hook"), -libc::EINVAL);
                    return;
                };
                let (p, id, size) = (d.p, d.id, d.size);
                let (off, len) = (inp.num(size), inp.num(size));
                let (fill, null_buf) = (inp.byte(), inp.byte() == 255);
                let mut ok = true;
                if host {
                    for j in self.jobs.iter().flatten() {
                        if j.src == id {
                            // SAFETY: live job.
                            let rc = check(unsafe { cowbackup_cow_before_write(j.p, off, len) }, "hook");
                            trace!("hook {off}+{len}: {rc}");
                            let in_range = off.checked_add(len).is_some_and(|e| e <= j.size);
                            if !in_range {
                                assert_eq!(rc, -libc::EINVAL, "hook accepted {off}+{len} of {}", j.size);
                            }
                            ok &= rc == 0;
                        }
                    }
                } else {
                    // A hook call alone, on any job.
                    let jp = self.job(inp.pick(4));
                    // SAFETY: live job or NULL.
                    check(unsafe { cowbackup_cow_before_write(jp, off, len) }, "hook");
                }
                if ok && len <= MAX_IO {
                    let buf = vec![fill; len as usize];
                    let bp = if null_buf { null() } else { buf.as_ptr() };
                    // SAFETY: live handle; buffer NULL or of len bytes.
                    let rc = check(unsafe { cowbackup_driver_write(p, off, bp.cast(), len as usize) }, "write");
                    trace!("write slot {i} {off}+{len} host {host}: {rc}");
                    if rc == 0 {
                        self.taint_device(id, !host);
                    }
                }
            }
            11 => {
                let j = self.job(inp.pick(4));
                let v = inp.value();
                // SAFETY: live job or NULL.
                let rc = unsafe {
                    match inp.pick(6) {
                        0 => check(cowbackup_job_pause(j), "pause"),
                        1 => check(cowbackup_job_resume(j), "resume"),
                        2 => check(cowbackup_job_cancel(j), "cancel"),
                        3 => check(cowbackup_job_set_speed(j, v), "set_speed"),
                        4 => check(cowbackup_job_complete(j), "complete"),
                        _ => {
                            let mut info = std::mem::zeroed::<cowbackup_job_info>();
                            let ip = if inp.flag() { null_mut() } else { &mut info as *mut _ };
                            check(cowbackup_job_query(j, ip), "query")
                        }
                    }
                };
                if j.is_null() {
                    assert_eq!(rc, -libc::EINVAL);
                }
            }
            12 => {
                let i = inp.pick(4);
                let finish = inp.flag();
                if i < 3 {
                    self.wait(i, finish);
                } else {
                    self.wait(99, finish);
                }
            }
            13 => {
                let i = inp.pick(3);
                self.free_job(i);
            }
            14 => {
                let j = self.job(inp.pick(4));
                let mut out = null_mut();
                let null_out = inp.byte() == 255;
                // SAFETY: live job or NULL; out NULL or valid.
                let rc = check(
                    unsafe { cowbackup_job_snapshot(j, if null_out { null_mut() } else { &mut out }) },
                    "snapshot",
                );
                if rc == 0 {
                    let slot = inp.pick(4);
                    self.put_drv(slot, out, Kind::View, true);
                }
            }
            15 | 16 => {
                // Direct driver calls with arbitrary arguments.
                let i = inp.pick(5);
                let d = self.drv(i);
                let size = self.drvs.get(i).and_then(|d| d.as_ref()).map_or(0, |d| d.size);
                let (off, len) = (inp.num(size), inp.num(size));
                // SAFETY: live handle or NULL; buffers NULL or of the length passed.
                unsafe {
                    match inp.pick(6) {
                        0 => {
                            let mut buf = vec![0u8; len.min(MAX_IO) as usize];
                            let (bp, n) = if len <= MAX_IO && inp.byte() != 255 {
                                (buf.as_mut_ptr(), len)
                            } else {
                                (null_mut(), len)
                            };
                            check(cowbackup_driver_read(d, off, bp.cast(), n as usize), "read");
                        }
                        1 => {
                            let (mut pnum, mut st) = (0u64, 0u32);
                            let rc = check(
                                cowbackup_driver_block_status(
                                    d,
                                    off,
                                    len,
                                    if inp.byte() == 255 { null_mut() } else { &mut pnum },
                                    &mut st,
                                ),
                                "block_status",
                            );
                            if rc == 0 {
                                assert!(pnum >= 1 && pnum <= len, "block_status pnum {pnum} of {len}");
                                assert_eq!(st & !(COWBACKUP_STATUS_DATA | COWBACKUP_STATUS_ZERO), 0);
                            }
                        }
                        2 => {
                            let rc = check(cowbackup_driver_discard(d, off, len), "discard");
                            if rc == 0 {
                                if let Some(id) = self.drvs.get(i).and_then(|d| d.as_ref()).map(|d| d.id) {
                                    self.taint_device(id, true);
                                }
                            }
                        }
                        3 => {
                            check(cowbackup_driver_flush(d), "flush");
                        }
                        4 => {
                            let mut s = 0;
                            check(cowbackup_driver_size(d, if inp.flag() { null_mut() } else { &mut s }), "size");
                        }
                        _ => {
                            let mut r = [cowbackup_range { offset: 0, len: 0 }; 4];
                            let mut n = 0usize;
                            let max = inp.pick(6);
                            let rp = if max <= 4 && inp.byte() != 255 { r.as_mut_ptr() } else { null_mut() };
                            let j = self.job(inp.pick(4));
                            check(
                                cowbackup_job_failed_ranges(j, rp, if rp.is_null() { max } else { max.min(4) }, &mut n),
                                "failed_ranges",
                            );
                        }
                    }
                }
            }
            17 | 18 => self.bitmap_step(inp),
            19 => {
                // Groups: up to 3 members from the slots (NULL entries included).
                let n = inp.pick(4);
                let mut srcs = Vec::new();
                let mut tgts = Vec::new();
                let mut opts = Vec::new();
                let mut idx = Vec::new();
                for _ in 0..n {
                    let (s, t, o) = (inp.pick(5), inp.pick(5), inp.pick(3));
                    srcs.push(self.drv(s));
                    tgts.push(self.drv(t));
                    opts.push(self.opt(o) as *const cowbackup_options);
                    idx.push((s, t, o));
                }
                let mut out = vec![null_mut(); n];
                let no_opts = inp.flag();
                // SAFETY: arrays of n entries (live or NULL handles); out valid for n.
                let rc = check(
                    unsafe {
                        cowbackup_backup_start_group(
                            n,
                            if inp.byte() == 255 { null() } else { srcs.as_ptr() },
                            tgts.as_ptr(),
                            if no_opts { null() } else { opts.as_ptr() },
                            if n == 0 { null_mut() } else { out.as_mut_ptr() },
                        )
                    },
                    "start_group",
                );
                if rc == 0 {
                    for (k, &(s, t, o)) in idx.iter().enumerate() {
                        let oo = if no_opts { None } else { self.opts.get(o).and_then(|x| *x) };
                        self.add_job(out[k], s, t, oo);
                    }
                }
            }
            20 => {
                // File drivers in the scratch directory (sparse, small).
                let name = self.dir.join(format!("f{}", inp.pick(2)));
                let c = cpath(name);
                let mut out = null_mut();
                let flags =
                    [0, COWBACKUP_OPEN_WRITE, COWBACKUP_CREATE_OVERWRITE, 64, COWBACKUP_OPEN_DIRECT][inp.pick(5)];
                let pp = if inp.byte() == 255 { null() } else { c.as_ptr() };
                // SAFETY: path NULL or a C string; out valid.
                let rc = unsafe {
                    if inp.flag() {
                        let size = inp.dev_size();
                        let size = if size > MAX_DEV && size != u64::MAX { 0 } else { size };
                        check(cowbackup_file_create(pp, size, flags, &mut out), "file_create")
                    } else {
                        check(cowbackup_file_open(pp, flags, &mut out), "file_open")
                    }
                };
                if rc == 0 {
                    let slot = inp.pick(4);
                    self.put_drv(slot, out, Kind::File, true);
                }
            }
            21 => {
                let m = cowbackup_last_error();
                assert!(!m.is_null());
                let v = cowbackup_version();
                // SAFETY: static NUL-terminated string.
                assert!(!unsafe { CStr::from_ptr(v) }.to_bytes().is_empty());
            }
            _ => {
                // Bad pointers the ABI promises to check: NULL everywhere.
                // SAFETY: NULL arguments only.
                unsafe {
                    let mut out = null_mut();
                    assert_eq!(check(cowbackup_memory_new(4096, null_mut()), "memory_new"), -libc::EINVAL);
                    assert_eq!(
                        check(cowbackup_backup_start(null_mut(), null_mut(), null(), &mut out), "start"),
                        -libc::EINVAL
                    );
                    assert_eq!(check(cowbackup_driver_size(null(), null_mut()), "size"), -libc::EINVAL);
                    assert_eq!(check(cowbackup_job_query(null(), null_mut()), "query"), -libc::EINVAL);
                    assert_eq!(check(cowbackup_bitmap_open(null(), &mut (null_mut())), "bitmap_open"), -libc::EINVAL);
                    cowbackup_driver_free(null_mut());
                    cowbackup_job_free(null_mut());
                    cowbackup_options_free(null_mut());
                    cowbackup_bitmap_free(null_mut());
                }
            }
        }
    }

    fn bitmap_step(&mut self, inp: &mut Input) {
        let i = inp.pick(3);
        let b = self.bm(i);
        // SAFETY: bitmaps live or NULL; out-pointers valid or NULL.
        unsafe {
            match inp.pick(11) {
                0 | 1 => {
                    let size = inp.dev_size();
                    let g = match inp.pick(8) {
                        7 => inp.value(),
                        k => [512, 4096, 65536, 1 << 31, 0, 3000, 1 << 32][k],
                    };
                    // The bits are allocated at once (fallibly: ENOMEM), but libFuzzer counts an
                    // allocation over its limit as a crash: keep valid geometries under 128 MiB.
                    let size = if g.is_power_of_two() && g >= 512 && size / g > 1 << 30 { MAX_DEV } else { size };
                    let mut out = null_mut();
                    let rc = if inp.byte() % 8 == 0 {
                        let c = cpath(self.dir.join(format!("bm{}", inp.pick(2))));
                        check(cowbackup_bitmap_create(c.as_ptr(), size.min(MAX_DEV << 8), g, &mut out), "bitmap_create")
                    } else {
                        check(cowbackup_bitmap_new(size, g, &mut out), "bitmap_new")
                    };
                    if rc == 0 && i < 2 {
                        if let Some(old) = self.bms[i].replace(out) {
                            cowbackup_bitmap_free(old);
                        }
                    } else if rc == 0 {
                        cowbackup_bitmap_free(out);
                    }
                }
                2 => {
                    let c = cpath(self.dir.join(format!("bm{}", inp.pick(2))));
                    let mut out = null_mut();
                    if check(cowbackup_bitmap_open(c.as_ptr(), &mut out), "bitmap_open") == 0 {
                        if i < 2 {
                            if let Some(old) = self.bms[i].replace(out) {
                                cowbackup_bitmap_free(old);
                            }
                        } else {
                            cowbackup_bitmap_free(out);
                        }
                    }
                }
                3 => {
                    let size = self.bm_size(b);
                    check(cowbackup_bitmap_mark(b, inp.num(size), inp.num(size)), "bitmap_mark");
                }
                4 => {
                    check(cowbackup_bitmap_clear(b), "bitmap_clear");
                }
                5 => {
                    check(cowbackup_bitmap_enable(b), "bitmap_enable");
                }
                6 => {
                    check(cowbackup_bitmap_disable(b), "bitmap_disable");
                }
                7 => {
                    let src = self.bm(inp.pick(3));
                    check(cowbackup_bitmap_merge(b, src), "bitmap_merge");
                }
                8 => {
                    let size = self.bm_size(b);
                    let (mut o, mut l) = (0u64, 0u64);
                    let from = inp.num(size);
                    let rc = check(
                        cowbackup_bitmap_next_dirty(
                            b,
                            from,
                            &mut o,
                            if inp.byte() == 255 { null_mut() } else { &mut l },
                        ),
                        "next_dirty",
                    );
                    if rc == 0 {
                        assert!(l == 0 || (o >= from && o + l <= size), "next_dirty({from}) = {o}+{l} of {size}");
                    }
                }
                9 => {
                    let mut info = std::mem::zeroed::<cowbackup_bitmap_info>();
                    let rc = check(cowbackup_bitmap_query(b, &mut info), "bitmap_query");
                    if rc == 0 {
                        assert!(info.count <= info.size);
                    }
                }
                _ => {
                    if i < 2 {
                        if let Some(old) = self.bms[i].take() {
                            cowbackup_bitmap_free(old);
                        }
                    }
                }
            }
        }
    }

    fn bm_size(&self, b: *mut cowbackup_bitmap) -> u64 {
        if b.is_null() {
            return 0;
        }
        // SAFETY: live bitmap.
        unsafe {
            let mut info = std::mem::zeroed::<cowbackup_bitmap_info>();
            check(cowbackup_bitmap_query(b, &mut info), "bitmap_query");
            info.size
        }
    }

    /// Free everything; every C driver must then have been released.
    fn teardown(&mut self) {
        for i in 0..self.jobs.len() {
            self.free_job(i);
        }
        for i in 0..self.drvs.len() {
            self.free_drv(i);
        }
        for o in self.opts.iter_mut() {
            if let Some(o) = o.take() {
                // SAFETY: live options.
                unsafe { cowbackup_options_free(o.p) };
            }
        }
        for b in self.bms.iter_mut() {
            if let Some(b) = b.take() {
                // SAFETY: live bitmap.
                unsafe { cowbackup_bitmap_free(b) };
            }
        }
        for d in self.orphans.drain(..) {
            // SAFETY: made by Box::into_raw; no handle or job uses its driver any more.
            drop(unsafe { Box::from_raw(d) });
        }
        assert_eq!(
            MADE.load(Ordering::SeqCst),
            RELEASED.load(Ordering::SeqCst),
            "a C driver was not released (or released twice) after every handle and job was freed"
        );
        if let Ok(rd) = std::fs::read_dir(&self.dir) {
            for e in rd.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let mut w = World::new();
    let mut steps = 0;
    while !inp.empty() && steps < 48 {
        w.step(&mut inp);
        steps += 1;
    }
    w.teardown();
});
