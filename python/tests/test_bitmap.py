"""Dirty bitmaps from Python: tracking (granule math, unaligned end, disabled, clear), merge
across granularities, persistence across reopen, the errors of create and open (-EEXIST,
-ENOENT, -EBUSY in this process and across processes, -EBADMSG), bad input, marks from
threads, busy while a job holds the bitmap, and fork()."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import threading

import pytest

from conftest import HERE, KiB, MiB, wait_for

import cowbackup
from cowbackup import Bitmap, Busy, Corrupt, CowbackupError, Driver, InvalidArgument

G = 64 * KiB
PYTHON_DIR = os.path.dirname(HERE)


def granules(bm: Bitmap) -> str:
    """The dirty extents as "first+count" in granules of ``G``, like the C test prints them."""
    return " ".join(f"{off // G}+{-(-n // G)}" for off, n in bm.extents())


# --- tracking --------------------------------------------------------------------------


def test_new_bitmap_is_clean_and_recording():
    with Bitmap.new(100 * G + 1000) as bm:
        i = bm.info()
        assert (i.size, i.granularity, i.count, i.generation) == (100 * G + 1000, G, 0, 0)
        assert (i.recording, i.busy, i.persistent) == (True, False, False)
        assert i.flags == {"recording"}
        assert isinstance(i.uuid, bytes) and len(i.uuid) == 16 and i.uuid != bytes(16)
        assert (bm.size, bm.granularity, bm.path, bm.count) == (100 * G + 1000, G, None, 0)
        assert bm.next_dirty() is None and bm.extents() == []
        # Random per bitmap.
        with Bitmap.new(G) as other:
            assert other.uuid != i.uuid


def test_granule_math_unaligned_end_disabled_and_clear():
    size = 100 * G + 1000
    with Bitmap.new(size) as bm:
        bm.mark(3 * G + 4096, 4096)  # inside granule 3
        assert granules(bm) == "3+1"
        bm.mark(6 * G - 100, 200)  # across granules 5 and 6
        assert granules(bm) == "3+1 5+2"
        assert bm.count == 3 * G
        bm.mark(4 * G, 0)  # length 0: nothing
        bm.mark(4 * G - 1, 1)  # the last byte of granule 3: already dirty
        assert granules(bm) == "3+1 5+2"
        assert bm.extents() == [(3 * G, G), (5 * G, 2 * G)]

        bm.disable()
        assert bm.info().flags == frozenset()
        bm.mark(50 * G, 1)  # ignored
        assert granules(bm) == "3+1 5+2"
        bm.enable()
        assert bm.info().recording

        bm.mark(size - 1, 1)  # the last granule is 1000 bytes long
        assert bm.count == 3 * G + 1000
        assert bm.next_dirty(7 * G) == (100 * G, 1000)
        assert bm.next_dirty(5 * G + 10) == (5 * G + 10, 2 * G - 10)  # from the middle
        assert bm.next_dirty(size) is None and bm.next_dirty(2**64 - 1) is None
        assert bm.extents()[-1] == (100 * G, 1000)

        gen = bm.generation
        bm.clear()
        i = bm.info()
        assert (i.count, i.generation) == (0, gen + 1)
        assert bm.extents() == []
        bm.clear()  # nothing removed: generation kept
        assert bm.generation == gen + 1


@pytest.mark.parametrize("granularity", [512, 4096, 64 * KiB, 1 * MiB, 2**31])
def test_granularities(granularity):
    size = 3 * granularity + 7
    with Bitmap.new(size, granularity) as bm:
        assert bm.granularity == granularity
        bm.mark(granularity - 1, 2)  # granules 0 and 1
        assert bm.extents() == [(0, 2 * granularity)]
        bm.mark(size - 1, 1)
        assert bm.extents() == [(0, 2 * granularity), (3 * granularity, 7)]
        assert bm.count == 2 * granularity + 7


def test_merge_across_granularities_and_sizes():
    size = 64 * MiB
    with Bitmap.new(size) as a, Bitmap.new(size) as b, Bitmap.new(size) as dst, \
            Bitmap.new(size, MiB) as coarse, Bitmap.new(size, 4096) as fine, \
            Bitmap.new(size // 2) as other:
        a.mark(G, 2 * G)
        b.mark(2 * G, 2 * G)
        dst.mark(7 * G, 1)
        dst.merge(a)
        dst.merge(b)
        assert granules(dst) == "1+3 7+1"
        assert granules(a) == "1+2" and granules(b) == "2+2"  # sources unchanged
        assert dst.generation == 0  # a merge removes nothing
        dst.merge(dst)  # into itself: no change
        assert granules(dst) == "1+3 7+1"

        # 64 KiB granules into 1 MiB ones: all of them are in the first MiB.
        coarse.merge(dst)
        assert coarse.extents() == [(0, MiB)]
        # 1 MiB granules into 4 KiB ones: every 4 KiB granule of that MiB.
        fine.merge(coarse)
        assert fine.extents() == [(0, MiB)] and fine.count == MiB
        # 4 KiB into 64 KiB: the 64 KiB granule holding it.
        with Bitmap.new(size, 4096) as one:
            one.mark(17 * 4096, 1)
            with Bitmap.new(size) as g64:
                g64.merge(one)
                assert g64.extents() == [(G, G)]

        other.mark(0, 1)
        with pytest.raises(InvalidArgument) as e:
            dst.merge(other)
        assert e.value.errno == errno.EINVAL and "cowbackup_bitmap_merge" in str(e.value)
        assert granules(dst) == "1+3 7+1"  # unchanged
        with pytest.raises(TypeError):
            dst.merge(None)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            dst.merge(Driver.memory(size))  # type: ignore[arg-type]


def test_a_disabled_bitmap_still_takes_merges():
    with Bitmap.new(MiB) as dst, Bitmap.new(MiB) as src:
        src.mark(0, 1)
        dst.disable()
        dst.merge(src)  # a merge is not a mark
        assert dst.extents() == [(0, G)]


# --- persistence and the errors of create/open -----------------------------------------


def test_persistence_across_reopen(tmp_path):
    path = tmp_path / "disk.bitmap"
    size = 8 << 30
    with Bitmap.create(path, size, 4096) as bm:
        i = bm.info()
        assert i.flags == {"recording", "persistent"} and bm.path == str(path)
        uuid = i.uuid
        bm.mark(4096 * 10, 4096 * 3)
        bm.mark(size - 1, 1)
    assert path.exists()
    with Bitmap.open(path) as bm:  # a pathlib path; str and bytes below
        i = bm.info()
        assert (i.uuid, i.count, i.generation, i.granularity, i.size) == (uuid, 4 * 4096, 0, 4096, size)
        assert bm.extents() == [(4096 * 10, 4096 * 3), (size - 4096, 4096)]
        bm.clear()
        bm.mark(0, 1)
        bm.disable()
    with Bitmap.open(str(path)) as bm:
        i = bm.info()
        assert (i.count, i.generation, i.flags) == (4096, 1, {"persistent"})
        bm.mark(8192, 1)  # disabled: not recorded, not even in the file
        bm.enable()
    with Bitmap.open(os.fsencode(path)) as bm:
        assert bm.extents() == [(0, 4096)] and bm.info().recording


def test_create_never_touches_an_existing_file(tmp_path):
    path = tmp_path / "taken"
    path.write_bytes(b"precious data")
    with pytest.raises(FileExistsError) as e:
        Bitmap.create(path, MiB)
    assert isinstance(e.value, CowbackupError) and e.value.errno == errno.EEXIST
    assert "cowbackup_bitmap_create" in str(e.value)
    assert path.read_bytes() == b"precious data"
    with Bitmap.create(tmp_path / "bm", MiB) as bm:
        bm.mark(0, 1)
    before = (tmp_path / "bm").read_bytes()
    with pytest.raises(FileExistsError):
        Bitmap.create(tmp_path / "bm", 2 * MiB)
    assert (tmp_path / "bm").read_bytes() == before
    with Bitmap.open(tmp_path / "bm") as bm:
        assert bm.size == MiB and bm.extents() == [(0, G)]


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        Bitmap.open(tmp_path / "missing.bitmap")
    assert isinstance(e.value, CowbackupError) and e.value.errno == errno.ENOENT
    with pytest.raises(FileNotFoundError):
        Bitmap.create(tmp_path / "no-such-dir" / "x.bitmap", MiB)
    assert not (tmp_path / "no-such-dir").exists()


def test_second_open_in_this_process_is_busy(tmp_path):
    path = tmp_path / "disk.bitmap"
    bm = Bitmap.create(path, MiB)
    with pytest.raises(Busy) as e:
        Bitmap.open(path)
    assert isinstance(e.value, CowbackupError) and e.value.errno == errno.EBUSY
    assert "cowbackup_bitmap_open" in str(e.value)
    bm.mark(0, 1)
    bm.close()
    with Bitmap.open(path) as again:  # closed: the lock is gone
        assert again.extents() == [(0, G)]
        with pytest.raises(Busy):
            Bitmap.open(path)


# A child process that opens the bitmap; prints OPEN or BUSY <errno>, then (with "hold")
# keeps it open until a line arrives on stdin.
CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    import cowbackup
    try:
        bm = cowbackup.Bitmap.open(sys.argv[2])
    except cowbackup.Busy as e:
        print("BUSY", e.errno, flush=True)
        sys.exit(0)
    print("OPEN", bm.count, flush=True)
    if sys.argv[3] == "hold":
        bm.mark(0, 1)
        sys.stdin.readline()
    bm.close()
""")


