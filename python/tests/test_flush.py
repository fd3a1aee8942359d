"""The job's final flush of the target, seen by a Python driver (DESIGN: "At the end the job
flushes the target"): exactly once, after the last write, before ``on_complete`` runs and
before ``Job.wait`` returns."""

from __future__ import annotations

import os
import random
import threading

import pytest

from conftest import KiB, MiB, PyDisk, first_diff

import cowbackup
from cowbackup import Driver, JobState

CLUSTER = 64 * KiB


class Recorder(PyDisk):
    """A target that logs its writes, write_zeroes and flushes in one order.

    A write is logged once done, a flush when it starts: "every write before the flush"
    in the log means no write overlapped the flush.
    """

    def __init__(self, size: int, data: bytes) -> None:
        super().__init__(size, data=data)
        self.log: list = []
        self.log_lock = threading.Lock()

    def mark(self, what: str) -> None:
        with self.log_lock:
            self.log.append(what)

    def write(self, offset: int, data: bytes) -> None:
        super().write(offset, data)
        self.mark("write")

    def write_zeroes(self, offset: int, n: int) -> None:
        super().write(offset, bytes(n))
        self.mark("write_zeroes")

    def flush(self) -> None:
        self.mark("flush")
        super().flush()


@pytest.mark.parametrize("sync", ["full", "top"])
def test_target_flushed_once_after_the_last_write_before_the_end(sync):
    size = 4 * MiB + 4097
    rng = random.Random(7)
    with Driver.memory(size) as source:
        # Data extents, zeroed data (written: DATA that reads as zero) and holes (Top skips them).
        for i, off in enumerate(range(0, size, 256 * KiB)):
            n = min(128 * KiB, size - off)
            if i % 3 == 0:
                source.write(off, rng.randbytes(n))
            elif i % 3 == 1:
                source.write(off, bytes(n))
        source.write(size - 4097, b"\x77" * 4097)
        reference = source.read(0, size)
        disk = Recorder(size, data=b"\xee" * size)  # a dirty target: zeroes must be written
        seen_at_callback = []

        def on_complete(ret: int) -> None:
            with disk.log_lock:
                seen_at_callback.append((ret, disk.log.count("flush")))
                disk.log.append("callback")

        with Driver.from_python(disk, size) as target:
            with cowbackup.backup_start(source, target, sync=sync, cluster_size=CLUSTER,
                                        speed=16 * MiB, max_chunk=256 * KiB,
                                        on_complete=on_complete) as job:
                for _ in range(32):
                    off = rng.randrange(0, size - 8192)
                    job.cow_before_write(off, 8192)
                    source.write(off, rng.randbytes(8192))
                job.wait(timeout=60)
                disk.mark("wait returned")
                info = job.info()
    log = list(disk.log)
    assert info.state == JobState.COMPLETED
    assert info.cow_requests > 0 and info.bytes_zero > 0, info
    assert log.count("flush") == 1, f"the target must be flushed exactly once: {log[-6:]}"
    flush = log.index("flush")
    writes = [i for i, op in enumerate(log) if op in ("write", "write_zeroes")]
    assert writes and "write_zeroes" in log
    assert writes[-1] < flush, f"a write after the final flush: {log[-6:]}"
    assert log[flush:] == ["flush", "callback", "wait returned"], log[-6:]
    assert seen_at_callback == [(0, 1)]
    assert first_diff(bytes(disk.buf), reference) == -1
