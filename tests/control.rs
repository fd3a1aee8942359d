//! Job control and error policies under the operator's hand and failing disks
//! (ported from QEMU iotests 055, 056, 124 and the copy-before-write tests).

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{assert_same, join_within, one_parked_worker, until, wait_end, wait_parked, Gate, Rng, SetOnDrop};
use cowbackup::{
    backup_start, BackupOptions, BlockDriver, CbwErrorAction, ErrorAction, ErrorKind, FaultDriver, FaultOp, FaultRule,
    Job, JobState, MemDriver, TraceAction, TraceEvent,
};

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;
/// Longest a test waits for a job to end before it fails.
const END: Duration = Duration::from_secs(60);

fn random_mem(size: u64, seed: u64) -> (Arc<MemDriver>, Vec<u8>) {
    let data = Rng::new(seed).bytes(size as usize);
    (Arc::new(MemDriver::from_bytes(&data).unwrap()), data)
}

fn paused(job: &Job) -> bool {
    job.info().state == JobState::Paused
}

/// iotest 055: pause, progress stays still, the hook works, resume, exact.
#[test]
fn iotest_055_pause_and_resume() {
    let size = 64 * MIB;
    let (source, data) = random_mem(size, 1);
    let target = Arc::new(MemDriver::new(size).unwrap());
    let opts = BackupOptions { speed: 32 * MIB, max_chunk: 256 * KIB, ..Default::default() };
    let job = backup_start(source.clone(), target.clone(), opts).unwrap();
    thread::sleep(Duration::from_millis(200));
    job.pause().unwrap();
    assert_eq!(job.info().state, JobState::Paused);
    thread::sleep(Duration::from_millis(100)); // chunks in flight finish
    let before = job.info().offset;
    thread::sleep(Duration::from_millis(500));
    assert_eq!(job.info().offset, before, "progress while paused");
    assert!(before < size);
    // The hook keeps working while paused: it copies an uncopied cluster.
    job.cow_before_write(size - 100, 10).unwrap();
    source.write_at(&[0xFF; 10], size - 100).unwrap();
    assert_eq!(job.info().cow_requests, 1);
    job.resume().unwrap();
    job.set_speed(0);
    wait_end(&job, END).unwrap();
    assert_same("target", &target.to_vec(), &data);
}

/// iotest 056: a target write error once, with `Stop`: paused with EIO, resume completes.
#[test]
fn iotest_056_target_error_stop_then_resume() {
    let size = 16 * MIB;
    let (source, data) = random_mem(size, 2);
    let target = Arc::new(FaultDriver::new(MemDriver::new(size).unwrap()));
    let rule = target.add(FaultRule::new(FaultOp::Write).range(5 * MIB, 1).errno(libc::EIO).times(1));
    let opts = BackupOptions { on_target_error: ErrorAction::Stop, ..Default::default() };
    let job = backup_start(source, target.clone(), opts).unwrap();
    until("pause on error", || paused(&job));
    let info = job.info();
    assert_eq!(info.error.as_ref().map(|e| e.errno()), Some(libc::EIO), "{info:?}");
    assert_eq!(target.fired(rule), 1);
    job.resume().unwrap();
    wait_end(&job, END).unwrap();
    assert!(job.info().error.is_none());
    assert_same("target", &target.inner().to_vec(), &data);
}

/// iotest 124: a source read error with `Report` fails the job; with `Ignore` only
/// the bad cluster is lost (a rescue copy).
#[test]
fn iotest_124_source_error_report_and_ignore() {
    let size = 8 * MIB;
    let bad = 5 * MIB + 3 * 64 * KIB; // one 64 KiB cluster
    for action in [ErrorAction::Report, ErrorAction::Ignore] {
        let (data_src, data) = random_mem(size, 3);
        let source = Arc::new(FaultDriver::new(data_src));
        source.add(FaultRule::new(FaultOp::Read).range(bad + 100, 1).errno(libc::EIO).forever());
        let target = Arc::new(MemDriver::new(size).unwrap());
        let opts = BackupOptions { on_source_error: action, ..Default::default() };
        let job = backup_start(source, target.clone(), opts).unwrap();
        let e = wait_end(&job, END).unwrap_err();
        assert_eq!(e.errno(), libc::EIO);
        let ctx = e.context().unwrap();
        assert_eq!(ctx.side, cowbackup::Side::Source);
        let info = job.info();
        assert_eq!(info.state, JobState::Failed);
        assert_eq!(info.error.as_ref().unwrap().errno(), libc::EIO);
        if action == ErrorAction::Ignore {
            assert_eq!(info.bytes_failed, 64 * KIB);
            assert_eq!(info.offset, size);
            assert_eq!(job.failed_ranges(), vec![(bad, 64 * KIB)]);
            let got = target.to_vec();
            let b = bad as usize;
            assert_same("before the bad cluster", &got[..b], &data[..b]);
            assert_same("after the bad cluster", &got[b + 65536..], &data[b + 65536..]);
        } else {
            assert!(info.offset < size);
            assert!(job.failed_ranges().is_empty());
        }
    }
}

