"""Shared helpers of the cowbackup Python tests: the module path and Python drivers."""

from __future__ import annotations

import errno
import os
import sys
import threading
import time
from typing import Optional, Set

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # import cowbackup from python/

MiB = 1 << 20
KiB = 1 << 10


class PyDisk:
    """A Python block device over a bytearray, with fault injection.

    ``fail_read``: cluster indices whose reads raise ``OSError(read_errno)``;
    ``fail_write_errno``: when set, every write (and write_zeroes) raises ``OSError`` with it;
    ``slow_read``: {cluster: seconds} to sleep in reads of that cluster;
    ``raise_in_read``: an exception instance raised by every read.
    """

    def __init__(self, size: int, cluster: int = 64 * KiB, data: Optional[bytes] = None) -> None:
        self.buf = bytearray(data) if data is not None else bytearray(size)
        assert len(self.buf) == size
        self.cluster = cluster
        self.lock = threading.Lock()
        self.fail_read: Set[int] = set()
        self.read_errno = errno.EIO
        self.fail_write_errno: Optional[int] = None
        self.slow_read: dict = {}
        self.raise_in_read: Optional[BaseException] = None
        self.reads = 0
        self.writes = 0
        self.failed_writes = 0
        self.active = 0
        self.max_active = 0

    def _clusters(self, offset: int, n: int) -> range:
        return range(offset // self.cluster, (offset + max(n, 1) - 1) // self.cluster + 1)

    def _enter(self) -> None:
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)

    def _leave(self) -> None:
        with self.lock:
            self.active -= 1

    def read(self, offset: int, n: int) -> bytes:
        self._enter()
        try:
            self.reads += 1
            if self.raise_in_read is not None:
                raise self.raise_in_read
            for c in self._clusters(offset, n):
                if c in self.slow_read:
                    threading.Event().wait(self.slow_read[c])
                if c in self.fail_read:
                    raise OSError(self.read_errno, f"injected read error at cluster {c}")
            with self.lock:
                return bytes(self.buf[offset:offset + n])
        finally:
            self._leave()

    def write(self, offset: int, data: bytes) -> None:
        self._enter()
        try:
            if self.fail_write_errno is not None:
                self.failed_writes += 1
                raise OSError(self.fail_write_errno, "injected write error")
            with self.lock:
                self.buf[offset:offset + len(data)] = data
                self.writes += 1
        finally:
            self._leave()

    def write_zeroes(self, offset: int, n: int) -> None:
        self.write(offset, bytes(n))

    def flush(self) -> None:
        if self.fail_write_errno is not None:
            raise OSError(self.fail_write_errno, "injected flush error")


def wait_for(pred, timeout: float = 10.0, step: float = 0.005) -> bool:
    """Poll ``pred()`` until true or ``timeout`` seconds passed; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return bool(pred())


def first_diff(a: bytes, b: bytes, chunk: int = 4096) -> int:
    """The first offset where ``a`` and ``b`` differ, -1 when equal."""
    if a == b:
        return -1
    n = min(len(a), len(b))
    for off in range(0, n, chunk):
        if a[off:off + chunk] != b[off:off + chunk]:
            for i in range(off, min(off + chunk, n)):
                if a[i] != b[i]:
                    return i
    return n
