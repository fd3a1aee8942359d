#!/usr/bin/env python3
"""Back up a raw image file while a writer thread keeps writing to it, then verify.

    python3 python/examples/live_backup.py                  # a new 256 MiB image in a temp dir
    python3 python/examples/live_backup.py --size 1G --speed 200M --writers 4
    python3 python/examples/live_backup.py disk.img         # an existing image (it is written to!)

Without a path it creates an image of random data and zero regions. It copies the image
to a reference file before the backup starts (the point in time), starts the backup into a
sparse file, runs writer threads that write random data through the copy-before-write hook
during the whole job, shows progress, and finally checks the backup against the reference
with ``qemu-img compare -f raw -F raw`` (or byte for byte in Python when qemu-img is not
installed). Exit status 0 when the backup is the exact point-in-time image, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import cowbackup  # noqa: E402

MiB = 1 << 20
UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'256M' -> bytes (suffixes K, M, G, T; powers of 1024)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in UNITS and t[-1:] else ""
    try:
        value = int(t[: len(t) - len(unit)]) * UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"negative size: {text!r}")
    return value


def make_image(path: str, size: int) -> None:
    """Random data with zero regions: every 4th MiB zero (a hole), every 7th written zeroes."""
    with open(path, "wb") as f:
        f.truncate(size)
        for i, off in enumerate(range(0, size, MiB)):
            n = min(MiB, size - off)
            if i % 4 == 3:
                continue
            f.seek(off)
            f.write(bytes(n) if i % 7 == 6 else os.urandom(n))


def writer(job: cowbackup.Job, disk: cowbackup.Driver, seed: int, stop: threading.Event,
           counts: list, idx: int, errors: list, hook: bool = True) -> None:
    """Random writes through the hook until ``stop``: hook first, then the write."""
    rng = random.Random(seed)
    try:
        while not stop.is_set():
            n = rng.randint(1, 128 * 1024)
            off = rng.randrange(0, disk.size - n + 1)
            if hook:
                job.cow_before_write(off, n)
            disk.write(off, rng.randbytes(n))
            counts[idx] += 1
    except BaseException as e:
        errors.append(e)
        stop.set()


def compare(reference: str, backup: str) -> bool:
    qemu_img = shutil.which("qemu-img")
    if qemu_img:
        cmd = [qemu_img, "compare", "-f", "raw", "-F", "raw", reference, backup]
        print("$", " ".join(cmd))
        r = subprocess.run(cmd)
        return r.returncode == 0
    print("qemu-img not found: comparing byte for byte in Python")
    with open(reference, "rb") as a, open(backup, "rb") as b:
        while True:
            x, y = a.read(MiB), b.read(MiB)
            if x != y:
                return False
            if not x:
                return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("image", nargs="?", help="an existing raw image to back up (written to!)")
    ap.add_argument("--size", type=parse_size, default=256 * MiB, help="size of a new image (256M)")
    ap.add_argument("--dir", help="directory for the files (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the files")
    ap.add_argument("--writers", type=int, default=2, help="writer threads (2)")
    ap.add_argument("--speed", type=parse_size, default=0, help="backup speed limit per second (0: none)")
    ap.add_argument("--cluster-size", type=parse_size, default=64 * 1024)
    ap.add_argument("--unsafe-skip-hook", action="store_true",
                    help="write WITHOUT the hook, to see the backup come out wrong")
    args = ap.parse_args()
    if args.writers < 1:
        ap.error("--writers must be at least 1")

    workdir = args.dir or tempfile.mkdtemp(prefix="cowbackup-example-")
    os.makedirs(workdir, exist_ok=True)
    image = args.image or os.path.join(workdir, "disk.img")
    reference = os.path.join(workdir, "reference.img")
    backup = os.path.join(workdir, "backup.img")
    try:
        if not args.image:
            print(f"creating {image} ({args.size // MiB} MiB: random data, zeroes, holes)")
            make_image(image, args.size)
        shutil.copyfile(image, reference)  # the point in time, taken before the start

        with cowbackup.Driver.open(image, write=True) as disk, \
                cowbackup.Driver.create(backup, disk.size) as target:
            size = disk.size
            t0 = time.monotonic()
            with cowbackup.backup_start(disk, target, cluster_size=args.cluster_size,
                                        speed=args.speed) as job:
                stop = threading.Event()
                counts = [0] * args.writers
                errors: list = []
                threads = [threading.Thread(target=writer, args=(job, disk, i, stop, counts, i, errors,
                                                                    not args.unsafe_skip_hook))
                           for i in range(args.writers)]
                for t in threads:
                    t.start()
                result = "completed"
                try:
                    while True:
                        try:
                            job.wait(timeout=0.2)
                            break
                        except TimeoutError:
                            i = job.info()
                            line = (f"{i.progress:6.1%}  {i.offset // MiB}/{size // MiB} MiB  "
                                    f"hook copies {i.cow_requests}  writes {sum(counts)}")
                            print("\r" + line.ljust(72), end="", flush=True)
                except cowbackup.CowbackupError as e:
                    result = f"failed: {e}"
                finally:
                    stop.set()
                    for t in threads:
                        t.join()
                info = job.info()
            elapsed = time.monotonic() - t0
        print(f"\r{' ' * 72}\r{info.progress:6.1%}  {size // MiB} MiB in {elapsed:.2f} s: {result}; "
              f"copied {info.bytes_copied // MiB} MiB, zero {info.bytes_zero // MiB} MiB; "
              f"{sum(counts)} writes during the job, {info.cow_requests} hook copies "
              f"({info.cow_bytes // 1024} KiB)")
        if errors:
            print(f"writer failed: {errors[0]!r}")
            return 1
        if result != "completed":
            return 1
        if sum(counts) == 0:
            print("warning: no write happened during the job (try --speed to slow it)")
        ok = compare(reference, backup)
        print("backup is the point-in-time image" if ok else "BACKUP DIFFERS from the reference")
        return 0 if ok else 1
    finally:
        if args.keep or args.dir:
            print(f"files kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
