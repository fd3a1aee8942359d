"""The example python/examples/live_backup.py runs and verifies its backup."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

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


def assert_one_line_error(r: subprocess.CompletedProcess, *words: str) -> None:
    """An argument error: exit status 2, one line on stderr naming the problem, no traceback."""
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("live_backup.py: error: "), r.stderr
    assert "Traceback" not in r.stderr
    for w in words:
        assert w in lines[0], r.stderr


def test_example_missing_image(tmp_path):
    missing = tmp_path / "missing.img"
    assert_one_line_error(run(str(missing)), str(missing), "no such file")


@pytest.mark.parametrize("value", ["1000", "3M", "128M", "lots"])
def test_example_bad_cluster_size(value):
    assert_one_line_error(run("--cluster-size", value), "--cluster-size", value)


@pytest.mark.parametrize("value", ["0", "-4K", "many"])
def test_example_bad_size(value):
    assert_one_line_error(run("--size", value), "--size")


def test_example_dir_missing_value_or_impossible(tmp_path):
    assert_one_line_error(run("--dir"), "--dir", "expected one argument")
    a_file = tmp_path / "file"
    a_file.write_bytes(b"x")
    assert_one_line_error(run("--dir", str(a_file)), str(a_file), "not a directory")
    assert_one_line_error(run("--dir", str(a_file / "sub" / "dir")), "no such directory")


def test_example_read_only_image(tmp_path):
    image = tmp_path / "ro.img"
    image.write_bytes(bytes(1 << 20))
    image.chmod(0o444)
    assert_one_line_error(run(str(image), "--dir", str(tmp_path / "w")), str(image), "read-only")
    assert image.read_bytes() == bytes(1 << 20)


def test_example_tiny_image(tmp_path):
    """--size 1000 (smaller than a write, a cluster): a valid image, backed up and verified."""
    r = run("--size", "1000", "--writers", "2", "--dir", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "backup is the point-in-time image" in r.stdout
    assert (tmp_path / "backup.img").stat().st_size == 1000


def test_example_never_overwrites(tmp_path):
    """An earlier run's files, or an image named like one of the outputs: refused, untouched."""
    (tmp_path / "backup.img").write_bytes(b"keep me")
    assert_one_line_error(run("--size", "1M", "--dir", str(tmp_path)), "backup.img", "already exists")
    assert (tmp_path / "backup.img").read_bytes() == b"keep me"
    assert not (tmp_path / "disk.img").exists() and not (tmp_path / "reference.img").exists()
    # The input image named reference.img in --dir: it must not be copied over itself.
    work = tmp_path / "w"
    work.mkdir()
    image = work / "reference.img"
    image.write_bytes(os.urandom(1 << 20))
    before = image.read_bytes()
    assert_one_line_error(run(str(image), "--dir", str(work)), "reference.img")
    assert image.read_bytes() == before


def test_example_progress_lines_without_a_terminal(tmp_path):
    """Output to a pipe: plain lines, no carriage returns."""
    r = run("--size", "64M", "--speed", "4M", "--writers", "1", "--dir", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "\r" not in r.stdout
    assert any(line.lstrip().endswith(tuple("0123456789")) and "MiB" in line and "hook copies" in line
               for line in r.stdout.splitlines()), r.stdout
