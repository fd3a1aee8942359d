"""The example python/examples/live_backup.py runs and verifies its backup."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from conftest import HERE

EXAMPLE = os.path.join(os.path.dirname(HERE), "examples", "live_backup.py")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, EXAMPLE, *args], capture_output=True, text=True,
                          timeout=120)


def test_example_live_backup_verifies(tmp_path):
    r = run("--size", "16M", "--speed", "8M", "--writers", "2", "--dir", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "backup is the point-in-time image" in r.stdout
    if shutil.which("qemu-img"):
        assert "qemu-img compare -f raw -F raw" in r.stdout
        assert "Images are identical." in r.stdout
    assert (tmp_path / "backup.img").stat().st_size == 16 << 20


def test_example_detects_a_wrong_backup(tmp_path):
    """Without the hook the writes corrupt the backup, and the example says so (exit 1)."""
    r = run("--size", "16M", "--speed", "8M", "--unsafe-skip-hook", "--dir", str(tmp_path))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "BACKUP DIFFERS" in r.stdout


def test_example_existing_image(tmp_path):
    image = tmp_path / "given.img"
    image.write_bytes(os.urandom(1 << 20) + bytes(3 << 20))
    r = run(str(image), "--dir", str(tmp_path / "work"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "work" / "backup.img").stat().st_size == 4 << 20
