"""The Rust example examples/pull_backup.rs (pull-mode backups over NBD, README "Pull-mode
backup over NBD") runs and verifies both its backups with qemu-img compare. Built with
cargo when the release binary is missing; skipped, saying why, without qemu-img or nbdinfo."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from conftest import HERE

ROOT = os.path.dirname(os.path.dirname(HERE))
EXAMPLE = os.path.join(ROOT, "target", "release", "examples", "pull_backup")


def example() -> str:
    for tool in ("qemu-img", "nbdinfo"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (scripts/deps.sh installs it)")
    if not os.path.exists(EXAMPLE):
        if shutil.which("cargo") is None:
            pytest.skip("the example is not built and cargo is not installed")
        subprocess.run(["cargo", "build", "--release", "--example", "pull_backup"], cwd=ROOT,
                       check=True, timeout=1800)
    return EXAMPLE


def test_pull_backup_example_verifies_full_and_incremental(tmp_path):
    r = subprocess.run([example(), "--size", "48M", "--writers", "2", "--dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    # full.img (qemu-img convert), full-m.img (a job with a manifest), and the chain
    # full.manifest + inc.manifest restored: each the image at its job's start.
    assert out.count("Images are identical.") == 3, out
    assert "restored the chain" in out, out
    assert "qemu-img convert nbd+unix:///full?socket=" in out, out
    assert "nbdinfo --map=qemu:dirty-bitmap:backup-inc" in out, out
    assert "dirty extents" in out, out
    for name in ("full.img", "full-m.img", "inc.img", "restored.img", "ref-full.img", "ref-inc.img"):
        assert (tmp_path / name).stat().st_size == 48 << 20, name
    # The server's socket is gone once the example stopped it.
    assert not (tmp_path / "nbd.sock").exists()


def test_pull_backup_example_rejects_bad_arguments():
    r = subprocess.run([example(), "--size", "3M"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--size" in r.stderr, r.stdout + r.stderr
