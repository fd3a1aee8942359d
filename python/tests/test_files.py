"""File drivers from Python: create never overwrites unless asked, a fresh target is checked
on the file, FIFOs are refused at once, messages say what to do; public exception names.
Issue 23: created files are 0600 whatever the umask (or exactly ``mode=``), a symlink at the
path is never followed, a file planted by another user (cbatk; skipped when not root) is never
adopted, and a failed create leaves no temporary file."""

from __future__ import annotations

import errno
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import threading
import time

import pytest

import cowbackup
from conftest import MiB
from cowbackup import Bitmap, CowbackupError, Driver, InvalidArgument


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


# --- issue 23: files no one else can hijack ------------------------------------------------

def _mode(p) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def _leftovers(d) -> list:
    return [n for n in os.listdir(d) if "cowbackup-tmp" in n]


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_created_files_are_0600_whatever_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        Driver.create(tmp_path / "backup.raw", MiB).close()
        Bitmap.create(tmp_path / "disk.bitmap", MiB).close()
        Driver.create(tmp_path / "wide.raw", MiB, mode=0o640).close()
        Bitmap.create(tmp_path / "wide.bitmap", MiB, mode=0o644).close()
        (tmp_path / "old.raw").write_bytes(b"x")
        os.chmod(tmp_path / "old.raw", 0o666)
        Driver.create(tmp_path / "old.raw", MiB, overwrite=True).close()
    finally:
        os.umask(old)
    assert cowbackup.DEFAULT_FILE_MODE == 0o600
    assert _mode(tmp_path / "backup.raw") == 0o600
    assert _mode(tmp_path / "disk.bitmap") == 0o600
    assert _mode(tmp_path / "wide.raw") == 0o640
    assert _mode(tmp_path / "wide.bitmap") == 0o644
    assert _mode(tmp_path / "old.raw") == 0o600  # the new file's mode, not the replaced one's
    assert not _leftovers(tmp_path)


def test_bad_modes_are_refused_and_nothing_is_created(tmp_path):
    p = tmp_path / "x.raw"
    with pytest.raises(InvalidArgument):
        Driver.create(p, MiB, mode=0o4755)
    with pytest.raises(InvalidArgument):
        Bitmap.create(p, MiB, mode=-1)
    with pytest.raises(TypeError):
        Driver.create(p, MiB, mode="0600")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Bitmap.create(p, MiB, mode=True)
    assert not p.exists() and not _leftovers(tmp_path)


def test_a_symlink_at_the_path_is_never_followed(tmp_path):
    """overwrite_symlink.sh: OVERWRITE followed a planted symlink and filled its target."""
    victim = tmp_path / "victim.db"
    victim.write_bytes(b"precious data\n")
    os.chmod(victim, 0o600)
    before = os.stat(victim)
    link = tmp_path / "backup.raw"
    link.symlink_to(victim)
    with pytest.raises(FileExistsError):
        Driver.create(link, MiB)
    with pytest.raises(CowbackupError) as exc:
        Driver.create(link, MiB, overwrite=True)
    assert exc.value.errno == errno.ELOOP and "symbolic link" in str(exc.value), str(exc.value)
    with pytest.raises(FileExistsError):
        Bitmap.create(link, MiB)
    after = os.stat(victim)
    assert victim.read_bytes() == b"precious data\n"
    assert (after.st_ino, after.st_size, after.st_mode) == (before.st_ino, before.st_size, before.st_mode)
    assert link.is_symlink()
    # Dangling: nothing is created where it points.
    nowhere = tmp_path / "created-through-the-link"
    dangling = tmp_path / "dangling.raw"
    dangling.symlink_to(nowhere)
    with pytest.raises(FileExistsError):
        Driver.create(dangling, MiB)
    with pytest.raises(CowbackupError) as exc:
        Driver.create(dangling, MiB, overwrite=True)
    assert exc.value.errno == errno.ELOOP
    with pytest.raises(FileExistsError):
        Bitmap.create(dangling, MiB)
    assert not nowhere.exists() and dangling.is_symlink()
    assert not _leftovers(tmp_path)


