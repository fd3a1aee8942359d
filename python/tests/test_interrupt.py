"""KeyboardInterrupt / SystemExit inside Python code the library calls (issue 16, defect 7):
the library gets EINTR; on the calling Python thread the exception is raised again when the
library call returns; on a library thread, Job.wait raises it. Never turned into EIO."""

from __future__ import annotations

import errno
import logging
import os
import signal
import threading
import time

import pytest

import cowbackup
from conftest import KiB, MiB, PyDisk
from cowbackup import Driver, JobState

CLUSTER = 64 * KiB


class InterruptOnce(PyDisk):
    """A PyDisk whose next read raises ``exc`` once (``arm``), on any thread."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.armed: object = None
        self.raised_on: list = []

    def arm(self, exc: BaseException) -> None:
        self.armed = exc

    def read(self, offset: int, n: int) -> bytes:
        exc, self.armed = self.armed, None
        if exc is not None:
            self.raised_on.append(threading.current_thread().name)
            raise exc
        return super().read(offset, n)


def no_errors_logged(caplog) -> bool:
    return not [r for r in caplog.records if r.name == "cowbackup" and r.levelno >= logging.ERROR]


def test_keyboard_interrupt_in_a_driver_read_is_raised_by_driver_read(caplog):
    disk = InterruptOnce(MiB, data=os.urandom(MiB))
    with Driver.from_python(disk, MiB) as d:
        disk.arm(KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            d.read(0, 4096)
        assert d.read(0, 4096) == bytes(disk.buf[:4096])  # the next call works
        disk.arm(SystemExit(3))
        with pytest.raises(SystemExit) as exc:
            d.read(4096, 10)
        assert exc.value.code == 3
    assert no_errors_logged(caplog), caplog.text  # not logged as a driver failure (EIO)


def test_real_ctrl_c_during_a_driver_op_on_the_main_thread():
    """SIGINT while the library runs a Python op on the main thread: Python's handler raises
    KeyboardInterrupt inside the op; it comes out of the library call."""
    assert threading.current_thread() is threading.main_thread()
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is not Python's default handler here")

    class Slow(PyDisk):
        def read(self, offset: int, n: int) -> bytes:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, now
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # the handler runs between these bytecodes
                time.sleep(0.001)
            raise AssertionError("no KeyboardInterrupt within 10 s")

    with Driver.from_python(Slow(MiB), MiB) as d:
        t = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            d.read(0, 512)
        assert time.monotonic() - t < 5


def test_keyboard_interrupt_in_the_hook_is_raised_by_cow_before_write():
    """The hook copies on the calling thread: an interrupt in the source's read comes out of
    cow_before_write; the hook failed (EINTR) so the clusters are retried, and the backup is
    still exact."""
    size = 2 * MiB
    original = os.urandom(size)
    disk = InterruptOnce(size, data=original)
    with Driver.from_python(disk, size) as src, Driver.memory(size) as dst:
        with cowbackup.backup_start(src, dst, speed=1, workers=1, cluster_size=CLUSTER) as job:
            job.pause()
            disk.arm(KeyboardInterrupt())
            with pytest.raises(KeyboardInterrupt):
                job.cow_before_write(3 * CLUSTER, 100)
            assert disk.raised_on == [threading.current_thread().name]
            job.cow_before_write(3 * CLUSTER, 100)  # retried: now it copies
            src.write(3 * CLUSTER, b"\xff" * 100)
            job.set_speed(0)
            job.resume()
            job.wait(timeout=60)
            assert job.info().state == JobState.COMPLETED
        assert dst.read(0, size) == original


def test_keyboard_interrupt_on_a_worker_thread_is_raised_by_wait(caplog):
    size = 2 * MiB
    disk = InterruptOnce(size, data=os.urandom(size))
    with Driver.from_python(disk, size) as src, Driver.memory(size) as dst:
        disk.arm(KeyboardInterrupt())
        with cowbackup.backup_start(src, dst, workers=1) as job:
            with pytest.raises(KeyboardInterrupt):
                job.wait(timeout=60)
            info = job.info()
            # The op returned EINTR to the library: the job failed with it (policy "report").
            assert info.state == JobState.FAILED and info.error == -errno.EINTR
            assert disk.raised_on and disk.raised_on[0] != threading.current_thread().name
            # Raised once: the next wait reports the job's own error.
            with pytest.raises(cowbackup.CowbackupError) as exc:
                job.wait()
            assert exc.value.errno == errno.EINTR
    assert "raised KeyboardInterrupt on a library thread" in caplog.text


def test_system_exit_in_on_complete_is_raised_by_wait():
    with Driver.memory(MiB) as src, Driver.memory(MiB) as dst:
        def on_complete(ret: int) -> None:
            raise SystemExit(7)

        with cowbackup.backup_start(src, dst, on_complete=on_complete) as job:
            with pytest.raises(SystemExit) as exc:
                job.wait(timeout=60)
            assert exc.value.code == 7
            assert job.info().state == JobState.COMPLETED  # the job itself succeeded
            job.wait()  # raised once


def test_keyboard_interrupt_in_trace_during_the_hook():
    """trace runs on the thread that caused the event: the hook's events on the caller."""
    size = 2 * MiB
    original = os.urandom(size)
    armed = [True]

    def trace(ev: cowbackup.TraceEvent) -> None:
        if ev.kind == "hook_begin" and armed[0]:
            armed[0] = False
            raise KeyboardInterrupt

    with Driver.memory(size) as src, Driver.memory(size) as dst:
        src.write(0, original)
        with cowbackup.backup_start(src, dst, speed=1, workers=1, cluster_size=CLUSTER,
                                    trace=trace) as job:
            job.pause()
            with pytest.raises(KeyboardInterrupt):
                job.cow_before_write(5 * CLUSTER, 10)
            assert not armed[0]
            # A trace callback cannot fail the hook: its copy was done.
            assert job.info().cow_requests == 1
            src.write(5 * CLUSTER, b"\0" * 10)
            job.set_speed(0)
            job.resume()
            job.wait(timeout=60)
        assert dst.read(0, size) == original