#[test]
fn enospc_stops_on_enospc_and_reports_other_errors() {
    let size = 4 * MIB;
    for (errno, want) in [(libc::ENOSPC, JobState::Paused), (libc::EIO, JobState::Failed)] {
        let (source, data) = random_mem(size, 4);
        let target = Arc::new(FaultDriver::new(MemDriver::new(size).unwrap()));
        target.add(FaultRule::new(FaultOp::Write).range(MIB, 1).errno(errno).times(1));
        let opts = BackupOptions { on_target_error: ErrorAction::Enospc, ..Default::default() };
        let job = backup_start(source, target.clone(), opts).unwrap();
        until("the policy's state", || job.info().state == want);
        assert_eq!(job.info().error.unwrap().errno(), errno);
        if want == JobState::Paused {
            job.resume().unwrap();
            wait_end(&job, END).unwrap();
            assert_same("target", &target.inner().to_vec(), &data);
        } else {
            assert_eq!(wait_end(&job, END).unwrap_err().errno(), libc::EIO);
        }
    }
}

/// A copy-before-write error: `BreakGuestWrite` fails the write and keeps the
/// snapshot; `BreakSnapshot` lets the write go and fails the job.
#[test]
fn cbw_error_policies() {
    let size = 2 * MIB;
    // BreakGuestWrite.
    let (data_src, data) = random_mem(size, 5);
    let source = Gate::new(data_src, true); // hold the background copy back
    let target = Arc::new(FaultDriver::new(MemDriver::new(size).unwrap()));
    let rule = target.add(FaultRule::new(FaultOp::Write).range(MIB, 1).errno(libc::EIO).forever());
    let job = backup_start(source.clone(), target.clone(), one_parked_worker()).unwrap();
    let _open = source.open_on_drop(); // a failing assertion must not leave the worker parked
    wait_parked(&source);
    let e = job.cow_before_write(MIB, 4096).unwrap_err();
    assert_eq!(e.errno(), libc::EIO);
    assert_eq!(job.info().state, JobState::Running);
    target.remove(rule); // the fault clears; the host retries its write
    job.cow_before_write(MIB, 4096).unwrap();
    source.inner.write_at(&[9; 4096], MIB).unwrap();
    source.open();
    wait_end(&job, END).unwrap();
    assert_same("target", &target.inner().to_vec(), &data);

    // BreakSnapshot.
    let (data_src, _) = random_mem(size, 6);
    let source = Gate::new(data_src, true);
    let target = Arc::new(FaultDriver::new(MemDriver::new(size).unwrap()));
    target.add(FaultRule::new(FaultOp::Write).range(MIB, 1).errno(libc::EIO).forever());
    let opts = BackupOptions { on_cbw_error: CbwErrorAction::BreakSnapshot, ..one_parked_worker() };
    let job = backup_start(source.clone(), target, opts).unwrap();
    let _open2 = source.open_on_drop();
    wait_parked(&source);
    job.cow_before_write(MIB, 4096).unwrap();
    let before = job.info().cow_requests;
    job.cow_before_write(0, 4096).unwrap(); // a no-op now
    assert_eq!(job.info().cow_requests, before);
    source.open();
    assert_eq!(wait_end(&job, END).unwrap_err().errno(), libc::EIO);
    assert_eq!(job.info().state, JobState::Failed);
}

#[test]
fn cbw_timeout_returns_timed_out_in_time() {
    let size = 2 * MIB;
    let (source, data) = random_mem(size, 7);
    let target = Arc::new(FaultDriver::new(MemDriver::new(size).unwrap()));
    target.add(FaultRule::new(FaultOp::Write).range(MIB, 1).errno(0).delay(Duration::from_secs(2)).times(1));
    let opts = BackupOptions { cbw_timeout: Some(Duration::from_millis(500)), ..Default::default() };
    let job = backup_start(source.clone(), target.clone(), opts).unwrap();
    let t = Instant::now();
    let r = job.cow_before_write(MIB, 4096);
    let took = t.elapsed();
    // Either this hook copied the cluster itself (delayed 2 s) or waited for the worker
    // that is: both exceed the limit.
    let e = r.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
    assert_eq!(e.errno(), libc::ETIMEDOUT);
    assert!(took >= Duration::from_millis(450) && took < Duration::from_millis(1500), "took {took:?}");
    // The copy goes on; the snapshot stays valid; the retried hook succeeds.
    until("the delayed copy", || job.cow_before_write(MIB, 4096).is_ok());
    source.write_at(&[1; 4096], MIB).unwrap();
    wait_end(&job, END).unwrap();
    assert_same("target", &target.inner().to_vec(), &data);
}

