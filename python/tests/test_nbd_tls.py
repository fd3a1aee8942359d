"""cowbackup.NbdServer and Driver.nbd_open over TLS, client authorization and bounded
resources, with a throwaway PKI made by openssl: our client and server, nbdcopy/nbdinfo
with nbds:// URIs, plaintext clients refused, the insecure-address rule, the 0600 socket,
idle clients holding connection slots (attack_slots.py), WRITE headers claiming 32 MiB
(attack_hostile.py step 6). A test that needs a tool skips with the reason when it is not
installed (scripts/deps.sh installs them)."""
import errno
import os
import shutil
import socket
import stat
import struct
import subprocess
import time

import pytest

import cowbackup
from cowbackup import Driver, NbdServer

MiB = 1 << 20
TIMEOUT = 120


def need(tool):
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (scripts/deps.sh installs it)")


def ossl(d, *args):
    p = subprocess.run(["openssl", *args], cwd=d, capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, f"openssl {args}: {p.stderr}"
    return p.stdout


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """CA, server certificate (localhost, 127.0.0.1), client certificates alice and bob;
    dirs in the GnuTLS layout: alice/, bob/ (ca-cert, client-cert, client-key), anon/."""
    need("openssl")
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    ossl(d, "req", "-x509", *ec, "-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-days", "2",
         "-subj", "/CN=test CA", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    (d / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name, subj, ext in [("server", "/O=cowbackup/CN=localhost", "server.ext"),
                            ("alice", "/O=cowbackup/CN=alice", "client.ext"),
                            ("bob", "/O=cowbackup/CN=bob", "client.ext")]:
        ossl(d, "req", *ec, "-keyout", f"{name}-key.pem", "-out", f"{name}.csr", "-subj", subj)
        ossl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
             "-CAcreateserial", "-out", f"{name}-cert.pem", "-days", "2", "-extfile", ext)
    for sub in ["alice", "bob", "anon"]:
        (d / sub).mkdir()
        shutil.copy(d / "ca-cert.pem", d / sub / "ca-cert.pem")
        if sub != "anon":
            shutil.copy(d / f"{sub}-cert.pem", d / sub / "client-cert.pem")
            shutil.copy(d / f"{sub}-key.pem", d / sub / "client-key.pem")
    return d


def fingerprint(pki, cert):
    out = ossl(pki, "x509", "-in", cert, "-noout", "-fingerprint", "-sha256")
    return "sha256:" + out.strip().rsplit("=", 1)[1].replace(":", "").lower()


def serve(pki, tmp_path, ca=True, allow=(), **kw):
    tls = (pki / "server-cert.pem", pki / "server-key.pem", pki / "ca-cert.pem" if ca else None)
    srv = NbdServer.start(f"unix:{tmp_path / 's.sock'}", tls=tls, allow=allow, **kw)
    data = os.urandom(2 * MiB) + bytes(2 * MiB)
    disk = Driver.memory(len(data))
    disk.write(0, data)
    srv.add("disk", disk, writable=True)
    disk.close()
    return srv, data


def test_tls_client_and_server_with_allow_list(pki, tmp_path):
    srv, data = serve(pki, tmp_path, allow=["CN=alice,O=cowbackup", fingerprint(pki, "bob-cert.pem")])
    with srv:
        uri = srv.uri("disk")
        assert uri.startswith("nbds+unix:///disk?socket=")
        assert stat.S_IMODE(os.stat(tmp_path / "s.sock").st_mode) == 0o600
        for who in ["alice", "bob"]:
            d = Driver.nbd_open(uri, write=True, ca=pki / "ca-cert.pem", cert=pki / f"{who}-cert.pem",
                                key=pki / f"{who}-key.pem")
            assert d.size == len(data)
            assert d.read(4096, len(data) - 4096) == data[4096:]
            d.write(0, b"\x42" * 4096)
            d.flush()
            d.close()
        # The URI form: tls-certificates=DIR.
        d = Driver.nbd_open(uri + f"&tls-certificates={pki / 'alice'}")
        assert d.read(0, 4096) == b"\x42" * 4096
        d.close()
        # No client certificate; plaintext: refused, nothing learned.
        with pytest.raises(cowbackup.CowbackupError):
            Driver.nbd_open(uri, ca=pki / "ca-cert.pem")
        with pytest.raises(PermissionError) as e:
            Driver.nbd_open(uri.replace("nbds+unix", "nbd+unix"))
        assert "TLS" in str(e.value)


def test_identity_not_on_the_allow_list_is_refused(pki, tmp_path):
    srv, _ = serve(pki, tmp_path, allow=["CN=alice,O=cowbackup"])
    with srv:
        with pytest.raises(cowbackup.CowbackupError):
            Driver.nbd_open(srv.uri("disk"), ca=pki / "ca-cert.pem", cert=pki / "bob-cert.pem",
                            key=pki / "bob-key.pem")


def test_nbdcopy_and_nbdinfo_over_tls(pki, tmp_path):
    need("nbdcopy")
    need("nbdinfo")
    srv, data = serve(pki, tmp_path, allow=["CN=alice,O=cowbackup"])
    with srv:
        out = tmp_path / "copy.img"
        p = subprocess.run(["nbdcopy", srv.uri("disk") + f"&tls-certificates={pki / 'alice'}", str(out)],
                           capture_output=True, text=True, timeout=TIMEOUT)
        assert p.returncode == 0, p.stderr
        assert out.read_bytes() == data
        p = subprocess.run(["nbdinfo", srv.uri("disk") + f"&tls-certificates={pki / 'bob'}"],
                           capture_output=True, text=True, timeout=TIMEOUT)
        assert p.returncode != 0, "bob is not on the allow-list"
        plain = srv.uri("").replace("nbds+unix", "nbd+unix")
        p = subprocess.run(["nbdinfo", "--list", plain], capture_output=True, text=True, timeout=TIMEOUT)
        assert "disk" not in p.stdout, p.stdout


def test_insecure_addresses_and_bad_input(pki, tmp_path):
    with pytest.raises(PermissionError):
        NbdServer.start("tcp:0.0.0.0:0")
    with NbdServer.start("tcp:0.0.0.0:0", insecure=True) as s:
        assert s.uri("d").startswith("nbd://")
    with NbdServer.start("tcp:127.0.0.1:0", tls=(pki / "server-cert.pem", pki / "server-key.pem")) as s:
        assert s.uri("d").startswith("nbds://127.0.0.1:")
    sock = f"unix:{tmp_path / 'b.sock'}"
    with pytest.raises(TypeError):
        NbdServer.start(sock, tls="cert.pem")
    with pytest.raises(FileNotFoundError):
        NbdServer.start(sock, tls=(pki / "nope.pem", pki / "server-key.pem"))
    with pytest.raises(cowbackup.InvalidArgument):
        NbdServer.start(sock, tls=(pki / "server-cert.pem", pki / "alice-key.pem"))
    with pytest.raises(cowbackup.InvalidArgument):  # allow without a CA
        NbdServer.start(sock, tls=(pki / "server-cert.pem", pki / "server-key.pem"), allow=["CN=x"])
    with pytest.raises(cowbackup.InvalidArgument):
        NbdServer.start(sock, tls=(pki / "server-cert.pem", pki / "server-key.pem", pki / "ca-cert.pem"),
                        allow=["sha256:12"])
    with pytest.raises(cowbackup.InvalidArgument):
        NbdServer.start(sock, max_connections=0)
    with pytest.raises(cowbackup.InvalidArgument):
        Driver.nbd_open("nbds+unix:///x?socket=/nonexistent", cert=pki / "alice-cert.pem")
    assert not (tmp_path / "b.sock").exists()


# --- bounded resources ------------------------------------------------------------------

def raw_go(path, export):
    """A raw client through NBD_OPT_GO into transmission."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(20)
    s.connect(str(path))
    s.recv(18, socket.MSG_WAITALL)
    s.sendall(struct.pack(">I", 3))
    name = export.encode()
    s.sendall(struct.pack(">QII", 0x49484156454F5054, 7, 4 + len(name) + 2) + struct.pack(">I", len(name))
              + name + struct.pack(">H", 0))
    while True:
        _, _, typ, ln = struct.unpack(">QIII", s.recv(20, socket.MSG_WAITALL))
        if ln:
            s.recv(ln, socket.MSG_WAITALL)
        if typ == 1:
            return s


def test_idle_clients_lose_their_slots(tmp_path):
    path = tmp_path / "s.sock"
    with NbdServer.start(f"unix:{path}", max_connections=2, idle_timeout=0.5) as srv:
        d = Driver.memory(MiB)
        srv.add("ro", d)
        d.close()
        socks = [raw_go(path, "ro") for _ in range(2)]
        # Both slots held by idle clients; they are closed after the idle timeout.
        deadline = time.monotonic() + 60
        while True:
            try:
                c = Driver.nbd_open(srv.uri("ro"))
                break
            except OSError:
                assert time.monotonic() < deadline, "the idle clients kept the slots"
                time.sleep(0.2)
        assert c.read(0, 512) == bytes(512)
        c.close()
        for s in socks:
            assert s.recv(1) == b"", "an idle client was still served"
            s.close()


def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def test_write_headers_cost_no_memory_until_data_arrives(tmp_path):
    path = tmp_path / "s.sock"
    with NbdServer.start(f"unix:{path}") as srv:
        d = Driver.memory(64 * MiB)
        srv.add("ro", d)
        d.close()
        before = rss()
        socks = []
        for i in range(12):
            s = raw_go(path, "ro")
            s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, i, 0, 32 * MiB))  # WRITE, no payload
            socks.append(s)
        time.sleep(0.5)
        grown = rss() - before
        assert grown < 64 * MiB, f"12 WRITE headers of 32 MiB grew RSS by {grown >> 20} MiB"
        # A whole payload to the read-only export: drained, answered EPERM.
        s = socks[0]
        chunk = b"\x55" * MiB
        for _ in range(32):
            s.sendall(chunk)
        magic, err, cookie = struct.unpack(">IIQ", s.recv(16, socket.MSG_WAITALL))
        assert (magic, err, cookie) == (0x67446698, errno.EPERM, 0)
        for s in socks:
            s.close()
