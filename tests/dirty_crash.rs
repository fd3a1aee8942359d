//! Crash safety of persistent dirty bitmaps:
//! - on the power-loss simulator, many threads marking, crashes at random operations;
//! - with real processes: a child marks a bitmap file and reports each mark that returned,
//!   the parent kills it with SIGKILL at a random moment and checks the file;
//! - one opener across processes (flock).
//!
//! The child is this test binary itself, run with `COWBACKUP_DIRTY_CHILD` set.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Rng;
use cowbackup::{CrashDriver, DirtyBitmap};

const CHILD_ENV: &str = "COWBACKUP_DIRTY_CHILD";
const SIZE: u64 = 1 << 32;
const G: u64 = 4096;

/// True when every granule of `[off, off + len)` is dirty.
fn present(bm: &DirtyBitmap, off: u64, len: u64) -> bool {
    let s = off / bm.granularity() * bm.granularity();
    matches!(bm.next_dirty(s), Some((o, l)) if o == s && o + l >= off + len)
}

#[test]
fn random_marks_from_threads_survive_power_loss() {
    let iterations = if cfg!(debug_assertions) { 100 } else { 1200 };
    let t0 = Instant::now();
    let (mut kept, mut torn, mut dropped, mut checked) = (0, 0, 0, 0);
    // COWBACKUP_CRASH_SEED=n shifts every seed, for longer runs: `for n in $(seq 100); do ...`.
    let base: u64 = std::env::var("COWBACKUP_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    for it in (0..iterations).map(|i| i + base * iterations) {
        let d = Arc::new(CrashDriver::with_seed(DirtyBitmap::file_size(SIZE, G).unwrap(), it).unwrap());
        let bm = DirtyBitmap::create_on(d.clone(), SIZE, G).unwrap();
        // Some durable state first, sometimes cleared, so crashes also hit pages of an
        // older epoch and a header written since creation.
        for i in 0..it % 5 {
            bm.mark(i * 1_000_003 * G % SIZE, G).unwrap();
        }
        if it % 3 == 0 {
            bm.clear().unwrap();
        }
        let clock = Arc::new(AtomicU64::new(1));
        let last_clear = Arc::new(AtomicU64::new(0));
        let marks = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        d.crash_after(5 + it % 53);
        let threads: Vec<_> = (0..3u64)
            .map(|t| {
                let (bm, clock, last_clear, marks, stop) =
                    (bm.clone(), clock.clone(), last_clear.clone(), marks.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut rng = Rng::new(it * 7 + t);
                    let other = DirtyBitmap::new(SIZE, 1 << 20).unwrap();
                    for i in 0..60 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        if t == 0 && i % 15 == 14 {
                            // clear (removes bits) or merge (adds, durably)
                            let r = if rng.below(2) == 0 {
                                let r = bm.clear();
                                last_clear.fetch_max(clock.fetch_add(1, Ordering::SeqCst), Ordering::SeqCst);
                                r
                            } else {
                                other.mark(rng.below(SIZE), 1).unwrap();
                                let start = clock.fetch_add(1, Ordering::SeqCst);
                                let r = bm.merge(&other);
                                if r.is_ok() {
                                    let (o, l) = other.next_dirty(0).unwrap();
                                    marks.lock().unwrap().push((start, o, l));
                                }
                                r
                            };
                            if r.is_err() {
                                stop.store(true, Ordering::Relaxed);
                            }
                            continue;
                        }
                        let off = rng.below(SIZE);
                        // Now and then a mark spanning pages (one multi-sector write to tear).
                        let max = if rng.below(4) == 0 { 1 << 26 } else { 1 << 20 };
                        let len = 1 + rng.below((SIZE - off).min(max));
                        let start = clock.fetch_add(1, Ordering::SeqCst);
                        match bm.mark(off, len) {
                            Ok(()) => marks.lock().unwrap().push((start, off, len)),
                            Err(_) => stop.store(true, Ordering::Relaxed),
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        d.crash(); // when the armed crash has not happened yet
        let r = d.last_crash().unwrap();
        kept += r.kept;
        torn += r.torn;
        dropped += r.dropped;
        drop(bm);
        d.restart();
        let bm =
            DirtyBitmap::open_on(d.clone()).unwrap_or_else(|e| panic!("iteration {it}: rejected after a crash: {e}"));
        let cleared = last_clear.load(Ordering::SeqCst);
        for &(start, off, len) in marks.lock().unwrap().iter() {
            if start > cleared {
                checked += 1;
                assert!(present(&bm, off, len), "iteration {it}: mark {off}+{len} returned but was lost");
            }
        }
    }
    println!(
        "{iterations} crashes in {:?}: {checked} returned marks checked; unflushed writes kept {kept}, torn {torn}, dropped {dropped}",
        t0.elapsed()
    );
    assert!(torn > 0 && dropped > 0 && kept > 0);
}

// ---- real processes ----

/// The child's side: open the bitmap named by `COWBACKUP_DIRTY_CHILD` and, in `marks` mode,
/// mark random ranges from 3 threads forever, printing `MARK off len` after each returned
/// mark; in `hold` mode print `OPEN` and wait to be killed. Does nothing in a normal run.
#[test]
fn child_process() {
    let Ok(path) = std::env::var(CHILD_ENV) else { return };
    let mode = std::env::var("COWBACKUP_DIRTY_MODE").unwrap_or_default();
    let seed: u64 = std::env::var("COWBACKUP_DIRTY_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let bm = DirtyBitmap::open(&path).unwrap();
    let out = Arc::new(Mutex::new(std::io::stdout()));
    if mode == "hold" {
        let mut o = out.lock().unwrap();
        writeln!(o, "\nOPEN").unwrap();
        o.flush().unwrap();
        drop(o);
        std::thread::sleep(Duration::from_secs(600));
        return;
    }
    let threads: Vec<_> = (0..3u64)
        .map(|t| {
            let (bm, out) = (bm.clone(), out.clone());
            std::thread::spawn(move || {
                let mut rng = Rng::new(seed * 3 + t);
                loop {
                    let off = rng.below(SIZE);
                    let len = 1 + rng.below((SIZE - off).min(1 << 20));
                    bm.mark(off, len).unwrap();
                    // One write(2) per line: whole in the pipe even if killed right after.
                    let line = format!("\nMARK {off} {len}\n");
                    let mut o = out.lock().unwrap();
                    o.write_all(line.as_bytes()).unwrap();
                    o.flush().unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

fn spawn_child(path: &std::path::Path, mode: &str, seed: u64) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["child_process", "--exact", "--nocapture", "--test-threads", "1"])
        .env(CHILD_ENV, path)
        .env("COWBACKUP_DIRTY_MODE", mode)
        .env("COWBACKUP_DIRTY_SEED", seed.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn sigkill_loses_no_reported_mark() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(42);
    let mut total = 0;
    for it in 0..50u64 {
        let path = dir.path().join(format!("b{it}"));
        {
            let bm = DirtyBitmap::create(&path, SIZE, G).unwrap();
            bm.mark(0, 1).unwrap();
        }
        let mut child = spawn_child(&path, "marks", it);
        let stdout = child.stdout.take().unwrap();
        // Read the reports as they come; kill at a random moment.
        let reader = std::thread::spawn(move || {
            let mut marks = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let line = line.unwrap();
                if let Some(rest) = line.strip_prefix("MARK ") {
                    let mut f = rest.split(' ').map(|v| v.parse::<u64>().unwrap());
                    marks.push((f.next().unwrap(), f.next().unwrap()));
                }
            }
            marks
        });
        std::thread::sleep(Duration::from_millis(20 + rng.below(80)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let marks = reader.join().unwrap();
        let bm = DirtyBitmap::open(&path).unwrap_or_else(|e| panic!("iteration {it}: {e}"));
        for &(off, len) in &marks {
            assert!(present(&bm, off, len), "iteration {it}: reported mark {off}+{len} lost");
        }
        assert!(present(&bm, 0, 1));
        total += marks.len();
    }
    println!("50 children killed; {total} reported marks all present");
    assert!(total > 50, "the children hardly marked anything: {total}");
}

#[test]
fn a_bitmap_open_in_another_process_is_ebusy() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b");
    DirtyBitmap::create(&path, SIZE, G).unwrap();
    let mut child = spawn_child(&path, "hold", 0);
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert!(lines.any(|l| l.unwrap() == "OPEN"), "the child did not open the bitmap");
    let e = DirtyBitmap::open(&path).unwrap_err();
    assert_eq!(e.errno(), libc::EBUSY, "{e}");
    child.kill().unwrap();
    child.wait().unwrap();
    DirtyBitmap::open(&path).unwrap();
}
