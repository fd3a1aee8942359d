//! Tests of the crate-internal job API (freeze / unfreeze) and of the persistent switch
//! under power loss at every step. The public API is tested in tests/dirty*.rs.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::{DirtyBitmap, EndOfJob};
use crate::driver::BlockDriver;
use crate::drivers::crash::CrashDriver;
use crate::drivers::fault::{FaultDriver, FaultOp, FaultRule};
use crate::drivers::memory::MemDriver;
use crate::error::ErrorKind;
use crate::BitmapFlags;

const G: u64 = 4096;

fn granules(bm: &DirtyBitmap) -> Vec<u64> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some((off, len)) = bm.next_dirty(from) {
        out.extend(off / G..(off + len).div_ceil(G));
        from = off + len;
    }
    out
}

fn frozen_granules(bm: &DirtyBitmap) -> Vec<u64> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some((off, len)) = bm.frozen_next_dirty(from) {
        out.extend(off / G..(off + len).div_ceil(G));
        from = off + len;
    }
    out
}

fn mark_all(bm: &DirtyBitmap, gs: &[u64]) {
    for &g in gs {
        bm.mark(g * G, 1).unwrap();
    }
}

/// Every kind of bitmap the tests run on: in memory, and persistent on a memory driver.
fn kinds(size: u64) -> Vec<(&'static str, Arc<DirtyBitmap>)> {
    let d: Arc<dyn BlockDriver> = Arc::new(MemDriver::new(DirtyBitmap::file_size(size, G).unwrap()).unwrap());
    vec![("memory", DirtyBitmap::new(size, G).unwrap()), ("persistent", DirtyBitmap::create_on(d, size, G).unwrap())]
}

#[test]
fn dirty_freeze_sends_marks_to_the_successor() {
    for (kind, bm) in kinds(1 << 24) {
        mark_all(&bm, &[1, 2]);
        bm.freeze().unwrap();
        assert!(bm.info().flags.contains(BitmapFlags::BUSY), "{kind}");
        assert_eq!(frozen_granules(&bm), vec![1, 2], "{kind}");
        mark_all(&bm, &[2, 3]);
        assert_eq!(frozen_granules(&bm), vec![1, 2], "{kind}: marks while frozen do not reach the frozen set");
        assert_eq!(granules(&bm), vec![1, 2, 3], "{kind}: count/next_dirty report frozen ∪ successor");
        assert_eq!(bm.count(), 3 * G, "{kind}");
        assert_eq!(bm.info().count, 3 * G, "{kind}");
        assert_eq!(bm.frozen_count(), 2 * G, "{kind}");
        assert!(bm.frozen_is_dirty(G + 100, 10) && bm.frozen_is_dirty(0, G + 1), "{kind}");
        assert!(!bm.frozen_is_dirty(0, G) && !bm.frozen_is_dirty(3 * G, G) && !bm.frozen_is_dirty(G, 0), "{kind}");
        assert_eq!(bm.frozen_next_dirty(G + 5), Some((G + 5, 2 * G - 5)), "{kind}");
        assert_eq!(bm.frozen_next_dirty(3 * G), None, "{kind}");
    }
}

#[test]
fn dirty_busy_bitmap_refuses_changes_but_takes_marks() {
    for (kind, bm) in kinds(1 << 24) {
        mark_all(&bm, &[1]);
        bm.freeze().unwrap();
        let other = DirtyBitmap::new(1 << 24, G).unwrap();
        other.mark(0, 1).unwrap();
        for (what, r) in [
            ("clear", bm.clear()),
            ("enable", bm.enable()),
            ("disable", bm.disable()),
            ("merge into", bm.merge(&other)),
            ("freeze", bm.freeze()),
        ] {
            let e = r.unwrap_err();
            assert_eq!((e.kind(), e.errno()), (ErrorKind::Busy, libc::EBUSY), "{kind}: {what}: {e}");
        }
        assert_eq!(granules(&bm), vec![1], "{kind}: nothing changed");
        assert_eq!(bm.generation(), 0, "{kind}");
        // Merging *from* a busy bitmap is fine: frozen ∪ successor.
        bm.mark(5 * G, 1).unwrap();
        other.merge(&bm).unwrap();
        assert_eq!(granules(&other), vec![0, 1, 5], "{kind}");
        bm.unfreeze(EndOfJob::Merge).unwrap();
        assert!(!bm.info().flags.contains(BitmapFlags::BUSY), "{kind}");
        let e = bm.unfreeze(EndOfJob::Merge).unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL, "{kind}: unfreeze of a bitmap not frozen");
        bm.clear().unwrap();
    }
}