#[test]
fn cancel_while_stopped_on_error() {
    let size = 4 * MIB;
    let (source, _) = random_mem(size, 8);
    let target = Arc::new(FaultDriver::new(MemDriver::new(size).unwrap()));
    target.add(FaultRule::new(FaultOp::Write).errno(libc::EIO).forever());
    let opts = BackupOptions { on_target_error: ErrorAction::Stop, ..Default::default() };
    let job = backup_start(source, target, opts).unwrap();
    until("pause on error", || paused(&job));
    job.cancel();
    assert_eq!(wait_end(&job, END).unwrap_err().kind(), ErrorKind::Cancelled);
    assert_eq!(job.info().state, JobState::Cancelled);
}

#[test]
fn cancel_while_a_hook_waits_on_a_claimed_cluster() {
    let size = 2 * MIB;
    let (data_src, _) = random_mem(size, 9);
    // The worker claims cluster 0 and its read is held at the gate until the test opens it.
    let source = Gate::new(data_src, true);
    let target = Arc::new(MemDriver::new(size).unwrap());
    let opts = BackupOptions { workers: 1, max_chunk: 64 * KIB, ..Default::default() };
    let job = backup_start(source.clone(), target, opts).unwrap();
    let _open = source.open_on_drop(); // a failing assertion must not leave the worker parked
    wait_parked(&source);
    assert_eq!(source.parked(), vec![(0, 64 * KIB)]);
    thread::scope(|s| {
        let _open = source.open_on_drop(); // before the scope joins the hook
        let hook = s.spawn(|| {
            let t = Instant::now();
            job.cow_before_write(0, 4096).unwrap();
            t.elapsed()
        });
        // The hook really waits on the worker's claim before the cancel.
        until("the hook to wait on the worker's claim of cluster 0", || job.info().cow_waits >= 1);
        thread::sleep(Duration::from_millis(100));
        assert!(!hook.is_finished(), "the hook returned while cluster 0 was being copied");
        job.cancel();
        let waited = join_within("the waiting hook to return after cancel", hook, Duration::from_secs(5));
        assert!(waited < Duration::from_millis(800), "the hook returned only after {waited:?}");
        // Released by the cancel: the worker's read is still held.
        assert_eq!(source.parked(), vec![(0, 64 * KIB)], "the hook returned because the copy ended");
        assert_eq!(job.info().cow_requests, 0, "the cancelled hook copied nothing");
        source.open();
    });
    assert_eq!(wait_end(&job, END).unwrap_err().kind(), ErrorKind::Cancelled);
}

#[test]
fn completion_callback_once_for_each_end_state() {
    let size = 2 * MIB;
    for end in [JobState::Completed, JobState::Failed, JobState::Cancelled] {
        let (data_src, _) = random_mem(size, 10);
        let source = Arc::new(FaultDriver::new(data_src));
        if end == JobState::Failed {
            source.add(FaultRule::new(FaultOp::Read).errno(libc::EIO).forever());
        }
        let target = Arc::new(MemDriver::new(size).unwrap());
        let calls = Arc::new(Mutex::new(Vec::new()));
        let c = calls.clone();
        let opts = BackupOptions {
            speed: if end == JobState::Cancelled { 64 * KIB } else { 0 },
            on_complete: Some(Arc::new(move |r: &cowbackup::Result<()>| {
                c.lock().unwrap().push(r.as_ref().map_err(|e| e.errno()).copied());
            })),
            ..Default::default()
        };
        let job = backup_start(source, target, opts).unwrap();
        if end == JobState::Cancelled {
            job.cancel();
        }
        // Job::wait itself, bounded: on another thread, joined within END.
        let r = thread::scope(|s| join_within("Job::wait", s.spawn(|| job.wait()), END));
        // wait returns after the callback has returned.
        let got = calls.lock().unwrap().clone();
        let want = match end {
            JobState::Completed => Ok(()),
            JobState::Failed => Err(libc::EIO),
            _ => Err(libc::ECANCELED),
        };
        assert_eq!(got, vec![want], "{end:?}");
        assert_eq!(r.map_err(|e| e.errno()), want);
        assert_eq!(job.info().state, end);
        drop(job);
        assert_eq!(calls.lock().unwrap().len(), 1);
    }
}

/// Offset after `t` of running, measured from a start sample.
fn rate(job: &Job, over: Duration) -> f64 {
    let (t0, o0) = (Instant::now(), job.info().offset);
    thread::sleep(over);
    (job.info().offset - o0) as f64 / t0.elapsed().as_secs_f64()
}