def run_child(path, mode: str = "once") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, PYTHON_DIR, str(path), mode],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_open_is_busy_across_processes(tmp_path):
    path = tmp_path / "disk.bitmap"
    # This process holds it: the child gets EBUSY.
    with Bitmap.create(path, MiB) as bm:
        bm.mark(G, 1)
        out, err = run_child(path).communicate(timeout=60)
        assert out.strip() == f"BUSY {errno.EBUSY}", out + err
    # Closed here: the child opens it.
    out, err = run_child(path).communicate(timeout=60)
    assert out.strip() == f"OPEN {G}", out + err
    # The child holds it: this process gets EBUSY until the child is done.
    child = run_child(path, "hold")
    try:
        line = child.stdout.readline()  # waits for the child's open (bounded by the kill below)
        assert line.strip() == f"OPEN {G}", line + child.stderr.read()
        with pytest.raises(Busy):
            Bitmap.open(path)
        out, err = child.communicate("done\n", timeout=60)
        assert child.returncode == 0, err
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)
    with Bitmap.open(path) as bm:
        assert bm.extents() == [(0, 2 * G)]  # the child's mark is in the file


@pytest.mark.parametrize("spot", [20, 600, 4096 + 100, 4096 + 512 + 3])
def test_a_flipped_byte_is_ebadmsg(tmp_path, spot):
    path = tmp_path / "damaged.bitmap"
    with Bitmap.create(path, 1 << 30, 4096) as bm:
        bm.mark(12345, 1)
    with open(path, "r+b") as f:
        f.seek(spot)
        c = f.read(1)[0]
        f.seek(spot)
        f.write(bytes([c ^ 0x40]))
    with pytest.raises(Corrupt) as e:
        Bitmap.open(path)
    assert isinstance(e.value, OSError) and isinstance(e.value, CowbackupError)
    assert not isinstance(e.value, ValueError)
    assert e.value.errno == errno.EBADMSG
    assert "damaged" in str(e.value) and "cowbackup_bitmap_open" in str(e.value)
    with open(path, "r+b") as f:  # repaired: opens with its bit
        f.seek(spot)
        f.write(bytes([c]))
    with Bitmap.open(path) as bm:
        assert bm.extents() == [(12288, 4096)]


