"""Bad input from Python raises Python exceptions before or from the library, never a crash."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import HERE, MiB, PyDisk

import cowbackup
from cowbackup import CowbackupError, Driver

SIZE = MiB


@pytest.fixture
def drives():
    with Driver.memory(SIZE) as s, Driver.memory(SIZE) as t:
        yield s, t


@pytest.mark.parametrize("size, exc", [
    ("1", TypeError), (1.5, TypeError), (None, TypeError), (True, TypeError),
    (-1, ValueError), (2**64, ValueError), (2**200, ValueError),
    (0, ValueError), (2**41, ValueError),  # EINVAL from the library: also ValueError
])
def test_memory_bad_size(size, exc):
    with pytest.raises(exc):
        Driver.memory(size)


def test_einval_from_library_is_oserror_and_valueerror():
    with pytest.raises(CowbackupError) as info:
        Driver.memory(0)
    e = info.value
    assert isinstance(e, OSError) and isinstance(e, ValueError)
    assert e.errno == errno.EINVAL
    assert "cowbackup_memory_new" in str(e)


@pytest.mark.parametrize("offset, n, exc", [
    (-1, 1, ValueError), (0, -1, ValueError), (2**64, 1, ValueError), (0, 2**64, ValueError),
    (SIZE, 1, ValueError), (SIZE - 1, 2, ValueError), (2**64 - 1, 2**64 - 1, ValueError),
    ("0", 1, TypeError), (0, 1.0, TypeError), (None, 1, TypeError),
])
def test_read_bad_range(drives, offset, n, exc):
    s, _ = drives
    with pytest.raises(exc):
        s.read(offset, n)


def test_read_write_edges(drives):
    s, _ = drives
    assert s.read(SIZE, 0) == b""
    s.write(SIZE, b"")
    s.write(SIZE - 3, bytearray(b"abc"))
    s.write(0, memoryview(b"xyz"))
    s.write(10, memoryview(bytearray(b"0123456789"))[::2])  # non-contiguous: copied
    assert s.read(SIZE - 3, 3) == b"abc"
    assert s.read(0, 3) == b"xyz"
    assert s.read(10, 5) == b"02468"
    buf = bytearray(4)
    s.readinto(SIZE - 4, buf)
    assert buf == b"\0abc"
    with pytest.raises(TypeError):
        s.readinto(0, b"readonly")


@pytest.mark.parametrize("data", ["text", 42, None, [1, 2], object()])
def test_write_bad_data(drives, data):
    s, _ = drives
    with pytest.raises(TypeError):
        s.write(0, data)


def test_write_past_end(drives):
    s, _ = drives
    with pytest.raises(ValueError):
        s.write(SIZE - 1, b"ab")
    with pytest.raises(ValueError):
        s.write(2**64 - 1, b"ab")


@pytest.mark.parametrize("kw, exc", [
    ({"sync": "bogus"}, ValueError), ({"sync": 0}, TypeError), ({"sync": None}, TypeError),
    ({"on_source_error": "retry"}, ValueError), ({"on_target_error": 2}, TypeError),
    ({"on_cbw_error": "break"}, ValueError),
    ({"cluster_size": 3000}, ValueError), ({"cluster_size": 2**27}, ValueError),
    ({"cluster_size": -4096}, ValueError), ({"cluster_size": "64k"}, TypeError),
    ({"workers": 0}, ValueError), ({"workers": 65}, ValueError), ({"workers": 2**33}, ValueError),
    ({"max_chunk": 1}, ValueError), ({"speed": -1}, ValueError), ({"speed": 1.5}, TypeError),
    ({"cbw_timeout": 0}, ValueError), ({"cbw_timeout": -1.0}, ValueError),
    ({"cbw_timeout": float("nan")}, ValueError), ({"cbw_timeout": float("inf")}, ValueError),
    ({"cbw_timeout": "1"}, TypeError),
    ({"target_is_zero": 1}, TypeError), ({"on_complete": 5}, TypeError),
    ({"bogus_option": 1}, TypeError),
])
def test_backup_start_bad_options(drives, kw, exc):
    s, t = drives
    with pytest.raises(exc):
        cowbackup.backup_start(s, t, **kw)
    assert cowbackup._completions == {}  # nothing left behind by a failed start


def test_backup_start_bad_drivers(drives, tmp_path):
    s, t = drives
    with pytest.raises(TypeError):
        cowbackup.backup_start(s, "target")  # type: ignore[arg-type]
    with pytest.raises(ValueError) as exc:
        cowbackup.backup_start(s, s)  # same device: EINVAL from the library
    assert exc.value.errno == errno.EINVAL
    with Driver.memory(SIZE * 2) as big:
        with pytest.raises(CowbackupError) as exc:
            cowbackup.backup_start(s, big)  # sizes differ
        assert exc.value.errno == errno.EINVAL
    closed = Driver.memory(SIZE)
    closed.close()
    with pytest.raises(ValueError, match="closed"):
        cowbackup.backup_start(s, closed)


def test_hook_bad_ranges(drives):
    s, t = drives
    with cowbackup.backup_start(s, t, sync="none") as job:
        job.cow_before_write(0, 0)  # no-op
        for off, n, exc in [(-1, 1, ValueError), (0, -5, ValueError), (0, 2**64, ValueError),
                            (1.0, 1, TypeError), (0, "1", TypeError),
                            (SIZE, 1, ValueError), (2**64 - 1, 2, ValueError)]:
            with pytest.raises(exc):
                job.cow_before_write(off, n)
        with pytest.raises(OSError) as info:
            job.cow_before_write(2**64 - 1, 2)  # overflow, found by the library
        assert info.value.errno == errno.EINVAL
        with pytest.raises(TypeError):
            job.set_speed(None)
        with pytest.raises(ValueError):
            job.wait(timeout=-1)
        with pytest.raises(TypeError):
            job.wait(timeout="1")
        assert job.info().cow_requests == 0


def test_use_after_close(drives, tmp_path):
    s, t = drives
    job = cowbackup.backup_start(s, t, sync="none")
    job.close()
    for call in [lambda: job.cow_before_write(0, 1), job.pause, job.resume, job.cancel,
                 lambda: job.set_speed(1), job.wait, job.info, lambda: job.progress]:
        with pytest.raises(ValueError, match="closed"):
            call()
    assert "closed" in repr(job)
    d = Driver.memory(SIZE)
    d.close()
    d.close()
    assert d.closed and "closed" in repr(d)
    assert d.size == SIZE  # still known
    for call in [lambda: d.read(0, 1), lambda: d.write(0, b"x"),
                 lambda: d.readinto(0, bytearray(1))]:
        with pytest.raises(ValueError, match="closed"):
            call()


def test_open_and_create_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError) as exc:
        Driver.open(tmp_path / "missing.img")
    assert isinstance(exc.value, CowbackupError)
    assert "missing.img" in str(exc.value)
    with pytest.raises(ValueError):
        Driver.open("a\0b")
    with pytest.raises(ValueError):
        Driver.open("")
    with pytest.raises(TypeError):
        Driver.open(42)  # type: ignore[arg-type]
    with pytest.raises(CowbackupError):
        Driver.open(tmp_path)  # a directory
    with pytest.raises(ValueError):
        Driver.create(tmp_path / "zero.img", 0)
    with pytest.raises(ValueError):
        Driver.create(tmp_path / "neg.img", -1)
    path = tmp_path / "ro.img"
    path.write_bytes(b"\1" * 8192)
    with Driver.open(path) as ro:
        assert ro.size == 8192 and ro.read(0, 2) == b"\1\1"
        with pytest.raises(OSError):
            ro.write(0, b"x")  # read-only: the library's errno


def test_from_python_bad_objects():
    with pytest.raises(TypeError):
        Driver.from_python(object(), SIZE)
    with pytest.raises(TypeError):
        Driver.from_python(PyDisk(SIZE), "big")
    with pytest.raises(ValueError):
        Driver.from_python(PyDisk(SIZE), 0)
    with pytest.raises(ValueError):
        Driver.from_python(PyDisk(SIZE), -1)
    assert cowbackup._py_drivers == {}


def test_job_methods_refused_inside_driver_callback(caplog):
    """A Python driver must not call the job using it: refused, the op fails with EIO."""
    holder = {}

    class Reentrant(PyDisk):
        def read(self, offset, n):
            holder["job"].cow_before_write(0, 1)
            return super().read(offset, n)

    with Driver.from_python(Reentrant(SIZE), SIZE) as s, Driver.memory(SIZE) as t:
        with cowbackup.backup_start(s, t, sync="none") as job:
            holder["job"] = job
            with pytest.raises(OSError) as exc:
                job.cow_before_write(0, 1)
            assert exc.value.errno == errno.EIO
            job.cancel()
    assert "must not be called from a Python driver method" in caplog.text


def test_library_not_found_names_every_place():
    env = dict(os.environ, COWBACKUP_LIB="/nonexistent/libcowbackup.so")
    r = subprocess.run([sys.executable, "-c", "import cowbackup"], cwd=os.path.dirname(HERE),
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "ImportError" in r.stderr
    assert "$COWBACKUP_LIB: /nonexistent/libcowbackup.so: no such file" in r.stderr


def test_version():
    v = cowbackup.library_version()
    assert v.split(".")[0] == str(cowbackup.ABI_MAJOR)
    assert os.path.exists(cowbackup.library_path()) or "libcowbackup" in cowbackup.library_path()


def test_exit_with_running_job_and_python_driver_is_clean():
    """Interpreter exit while library threads call Python: jobs are closed at exit."""
    code = textwrap.dedent("""
        import os, cowbackup
        class D:
            def __init__(self): self.b = bytearray(os.urandom(4 << 20))
            def read(self, o, n): return bytes(self.b[o:o + n])
            def write(self, o, d): self.b[o:o + len(d)] = d
        src = cowbackup.Driver.from_python(D(), 4 << 20)
        dst = cowbackup.Driver.from_python(D(), 4 << 20)
        job = cowbackup.backup_start(src, dst, speed=1 << 20,
                                     on_complete=lambda r: print("complete", r, flush=True))
        print("started", flush=True)
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(HERE),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["started", "complete", str(-errno.ECANCELED)]
    assert r.stderr == ""