#[test]
fn speed_limit_holds_and_changes_while_running() {
    let size = 256 * MIB;
    let source = Arc::new(MemDriver::from_bytes(&vec![0x11; size as usize]).unwrap());
    let target = Arc::new(MemDriver::new(size).unwrap());
    let opts = BackupOptions { speed: 8 * MIB, max_chunk: 64 * KIB, ..Default::default() };
    let job = backup_start(source, target, opts).unwrap();
    thread::sleep(Duration::from_millis(300));
    let r = rate(&job, Duration::from_secs(2)) / MIB as f64;
    assert!((7.2..=8.8).contains(&r), "throttled at 8 MiB/s, copied {r:.2} MiB/s");
    job.set_speed(16 * MIB);
    assert_eq!(job.info().speed, 16 * MIB);
    thread::sleep(Duration::from_millis(300));
    let r = rate(&job, Duration::from_secs(2)) / MIB as f64;
    assert!((14.4..=17.6).contains(&r), "throttled at 16 MiB/s, copied {r:.2} MiB/s");
    // The hook is never throttled: 8 MiB through it at once, under a 1 MiB/s limit
    // (throttled, it would take 8 s; the bound leaves room for a loaded machine).
    job.set_speed(MIB);
    let t = Instant::now();
    job.cow_before_write(size - 8 * MIB, 8 * MIB).unwrap();
    assert!(t.elapsed() < Duration::from_secs(4), "hook throttled: {:?}", t.elapsed());
    job.cancel();
}

/// `set_speed` called again and again (an operator's control loop re-applying its limit)
/// must not lift the limit: each call may not grant a fresh burst.
#[test]
fn repeated_set_speed_keeps_the_limit() {
    let size = 256 * MIB;
    let source = Arc::new(MemDriver::from_bytes(&vec![0x11; size as usize]).unwrap());
    let target = Arc::new(MemDriver::new(size).unwrap());
    let opts = BackupOptions { speed: 8 * MIB, max_chunk: 64 * KIB, ..Default::default() };
    let job = backup_start(source, target, opts).unwrap();
    thread::sleep(Duration::from_millis(300));
    let (t0, o0) = (Instant::now(), job.info().offset);
    while t0.elapsed() < Duration::from_secs(2) {
        job.set_speed(8 * MIB);
        thread::sleep(Duration::from_millis(10));
    }
    let r = (job.info().offset - o0) as f64 / t0.elapsed().as_secs_f64() / MIB as f64;
    job.cancel();
    assert!(r <= 10.0, "limited to 8 MiB/s, re-applied every 10 ms: copied {r:.1} MiB/s");
}

#[test]
fn trace_events_reach_the_sink() {
    let size = 2 * MIB;
    let (data_src, _) = random_mem(size, 11);
    data_src.write_at(&vec![0; 128 * KIB as usize], size - 128 * KIB).unwrap(); // two zero clusters
    let source = Gate::new(data_src, true);
    let target = Arc::new(FaultDriver::new(MemDriver::new(size).unwrap()));
    target.add(FaultRule::new(FaultOp::Write).range(MIB, 1).errno(libc::EIO).times(1));
    let events = Arc::new(Mutex::new(Vec::new()));
    let ev = events.clone();
    let opts = BackupOptions {
        trace: Some(Arc::new(move |e: &TraceEvent| ev.lock().unwrap().push(e.clone()))),
        ..one_parked_worker()
    };
    let job = backup_start(source.clone(), target, opts).unwrap();
    let _open = source.open_on_drop();
    wait_parked(&source);
    assert!(job.cow_before_write(MIB, 10).is_err());
    job.cow_before_write(MIB, 10).unwrap();
    job.cow_before_write(MIB, 10).unwrap(); // fast path: no event
    job.pause().unwrap();
    job.resume().unwrap();
    source.open();
    wait_end(&job, END).unwrap();
    let ev = events.lock().unwrap();
    let lines: Vec<String> = ev.iter().map(|e| e.to_string()).collect();
    let count = |f: &dyn Fn(&TraceEvent) -> bool| ev.iter().filter(|e| f(e)).count();
    assert_eq!(count(&|e| matches!(e, TraceEvent::HookBegin { .. })), 2, "{lines:#?}");
    assert_eq!(count(&|e| matches!(e, TraceEvent::HookEnd { errno: libc::EIO, .. })), 1, "{lines:#?}");
    assert_eq!(
        count(&|e| matches!(e, TraceEvent::Error { action: TraceAction::BreakGuestWrite, .. })),
        1,
        "{lines:#?}"
    );
    assert_eq!(count(&|e| matches!(e, TraceEvent::ChunkCopied { hook: true, .. })), 1);
    let zero: Vec<(u64, u64)> = ev
        .iter()
        .filter_map(|e| match e {
            TraceEvent::ZeroClusters { offset, len, .. } => Some((*offset, *len)),
            _ => None,
        })
        .collect();
    // The two zero clusters, in one event or one per chunk.
    assert_eq!(zero.iter().map(|z| z.1).sum::<u64>(), 128 * KIB, "{lines:#?}");
    assert!(zero.iter().all(|&(o, l)| o >= size - 128 * KIB && o + l <= size), "{lines:#?}");
    assert!(count(&|e| matches!(e, TraceEvent::ChunkCopied { hook: false, .. })) >= 1);
    let states: Vec<(JobState, JobState)> = ev
        .iter()
        .filter_map(|e| match e {
            TraceEvent::StateChanged { from, to, .. } => Some((*from, *to)),
            _ => None,
        })
        .collect();
    assert_eq!(
        states,
        vec![
            (JobState::Running, JobState::Paused),
            (JobState::Paused, JobState::Running),
            (JobState::Running, JobState::Completed)
        ]
    );
    assert!(lines.iter().any(|l| l.starts_with("cbw_end job=") && l.contains("errno=5")), "{lines:#?}");
}