def test_truncated_and_foreign_files_are_ebadmsg(tmp_path):
    path = tmp_path / "short.bitmap"
    Bitmap.create(path, 1 << 30, 4096).close()
    os.truncate(path, 4096)
    with pytest.raises(Corrupt):
        Bitmap.open(path)
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a bitmap at all")
    with pytest.raises(Corrupt) as e:
        Bitmap.open(junk)
    assert e.value.errno == errno.EBADMSG
    assert junk.read_bytes() == b"not a bitmap at all"


# --- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize("size, granularity, exc", [
    ("1", G, TypeError), (1.0, G, TypeError), (None, G, TypeError), (True, G, TypeError),
    (MiB, "64k", TypeError), (MiB, None, TypeError),
    (-1, G, ValueError), (2**64, G, ValueError), (MiB, -G, ValueError),
    (0, G, InvalidArgument), (MiB, 0, InvalidArgument), (MiB, 256, InvalidArgument),
    (MiB, 3 * 4096, InvalidArgument), (MiB, 4 << 30, InvalidArgument),
])
def test_bad_geometry(tmp_path, size, granularity, exc):
    with pytest.raises(exc):
        Bitmap.new(size, granularity)
    path = tmp_path / "bad.bitmap"
    with pytest.raises(exc):
        Bitmap.create(path, size, granularity)
    assert not path.exists()  # nothing created


@pytest.mark.parametrize("path, exc", [
    (None, TypeError), (42, TypeError), ("", ValueError), ("a\0b", ValueError),
])
def test_bad_paths(path, exc):
    with pytest.raises(exc):
        Bitmap.open(path)
    with pytest.raises(exc):
        Bitmap.create(path, MiB)


