"""``WorkerPool``: many jobs copied by the threads of one pool (``backup_start(pool=...)``)."""

from __future__ import annotations

import os
import threading

import pytest

from conftest import MiB, first_diff, wait_for
from test_backup import hammer

import cowbackup
from cowbackup import Driver, JobState


def _thread_names():
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            pass
    return names


def test_jobs_share_a_pool_and_each_is_its_point_in_time(tmp_path):
    size, n = 4 * MiB, 12
    pool = cowbackup.WorkerPool(2)
    assert pool.threads == 2 and "threads=2" in repr(pool)
    assert wait_for(lambda: sum(t.startswith("cowbackup-p") for t in _thread_names()) >= 2), "pool threads"
    entries = []
    for i in range(n):
        sp, dp = tmp_path / f"s{i}", tmp_path / f"d{i}"
        sp.write_bytes(os.urandom(size))
        src, dst = Driver.open(sp, write=True), Driver.create(dp, size)
        ref = sp.read_bytes()
        job = cowbackup.backup_start(src, dst, pool=pool, speed=2 * MiB)
        entries.append((job, src, dst, sp, dp, ref))
    # The pool handle may go: each job holds the pool.
    pool.close()
    assert pool.closed
    # Host threads write through the hook into two of the sources while all the jobs run.
    out = {}

    def host(k):
        out[k] = hammer(entries[k][0], entries[k][1], threads=2, min_writes=20)

    hosts = [threading.Thread(target=host, args=(k,)) for k in (0, n - 1)]
    for h in hosts:
        h.start()
    assert wait_for(lambda: entries[0][0].info().cow_requests > 0), "a hook copy in job 0"
    for job, *_ in entries:
        job.set_speed(0)
    for h in hosts:
        h.join()
    for k, (writes, errors) in out.items():
        assert errors == [] and writes > 0, (k, errors)
    for job, src, dst, sp, dp, ref in entries:
        job.wait()
        assert job.info().state == JobState.COMPLETED
        assert first_diff(dp.read_bytes(), ref) == -1
        job.close()
        src.close()
        dst.close()


def test_pool_bad_input():
    with pytest.raises(cowbackup.InvalidArgument):
        cowbackup.WorkerPool(0)
    with pytest.raises(cowbackup.InvalidArgument):
        cowbackup.WorkerPool(257)
    with pytest.raises(ValueError):
        cowbackup.WorkerPool(2, priority="urgent")
    with pytest.raises(TypeError):
        cowbackup.WorkerPool("2")
    with pytest.raises(TypeError):
        cowbackup.backup_start(Driver.memory(MiB), Driver.memory(MiB), pool="pool")
    with cowbackup.WorkerPool(1, priority="low") as p:
        assert not p.closed
    assert p.closed
    p.close()  # idempotent
    with pytest.raises(ValueError):
        cowbackup.backup_start(Driver.memory(MiB), Driver.memory(MiB), pool=p)