/// Chaos: writers through the hook, random pauses, resumes and speed changes, and
/// transient target errors with `Stop` plus an operator that resumes; exact at the end.
#[test]
fn stress_with_pauses_speed_changes_and_transient_errors() {
    for round in 0..3u64 {
        let size = 24 * MIB + 4097;
        let (source, data) = random_mem(size, 100 + round);
        let target = Arc::new(FaultDriver::new(MemDriver::new(size).unwrap()));
        target.add(FaultRule::new(FaultOp::Write).range(size / 2, 1).errno(libc::EIO).times(1));
        let opts = BackupOptions {
            cluster_size: [4096, 65536, MIB][round as usize],
            workers: 1 + round as usize,
            on_target_error: ErrorAction::Stop,
            on_source_error: ErrorAction::Stop,
            speed: 48 * MIB,
            ..Default::default()
        };
        let job = backup_start(source.clone(), target.clone(), opts).unwrap();
        let done = AtomicBool::new(false);
        let hook_errors = AtomicU64::new(0);
        thread::scope(|s| {
            for w in 0..3u64 {
                let (job, source, done, hook_errors) = (&job, &source, &done, &hook_errors);
                s.spawn(move || {
                    let mut rng = Rng::new(round * 10 + w);
                    while !done.load(Ordering::Relaxed) {
                        let len = 1 + rng.below(200 * KIB);
                        let off = rng.below(size - len + 1);
                        // A failed hook fails the guest write: retry it, write only after Ok.
                        while let Err(e) = job.cow_before_write(off, len) {
                            assert_eq!(e.kind(), ErrorKind::Io, "{e}");
                            hook_errors.fetch_add(1, Ordering::Relaxed);
                            thread::sleep(Duration::from_millis(1));
                        }
                        source.write_at(&rng.bytes(len as usize), off).unwrap();
                    }
                });
            }
            // The operator: pauses, resumes, speed changes, faults; resumes after errors.
            let (job, target, done) = (&job, &target, &done);
            s.spawn(move || {
                let mut rng = Rng::new(999 + round);
                while job.wait_timeout(Duration::from_millis(20)).is_none() {
                    match rng.below(6) {
                        0 => job.pause().unwrap(),
                        1 | 2 => {
                            let _ = job.resume();
                        }
                        3 => job.set_speed(rng.below(4) * 32 * MIB),
                        _ => {
                            // Somewhere the copy has probably not reached yet.
                            let done = job.info().offset.min(size - 1);
                            let off = done + rng.below(size - done);
                            target.add(FaultRule::new(FaultOp::Any).range(off, 1).errno(libc::EIO).times(1));
                        }
                    }
                }
                done.store(true, Ordering::Relaxed);
            });
        });
        wait_end(&job, END).unwrap();
        assert!(target.injected() > 0, "no fault was injected");
        assert_same("target", &target.inner().to_vec(), &data);
    }
}

/// Fleecing (`sync=None`) ends `Failed` when a hook breaks the snapshot.
#[test]
fn sync_none_fails_on_break_snapshot() {
    let size = MIB;
    let (source, _) = random_mem(size, 12);
    let target = Arc::new(FaultDriver::new(MemDriver::new(size).unwrap()));
    target.add(FaultRule::new(FaultOp::Write).errno(libc::EIO).forever());
    let opts = BackupOptions {
        sync: cowbackup::SyncMode::None,
        on_cbw_error: CbwErrorAction::BreakSnapshot,
        ..Default::default()
    };
    let job = backup_start(source, target, opts).unwrap();
    job.cow_before_write(0, 10).unwrap();
    let e = job.wait_timeout(Duration::from_secs(5)).expect("the job must end").unwrap_err();
    assert_eq!(e.errno(), libc::EIO);
    assert_eq!(job.info().state, JobState::Failed);
}

/// The errno the fault rules of the tests below inject: unusual enough that a failure
/// with it is the injected one, not some other error.
const INJECTED: i32 = libc::EREMOTEIO;

/// How a job gets its fatal error in [`failing_while_busy`].
#[derive(Debug, Clone, Copy)]
enum Fatal {
    /// A background target write fails under `Report`.
    Report,
    /// A hook's copy fails under `BreakSnapshot`.
    BreakSnapshot,
}

