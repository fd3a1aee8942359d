"""Error policies and failing Python drivers: errors reach Python as OSError, never a crash."""

from __future__ import annotations

import errno
import logging
import os
import threading
import time

import pytest

from conftest import KiB, MiB, PyDisk, wait_for

import cowbackup
from cowbackup import CowbackupError, Driver, JobState

CLUSTER = 64 * KiB
SIZE = 2 * MiB
BAD = 5  # the failing cluster


def make(fail_source=False, **kw):
    """(source disk, target disk, source driver, target driver)."""
    src = PyDisk(SIZE, data=os.urandom(SIZE))
    dst = PyDisk(SIZE)
    if fail_source:
        src.fail_read.add(BAD)
    return src, dst, Driver.from_python(src, SIZE), Driver.from_python(dst, SIZE)


def start(s, t, **kw):
    kw.setdefault("cluster_size", CLUSTER)
    kw.setdefault("max_chunk", CLUSTER)
    return cowbackup.backup_start(s, t, **kw)


def test_source_error_report(caplog):
    src, dst, s, t = make(fail_source=True)
    with s, t, start(s, t, on_source_error="report") as job:
        with pytest.raises(OSError) as exc:
            job.wait(timeout=30)
        assert isinstance(exc.value, CowbackupError)
        assert exc.value.errno == errno.EIO
        info = job.info()
        assert info.state == JobState.FAILED
        assert info.error == -errno.EIO
    assert "injected read error at cluster 5" in caplog.text
    assert "Python driver PyDisk.read" in caplog.text


def test_source_error_ignore():
    src, dst, s, t = make(fail_source=True)
    with s, t, start(s, t, on_source_error="ignore") as job:
        with pytest.raises(OSError) as exc:
            job.wait(timeout=30)
        assert exc.value.errno == errno.EIO
        info = job.info()
        failed = job.failed_ranges()
    assert info.state == JobState.FAILED
    assert info.bytes_failed == CLUSTER
    assert info.offset == SIZE  # everything else was done
    assert failed == [(BAD * CLUSTER, CLUSTER)]
    bad = slice(BAD * CLUSTER, (BAD + 1) * CLUSTER)
    assert dst.buf[:bad.start] == src.buf[:bad.start]
    assert dst.buf[bad.stop:] == src.buf[bad.stop:]


def test_source_error_stop_then_resume():
    src, dst, s, t = make(fail_source=True)
    with s, t, start(s, t, on_source_error="stop") as job:
        assert wait_for(lambda: job.info().state == JobState.PAUSED)
        info = job.info()
        assert info.error == -errno.EIO
        src.fail_read.clear()
        job.resume()
        job.wait(timeout=30)
        assert job.info().state == JobState.COMPLETED
    assert dst.buf == src.buf


def test_target_enospc_pauses_then_resume_completes():
    src, dst, s, t = make()
    dst.fail_write_errno = errno.ENOSPC
    with s, t, start(s, t, on_target_error="enospc") as job:
        assert wait_for(lambda: job.info().state == JobState.PAUSED)
        info = job.info()
        assert info.error == -errno.ENOSPC
        assert dst.failed_writes > 0
        dst.fail_write_errno = None  # "make room"
        job.resume()
        job.wait(timeout=30)
        assert job.info().state == JobState.COMPLETED
    assert dst.buf == src.buf


def test_target_eio_under_enospc_policy_fails():
    src, dst, s, t = make()
    dst.fail_write_errno = errno.EIO
    with s, t, start(s, t, on_target_error="enospc") as job:
        with pytest.raises(OSError) as exc:
            job.wait(timeout=30)
        assert exc.value.errno == errno.EIO
        assert job.info().state == JobState.FAILED


def test_target_enospc_report_is_oserror_subclass():
    src, dst, s, t = make()
    dst.fail_write_errno = errno.ENOSPC
    with s, t, start(s, t) as job:
        with pytest.raises(CowbackupError) as exc:
            job.wait(timeout=30)
        assert exc.value.errno == errno.ENOSPC
        assert exc.value.strerror  # the library's message


def test_python_exception_in_read_becomes_eio_and_is_logged(caplog):
    src, dst, s, t = make()
    src.raise_in_read = RuntimeError("driver bug")
    with caplog.at_level(logging.ERROR, logger="cowbackup"):
        with s, t, start(s, t) as job:
            with pytest.raises(OSError) as exc:
                job.wait(timeout=30)
            assert exc.value.errno == errno.EIO
            assert job.info().state == JobState.FAILED
    assert "RuntimeError: driver bug" in caplog.text  # with the traceback
    assert "Traceback" in caplog.text
    assert any(r.name == "cowbackup" for r in caplog.records)


