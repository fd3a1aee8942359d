"""A device implemented in Python (Driver.from_python), backed up while written, and what a
bad argument looks like (InvalidArgument, nothing changed).

    python3 python/examples/features/python_driver.py
"""
import cowbackup

KiB = 1024


class Disk:
    """read/write are required; write_zeroes, flush and block_status are optional."""

    def __init__(self, size):
        self.buf = bytearray(size)

    def read(self, offset, n):
        return bytes(self.buf[offset:offset + n])

    def write(self, offset, data):
        self.buf[offset:offset + len(data)] = data


src = Disk(1024 * KiB)
src.buf[:] = bytes(range(256)) * 4096
disk = cowbackup.Driver.from_python(src, len(src.buf))
backup = cowbackup.Driver.memory(disk.size)
pit = disk.read(0, disk.size)
with cowbackup.backup_start(disk, backup, cluster_size=64 * KiB) as job:
    job.cow_before_write(0, 100)
    disk.write(0, b"x" * 100)
    job.wait()
assert backup.read(0, backup.size) == pit
try:
    cowbackup.backup_start(disk, backup, cluster_size=3)
except cowbackup.InvalidArgument as e:
    print("refused:", e)
print("python driver ok")
