"""Two disks backed up at one point in time with one outcome (a consistency group).

    python3 python/examples/features/group.py
"""
import os

import cowbackup

MiB = 1 << 20
disks = [cowbackup.Driver.memory(2 * MiB) for _ in range(2)]
for d in disks:
    d.write(0, os.urandom(2 * MiB))
pits = [d.read(0, d.size) for d in disks]
backups = [cowbackup.Driver.memory(2 * MiB) for _ in range(2)]
jobs = cowbackup.backup_start_group([(disks[0], backups[0], {}), (disks[1], backups[1], {})])
for job, d in zip(jobs, disks):
    job.cow_before_write(0, 4096)
    d.write(0, b"\0" * 4096)
for job in jobs:
    job.wait()
assert [b.read(0, b.size) for b in backups] == pits
print("group ok:", [j.state.name for j in jobs])
