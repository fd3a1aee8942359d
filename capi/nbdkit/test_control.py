#!/usr/bin/env python3
"""Tests of the filter's control socket (control=PATH, QMP), run by test-control.sh.

A real workload: nbdkit serves a disk image through the filter; the disk is exposed as a file
with nbdfuse, attached to a loop device, formatted ext4, mounted, and a writer keeps creating,
rewriting and deleting files in it (without nbdfuse or loop devices: qemu-io writers). Over the
control socket, with QEMU's own QMP client library (qemu.qmp, from PyPI: the wire format is
proven by a client we did not write), without restarting nbdkit:
  1. block-dirty-bitmap-add, then a full backup (blockdev-backup sync=full with the bitmap: a
     new chain), then two incrementals (sync=bitmap); before each start the filesystem is
     frozen (fsfreeze -f) and the image copied (cp --sparse): the point in time; the writer
     goes on during each backup. Full, full + inc1, full + inc1 + inc2 (restored with each
     TARGET.extents) == their point-in-time copies (qemu-img compare). Events: JOB_STATUS_CHANGE
     (created, running, concluded), BLOCK_JOB_COMPLETED without error, with timestamps.
  2. job control: a throttled job; a second start is refused; job-pause -> paused,
     job-resume, block-job-set-speed, job-cancel -> BLOCK_JOB_CANCELLED, concluded.
  3. pull mode: nbd-server-start (unix) + blockdev-backup sync=none + block-export-add with the
     bitmap; qemu-img convert of the export == the point-in-time copy; nbdinfo maps
     qemu:dirty-bitmap:b0; job-complete concludes it.
  4. bad input changes nothing: unknown command (CommandNotFound), missing/unexpected/mistyped
     arguments, an existing target (not overwritten), unknown bitmap (GenericError); a raw
     client: commands before qmp_capabilities (CommandNotFound), binary garbage, a 200 KiB
     message (error, then closed), 40 connections at once (the extra ones are refused), a client
     that never reads its replies; afterwards nbdkit still serves NBD and QMP.
Every wait is bounded. Usage: test_control.py FILTER.so TMPDIR
(CONTROL_TEST_WRITERS=qemu-io: the qemu-io writers even where a filesystem could be used.)
"""
import asyncio
import hashlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time

from qemu.qmp import QMPClient
from qemu.qmp.qmp_client import ExecuteError

FILTER, TMP = sys.argv[1], sys.argv[2]
SIZE = 256 << 20
procs = []      # writers: killed first
servers = []    # nbdkit, nbdfuse: killed after the cleanups (unmount, loop device)
cleanups = []


def kill_group(p):
    """Kill a writer and its children (dd), wait for it."""
    if p.poll() is None:
        try:
            os.killpg(p.pid, 9)
        except OSError:
            p.kill()
    p.wait()


def log(*a):
    print("control test:", *a, flush=True)


def fail(msg):
    raise SystemExit(f"control test: FAILED: {msg}")


def run(*cmd, check=True, timeout=120, **kw):
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=timeout, **kw)
    if not check and r.returncode != 0:
        log(f"(note: {' '.join(cmd)}: exit {r.returncode}: {r.stdout.strip()[-300:]})")
    if check and r.returncode != 0:
        fail(f"{' '.join(cmd)}: exit {r.returncode}: {r.stdout[-2000:]}")
    return r


def wait_for(pred, what, timeout=60):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def compare(a, b, what):
    r = run("qemu-img", "compare", "-f", "raw", "-F", "raw", a, b, check=False, timeout=300)
    if r.returncode != 0:
        fail(f"{what}: qemu-img compare {a} {b}: {r.stdout.strip()}")
    log(f"ok: {what}: identical")


def extents(path):
    out = []
    with open(path) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            off, ln = map(int, line.split())
            out.append((off, ln))
    return out


def apply(dst, src, ext):
    """The README's restore: every byte of the extents of src over dst."""
    with open(src, "rb") as s, open(dst, "r+b") as d:
        for off, ln in ext:
            done = 0
            while done < ln:
                n = min(1 << 20, ln - done)
                buf = os.pread(s.fileno(), n, off + done)
                if len(buf) != n:
                    fail(f"short read of {src}")
                os.pwrite(d.fileno(), buf, off + done)
                done += n


