"""Driver.nbd_open against real NBD servers (qemu-nbd, nbdkit): read/write/flush, block
status of a sparse image, read-only exports, bad URIs, and a live backup into a qcow2 image
served by qemu-nbd, checked with qemu-img compare. A test skips, saying why, only when its
server is not installed (scripts/deps.sh installs them)."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from typing import Iterator, List

import pytest

from conftest import MiB
from cowbackup import CowbackupError, Driver, InvalidArgument, backup_start


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (scripts/deps.sh installs it)")


class Server:
    """A server process listening on a Unix socket; stopped (and reaped) by stop()."""

    def __init__(self, argv: List[str], sock: str) -> None:
        self.sock = sock
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            if os.path.exists(sock):
                try:
                    with socket.socket(socket.AF_UNIX) as s:
                        s.connect(sock)
                    break
                except OSError:
                    pass
            assert self.proc.poll() is None, f"{argv} exited at start"
            assert time.monotonic() < deadline, f"{argv} did not listen within 20 s"
            time.sleep(0.01)

    def uri(self, export: str = "") -> str:
        return f"nbd+unix:///{export}?socket={self.sock}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture
def servers() -> Iterator[List[Server]]:
    started: List[Server] = []
    yield started
    for s in started:
        s.stop()


def qemu_nbd(servers: List[Server], image: str, sock: str, fmt: str = "raw", *extra: str) -> Server:
    need("qemu-nbd")
    s = Server(["qemu-nbd", "-f", fmt, "--persistent", "--shared=4", "-k", sock, *extra, image], sock)
    servers.append(s)
    return s


def nbdkit(servers: List[Server], sock: str, *args: str) -> Server:
    need("nbdkit")
    s = Server(["nbdkit", "-f", "-U", sock, *args], sock)
    servers.append(s)
    return s


def test_read_write_flush_discard_on_nbdkit_memory(tmp_path, servers):
    srv = nbdkit(servers, str(tmp_path / "s"), "memory", "size=8M")
    with Driver.nbd_open(srv.uri(), write=True) as d:
        assert d.size == 8 * MiB
        assert "nbd" in repr(d)
        data = os.urandom(3 * MiB)
        d.write(MiB, data)
        assert d.read(MiB, len(data)) == data
        d.flush()
        d.discard(2 * MiB, MiB)
        assert d.read(2 * MiB, MiB) == bytes(MiB)
        ext = d.block_status(0, 8 * MiB)
        assert ext[0].offset == 0 and ext[0].zero and not ext[0].data, ext
        assert any(e.data for e in ext), ext


def test_block_status_of_a_sparse_qemu_nbd_image(tmp_path, servers):
    img = tmp_path / "sparse.raw"
    with open(img, "wb") as f:
        f.truncate(16 * MiB)
        f.seek(4 * MiB)
        f.write(b"\x11" * (64 << 10))
    srv = qemu_nbd(servers, str(img), str(tmp_path / "s"), "raw", "-r")
    with Driver.nbd_open(srv.uri()) as d:
        ext = d.block_status()
        assert [(e.offset, e.length, e.data, e.zero) for e in ext] == [
            (0, 4 * MiB, False, True),
            (4 * MiB, 64 << 10, True, False),
            (4 * MiB + (64 << 10), 12 * MiB - (64 << 10), False, True),
        ], ext


def test_read_only_exports_and_opens_refuse_writes(tmp_path, servers):
    img = tmp_path / "x.raw"
    img.write_bytes(b"\x07" * MiB)
    ro = qemu_nbd(servers, str(img), str(tmp_path / "ro"), "raw", "-r")
    with Driver.nbd_open(ro.uri(), write=True) as d:
        with pytest.raises(CowbackupError) as exc:
            d.write(0, b"x" * 512)
        assert exc.value.errno in (errno.EROFS, errno.EPERM), exc.value
        assert "read-only" in str(exc.value)
        assert d.read(0, 4) == b"\x07" * 4
    rw = qemu_nbd(servers, str(img), str(tmp_path / "rw"), "raw")
    with Driver.nbd_open(rw.uri()) as d:  # write=False
        with pytest.raises(CowbackupError) as exc:
            d.write(0, b"x")
        assert exc.value.errno == errno.EROFS


@pytest.mark.parametrize("uri", ["", "disk.img", "nbd://", "nbd+unix:///x", "nbds://h/x",
                                 "nbd://h/x?bogus=1", "nbd://h:0/x", "nbd://h/%zz"])
def test_bad_uris_are_invalid_arguments(uri):
    with pytest.raises(InvalidArgument) as exc:
        Driver.nbd_open(uri)
    assert "cowbackup_nbd_open" in str(exc.value) and "NBD URI" in str(exc.value), exc.value
    assert isinstance(exc.value, ValueError)


def test_bad_argument_types_and_missing_servers(tmp_path):
    with pytest.raises(TypeError):
        Driver.nbd_open(b"nbd://h/x")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Driver.nbd_open("nbd://h/x", write=1)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        Driver.nbd_open("nbd://h/x\0y")
    with pytest.raises(FileNotFoundError):
        Driver.nbd_open(f"nbd+unix:///?socket={tmp_path / 'none.sock'}")


def test_live_backup_into_a_qcow2_image_served_by_qemu_nbd(tmp_path, servers):
    need("qemu-img")
    size = 16 * MiB
    src_path = tmp_path / "src.raw"
    src_path.write_bytes(os.urandom(6 * MiB) + bytes(4 * MiB) + os.urandom(6 * MiB))
    pit = tmp_path / "pit.raw"
    shutil.copy(src_path, pit)
    target = tmp_path / "t.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(target), str(size)], check=True,
                   timeout=60)
    srv = qemu_nbd(servers, str(target), str(tmp_path / "s"), "qcow2")
    source = Driver.open(src_path, write=True)
    nbd = Driver.nbd_open(srv.uri(), write=True)
    stop = threading.Event()
    with backup_start(source, nbd, speed=8 * MiB, workers=4) as job:
        def writer() -> None:
            off = 0
            while not stop.is_set():
                job.cow_before_write(off, 65536)
                source.write(off, os.urandom(65536))
                off = (off + 3 * 65536) % size
                time.sleep(0.005)
        t = threading.Thread(target=writer)
        t.start()
        try:
            job.wait()
        finally:
            stop.set()
            t.join(timeout=30)
    nbd.close()
    source.close()
    srv.stop()
    r = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(target), str(pit)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert src_path.read_bytes() != pit.read_bytes(), "the writer changed the source during the job"
