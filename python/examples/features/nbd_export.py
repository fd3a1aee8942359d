"""Serve a snapshot view and a dirty bitmap over NBD (a Unix socket, mode 0600), and read
them back with the library's own NBD client (qemu-img, nbdcopy, nbdinfo read it too).

    python3 python/examples/features/nbd_export.py
"""
import atexit
import os
import shutil
import tempfile

import cowbackup

MiB = 1 << 20
tmp = tempfile.mkdtemp()
atexit.register(shutil.rmtree, tmp, True)
sock = os.path.join(tmp, "nbd.sock")
disk = cowbackup.Driver.memory(4 * MiB)
disk.write(0, os.urandom(4 * MiB))
pit = disk.read(0, 4 * MiB)
bm = cowbackup.Bitmap.new(disk.size)
bm.mark(MiB, 65536)

job = cowbackup.backup_start(disk, cowbackup.Driver.memory(4 * MiB), sync="none")
server = cowbackup.NbdServer.start("unix:" + sock)
server.add("pit", job.snapshot())
server.add_bitmap("pit", "b0", bm)
print("serving", server.uri("pit"))

remote = cowbackup.Driver.nbd_open(server.uri("pit"))
job.cow_before_write(0, 4096)
disk.write(0, b"\xff" * 4096)
assert remote.read(0, remote.size) == pit, "the export reads the point in time"
print("dirty extents:", bm.extents())
remote.close()
server.stop()
job.complete()
job.wait()