#[test]
fn dirty_a_disabled_frozen_bitmap_records_nothing() {
    for (kind, bm) in kinds(1 << 24) {
        mark_all(&bm, &[1]);
        bm.disable().unwrap();
        bm.freeze().unwrap();
        bm.mark(7 * G, 1).unwrap();
        assert_eq!(granules(&bm), vec![1], "{kind}");
        bm.unfreeze(EndOfJob::Replace { add_back: vec![] }).unwrap();
        assert_eq!(granules(&bm), Vec::<u64>::new(), "{kind}");
        assert!(!bm.is_recording(), "{kind}");
    }
}

#[test]
fn dirty_unfreeze_replace_and_merge() {
    for (kind, bm) in kinds(1 << 24) {
        // Success (OnSuccess / Always after success): bitmap := successor.
        mark_all(&bm, &[1, 2, 9]);
        bm.freeze().unwrap();
        mark_all(&bm, &[2, 3]);
        bm.unfreeze(EndOfJob::Replace { add_back: vec![] }).unwrap();
        assert_eq!(granules(&bm), vec![2, 3], "{kind}");
        assert_eq!(bm.generation(), 1, "{kind}: bits were removed");

        // Always after a failure: successor ∪ the granules of clusters not copied (byte
        // ranges; a 64 KiB cluster at 64 KiB covers granules 16..32).
        bm.freeze().unwrap();
        mark_all(&bm, &[40]);
        bm.unfreeze(EndOfJob::Replace { add_back: vec![(2 * G, 10), (64 * 1024, 64 * 1024)] }).unwrap();
        let mut want: Vec<u64> = vec![2, 40];
        want.extend(16..32);
        want.sort();
        assert_eq!(granules(&bm), want, "{kind}");
        assert_eq!(bm.generation(), 2, "{kind}: granule 3 was removed");

        // Nothing removed: no generation change (every frozen granule is given back).
        bm.freeze().unwrap();
        bm.unfreeze(EndOfJob::Replace { add_back: vec![(0, 1 << 24)] }).unwrap();
        assert_eq!(bm.count(), 1 << 24, "{kind}");
        assert_eq!(bm.generation(), 2, "{kind}");
        bm.clear().unwrap();
        assert_eq!(bm.generation(), 3, "{kind}");

        // Never, or OnSuccess after a failure: bitmap := frozen ∪ successor.
        mark_all(&bm, &[5]);
        bm.freeze().unwrap();
        mark_all(&bm, &[6]);
        bm.unfreeze(EndOfJob::Merge).unwrap();
        assert_eq!(granules(&bm), vec![5, 6], "{kind}");
        assert_eq!(bm.generation(), 3, "{kind}");
        // add_back ranges past the end are clipped.
        bm.freeze().unwrap();
        bm.unfreeze(EndOfJob::Replace { add_back: vec![((1 << 24) - 1, 100), (u64::MAX, 5)] }).unwrap();
        assert_eq!(granules(&bm), vec![(1 << 24) / G - 1], "{kind}");
    }
}

