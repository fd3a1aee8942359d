"""A full backup and two incrementals of a disk written meanwhile, each with a manifest;
verify each backup, restore the newest point in time through the chain, consolidate.

    python3 python/examples/features/incremental_chain.py
"""
import atexit
import os
import shutil
import tempfile

import cowbackup

MiB = 1 << 20
d = tempfile.mkdtemp()
atexit.register(shutil.rmtree, d, True)
p = lambda name: os.path.join(d, name)  # noqa: E731

with open(p("disk.img"), "wb") as f:
    f.write(os.urandom(8 * MiB))
disk = cowbackup.Driver.open(p("disk.img"), write=True)
bm = cowbackup.Bitmap.create(p("disk.bitmap"), disk.size)


def host_write(job, offset, data):
    """The host's write path: mark the bitmap, the hook of a running job, then write."""
    bm.mark(offset, len(data))
    if job is not None:
        job.cow_before_write(offset, len(data))
    disk.write(offset, data)


points = []
for i, name in enumerate(["full", "incr1", "incr2"]):
    sync = "full" if i == 0 else "bitmap"
    target = cowbackup.Driver.create(p(name + ".img"), disk.size)
    points.append(disk.read(0, disk.size))  # the point in time this backup must hold
    job = cowbackup.backup_start(disk, target, sync=sync, bitmap=bm, manifest=p(name + ".manifest"),
                                 disk_id="example-disk")
    host_write(job, (i + 1) * MiB, b"\x5a" * 65536)  # the disk is written during the backup
    job.wait()
    report = cowbackup.verify(p(name + ".manifest"), target)
    print(f"{name}: {report.clusters_checked} clusters verified")
    host_write(None, 4 * MiB + i * 4096, os.urandom(4096))  # and between backups

chain = cowbackup.chain_open([p(n + ".manifest") for n in ("full", "incr1", "incr2")], verify=True)
assert chain.read(0, chain.size) == points[-1], "the chain reads the newest point in time"
restored = cowbackup.Driver.create(p("restored.img"), chain.size)
cowbackup.backup_start(chain, restored).wait()  # restore = a backup job from the chain
assert restored.read(0, restored.size) == points[-1]
cowbackup.consolidate([p("full.manifest"), p("incr1.manifest")], p("merged.img"), p("merged.manifest"))
merged = cowbackup.chain_open([p("merged.manifest")])
assert merged.read(0, merged.size) == points[1]
print("restore and consolidate ok")
