"""File drivers from Python: create never overwrites unless asked, a fresh target is checked
on the file, FIFOs are refused at once, messages say what to do; public exception names."""

from __future__ import annotations

import errno
import os
import threading

import pytest

import cowbackup
from conftest import MiB
from cowbackup import CowbackupError, Driver, InvalidArgument


def test_create_refuses_an_existing_file_and_changes_nothing(tmp_path):
    path = tmp_path / "source.img"
    path.write_bytes(b"\x5a" * 100_000)
    with pytest.raises(FileExistsError) as exc:
        Driver.create(path, MiB)
    e = exc.value
    assert isinstance(e, CowbackupError) and e.errno == errno.EEXIST
    assert str(path) in str(e) and "overwrite=True" in str(e), str(e)
    assert "COWBACKUP_CREATE_OVERWRITE" not in str(e)
    assert path.read_bytes() == b"\x5a" * 100_000
    with pytest.raises(TypeError):
        Driver.create(path, MiB, overwrite=1)  # type: ignore[arg-type]
    # On purpose: replaced, new size, reads as zeroes.
    with Driver.create(path, MiB, overwrite=True) as d:
        assert d.size == MiB
        assert d.read(0, 4096) == bytes(4096)
    assert path.stat().st_size == MiB
    # Only a regular file is ever replaced.
    with pytest.raises(InvalidArgument):
        Driver.create(tmp_path, MiB, overwrite=True)


def test_a_fresh_target_written_through_another_handle_gets_every_cluster(tmp_path):
    """Issue 16, defect 1, from Python: a created target overwritten with 0xEE through a second
    handle must not be taken for 'reads as zeroes' by the backup."""
    size = 4 * MiB
    data = bytearray(size)
    data[MiB:MiB + 65536] = os.urandom(65536)
    src_path, dst_path = tmp_path / "src.img", tmp_path / "dst.img"
    src_path.write_bytes(bytes(data))
    with Driver.open(src_path) as src, Driver.create(dst_path, size) as created:
        with Driver.open(dst_path, write=True) as other:
            other.write(0, b"\xee" * size)
        with cowbackup.backup_start(src, created) as job:
            job.wait(timeout=30)
    assert dst_path.read_bytes() == bytes(data)


def test_open_refuses_a_fifo_at_once(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    result: list = []

    def attempt():
        try:
            Driver.open(fifo, write=False)
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            result.append(e)

    t = threading.Thread(target=attempt, daemon=True)  # daemon: a hang must not hang pytest
    t.start()
    t.join(10)
    assert not t.is_alive(), "Driver.open blocked on a FIFO"
    e = result[0]
    assert isinstance(e, InvalidArgument) and isinstance(e, ValueError), repr(e)
    assert "FIFO" in str(e) and str(fifo) in str(e), str(e)


def test_read_only_write_says_how_to_open_for_writing(tmp_path):
    path = tmp_path / "ro.img"
    path.write_bytes(b"\1" * 8192)
    with Driver.open(path) as ro:
        with pytest.raises(CowbackupError) as exc:
            ro.write(0, b"x")
    assert exc.value.errno == errno.EBADF
    assert "read-only" in str(exc.value) and "write=True" in str(exc.value), str(exc.value)
    assert path.read_bytes() == b"\1" * 8192


def test_messages_name_the_function_once():
    with Driver.memory(MiB) as s, Driver.memory(MiB) as t, cowbackup.backup_start(s, t) as job:
        with pytest.raises(InvalidArgument) as exc:
            job.cow_before_write(MiB, 1)
        msg = exc.value.strerror
        assert msg.startswith("cowbackup_cow_before_write: range "), msg
        assert msg.count("cow_before_write") == 1, msg
        job.wait(timeout=30)


def test_public_exception_names():
    for name in ("CowbackupError", "InvalidArgument", "JobCancelled"):
        assert name in cowbackup.__all__
        assert issubclass(getattr(cowbackup, name), OSError)
    assert cowbackup._InvalidArgument is cowbackup.InvalidArgument  # the old name still works
    assert issubclass(cowbackup.InvalidArgument, ValueError)
