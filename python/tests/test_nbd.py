"""cowbackup.NbdServer: exports drivers, snapshot views and bitmaps to real NBD clients
(nbdinfo, qemu-img, libnbd in /usr/bin/python3). A test that needs a tool skips with the
reason when the tool is not installed (scripts/deps.sh installs them)."""
import errno
import os
import shutil
import subprocess
import threading

import pytest

import cowbackup
from cowbackup import Bitmap, Driver, NbdServer, backup_start

KiB = 1024
MiB = 1 << 20
TIMEOUT = 120


def need(tool):
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (scripts/deps.sh installs it)")


def need_libnbd():
    if not os.path.exists("/usr/bin/python3") or subprocess.run(
            ["/usr/bin/python3", "-c", "import nbd"], capture_output=True, timeout=TIMEOUT).returncode != 0:
        pytest.skip("/usr/bin/python3 with libnbd (python3-libnbd) is not installed")


def run(*args):
    p = subprocess.run(list(args), capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, f"{args} failed: {p.stdout}{p.stderr}"
    return p.stdout


def parse_map(out):
    return [tuple(int(x) for x in line.split()[:3]) for line in out.splitlines() if line.strip()]


def test_start_address_uri_and_context_manager(tmp_path):
    sock = tmp_path / "s.sock"
    with NbdServer.start(f"unix:{sock}") as srv:
        assert srv.address == f"unix:{sock}"
        assert srv.uri("disk") == f"nbd+unix:///disk?socket={sock}"
        assert sock.exists()
        assert "running" in repr(srv)
    assert srv.closed and not sock.exists()
    srv.stop()  # idempotent
    with pytest.raises(ValueError):
        srv.remove("x")
    with NbdServer.start("tcp:127.0.0.1:0") as tcp:
        host, port = tcp.address[len("tcp:"):].rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        assert tcp.uri("d") == f"nbd://127.0.0.1:{port}/d"


def test_bad_input(tmp_path):
    precious = tmp_path / "precious"
    precious.write_bytes(b"keep me")
    with pytest.raises(FileExistsError):
        NbdServer.start(f"unix:{precious}")
    assert precious.read_bytes() == b"keep me"
    with pytest.raises(cowbackup.InvalidArgument):
        NbdServer.start("ftp:somewhere")
    with pytest.raises(TypeError):
        NbdServer.start(b"unix:/tmp/x")
    with NbdServer.start(f"unix:{tmp_path / 's.sock'}") as srv, Driver.memory(MiB) as d:
        with pytest.raises(OSError) as e:
            NbdServer.start(srv.address)
        assert e.value.errno == errno.EADDRINUSE
        srv.add("disk", d)
        with pytest.raises(FileExistsError):
            srv.add("disk", d)
        with pytest.raises(TypeError):
            srv.add("x", "not a driver")
        with pytest.raises(ValueError):
            srv.add("a\0b", d)
        with Bitmap.new(2 * MiB) as bm:
            with pytest.raises(cowbackup.InvalidArgument):
                srv.add_bitmap("disk", "b0", bm)
        with Bitmap.new(MiB) as bm:
            with pytest.raises(FileNotFoundError):
                srv.add_bitmap("nope", "b0", bm)
        with pytest.raises(FileNotFoundError):
            srv.remove("nope")
        srv.remove("disk")


def test_nbdinfo_map_of_data_and_bitmap(tmp_path):
    need("nbdinfo")
    with NbdServer.start(f"unix:{tmp_path / 's.sock'}") as srv:
        with Driver.memory(4 * MiB) as d, Bitmap.new(4 * MiB, 64 * KiB) as bm:
            d.write(MiB, b"\x01" * (128 * KiB))
            bm.mark(2 * MiB + 5, 10)
            srv.add("disk", d)
            srv.add_bitmap("disk", "b0", bm)
        # Closed handles: the server keeps its own references.
        assert parse_map(run("nbdinfo", "--map", srv.uri("disk"))) == [
            (0, MiB, 3), (MiB, 128 * KiB, 0), (MiB + 128 * KiB, 3 * MiB - 128 * KiB, 3)]
        assert parse_map(run("nbdinfo", "--map=qemu:dirty-bitmap:b0", srv.uri("disk"))) == [
            (0, 2 * MiB, 0), (2 * MiB, 64 * KiB, 1), (2 * MiB + 64 * KiB, 2 * MiB - 64 * KiB, 0)]
        listing = run("nbdinfo", "--list", srv.uri(""))
        assert 'export="disk"' in listing


class Pattern:
    """A Python device: byte i reads (i * 13) & 0xff; writes are kept in a dict."""

    def __init__(self):
        self.lock = threading.Lock()
        self.written = {}
        self.threads = set()

    def read(self, offset, n):
        with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
            self.threads.add(f.read().strip())  # the OS thread name (Python says Dummy-N)
        with self.lock:
            out = bytearray((i * 13) & 0xFF for i in range(offset, offset + n))
            for off, data in self.written.items():
                lo, hi = max(off, offset), min(off + len(data), offset + n)
                if lo < hi:
                    out[lo - offset:hi - offset] = data[lo - off:hi - off]
            return bytes(out)

    def write(self, offset, data):
        with self.lock:
            self.written[offset] = bytes(data)


LIBNBD_CLIENT = r"""
import errno, sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
print("ro", h.is_read_only())
data = h.pread(4096, 1000)
print("read", data.hex())
if not h.is_read_only():
    h.pwrite(b"written by libnbd", 50000)
    h.flush()
try:
    h.pread(4096, h.get_size() - 10)
except nbd.Error as e:
    print("past end errno", errno.errorcode.get(e.errno, e.errno) if isinstance(e.errno, int) else e.errno)
h.shutdown()
"""


def test_libnbd_reads_and_writes_a_python_driver(tmp_path):
    need_libnbd()
    size = 256 * KiB
    obj = Pattern()
    with NbdServer.start(f"unix:{tmp_path / 's.sock'}") as srv, Driver.from_python(obj, size) as d:
        srv.add("ro", d)
        srv.add("rw", d, writable=True)
        out = run("/usr/bin/python3", "-c", LIBNBD_CLIENT, srv.uri("ro"))
        assert "ro True" in out
        assert f"read {bytes((i * 13) & 0xFF for i in range(1000, 5096)).hex()}" in out
        assert "past end errno EINVAL" in out
        out = run("/usr/bin/python3", "-c", LIBNBD_CLIENT, srv.uri("rw"))
        assert "ro False" in out
        assert d.read(50000, 17) == b"written by libnbd"
    assert any(t.startswith("cowbackup-nbd-") for t in obj.threads), obj.threads


def test_qemu_img_convert_of_a_live_snapshot_view(tmp_path):
    need("qemu-img")
    size = 8 * MiB
    before = os.urandom(size)
    with Driver.memory(size) as src, Driver.memory(size) as scratch:
        src.write(0, before)
        with backup_start(src, scratch, sync="none") as job, NbdServer.start(f"unix:{tmp_path / 's.sock'}") as srv:
            srv.add("view", job.snapshot())
            for off in range(0, size, MiB):  # the host keeps writing
                job.cow_before_write(off, 4096)
                src.write(off, b"\xee" * 4096)
            out = tmp_path / "backup.img"
            run("qemu-img", "convert", "-f", "raw", "-O", "raw", srv.uri("view"), str(out))
            assert out.read_bytes() == before
            job.cancel()
