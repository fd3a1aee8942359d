"""Fleecing: a sync="none" job keeps the point in time in a scratch image while the host
writes; its snapshot view reads that point in time, discard releases what was read, and
complete() ends the job.

    python3 python/examples/features/snapshot_view.py
"""
import os

import cowbackup

MiB = 1 << 20
disk = cowbackup.Driver.memory(4 * MiB)
disk.write(0, os.urandom(4 * MiB))
before = disk.read(0, 4 * MiB)
scratch = cowbackup.Driver.memory(4 * MiB)

job = cowbackup.backup_start(disk, scratch, sync="none")
view = job.snapshot()
job.cow_before_write(MiB, 4096)  # the host writes: the hook keeps the old data first
disk.write(MiB, b"\0" * 4096)
assert view.read(0, 4 * MiB) == before, "the view reads the point in time"
view.discard(0, 2 * MiB)  # the reader is done with the first half: the job stops keeping it
try:
    view.read(0, 4096)
except cowbackup.CowbackupError as e:
    print("a discarded range is no longer served:", e)
job.complete()  # the reader has what it needs
job.wait()
print("state:", job.state.name)
