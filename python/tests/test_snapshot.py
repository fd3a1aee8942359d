"""The snapshot view from Python: Job.snapshot(), Driver.discard / block_status / flush,
Job.complete(), discard_source (fleecing, pull mode)."""
import errno
import os
import threading

import pytest

import cowbackup
from cowbackup import Bitmap, Driver, backup_start

K64 = 64 * 1024
MiB = 1 << 20


def test_image_fleecing_reads_the_point_in_time_and_copies_nothing():
    size = 16 * K64
    with Driver.memory(size) as src, Driver.memory(size) as scratch:
        src.write(0, b"\x11" * size)
        for c in (0, 2):
            src.write(c * K64, b"\x22" * K64)
        with backup_start(src, scratch, sync="none") as job:
            view = job.snapshot()
            assert view.size == size
            whole = view.read(0, size)
            assert job.info().bytes_copied == 0, "a view read never copies"
            for c in (0, 5):
                job.cow_before_write(c * K64, K64)
                src.write(c * K64, b"\x33" * K64)
            assert view.read(0, K64) == b"\x22" * K64
            assert view.read(2 * K64, K64) == b"\x22" * K64
            assert view.read(5 * K64, K64) == b"\x11" * K64
            assert view.read(0, size) == whole
            assert src.read(0, K64) == b"\x33" * K64
            with pytest.raises(OSError) as e:
                view.write(0, b"x")
            assert e.value.errno == errno.EROFS
            ext = view.block_status()
            assert ext[0].offset == 0 and ext[-1].end == size
            assert sum(x.length for x in ext) == size
            job.complete()
            job.wait(timeout=30)
            assert job.info().state == cowbackup.JobState.COMPLETED
        with pytest.raises(OSError) as e:
            view.read(0, 1)
        assert e.value.errno == errno.ESTALE
        view.close()


def test_discard_on_a_view_releases_scratch_space(tmp_path):
    size = 4 * MiB
    with Driver.memory(size) as src, Driver.create(tmp_path / "scratch", size) as scratch:
        src.write(0, os.urandom(size))
        with backup_start(src, scratch, sync="none") as job:
            view = job.snapshot()
            job.cow_before_write(0, 100)
            assert any(x.data for x in scratch.block_status(0, MiB))
            view.discard(0, MiB)
            assert not any(x.data for x in scratch.block_status(0, MiB)), "space released"
            with pytest.raises(OSError) as e:
                view.read(0, 10)
            assert e.value.errno == errno.EACCES
            view.read(MiB, 10)
            job.cancel()
        view.close()


def test_pull_mode_serves_only_the_bitmap_and_complete_keeps_new_writes():
    size = 16 * K64
    with Driver.memory(size) as src, Driver.memory(size) as scratch, Bitmap.new(size) as bm:
        src.write(0, os.urandom(size))
        before = src.read(0, size)
        bm.mark(0, 1)
        bm.mark(2 * K64, 1)
        with backup_start(src, scratch, sync="none", bitmap=bm) as job:
            view = job.snapshot()
            with pytest.raises(OSError) as e:
                view.read(5 * K64, 10)
            assert e.value.errno == errno.EACCES
            bm.mark(2 * K64, 10)
            job.cow_before_write(2 * K64, 10)
            src.write(2 * K64, b"\x09" * 10)
            assert view.read(2 * K64, K64) == before[2 * K64:3 * K64]
            job.complete()
            job.wait(timeout=30)
        assert bm.extents() == [(2 * K64, K64)]
        view.close()


def test_push_from_a_view_with_discard_source_leaves_the_scratch_empty(tmp_path):
    size = 8 * MiB
    with Driver.memory(size) as src, Driver.create(tmp_path / "scratch", size) as scratch, \
            Driver.memory(size) as backup:
        src.write(0, os.urandom(size))
        before = src.read(0, size)
        with backup_start(src, scratch, sync="none") as fleece:
            view = fleece.snapshot()
            stop = threading.Event()

            def writer():
                import random
                r = random.Random(5)
                while not stop.is_set():
                    off = r.randrange(0, size - 4096)
                    fleece.cow_before_write(off, 4096)
                    src.write(off, os.urandom(4096))

            t = threading.Thread(target=writer)
            t.start()
            try:
                with backup_start(view, backup, discard_source=True, speed=32 * MiB) as push:
                    push.wait(timeout=60)
            finally:
                stop.set()
                t.join(30)
            assert backup.read(0, size) == before
            assert not any(x.data for x in scratch.block_status()), "every copied range was discarded"
            fleece.complete()
            fleece.wait(timeout=30)
        view.close()


def test_complete_is_only_for_sync_none():
    with Driver.memory(MiB) as a, Driver.memory(MiB) as b:
        with backup_start(a, b, speed=1) as job:
            with pytest.raises(cowbackup.InvalidArgument):
                job.complete()
            job.cancel()
