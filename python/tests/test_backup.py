"""Live backups through the binding: point-in-time exactness, sync modes, job control."""

from __future__ import annotations

import errno
import gc
import os
import random
import threading
import time
import weakref

import pytest

from conftest import KiB, MiB, PyDisk, first_diff, wait_for

import cowbackup
from cowbackup import Driver, JobCancelled, JobState

CLUSTER = 64 * KiB


def fill_random(drv: Driver, zero_every: int = 4) -> None:
    """Random data in most clusters, every ``zero_every``-th MiB left zero."""
    for i, off in enumerate(range(0, drv.size, MiB)):
        if i % zero_every != zero_every - 1:
            drv.write(off, os.urandom(min(MiB, drv.size - off)))


def hammer(job: cowbackup.Job, source: Driver, threads: int, min_writes: int) -> tuple:
    """``threads`` writers writing random data through the hook until the job ended and
    each wrote ``min_writes`` times.

    Returns (writes, errors). Each write: the hook, then source.write.
    """
    stop = threading.Event()
    counts = [0] * threads
    errors = []

    def writer(idx: int) -> None:
        rng = random.Random(idx)
        try:
            while not stop.is_set() and (counts[idx] < min_writes or not job.info().ended):
                n = rng.randint(1, 256 * KiB)
                off = rng.randrange(0, source.size - n)
                data = rng.randbytes(n)
                job.cow_before_write(off, n)
                source.write(off, data)
                counts[idx] += 1
        except BaseException as e:  # reported by the test
            errors.append(e)

    ts = [threading.Thread(target=writer, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    try:
        job.wait(timeout=60)
    except BaseException:
        stop.set()
        raise
    finally:
        for t in ts:  # each does at least min_writes (after the end the hook is a no-op)
            t.join()
    return sum(counts), errors


def live_backup(source: Driver, target: Driver, **kw) -> tuple:
    reference = source.read(0, source.size)
    done = []
    with cowbackup.backup_start(source, target, cluster_size=CLUSTER, on_complete=done.append,
                                **kw) as job:
        writes, errors = hammer(job, source, threads=8, min_writes=40)
        info = job.info()
    assert errors == []
    assert done == [0]
    assert info.state == JobState.COMPLETED and info.error == 0
    assert info.offset == info.len == source.size and info.progress == 1.0
    assert info.cow_requests > 0, "the writers never hit an uncopied cluster: test too easy"
    assert writes >= 8 * 40
    assert source.read(0, source.size) != reference, "the writers changed nothing"
    return reference, info


def test_live_backup_memory_8_threads():
    size = 32 * MiB
    with Driver.memory(size) as source, Driver.memory(size) as target:
        fill_random(source)
        # Background copy throttled (~1.5 s alone): the writers reach many clusters first.
        reference, info = live_backup(source, target, speed=size * 2 // 3, workers=3)
        assert first_diff(target.read(0, size), reference) == -1
        assert info.bytes_zero > 0  # the zero MiBs were detected
        assert info.bytes_copied + info.bytes_zero == size


def test_live_backup_file_8_threads(tmp_path):
    size = 24 * MiB
    src_path, dst_path = tmp_path / "source.img", tmp_path / "backup.img"
    with open(src_path, "wb") as f:
        f.write(os.urandom(size))
    with Driver.open(src_path, write=True) as source, Driver.create(dst_path, size) as target:
        reference, _ = live_backup(source, target, speed=size, max_chunk=256 * KiB)
    assert dst_path.stat().st_size == size
    assert first_diff(dst_path.read_bytes(), reference) == -1
    assert src_path.read_bytes() != reference


def test_live_backup_python_source(tmp_path):
    """A source implemented in Python: the library's threads call into Python concurrently."""
    size = 8 * MiB
    disk = PyDisk(size, data=os.urandom(size))
    with Driver.from_python(disk, size) as source, Driver.memory(size) as target:
        reference, _ = live_backup(source, target, speed=6 * MiB, workers=4)
        assert first_diff(target.read(0, size), reference) == -1
    assert disk.reads > 0


def test_sync_top_sparse_file(tmp_path):
    size = 16 * MiB
    with Driver.create(tmp_path / "sparse.img", size) as source, Driver.memory(size) as target:
        written = [(0, os.urandom(CLUSTER)), (3 * MiB + 100, os.urandom(5000)),
                   (10 * MiB, os.urandom(2 * CLUSTER))]
        for off, data in written:
            source.write(off, data)
        with cowbackup.backup_start(source, target, sync="top", cluster_size=CLUSTER) as job:
            job.wait(timeout=30)
            info = job.info()
        assert target.read(0, size) == source.read(0, size)
        assert info.state == JobState.COMPLETED
        assert info.bytes_skipped > 0
        assert info.bytes_skipped <= size - 4 * CLUSTER
        assert info.offset == size


def test_sync_top_python_block_status():
    size = 4 * MiB

    class Sparse(PyDisk):
        def block_status(self, offset, n):
            # First MiB allocated, the rest holes.
            if offset < MiB:
                return min(n, MiB - offset), cowbackup.STATUS_DATA
            return n, cowbackup.STATUS_ZERO

    disk = Sparse(size)
    disk.buf[:MiB] = os.urandom(MiB)
    with Driver.from_python(disk, size) as source, Driver.memory(size) as target:
        with cowbackup.backup_start(source, target, sync="top", cluster_size=CLUSTER) as job:
            job.wait(timeout=30)
            info = job.info()
        assert target.read(0, size) == bytes(disk.buf)
        assert info.bytes_skipped == size - MiB
        assert info.bytes_copied == MiB


def test_sync_none_cancel_keeps_hooked_old_data():
    size = 4 * MiB
    with Driver.memory(size) as source, Driver.memory(size) as target:
        source.write(0, os.urandom(size))
        reference = source.read(0, size)
        with cowbackup.backup_start(source, target, sync="none", cluster_size=CLUSTER) as job:
            with pytest.raises(TimeoutError) as exc:
                job.wait(timeout=0.2)  # a sync=none job runs until cancelled
            assert not isinstance(exc.value, cowbackup.CowbackupError)
            assert job.info().state == JobState.RUNNING
            hooked = [(100, 50), (MiB + 5, 70000)]
            for off, n in hooked:
                job.cow_before_write(off, n)
                source.write(off, os.urandom(n))
            mid = job.info()
            assert mid.cow_requests == 2 and mid.cow_bytes == 3 * CLUSTER
            job.cancel()
            with pytest.raises(JobCancelled) as exc:
                job.wait(timeout=10)
            assert exc.value.errno == errno.ECANCELED
            assert isinstance(exc.value, OSError)
            info = job.info()
            assert info.state == JobState.CANCELLED
            job.cow_before_write(3 * MiB, 10)  # a no-op now
            assert job.info().cow_requests == 2
        after = target.read(0, size)
        # Old data of the hooked clusters is in the target...
        assert after[0:CLUSTER] == reference[0:CLUSTER]
        assert after[16 * CLUSTER:18 * CLUSTER] == reference[16 * CLUSTER:18 * CLUSTER]
        # ...and nothing else was copied.
        assert after[CLUSTER:16 * CLUSTER] == bytes(15 * CLUSTER)
        assert after[18 * CLUSTER:] == bytes(size - 18 * CLUSTER)
        assert source.read(0, CLUSTER) != reference[0:CLUSTER]


def test_pause_resume():
    size = 16 * MiB
    with Driver.memory(size) as source, Driver.memory(size) as target:
        source.write(0, os.urandom(size))
        reference = source.read(0, size)
        with cowbackup.backup_start(source, target, speed=4 * MiB, max_chunk=CLUSTER) as job:
            assert wait_for(lambda: job.info().offset > 0)
            job.pause()
            job.pause()  # idempotent
            assert job.info().state == JobState.PAUSED
            time.sleep(0.3)  # chunks in flight finish
            off1 = job.info().offset
            time.sleep(0.4)
            paused = job.info()
            assert paused.offset == off1, "background copy went on while paused"
            assert paused.state == JobState.PAUSED
            # The hook works while paused: the last cluster is not copied yet.
            job.cow_before_write(size - 10, 10)
            source.write(size - 10, b"0123456789")
            after_hook = job.info()
            assert after_hook.cow_requests == paused.cow_requests + 1
            job.resume()
            assert job.info().state == JobState.RUNNING
            job.set_speed(0)
            assert job.info().speed == 0
            job.wait(timeout=30)
            assert job.info().state == JobState.COMPLETED
        assert target.read(0, size) == reference


def test_cancel_running_job():
    size = 16 * MiB
    done = []
    with Driver.memory(size) as source, Driver.memory(size) as target:
        source.write(0, os.urandom(size))
        job = cowbackup.backup_start(source, target, speed=MiB, on_complete=done.append)
        try:
            assert job.info().speed == MiB
            job.set_speed(2 * MiB)
            assert job.info().speed == 2 * MiB
            assert 0.0 <= job.progress < 1.0
            job.cancel()
            with pytest.raises(JobCancelled):
                job.wait(timeout=10)
            assert done == [-errno.ECANCELED]
            info = job.info()
            assert info.state == JobState.CANCELLED and info.ended
            with pytest.raises(cowbackup.CowbackupError) as exc:
                job.pause()  # the job has ended
            assert exc.value.errno == errno.EBUSY
            assert "pause" in str(exc.value)
            job.cancel()  # no effect, no error, on an ended job
        finally:
            job.close()
        job.close()  # idempotent
        assert done == [-errno.ECANCELED]


def test_on_complete_called_once_with_zero():
    size = 2 * MiB
    calls = []
    threads = []

    def on_complete(ret):
        calls.append(ret)
        threads.append(threading.current_thread().name)

    with Driver.memory(size) as source, Driver.memory(size) as target:
        source.write(0, os.urandom(size))
        with cowbackup.backup_start(source, target, on_complete=on_complete) as job:
            job.wait(timeout=30)
            assert calls == [0]  # wait returns after on_complete ran
            job.wait()  # again: returns at once
            time.sleep(0.1)
        assert calls == [0]
        assert threads[0] != threading.current_thread().name


def test_exit_of_with_block_cancels_running_job():
    size = 16 * MiB
    done = []
    with Driver.memory(size) as source, Driver.memory(size) as target:
        source.write(0, os.urandom(size))
        with cowbackup.backup_start(source, target, speed=MiB, on_complete=done.append) as job:
            assert not job.info().ended
        assert done == [-errno.ECANCELED]
        assert job.closed
        with pytest.raises(ValueError, match="closed"):
            job.info()


def test_wait_from_many_threads_and_close_while_waiting():
    size = 8 * MiB
    results = []
    with Driver.memory(size) as source, Driver.memory(size) as target:
        source.write(0, os.urandom(size))
        job = cowbackup.backup_start(source, target, speed=MiB)

        def waiter():
            try:
                job.wait()
                results.append("ok")
            except BaseException as e:
                results.append(e)

        ts = [threading.Thread(target=waiter) for _ in range(4)]
        for t in ts:
            t.start()
        time.sleep(0.1)
        job.close()  # cancels: the waiters return, then the job is freed
        for t in ts:
            t.join(10)
        assert len(results) == 4
        assert all(isinstance(r, JobCancelled) for r in results), results


def test_python_driver_lives_until_release():
    size = 4 * MiB
    disk = PyDisk(size, data=os.urandom(size))
    ref = weakref.ref(disk)
    source = Driver.from_python(disk, size)
    target = Driver.memory(size)
    del disk
    job = cowbackup.backup_start(source, target, speed=4 * MiB)
    source.close()  # the job keeps the device, and the Python object, alive
    target.close()
    del source
    gc.collect()
    assert ref() is not None
    job.wait(timeout=30)
    assert ref().reads > 0
    job.close()  # last reference: the library calls release
    gc.collect()
    assert ref() is None
    assert cowbackup._py_drivers == {}


def test_serialize_runs_ops_one_at_a_time():
    size = 4 * MiB

    def run(serialize: bool) -> int:
        disk = PyDisk(size, data=os.urandom(size))
        disk.slow_read = {c: 0.01 for c in range(size // CLUSTER)}
        with Driver.from_python(disk, size, serialize=serialize) as source, \
                Driver.memory(size) as target:
            with cowbackup.backup_start(source, target, workers=4, max_chunk=CLUSTER,
                                        cluster_size=CLUSTER) as job:
                job.wait(timeout=30)
            assert target.read(0, size) == bytes(disk.buf)
        return disk.max_active

    assert run(True) == 1
    assert run(False) > 1  # 4 workers call Python concurrently (sleep releases the GIL)


def test_trace_events_reach_python():
    """Every kind of event arrives as a TraceEvent, from library threads and the hook."""
    size = 2 * MiB
    events: list = []
    lock = threading.Lock()

    def on_event(e: cowbackup.TraceEvent) -> None:
        with lock:
            events.append(e)

    with Driver.memory(size) as s, Driver.memory(size) as t:
        s.write(0, random.Random(3).randbytes(size - 128 * KiB))  # the last 128 KiB read as zero
        with cowbackup.backup_start(s, t, speed=1, workers=1, max_chunk=64 * KiB, trace=on_event) as job:
            job.cow_before_write(MiB, 4096)  # copies one cluster itself
            s.write(MiB, b"x" * 4096)
            job.cow_before_write(MiB, 4096)  # fast path: no event
            job.pause()
            job.resume()
            job.set_speed(0)
            job.wait(timeout=30)
    kinds = [e.kind for e in events]
    assert kinds.count("hook_begin") == 1 and kinds.count("hook_end") == 1, kinds
    end = next(e for e in events if e.kind == "hook_end")
    assert end.error == 0 and end.data == 64 * KiB and end.wait_ns > 0
    assert any(e.kind == "chunk" and e.hook and e.offset == MiB for e in events)
    assert sum(e.len for e in events if e.kind == "zero") == 128 * KiB
    states = [(JobState(e.from_state), JobState(e.to_state)) for e in events if e.kind == "state"]
    assert states == [(JobState.RUNNING, JobState.PAUSED), (JobState.PAUSED, JobState.RUNNING),
                      (JobState.RUNNING, JobState.COMPLETED)]
    assert all(e.message for e in events)
    assert any(e.message.startswith("backup_chunk_copied job=") for e in events)


def test_trace_callback_that_raises_is_logged(caplog):
    def boom(e):
        raise ValueError("trace bug")

    with Driver.memory(MiB) as s, Driver.memory(MiB) as t:
        with cowbackup.backup_start(s, t, trace=boom) as job:
            job.wait(timeout=30)
            assert job.info().state == JobState.COMPLETED
    assert "trace callback raised" in caplog.text
    with pytest.raises(TypeError):
        with Driver.memory(MiB) as s, Driver.memory(MiB) as t:
            cowbackup.backup_start(s, t, trace=42)


def _worker_policies() -> list:
    """Scheduling policy and nice of every job worker thread ``cowbackup-<id>-<n>``."""
    import re
    out = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if re.fullmatch(r"cowbackup-\d+-\d+", comm):
            out.append((os.sched_getscheduler(int(tid)), os.getpriority(os.PRIO_PROCESS, int(tid))))
    return out


@pytest.mark.parametrize("prio,policy,nice", [
    (None, None, None),
    ("low", os.SCHED_BATCH, 19),
    ("idle", os.SCHED_IDLE, None),
    ("normal", None, None),
])
def test_worker_priority_reaches_the_threads(prio, policy, nice):
    """``worker_priority`` is applied to the worker threads (read back from the kernel)."""
    size = 4 * MiB
    with Driver.memory(size) as s, Driver.memory(size) as t:
        fill_random(s)
        kw = {} if prio is None else {"worker_priority": prio}
        with cowbackup.backup_start(s, t, speed=1, workers=2, max_chunk=64 * KiB, **kw) as job:
            assert wait_for(lambda: len(_worker_policies()) == 2, timeout=20)
            mine = (os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0))
            for got in _worker_policies():
                assert got[0] == (mine[0] if policy is None else policy), got
                if nice is not None or policy is None:
                    assert got[1] == (mine[1] if nice is None else nice), got
            job.cancel()
            with pytest.raises(JobCancelled):
                job.wait(timeout=30)
    with Driver.memory(size) as s, Driver.memory(size) as t:
        with pytest.raises(ValueError):
            cowbackup.backup_start(s, t, worker_priority="realtime")