/// A job with a fatal error recorded while a worker is still busy (its read held at the
/// gate), so the job has not ended yet. Dropping it opens the gate before the job.
struct Busy {
    _open: common::GateGuard<Arc<MemDriver>>,
    job: Job,
    gate: Arc<Gate<Arc<MemDriver>>>,
}

fn failing_while_busy(cause: Fatal) -> Busy {
    let size = 4 * MIB;
    let (data_src, _) = random_mem(size, 30);
    let gate = Gate::new(data_src, true);
    let target = Arc::new(FaultDriver::new(MemDriver::new(size).unwrap()));
    let mut opts = BackupOptions { workers: 2, max_chunk: 64 * KIB, ..Default::default() };
    match cause {
        Fatal::Report => {
            // One worker parks on cluster 0; the other copies cluster 1 and fails.
            gate.hold_only(0, 64 * KIB);
            target.add(FaultRule::new(FaultOp::Write).range(64 * KIB, 1).errno(INJECTED).forever());
        }
        Fatal::BreakSnapshot => {
            // Both workers park (clusters 0 and 1); a hook's copy of cluster 16 fails.
            opts.on_cbw_error = CbwErrorAction::BreakSnapshot;
            target.add(FaultRule::new(FaultOp::Write).range(MIB, 1).errno(INJECTED).forever());
        }
    }
    let job = backup_start(gate.clone(), target, opts).unwrap();
    let open = gate.open_on_drop();
    match cause {
        Fatal::Report => wait_parked(&gate),
        Fatal::BreakSnapshot => {
            common::wait_parked_n(&gate, 2);
            job.cow_before_write(MIB, 4096).expect("BreakSnapshot: the hook returns Ok and fails the job");
        }
    }
    until("the fatal error", || job.info().error.is_some());
    let info = job.info();
    assert_eq!(info.error.as_ref().map(|e| e.errno()), Some(INJECTED), "{cause:?}: {info:?}");
    assert!(!info.state.is_terminal(), "{cause:?}: a worker is still busy, the job cannot have ended: {info:?}");
    assert!(!gate.parked().is_empty());
    Busy { _open: open, job, gate }
}

/// A fatal error is final: `resume` (which retries after a `Stop` error) must not clear
/// it, even while a worker is still busy, and the job ends `Failed` with it — not
/// `Completed` with clusters missing.
#[test]
fn resume_after_a_fatal_error_while_a_worker_is_busy_keeps_the_failure() {
    let mut problems = Vec::new(); // both causes run; every problem is reported
    for cause in [Fatal::Report, Fatal::BreakSnapshot] {
        let b = failing_while_busy(cause);
        let _ = b.job.resume(); // refused or not: either way the failure stands
        let after_resume = b.job.info();
        b.gate.open();
        let r = wait_end(&b.job, END).map_err(|e| e.errno());
        let info = b.job.info();
        if r != Err(INJECTED) || info.state != JobState::Failed {
            problems.push(format!("{cause:?}: ended {r:?}, not Err({INJECTED}) (Failed): {info:?}"));
        }
        if info.state == JobState::Completed && info.offset < info.len {
            problems.push(format!("{cause:?}: Completed with {} of {} bytes done", info.offset, info.len));
        }
        if after_resume.error.as_ref().map(|e| e.errno()) != Some(INJECTED) {
            problems.push(format!("{cause:?}: resume cleared the fatal error: {after_resume:?}"));
        }
    }
    assert!(problems.is_empty(), "a fatal error must stay final through resume:\n{}", problems.join("\n"));
}

/// `cancel` has no effect on a job that has failed: its result stays the failure, both
/// once it has ended and while a worker is still finishing.
#[test]
fn cancel_of_a_failed_job_keeps_the_failure() {
    // Ended.
    let size = 2 * MIB;
    let (data_src, _) = random_mem(size, 31);
    let source = Arc::new(FaultDriver::new(data_src));
    source.add(FaultRule::new(FaultOp::Read).range(MIB, 1).errno(INJECTED).forever());
    let job = backup_start(source, Arc::new(MemDriver::new(size).unwrap()), BackupOptions::default()).unwrap();
    assert_eq!(wait_end(&job, END).map_err(|e| e.errno()), Err(INJECTED));
    job.cancel();
    assert_eq!(wait_end(&job, END).map_err(|e| e.errno()), Err(INJECTED), "cancel changed an ended job's result");
    let info = job.info();
    assert_eq!(info.state, JobState::Failed);
    assert_eq!(info.error.as_ref().map(|e| e.errno()), Some(INJECTED), "{info:?}");

    // Failed, a worker still busy.
    let mut problems = Vec::new(); // both causes run; every problem is reported
    for cause in [Fatal::Report, Fatal::BreakSnapshot] {
        let b = failing_while_busy(cause);
        b.job.cancel();
        b.gate.open();
        let r = wait_end(&b.job, END).map_err(|e| e.errno());
        let info = b.job.info();
        if r != Err(INJECTED) || info.state != JobState::Failed {
            problems.push(format!("{cause:?}: ended {r:?}, not Err({INJECTED}) (Failed): {info:?}"));
        }
    }
    assert!(problems.is_empty(), "a job that has failed must not end cancelled:\n{}", problems.join("\n"));
}

