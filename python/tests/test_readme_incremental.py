"""The "Incremental backups" examples of README.md work as written: the Python one runs (and is
python/README.md's), the C one compiles with -Wall -Wextra -Werror and backs up exactly the
dirty clusters. (The Rust one is the same calls as tests/incremental.rs.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from conftest import HERE, MiB

import cowbackup

PYTHON_DIR = os.path.dirname(HERE)
REPO = os.path.dirname(PYTHON_DIR)


def section(path: str) -> str:
    with open(path) as f:
        text = f.read()
    if "## Incremental backups" not in text:
        pytest.fail(f"{path} has no Incremental backups section")
    return text.split("## Incremental backups", 1)[1].split("\n## ", 1)[0]


def block(text: str, lang: str) -> str:
    return text.split(f"```{lang}\n", 1)[1].split("```", 1)[0]


def test_the_python_example_runs(tmp_path):
    snippet = block(section(os.path.join(REPO, "README.md")), "python")
    assert snippet == block(section(os.path.join(PYTHON_DIR, "README.md")), "python"), \
        "README.md and python/README.md show different Python examples"
    size = 4 * MiB
    disk = os.urandom(size // 2) + bytes(size // 2)
    (tmp_path / "disk.img").write_bytes(disk)
    offset, data = 3 * MiB - 100, b"new data" * 1000  # across two clusters, in the zero half
    prelude = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {PYTHON_DIR!r})
        offset, data = {offset}, {data!r}
    """)
    r = subprocess.run([sys.executable, "-c", prelude + snippet], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    full = (tmp_path / "full.img").read_bytes()
    inc = (tmp_path / "inc1.img").read_bytes()
    now = (tmp_path / "disk.img").read_bytes()
    assert full == disk, "full.img is not the disk before the write"
    # The chain restored: full.img, then the clusters inc1 copied (those the write touched).
    restored = bytearray(full)
    cs = 65536
    a, b = offset // cs * cs, -(-(offset + len(data)) // cs) * cs
    restored[a:b] = inc[a:b]
    assert bytes(restored) == now
    assert inc[:a] == bytes(a), "inc1.img holds clusters that were not written"
    with cowbackup.Bitmap.open(tmp_path / "disk.bitmap") as bm:
        assert bm.extents() == [] and bm.generation == 1


C_MAIN = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(void)
{
    const uint64_t size = 4 << 20, cl = 65536;
    cowbackup_driver *disk, *target;
    cowbackup_bitmap *bm;
    if (cowbackup_memory_new(size, &disk) || cowbackup_memory_new(size, &target)
        || cowbackup_bitmap_new(size, COWBACKUP_BITMAP_DEFAULT_GRANULARITY, &bm))
        return 2;
    static uint8_t buf[4 << 20];
    memset(buf, 0x5a, sizeof buf);
    if (cowbackup_driver_write(disk, 0, buf, size) || cowbackup_bitmap_mark(bm, 5 * cl + 7, 10))
        return 3;
    int rc = incremental_backup(disk, target, bm);
    uint64_t off, len;
    cowbackup_bitmap_info info;
    cowbackup_bitmap_next_dirty(bm, 0, &off, &len);
    cowbackup_bitmap_query(bm, &info);
    static uint8_t got[4 << 20];
    cowbackup_driver_read(target, 0, got, size);
    /* Copied: cluster 5 only (the dirty one); the bitmap is empty now, its generation 1. */
    printf("rc=%d c4=%d c5=%d c6=%d dirty=%llu gen=%llu\n", rc, got[4 * cl], got[5 * cl], got[6 * cl],
           (unsigned long long)len, (unsigned long long)info.generation);
    cowbackup_bitmap_free(bm);
    cowbackup_driver_free(disk);
    cowbackup_driver_free(target);
    return 0;
}
"""


def test_the_c_example_compiles_and_runs(tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    lib = os.path.abspath(cowbackup.library_path())
    if not os.path.exists(lib):
        pytest.skip(f"the library is not a file: {lib}")
    snippet = block(section(os.path.join(REPO, "README.md")), "c")
    src = tmp_path / "app.c"
    src.write_text("#include <cowbackup.h>\n" + snippet + C_MAIN)
    exe = tmp_path / "app"
    r = subprocess.run([cc, "-std=c11", "-Wall", "-Wextra", "-Werror", "-I", os.path.join(REPO, "include"),
                        str(src), lib, "-pthread", "-o", str(exe)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    env = dict(os.environ, LD_LIBRARY_PATH=os.path.dirname(lib))
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == "rc=0 c4=0 c5=90 c6=0 dirty=0 gen=1", r.stdout
