"""fork() with a running job (issue 16, defect 8): the child's exit-time cleanup must not touch
the parent's handles (it used to free the job, whose threads do not exist in the child, and
print a caught panic); using them in the child is a clear RuntimeError; the parent's job
completes as if nothing happened."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from conftest import HERE

SCRIPT = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, sys.argv[1])
    import cowbackup
    child_out, child_err = sys.argv[2], sys.argv[3]

    size = 16 << 20
    data = os.urandom(size)
    src = cowbackup.Driver.memory(size)
    src.write(0, data)
    dst = cowbackup.Driver.memory(size)
    job = cowbackup.backup_start(src, dst, speed=4 << 20, workers=2)   # ~4 s: running at fork
    job.cow_before_write(0, 4096)
    src.write(0, b"x" * 4096)

    pid = os.fork()
    if pid == 0:
        # The child: its stdout and stderr go to files the parent checks.
        out = os.open(child_out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        err = os.open(child_err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(out, 1)
        os.dup2(err, 2)
        for use in (job.info, lambda: src.read(0, 1), job.cancel):
            try:
                use()
                print("child: a parent's handle was usable")
            except RuntimeError as e:
                print("child refused:", e)
        # A driver made in the child works there.
        with cowbackup.Driver.memory(4096) as mine:
            mine.write(0, b"child")
            print("child driver:", mine.read(0, 5))
        sys.stdout.flush()
        sys.exit(0)   # atexit cleanup and __del__ of the parent's job and drivers: nothing

    _, status = os.waitpid(pid, 0)
    print("child exit status", os.waitstatus_to_exitcode(status))
    info = job.info()
    print("parent job after the child exited:", info.state.name)
    job.set_speed(0)
    job.wait(timeout=60)
    assert dst.read(0, size) == data, "the parent's backup is not the point-in-time image"
    print("parent backup ok")
    job.close()
    src.close()
    dst.close()
""")


def test_fork_with_a_running_job(tmp_path):
    child_out, child_err = tmp_path / "child.out", tmp_path / "child.err"
    r = subprocess.run([sys.executable, "-c", SCRIPT, os.path.dirname(HERE), str(child_out),
                        str(child_err)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "child exit status 0" in r.stdout, r.stdout
    assert "parent job after the child exited: RUNNING" in r.stdout, r.stdout
    assert "parent backup ok" in r.stdout, r.stdout
    out = child_out.read_text()
    assert out.count("child refused:") == 3, out
    assert "before fork()" in out and "usable" not in out, out
    assert "child driver: b'child'" in out, out
    assert child_err.read_text() == "", "the child wrote to stderr:\n" + child_err.read_text()
