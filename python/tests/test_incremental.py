"""Incremental backups from Python: a chain (a full backup that starts it, then incrementals)
taken while writer threads write, restored and compared byte for byte with point-in-time
copies; the copy set of sync="bitmap"; QEMU iotest 257's matrix of bitmap modes after
success, cancel and failure; the rejections; consistency groups (one point in time, one
outcome, all or none)."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import threading
import time
from typing import List, Optional, Tuple

import pytest

from conftest import KiB, MiB, PyDisk, first_diff, wait_for

import cowbackup
from cowbackup import Bitmap, Busy, Driver, InvalidArgument, JobCancelled, JobState

CLUSTER = 64 * KiB


def round_out(extents: List[Tuple[int, int]], unit: int, size: int) -> List[Tuple[int, int]]:
    """``extents`` widened to whole ``unit``s (clipped to ``size``), merged."""
    out: List[Tuple[int, int]] = []
    for off, n in extents:
        a = off // unit * unit
        b = min(size, -(-(off + n) // unit) * unit)
        if out and out[-1][0] + out[-1][1] >= a:
            out[-1] = (out[-1][0], max(out[-1][0] + out[-1][1], b) - out[-1][0])
        else:
            out.append((a, b - a))
    return out


def granule_set(extents: List[Tuple[int, int]], granularity: int) -> set:
    return {g for off, n in extents for g in range(off // granularity, -(-(off + n) // granularity))}


def total(extents: List[Tuple[int, int]]) -> int:
    return sum(n for _, n in extents)


def assert_same(got: bytes, want: bytes, what: str) -> None:
    assert len(got) == len(want), what
    d = first_diff(got, want)
    assert d < 0, f"{what}: first difference at byte {d} (cluster {d // CLUSTER})"


class Writers:
    """Writer threads doing the host's write path on ``src``: ``bm.mark``, then the hook of
    the current job (if any), then the write. Every write is recorded with the *epoch* it
    was made in; :meth:`quiesced` pauses them all (in-flight writes finish first) so the test
    can switch jobs and take point-in-time copies."""

    def __init__(self, src: Driver, bm: Bitmap, n: int, seed: int) -> None:
        self.src, self.bm = src, bm
        self.cond = threading.Condition()
        self.paused = False
        self.stopped = False
        self.active = 0
        self.job: Optional[cowbackup.Job] = None
        self.epoch = 0
        self.writes: List[Tuple[int, int, int]] = []  # (epoch, offset, length)
        self.errors: List[BaseException] = []
        self.threads = [threading.Thread(target=self._run, args=(seed * 100 + i,), daemon=True)
                        for i in range(n)]
        for t in self.threads:
            t.start()

    def _one(self, rng: random.Random) -> Tuple[int, int]:
        size = self.src.size
        kind = rng.random()
        if kind < 0.1:
            n = rng.randint(1, 3 * CLUSTER)
            return size - n, n  # the unaligned end
        n = rng.choice([1, 512, 4096, CLUSTER, rng.randint(1, 3 * CLUSTER)])
        return rng.randrange(0, size - n + 1), n

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        while True:
            with self.cond:
                deadline = time.monotonic() + 120
                while self.paused and not self.stopped and time.monotonic() < deadline:
                    self.cond.wait(1)
                if self.stopped or self.paused:
                    return
                self.active += 1
                job, epoch = self.job, self.epoch
            try:
                off, n = self._one(rng)
                data = rng.randbytes(n)
                self.bm.mark(off, n)
                if job is not None:
                    job.cow_before_write(off, n)
                self.src.write(off, data)
                with self.cond:
                    self.writes.append((epoch, off, n))
            except BaseException as e:  # reported by check()
                self.errors.append(e)
                with self.cond:
                    self.active -= 1
                    self.cond.notify_all()
                return
            with self.cond:
                self.active -= 1
                self.cond.notify_all()
            time.sleep(0.0005)

    def count(self, epoch: int) -> int:
        with self.cond:
            return sum(1 for e, _, _ in self.writes if e == epoch)

    def extents(self, epochs: range) -> List[Tuple[int, int]]:
        """The writes of ``epochs``, sorted (to be rounded to granules by the caller)."""
        with self.cond:
            return sorted((o, n) for e, o, n in self.writes if e in epochs)

    @contextlib.contextmanager
    def quiesced(self):
        with self.cond:
            self.paused = True
            deadline = time.monotonic() + 60
            while self.active and time.monotonic() < deadline:
                self.cond.wait(1)
            assert self.active == 0, "writers did not quiesce within 60 s"
        try:
            yield
        finally:
            with self.cond:
                self.paused = False
                self.cond.notify_all()

    def wait_writes(self, epoch: int, n: int, timeout: float = 30) -> None:
        assert wait_for(lambda: self.count(epoch) >= n or self.errors, timeout), \
            f"only {self.count(epoch)} writes in epoch {epoch} after {timeout} s"

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        for t in self.threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in self.threads), "a writer thread hangs"

    def check(self) -> None:
        assert not self.errors, f"writer errors: {self.errors!r}"


# --- the chain -------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", [4096, 64 * KiB, 256 * KiB])
def test_incremental_chain_with_live_writers(tmp_path, granularity):
    """Full backup with a bitmap (starts the chain), then two incrementals, each taken while
    three threads write (mark, hook, write). The chain applied in order (full, then each
    incremental's clusters) equals the point-in-time copy of the source at each job's start;
    the bitmap always holds exactly the granules written since the last job started."""
    size = 16 * MiB + 12345  # the last granule and cluster are partial
    src = Driver.create(tmp_path / "disk.img", size)
    rng = random.Random(granularity)
    for off in range(0, size, MiB):
        if (off // MiB) % 3 != 2:  # leave some zero MiBs: zero clusters in the copy sets
            src.write(off, rng.randbytes(min(MiB, size - off)))
    bm = Bitmap.create(tmp_path / "disk.bitmap", size, granularity)
    writers = Writers(src, bm, 3, seed=granularity)
    jobs_done = []
    try:
        restored: Optional[bytearray] = None
        for step in range(3):  # 0: full, 1 and 2: incrementals
            sync = "full" if step == 0 else "bitmap"
            target = Driver.create(tmp_path / f"backup{step}.img", size)
            with writers.quiesced():
                image = src.read(0, size)  # the point in time
                dirty = bm.extents()
                gen = bm.generation
                if step > 0:
                    # What the bitmap must hold: every write since the previous job started.
                    want = round_out(writers.extents(range(step, step + 1)), granularity, size)
                    assert dirty == want, f"step {step}: the bitmap lost or invented writes"
                writers.epoch = step + 1
                # Throttled to a crawl (a chunk or two, then nothing; the hook is never
                # slowed) until the writers made their writes, so that they surely run
                # during the job, whatever the machine's speed.
                job = cowbackup.backup_start(src, target, sync=sync, bitmap=bm, workers=2, speed=1)
                writers.job = job
                assert bm.busy
            writers.wait_writes(step + 1, 60)  # writes during the job
            job.set_speed(0)
            job.wait(timeout=120)
            info = job.info()
            with writers.quiesced():
                writers.job = None  # later writes: mark and write only
                after = bm.extents()
                # On success: exactly the writes made since the job started.
                assert after == round_out(writers.extents(range(step + 1, step + 2)), granularity, size)
                # The generation moves iff the job removed bits. (Writes made since the job
                # ended may have dirtied removed granules again: then it may have moved.)
                removed = granule_set(dirty, granularity) - granule_set(after, granularity)
                if removed:
                    assert bm.generation == gen + 1
                else:
                    assert bm.generation in (gen, gen + 1)
                if not dirty:
                    assert bm.generation == gen, "nothing to remove: generation kept"
            assert info.state == JobState.COMPLETED
            if step == 0:
                assert (info.bytes_copied + info.bytes_zero, info.bytes_skipped) == (size, 0)
                assert info.cow_requests > 0, "no write needed the hook: the test proves little"
                restored = bytearray(target.read(0, size))
            else:
                # Exactly the clusters overlapping dirty granules were copied, the rest skipped.
                copy_set = round_out(dirty, CLUSTER, size)
                assert info.bytes_copied + info.bytes_zero == total(copy_set), info
                assert info.bytes_skipped == size - total(copy_set), info
                assert info.offset == size and info.bytes_failed == 0
                assert restored is not None
                for off, n in copy_set:
                    restored[off:off + n] = target.read(off, n)
            assert_same(bytes(restored), image, f"the chain restored up to step {step}")
            assert not bm.busy
            jobs_done.append(job)
            writers.wait_writes(step + 1, 100)  # and more writes between the jobs
        # After the last job (on-success): exactly the writes since it started.
        with writers.quiesced():
            want = round_out(writers.extents(range(3, 4)), granularity, size)
            assert bm.extents() == want
        writers.check()
    finally:
        writers.stop()
        for job in jobs_done:
            job.close()
    i = bm.info()
    assert i.generation >= 2, "each incremental removed bits"
    bm.close()
    with Bitmap.open(tmp_path / "disk.bitmap") as again:  # the chain's state is in the file
        j = again.info()
        assert (j.uuid, j.generation, j.granularity) == (i.uuid, i.generation, granularity)
        assert again.extents() == want
    src.close()


def test_incremental_copies_exactly_the_dirty_clusters(tmp_path):
    """4 KiB granules, 64 KiB clusters: a cluster is copied when any granule of it is dirty."""
    size = 8 * MiB
    data = os.urandom(size)
    with Driver.memory(size) as src, Driver.memory(size) as tgt, Bitmap.new(size, 4096) as bm:
        src.write(0, data)
        bm.mark(5, 1)  # cluster 0
        bm.mark(CLUSTER + 60 * KiB, 8 * KiB)  # clusters 1 and 2
        bm.mark(size - 1, 1)  # the last cluster
        with cowbackup.backup_start(src, tgt, sync="bitmap", bitmap=bm) as job:
            job.wait(timeout=60)
            i = job.info()
        assert (i.bytes_copied + i.bytes_zero, i.bytes_skipped) == (4 * CLUSTER, size - 4 * CLUSTER)
        got = tgt.read(0, size)
        for c in range(size // CLUSTER):
            r = slice(c * CLUSTER, (c + 1) * CLUSTER)
            want = data[r] if c in (0, 1, 2, size // CLUSTER - 1) else bytes(CLUSTER)
            assert got[r] == want, f"cluster {c}"
        assert bm.extents() == [] and bm.generation == 1


# --- QEMU iotest 257: modes x outcomes -----------------------------------------------------

G1 = [0, 15, 16, 128, 129, 254]  # dirty before the job: its copy set (in this order)
G2 = [1, 14, 130, 255]  # written during the job (outside the copy set)


class GatedDisk(PyDisk):
    """A Python source: the first read of cluster ``gate`` waits for ``release`` (at most
    30 s), then fails with EIO if ``fail_gated``; reads of ``fail_read`` clusters fail."""

    def __init__(self, size: int, data: bytes, gate: int) -> None:
        super().__init__(size, CLUSTER, data)
        self.gate = gate
        self.reached = threading.Event()
        self.release = threading.Event()
        self.fail_gated = False
        self.gated = False

    def read(self, offset: int, n: int) -> bytes:
        if not self.gated and self.gate in self._clusters(offset, n):
            self.gated = True
            self.reached.set()
            if not self.release.wait(30):
                raise OSError(errno.ETIMEDOUT, "GatedDisk: never released")
            if self.fail_gated:
                raise OSError(errno.EIO, "GatedDisk: injected failure of the gated read")
        return super().read(offset, n)


def clusters_of(bm: Bitmap) -> List[int]:
    out: List[int] = []
    for off, n in bm.extents():
        out.extend(range(off // CLUSTER, -(-(off + n) // CLUSTER)))
    return out


@pytest.mark.parametrize("persistent", [False, True], ids=["memory", "file"])
@pytest.mark.parametrize("outcome", ["success", "cancel", "failure"])
@pytest.mark.parametrize("mode", ["on-success", "always", "never"])
def test_bitmap_modes_after_success_cancel_and_failure(tmp_path, mode, outcome, persistent):
    size = 256 * CLUSTER
    data = os.urandom(size)
    disk = GatedDisk(size, data, gate=128)
    if outcome == "failure":
        disk.fail_read = {129}
    bitmap = Bitmap.create(tmp_path / "bm", size) if persistent else Bitmap.new(size)
    with bitmap as bm, Driver.from_python(disk, size) as src, Driver.memory(size) as tgt:
        for c in G1:
            bm.mark(c * CLUSTER, CLUSTER)
        gen = bm.generation
        job = cowbackup.backup_start(src, tgt, sync="bitmap", bitmap=bm, bitmap_mode=mode,
                                     workers=1, max_chunk=CLUSTER)
        with job:
            try:
                # The worker copies 0, 15, 16, then waits in the read of cluster 128.
                assert disk.reached.wait(30), "the job never read cluster 128"
                for c in G2:  # the host's writes during the job
                    bm.mark(c * CLUSTER, CLUSTER)
                    job.cow_before_write(c * CLUSTER, CLUSTER)
                    src.write(c * CLUSTER, os.urandom(CLUSTER))
                if outcome == "cancel":
                    job.cancel()
                    disk.fail_gated = True  # a chunk failing after cancel: still a cancel
            finally:
                disk.release.set()
            if outcome == "success":
                job.wait(timeout=60)
                assert job.state == JobState.COMPLETED
                got = tgt.read(0, size)
                for c in G1:
                    r = slice(c * CLUSTER, (c + 1) * CLUSTER)
                    assert got[r] == data[r], f"cluster {c}"
            elif outcome == "cancel":
                with pytest.raises(JobCancelled):
                    job.wait(timeout=60)
                assert job.state == JobState.CANCELLED
            else:
                with pytest.raises(cowbackup.CowbackupError) as e:
                    job.wait(timeout=60)
                assert e.value.errno == errno.EIO and job.state == JobState.FAILED
        i = bm.info()
        assert not i.busy and i.recording
        got = clusters_of(bm)
        if mode == "never" or (mode == "on-success" and outcome != "success"):
            want = sorted(G1 + G2)  # everything back, plus the new writes
        elif outcome == "success":
            want = G2  # only the writes made during the job
        elif outcome == "failure":
            want = sorted(G2 + [129, 254])  # always: the new writes + what was not copied
        else:
            want = sorted(G2 + [128, 129, 254])  # the gated chunk failed after cancel: not copied
        assert got == want, f"{mode} after {outcome}"
        removed = not set(G1) <= set(got)
        assert i.generation == gen + (1 if removed else 0), "generation: bumped iff bits were removed"
    if persistent:  # the end of the job reached the file
        with Bitmap.open(tmp_path / "bm") as again:
            assert clusters_of(again) == want and again.generation == i.generation


# --- rejections ----------------------------------------------------------------------------


def test_rejections_leave_the_bitmap_alone():
    size = 4 * MiB
    with Driver.memory(size) as src, Driver.memory(size) as tgt, Bitmap.new(size) as bm, \
            Bitmap.new(size // 2) as small:
        bm.mark(G := 3 * CLUSTER, 1)
        before = (bm.extents(), bm.generation)

        def unchanged() -> bool:
            return (bm.extents(), bm.generation) == before and not bm.busy

        with pytest.raises(InvalidArgument) as e:
            cowbackup.backup_start(src, tgt, sync="bitmap")
        assert "bitmap" in str(e.value) and "cowbackup_backup_start" in str(e.value)
        for sync in ("full", "top"):
            with pytest.raises(InvalidArgument) as e:
                cowbackup.backup_start(src, tgt, sync=sync, bitmap=bm, bitmap_mode="never")
            assert unchanged()
        with pytest.raises(InvalidArgument) as e:
            cowbackup.backup_start(src, tgt, sync="bitmap", bitmap=small)
        assert str(size // 2) in str(e.value)
        with pytest.raises(ValueError, match="bitmap_mode"):
            cowbackup.backup_start(src, tgt, sync="bitmap", bitmap=bm, bitmap_mode="sometimes")
        with pytest.raises(TypeError, match="bitmap_mode"):
            cowbackup.backup_start(src, tgt, sync="bitmap", bitmap=bm, bitmap_mode=1)
        with pytest.raises(ValueError, match="sync"):
            cowbackup.backup_start(src, tgt, sync="incremental", bitmap=bm)
        with pytest.raises(TypeError, match="bitmap"):
            cowbackup.backup_start(src, tgt, sync="bitmap", bitmap=bm.extents())
        closed = Bitmap.new(size)
        closed.close()
        with pytest.raises(ValueError, match="closed"):
            cowbackup.backup_start(src, tgt, sync="bitmap", bitmap=closed)
        assert unchanged()
        assert tgt.read(G, 1) == b"\0"  # nothing was written
        # Never with sync="bitmap", and a bitmap with sync="full", are fine.
        with cowbackup.backup_start(src, tgt, sync="bitmap", bitmap=bm, bitmap_mode="never") as job:
            job.wait(timeout=60)
        assert (bm.extents(), bm.generation) == before


# --- consistency groups ----------------------------------------------------------------------


def dirty_pair(size: int, clusters: List[int]) -> Tuple[Driver, Bitmap, bytes]:
    data = os.urandom(size)
    src = Driver.memory(size)
    src.write(0, data)
    bm = Bitmap.new(size)
    for c in clusters:
        bm.mark(c * CLUSTER, CLUSTER)
    return src, bm, data


def test_group_one_point_in_time_and_grouped_completion():
    size = 64 * CLUSTER
    a, bma, data_a = dirty_pair(size, [0, 5, 6])
    disk = GatedDisk(size, os.urandom(size), gate=40)
    data_b = bytes(disk.buf)
    bmb = Bitmap.new(size)
    for c in (40, 41):
        bmb.mark(c * CLUSTER, CLUSTER)
    b = Driver.from_python(disk, size)
    with a, b, bma, bmb, Driver.memory(size) as ta, Driver.memory(size) as tb:
        jobs = cowbackup.backup_start_group([(a, ta, {"bitmap": bma}), (b, tb, {"bitmap": bmb})],
                                            sync="bitmap", workers=1)
        assert len(jobs) == 2 and all(isinstance(j, cowbackup.Job) for j in jobs)
        ja, jb = jobs
        try:
            assert disk.reached.wait(30)
            assert bma.busy and bmb.busy
            # Writes to both devices after the group started: not in either backup. (Not to
            # clusters 40 and 41 of B: their hook would wait for the gated read.)
            for src, bm, job, c in ((a, bma, ja, 5), (b, bmb, jb, 50), (a, bma, ja, 9)):
                bm.mark(c * CLUSTER, CLUSTER)
                job.cow_before_write(c * CLUSTER, CLUSTER)
                src.write(c * CLUSTER, os.urandom(CLUSTER))
            # A has finished copying but must not complete while B is still copying.
            assert wait_for(lambda: ja.info().offset == size, 10)
            with pytest.raises(TimeoutError):
                ja.wait(timeout=0.3)
            assert ja.state != JobState.COMPLETED
        finally:
            disk.release.set()
        for j in jobs:
            j.wait(timeout=60)
            assert j.state == JobState.COMPLETED
        for tgt, data, cs in ((ta, data_a, [0, 5, 6]), (tb, data_b, [40, 41])):
            got = tgt.read(0, size)
            for c in cs:
                r = slice(c * CLUSTER, (c + 1) * CLUSTER)
                assert got[r] == data[r], f"cluster {c}"
        assert clusters_of(bma) == [5, 9] and clusters_of(bmb) == [50]
        for j in jobs:
            j.close()


def test_group_failure_cancels_the_others_and_gives_every_bitmap_back():
    size = 64 * CLUSTER
    a, bma, _ = dirty_pair(size, [0, 15, 16])
    disk = PyDisk(size, CLUSTER, os.urandom(size))
    disk.fail_read = {20}
    bmb = Bitmap.new(size)
    for c in (1, 20, 30):
        bmb.mark(c * CLUSTER, CLUSTER)
    b = Driver.from_python(disk, size)
    with a, b, bma, bmb, Driver.memory(size) as ta, Driver.memory(size) as tb:
        before = [(bm.extents(), bm.generation) for bm in (bma, bmb)]
        for mode in ("on-success", "never"):
            ja, jb = cowbackup.backup_start_group(
                [(a, ta, {"bitmap": bma, "bitmap_mode": mode}),
                 (b, tb, {"bitmap": bmb, "bitmap_mode": mode})], sync="bitmap")
            with ja, jb:
                with pytest.raises(JobCancelled):
                    ja.wait(timeout=60)
                with pytest.raises(cowbackup.CowbackupError) as e:
                    jb.wait(timeout=60)
                assert e.value.errno == errno.EIO
                assert (ja.state, jb.state) == (JobState.CANCELLED, JobState.FAILED)
            assert [(bm.extents(), bm.generation) for bm in (bma, bmb)] == before, mode
            assert not bma.busy and not bmb.busy
        # Cancelling one job of a group cancels the other.
        disk.fail_read = set()
        disk.slow_read = {c: 0.2 for c in range(64)}
        ja, jb = cowbackup.backup_start_group([(a, ta, {"bitmap": bma}), (b, tb, {"bitmap": bmb})],
                                              sync="bitmap")
        with ja, jb:
            jb.cancel()
            for j in (ja, jb):
                with pytest.raises(JobCancelled):
                    j.wait(timeout=60)
        assert [(bm.extents(), bm.generation) for bm in (bma, bmb)] == before


def test_group_bad_input_starts_nothing():
    size = 16 * CLUSTER
    pa = PyDisk(size, CLUSTER, os.urandom(size))
    pb = PyDisk(size, CLUSTER, os.urandom(size))
    a, b = Driver.from_python(pa, size), Driver.from_python(pb, size)
    ta_disk, tb_disk = PyDisk(size), PyDisk(size)
    ta, tb = Driver.from_python(ta_disk, size), Driver.from_python(tb_disk, size)
    small = Driver.memory(size // 2)
    bma, bmb = Bitmap.new(size), Bitmap.new(size)
    bma.mark(0, 1)
    bmb.mark(CLUSTER, 1)
    completions = len(cowbackup._completions)
    before = [(bm.extents(), bm.generation) for bm in (bma, bmb)]

    def nothing_started(running: int = 0) -> None:
        assert [(bm.extents(), bm.generation) for bm in (bma, bmb)] == before
        assert not bma.busy and not bmb.busy
        assert (pa.reads, pb.reads, ta_disk.writes, tb_disk.writes) == (0, 0, 0, 0)
        # No callback left registered (but those of `running` other jobs).
        assert len(cowbackup._completions) == completions + running

    ok_a = (a, ta, {"bitmap": bma, "sync": "bitmap"})
    library_refusals = [
        ([], "n is 0"),
        ([ok_a, (b, small, {"bitmap": bmb, "sync": "bitmap"})], "job 1"),  # wrong size in entry 1
        ([ok_a, (b, ta, {"bitmap": bmb, "sync": "bitmap"})], "same target"),
        ([ok_a, (b, tb, {"bitmap": bma, "sync": "bitmap"})], "same bitmap"),
        ([ok_a, (b, tb, {"sync": "bitmap"})], "job 1"),  # sync=bitmap without a bitmap
        ([ok_a, (b, tb, {"bitmap": bmb, "bitmap_mode": "never"})], "job 1"),  # never with full
    ]
    for jobs, words in library_refusals:
        with pytest.raises(InvalidArgument) as e:
            cowbackup.backup_start_group(jobs)
        assert words in str(e.value) and "cowbackup_backup_start_group" in str(e.value), str(e.value)
        nothing_started()
    python_refusals = [
        ("not a list", TypeError), (None, TypeError), ({"a": 1}, TypeError),
        ([ok_a, (b,)], TypeError), ([ok_a, (b, tb, {}, 4)], TypeError), ([ok_a, b], TypeError),
        ([ok_a, (b, "tb")], TypeError), ([ok_a, (b, tb, ["sync", "bitmap"])], TypeError),
        ([ok_a, (b, tb, {"speeed": 1})], TypeError), ([ok_a, (b, tb, {"bitmap": "bmb"})], TypeError),
        ([ok_a, (b, tb, {"sync": "sometimes"})], ValueError),
        ([ok_a, (b, tb, {"bitmap": bmb, "bitmap_mode": "sometimes"})], ValueError),
        ([ok_a, (b, tb, {"speed": -1})], ValueError),
    ]
    for jobs, exc in python_refusals:
        with pytest.raises(exc) as e:
            cowbackup.backup_start_group(jobs)
        if isinstance(jobs, list) and len(jobs) == 2:
            assert "jobs[1]" in str(e.value), str(e.value)
        nothing_started()
    # A bitmap in use by another job: EBUSY, and the other entry's bitmap stays free.
    with Driver.memory(size) as s3, Driver.memory(size) as t3, Bitmap.new(size) as held:
        with cowbackup.backup_start(s3, t3, sync="none", bitmap=held) as holder:
            with Driver.memory(size) as t4, pytest.raises(Busy):
                cowbackup.backup_start_group([ok_a, (s3, t4, {"bitmap": held, "sync": "bitmap"})])
            nothing_started(running=1)
    # The same inputs, corrected, work: both complete.
    jobs = cowbackup.backup_start_group([ok_a, (b, tb, {"bitmap": bmb})], sync="bitmap")
    for j in jobs:
        j.wait(timeout=60)
        j.close()
    assert bma.extents() == [] and bmb.extents() == []
    for d in (a, b, ta, tb, small, bma, bmb):
        d.close()


# Regression test of a core bug (fixed) described in test_bitmap.py
# (test_a_refused_second_job_leaves_the_first_jobs_bitmap_alone): a group refused because one
# of its bitmaps is busy unfreezes that bitmap under the job that holds it.
def test_group_refused_for_a_busy_bitmap_leaves_the_holder_alone():
    size = 16 * CLUSTER
    with Driver.memory(size) as a, Driver.memory(size) as ta, Driver.memory(size) as s3, \
            Driver.memory(size) as t3, Driver.memory(size) as t4, Bitmap.new(size) as bma, \
            Bitmap.new(size) as held:
        with cowbackup.backup_start(s3, t3, sync="none", bitmap=held) as holder:
            with pytest.raises(Busy):
                cowbackup.backup_start_group([(a, ta, {"bitmap": bma}),
                                              (s3, t4, {"bitmap": held, "sync": "bitmap"})])
            assert held.busy, "the holder's bitmap was unfrozen by the refused group"
            holder.cancel()
