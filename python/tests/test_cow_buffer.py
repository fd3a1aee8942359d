"""``cow_buffer``: the hook keeps old data in memory and returns without writing the target."""

from __future__ import annotations

import errno
import os

import pytest

from conftest import KiB, MiB, PyDisk, first_diff, wait_for
from test_backup import hammer

import cowbackup
from cowbackup import Driver, JobState

CLUSTER = 64 * KiB


def test_live_file_backup_with_a_small_buffer_is_exact(tmp_path):
    size = 24 * MiB
    src_path, dst_path = tmp_path / "source.img", tmp_path / "backup.img"
    src_path.write_bytes(os.urandom(size))
    reference = src_path.read_bytes()
    with Driver.open(src_path, write=True) as source, Driver.create(dst_path, size) as target:
        with cowbackup.backup_start(source, target, cow_buffer=512 * KiB, speed=size,
                                    max_chunk=256 * KiB) as job:
            writes, errors = hammer(job, source, threads=4, min_writes=40)
            info = job.info()
    assert errors == []
    assert info.state == JobState.COMPLETED and info.error == 0
    assert info.cow_requests > 0
    assert src_path.read_bytes() != reference, "the writers changed nothing"
    assert first_diff(dst_path.read_bytes(), reference) == -1


@pytest.mark.parametrize("buffered", [False, True])
def test_hook_does_not_touch_a_failing_target(buffered):
    """Every target write fails. Without a buffer the hook raises (the host must fail its
    write); with one it returns, and the failure pauses the job (on_target_error="stop").
    Once the target works again, resume: the backup holds the old data."""
    size = 4 * MiB
    data = os.urandom(size)
    disk = PyDisk(size)
    disk.fail_write_errno = errno.EIO
    with Driver.memory(size) as source, Driver.from_python(disk, size) as target:
        source.write(0, data)
        kw = {"cow_buffer": MiB} if buffered else {}
        with cowbackup.backup_start(source, target, cluster_size=CLUSTER, workers=1,
                                    max_chunk=CLUSTER, on_target_error="stop", **kw) as job:
            off = size - 2 * CLUSTER
            if buffered:
                job.cow_before_write(off, 2 * CLUSTER)
                source.write(off, b"\xee" * (2 * CLUSTER))
            else:
                with pytest.raises(cowbackup.CowbackupError) as e:
                    job.cow_before_write(off, 2 * CLUSTER)
                assert e.value.errno == errno.EIO
            assert wait_for(lambda: job.info().state == JobState.PAUSED)
            assert job.info().error == -errno.EIO
            disk.fail_write_errno = None
            job.resume()
            job.wait(timeout=60)
            assert job.info().state == JobState.COMPLETED
        assert first_diff(bytes(disk.buf), data) == -1


def test_bad_cow_buffer_values_are_rejected():
    with Driver.memory(MiB) as source, Driver.memory(MiB) as target:
        with pytest.raises(cowbackup.InvalidArgument, match="cow_buffer"):
            cowbackup.backup_start(source, target, sync="none", cow_buffer=MiB)
        with pytest.raises(ValueError):
            cowbackup.backup_start(source, target, cow_buffer=-1)
        with pytest.raises(TypeError):
            cowbackup.backup_start(source, target, cow_buffer="16M")
        assert target.read(0, MiB) == bytes(MiB)