def test_overwrite_replaces_the_file_and_a_failed_create_leaves_nothing(tmp_path):
    p = tmp_path / "backup.raw"
    p.write_bytes(b"\x5a" * 8192)
    with open(p, "rb") as held:
        with Driver.create(p, MiB, overwrite=True) as d:
            d.write(0, b"DISK-CONTENT")
            d.flush()
        assert held.read() == b"\x5a" * 8192  # the old file never receives the new data
    assert p.read_bytes()[:12] == b"DISK-CONTENT" and p.stat().st_size == MiB
    # Sizing fails: nothing at a new path, the old file as it was, no temporary file.
    with pytest.raises(CowbackupError):
        Driver.create(tmp_path / "huge.raw", 2**64 - 1)
    assert not (tmp_path / "huge.raw").exists()
    with pytest.raises(CowbackupError):
        Driver.create(p, 2**64 - 1, overwrite=True)
    assert p.read_bytes()[:12] == b"DISK-CONTENT"
    assert not _leftovers(tmp_path)


def _attacker():
    """uid, gid of the unprivileged user cbatk (created when missing), or skip."""
    if os.geteuid() != 0:
        pytest.skip("not root: cannot act as a second user")
    for _ in range(20):
        try:
            pw = pwd.getpwnam("cbatk")
            return pw.pw_uid, pw.pw_gid
        except KeyError:
            # Several test programs may add it at once: useradd then fails on its lock.
            subprocess.run(["useradd", "-M", "-s", "/bin/sh", "cbatk"], capture_output=True)
            time.sleep(0.1)
    pytest.skip("cannot create the user cbatk (useradd)")


def _as(user, script: str) -> bool:
    uid, gid = user
    return subprocess.run(["sh", "-c", script], user=uid, group=gid, extra_groups=[],
                          env={"PATH": "/usr/bin:/bin", "HOME": "/"}, timeout=60).returncode == 0


def test_another_users_planted_files_and_links_are_never_adopted(tmp_path_factory):
    user = _attacker()
    shared = tempfile.mkdtemp(prefix="cowbackup-shared-", dir="/tmp")
    try:
        os.chmod(shared, 0o1777)  # like /tmp
        victim_dir = tmp_path_factory.mktemp("victim")
        victim = victim_dir / "root-owned.db"
        victim.write_bytes(b"precious root data\n")
        os.chmod(victim, 0o600)
        planted, link, bmp = (os.path.join(shared, n) for n in ("planted.raw", "link.raw", "planted.bitmap"))
        assert _as(user, f"umask 000 && printf mine > '{planted}' && printf mine > '{bmp}' && "
                         f"ln -s '{victim}' '{link}'")
        with pytest.raises(FileExistsError):
            Driver.create(planted, MiB)
        with pytest.raises(FileExistsError):
            Driver.create(link, MiB)
        with pytest.raises(FileExistsError):
            Bitmap.create(bmp, MiB)
        with pytest.raises(CowbackupError) as exc:
            Driver.create(link, MiB, overwrite=True)  # what overwrite_symlink.sh did as root
        assert exc.value.errno == errno.ELOOP
        assert victim.read_bytes() == b"precious root data\n"
        with open(planted, "rb") as held:
            with Driver.create(planted, MiB, overwrite=True) as d:
                d.write(0, b"DISK-CONTENT")
                d.flush()
            assert held.read() == b"mine"
        st = os.lstat(planted)
        assert stat.S_ISREG(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o600
        assert not _as(user, f"cat '{planted}' >/dev/null 2>&1")
        assert not _as(user, f"{{ printf x >> '{planted}'; }} 2>/dev/null")
        # A new backup and bitmap under umask 000: still closed to cbatk.
        old = os.umask(0)
        try:
            with Driver.create(os.path.join(shared, "new.raw"), MiB), \
                    Bitmap.create(os.path.join(shared, "new.bitmap"), MiB):
                for n in ("new.raw", "new.bitmap"):
                    assert not _as(user, f"cat '{os.path.join(shared, n)}' >/dev/null 2>&1"), n
        finally:
            os.umask(old)
        assert not _leftovers(shared)
    finally:
        shutil.rmtree(shared)