#[test]
fn dirty_persistent_unfreeze_is_kept_across_reopen() {
    let size = 1u64 << 30;
    let d: Arc<dyn BlockDriver> = Arc::new(MemDriver::new(DirtyBitmap::file_size(size, G).unwrap()).unwrap());
    let bm = DirtyBitmap::create_on(d.clone(), size, G).unwrap();
    mark_all(&bm, &[1, 2, 100_000]);
    bm.freeze().unwrap();
    mark_all(&bm, &[3, 200_000]);
    drop(bm); // a crash while frozen: the file holds frozen ∪ successor
    let bm = DirtyBitmap::open_on(d.clone()).unwrap();
    assert_eq!(granules(&bm), vec![1, 2, 3, 100_000, 200_000]);
    bm.freeze().unwrap();
    mark_all(&bm, &[4]);
    bm.unfreeze(EndOfJob::Replace { add_back: vec![(100_000 * G, 1)] }).unwrap();
    assert_eq!(granules(&bm), vec![4, 100_000]);
    let uuid = bm.uuid();
    drop(bm);
    let bm = DirtyBitmap::open_on(d).unwrap();
    assert_eq!(granules(&bm), vec![4, 100_000]);
    assert_eq!((bm.generation(), bm.uuid()), (1, uuid));
}

/// The content (granule list) and generation a crash test reads back.
fn reopen(d: &Arc<CrashDriver>) -> (Vec<u64>, u64) {
    d.crash();
    d.restart();
    let bm = DirtyBitmap::open_on(d.clone()).expect("a crash never makes the file unusable");
    let r = (granules(&bm), bm.generation());
    drop(bm);
    r
}

#[test]
// Each step writes and reopens a checksummed multi-page file: over 20 minutes under Miri
// even with its fewer steps; the same switch code runs in the other tests here under Miri.
#[cfg_attr(miri, ignore = "too slow under Miri (> 20 min)")]
fn dirty_switches_are_atomic_under_power_loss_at_every_step() {
    // Big enough for several pages; the sets span them.
    let size = 1u64 << 32;
    let before: Vec<u64> = vec![1, 2, 5000, 9000, 300_000, 700_000];
    let successor: Vec<u64> = vec![2, 3, 800_000];
    let mut union: Vec<u64> = before.iter().chain(&successor).copied().collect();
    union.sort();
    union.dedup();
    for op in ["clear", "replace", "replace-add-back"] {
        let mut saw = [false, false];
        // Under Miri (scripts/miri.sh) every 10th step and one seed: it interprets every step.
        for step in (0..40u64).step_by(if cfg!(miri) { 10 } else { 1 }) {
            for seed in 0..if cfg!(miri) { 1 } else { 4 } {
                let d = Arc::new(
                    CrashDriver::with_seed(DirtyBitmap::file_size(size, G).unwrap(), seed * 1000 + step).unwrap(),
                );
                let bm = DirtyBitmap::create_on(d.clone(), size, G).unwrap();
                mark_all(&bm, &before);
                let (start, after, gen_after) = match op {
                    "clear" => (before.clone(), vec![], 1),
                    "replace" => {
                        bm.freeze().unwrap();
                        mark_all(&bm, &successor);
                        (union.clone(), successor.clone(), 1)
                    }
                    _ => {
                        bm.freeze().unwrap();
                        mark_all(&bm, &successor);
                        let mut a = successor.clone();
                        a.extend([5000, 5001]); // granules of the range given back
                        a.sort();
                        (union.clone(), a, 1)
                    }
                };
                d.crash_after(step);
                let r = match op {
                    "clear" => bm.clear(),
                    "replace" => bm.unfreeze(EndOfJob::Replace { add_back: vec![] }),
                    _ => bm.unfreeze(EndOfJob::Replace { add_back: vec![(5000 * G + 10, G)] }),
                };
                drop(bm);
                let (got, generation) = reopen(&d);
                if got == after && generation == gen_after {
                    saw[1] = true;
                } else {
                    assert!(r.is_err(), "{op} step {step}: returned Ok but the file holds {got:?}");
                    assert_eq!((&got, generation), (&start, 0), "{op} step {step}: neither before nor after");
                    saw[0] = true;
                }
            }
        }
        assert!(saw[0] && saw[1], "{op}: both outcomes were seen {saw:?}");
    }
}