class Workload:
    """A filesystem on the served disk and a writer, or qemu-io writers."""

    def __init__(self, sock):
        self.sock = sock
        self.fs = False
        self.loop = None
        self.writer = None
        self.round = 0
        fuse = os.path.join(TMP, "fuse")
        self.mnt = os.path.join(TMP, "mnt")
        os.makedirs(fuse, exist_ok=True)
        os.makedirs(self.mnt, exist_ok=True)
        why = None
        if os.environ.get("CONTROL_TEST_WRITERS") == "qemu-io":
            why = "CONTROL_TEST_WRITERS=qemu-io"
        elif not os.path.exists("/dev/fuse") or not shutil.which("nbdfuse"):
            why = "no /dev/fuse or nbdfuse"
        elif not all(shutil.which(t) for t in ("losetup", "mkfs.ext4", "fsfreeze", "mount")):
            why = "no losetup, mkfs.ext4, fsfreeze or mount"
        if why is None:
            p = subprocess.Popen(["nbdfuse", fuse + "/disk", "--unix", sock],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            servers.append(p)
            self.fuse_dir = fuse
            cleanups.append(lambda: run("fusermount3" if shutil.which("fusermount3") else
                                        "umount", "-u" if shutil.which("fusermount3") else
                                        "-l", fuse, check=False))
            try:
                wait_for(lambda: os.path.exists(fuse + "/disk") or p.poll() is not None,
                         "nbdfuse", 30)
            except SystemExit:
                pass
            if not os.path.exists(fuse + "/disk"):
                why = "nbdfuse could not mount"
        if why is None:
            r = run("losetup", "-f", "--show", fuse + "/disk", check=False)
            if r.returncode != 0:
                why = f"losetup: {r.stdout.strip()}"
            else:
                self.loop = r.stdout.strip()
                cleanups.append(lambda: run("losetup", "-d", self.loop, check=False))
        if why is None:
            run("mkfs.ext4", "-q", "-F", "-E", "nodiscard", self.loop, timeout=300)
            run("mount", self.loop, self.mnt)
            def unmount():
                subprocess.run(["fsfreeze", "-u", self.mnt], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # frozen when a check failed
                for _ in range(20):  # busy while killed writers exit
                    if subprocess.run(["umount", self.mnt], stderr=subprocess.DEVNULL).returncode == 0:
                        return
                    time.sleep(0.5)
                run("umount", "-l", self.mnt, check=False)
            cleanups.append(unmount)
            self.fs = True
            log(f"workload: ext4 on {self.loop} (nbdfuse {fuse}/disk), mounted at {self.mnt}")
        else:
            log(f"workload: qemu-io writers ({why})")

    def start(self):
        """Writes during a backup."""
        if self.fs:
            script = ("cd %s; i=0; while :; do i=$((i+1)); n=$((RANDOM %% 40)); "
                      "dd if=/dev/urandom of=f$n bs=64k count=$((RANDOM %% 24 + 1)) "
                      "conv=notrunc 2>/dev/null; "
                      "[ $((i %% 7)) = 0 ] && rm -f f$((RANDOM %% 40)); "
                      "[ $((i %% 5)) = 0 ] && sync; done" % self.mnt)
            self.writer = subprocess.Popen(["bash", "-c", script], stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL, start_new_session=True)
            procs.append(self.writer)
        else:
            self.round += 1
            rnd = random.Random(self.round)
            cmds = []
            for _ in range(200):
                off = rnd.randrange(0, SIZE // 65536) * 65536
                cmds += ["-c", f"write -P {rnd.randrange(1, 255)} {off} 65536"]
            self.writer = subprocess.Popen(
                ["qemu-io", "-f", "raw", *cmds,
                 f"nbd+unix:///?socket={self.sock}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(self.writer)

    def freeze(self):
        """Stop changes: the disk image is the point in time until thaw()."""
        if self.fs:
            run("fsfreeze", "-f", self.mnt)
        elif self.writer:
            self.writer.wait(timeout=300)
            self.writer = None

    def thaw(self):
        if self.fs:
            run("fsfreeze", "-u", self.mnt)

    def stop(self):
        if self.writer:
            kill_group(self.writer)
            self.writer = None


async def connect(path):
    q = QMPClient("test")
    await q.connect(path)
    return q


async def job_status(q, job_id):
    for j in await q.execute("query-jobs"):
        if j["id"] == job_id:
            return j
    return None


async def wait_concluded(q, job_id, timeout=600):
    deadline = time.monotonic() + timeout
    while True:
        j = await job_status(q, job_id)
        if j is None:
            fail(f"job {job_id} is not listed by query-jobs")
        for k in ("id", "type", "status", "current-progress", "total-progress"):
            if k not in j:
                fail(f"query-jobs: JobInfo without {k}: {j}")
        if j["status"] == "concluded":
            return j
        if time.monotonic() > deadline:
            fail(f"job {job_id} did not conclude in {timeout} s: {j}")
        await asyncio.sleep(0.2)


def drain_events(q):
    return list(q.events.clear())


async def expect_error(q, cmd, args, cls, what):
    try:
        r = await q.execute(cmd, args)
    except ExecuteError as e:
        if e.error.error.class_ != cls:
            fail(f"{what}: class {e.error.error.class_}, wanted {cls}: {e.error.error.desc}")
        return e.error.error.desc
    fail(f"{what}: {cmd} succeeded ({r}), wanted a {cls} error")


async def backup(q, wl, job_id, target, pit, **args):
    """Freeze, copy the point in time, start the backup, thaw, keep writing, wait."""
    wl.freeze()
    run("cp", "--sparse=always", os.path.join(TMP, "disk.img"), pit, timeout=300)
    drain_events(q)
    await q.execute("blockdev-backup", {"job-id": job_id, "device": "disk0",
                                        "target": target, **args})
    wl.thaw()
    wl.start()
    j = await wait_concluded(q, job_id)
    wl.stop()
    if "error" in j:
        fail(f"job {job_id} failed: {j['error']}")
    await asyncio.sleep(0.3)  # the events queued with the conclusion
    evs = drain_events(q)
    st = [e["data"]["status"] for e in evs if e["event"] == "JOB_STATUS_CHANGE"
          and e["data"]["id"] == job_id]
    done = [e for e in evs if e["event"] == "BLOCK_JOB_COMPLETED"
            and e["data"]["device"] == job_id]
    if st[:1] != ["created"] or "running" not in st or st[-1] != "concluded":
        fail(f"{job_id}: JOB_STATUS_CHANGE sequence {st}")
    if len(done) != 1 or "error" in done[0]["data"] or done[0]["data"]["type"] != "backup":
        fail(f"{job_id}: BLOCK_JOB_COMPLETED events {done}")
    for e in evs:
        ts = e.get("timestamp", {})
        if not isinstance(ts.get("seconds"), int) or not isinstance(ts.get("microseconds"), int):
            fail(f"event without QMP timestamp: {e}")
    log(f"ok: {job_id}: {j['total-progress']} bytes, events {st} + BLOCK_JOB_COMPLETED")
    return j


async def raw_client(path):
    r, w = await asyncio.open_unix_connection(path)
    greeting = await asyncio.wait_for(r.readline(), 30)
    if b'"QMP"' not in greeting:
        fail(f"raw client: greeting {greeting!r}")
    return r, w


async def raw_cmd(r, w, data):
    w.write(data)
    await w.drain()
    return await asyncio.wait_for(r.readline(), 30)


async def hostile(path, sock):
    # Before negotiation.
    r, w = await raw_client(path)
    line = await raw_cmd(r, w, b'{"execute": "query-jobs"}\n')
    if b'CommandNotFound' not in line:
        fail(f"a command before qmp_capabilities: {line!r}")
    line = await raw_cmd(r, w, b'{"execute": "qmp_capabilities", "id": {"a": [1, "x"]}}')
    if b'"return"' not in line or b'"id": {"a": [1, "x"]}' not in line:
        fail(f"qmp_capabilities with an object id: {line!r}")
    # Binary garbage, a non-object, bad UTF-8, deep nesting: each a GenericError.
    for junk in (b'\x00\x01\xfe\xff\x80garbage\n', b'[1, 2]\n', b'"\xc3\x28"\n',
                 b'[' * 100 + b']' * 100 + b'\n', b'{"execute": 5}\n',
                 b'{"execute": "query-jobs", "arguments": [], "id": 1}\n'):
        line = await raw_cmd(r, w, junk)
        if b'GenericError' not in line:
            fail(f"junk {junk[:40]!r}: {line!r}")
    line = await raw_cmd(r, w, b'{"execute": "query-jobs", "id": 7}\r\n')
    if b'"return"' not in line:
        fail(f"after junk: {line!r}")
    w.close()
    # A 200 KiB message: an error, then the connection closes (a plain socket: the server
    # may close while we still send; what it sent before stays readable).
    def huge():
        c = socket.socket(socket.AF_UNIX)
        c.settimeout(30)
        c.connect(path)
        data = b'{"execute": "qmp_capabilities"}{"execute": "' + b'a' * (200 << 10) + b'"}\n'
        try:
            c.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        got = b""
        try:
            while True:
                chunk = c.recv(65536)
                if not chunk:
                    break
                got += chunk
        except ConnectionResetError:
            pass
        c.close()
        return got
    got = await asyncio.to_thread(huge)
    lines = got.split(b"\r\n")
    if len(lines) < 3 or b'"QMP"' not in lines[0] or b'"return"' not in lines[1] \
            or b'GenericError' not in lines[2]:
        fail(f"huge message: {got[:400]!r}")
    w.close()
    log("ok: before negotiation, garbage, bad UTF-8, nesting, a 200 KiB message: QMP errors")

    # A client that sends its commands and half-closes gets every reply, then EOF.
    def half_close():
        c = socket.socket(socket.AF_UNIX)
        c.settimeout(30)
        c.connect(path)
        c.sendall(b'{"execute": "qmp_capabilities"}' + b'{"execute": "query-jobs"}' * 500)
        c.shutdown(socket.SHUT_WR)
        got = b""
        while True:
            chunk = c.recv(65536)
            if not chunk:
                break
            got += chunk
        c.close()
        return got
    got = await asyncio.to_thread(half_close)
    if got.count(b"\r\n") != 502 or got.count(b'"return"') != 501:
        fail(f"half-closed client: {len(got.splitlines())} lines")
    log("ok: a half-closed client gets its 501 replies")

    # Many connections: at most 8 are served, the others told so; then all close.
    conns = []
    refused = 0
    for _ in range(40):
        rr, ww = await asyncio.open_unix_connection(path)
        line = await asyncio.wait_for(rr.readline(), 30)
        if b'too many clients' in line:
            refused += 1
            ww.close()
        elif b'"QMP"' in line:
            conns.append((rr, ww))
        else:
            fail(f"connection {len(conns)}: {line!r}")
    if refused == 0 or len(conns) > 8:
        fail(f"40 connections: {len(conns)} served, {refused} refused")
    for _, ww in conns:
        ww.close()
    log(f"ok: 40 connections: {len(conns)} served, {refused} refused")

    # A client that never reads: disconnected when its output passes the limit. (The
    # server may still be closing the 40: retry the connection, bounded.)
    for _ in range(300):
        rr, ww = await asyncio.open_unix_connection(path)
        line = await asyncio.wait_for(rr.readline(), 30)
        if b'"QMP"' in line:
            break
        ww.close()
        await asyncio.sleep(0.1)
    else:
        fail(f"after closing the 40 connections: {line!r}")
    ww.write(b'{"execute": "qmp_capabilities"}')
    ww.write(b'{"execute": "query-commands"}' * 20000)
    try:
        await asyncio.wait_for(ww.drain(), 60)
    except (ConnectionError, BrokenPipeError, asyncio.TimeoutError):
        pass
    ww.close()
    # The daemon still serves NBD and QMP.
    run("nbdinfo", "--size", f"nbd+unix:///?socket={sock}")
    q = await connect(path)
    await q.execute("query-jobs")
    await q.disconnect()
    log("ok: a client that never reads; nbdkit still serves NBD and QMP")


async def main():
    disk = os.path.join(TMP, "disk.img")
    sock = os.path.join(TMP, "nbd.sock")
    ctl = os.path.join(TMP, "ctl.sock")
    with open(disk, "wb") as f:
        f.truncate(SIZE)
    nbdkit = subprocess.Popen(
        ["nbdkit", "-f", "-v", "-U", sock, f"--filter={FILTER}", "file", disk,
         f"control={ctl}"], stdout=subprocess.DEVNULL,
        stderr=open(os.path.join(TMP, "nbdkit.log"), "w"))
    servers.append(nbdkit)
    wait_for(lambda: os.path.exists(ctl) or nbdkit.poll() is not None, "the control socket")
    if nbdkit.poll() is not None:
        fail(f"nbdkit exited: {open(os.path.join(TMP, 'nbdkit.log')).read()[-2000:]}")
    mode = os.lstat(ctl).st_mode & 0o777
    if mode != 0o600:
        fail(f"the control socket is {oct(mode)}, not 0600")
    log("ok: control socket created 0600")

    wl = Workload(sock)
    q = await connect(ctl)
    if q.greeting is None:
        fail("no greeting")

    # 1. A full backup and two incrementals, nbdkit running throughout.
    await q.execute("block-dirty-bitmap-add", {"node": "disk0", "name": "b0"})
    t = {n: os.path.join(TMP, n) for n in ("full.raw", "inc1.raw", "inc2.raw", "pit0.raw",
                                            "pit1.raw", "pit2.raw", "pit3.raw", "pull.raw",
                                            "restored.raw", "scratch.raw", "slow.raw")}
    wl.start()
    await asyncio.sleep(2)
    await backup(q, wl, "full0", t["full.raw"], t["pit0.raw"], sync="full", bitmap="b0",
                 speed=64 << 20)
    await asyncio.sleep(1)
    await backup(q, wl, "inc1", t["inc1.raw"], t["pit1.raw"], sync="bitmap", bitmap="b0",
                 speed=64 << 20)
    await asyncio.sleep(1)
    await backup(q, wl, "inc2", t["inc2.raw"], t["pit2.raw"], sync="incremental",
                 bitmap="b0", speed=64 << 20)
    wl.stop()
    compare(t["full.raw"], t["pit0.raw"], "full backup == the point in time")
    shutil.copyfile(t["full.raw"], t["restored.raw"])
    ext1 = extents(t["inc1.raw"] + ".extents")
    ext2 = extents(t["inc2.raw"] + ".extents")
    if not ext1 or not ext2 or ext1 == [(0, SIZE)]:
        fail(f"incremental copy sets: {ext1[:3]} / {ext2[:3]}")
    apply(t["restored.raw"], t["inc1.raw"], ext1)
    compare(t["restored.raw"], t["pit1.raw"], "full + inc1 == the second point in time")
    apply(t["restored.raw"], t["inc2.raw"], ext2)
    compare(t["restored.raw"], t["pit2.raw"], "full + inc1 + inc2 == the third point in time")
    for n in ("full.raw", "inc1.raw", "inc2.raw"):
        m = os.stat(t[n]).st_mode & 0o777
        if m != 0o600:
            fail(f"{n} is {oct(m)}, not 0600")
    log(f"ok: incrementals of {sum(l for _, l in ext1)} and {sum(l for _, l in ext2)} bytes")

    # 2. Job control on a throttled job.
    drain_events(q)
    await q.execute("blockdev-backup", {"job-id": "slow", "device": "disk0",
                                        "target": t["slow.raw"], "sync": "full",
                                        "speed": 1 << 20})
    desc = await expect_error(q, "blockdev-backup", {"device": "disk0", "job-id": "other",
                                                     "target": t["scratch.raw"], "sync": "full"},
                              "GenericError", "a second backup while one runs")
    if os.path.exists(t["scratch.raw"]):
        fail("the refused second backup created its target")
    await q.execute("job-pause", {"id": "slow"})
    for _ in range(100):
        if (await job_status(q, "slow"))["status"] == "paused":
            break
        await asyncio.sleep(0.1)
    else:
        fail("job-pause: the job is not paused")
    await q.execute("job-resume", {"id": "slow"})
    await q.execute("block-job-set-speed", {"device": "slow", "speed": 2 << 20})
    blk = await q.execute("query-block-jobs")
    if len(blk) != 1 or blk[0]["device"] != "slow" or blk[0]["type"] != "backup":
        fail(f"query-block-jobs: {blk}")
    await q.execute("job-cancel", {"id": "slow"})
    await wait_concluded(q, "slow", 120)
    await asyncio.sleep(0.3)
    evs = drain_events(q)
    names = [e["event"] for e in evs]
    st = [e["data"]["status"] for e in evs if e["event"] == "JOB_STATUS_CHANGE"
          and e["data"]["id"] == "slow"]
    if "BLOCK_JOB_CANCELLED" not in names or "paused" not in st or st[-1] != "concluded":
        fail(f"cancelled job: events {names} statuses {st}")
    log(f"ok: second start refused ({desc}); pause/resume/set-speed/cancel, events {st}")

    # 3. Pull mode.
    nbd2 = os.path.join(TMP, "pull.sock")
    await q.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": nbd2}}})
    wl.start()
    await asyncio.sleep(1)
    wl.freeze()
    run("cp", "--sparse=always", disk, t["pit3.raw"], timeout=300)
    await q.execute("blockdev-backup", {"job-id": "pull0", "device": "disk0",
                                        "target": t["scratch.raw"], "sync": "none"})
    wl.thaw()
    wl.start()
    await q.execute("block-export-add", {"type": "nbd", "id": "e0", "node-name": "pull0",
                                         "name": "pull0", "bitmaps": ["b0"]})
    uri = f"nbd+unix:///pull0?socket={nbd2}"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, t["pull.raw"], timeout=600)
    m = run("nbdinfo", "--map=qemu:dirty-bitmap:b0", uri).stdout
    if not m.strip():
        fail("nbdinfo --map=qemu:dirty-bitmap:b0: empty")
    await q.execute("job-complete", {"id": "pull0"})
    await wait_concluded(q, "pull0", 120)
    wl.stop()
    await q.execute("block-export-del", {"id": "e0"})
    await q.execute("nbd-server-stop")
    compare(t["pull.raw"], t["pit3.raw"], "pull mode: the exported view == the point in time")

    # 4. Bad input changes nothing.
    before = sha(t["full.raw"])
    await expect_error(q, "blockdev-backup", {"device": "disk0", "target": t["full.raw"],
                                              "sync": "full", "job-id": "again"},
                       "GenericError", "an existing target")
    if sha(t["full.raw"]) != before:
        fail("an existing target was changed")
    await expect_error(q, "no-such-command", None, "CommandNotFound", "unknown command")
    await expect_error(q, "blockdev-backup", {"device": "disk0", "sync": "full"},
                       "GenericError", "missing target")
    await expect_error(q, "blockdev-backup", {"device": "disk0", "sync": "full",
                                              "target": t["scratch.raw"] + "x", "bogus": 1},
                       "GenericError", "unexpected argument")
    await expect_error(q, "blockdev-backup", {"device": "disk0", "sync": 3,
                                              "target": t["scratch.raw"] + "x"},
                       "GenericError", "mistyped argument")
    await expect_error(q, "blockdev-backup", {"device": "disk0", "sync": "bitmap",
                                              "bitmap": "nope",
                                              "target": t["scratch.raw"] + "x"},
                       "GenericError", "unknown bitmap")
    await expect_error(q, "block-dirty-bitmap-add", {"node": "disk0", "name": "b0"},
                       "GenericError", "duplicate bitmap")
    await expect_error(q, "job-cancel", {"id": "nope"}, "DeviceNotActive", "unknown job")
    if os.path.exists(t["scratch.raw"] + "x"):
        fail("a refused backup created its target")
    jobs = await q.execute("query-jobs")
    if [j["id"] for j in jobs] != ["pull0"]:
        fail(f"query-jobs after bad commands: {jobs}")
    await q.execute("block-dirty-bitmap-clear", {"node": "disk0", "name": "b0"})
    await q.execute("block-dirty-bitmap-remove", {"node": "disk0", "name": "b0"})
    await q.execute("job-dismiss", {"id": "pull0"})
    if await q.execute("query-jobs") != []:
        fail("job-dismiss: the job is still listed")
    log("ok: bad commands and arguments: QMP errors, nothing changed")
    await q.disconnect()

    await hostile(ctl, sock)
    if nbdkit.poll() is not None:
        fail("nbdkit died")
    wl.stop()
    for c in reversed(cleanups):
        c()
    cleanups.clear()
    for p in servers:
        if p is not nbdkit and p.poll() is None:
            p.terminate()
            p.wait(timeout=60)
    nbdkit.terminate()
    nbdkit.wait(timeout=60)
    if os.path.exists(ctl):
        fail("the control socket is left after nbdkit exits")
    log("ok: nbdkit exits cleanly and removes its control socket")


async def startup_mode():
    """backup= and control= together: the start-up job is job backup0 in query-jobs."""
    disk = os.path.join(TMP, "disk2.img")
    with open(disk, "wb") as f:
        for _ in range(64):
            f.write(os.urandom(1 << 20))  # 8 s at speed=8M
    ctl = os.path.join(TMP, "ctl2.sock")
    bk = os.path.join(TMP, "startup.raw")
    nbdkit = subprocess.Popen(
        ["nbdkit", "-f", "-U", os.path.join(TMP, "nbd2.sock"), f"--filter={FILTER}", "file",
         disk, f"backup={bk}", "speed=8M", f"control={ctl}"], stdout=subprocess.DEVNULL,
        stderr=open(os.path.join(TMP, "nbdkit2.log"), "w"))
    servers.append(nbdkit)
    wait_for(lambda: os.path.exists(ctl) or nbdkit.poll() is not None, "the control socket")
    q = await connect(ctl)
    jobs = await q.execute("query-jobs")
    if len(jobs) != 1 or jobs[0]["id"] != "backup0" or jobs[0]["type"] != "backup":
        fail(f"backup= job in query-jobs: {jobs}")
    await expect_error(q, "blockdev-backup", {"device": "disk0", "sync": "full",
                                              "target": bk + ".second"},
                       "GenericError", "a start while the backup= job runs")
    j = await wait_concluded(q, "backup0", 300)
    if "error" in j:
        fail(f"backup0: {j}")
    compare(bk, disk, "backup= job (listed as backup0) == the disk")
    await q.execute("blockdev-backup", {"device": "disk0", "sync": "full",
                                        "target": bk + ".second"})
    await wait_concluded(q, "disk0", 300)
    compare(bk + ".second", disk, "a control backup after the backup= job")
    # An NBD target (qemu-nbd), then one that dies mid-job: on-target-error=stop pauses the
    # job with BLOCK_JOB_ERROR; job-cancel ends it.
    if shutil.which("qemu-nbd"):
        for name, kill in (("nbd0", False), ("nbd1", True)):
            tgt = os.path.join(TMP, name + ".raw")
            qsock = os.path.join(TMP, name + ".sock")
            with open(tgt, "wb") as f:
                f.truncate(64 << 20)
            qn = subprocess.Popen(["qemu-nbd", "-f", "raw", "-k", qsock, "-e", "4", tgt],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            servers.append(qn)
            wait_for(lambda: os.path.exists(qsock), "qemu-nbd")
            drain_events(q)
            await q.execute("blockdev-backup", {
                "device": "disk0", "job-id": name, "sync": "full",
                "target": f"nbd+unix:///?socket={qsock}", "speed": 8 << 20,
                "on-target-error": "stop"})
            if not kill:
                await wait_concluded(q, name, 300)
                qn.terminate()
                qn.wait(timeout=60)
                compare(tgt, disk, "a backup into an NBD target (qemu-nbd)")
                continue
            await asyncio.sleep(1)
            qn.kill()
            qn.wait()
            deadline = time.monotonic() + 120
            while (await job_status(q, name))["status"] != "paused":
                if time.monotonic() > deadline:
                    fail(f"{name}: not paused after its target died")
                await asyncio.sleep(0.2)
            evs = [e for e in drain_events(q) if e["event"] == "BLOCK_JOB_ERROR"]
            if not evs or evs[0]["data"]["device"] != name or \
                    evs[0]["data"]["action"] != "stop":
                fail(f"{name}: BLOCK_JOB_ERROR events {evs}")
            await q.execute("job-cancel", {"id": name})
            j = await wait_concluded(q, name, 120)
            log(f"ok: a dead NBD target: BLOCK_JOB_ERROR {evs[0]['data']}, cancelled: {j}")
    # blockdev-add targets, as QEMU users make them: raw over file (an existing image), nbd.
    node_img = os.path.join(TMP, "node.raw")
    run("qemu-img", "create", "-q", "-f", "raw", node_img, str(64 << 20))
    await q.execute("blockdev-add", {"driver": "raw", "node-name": "tgt0",
                                     "file": {"driver": "file", "filename": node_img}})
    await q.execute("blockdev-backup", {"device": "disk0", "job-id": "node0", "sync": "full",
                                        "target": "tgt0"})
    await wait_concluded(q, "node0", 300)
    compare(node_img, disk, "a backup into a blockdev-add node (raw over file)")
    if shutil.which("qemu-nbd"):
        nsock = os.path.join(TMP, "node-nbd.sock")
        nimg = os.path.join(TMP, "node-nbd.raw")
        run("qemu-img", "create", "-q", "-f", "raw", nimg, str(64 << 20))
        qn = subprocess.Popen(["qemu-nbd", "-f", "raw", "-k", nsock, "-x", "exp", nimg],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        servers.append(qn)
        wait_for(lambda: os.path.exists(nsock), "qemu-nbd")
        await q.execute("blockdev-add", {"driver": "nbd", "node-name": "tgt1", "export": "exp",
                                         "server": {"type": "unix", "path": nsock}})
        await q.execute("blockdev-backup", {"device": "disk0", "job-id": "node1",
                                            "sync": "full", "target": "tgt1"})
        await wait_concluded(q, "node1", 300)
        qn.terminate()
        qn.wait(timeout=60)
        compare(nimg, disk, "a backup into a blockdev-add node (nbd, qemu-nbd)")
    await expect_error(q, "blockdev-add", {"driver": "qcow2", "node-name": "q",
                                           "file": "tgt0"}, "GenericError", "qcow2 node")
    await q.execute("blockdev-del", {"node-name": "tgt0"})
    log("ok: blockdev-add targets (raw over file, nbd); qcow2 refused; blockdev-del")
    # transaction: a new bitmap and the full backup that starts its chain; a failing one
    # is undone (its bitmap is gone again).
    tx = os.path.join(TMP, "tx-full.raw")
    await q.execute("transaction", {"actions": [
        {"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": "t0"}},
        {"type": "blockdev-backup", "data": {"device": "disk0", "job-id": "tx0",
                                             "sync": "full", "target": tx}}]})
    await wait_concluded(q, "tx0", 300)
    compare(tx, disk, "transaction: bitmap-add + full backup")
    await expect_error(q, "transaction", {"actions": [
        {"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": "t1"}},
        {"type": "blockdev-backup", "data": {"device": "disk0", "sync": "full",
                                             "target": "relative.raw"}}]},
        "GenericError", "a transaction whose backup fails")
    await q.execute("block-dirty-bitmap-add", {"node": "disk0", "name": "t1"})  # was undone
    log("ok: transaction (bitmap-add + blockdev-backup); a failed one is undone")
    await q.disconnect()
    # qmp-shell (qemu.qmp's own shell) as a user would type it.
    shell = os.path.join(os.path.dirname(sys.executable), "qmp-shell")
    r = subprocess.run([shell, ctl], input="query-jobs\nblock-dirty-bitmap-add node=x name=s0\n",
                       text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    if '"type": "backup"' not in r.stdout or r.stdout.count('"return": {}') != 1:
        fail(f"qmp-shell: {r.stdout[-1000:]}")
    # `cowbackup ctl` (the command line, cli/) against the filter's socket, when it is built.
    cli = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "target", "release", "cowbackup")
    if os.access(cli, os.X_OK):
        r = subprocess.run([cli, "ctl", ctl, "query-jobs"], capture_output=True, text=True, timeout=60)
        if r.returncode != 0 or not any(j.get("type") == "backup" for j in json.loads(r.stdout)):
            fail(f"cowbackup ctl query-jobs: {r.returncode} {r.stdout[-500:]} {r.stderr[-500:]}")
        r = subprocess.run([cli, "ctl", ctl, "block-dirty-bitmap-add", "node=x", "name=s0"],
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 1 or "s0" not in r.stderr:
            fail(f"cowbackup ctl: a QMP error (bitmap s0 exists) must exit 1 naming it: {r.returncode} {r.stderr}")
        log("ok: cowbackup ctl against the control socket (a return, and a QMP error: exit 1)")
    else:
        log(f"skipped: cowbackup ctl (no built command at {cli})")
    nbdkit.terminate()
    nbdkit.wait(timeout=60)
    log("ok: backup= mode shows in query-jobs; a control backup after it; qmp-shell")


def socket_safety():
    """control=PATH: a regular file or a live socket there is refused, untouched; a stale
    socket of ours is replaced; daemon mode (no -f) serves QMP."""
    disk = os.path.join(TMP, "disk3.img")
    with open(disk, "wb") as f:
        f.truncate(16 << 20)
    path = os.path.join(TMP, "ctl3.sock")
    with open(path, "w") as f:
        f.write("precious")
    base = ["nbdkit", "-U", os.path.join(TMP, "nbd3.sock"), f"--filter={FILTER}", "file", disk]
    r = run(*base, "-f", f"control={path}", check=False, timeout=60)
    if r.returncode == 0 or "not a socket" not in r.stdout or open(path).read() != "precious":
        fail(f"control= on a regular file: exit {r.returncode}: {r.stdout[-500:]}")
    os.unlink(path)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # a socket file nobody listens on
    pidfile = os.path.join(TMP, "nbd3.pid")
    run(*base, "-P", pidfile, f"control={path}", timeout=60)  # daemon mode
    try:
        if not os.path.exists(pidfile):
            fail("daemon mode: no pid file")
        async def query():
            q = await connect(path)
            r = await q.execute("query-jobs")
            await q.disconnect()
            return r
        if asyncio.run(query()) != []:
            fail("daemon mode: query-jobs")
        live = run("nbdkit", "-f", "-U", os.path.join(TMP, "nbd4.sock"), f"--filter={FILTER}",
                   "file", disk, f"control={path}", check=False, timeout=60)
        if live.returncode == 0 or "listening" not in live.stdout:
            fail(f"control= on a live socket: exit {live.returncode}: {live.stdout[-500:]}")
    finally:
        with open(pidfile) as f:
            pid = int(f.read())
        os.kill(pid, 15)
        wait_for(lambda: not os.path.exists(f"/proc/{pid}"), "the daemon's exit")
    if os.path.exists(path):
        fail("the daemon left its control socket")
    log("ok: control= on a file or a live socket refused; a stale socket replaced; daemon mode")


def make_certs(d):
    """A CA, a server certificate for localhost, a client certificate CN=client (openssl):
    d/srv (QEMU's server layout) and d/cli (client layout, also libnbd's)."""
    srv, cli = os.path.join(d, "srv"), os.path.join(d, "cli")
    os.makedirs(srv)
    os.makedirs(cli)
    o = lambda *a: run("openssl", *a, timeout=120)
    o("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test CA",
      "-keyout", f"{d}/ca-key.pem", "-out", f"{srv}/ca-cert.pem",
      "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=keyCertSign")
    shutil.copy(f"{srv}/ca-cert.pem", f"{cli}/ca-cert.pem")
    for who, where, cn, ext in (("server", srv, "localhost",
                                 "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                                 "extendedKeyUsage=serverAuth"),
                                ("client", cli, "client", "extendedKeyUsage=clientAuth")):
        o("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}",
          "-keyout", f"{where}/{who}-key.pem", "-out", f"{d}/{who}.csr")
        with open(f"{d}/{who}.ext", "w") as f:
            f.write(ext + "\n")
        o("x509", "-req", "-in", f"{d}/{who}.csr", "-CA", f"{srv}/ca-cert.pem",
          "-CAkey", f"{d}/ca-key.pem", "-CAcreateserial", "-days", "2",
          "-extfile", f"{d}/{who}.ext", "-out", f"{where}/{who}-cert.pem")
    return srv, cli


async def tls_mode():
    """Pull mode over TLS (tls-creds + tls-authz) and a push into an nbds:// target, when the
    library has TLS (else the commands say so, and this part is skipped)."""
    if not shutil.which("openssl") or not shutil.which("nbdcopy"):
        log("TLS part SKIPPED: openssl or nbdcopy missing")
        return
    d = os.path.join(TMP, "tls")
    os.makedirs(d)
    srv, cli = make_certs(d)
    disk = os.path.join(TMP, "disk5.img")
    with open(disk, "wb") as f:
        f.write(os.urandom(16 << 20))
    ctl = os.path.join(TMP, "ctl5.sock")
    nbdkit = subprocess.Popen(
        ["nbdkit", "-f", "-U", os.path.join(TMP, "nbd5.sock"), f"--filter={FILTER}", "file",
         disk, f"control={ctl}"], stdout=subprocess.DEVNULL,
        stderr=open(os.path.join(TMP, "nbdkit5.log"), "w"))
    servers.append(nbdkit)
    wait_for(lambda: os.path.exists(ctl) or nbdkit.poll() is not None, "the control socket")
    q = await connect(ctl)
    await q.execute("object-add", {"qom-type": "tls-creds-x509", "id": "tls0", "dir": srv,
                                   "endpoint": "server", "verify-peer": True})
    await q.execute("object-add", {"qom-type": "authz-simple", "id": "auth0",
                                   "identity": "CN=client"})
    await q.execute("object-add", {"qom-type": "tls-creds-x509", "id": "tlsc", "dir": cli,
                                   "endpoint": "client"})
    psock = os.path.join(TMP, "pull5.sock")
    try:
        await q.execute("nbd-server-start", {"addr": {"type": "unix", "path": psock},
                                             "tls-creds": "tls0", "tls-authz": "auth0"})
    except ExecuteError as e:
        if "not supported by this build" in e.error.error.desc:
            log(f"TLS part SKIPPED: {e.error.error.desc}")
            await q.disconnect()
            nbdkit.terminate()
            nbdkit.wait(timeout=60)
            return
        raise
    await q.execute("blockdev-backup", {"device": "disk0", "job-id": "tpull", "sync": "none",
                                        "target": os.path.join(TMP, "scratch5.raw")})
    await q.execute("block-export-add", {"type": "nbd", "id": "e5", "node-name": "tpull"})
    out = os.path.join(TMP, "tls-pull.raw")
    run("nbdcopy", f"nbds+unix:///tpull?socket={psock}&tls-certificates={cli}", out,
        timeout=300)
    compare(out, disk, "pull mode over TLS (tls-creds, tls-authz CN=client)")
    r = run("nbdinfo", "--size", f"nbd+unix:///tpull?socket={psock}", check=False)
    if r.returncode == 0:
        fail("the TLS export answered a plaintext client")
    await q.execute("block-export-del", {"id": "e5"})
    await q.execute("nbd-server-stop")
    # tls-authz naming another identity: our client certificate is refused.
    await q.execute("object-add", {"qom-type": "authz-simple", "id": "auth1",
                                   "identity": "CN=somebody-else"})
    await q.execute("nbd-server-start", {"addr": {"type": "unix", "path": psock},
                                         "tls-creds": "tls0", "tls-authz": "auth1"})
    await q.execute("block-export-add", {"type": "nbd", "id": "e6", "node-name": "tpull"})
    r = run("nbdinfo", "--size", f"nbds+unix:///tpull?socket={psock}&tls-certificates={cli}",
            check=False)
    if r.returncode == 0:
        fail("tls-authz: a client certificate of another identity was let in")
    await q.execute("job-complete", {"id": "tpull"})
    await wait_concluded(q, "tpull", 120)
    await q.execute("nbd-server-stop")
    # Push into an nbds:// target: nbdkit's memory plugin with TLS.
    tsock = os.path.join(TMP, "tlstarget.sock")
    tgt = subprocess.Popen(["nbdkit", "-f", "-U", tsock, "--tls=require",
                            f"--tls-certificates={srv}", "memory", str(16 << 20)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    servers.append(tgt)
    wait_for(lambda: os.path.exists(tsock), "the TLS target")
    await q.execute("blockdev-backup", {"device": "disk0", "job-id": "tpush", "sync": "full",
                                        "target": f"nbds+unix:///?socket={tsock}",
                                        "tls-creds": "tlsc"})
    j = await wait_concluded(q, "tpush", 300)
    if "error" in j:
        fail(f"push into nbds://: {j}")
    out2 = os.path.join(TMP, "tls-push.raw")
    run("nbdcopy", f"nbds+unix:///?socket={tsock}&tls-certificates={cli}", out2, timeout=300)
    compare(out2, disk, "a backup into an nbds:// target (tls-creds endpoint=client)")
    await q.execute("blockdev-add", {"driver": "nbd", "node-name": "ttgt", "tls-creds": "tlsc",
                                     "server": {"type": "unix", "path": tsock}})
    await q.execute("blockdev-backup", {"device": "disk0", "job-id": "tpush2", "sync": "full",
                                        "target": "ttgt"})
    j = await wait_concluded(q, "tpush2", 300)
    if "error" in j:
        fail(f"push into a blockdev-add nbd node with tls-creds: {j}")
    await q.disconnect()
    tgt.terminate()
    nbdkit.terminate()
    nbdkit.wait(timeout=60)
    log("ok: TLS: pull mode with tls-creds + tls-authz (another identity refused), push into "
        "nbds://")


async def manifest_mode():
    """blockdev-backup's manifest: a full and an incremental each write their manifest (0600,
    never over an existing file) when the library has manifests; else a clear error."""
    disk = os.path.join(TMP, "disk6.img")
    with open(disk, "wb") as f:
        f.write(os.urandom(16 << 20))
    ctl = os.path.join(TMP, "ctl6.sock")
    nbdkit = subprocess.Popen(
        ["nbdkit", "-f", "-U", os.path.join(TMP, "nbd6.sock"), f"--filter={FILTER}", "file",
         disk, f"control={ctl}"], stdout=subprocess.DEVNULL,
        stderr=open(os.path.join(TMP, "nbdkit6.log"), "w"))
    servers.append(nbdkit)
    wait_for(lambda: os.path.exists(ctl) or nbdkit.poll() is not None, "the control socket")
    q = await connect(ctl)
    await q.execute("block-dirty-bitmap-add", {"node": "disk0", "name": "m0"})
    full, man = os.path.join(TMP, "m-full.raw"), os.path.join(TMP, "m-full.manifest")
    try:
        await q.execute("blockdev-backup", {"device": "disk0", "job-id": "mfull",
                                            "sync": "full", "bitmap": "m0", "target": full,
                                            "manifest": man})
    except ExecuteError as e:
        if "not supported by this build" not in e.error.error.desc:
            raise
        if os.path.exists(full):
            fail("a refused manifest backup created its target")
        log(f"manifest part SKIPPED: {e.error.error.desc}")
    else:
        j = await wait_concluded(q, "mfull", 300)
        if "error" in j or not os.path.getsize(man) or os.stat(man).st_mode & 0o777 != 0o600:
            fail(f"manifest of a full backup: {j}")
        run("qemu-io", "-f", "raw", "-c", "write -P 7 1M 64k",
            f"nbd+unix:///?socket={os.path.join(TMP, 'nbd6.sock')}")
        man2 = os.path.join(TMP, "m-inc.manifest")
        await q.execute("blockdev-backup", {"device": "disk0", "job-id": "minc",
                                            "sync": "bitmap", "bitmap": "m0",
                                            "target": os.path.join(TMP, "m-inc.raw"),
                                            "manifest": man2})
        j = await wait_concluded(q, "minc", 300)
        if "error" in j or not os.path.getsize(man2):
            fail(f"manifest of an incremental: {j}")
        with open(man, "rb") as f:
            before = f.read()
        await expect_error(q, "blockdev-backup", {"device": "disk0", "sync": "full",
                                                  "target": os.path.join(TMP, "m-again.raw"),
                                                  "manifest": man},
                           "GenericError", "a manifest over an existing file")
        with open(man, "rb") as f:
            if f.read() != before:
                fail("an existing manifest was changed")
        # The library checks them (python/cowbackup/): each backup against its manifest,
        # and the chain full + incremental reads as the disk now (no write since the inc).
        build = os.path.dirname(os.path.dirname(os.path.dirname(FILTER)))
        lib = os.path.join(build, "libcowbackup.so.0")
        pydir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python")
        if os.path.exists(lib) and os.path.exists(os.path.join(pydir, "cowbackup", "__init__.py")):
            code = (
                "import sys, cowbackup as c\n"
                "full, man, inc, man2, disk = sys.argv[1:]\n"
                "for img, m in ((full, man), (inc, man2)):\n"
                "    d = c.Driver.open(img)\n"
                "    r = c.verify(m, d)\n"
                "    assert r.mismatched_clusters == 0 and r.clusters_checked > 0, r\n"
                "ch = c.chain_open([man, man2], verify=True)\n"
                "want = open(disk, 'rb').read()\n"
                "got = b''.join(ch.read(o, 1 << 20) for o in range(0, ch.size, 1 << 20))\n"
                "assert got == want, 'the chain differs from the disk'\n")
            r = subprocess.run([sys.executable, "-c", code, full, man,
                                os.path.join(TMP, "m-inc.raw"), man2, disk],
                               env={**os.environ, "COWBACKUP_LIB": lib, "PYTHONPATH": pydir},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               timeout=300)
            if r.returncode != 0:
                fail(f"verify / chain of the QMP backups' manifests: {r.stdout[-1500:]}")
            log("ok: the manifests verify (cowbackup.verify) and the chain reads as the disk")
        log("ok: manifests of a full and an incremental backup; an existing one is kept")
    await q.disconnect()
    nbdkit.terminate()
    nbdkit.wait(timeout=60)


try:
    asyncio.run(main())
    asyncio.run(tls_mode())
    asyncio.run(manifest_mode())
    asyncio.run(startup_mode())
    socket_safety()
finally:
    for p in procs:
        kill_group(p) if p.args[0] == "bash" else (p.poll() is None and p.kill(), p.wait())
    for c in reversed(cleanups):
        try:
            c()
        except Exception:
            pass
    for p in servers:
        if p.poll() is None:
            p.kill()
        p.wait()
