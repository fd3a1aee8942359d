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
installed). Exit status 0 when the backup is the exact point-in-time image, 1 otherwise,
2 for a bad argument (one line on stderr). It never overwrites a file: the reference and the
backup are new files in the directory, and an existing one is an error.
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
from typing import NoReturn, Optional

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import cowbackup  # noqa: E402

MiB = 1 << 20
UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
PROG = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "live_backup.py"


class UsageError(Exception):
    """A bad argument: reported as one line on stderr, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but an argument error is one line (no usage dump), exit status 2."""

    def error(self, message: str) -> "NoReturn":  # type: ignore[override]
        raise UsageError(message)


def human(n: int) -> str:
    """Bytes for people: '256 MiB', or '1000 bytes' when not whole MiB."""
    return f"{n // MiB} MiB" if n % MiB == 0 else f"{n} bytes"


def parse_size(text: str) -> int:
    """'256M' -> bytes (suffixes K, M, G, T; powers of 1024)."""
    t = text.strip().upper()
    for suffix in ("IB", "B"):
        if t.endswith(suffix) and len(t) > len(suffix):
            t = t[: -len(suffix)]
            break
    unit = t[-1:] if t[-1:] in UNITS and t[-1:] else ""
    try:
        value = int(t[: len(t) - len(unit)]) * UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4096, 64K, 256M, 1G)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"negative size: {text!r}")
    return value


def image_size(text: str) -> int:
    value = parse_size(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be at least 1 byte (e.g. 256M)")
    return value


def cluster_size(text: str) -> int:
    value = parse_size(text)
    lo, hi = 4096, 64 * MiB
    if value & (value - 1) or not lo <= value <= hi:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a power of two from 4K to 64M (e.g. 64K)")
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
            n = rng.randint(1, min(128 * 1024, disk.size))
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


def check_args(args: argparse.Namespace) -> Optional[str]:
    """Check what argparse cannot (UsageError); the --dir to use, None for a temporary one."""
    if args.writers < 1:
        raise UsageError("--writers must be at least 1")
    if args.image is not None:
        if not os.path.exists(args.image):
            raise UsageError(f"{args.image}: no such file")
        if not os.path.isfile(args.image):
            raise UsageError(f"{args.image}: not a regular file (a raw image is expected)")
        if not os.stat(args.image).st_mode & 0o222 or not os.access(args.image, os.W_OK):
            raise UsageError(f"{args.image}: the image is read-only; this example writes to its "
                             "image during the backup: make it writable, or pass a copy")
        if os.path.getsize(args.image) == 0:
            raise UsageError(f"{args.image}: the image is empty")
    if args.dir is not None:
        if os.path.exists(args.dir) and not os.path.isdir(args.dir):
            raise UsageError(f"--dir {args.dir}: not a directory")
        parent = os.path.dirname(os.path.abspath(args.dir))
        if not os.path.isdir(args.dir) and not os.path.isdir(parent):
            raise UsageError(f"--dir {args.dir}: no such directory (nor its parent {parent})")
    return args.dir


def new_paths(workdir: str, image_given: bool, image: str) -> tuple:
    """The image, reference and backup paths in workdir; never a file that exists already."""
    reference = os.path.join(workdir, "reference.img")
    backup = os.path.join(workdir, "backup.img")
    made = [reference, backup] + ([] if image_given else [image])
    for p in made:
        if os.path.lexists(p):
            raise UsageError(f"{p} already exists (from an earlier run?); this example never "
                             "overwrites files: remove it or use another --dir")
    if image_given and os.path.realpath(image) in (os.path.realpath(reference), os.path.realpath(backup)):
        raise UsageError(f"{image}: the image must not be the reference or the backup file")
    return reference, backup


def main() -> int:
    ap = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("image", nargs="?", help="an existing raw image to back up (written to!)")
    ap.add_argument("--size", type=image_size, default=256 * MiB, help="size of a new image (256M)")
    ap.add_argument("--dir", help="directory for the files (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the files")
    ap.add_argument("--writers", type=int, default=2, help="writer threads (2)")
    ap.add_argument("--speed", type=parse_size, default=0, help="backup speed limit per second (0: none)")
    ap.add_argument("--cluster-size", type=cluster_size, default=64 * 1024,
                    help="copy granularity, a power of two from 4K to 64M (64K)")
    ap.add_argument("--unsafe-skip-hook", action="store_true",
                    help="write WITHOUT the hook, to see the backup come out wrong")
    try:
        args = ap.parse_args()
        workdir = check_args(args)
        made_dir = workdir is None
        if workdir is None:
            workdir = tempfile.mkdtemp(prefix="cowbackup-example-")
        else:
            try:
                os.makedirs(workdir, exist_ok=True)
            except OSError as e:
                raise UsageError(f"--dir {workdir}: cannot create it: {e.strerror}") from None
        image = args.image or os.path.join(workdir, "disk.img")
        try:
            reference, backup = new_paths(workdir, args.image is not None, image)
        except UsageError:
            if made_dir:
                shutil.rmtree(workdir, ignore_errors=True)
            raise
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    try:
        return run(args, workdir, image, reference, backup)
    except (cowbackup.CowbackupError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    finally:
        if args.keep or args.dir:
            print(f"files kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def run(args: argparse.Namespace, workdir: str, image: str, reference: str, backup: str) -> int:
    if not args.image:
        print(f"creating {image} ({human(args.size)}: random data, zeroes, holes)")
        make_image(image, args.size)
    with open(image, "rb") as src, open(reference, "xb") as ref:  # x: never overwrite
        shutil.copyfileobj(src, ref, 4 * MiB)  # the point in time, taken before the start

    tty = sys.stdout.isatty()
    with cowbackup.Driver.open(image, write=True) as disk, \
            cowbackup.Driver.create(backup, disk.size) as target:
        size = disk.size
        t0 = time.monotonic()
        last = t0 - 1  # not a terminal: a line at the first poll, then one a second
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
                        if not tty and time.monotonic() - last < 1:
                            continue
                        last = time.monotonic()
                        i = job.info()
                        line = (f"{i.progress:6.1%}  {i.offset // MiB}/{size // MiB} MiB  "
                                f"hook copies {i.cow_requests}  writes {sum(counts)}")
                        if tty:
                            print("\r" + line.ljust(72), end="", flush=True)
                        else:
                            print(line, flush=True)
            except cowbackup.CowbackupError as e:
                result = f"failed: {e}"
            finally:
                stop.set()
                for t in threads:
                    t.join()
            info = job.info()
        elapsed = time.monotonic() - t0
    print(f"{chr(13) + ' ' * 72 + chr(13) if tty else ''}{info.progress:6.1%}  {human(size)} in "
          f"{elapsed:.2f} s: {result}; copied {info.bytes_copied // MiB} MiB, zero "
          f"{info.bytes_zero // MiB} MiB; {sum(counts)} writes during the job, "
          f"{info.cow_requests} hook copies ({info.cow_bytes // 1024} KiB)")
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


if __name__ == "__main__":
    sys.exit(main())