def test_bad_marks_record_nothing():
    with Bitmap.new(MiB, 4096) as bm:
        for offset, n in [(MiB, 1), (MiB - 1, 2), (2**64 - 1, 1), (4096, 2**64 - 1)]:
            with pytest.raises(InvalidArgument) as e:
                bm.mark(offset, n)
            assert "cowbackup_bitmap_mark" in str(e.value)
        for offset, n, exc in [(-1, 1, ValueError), (0, -1, ValueError), (2**64, 1, ValueError),
                               ("0", 1, TypeError), (0, 1.0, TypeError), (None, 1, TypeError)]:
            with pytest.raises(exc):
                bm.mark(offset, n)
        assert bm.count == 0
        with pytest.raises(TypeError):
            bm.next_dirty("0")  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            bm.next_dirty(-1)
        bm.mark(MiB - 1, 1)  # the last byte is fine
        assert bm.extents() == [(MiB - 4096, 4096)]


def test_closed_bitmap():
    bm = Bitmap.new(MiB)
    bm.close()
    bm.close()  # idempotent
    assert bm.closed and "closed" in repr(bm)
    for use in (lambda: bm.mark(0, 1), bm.clear, bm.enable, bm.disable, bm.info, bm.extents,
                lambda: bm.count, lambda: Bitmap.new(MiB).merge(bm)):
        with pytest.raises(ValueError, match="closed"):
            use()
    with Bitmap.new(MiB) as b2:
        pass
    assert b2.closed


# --- threads ---------------------------------------------------------------------------


def test_marks_from_threads_are_all_durable(tmp_path):
    path = tmp_path / "threads.bitmap"
    errors = []
    with Bitmap.create(path, 1 << 30, 4096) as bm:
        def marker(k: int) -> None:
            try:
                for i in range(200):
                    bm.mark((i * 4 + k) * 4096 + 17, 100)
            except BaseException as e:  # reported below
                errors.append(e)

        ts = [threading.Thread(target=marker, args=(k,)) for k in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in ts) and not errors, errors
    with Bitmap.open(path) as bm:
        assert bm.extents() == [(0, 800 * 4096)]


# --- busy while a job uses the bitmap ----------------------------------------------------


class GateDisk:
    """A Python source whose reads block until ``release`` is set (at most 30 s)."""

    def __init__(self, size: int) -> None:
        self.buf = bytearray(os.urandom(size))
        self.entered = threading.Event()
        self.release = threading.Event()

    def read(self, offset: int, n: int) -> bytes:
        self.entered.set()
        if not self.release.wait(30):
            raise OSError(errno.ETIMEDOUT, "GateDisk: never released")
        return bytes(self.buf[offset:offset + n])

    def write(self, offset: int, data: bytes) -> None:
        self.buf[offset:offset + len(data)] = data


@pytest.mark.parametrize("persistent", [False, True])
def test_busy_while_a_job_holds_it(tmp_path, persistent):
    size = 4 * MiB
    disk = GateDisk(size)
    bm = Bitmap.create(tmp_path / "bm", size) if persistent else Bitmap.new(size)
    bm.mark(G, 1)
    bm.mark(10 * G, 1)
    with bm, Driver.from_python(disk, size) as src, Driver.memory(size) as tgt, \
            Bitmap.new(size) as other:
        gen = bm.generation
        job = cowbackup.backup_start(src, tgt, sync="bitmap", bitmap=bm, workers=1)
        try:
            assert wait_for(disk.entered.is_set, 10), "the job never read the source"
            i = bm.info()
            assert i.busy and "busy" in i.flags and bm.busy
            for what, op in [("clear", bm.clear), ("enable", bm.enable), ("disable", bm.disable),
                             ("merge", lambda: bm.merge(other))]:
                with pytest.raises(Busy) as e:
                    op()
                assert e.value.errno == errno.EBUSY and what in str(e.value), what
            # Marks go on (to the job's successor) and are reported with the frozen bits.
            bm.mark(20 * G, 1)
            job.cow_before_write(20 * G, 1)
            assert granules(bm) == "1+1 10+1 20+1"
            # A busy bitmap can be the source of a merge.
            other.merge(bm)
            assert granules(other) == "1+1 10+1 20+1"
            assert bm.info().recording  # disable was refused
        finally:
            disk.release.set()
        job.wait(timeout=60)
        job.close()
        i = bm.info()
        assert not i.busy and i.recording
        assert granules(bm) == "20+1"  # on-success: only the write made during the job
        assert i.generation == gen + 1
        bm.clear()  # free again
        bm.disable()
        bm.enable()