#[test]
fn dirty_failed_switch_is_completed_by_the_next_write() {
    let size = 1u64 << 30;
    let inner = Arc::new(MemDriver::new(DirtyBitmap::file_size(size, G).unwrap()).unwrap());
    let d = Arc::new(FaultDriver::new(inner.clone()));
    let bm = DirtyBitmap::create_on(d.clone(), size, G).unwrap();
    mark_all(&bm, &[1, 2, 100_000]);
    bm.freeze().unwrap();
    mark_all(&bm, &[3]);
    // The header write of the switch fails: pages of the new epoch are durable, the header
    // may or may not be.
    let header = d.add(FaultRule::new(FaultOp::Write).range(0, 1024).errno(libc::EIO));
    let e = bm.unfreeze(EndOfJob::Replace { add_back: vec![] }).unwrap_err();
    assert_eq!(e.errno(), libc::EIO, "{e}");
    assert_eq!(d.fired(header), 1);
    assert!(!bm.is_busy());
    assert_eq!(granules(&bm), vec![3], "the new state in memory");
    assert_eq!(bm.generation(), 1);
    // The file still opens as the old state (another handle on the same memory).
    {
        let view: Arc<dyn BlockDriver> = Arc::new(MemDriver::from_bytes(&inner.to_vec()).unwrap());
        let old = DirtyBitmap::open_on(view).unwrap();
        assert_eq!((granules(&old), old.generation()), (vec![1, 2, 3, 100_000], 0));
    }
    // A clear now must first complete the pending switch; make that fail too: nothing changes.
    d.add(FaultRule::new(FaultOp::Flush).errno(libc::EIO));
    assert_eq!(bm.clear().unwrap_err().errno(), libc::EIO);
    assert_eq!(granules(&bm), vec![3]);
    // The next mark completes the switch.
    bm.mark(7 * G, 1).unwrap();
    assert_eq!(granules(&bm), vec![3, 7]);
    drop(bm);
    let bm = DirtyBitmap::open_on(d.clone()).unwrap();
    assert_eq!((granules(&bm), bm.generation()), (vec![3, 7], 1));

    // A page write of a switch fails: the file certainly holds the old state; the switch is
    // redone (in a new epoch) by the next write.
    bm.freeze().unwrap();
    mark_all(&bm, &[8]);
    d.add(FaultRule::new(FaultOp::Write).range(4096, 1 << 30).errno(libc::ENOSPC));
    assert_eq!(bm.unfreeze(EndOfJob::Replace { add_back: vec![] }).unwrap_err().errno(), libc::ENOSPC);
    assert_eq!(granules(&bm), vec![8]);
    {
        let view: Arc<dyn BlockDriver> = Arc::new(MemDriver::from_bytes(&inner.to_vec()).unwrap());
        let old = DirtyBitmap::open_on(view).unwrap();
        assert_eq!((granules(&old), old.generation()), (vec![3, 7, 8], 1));
    }
    bm.mark(9 * G, 1).unwrap();
    drop(bm);
    let bm = DirtyBitmap::open_on(d.clone()).unwrap();
    assert_eq!((granules(&bm), bm.generation()), (vec![8, 9], 2));

    // A Replace that cannot even start (a pending switch cannot be completed) merges back.
    bm.freeze().unwrap();
    d.add(FaultRule::new(FaultOp::Write).range(0, 1024).errno(libc::EIO));
    bm.unfreeze(EndOfJob::Replace { add_back: vec![(8 * G, 1)] }).unwrap_err(); // header failed
    assert_eq!((granules(&bm), bm.generation()), (vec![8], 3));
    bm.freeze().unwrap();
    d.add(FaultRule::new(FaultOp::Flush).errno(libc::EIO));
    assert!(bm.unfreeze(EndOfJob::Replace { add_back: vec![] }).is_err());
    assert!(!bm.is_busy());
    assert_eq!(granules(&bm), vec![8], "merged back: frozen ∪ successor");
    assert_eq!(bm.generation(), 3);
    bm.mark(12 * G, 1).unwrap();
    drop(bm);
    let bm = DirtyBitmap::open_on(d).unwrap();
    assert_eq!((granules(&bm), bm.generation()), (vec![8, 12], 3));
}