/// Errnos the chaos test injects (ENOSPC: so `Enospc` stops on some and reports others).
const CHAOS_ERRNOS: [i32; 2] = [INJECTED, libc::ENOSPC];

/// Chaos with every policy: per round random `on_source_error` / `on_target_error`
/// (Report, Stop, Ignore, Enospc) and `on_cbw_error` (BreakGuestWrite, BreakSnapshot), sync
/// Full or Top, writers through the hook, faults injected at random (reads, writes,
/// write_zeroes, flushes; background copy and hooks), and an operator who pauses,
/// resumes, changes the speed and in some rounds cancels, at random times; in half the
/// rounds an automated operator also resumes as soon as it sees an error. Whatever
/// happens: a job that reports success produced the exact point-in-time image; a job
/// that failed did so with an injected errno, or was cancelled after a cancel.
///
/// The seed is random per run (printed in every failure); `COWBACKUP_CHAOS_SEED` replays
/// one, `COWBACKUP_CHAOS_ROUNDS` (default 12) sets the number of rounds.
#[test]
fn chaos_every_policy_with_an_operator() {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let seed = env("COWBACKUP_CHAOS_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    let rounds = env("COWBACKUP_CHAOS_ROUNDS").unwrap_or(12);
    eprintln!("chaos: COWBACKUP_CHAOS_SEED={seed} COWBACKUP_CHAOS_ROUNDS={rounds}");
    let mut outcomes = Vec::new();
    for round in 0..rounds {
        outcomes.push(chaos_round(seed.wrapping_add(round)));
    }
    eprintln!("chaos: outcomes {outcomes:#?}");
}

fn chaos_round(seed: u64) -> String {
    let mut rng = Rng::new(seed);
    let size = 4 * MIB + 4097;
    let pick = |rng: &mut Rng| {
        [ErrorAction::Report, ErrorAction::Stop, ErrorAction::Ignore, ErrorAction::Enospc][rng.below(4) as usize]
    };
    let opts = BackupOptions {
        cluster_size: [4096, 16 * KIB, 64 * KIB][rng.below(3) as usize],
        workers: 1 + rng.below(3) as usize,
        max_chunk: [64 * KIB, 256 * KIB, MIB][rng.below(3) as usize],
        sync: [cowbackup::SyncMode::Full, cowbackup::SyncMode::Top][rng.below(2) as usize],
        speed: [2 * MIB, 4 * MIB, 8 * MIB][rng.below(3) as usize],
        on_source_error: pick(&mut rng),
        on_target_error: pick(&mut rng),
        on_cbw_error: [CbwErrorAction::BreakGuestWrite, CbwErrorAction::BreakSnapshot][rng.below(2) as usize],
        ..Default::default()
    };
    let opts_summary = (opts.on_source_error, opts.on_target_error, opts.on_cbw_error, opts.workers);
    let will_cancel = rng.below(4) == 0;
    let auto_resume = rng.below(2) == 0;
    let what =
        format!("COWBACKUP_CHAOS_SEED={seed} (one round): {opts:?}, cancel {will_cancel}, auto-resume {auto_resume}");

    // The source: random data, some zero clusters and holes (unallocated: skipped by Top).
    let (mem, _) = random_mem(size, seed);
    for _ in 0..8 {
        let off = rng.below(size / (64 * KIB)) * 64 * KIB;
        mem.write_zeroes_at(off, (64 * KIB * (1 + rng.below(4))).min(size - off)).unwrap();
        // and zeroes written as data
        let off = rng.below(size / (64 * KIB)) * 64 * KIB;
        mem.write_at(&vec![0; (64 * KIB).min(size - off) as usize], off).unwrap();
    }
    let data = mem.to_vec();
    // Job reads take a little time: other workers are busy when one fails.
    let slow = Gate::new(mem.clone(), false);
    slow.slow_job_reads(Duration::from_millis(1));
    let source = Arc::new(FaultDriver::new(slow));
    let target = Arc::new(FaultDriver::new(if rng.below(2) == 0 {
        MemDriver::new(size).unwrap()
    } else {
        MemDriver::from_bytes(&vec![0xEE; size as usize]).unwrap()
    }));
    let start = Instant::now();
    let job = backup_start(source.clone(), target.clone(), opts).unwrap();
    let cancelled = AtomicBool::new(false);
    let done = AtomicBool::new(false);
    let result = thread::scope(|s| {
        let _done = SetOnDrop(&done);
        let (job, source, target, done, cancelled, what, mem) =
            (&job, &source, &target, &done, &cancelled, &what, &mem);
        for w in 0..2u64 {
            s.spawn(move || {
                let mut rng = Rng::new(seed.wrapping_mul(31).wrapping_add(w));
                while !done.load(Ordering::Relaxed) {
                    // Paced, so the background copy (and its faults) does most of the work.
                    thread::sleep(Duration::from_millis(2 + rng.below(10)));
                    let len = 1 + rng.below(16 * KIB);
                    let off = rng.below(size - len + 1);
                    // A failed hook fails the guest write: retry it, write only after Ok.
                    let mut ok = false;
                    while !done.load(Ordering::Relaxed) {
                        match job.cow_before_write(off, len) {
                            Ok(()) => {
                                ok = true;
                                break;
                            }
                            Err(e) => {
                                assert!(CHAOS_ERRNOS.contains(&e.errno()), "{what}: hook failed with {e}");
                                thread::sleep(Duration::from_millis(1));
                            }
                        }
                    }
                    if ok {
                        mem.write_at(&rng.bytes(len as usize), off).unwrap();
                    }
                }
            });
        }
        if auto_resume {
            s.spawn(move || {
                while !done.load(Ordering::Relaxed) && job.wait_timeout(Duration::from_micros(200)).is_none() {
                    if job.info().error.is_some() {
                        let _ = job.resume();
                    }
                }
            });
        }
        // The operator.
        s.spawn(move || {
            let mut rng = Rng::new(seed ^ 0x0123_4567_89ab_cdef);
            let start = Instant::now();
            let cancel_at = Duration::from_millis(rng.below(500));
            let mut faults = 0;
            while !done.load(Ordering::Relaxed) && job.wait_timeout(Duration::from_millis(1 + rng.below(8))).is_none() {
                if will_cancel && start.elapsed() >= cancel_at && !cancelled.load(Ordering::Relaxed) {
                    cancelled.store(true, Ordering::SeqCst);
                    job.cancel();
                }
                if start.elapsed() > Duration::from_secs(3) {
                    // Enough: let it finish.
                    let _ = job.resume();
                    job.set_speed(0);
                    continue;
                }
                match rng.below(10) {
                    0 => {
                        let _ = job.pause();
                    }
                    1 | 2 => {
                        let _ = job.resume();
                    }
                    3 if rng.below(4) == 0 => job.set_speed([2 * MIB, 4 * MIB, 8 * MIB][rng.below(3) as usize]),
                    4 | 5 if faults < 4 => {
                        faults += 1;
                        let errno = CHAOS_ERRNOS[rng.below(2) as usize];
                        // Mostly where the copy has probably not been yet.
                        let progress = job.info().offset.min(size - 1);
                        let off =
                            if rng.below(4) == 0 { rng.below(size) } else { progress + rng.below(size - progress) };
                        match rng.below(10) {
                            0..=3 => source.add(FaultRule::new(FaultOp::Read).range(off, 1).errno(errno).times(1)),
                            4..=8 => target.add(FaultRule::new(FaultOp::Any).range(off, 1).errno(errno).times(1)),
                            _ => target.add(FaultRule::new(FaultOp::Flush).errno(errno).times(1)),
                        };
                    }
                    _ => {}
                }
            }
        });
        let r = wait_end(job, END);
        done.store(true, Ordering::Relaxed);
        r
    });
    let info = job.info();
    let outcome = format!(
        "{} in {:?}, {} faults fired, {} hook copies ({:?}/{:?}/{:?}, {} workers, auto-resume {auto_resume})",
        match &result {
            Ok(()) => "completed".to_string(),
            Err(e) => e.to_string(),
        },
        start.elapsed(),
        source.injected() + target.injected(),
        info.cow_requests,
        opts_summary.0,
        opts_summary.1,
        opts_summary.2,
        opts_summary.3,
    );
    match result {
        Ok(()) => {
            assert_same(
                &format!("{what}: completed ({info:?}), so the target must be the point in time"),
                &target.inner().to_vec(),
                &data,
            );
            assert_eq!(info.state, JobState::Completed, "{what}: {info:?}");
            assert_eq!(info.offset, size, "{what}: {info:?}");
        }
        Err(e) if e.kind() == ErrorKind::Cancelled => {
            assert!(cancelled.load(Ordering::SeqCst), "{what}: cancelled, but nobody cancelled: {info:?}");
            assert_eq!(info.state, JobState::Cancelled, "{what}: {info:?}");
        }
        Err(e) => {
            assert!(CHAOS_ERRNOS.contains(&e.errno()), "{what}: failed with {e}, not with an injected error");
            assert_eq!(info.state, JobState::Failed, "{what}: {info:?}");
            assert!(source.injected() + target.injected() > 0, "{what}: failed without a fault: {e}");
        }
    }
    outcome
}