# Regression test of a core bug (fixed): src/job/start.rs, prepare() armed its `Thaw` guard (which gives a
# bitmap back with `unfreeze(EndOfJob::Merge)` when preparing fails) *before* `bm.freeze()`.
# When freeze fails because another job has the bitmap frozen (EBUSY), the guard unfreezes
# that other job's bitmap: it is no longer busy while the first job runs, clear/enable/
# a third job are allowed, and the first job's end-of-job switch fails (only traced), so an
# on-success job left every bit in place. Fixed: the guard is armed after freeze succeeds.
def test_a_refused_second_job_leaves_the_first_jobs_bitmap_alone():
    size = 4 * MiB
    disk = GateDisk(size)
    with Bitmap.new(size) as bm, Driver.from_python(disk, size) as src, \
            Driver.memory(size) as tgt, Driver.memory(size) as t2:
        bm.mark(G, 1)
        job = cowbackup.backup_start(src, tgt, sync="bitmap", bitmap=bm, workers=1)
        try:
            assert wait_for(disk.entered.is_set, 10), "the job never read the source"
            with pytest.raises(Busy):
                cowbackup.backup_start(src, t2, sync="bitmap", bitmap=bm)
            bm.mark(20 * G, 1)
            still_busy = bm.busy
            with pytest.raises(Busy):
                bm.clear()
        finally:
            disk.release.set()
            job.wait(timeout=60)
            job.close()
        assert still_busy
        assert granules(bm) == "20+1"  # on-success: only the write made during the job


def test_a_job_keeps_a_closed_bitmap_alive(tmp_path):
    path = tmp_path / "bm"
    size = MiB
    disk = GateDisk(size)
    with Driver.from_python(disk, size) as src, Driver.memory(size) as tgt:
        bm = Bitmap.create(path, size)
        bm.mark(0, 1)
        job = cowbackup.backup_start(src, tgt, sync="bitmap", bitmap=bm)
        bm.close()  # the job holds its own reference: the file stays open and locked
        with pytest.raises(Busy):
            Bitmap.open(path)
        disk.release.set()
        job.wait(timeout=60)
        assert tgt.read(0, G) == bytes(disk.buf[:G])
        job.close()
    with Bitmap.open(path) as bm:  # the job synced it (on-success): empty, generation 1
        assert bm.extents() == [] and bm.generation == 1


# --- fork ------------------------------------------------------------------------------

FORK = textwrap.dedent("""
    import os, subprocess, sys
    sys.path.insert(0, sys.argv[1])
    import cowbackup
    path = sys.argv[2]
    bm = cowbackup.Bitmap.create(path, 1 << 20)
    mem = cowbackup.Bitmap.new(1 << 20)
    bm.mark(0, 1)
    pid = os.fork()
    if pid == 0:
        for use in (lambda: bm.mark(4096, 1), bm.info, bm.clear, lambda: mem.merge(bm)):
            try:
                use()
                print("child: a parent's bitmap was usable", flush=True)
            except RuntimeError as e:
                print("child refused:", "before fork()" in str(e), flush=True)
        print("child repr:", "of process" in repr(bm), flush=True)
        bm.close()   # does nothing in the child: must not unlock the parent's file
        sys.exit(0)  # atexit cleanup: nothing either
    _, status = os.waitpid(pid, 0)
    print("child exit", os.waitstatus_to_exitcode(status), flush=True)
    # Still locked by this process (a third process gets EBUSY), still usable here.
    probe = subprocess.run([sys.executable, "-c",
        "import sys; sys.path.insert(0, sys.argv[1]); import cowbackup\\n"
        "try:\\n    cowbackup.Bitmap.open(sys.argv[2]); print('opened')\\n"
        "except cowbackup.Busy: print('busy')", sys.argv[1], path],
        capture_output=True, text=True, timeout=60)
    print("third process:", probe.stdout.strip(), probe.stderr.strip())
    bm.mark(65536, 1)
    print("parent extents:", bm.extents())
""")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork()")
def test_fork_leaves_the_parents_bitmap_alone(tmp_path):
    r = subprocess.run([sys.executable, "-c", FORK, PYTHON_DIR, str(tmp_path / "bm")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert out.count("child refused: True") == 4, out
    assert "usable" not in out and "child repr: True" in out, out
    assert "child exit 0" in out, out
    assert "third process: busy" in out, out
    assert "parent extents: [(0, 131072)]" in out, out
    assert r.stderr == "", r.stderr