#[test]
fn dirty_random_operations_under_power_loss_keep_every_returned_mark() {
    // Threads mark random ranges (recording each mark that returned), one thread also
    // freezes/unfreezes and clears; the device loses power at a random operation. After the
    // restart the bitmap opens and holds every mark that must be there.
    let size = 1u64 << 31;
    let iterations = if cfg!(miri) {
        2 // Miri interprets every step (scripts/miri.sh)
    } else if cfg!(debug_assertions) {
        60
    } else {
        1000
    };
    // COWBACKUP_CRASH_SEED=n shifts every seed, for longer runs.
    let base: u64 = std::env::var("COWBACKUP_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    for it in (0..iterations).map(|i| i + base * iterations) {
        let d = Arc::new(CrashDriver::with_seed(DirtyBitmap::file_size(size, G).unwrap(), it).unwrap());
        let bm = DirtyBitmap::create_on(d.clone(), size, G).unwrap();
        let clock = Arc::new(AtomicU64::new(0));
        // The clock at the start of every mark that returned Ok, and the latest clock at which
        // an operation that may remove bits (clear, unfreeze) returned: a mark that started
        // later must survive; one that overlapped such an operation may be removed by it.
        let marks = Arc::new(Mutex::new(Vec::new()));
        let removal_end = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        d.crash_after(20 + it % 97);
        let threads: Vec<_> = (0..3u64)
            .map(|t| {
                let (bm, clock, marks, removal_end, stop) =
                    (bm.clone(), clock.clone(), marks.clone(), removal_end.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut x = it * 31 + t + 1;
                    let mut rnd = move |n: u64| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x % n
                    };
                    for i in 0..200 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        if t == 0 && i % 10 == 5 {
                            let r = match rnd(3) {
                                0 => bm.clear(),
                                _ => bm.freeze().and_then(|()| {
                                    bm.mark(rnd(size), 1)?;
                                    let end = if rnd(2) == 0 {
                                        EndOfJob::Merge
                                    } else {
                                        EndOfJob::Replace { add_back: vec![(rnd(size), rnd(1 << 20))] }
                                    };
                                    bm.unfreeze(end)
                                }),
                            };
                            removal_end.fetch_max(clock.fetch_add(1, Ordering::SeqCst), Ordering::SeqCst);
                            if r.is_err() {
                                stop.store(true, Ordering::Relaxed);
                            }
                            continue;
                        }
                        let off = rnd(size);
                        let len = 1 + rnd((size - off).min(1 << 21));
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
        d.crash();
        drop(bm);
        d.restart();
        let bm = DirtyBitmap::open_on(d.clone()).unwrap_or_else(|e| panic!("iteration {it}: {e}"));
        let last_removal = removal_end.load(Ordering::SeqCst);
        for &(start, off, len) in marks.lock().unwrap().iter() {
            if start <= last_removal {
                continue; // a clear or sync that returned later may have removed it
            }
            let s = off / G * G;
            let ok = matches!(bm.next_dirty(s), Some((o, l)) if o == s && o + l >= off + len);
            assert!(ok, "iteration {it}: mark {off}+{len} (clock {start}) lost");
        }
    }
}

/// A memory driver whose writes panic while `explode` is set.
struct Panicky {
    inner: MemDriver,
    explode: AtomicBool,
}

impl BlockDriver for Panicky {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        assert!(!self.explode.load(Ordering::Relaxed), "driver bug");
        self.inner.write_at(buf, offset)
    }
}

#[test]
fn dirty_a_panicking_driver_poisons_the_bitmap_not_the_file() {
    let size = 1u64 << 30;
    let d = Arc::new(Panicky {
        inner: MemDriver::new(DirtyBitmap::file_size(size, G).unwrap()).unwrap(),
        explode: AtomicBool::new(false),
    });
    let bm = DirtyBitmap::create_on(d.clone(), size, G).unwrap();
    mark_all(&bm, &[1]);
    d.explode.store(true, Ordering::Relaxed);
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| bm.mark(5 * G, 1)));
    assert!(caught.is_err(), "the driver's panic reaches the caller");
    d.explode.store(false, Ordering::Relaxed);
    let e = bm.mark(6 * G, 1).unwrap_err();
    assert_eq!(e.errno(), libc::EIO, "{e}");
    assert!(e.to_string().contains("reopen"), "{e}");
    bm.mark(G, 1).unwrap(); // durable already: still fine
    assert_eq!(bm.clear().unwrap_err().errno(), libc::EIO);
    drop(bm);
    let bm = DirtyBitmap::open_on(d).unwrap();
    assert_eq!(granules(&bm), vec![1]);
    bm.mark(6 * G, 1).unwrap();
}