def test_exception_in_hook_copy_raises_eio(caplog):
    src, dst, s, t = make()
    with s, t, start(s, t, sync="none") as job:
        src.raise_in_read = ValueError("boom")
        with pytest.raises(OSError) as exc:
            job.cow_before_write(0, 10)
        assert exc.value.errno == errno.EIO
        assert isinstance(exc.value, CowbackupError)
        # break-guest-write: the snapshot stays valid and a later call retries.
        src.raise_in_read = None
        job.cow_before_write(0, 10)
        assert job.info().cow_requests >= 1
        assert dst.buf[:CLUSTER] == src.buf[:CLUSTER]
        job.cancel()
    assert "ValueError: boom" in caplog.text


def test_oserror_errno_from_python_target_reaches_hook():
    src, dst, s, t = make()
    dst.fail_write_errno = errno.ENOSPC
    with s, t, start(s, t, sync="none") as job:
        with pytest.raises(CowbackupError) as exc:
            job.cow_before_write(CLUSTER, 1)
        assert exc.value.errno == errno.ENOSPC
        job.cancel()


def test_break_snapshot_hook_succeeds_job_fails():
    src, dst, s, t = make(fail_source=True)
    with s, t, start(s, t, sync="none", on_cbw_error="break-snapshot") as job:
        job.cow_before_write(BAD * CLUSTER, 1)  # the copy fails, the write may go on
        with pytest.raises(OSError) as exc:
            job.wait(timeout=10)
        assert exc.value.errno == errno.EIO
        assert job.info().state == JobState.FAILED
        job.cow_before_write(0, 1)  # a no-op once the job failed


def _cbw_timeout_run():
    """Thread 1 hooks cluster 0, whose read takes 1.5 s; thread 2 then hooks cluster 0 too,
    with cbw_timeout=0.2. Returns (thread 1's result, thread 2's exception or "ok", thread 2's
    elapsed seconds, source disk, target disk)."""
    src, dst, s, t = make()
    src.slow_read = {0: 1.5}
    first_result = []

    def first_hook():
        try:
            job.cow_before_write(0, 1)
            first_result.append("ok")
        except BaseException as e:
            first_result.append(e)

    with s, t, start(s, t, sync="none", cbw_timeout=0.2) as job:
        first = threading.Thread(target=first_hook)
        first.start()  # claims cluster 0, reads it for 1.5 s
        assert wait_for(lambda: src.active == 1)
        t0 = time.monotonic()
        try:
            job.cow_before_write(100, 1)  # waits for the first thread's claim
            second = "ok"
        except BaseException as e:
            second = e
        elapsed = time.monotonic() - t0
        first.join()
        job.cancel()
    return first_result[0], second, elapsed, src, dst


def test_cbw_timeout_bounds_wait_for_other_threads_copy():
    _, second, elapsed, _, _ = _cbw_timeout_run()
    assert isinstance(second, TimeoutError), second
    assert isinstance(second, CowbackupError)
    assert second.errno == errno.ETIMEDOUT
    assert elapsed < 1.2


def test_cbw_timeout_limits_own_copy_and_the_copy_goes_on():
    """cowbackup.h: cbw_timeout limits the whole hook call (QEMU's cbw-timeout): the thread
    whose own copy is slow gets ETIMEDOUT too, and the copy goes on in the background until
    the old data is in the target (freeing the job waits for it)."""
    first, _, _, src, dst = _cbw_timeout_run()
    assert isinstance(first, TimeoutError), first
    assert first.errno == errno.ETIMEDOUT
    assert dst.buf[:CLUSTER] == src.buf[:CLUSTER]


def test_read_returning_wrong_length_is_eio(caplog):
    class Short(PyDisk):
        def read(self, offset, n):
            return b"short"

    disk = Short(SIZE)
    with Driver.from_python(disk, SIZE) as d:
        with pytest.raises(OSError) as exc:
            d.read(0, 4096)
        assert exc.value.errno == errno.EIO
    assert "read returned 5 bytes, 4096 were asked" in caplog.text


def test_bad_block_status_fails_top_start(caplog):
    class Bad(PyDisk):
        def block_status(self, offset, n):
            return "nonsense"

    with Driver.from_python(Bad(SIZE), SIZE) as s, Driver.memory(SIZE) as t:
        with pytest.raises(OSError) as exc:
            cowbackup.backup_start(s, t, sync="top")
        assert exc.value.errno == errno.EIO
    assert "block_status must return" in caplog.text


def test_on_complete_exception_is_logged(caplog):
    def on_complete(ret):
        raise KeyError("oops")

    with Driver.memory(SIZE) as s, Driver.memory(SIZE) as t:
        with cowbackup.backup_start(s, t, on_complete=on_complete) as job:
            job.wait(timeout=30)
            assert job.info().state == JobState.COMPLETED
    assert "on_complete(0) raised" in caplog.text
