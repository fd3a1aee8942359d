"""Driver.rbd_open: bad input always; against a real throw-away Ceph cluster
(scripts/ceph-up.sh) when the Ceph packages are installed and the library was built with the
RBD driver (cargo feature ``rbd``; scripts/test-python.sh turns it on when librbd-dev is
installed). A test skips, saying why, only when one of those is missing."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
from typing import Iterator

import pytest

from conftest import MiB
from cowbackup import CowbackupError, Driver, InvalidArgument, backup_start

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _built_with_rbd() -> bool:
    try:
        Driver.rbd_open("rbd:pool/image", conf="/nonexistent/ceph.conf")
    except CowbackupError as e:
        return e.errno != errno.ENOTSUP
    return True


@pytest.mark.parametrize("spec", ["", "pool/img", "rbd:", "rbd:pool", "rbd:a/b/c/d", "rbd:p/i@",
                                  "rbd:p/i:conf=/etc/ceph/ceph.conf", "rbd:p/i:id=", "rbd:p/i:x=y"])
def test_bad_specs_are_invalid_arguments(spec):
    if not _built_with_rbd():
        pytest.skip("the library was built without the RBD driver (cargo feature rbd)")
    with pytest.raises(InvalidArgument) as e:
        Driver.rbd_open(spec)
    assert e.value.errno == errno.EINVAL
    assert "invalid RBD spec" in str(e.value)


def test_bad_argument_types():
    with pytest.raises(TypeError):
        Driver.rbd_open(b"rbd:p/i")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Driver.rbd_open("rbd:p/i", write=1)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        Driver.rbd_open("rbd:p/i\0x")
    with pytest.raises(ValueError):
        Driver.rbd_open("rbd:p/i", conf="a\0b")


def test_without_the_driver_or_a_cluster_errors_are_clear(tmp_path):
    with pytest.raises(CowbackupError) as e:
        Driver.rbd_open("rbd:pool/image", conf=tmp_path / "none.conf")
    if e.value.errno == errno.ENOTSUP:
        assert "built without the RBD driver" in str(e.value)
    else:
        assert e.value.errno == errno.ENOENT
        assert "none.conf" in str(e.value)
    with pytest.raises(CowbackupError) as e:
        Driver.rbd_open("rbd:p/i@snap", write=True)
    assert e.value.errno in (errno.EROFS, errno.ENOTSUP)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[dict]:
    if shutil.which("ceph-mon") is None:
        pytest.skip("the Ceph packages are not installed (scripts/deps.sh installs them as root)")
    if not _built_with_rbd():
        pytest.skip("the library was built without the RBD driver (cargo feature rbd)")
    d = str(tmp_path_factory.mktemp("ceph") / "c")
    env = dict(os.environ, CEPH_DIR=d, MON_PORT=str(_free_port()), MON_PORT2=str(_free_port()), IMAGE="")
    try:
        r = subprocess.run([os.path.join(ROOT, "scripts", "ceph-up.sh")], env=env, capture_output=True,
                           text=True, timeout=300)
        if r.returncode == 77:
            pytest.skip(r.stderr.strip())
        assert r.returncode == 0, r.stderr
        conf = os.path.join(d, "ceph.conf")

        def rbd(*args: str) -> None:
            subprocess.run(["rbd", "-c", conf, *args], check=True, timeout=120)

        yield {"conf": conf, "rbd": rbd}
    finally:
        subprocess.run([os.path.join(ROOT, "scripts", "ceph-down.sh")], env=env, timeout=120)


def test_read_write_and_errors_on_a_live_image(cluster):
    cluster["rbd"]("create", "--size", "8M", "rbd/py")
    d = Driver.rbd_open("rbd:rbd/py:id=admin", conf=cluster["conf"], write=True)
    try:
        assert d.size == 8 * MiB
        d.write(4 * MiB - 10, b"x" * 100)
        d.flush()
        assert d.read(4 * MiB - 20, 120) == b"\0" * 10 + b"x" * 100 + b"\0" * 10
        d.discard(0, 8 * MiB)
        assert d.read(4 * MiB - 10, 100) == b"\0" * 100
    finally:
        d.close()
    ro = Driver.rbd_open("rbd:rbd/py", conf=cluster["conf"])
    try:
        with pytest.raises(CowbackupError) as e:
            ro.write(0, b"y")
        assert e.value.errno == errno.EROFS
        assert "rbd:rbd/py" in str(e.value)
    finally:
        ro.close()
    with pytest.raises(FileNotFoundError) as e:
        Driver.rbd_open("rbd:rbd/missing", conf=cluster["conf"])
    assert "rbd:rbd/missing" in str(e.value)


def test_backup_into_rbd_and_back(cluster, tmp_path):
    size = 16 * MiB
    data = os.urandom(size // 2) + b"\0" * (size // 2)
    src = Driver.memory(size)
    src.write(0, data)
    cluster["rbd"]("create", "--size", "16M", "rbd/pyfull")
    target = Driver.rbd_open("rbd:rbd/pyfull", conf=cluster["conf"], write=True)
    job = backup_start(src, target)
    job.wait(timeout=300)
    job.close()
    target.close()
    # Restore: a job with the RBD image as the source, into a new file.
    back = Driver.rbd_open("rbd:rbd/pyfull", conf=cluster["conf"])
    out = Driver.create(tmp_path / "restored.img", size)
    job = backup_start(back, out)
    job.wait(timeout=300)
    job.close()
    assert out.read(0, size) == data
    for h in (back, out, src):
        h.close()


def test_chain_of_backups_in_rbd_images(cluster, tmp_path, monkeypatch):
    """A full backup and an incremental into RBD images with manifests: the manifests name
    the images; the chain opens with the images given (chain_open targets=) and by itself
    (CEPH_CONF); each restores the incremental's point in time."""
    import json

    from cowbackup import Bitmap, chain_open
    size = 16 * MiB
    src = Driver.memory(size)
    src.write(0, os.urandom(size // 2))
    bm = Bitmap.new(size, 64 * 1024)
    manifests = []
    pits = []
    for n in range(2):
        if n:
            for off in (0, 5 * MiB + 4096, 12 * MiB):  # host writes between the backups
                src.write(off, os.urandom(8192))
                bm.mark(off, 8192)
        pits.append(bytes(src.read(0, size)))
        cluster["rbd"]("create", "--size", "16M", f"rbd/pychain{n}")
        target = Driver.rbd_open(f"rbd:rbd/pychain{n}", conf=cluster["conf"], write=True)
        manifests.append(str(tmp_path / f"pychain{n}.manifest"))
        job = backup_start(src, target, sync="bitmap" if n else "full", bitmap=bm, manifest=manifests[-1],
                           disk_id="py-rbd")
        job.wait(timeout=300)
        job.close()
        target.close()
        with open(manifests[-1], "rb") as f:
            assert json.loads(f.readline())["target"] == f"rbd:rbd/pychain{n}"

    def restore(chain: Driver, name: str) -> bytes:
        out = Driver.create(tmp_path / name, size)
        job = backup_start(chain, out)
        job.wait(timeout=300)
        job.close()
        data = bytes(out.read(0, size))
        out.close()
        return data

    targets = [Driver.rbd_open(f"rbd:rbd/pychain{n}", conf=cluster["conf"]) for n in range(2)]
    chain = chain_open(manifests, verify=True, targets=targets)
    for t in targets:
        t.close()
    assert restore(chain, "given.img") == pits[1]
    chain.close()
    monkeypatch.setenv("CEPH_CONF", cluster["conf"])
    chain = chain_open(manifests, verify=True)
    assert restore(chain, "named.img") == pits[1]
    chain.close()
    src.close()