/// A file whose header's sequence number is one below the format's limit (only a crafted or
/// damaged file gets there: one per switch, from 0) opens, but a clear, whose header would
/// carry the limit and so could never be opened again, is refused with `EOVERFLOW` before
/// anything changes, in memory or in the file (found by fuzz/bitmap_file: the clear used to
/// write that header, and the reopen refused the file).
#[test]
fn dirty_a_switch_past_the_counter_limit_is_refused_and_changes_nothing() {
    use super::format::{Header, MAX_COUNTER, SECTOR};
    let size = 1u64 << 30;
    let d: Arc<dyn BlockDriver> = Arc::new(MemDriver::new(DirtyBitmap::file_size(size, G).unwrap()).unwrap());
    let bm = DirtyBitmap::create_on(d.clone(), size, G).unwrap();
    mark_all(&bm, &[1, 2, 100_000]);
    drop(bm);
    // Move the newer header slot's sequence number to the last one the format accepts.
    let mut hb = [0u8; 2 * SECTOR];
    d.read_at(&mut hb, 0).unwrap();
    let h: Vec<Header> =
        (0..2).map(|s| Header::decode(hb[s * SECTOR..][..SECTOR].try_into().unwrap(), s as u8).unwrap()).collect();
    let newer = usize::from(h[1].seq > h[0].seq);
    let crafted = Header { seq: MAX_COUNTER - 1, ..h[newer] }.encode();
    d.write_at(&crafted, (newer * SECTOR) as u64).unwrap();

    let bm = DirtyBitmap::open_on(d.clone()).unwrap();
    assert_eq!(granules(&bm), vec![1, 2, 100_000]);
    let generation = bm.generation();
    let e = bm.clear().unwrap_err();
    assert_eq!(e.errno(), libc::EOVERFLOW, "{e}");
    assert!(e.to_string().contains("exhausted"), "{e}");
    assert_eq!(granules(&bm), vec![1, 2, 100_000], "a refused clear cleared the bitmap");
    assert_eq!(bm.generation(), generation);
    // Marks go on: they write pages under the same header.
    mark_all(&bm, &[3]);
    // Disable and enable write a header: refused the same way. The header stays due, so
    // the next mark that writes (a clean granule) is refused too, and the file is not
    // written: a host failing that guest write is the right answer.
    assert_eq!(bm.disable().unwrap_err().errno(), libc::EOVERFLOW);
    assert_eq!(bm.enable().unwrap_err().errno(), libc::EOVERFLOW);
    let e = bm.mark(7 * G, 1).unwrap_err();
    assert_eq!(e.errno(), libc::EOVERFLOW, "{e}");
    bm.mark(3 * G, 1).expect("a granule dirty and durable already costs no write");
    drop(bm);
    let bm = DirtyBitmap::open_on(d).expect("the file still opens");
    assert_eq!(granules(&bm), vec![1, 2, 3, 100_000]);
    assert_eq!(bm.generation(), generation);
}
