"""Python binding of cowbackup: point-in-time backups of live block devices.

A backup job copies a *source* device to a *target* device in the background while the
source stays in use. Before the program writes to the source it calls the job's
copy-before-write hook, :meth:`Job.cow_before_write`, which first copies the old contents
of the touched clusters to the target. When the job completes, the target holds the source
exactly as it was when the job started.

This module wraps the C ABI of ``libcowbackup`` (``include/cowbackup.h``) with ctypes; it
needs nothing but the standard library::

    import cowbackup

    with cowbackup.Driver.open("disk.img", write=True) as disk, \\
         cowbackup.Driver.create("backup.img", disk.size) as backup, \\
         cowbackup.backup_start(disk, backup) as job:
        # the program's write path, on any thread, while the job runs:
        job.cow_before_write(offset, len(data))   # old data of these clusters is now safe
        disk.write(offset, data)
        job.wait()      # backup.img is disk.img as it was at backup_start

Finding the library: ``$COWBACKUP_LIB`` (a path; when set, only it is tried), then the
library the package carries (``_libcowbackup*.so`` in this package: ``pip install ./python``
builds it with cargo, and a built wheel holds it), then ``libcowbackup.so`` in this package,
then ``../../target/release/libcowbackup.so`` relative to this file (a cargo build, when the
package is imported from the repository's source tree), then an installed one:
``ctypes.util.find_library("cowbackup")``, then ``libcowbackup.so.0`` on the dynamic
loader's path (``LD_LIBRARY_PATH``, the ldconfig cache, /usr/lib...). :class:`ImportError`
names every place tried.

Threads: every call into the library releases the GIL (ctypes ``CDLL``), so the hook,
``wait`` and driver I/O of many Python threads run in parallel, and the library's own
threads can call Python drivers and ``on_complete`` meanwhile (ctypes takes the GIL for
them). Drivers, jobs and their methods may be used from any thread.

Errors: a failed library call raises :class:`CowbackupError`, an :class:`OSError` whose
``errno`` is the library's errno and whose message is the library's description of what
failed (``cowbackup_last_error``). It is also the built-in subclass Python would pick for
that errno (``TimeoutError`` for ETIMEDOUT, ``FileNotFoundError`` for ENOENT, ...), and, for
EINVAL, a :class:`ValueError`. Arguments Python can check itself raise ``TypeError`` or
``ValueError`` before the library is called. A cancelled job's :meth:`Job.wait` raises
:class:`JobCancelled` (errno ECANCELED). Public exception classes: :class:`CowbackupError`,
:class:`InvalidArgument` (EINVAL), :class:`JobCancelled` (ECANCELED), :class:`Busy` (EBUSY),
:class:`Corrupt` (EBADMSG).

Incremental backups: a :class:`Bitmap` records which parts of the source were written
(``bm.mark(offset, n)`` in the write path, before the hook and the write);
``backup_start(source, target, sync="bitmap", bitmap=bm)`` copies only those, and
:func:`backup_start_group` starts several jobs at one point in time with one outcome.

KeyboardInterrupt and SystemExit raised in Python code the library calls (a Python driver's
method, ``trace``, ``on_complete``): the library gets EINTR from that call. When it ran on the
Python thread that made the library call (Ctrl-C lands on the main thread, inside the method
the library called from :meth:`Driver.read` or :meth:`Job.cow_before_write`), the exception
is raised again in that thread as soon as the library call returns. When it ran on a library
thread (a job worker), the job's error policy handles the EINTR and :meth:`Job.wait` of a job
using that driver (or that job's callback) raises the exception; it is also logged.

fork(): handles made before ``fork()`` (drivers, jobs, bitmaps) belong to the parent. In the
child they raise ``RuntimeError`` when used, and closing them (``close``, ``__del__``, the
exit-time cleanup) does nothing: the child must not free what the parent's library threads
use, nor unlock the parent's persistent bitmaps.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import dataclasses
import enum
import errno as _errno
import glob
import logging
import math
import operator
import os
import threading
import weakref
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    c_char_p,
    c_int,
    c_int32,
    c_size_t,
    c_uint32,
    c_uint64,
    c_uint8,
    c_void_p,
)
from typing import Any, Callable, Dict, List, Optional, Tuple, Type, Union

__all__ = [
    "ABI_MAJOR",
    "Bitmap",
    "BitmapInfo",
    "Busy",
    "Corrupt",
    "CowbackupError",
    "DEFAULT_FILE_MODE",
    "DEFAULT_GRANULARITY",
    "Driver",
    "Extent",
    "InvalidArgument",
    "Job",
    "JobCancelled",
    "JobInfo",
    "JobState",
    "NBD_WRITABLE",
    "NbdServer",
    "TraceEvent",
    "STATUS_DATA",
    "STATUS_ZERO",
    "backup_start",
    "backup_start_group",
    "CHAIN_VERIFY",
    "VerifyReport",
    "WorkerPool",
    "chain_open",
    "consolidate",
    "library_path",
    "library_version",
    "verify",
]

log = logging.getLogger("cowbackup")

# Per thread: in_callback (a Python driver op runs), in_completion (job ids), calls (depth of
# library calls in progress), interrupt (a KeyboardInterrupt/SystemExit to raise when the
# outermost library call returns).
_tls = threading.local()

#: The major version of libcowbackup this binding was written for (the ABI it declares).
ABI_MAJOR = 0
#: The minor version it was written against (informational: 0.x minors only add functions).
ABI_MINOR = 1

U64_MAX = 2**64 - 1

# --- constants of include/cowbackup.h -------------------------------------------------

_SYNC = {"full": 0, "top": 1, "none": 2, "bitmap": 3}
# QEMU's names of its BitmapSyncMode (COWBACKUP_BITMAP_MODE_ON_SUCCESS, _ALWAYS, _NEVER).
_BITMAP_MODE = {"on-success": 0, "always": 1, "never": 2}
_ERROR_ACTION = {"report": 0, "ignore": 1, "stop": 2, "enospc": 3}
_CBW_ACTION = {"break-guest-write": 0, "break-snapshot": 1}
# COWBACKUP_WORKER_PRIORITY_NORMAL, _LOW, _IDLE.
_WORKER_PRIORITY = {"normal": 0, "low": 1, "idle": 2}

#: Block status bit (``block_status`` of a Python driver): the range has data of its own.
STATUS_DATA = 1
#: Block status bit: the range reads as zeroes (a hole is ZERO without DATA).
STATUS_ZERO = 2

_OPEN_WRITE = 1
_OPEN_DIRECT = 2
_CREATE_OVERWRITE = 4
_DRIVER_SERIALIZE = 1

#: The mode of every file the library creates (backups, bitmap files) unless ``mode=`` says
#: otherwise: 0o600, read and write for the owner only, whatever the umask
#: (``COWBACKUP_FILE_MODE_DEFAULT``).
DEFAULT_FILE_MODE = 0o600

#: The usual granularity of a dirty bitmap (64 KiB); granularities are powers of two from
#: 512 bytes to 2 GiB.
DEFAULT_GRANULARITY = 65536
_BITMAP_RECORDING = 1
_BITMAP_BUSY = 2
_BITMAP_PERSISTENT = 4


class JobState(enum.IntEnum):
    """State of a job (``COWBACKUP_JOB_*``)."""

    CREATED = 0
    RUNNING = 1
    PAUSED = 2
    COMPLETED = 3
    FAILED = 4
    CANCELLED = 5

    @property
    def ended(self) -> bool:
        """True for COMPLETED, FAILED and CANCELLED."""
        return self >= JobState.COMPLETED


# --- errors ----------------------------------------------------------------------------


class CowbackupError(OSError):
    """A failed library call: ``errno`` is the errno, the message says what failed and why.

    Instances are made by :func:`_error` and are also of the built-in ``OSError`` subclass
    Python maps the errno to (``TimeoutError``, ``PermissionError``, ...), and of
    ``ValueError`` for EINVAL (bad arguments found by the library).
    """


class JobCancelled(CowbackupError):
    """:meth:`Job.wait` of a job that was cancelled (errno ECANCELED)."""


class InvalidArgument(CowbackupError, ValueError):
    """EINVAL from the library: a bad argument (also a ``ValueError``)."""


class Busy(CowbackupError):
    """EBUSY from the library: the object is in use. A dirty bitmap that a job uses (clear,
    merge into it, enable, disable; a second job on it), a persistent bitmap already open (in
    this process or another), a job that has ended (pause, resume)."""


class Corrupt(CowbackupError):
    """EBADMSG from the library: a damaged or foreign file, e.g. :meth:`Bitmap.open` of a file
    that is not a bitmap, is truncated or fails its checksums (the message says where). The
    file is left as it is: a damaged bitmap is never opened with bits missing."""


#: The old, private-looking name of :class:`InvalidArgument` (kept as an alias).
_InvalidArgument = InvalidArgument

_error_classes: Dict[int, Type[CowbackupError]] = {
    _errno.EINVAL: InvalidArgument,
    _errno.ECANCELED: JobCancelled,
    _errno.EBUSY: Busy,
    _errno.EBADMSG: Corrupt,
}
_error_classes_lock = threading.Lock()


def _error_class(err: int) -> Type[CowbackupError]:
    """The exception class for a positive errno (cached)."""
    cls = _error_classes.get(err)
    if cls is not None:
        return cls
    builtin = type(OSError(err, ""))  # Python's own errno -> subclass mapping
    if builtin is OSError:
        cls = CowbackupError
    else:
        cls = type("Cowbackup" + builtin.__name__, (CowbackupError, builtin), {
            "__doc__": f"A library error with errno {_errno.errorcode.get(err, err)}.",
            "__module__": __name__,
        })
    with _error_classes_lock:
        return _error_classes.setdefault(err, cls)


def _error(ret: int, what: str) -> CowbackupError:
    """The exception for a negative errno ``ret`` just returned by the library call ``what``.

    Reads ``cowbackup_last_error()``: call it on the thread that made the call, right after.
    """
    err = -ret if ret < 0 else _errno.EIO
    msg = _last_error() or f"{what}: {os.strerror(err)}"
    return _error_class(err)(err, msg)


# --- loading the library ---------------------------------------------------------------

_HERE = os.path.dirname(os.path.abspath(__file__))


def _candidates() -> List[Tuple[str, str]]:
    """(description, path) pairs to try, in order."""
    env = os.environ.get("COWBACKUP_LIB")
    if env:
        return [("$COWBACKUP_LIB", env)]
    # The library a wheel carries: built by `pip install` (setup.py, setuptools-rust) into
    # the package as _libcowbackup<EXT_SUFFIX>; or one copied next to the package by hand.
    bundled = sorted(glob.glob(os.path.join(_HERE, "_libcowbackup*.so")))
    out = [
        ("carried by the package", bundled[0] if bundled else os.path.join(_HERE, "_libcowbackup.so")),
        ("next to the module", os.path.join(_HERE, "libcowbackup.so")),
        ("the repository's cargo build",
         os.path.normpath(os.path.join(_HERE, "..", "..", "target", "release", "libcowbackup.so"))),
    ]
    system = ctypes.util.find_library("cowbackup")
    out.append(("installed (ctypes.util.find_library('cowbackup'))", system or ""))
    # What find_library misses (e.g. a prefix in LD_LIBRARY_PATH but not in the ldconfig
    # cache): the soname, resolved by the dynamic loader itself.
    if system != "libcowbackup.so.0":
        out.append(("installed (the dynamic loader's path)", "libcowbackup.so.0"))
    return out


def _load() -> Tuple[ctypes.CDLL, str]:
    tried = []
    for where, path in _candidates():
        if not path:
            tried.append(f"  {where}: not found")
            continue
        # A bare soname from find_library is resolved by the dynamic loader.
        if os.sep in path and not os.path.exists(path):
            tried.append(f"  {where}: {path}: no such file")
            continue
        try:
            return ctypes.CDLL(path), path
        except OSError as e:
            tried.append(f"  {where}: {path}: {e}")
    raise ImportError(
        "cowbackup: libcowbackup not found; looked in:\n" + "\n".join(tried)
        + "\nInstall the package with its library (`pip install ./python` with a Rust toolchain, "
        "or a built wheel), build it (`cargo build --release` in the repository, or meson: see "
        "README.md), install it (`meson install`), or set COWBACKUP_LIB to its path."
    )


_lib, _lib_path = _load()


def _enter_call() -> int:
    """Count a library call starting on this thread; the depth before it."""
    depth = getattr(_tls, "calls", 0)
    _tls.calls = depth + 1
    return depth


def _leave_call(depth: int) -> None:
    """End of a library call: at the outermost one, raise a KeyboardInterrupt or SystemExit
    that Python code called by the library on this thread raised meanwhile."""
    _tls.calls = depth
    if depth == 0:
        exc = getattr(_tls, "interrupt", None)
        if exc is not None:
            _tls.interrupt = None
            raise exc


def _declare(name: str, restype: Any, argtypes: List[Any], tracked: bool = True) -> Any:
    """The library function ``name``; unless ``tracked`` is false, wrapped so that a
    KeyboardInterrupt/SystemExit of Python code it calls on this thread is raised after it."""
    try:
        fn = getattr(_lib, name)
    except AttributeError:
        raise ImportError(
            f"cowbackup: {_lib_path} has no function {name}: it is not a libcowbackup "
            f"{ABI_MAJOR}.x this binding can use"
        ) from None
    fn.restype = restype
    fn.argtypes = argtypes
    if not tracked:
        return fn

    def call(*args: Any) -> Any:
        depth = _enter_call()
        try:
            return fn(*args)
        finally:
            _leave_call(depth)

    call.__name__ = call.__qualname__ = name
    return call


_version = _declare("cowbackup_version", c_char_p, [], tracked=False)
_last_error_fn = _declare("cowbackup_last_error", c_char_p, [], tracked=False)

_VERSION = (_version() or b"").decode("utf-8", "replace")
try:
    _vparts = tuple(int(p) for p in _VERSION.split("-")[0].split(".")[:3])
except ValueError:
    _vparts = ()
if len(_vparts) != 3 or _vparts[0] != ABI_MAJOR:
    raise ImportError(
        f"cowbackup: {_lib_path} is libcowbackup version {_VERSION!r}; this binding was "
        f"written for version {ABI_MAJOR}.{ABI_MINOR} (major {ABI_MAJOR} required)"
    )


def _last_error() -> str:
    raw = _last_error_fn()
    return raw.decode("utf-8", "replace") if raw else ""


def library_path() -> str:
    """The path (or soname) of the loaded libcowbackup."""
    return _lib_path


def library_version() -> str:
    """The version of the loaded library, ``cowbackup_version()``, e.g. ``"0.1.0"``."""
    return _VERSION


# Callback types (cowbackup_driver_ops and the completion callback).
_READ_FN = CFUNCTYPE(c_int, c_void_p, c_uint64, c_void_p, c_size_t)
_WRITE_FN = CFUNCTYPE(c_int, c_void_p, c_uint64, c_void_p, c_size_t)
_WRITE_ZEROES_FN = CFUNCTYPE(c_int, c_void_p, c_uint64, c_uint64)
_FLUSH_FN = CFUNCTYPE(c_int, c_void_p)
_BLOCK_STATUS_FN = CFUNCTYPE(c_int, c_void_p, c_uint64, c_uint64, POINTER(c_uint64),
                             POINTER(c_uint32))
_RELEASE_FN = CFUNCTYPE(None, c_void_p)
_COMPLETION_FN = CFUNCTYPE(None, c_void_p, c_int)


class _TraceEventC(Structure):
    _fields_ = [
        ("kind", c_uint32),
        ("error", c_int32),
        ("job", c_uint64),
        ("offset", c_uint64),
        ("len", c_uint64),
        ("data", c_uint64),
        ("wait_ns", c_uint64),
        ("from_state", c_uint32),
        ("to_state", c_uint32),
        ("action", c_uint32),
        ("hook", c_uint32),
        ("message", c_char_p),
    ]


_TRACE_FN = CFUNCTYPE(None, c_void_p, POINTER(_TraceEventC))


class _DriverOps(Structure):
    _fields_ = [
        ("read", _READ_FN),
        ("write", _WRITE_FN),
        ("write_zeroes", _WRITE_ZEROES_FN),
        ("flush", _FLUSH_FN),
        ("block_status", _BLOCK_STATUS_FN),
        ("release", _RELEASE_FN),
    ]


class _JobInfoC(Structure):
    _fields_ = [
        ("state", c_uint32),
        ("error", c_int32),
        ("len", c_uint64),
        ("offset", c_uint64),
        ("bytes_copied", c_uint64),
        ("bytes_zero", c_uint64),
        ("bytes_skipped", c_uint64),
        ("bytes_failed", c_uint64),
        ("cow_requests", c_uint64),
        ("cow_bytes", c_uint64),
        ("speed", c_uint64),
        ("reserved", c_uint64 * 8),
    ]


class _RangeC(Structure):
    _fields_ = [("offset", c_uint64), ("len", c_uint64)]


class _BitmapInfoC(Structure):
    _fields_ = [
        ("size", c_uint64),
        ("granularity", c_uint64),
        ("count", c_uint64),
        ("generation", c_uint64),
        ("uuid", c_uint8 * 16),
        ("flags", c_uint32),
        ("reserved32", c_uint32),
        ("reserved", c_uint64 * 6),
    ]


_P = c_void_p  # opaque handles
_PP = POINTER(c_void_p)  # out-params for handles

_driver_new = _declare("cowbackup_driver_new", c_int,
                       [POINTER(_DriverOps), c_size_t, c_void_p, c_uint64, c_uint32, _PP])
_file_open = _declare("cowbackup_file_open", c_int, [c_char_p, c_uint32, _PP])
_file_create = _declare("cowbackup_file_create", c_int, [c_char_p, c_uint64, c_uint32, _PP])
_file_create_mode = _declare("cowbackup_file_create_mode", c_int, [c_char_p, c_uint64, c_uint32, c_uint32, _PP])
_memory_new = _declare("cowbackup_memory_new", c_int, [c_uint64, _PP])
_nbd_open = _declare("cowbackup_nbd_open", c_int, [c_char_p, c_uint32, _PP])
_rbd_open = _declare("cowbackup_rbd_open", c_int, [c_char_p, c_char_p, c_uint32, _PP])
_nbd_open_tls = _declare("cowbackup_nbd_open_tls", c_int,
                         [c_char_p, c_uint32, c_char_p, c_char_p, c_char_p, _PP])
_driver_size = _declare("cowbackup_driver_size", c_int, [_P, POINTER(c_uint64)])
_driver_read = _declare("cowbackup_driver_read", c_int, [_P, c_uint64, c_void_p, c_size_t])
_driver_write = _declare("cowbackup_driver_write", c_int, [_P, c_uint64, c_void_p, c_size_t])
_driver_free = _declare("cowbackup_driver_free", None, [_P])
# Not tracked: backup_start makes the Job before raising an interrupt (no leaked handle).
_backup_start = _declare("cowbackup_backup_start", c_int, [_P, _P, _P, _PP], tracked=False)
_cow_before_write = _declare("cowbackup_cow_before_write", c_int, [_P, c_uint64, c_uint64])
_job_pause = _declare("cowbackup_job_pause", c_int, [_P])
_job_resume = _declare("cowbackup_job_resume", c_int, [_P])
_job_cancel = _declare("cowbackup_job_cancel", c_int, [_P])
_job_set_speed = _declare("cowbackup_job_set_speed", c_int, [_P, c_uint64])
_job_wait = _declare("cowbackup_job_wait", c_int, [_P])
_job_query = _declare("cowbackup_job_query", c_int, [_P, POINTER(_JobInfoC)])
_job_free = _declare("cowbackup_job_free", None, [_P])
_job_failed_ranges = _declare("cowbackup_job_failed_ranges", c_int,
                              [_P, POINTER(_RangeC), c_size_t, POINTER(c_size_t)])
_options_new = _declare("cowbackup_options_new", _P, [])
_options_free = _declare("cowbackup_options_free", None, [_P])
_opt_cluster_size = _declare("cowbackup_options_set_cluster_size", c_int, [_P, c_uint64])
_opt_sync = _declare("cowbackup_options_set_sync", c_int, [_P, c_uint32])
_opt_speed = _declare("cowbackup_options_set_speed", c_int, [_P, c_uint64])
_opt_workers = _declare("cowbackup_options_set_workers", c_int, [_P, c_uint32])
_opt_worker_priority = _declare("cowbackup_options_set_worker_priority", c_int, [_P, c_uint32])
_opt_max_chunk = _declare("cowbackup_options_set_max_chunk", c_int, [_P, c_uint64])
_opt_on_source_error = _declare("cowbackup_options_set_on_source_error", c_int, [_P, c_uint32])
_opt_on_target_error = _declare("cowbackup_options_set_on_target_error", c_int, [_P, c_uint32])
_opt_on_cbw_error = _declare("cowbackup_options_set_on_cbw_error", c_int, [_P, c_uint32])
_opt_cbw_timeout = _declare("cowbackup_options_set_cbw_timeout", c_int, [_P, c_uint64])
_opt_target_is_zero = _declare("cowbackup_options_set_target_is_zero", c_int, [_P, c_uint32])
_opt_completion = _declare("cowbackup_options_set_completion", c_int,
                           [_P, _COMPLETION_FN, c_void_p])
_opt_trace = _declare("cowbackup_options_set_trace", c_int, [_P, _TRACE_FN, c_void_p])
_opt_bitmap = _declare("cowbackup_options_set_bitmap", c_int, [_P, _P, c_uint32])
_opt_discard_source = _declare("cowbackup_options_set_discard_source", c_int, [_P, c_uint32])
_opt_cow_buffer = _declare("cowbackup_options_set_cow_buffer", c_int, [_P, c_uint64])
_opt_pool = _declare("cowbackup_options_set_pool", c_int, [_P, _P])
_pool_new = _declare("cowbackup_pool_new", c_int, [c_uint32, c_uint32, POINTER(_P)])
_pool_free = _declare("cowbackup_pool_free", None, [_P], tracked=False)
_opt_manifest = _declare("cowbackup_options_set_manifest", c_int, [_P, ctypes.c_char_p])
_opt_disk_id = _declare("cowbackup_options_set_disk_id", c_int, [_P, ctypes.c_char_p])
_driver_block_status = _declare("cowbackup_driver_block_status", c_int,
                                [_P, c_uint64, c_uint64, POINTER(c_uint64), POINTER(c_uint32)])
_driver_discard = _declare("cowbackup_driver_discard", c_int, [_P, c_uint64, c_uint64])
_driver_flush = _declare("cowbackup_driver_flush", c_int, [_P])
_job_snapshot = _declare("cowbackup_job_snapshot", c_int, [_P, _PP])
_job_complete = _declare("cowbackup_job_complete", c_int, [_P])
# Not tracked, like _backup_start.
_backup_start_group = _declare("cowbackup_backup_start_group", c_int,
                               [c_size_t, _PP, _PP, _PP, _PP], tracked=False)
_bitmap_new = _declare("cowbackup_bitmap_new", c_int, [c_uint64, c_uint64, _PP])
_bitmap_create = _declare("cowbackup_bitmap_create", c_int, [c_char_p, c_uint64, c_uint64, _PP])
_bitmap_create_mode = _declare("cowbackup_bitmap_create_mode", c_int,
                               [c_char_p, c_uint64, c_uint64, c_uint32, _PP])
_bitmap_open = _declare("cowbackup_bitmap_open", c_int, [c_char_p, _PP])
_bitmap_mark = _declare("cowbackup_bitmap_mark", c_int, [_P, c_uint64, c_uint64])
_bitmap_clear = _declare("cowbackup_bitmap_clear", c_int, [_P])
_bitmap_enable = _declare("cowbackup_bitmap_enable", c_int, [_P])
_bitmap_disable = _declare("cowbackup_bitmap_disable", c_int, [_P])
_bitmap_merge = _declare("cowbackup_bitmap_merge", c_int, [_P, _P])
_bitmap_next_dirty = _declare("cowbackup_bitmap_next_dirty", c_int,
                              [_P, c_uint64, POINTER(c_uint64), POINTER(c_uint64)])
_bitmap_query = _declare("cowbackup_bitmap_query", c_int, [_P, POINTER(_BitmapInfoC)])
_bitmap_free = _declare("cowbackup_bitmap_free", None, [_P])
_nbd_server_start = _declare("cowbackup_nbd_server_start", c_int, [c_char_p, _PP])
_nbd_server_address = _declare("cowbackup_nbd_server_address", c_char_p, [_P])
_nbd_server_add = _declare("cowbackup_nbd_server_add", c_int, [_P, c_char_p, _P, c_uint32])
_nbd_server_add_bitmap = _declare("cowbackup_nbd_server_add_bitmap", c_int, [_P, c_char_p, c_char_p, _P])
_nbd_server_remove = _declare("cowbackup_nbd_server_remove", c_int, [_P, c_char_p])
_nbd_server_stop = _declare("cowbackup_nbd_server_stop", None, [_P])
_nbd_server_options_new = _declare("cowbackup_nbd_server_options_new", _P, [])
_nbd_server_options_free = _declare("cowbackup_nbd_server_options_free", None, [_P])
_nbd_server_options_set_tls = _declare("cowbackup_nbd_server_options_set_tls", c_int,
                                       [_P, c_char_p, c_char_p, c_char_p])
_nbd_server_options_allow = _declare("cowbackup_nbd_server_options_allow", c_int, [_P, c_char_p])
_nbd_server_options_set_insecure = _declare("cowbackup_nbd_server_options_set_insecure", c_int,
                                            [_P, ctypes.c_bool])
_nbd_server_options_set_limits = _declare("cowbackup_nbd_server_options_set_limits", c_int,
                                          [_P, c_uint32, c_uint32])
_nbd_server_start_with = _declare("cowbackup_nbd_server_start_with", c_int, [c_char_p, _P, _PP])


def _check(ret: int, what: str) -> None:
    if ret != 0:
        raise _error(ret, what)


# --- argument checks -------------------------------------------------------------------


def _u64(value: Any, name: str) -> int:
    """``value`` as an int in 0..2**64-1: TypeError for non-integers, ValueError else."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not bool")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, not {type(value).__name__}") from None
    if v < 0:
        raise ValueError(f"{name} must not be negative (got {v})")
    if v > U64_MAX:
        raise ValueError(f"{name} must be at most 2**64-1 (got {v})")
    return v


def _choice(value: Any, table: Dict[str, int], name: str) -> int:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {sorted(table)}")
    try:
        return table[value]
    except KeyError:
        raise ValueError(f"unknown {name} {value!r}: expected one of {sorted(table)}") from None


def _path_arg(path: Any) -> bytes:
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(f"path must be str, bytes or os.PathLike, not {type(path).__name__}")
    raw = os.fsencode(path)
    if b"\0" in raw:
        raise ValueError("path must not contain NUL bytes")
    if not raw:
        raise ValueError("path must not be empty")
    return raw


# --- handles shared by threads ---------------------------------------------------------



# The process's pid, updated in a child after fork(): handles remember the pid that made them.
_pid = os.getpid()


def _after_fork_in_child() -> None:
    global _pid
    _pid = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Handle:
    """A C handle used by many threads and freed once: ``close`` waits for calls in flight.

    The C rule is that a free must not race with other calls on the handle; this enforces it
    from Python, so closing from one thread while another uses the object cannot crash.

    A handle belongs to the process that made it: in a child after ``fork()`` (where the
    library's threads do not exist) using it raises RuntimeError and closing it does nothing.
    """

    __slots__ = ("ptr", "what", "pid", "_users", "_cond", "_closing")

    def __init__(self, ptr: int, what: str) -> None:
        self.ptr = ptr
        self.what = what
        self.pid = _pid
        self._users = 0
        self._cond = threading.Condition(threading.Lock())
        self._closing = False

    @property
    def foreign(self) -> bool:
        """True in a child process after fork(): the handle is the parent's."""
        return self.pid != _pid

    def acquire(self) -> int:
        if self.foreign:
            raise RuntimeError(
                f"{self.what} was made by process {self.pid} before fork(); it cannot be used "
                f"in the child process {_pid} (make new drivers, jobs and bitmaps in the child)")
        with self._cond:
            if self._closing:
                raise ValueError(f"{self.what} is closed")
            self._users += 1
            return self.ptr

    def release(self) -> None:
        with self._cond:
            self._users -= 1
            if self._users == 0 and self._closing:
                self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closing

    def begin_close(self) -> Optional[int]:
        """Refuse new calls; the pointer, or None when already closing or when the handle is
        the parent's (in a child after fork(): nothing is freed there)."""
        if self.foreign:
            return None
        with self._cond:
            if self._closing:
                return None
            self._closing = True
            return self.ptr

    def drain(self) -> None:
        """Wait until no call is in flight."""
        with self._cond:
            while self._users:
                self._cond.wait()


# --- Python drivers: module-level thunks, per-driver objects in a registry ---------------
#
# The C functions the library calls are the module-level CFUNCTYPE objects below: they live
# as long as the module, so the library can never call freed code. Each Python driver is an
# entry of _py_drivers keyed by the `opaque` integer; the entry (the user's object) is kept
# until the library calls `release`, which may be long after the Driver wrapper is closed or
# collected (a job holds its own reference to the device).

_py_drivers: Dict[int, "_PyDriver"] = {}
_next_key = 1
_key_lock = threading.Lock()


def _new_key() -> int:
    global _next_key
    with _key_lock:
        key = _next_key
        _next_key += 1
        return key


class _PyDriver:
    __slots__ = ("obj", "size", "name", "__weakref__")

    def __init__(self, obj: Any, size: int) -> None:
        self.obj = obj
        self.size = size
        self.name = type(obj).__name__


# KeyboardInterrupt/SystemExit raised on library threads, by the key of the Python driver or
# job whose code raised it; Job.wait() of a job using that driver (or that job) raises it.
_pending: Dict[int, BaseException] = {}
_pending_lock = threading.Lock()


def _interrupted(exc: BaseException, where: str, key: Optional[int]) -> bool:
    """Keep a KeyboardInterrupt or SystemExit raised by Python code the library called, to
    raise it in Python later: in this thread when the library call it runs inside returns,
    else (a library thread) from Job.wait. False for other exceptions."""
    if not isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return False
    if getattr(_tls, "calls", 0) > 0:
        if getattr(_tls, "interrupt", None) is None:
            _tls.interrupt = exc
        return True
    with _pending_lock:
        _pending.setdefault(key or 0, exc)
    log.warning("cowbackup: %s raised %s on a library thread: the library got EINTR; "
                "Job.wait() raises it", where, type(exc).__name__)
    return True


def _take_pending(keys: Tuple[int, ...]) -> Optional[BaseException]:
    """The first kept interrupt of these keys (removed), or None."""
    with _pending_lock:
        for k in keys:
            exc = _pending.pop(k, None)
            if exc is not None:
                return exc
    return None


def _op_errno(exc: BaseException, op: str, drv: Optional[_PyDriver], where: str) -> int:
    """Log an exception raised by a Python driver op; the negative errno to return."""
    err = getattr(exc, "errno", None) if isinstance(exc, OSError) else None
    if not isinstance(err, int) or err <= 0:
        err = _errno.EIO
    name = drv.name if drv is not None else "?"
    log.error("cowbackup: Python driver %s.%s(%s) failed (returning -%s): %r", name, op,
              where, _errno.errorcode.get(err, err), exc,
              exc_info=(type(exc), exc, exc.__traceback__))
    return -err


def _enter_callback() -> bool:
    prev = getattr(_tls, "in_callback", False)
    _tls.in_callback = True
    return prev


def _run_op(key: Optional[int], op: str, args: str, body: Callable[[Any], None]) -> int:
    """Run one driver op of the Python driver `key`: 0, or the negative errno of whatever it
    raised (logged). Nothing ever unwinds into C."""
    drv = _py_drivers.get(key or 0)
    prev = _enter_callback()
    try:
        if drv is None:
            raise RuntimeError(f"no Python driver with key {key}")
        body(drv.obj)
        return 0
    except BaseException as e:
        if _interrupted(e, f"Python driver {drv.name if drv else '?'}.{op}({args})", key):
            return -_errno.EINTR
        return _op_errno(e, op, drv, args)
    finally:
        _tls.in_callback = prev


def _thunk_read(key: Optional[int], offset: int, buf: Optional[int], n: int) -> int:
    def body(obj: Any) -> None:
        data = obj.read(offset, n)
        if not isinstance(data, bytes):
            data = bytes(memoryview(data))
        if len(data) != n:
            raise ValueError(f"read returned {len(data)} bytes, {n} were asked")
        if n:
            ctypes.memmove(buf, data, n)

    return _run_op(key, "read", f"{offset}, {n}", body)


def _thunk_write(key: Optional[int], offset: int, buf: Optional[int], n: int) -> int:
    # A copy: the C buffer is valid only during the call, the object may keep `data`.
    return _run_op(key, "write", f"{offset}, <{n} bytes>",
                   lambda obj: obj.write(offset, ctypes.string_at(buf, n) if n else b""))


def _thunk_write_zeroes(key: Optional[int], offset: int, n: int) -> int:
    return _run_op(key, "write_zeroes", f"{offset}, {n}", lambda obj: obj.write_zeroes(offset, n))


def _thunk_flush(key: Optional[int]) -> int:
    return _run_op(key, "flush", "", lambda obj: obj.flush())


def _thunk_block_status(key: Optional[int], offset: int, n: int, pnum: Any, pstatus: Any) -> int:
    def body(obj: Any) -> None:
        result = obj.block_status(offset, n)
        try:
            num, flags = result
            num = _u64(num, "block_status count")
            flags = operator.index(flags)
        except (TypeError, ValueError) as e:
            raise TypeError(f"block_status must return (int count, int flags), got {result!r}: {e}") from None
        if not 0 <= flags <= 0xFFFFFFFF:
            raise ValueError(f"block_status flags {flags:#x} out of range")
        pnum[0] = num
        pstatus[0] = flags

    return _run_op(key, "block_status", f"{offset}, {n}", body)


def _thunk_release(key: Optional[int]) -> None:
    try:
        _py_drivers.pop(key or 0, None)
        with _pending_lock:
            _pending.pop(key or 0, None)
    except BaseException:  # pragma: no cover - dict.pop does not fail
        pass


_c_read = _READ_FN(_thunk_read)
_c_write = _WRITE_FN(_thunk_write)
_c_write_zeroes = _WRITE_ZEROES_FN(_thunk_write_zeroes)
_c_flush = _FLUSH_FN(_thunk_flush)
_c_block_status = _BLOCK_STATUS_FN(_thunk_block_status)
_c_release = _RELEASE_FN(_thunk_release)


# --- drivers ---------------------------------------------------------------------------

_live_drivers: "weakref.WeakSet[Driver]" = weakref.WeakSet()
_live_jobs: "weakref.WeakSet[Job]" = weakref.WeakSet()


def _out_handle(fn: Callable[..., int], what: str, *args: Any) -> int:
    out = c_void_p()
    _check(fn(*args, ctypes.byref(out)), what)
    if not out.value:  # pragma: no cover - the ABI writes a handle on success
        raise CowbackupError(_errno.EIO, f"{what} returned no handle")
    return out.value


def _buffer_arg(data: Any) -> Tuple[Any, int]:
    """A (pointer-compatible object, length) for bytes-like ``data``, copying only if needed."""
    if isinstance(data, bytes):
        return data, len(data)
    if isinstance(data, str):
        raise TypeError("data must be bytes-like, not str (encode it first)")
    try:
        memoryview(data)
    except TypeError:
        raise TypeError(f"data must be bytes-like, not {type(data).__name__}") from None
    mv = memoryview(data)
    if mv.readonly or not mv.c_contiguous:
        raw = mv.tobytes()
        return raw, len(raw)
    flat = mv.cast("B")
    if flat.nbytes == 0:
        return b"", 0
    return (ctypes.c_char * flat.nbytes).from_buffer(flat), flat.nbytes


@dataclasses.dataclass(frozen=True)
class Extent:
    """A range with one allocation status (:meth:`Driver.block_status`)."""

    offset: int
    length: int
    data: bool  #: allocated data
    zero: bool  #: reads as zeroes

    @property
    def end(self) -> int:
        """The offset just past the extent: ``offset + length``."""
        return self.offset + self.length


class Driver:
    """A block device: a handle on a library driver (memory, file, or implemented in Python).

    Make one with :meth:`memory`, :meth:`open`, :meth:`create` or :meth:`from_python`; close
    it with :meth:`close` or a ``with`` block. A job started on a driver holds its own
    reference to the device: the driver may be closed right after :func:`backup_start`.
    Thread-safe: methods may be called from several threads at once (``close`` waits for
    calls in flight). I/O releases the GIL.
    """

    __slots__ = ("_h", "_size", "_kind", "_key", "__weakref__")

    def __init__(self, _ptr: int, _kind: str, _key: Optional[int] = None) -> None:
        """Internal: use the class methods."""
        self._key = _key  # a Python driver's key in _py_drivers
        size = c_uint64()
        try:
            _check(_driver_size(_ptr, ctypes.byref(size)), "cowbackup_driver_size")
        except BaseException:
            _driver_free(_ptr)  # no _h yet: __del__ will not free it again
            raise
        self._size = size.value
        self._kind = _kind
        self._h = _Handle(_ptr, f"cowbackup.Driver ({_kind})")
        _live_drivers.add(self)

    @classmethod
    def memory(cls, size: int) -> "Driver":
        """A new in-memory device of ``size`` bytes (1 byte to 1 TiB) reading as zeroes.

        Memory is allocated lazily when written. Raises ValueError (also for size 0 or
        over 1 TiB, found by the library: a :class:`CowbackupError` with errno EINVAL).
        """
        size = _u64(size, "size")
        return cls(_out_handle(_memory_new, "cowbackup_memory_new", size), "memory")

    @classmethod
    def open(cls, path: Union[str, bytes, "os.PathLike[Any]"], write: bool = False,
             direct: bool = False) -> "Driver":
        """Open an existing raw image file or block device (read-only unless ``write``).

        ``direct`` uses O_DIRECT for aligned requests. Raises :class:`CowbackupError` with
        the open's errno (a ``FileNotFoundError`` for a missing file, ...).
        """
        raw = _path_arg(path)
        flags = (_OPEN_WRITE if write else 0) | (_OPEN_DIRECT if direct else 0)
        return cls(_out_handle(_file_open, "cowbackup_file_open", raw, flags), "file")

    @classmethod
    def nbd_open(cls, uri: str, write: bool = False, *, ca: Any = None, cert: Any = None,
                 key: Any = None) -> "Driver":
        """Connect to an export of an NBD server (``qemu-nbd``, ``nbdkit``, ...).

        ``uri``: ``"nbd://HOST[:PORT]/EXPORT"`` or ``"nbd+unix:///EXPORT?socket=PATH"`` (the
        NBD URI standard; the export name may be empty), or over TLS ``"nbds://..."`` /
        ``"nbds+unix://..."``. Read-only unless ``write``; an
        export the server marks read-only is read-only whatever ``write`` says (writes raise
        ``CowbackupError`` with errno EROFS). Block status reports the export's holes and
        zeroes; up to 4 connections are used in parallel when the server allows it.

        TLS: ``ca`` is the PEM file of the CA that signs the server's certificate (which must
        carry the URI's host or IP; ``localhost`` for Unix sockets; ``tls-hostname=NAME`` in
        the URI names another); ``cert`` + ``key`` a client certificate for servers that
        require one. Without ``ca``, an ``nbds://`` URI needs ``tls-certificates=DIR``
        (``DIR/ca-cert.pem``, optional ``client-cert.pem`` + ``client-key.pem``). No
        plaintext fallback: a server without TLS fails the open (errno ENOTSUP).

        Connecting with the whole handshake, and every request with its whole reply, must
        finish within 30 s (``TimeoutError`` otherwise): a job stuck on a dead or hostile
        NBD target sees its cancel within 30 s.

        Raises :class:`InvalidArgument` for a URI that is not a valid NBD URI (the message
        says why) or TLS files that are not valid, and :class:`CowbackupError` with the
        connection's errno otherwise (``FileNotFoundError`` for a missing socket or export,
        ``ConnectionRefusedError``, ``PermissionError`` for a server that requires TLS,
        ``TimeoutError``...). Closing the driver disconnects once no job uses it.
        """
        if not isinstance(uri, str):
            raise TypeError("uri must be a str")
        if not isinstance(write, bool):
            raise TypeError("write must be a bool")
        if "\0" in uri:
            raise InvalidArgument(_errno.EINVAL, "cowbackup_nbd_open: the URI contains NUL")
        raw = uri.encode("utf-8", "surrogateescape")
        flags = _OPEN_WRITE if write else 0
        if ca is None and cert is None and key is None:
            return cls(_out_handle(_nbd_open, "cowbackup_nbd_open", raw, flags), "nbd")
        if ca is None:
            raise InvalidArgument(_errno.EINVAL, "cowbackup_nbd_open_tls: cert/key need ca")
        if (cert is None) != (key is None):
            raise InvalidArgument(_errno.EINVAL, "cowbackup_nbd_open_tls: cert and key go together")
        files = [_path_arg(ca), None if cert is None else _path_arg(cert),
                 None if key is None else _path_arg(key)]
        return cls(_out_handle(_nbd_open_tls, "cowbackup_nbd_open_tls", raw, flags, *files), "nbd")

    @classmethod
    def rbd_open(cls, spec: str, conf: Optional[Union[str, bytes, "os.PathLike[Any]"]] = None,
                 write: bool = False) -> "Driver":
        """Open an image of a Ceph RBD pool through librbd (``cowbackup_rbd_open``).

        ``spec``: ``"rbd:POOL/IMAGE"`` or ``"rbd:POOL/NAMESPACE/IMAGE"``, optionally with
        ``"@SNAPSHOT"`` (read-only) and then ``":id=NAME"`` (cephx user ``client.NAME``,
        default ``admin``). ``conf``: the cluster's conf file, or ``None`` for librados's
        search (``$CEPH_CONF``, ``/etc/ceph/ceph.conf``...). Read-only unless ``write``.
        Connecting and every monitor or OSD request time out after 30 s, so a job against a
        cluster that went away fails or pauses instead of hanging.

        Raises :class:`InvalidArgument` for a spec that does not parse, and
        :class:`CowbackupError` with librbd's errno otherwise (``FileNotFoundError`` for a
        missing conf file, pool or image; ``TimeoutError``; errno EROFS for a writable
        snapshot; errno ENOTSUP when the library was built without the RBD driver). The
        image closes once no job uses the driver.
        """
        if not isinstance(spec, str):
            raise TypeError("spec must be a str")
        if not isinstance(write, bool):
            raise TypeError("write must be a bool")
        if "\0" in spec:
            raise InvalidArgument(_errno.EINVAL, "cowbackup_rbd_open: the spec contains NUL")
        raw = spec.encode("utf-8", "surrogateescape")
        raw_conf = None if conf is None else _path_arg(conf)
        flags = _OPEN_WRITE if write else 0
        return cls(_out_handle(_rbd_open, "cowbackup_rbd_open", raw, raw_conf, flags), "rbd")

    @classmethod
    def create(cls, path: Union[str, bytes, "os.PathLike[Any]"], size: int,
               direct: bool = False, overwrite: bool = False,
               mode: int = DEFAULT_FILE_MODE) -> "Driver":
        """Create a new sparse raw image of ``size`` bytes, opened read-write.

        The new file reads as zeroes, so a backup into it skips zero clusters. It is made
        with permission bits ``mode`` (default 0o600, owner only), applied exactly whatever
        the umask, under a temporary name in the same directory and renamed into place: a
        symlink (even dangling) or a file someone else planted at ``path`` is never followed
        nor adopted. An existing ``path`` is never replaced unless ``overwrite`` is true: it
        raises ``FileExistsError`` (a :class:`CowbackupError`, errno EEXIST) and the file is
        left as it was, so a backup pointed at the wrong path cannot wipe it.
        ``overwrite=True`` replaces an existing regular file by renaming the new one over it
        (never writing through it), opens an existing block device (never replaced; it must
        hold ``size`` bytes), refuses a symlink with errno ELOOP (link and target untouched)
        and anything else with :class:`InvalidArgument`. A ``mode`` outside 0o777 raises
        :class:`InvalidArgument`.
        """
        raw = _path_arg(path)
        size = _u64(size, "size")
        if not isinstance(overwrite, bool):
            raise TypeError("overwrite must be a bool")
        if not isinstance(mode, int) or isinstance(mode, bool):
            raise TypeError("mode must be an int")
        if not 0 <= mode <= 0o777:
            raise InvalidArgument(_errno.EINVAL, f"mode {mode:#o} is invalid: only the permission bits 0o777 may be set")
        flags = (_OPEN_DIRECT if direct else 0) | (_CREATE_OVERWRITE if overwrite else 0)
        try:
            ptr = _out_handle(_file_create_mode, "cowbackup_file_create_mode", raw, size, flags, mode)
        except CowbackupError as e:
            if e.errno == _errno.EEXIST:  # say it in Python's terms
                e.strerror = e.strerror.replace("pass COWBACKUP_CREATE_OVERWRITE", "pass overwrite=True")
                e.args = (e.errno, e.strerror)
            raise
        return cls(ptr, "file")

    @classmethod
    def from_python(cls, obj: Any, size: int, serialize: bool = False) -> "Driver":
        """A device whose I/O is done by the Python object ``obj``.

        ``obj`` has the methods ``read(offset, n) -> bytes`` (exactly ``n`` bytes) and
        ``write(offset, data: bytes)``, and optionally ``write_zeroes(offset, n)``,
        ``flush()`` and ``block_status(offset, n) -> (count, flags)`` (``count`` 1..n bytes
        sharing the status ``flags``, a combination of :data:`STATUS_DATA` and
        :data:`STATUS_ZERO`). Missing optional methods get the library's defaults (zero
        buffers through ``write``; nothing; everything DATA).

        The methods are called on library threads (job workers) and on the threads calling
        the hook or :meth:`read`/:meth:`write`, concurrently unless ``serialize`` is true
        (then one at a time). They must not call methods of a job using this device.
        An exception in a method is logged on the ``cowbackup`` logger and returned to the
        library as an error: the ``errno`` of an ``OSError``, else EIO. KeyboardInterrupt
        and SystemExit return EINTR and are raised again in Python (see the module's doc).

        The library keeps ``obj`` alive until it drops its last reference to the device
        (this driver closed and every job using it closed), then forgets it.
        """
        if not callable(getattr(obj, "read", None)) or not callable(getattr(obj, "write", None)):
            raise TypeError("a Python driver needs callable read(offset, n) and write(offset, data)")
        size = _u64(size, "size")
        if size == 0:
            raise ValueError("size must be positive")
        ops = _DriverOps()
        ops.read = _c_read
        ops.write = _c_write
        if callable(getattr(obj, "write_zeroes", None)):
            ops.write_zeroes = _c_write_zeroes
        if callable(getattr(obj, "flush", None)):
            ops.flush = _c_flush
        if callable(getattr(obj, "block_status", None)):
            ops.block_status = _c_block_status
        ops.release = _c_release
        key = _new_key()
        _py_drivers[key] = _PyDriver(obj, size)
        try:
            ptr = _out_handle(_driver_new, "cowbackup_driver_new", ctypes.byref(ops),
                              ctypes.sizeof(ops), key, size,
                              _DRIVER_SERIALIZE if serialize else 0)
        except BaseException:
            _py_drivers.pop(key, None)  # failed: the library does not call release
            raise
        return cls(ptr, "python", key)

    @property
    def size(self) -> int:
        """The device size in bytes."""
        return self._size

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._h.closed

    def _ptr(self) -> int:
        """Acquire the handle for one call (pair with ``self._h.release()``)."""
        return self._h.acquire()

    def _check_range(self, offset: int, n: int) -> None:
        if offset + n > self._size:
            raise ValueError(f"range {offset}+{n} is past the end of the device ({self._size} bytes)")

    def read(self, offset: int, n: int) -> bytes:
        """Read ``n`` bytes at ``offset`` directly from the device (not through a job).

        Raises ValueError for a range past the end, :class:`CowbackupError` for I/O errors.
        Releases the GIL during the I/O.
        """
        offset = _u64(offset, "offset")
        n = _u64(n, "n")
        self._check_range(offset, n)
        buf = ctypes.create_string_buffer(n)
        ptr = self._ptr()
        try:
            _check(_driver_read(ptr, offset, buf, n), "cowbackup_driver_read")
        finally:
            self._h.release()
        return buf.raw

    def readinto(self, offset: int, buffer: Any) -> None:
        """Read ``len(buffer)`` bytes at ``offset`` into the writable bytes-like ``buffer``."""
        offset = _u64(offset, "offset")
        mv = memoryview(buffer)
        if mv.readonly or not mv.c_contiguous:
            raise TypeError("buffer must be a writable, contiguous bytes-like object")
        flat = mv.cast("B")
        n = flat.nbytes
        self._check_range(offset, n)
        cbuf = (ctypes.c_char * n).from_buffer(flat) if n else None
        ptr = self._ptr()
        try:
            _check(_driver_read(ptr, offset, cbuf, n), "cowbackup_driver_read")
        finally:
            self._h.release()

    def write(self, offset: int, data: Any) -> None:
        """Write the bytes-like ``data`` at ``offset`` directly to the device.

        This does NOT call the hook of a job backing up this device: call
        :meth:`Job.cow_before_write` first. Releases the GIL during the I/O.
        """
        offset = _u64(offset, "offset")
        buf, n = _buffer_arg(data)
        self._check_range(offset, n)
        ptr = self._ptr()
        try:
            _check(_driver_write(ptr, offset, buf if n else None, n), "cowbackup_driver_write")
        finally:
            self._h.release()

    def discard(self, offset: int, length: int) -> None:
        """Tell the device that ``[offset, offset + length)`` is no longer needed: its space
        may be released (a hole in a file). Advisory: a device that cannot discard ignores it.
        On a snapshot view (:meth:`Job.snapshot`) it releases the whole clusters inside the
        range: they are not copied any more and later reads of them fail (EACCES).
        """
        offset = _u64(offset, "offset")
        length = _u64(length, "length")
        self._check_range(offset, length)
        ptr = self._ptr()
        try:
            _check(_driver_discard(ptr, offset, length), "cowbackup_driver_discard")
        finally:
            self._h.release()

    def flush(self) -> None:
        """Make what was written to the device durable."""
        ptr = self._ptr()
        try:
            _check(_driver_flush(ptr), "cowbackup_driver_flush")
        finally:
            self._h.release()

    def block_status(self, offset: int = 0, length: Optional[int] = None) -> list["Extent"]:
        """The allocation status of ``[offset, offset + length)`` (default: to the end), as
        a list of :class:`Extent` covering the range in order, neighbours with the same status
        merged. On a snapshot view: the status of the point-in-time image.
        """
        offset = _u64(offset, "offset")
        length = self._size - offset if length is None else _u64(length, "length")
        self._check_range(offset, length)
        out: list[Extent] = []
        ptr = self._ptr()
        try:
            pos, end = offset, offset + length
            while pos < end:
                pnum, st = c_uint64(), c_uint32()
                _check(_driver_block_status(ptr, pos, end - pos, ctypes.byref(pnum), ctypes.byref(st)),
                       "cowbackup_driver_block_status")
                n = max(1, min(pnum.value, end - pos))
                data, zero = bool(st.value & 1), bool(st.value & 2)
                if out and out[-1].data == data and out[-1].zero == zero and out[-1].end == pos:
                    out[-1] = Extent(out[-1].offset, out[-1].length + n, data, zero)
                else:
                    out.append(Extent(pos, n, data, zero))
                pos += n
        finally:
            self._h.release()
        return out

    def close(self) -> None:
        """Drop this handle (jobs using the device keep it alive). Idempotent."""
        ptr = self._h.begin_close()
        if ptr is None:
            return
        self._h.drain()
        _live_drivers.discard(self)
        _driver_free(ptr)

    def __enter__(self) -> "Driver":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        if _shutting_down or not hasattr(self, "_h"):
            return
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self._size} bytes"
        return f"<cowbackup.Driver {self._kind}, {state}>"


# --- dirty bitmaps ---------------------------------------------------------------------

_live_bitmaps: "weakref.WeakSet[Bitmap]" = weakref.WeakSet()


@dataclasses.dataclass(frozen=True)
class BitmapInfo:
    """What :meth:`Bitmap.info` reports, read together.

    ``size``: bytes of device covered; ``granularity``: bytes per bit; ``count``: dirty bytes
    (the last granule clipped to ``size``; while a job uses the bitmap, what it froze plus the
    marks since); ``generation``: bumped each time bits are removed (a clear of a dirty
    bitmap, a job that syncs it), never by marks, merges, enable/disable or a job that merges
    its bitmap back; ``uuid``: 16 random bytes from creation, kept by a persistent bitmap.
    With ``generation`` it lets a backup application check that its chain is intact.
    ``recording``: marks are recorded (enabled); ``busy``: a job uses the bitmap;
    ``persistent``: stored in a file.
    """

    size: int
    granularity: int
    count: int
    generation: int
    uuid: bytes
    recording: bool
    busy: bool
    persistent: bool

    @property
    def flags(self) -> frozenset:
        """The names of the flags that are set: ``"recording"``, ``"busy"``, ``"persistent"``."""
        return frozenset(n for n in ("recording", "busy", "persistent") if getattr(self, n))


class Bitmap:
    """A dirty bitmap: which parts of a device were written, for incremental backups.

    One bit per *granule* (a power of two from 512 bytes to 2 GiB, default 64 KiB). The
    program's write path calls :meth:`mark` **before** each write to the device, next to the
    hook of a running job::

        bm.mark(offset, len(data))            # 1. record the write (durable, if persistent)
        if job is not None:
            job.cow_before_write(offset, len(data))   # 2. save the old data
        disk.write(offset, data)              # 3. write

    ``backup_start(disk, target, sync="bitmap", bitmap=bm)`` then copies only the clusters
    that overlap dirty granules. While a job uses the bitmap it is *busy* (frozen): marks go
    on (to its successor), but :meth:`clear`, :meth:`merge` into it, :meth:`enable` and
    :meth:`disable` raise :class:`Busy`. At the end of the job, ``bitmap_mode`` decides what
    it holds (see :func:`backup_start`).

    In memory (:meth:`new`) or persistent and crash-safe (:meth:`create`, :meth:`open`):
    when :meth:`mark` returns, the granules it covers are in the file, even if the machine
    crashes right after. A persistent bitmap is locked while open: a second :meth:`open`, in
    this process or another, raises :class:`Busy`.

    A reference-counted handle like :class:`Driver`: a job holds its own reference, so the
    bitmap may be closed while a job uses it (the file stays open and locked until the job is
    closed too). A context manager; thread-safe (``mark`` from every writing thread; ``close``
    waits for calls in flight). Use after :meth:`close` raises ``ValueError``; in a child
    process after ``fork()``, ``RuntimeError`` (and closing it there does nothing: the lock of
    a persistent bitmap stays the parent's).
    """

    __slots__ = ("_h", "_size", "_granularity", "_path", "__weakref__")

    def __init__(self, _ptr: int, _path: Optional[str] = None) -> None:
        """Internal: use :meth:`new`, :meth:`create` or :meth:`open`."""
        cinfo = _BitmapInfoC()
        try:
            _check(_bitmap_query(_ptr, ctypes.byref(cinfo)), "cowbackup_bitmap_query")
        except BaseException:
            _bitmap_free(_ptr)  # no _h yet: __del__ will not free it again
            raise
        self._size = cinfo.size
        self._granularity = cinfo.granularity
        self._path = _path
        what = "cowbackup.Bitmap" + (f" ({_path})" if _path is not None else " (memory)")
        self._h = _Handle(_ptr, what)
        _live_bitmaps.add(self)

    @classmethod
    def new(cls, size: int, granularity: int = DEFAULT_GRANULARITY) -> "Bitmap":
        """A bitmap in memory of a ``size``-byte device (any size but 0: the last granule may
        be partial), clean and recording, with a random uuid.

        Raises TypeError (non-integers), ValueError (negative), :class:`InvalidArgument`
        (size 0, a granularity that is not a power of two from 512 to 2 GiB).
        """
        size = _u64(size, "size")
        granularity = _u64(granularity, "granularity")
        return cls(_out_handle(_bitmap_new, "cowbackup_bitmap_new", size, granularity))

    @classmethod
    def create(cls, path: Union[str, bytes, "os.PathLike[Any]"], size: int,
               granularity: int = DEFAULT_GRANULARITY, mode: int = DEFAULT_FILE_MODE) -> "Bitmap":
        """Create a persistent, crash-safe bitmap in a new file at ``path`` and open it
        (geometry as :meth:`new`). The file has the permission bits ``mode`` (default 0o600,
        owner only), applied exactly whatever the umask. An existing ``path``, or a symlink
        there (even dangling), is never touched nor followed: it raises ``FileExistsError``
        (a :class:`CowbackupError`, errno EEXIST). A missing directory raises
        ``FileNotFoundError``; other errnos of creating the file as they come; a ``mode``
        outside 0o777 :class:`InvalidArgument`.
        """
        raw = _path_arg(path)
        size = _u64(size, "size")
        granularity = _u64(granularity, "granularity")
        if not isinstance(mode, int) or isinstance(mode, bool):
            raise TypeError("mode must be an int")
        if not 0 <= mode <= 0o777:
            raise InvalidArgument(_errno.EINVAL, f"mode {mode:#o} is invalid: only the permission bits 0o777 may be set")
        ptr = _out_handle(_bitmap_create_mode, "cowbackup_bitmap_create_mode", raw, size, granularity, mode)
        return cls(ptr, os.fsdecode(raw))

    @classmethod
    def open(cls, path: Union[str, bytes, "os.PathLike[Any]"]) -> "Bitmap":
        """Open the persistent bitmap in the file at ``path``: after a crash at any instant it
        holds every granule whose :meth:`mark` returned.

        Raises ``FileNotFoundError`` (no such file), :class:`Busy` (errno EBUSY: the bitmap is
        open already, in this process or another), :class:`Corrupt` (errno EBADMSG: not a
        bitmap file, truncated, or damaged; the message says where), or the errno of opening
        or reading the file (all :class:`CowbackupError`).
        """
        raw = _path_arg(path)
        return cls(_out_handle(_bitmap_open, "cowbackup_bitmap_open", raw), os.fsdecode(raw))

    @property
    def size(self) -> int:
        """Bytes of device covered."""
        return self._size

    @property
    def granularity(self) -> int:
        """Bytes per bit (granule)."""
        return self._granularity

    @property
    def path(self) -> Optional[str]:
        """The file of a persistent bitmap (as given), None for one in memory."""
        return self._path

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._h.closed

    def _simple(self, fn: Callable[..., int], what: str, *args: Any) -> None:
        ptr = self._h.acquire()
        try:
            _check(fn(ptr, *args), what)
        finally:
            self._h.release()

    def mark(self, offset: int, length: int) -> None:
        """Record that ``[offset, offset + length)`` is about to be written: call it before
        the write (and before :meth:`Job.cow_before_write`). Every granule the range touches
        becomes dirty; for a persistent bitmap they are durable when this returns. ``length``
        0 does nothing; a disabled bitmap records nothing. Works while a job uses the bitmap.

        Raises :class:`InvalidArgument` for a range past the end (nothing recorded); for a
        persistent bitmap, the errno of writing the file (the mark is not durable: fail the
        write). Releases the GIL: call it from every writing thread.
        """
        self._simple(_bitmap_mark, "cowbackup_bitmap_mark", _u64(offset, "offset"), _u64(length, "length"))

    def clear(self) -> None:
        """Remove every dirty granule (the generation is bumped when there was any).
        Persistent: atomic in the file. Raises :class:`Busy` while a job uses the bitmap
        (nothing changes)."""
        self._simple(_bitmap_clear, "cowbackup_bitmap_clear")

    def enable(self) -> None:
        """Record marks (the default). Persistent: kept in the file. :class:`Busy` while a
        job uses the bitmap."""
        self._simple(_bitmap_enable, "cowbackup_bitmap_enable")

    def disable(self) -> None:
        """Stop recording: :meth:`mark` then records nothing. :class:`Busy` while a job uses
        the bitmap."""
        self._simple(_bitmap_disable, "cowbackup_bitmap_disable")

    def merge(self, other: "Bitmap") -> None:
        """Add every dirty granule of ``other`` to this bitmap (a union): a granule of
        ``other`` dirties every granule of this one it overlaps, whatever the granularities.
        ``other`` is not changed (it may be busy, or this bitmap). The generation does not
        change; persistent: durable when this returns.

        Raises TypeError when ``other`` is not a :class:`Bitmap`; :class:`InvalidArgument`
        when the two cover different device sizes, :class:`Busy` while a job uses this
        bitmap (this bitmap unchanged in both cases).
        """
        if not isinstance(other, Bitmap):
            raise TypeError(f"other must be a cowbackup.Bitmap, not {type(other).__name__}")
        dst = self._h.acquire()
        try:
            src = other._h.acquire()
            try:
                _check(_bitmap_merge(dst, src), "cowbackup_bitmap_merge")
            finally:
                other._h.release()
        finally:
            self._h.release()

    def next_dirty(self, from_: int = 0) -> Optional[Tuple[int, int]]:
        """The next dirty extent at or after byte ``from_``: ``(offset, length)`` with
        ``offset >= from_``, consecutive dirty granules merged, clipped to the device size;
        None when nothing is dirty from there on (or ``from_`` is past the end)."""
        start = _u64(from_, "from_")
        off, n = c_uint64(), c_uint64()
        ptr = self._h.acquire()
        try:
            _check(_bitmap_next_dirty(ptr, start, ctypes.byref(off), ctypes.byref(n)),
                   "cowbackup_bitmap_next_dirty")
        finally:
            self._h.release()
        return (off.value, n.value) if n.value else None

    def extents(self) -> List[Tuple[int, int]]:
        """Every dirty extent, ``[(offset, length), ...]`` in order (see :meth:`next_dirty`).
        Marks made meanwhile by other threads may or may not be included."""
        out: List[Tuple[int, int]] = []
        pos = 0
        while True:
            ext = self.next_dirty(pos)
            if ext is None:
                return out
            out.append(ext)
            pos = ext[0] + ext[1]

    def info(self) -> BitmapInfo:
        """Size, granularity, dirty bytes, generation, uuid and state, a :class:`BitmapInfo`."""
        c = _BitmapInfoC()
        ptr = self._h.acquire()
        try:
            _check(_bitmap_query(ptr, ctypes.byref(c)), "cowbackup_bitmap_query")
        finally:
            self._h.release()
        return BitmapInfo(c.size, c.granularity, c.count, c.generation, bytes(c.uuid),
                          bool(c.flags & _BITMAP_RECORDING), bool(c.flags & _BITMAP_BUSY),
                          bool(c.flags & _BITMAP_PERSISTENT))

    @property
    def count(self) -> int:
        """Dirty bytes (``info().count``)."""
        return self.info().count

    @property
    def generation(self) -> int:
        """``info().generation``."""
        return self.info().generation

    @property
    def uuid(self) -> bytes:
        """``info().uuid``: 16 bytes."""
        return self.info().uuid

    @property
    def busy(self) -> bool:
        """True while a job uses the bitmap (``info().busy``)."""
        return self.info().busy

    def close(self) -> None:
        """Drop this handle (a job using the bitmap keeps it alive; a persistent bitmap's file
        is closed and unlocked when the last reference is gone). Every mark that returned is
        already durable. Idempotent."""
        ptr = self._h.begin_close()
        if ptr is None:
            return
        self._h.drain()
        _live_bitmaps.discard(self)
        _bitmap_free(ptr)

    def __enter__(self) -> "Bitmap":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        if _shutting_down or not hasattr(self, "_h"):
            return
        self.close()

    def __repr__(self) -> str:
        where = self._path if self._path is not None else "memory"
        if self.closed:
            return f"<cowbackup.Bitmap {where} closed>"
        if self._h.foreign:
            return f"<cowbackup.Bitmap {where} of process {self._h.pid}>"
        i = self.info()
        state = ",".join(sorted(i.flags)) or "disabled"
        return (f"<cowbackup.Bitmap {where}, {i.size} bytes / {i.granularity}, "
                f"{i.count} dirty, gen {i.generation}, {state}>")


# --- jobs ------------------------------------------------------------------------------


_TRACE_KINDS = ("state", "chunk", "zero", "hook_begin", "hook_end", "error")
_TRACE_ACTIONS = ("report", "ignore", "stop", "break-guest-write", "break-snapshot")


@dataclasses.dataclass(frozen=True)
class TraceEvent:
    """One event of a job, for ``backup_start(trace=...)``. Fields a kind does not use are 0.

    ``kind``: ``"state"`` (``from_state`` → ``to_state``), ``"chunk"`` (a run copied:
    ``offset``, ``len``, ``data`` bytes of it written as data, ``hook`` True when the hook
    copied it), ``"zero"`` (a run that read as zero), ``"hook_begin"`` / ``"hook_end"`` (a
    hook call that had to copy or wait: ``wait_ns``, ``data`` = bytes it copied, ``error``),
    ``"error"`` (a failed copy: ``error``, ``action`` taken). ``error`` is a negative errno or
    0; ``message`` the event as one line of text.
    """

    kind: str
    job: int
    offset: int
    len: int
    data: int
    wait_ns: int
    error: int
    from_state: int
    to_state: int
    action: str
    hook: bool
    message: str


_traces: Dict[int, Callable[[TraceEvent], Any]] = {}


def _thunk_trace(key: Optional[int], ev: Any) -> None:
    fn = _traces.get(key or 0)
    if fn is None:
        return
    try:
        e = ev[0]
        kind = _TRACE_KINDS[e.kind] if e.kind < len(_TRACE_KINDS) else str(e.kind)
        action = _TRACE_ACTIONS[e.action] if kind == "error" and e.action < len(_TRACE_ACTIONS) else ""
        fn(TraceEvent(kind, e.job, e.offset, e.len, e.data, e.wait_ns, e.error, e.from_state, e.to_state,
                      action, bool(e.hook), (e.message or b"").decode("utf-8", "replace")))
    except BaseException as exc:  # never let anything unwind into C
        if not _interrupted(exc, "trace callback", key):
            log.error("cowbackup: trace callback raised %r", exc, exc_info=(type(exc), exc, exc.__traceback__))


_c_trace = _TRACE_FN(_thunk_trace)


@dataclasses.dataclass(frozen=True)
class JobInfo:
    """State and progress of a job (:meth:`Job.info`).

    ``error`` is the negative errno of the failure, or of the error that paused the job
    (0 otherwise); ``len`` the bytes to process (the device size); ``offset`` the bytes
    done (``bytes_copied + bytes_zero + bytes_skipped + bytes_failed``).
    """

    state: JobState
    error: int
    len: int
    offset: int
    bytes_copied: int
    bytes_zero: int
    bytes_skipped: int
    bytes_failed: int
    cow_requests: int
    cow_bytes: int
    speed: int

    @property
    def progress(self) -> float:
        """Fraction of the work done, 0.0 to 1.0."""
        return min(1.0, self.offset / self.len) if self.len else 1.0

    @property
    def ended(self) -> bool:
        """True when the job is COMPLETED, FAILED or CANCELLED."""
        return self.state >= JobState.COMPLETED


class _Completion:
    """What the completion thunk needs: the user's callback and the event ``wait`` uses."""

    __slots__ = ("on_complete", "event", "ret", "job_id")

    def __init__(self, on_complete: Optional[Callable[[int], Any]], job_id: int) -> None:
        self.on_complete = on_complete
        self.event = threading.Event()
        self.ret: Optional[int] = None
        self.job_id = job_id


_completions: Dict[int, _Completion] = {}


def _thunk_completion(key: Optional[int], ret: int) -> None:
    comp = _completions.pop(key or 0, None)
    if comp is None:
        return
    active = getattr(_tls, "in_completion", None)
    if active is None:
        active = _tls.in_completion = set()
    active.add(comp.job_id)
    try:
        comp.ret = ret
        if comp.on_complete is not None:
            try:
                comp.on_complete(ret)
            except BaseException as e:
                if not _interrupted(e, f"on_complete({ret})", key):
                    log.error("cowbackup: on_complete(%d) raised %r", ret, e,
                              exc_info=(type(e), e, e.__traceback__))
    finally:
        active.discard(comp.job_id)
        comp.event.set()  # after on_complete: Job.wait returns once it has run


_c_completion = _COMPLETION_FN(_thunk_completion)


class Job:
    """A running backup job (:func:`backup_start`).

    A context manager: leaving the ``with`` block cancels the job if it is still running,
    waits for its threads and frees it. Every method may be called from any thread,
    concurrently (the hook from every writing thread); blocking calls release the GIL.
    Use after :meth:`close` raises ``ValueError``.
    """

    __slots__ = ("_h", "_completion", "_id", "_keys", "__weakref__")

    def __init__(self, _ptr: int, _completion: _Completion, _keys: Tuple[int, ...] = ()) -> None:
        """Internal: use :func:`backup_start`."""
        self._id = _completion.job_id
        self._h = _Handle(_ptr, f"cowbackup.Job {self._id}")
        self._completion = _completion
        # Where interrupts of its Python code on library threads are kept: the job's own key
        # (trace, on_complete) and its Python drivers' keys.
        self._keys = (self._id,) + _keys
        _live_jobs.add(self)

    def _enter(self, what: str, blocking: bool = False) -> int:
        if blocking and getattr(_tls, "in_callback", False):
            raise RuntimeError(f"Job.{what} must not be called from a Python driver method")
        return self._h.acquire()

    def cow_before_write(self, offset: int, length: int) -> None:
        """The copy-before-write hook: call it before writing ``[offset, offset+length)``.

        Write to the source only after it returned. It returns once the old contents of
        every cluster the range touches are in the target (copying them on this thread, or
        waiting for the thread copying them); for clusters already copied it costs a few
        atomic loads. Any range is accepted; ``length`` 0 is a no-op. It keeps working while
        the job is paused and is a no-op after the job ended. The GIL is released while it
        runs: call it from every writing thread.

        Raises :class:`CowbackupError`: errno EINVAL (also a ValueError) for a range past
        the end; with ``on_cbw_error="break-guest-write"`` the copy's errno (EIO, ENOSPC,
        ETIMEDOUT): fail the write, the snapshot stays valid and a later call retries.
        """
        offset = _u64(offset, "offset")
        length = _u64(length, "length")
        ptr = self._enter("cow_before_write", blocking=True)
        try:
            _check(_cow_before_write(ptr, offset, length), "cowbackup_cow_before_write")
        finally:
            self._h.release()

    def _simple(self, fn: Callable[..., int], what: str, *args: Any) -> None:
        ptr = self._enter(what)
        try:
            _check(fn(ptr, *args), what)
        finally:
            self._h.release()

    def pause(self) -> None:
        """Pause the background copy (the hook keeps working). Idempotent.

        Raises :class:`CowbackupError` (errno EBUSY) when the job has ended.
        """
        self._simple(_job_pause, "cowbackup_job_pause")

    def resume(self) -> None:
        """Resume a paused job (paused by :meth:`pause` or by an error under a "stop" or
        "enospc" policy, which is then retried). Idempotent. EBUSY when the job has ended.
        """
        self._simple(_job_resume, "cowbackup_job_resume")

    def cancel(self) -> None:
        """Cancel the job: the hook becomes a no-op, the job ends CANCELLED. Returns at once.

        No effect on a job that has ended, nor on a member of a consistency group once
        every member has finished copying (the group is committed and completes).
        """
        self._simple(_job_cancel, "cowbackup_job_cancel")

    def set_speed(self, bytes_per_sec: int) -> None:
        """Change the background copy speed limit (bytes/s, 0 = unlimited); never slows the hook."""
        self._simple(_job_set_speed, "cowbackup_job_set_speed", _u64(bytes_per_sec, "bytes_per_sec"))

    def info(self) -> JobInfo:
        """The job's state and progress, a :class:`JobInfo` (does not block on I/O)."""
        cinfo = _JobInfoC()
        ptr = self._enter("info")
        try:
            _check(_job_query(ptr, ctypes.byref(cinfo)), "cowbackup_job_query")
        finally:
            self._h.release()
        try:
            state: JobState = JobState(cinfo.state)
        except ValueError:  # a newer library's state: keep the number
            state = cinfo.state  # type: ignore[assignment]
        return JobInfo(state, cinfo.error, cinfo.len, cinfo.offset, cinfo.bytes_copied,
                       cinfo.bytes_zero, cinfo.bytes_skipped, cinfo.bytes_failed,
                       cinfo.cow_requests, cinfo.cow_bytes, cinfo.speed)

    def snapshot(self) -> "Driver":
        """A read-only :class:`Driver` of the point-in-time image, served while the job runs
        (fleecing, pull mode): copied clusters come from the target, the others from the
        source (the hook waits for such a read, then copies). Writes fail (EROFS); after the
        job ended reads fail (ESTALE, or the job's error). The view keeps what it needs
        alive: closing the job first is safe.
        """
        ptr = self._enter("snapshot")
        try:
            view = _out_handle(_job_snapshot, "cowbackup_job_snapshot", ptr)
        finally:
            self._h.release()
        return Driver(view, "snapshot view")

    def complete(self) -> None:
        """End a ``sync="none"`` job as COMPLETED (the reader has what it needs): the
        target is flushed and the bitmap, if any, is handled as for a successful job.
        Raises :class:`InvalidArgument` for other sync modes.
        """
        self._simple(_job_complete, "cowbackup_job_complete")

    def failed_ranges(self) -> list[tuple[int, int]]:
        """The ``(offset, length)`` byte ranges given up under ``on_*_error="ignore"``:
        what the target lacks (e.g. the unreadable parts of a failing disk). Empty when
        nothing failed."""
        count = c_size_t(0)
        ptr = self._enter("failed_ranges")
        try:
            while True:
                n = count.value
                arr = (_RangeC * max(n, 1))()
                _check(_job_failed_ranges(ptr, arr, n, ctypes.byref(count)), "cowbackup_job_failed_ranges")
                if count.value <= n:  # the list only grows: got it all
                    return [(arr[i].offset, arr[i].len) for i in range(count.value)]
        finally:
            self._h.release()

    @property
    def progress(self) -> float:
        """Fraction of the work done, 0.0 to 1.0 (``info().progress``)."""
        return self.info().progress

    @property
    def state(self) -> JobState:
        """The current state (``info().state``)."""
        return self.info().state

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._h.closed

    def wait(self, timeout: Optional[float] = None) -> None:
        """Block until the job ends, at most ``timeout`` seconds (None: no limit).

        Returns None when the job completed: the target is then the exact point-in-time
        image of the source, and ``on_complete`` has run. Raises :class:`JobCancelled`
        (errno ECANCELED) when it was cancelled, the job's :class:`CowbackupError` (errno
        of the failure, the library's message) when it failed, and the built-in
        ``TimeoutError`` (not a CowbackupError, no errno) when ``timeout`` expired first.
        A KeyboardInterrupt or SystemExit raised on a library thread by a Python driver of
        the job, its ``trace`` or ``on_complete`` is raised here (once) when the job has ended.
        May be called several times and from several threads. Releases the GIL while it
        waits; interruptible by KeyboardInterrupt.
        """
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
                raise TypeError("timeout must be a number of seconds or None")
            if math.isnan(timeout) or timeout < 0:
                raise ValueError("timeout must be >= 0")
        ptr = self._enter("wait", blocking=True)
        try:
            in_own_completion = self._id in getattr(_tls, "in_completion", ())
            if not in_own_completion and not self._completion.event.wait(timeout):
                raise TimeoutError(f"cowbackup job {self._id} still running after {timeout} s")
            ret = _job_wait(ptr)  # returns at once now, with the result and its message
            err = _error(ret, "cowbackup_job_wait") if ret != 0 else None
            interrupt = _take_pending(self._keys)
            if interrupt is not None:
                raise interrupt  # from a Python driver, trace or on_complete on a library thread
            if err is not None:
                raise err
        finally:
            self._h.release()

    def close(self) -> None:
        """Cancel the job if it is still running, wait for its threads, free it. Idempotent.

        Calls in flight on other threads finish first (a ``wait`` returns, cancelled).
        Must not be called from the job's ``on_complete`` or from a Python driver method.
        """
        if self._id in getattr(_tls, "in_completion", ()):
            raise RuntimeError("a job must not be closed from its own on_complete callback")
        if getattr(_tls, "in_callback", False):
            raise RuntimeError("Job.close must not be called from a Python driver method")
        ptr = self._h.begin_close()
        if ptr is None:
            return
        _job_cancel(ptr)  # no effect when ended; makes waits in flight return
        self._h.drain()
        _live_jobs.discard(self)
        try:
            _job_free(ptr)  # joins the job's threads; on_complete has run when it returns
        finally:
            _traces.pop(self._id, None)  # no thread of the job is left to emit an event
            with _pending_lock:
                _pending.pop(self._id, None)

    def __enter__(self) -> "Job":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        if _shutting_down or not hasattr(self, "_h") or self._h.closed:
            return
        if getattr(_tls, "in_callback", False) or getattr(_tls, "in_completion", None):
            # Collected on a library thread: freeing here could join this very thread.
            threading.Thread(target=self.close, name="cowbackup-job-free", daemon=True).start()
            return
        self.close()

    def __repr__(self) -> str:
        if self.closed:
            return f"<cowbackup.Job {self._id} closed>"
        i = self.info()
        return f"<cowbackup.Job {self._id} {i.state.name if isinstance(i.state, JobState) else i.state} {i.progress:.0%}>"


_live_pools: "weakref.WeakSet[WorkerPool]" = weakref.WeakSet()


class WorkerPool:
    """Background copy threads shared by many jobs: one pool per program (or per storage
    tier) instead of ``workers`` threads of each job's own, for programs that run many jobs at
    once (1 000 jobs with their own workers hold 3 000 threads and 2 GiB of copy buffers;
    sharing a pool of 2 threads they hold the pool's 2 threads and a sleeping job thread each).

    ::

        with cowbackup.WorkerPool(2) as pool:
            jobs = [cowbackup.backup_start(s, t, pool=pool, speed=16 << 20) for s, t in disks]

    ``threads``: 1 to 256, named ``cowbackup-p<P>-<n>``; ``priority``: their CPU and I/O
    priority, ``"normal"`` (default), ``"low"`` or ``"idle"`` (as ``worker_priority`` of
    :func:`backup_start`). Each thread goes round the jobs and copies one chunk of the first
    that can go: jobs of ``worker_priority`` ``"normal"`` before ``"low"`` before ``"idle"``,
    jobs of one priority in turn; a paused or speed-limited job is passed over. The jobs'
    Python drivers are called from these threads for background copies. A request that hangs
    holds its thread; the other jobs share the rest.

    A reference-counted handle: each job started with the pool holds its own reference, so the
    pool may be closed while jobs use it (its threads end once the last of them is closed).
    A context manager. Raises TypeError/ValueError for bad arguments,
    :class:`InvalidArgument` for a thread count out of range.
    """

    __slots__ = ("_h", "_threads", "__weakref__")

    def __init__(self, threads: int = 2, priority: str = "normal") -> None:
        n = _u64(threads, "threads")
        if n > 0xFFFFFFFF:
            raise ValueError(f"threads out of range (got {n})")
        prio = _choice(priority, _WORKER_PRIORITY, "priority")
        self._h = _Handle(_out_handle(_pool_new, "cowbackup_pool_new", n, prio), "cowbackup.WorkerPool")
        self._threads = n
        _live_pools.add(self)

    @property
    def threads(self) -> int:
        """The number of threads."""
        return self._threads

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._h.closed

    def close(self) -> None:
        """Drop this handle (jobs started with the pool keep it running until they are
        closed). Idempotent."""
        ptr = self._h.begin_close()
        if ptr is None:
            return
        self._h.drain()
        _live_pools.discard(self)
        _pool_free(ptr)

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"WorkerPool(threads={self._threads}{', closed' if self.closed else ''})"


@dataclasses.dataclass(frozen=True)
class _Spec:
    """The options of one job, checked in Python: nothing allocated yet."""

    cluster_size: Optional[int]
    sync: int
    speed: int
    workers: Optional[int]
    max_chunk: Optional[int]
    on_source_error: int
    on_target_error: int
    on_cbw_error: int
    cbw_timeout_ms: int
    target_is_zero: bool
    bitmap: Optional[Bitmap]
    bitmap_mode: int
    on_complete: Optional[Callable[[int], Any]]
    trace: Optional[Callable[[TraceEvent], Any]]
    discard_source: bool = False
    worker_priority: Optional[int] = None
    cow_buffer: int = 0
    manifest: Optional[bytes] = None
    disk_id: Optional[bytes] = None
    pool: Optional["WorkerPool"] = None


def _job_spec(
    *,
    cluster_size: Optional[int] = None,
    sync: str = "full",
    speed: int = 0,
    workers: Optional[int] = None,
    max_chunk: Optional[int] = None,
    on_source_error: str = "report",
    on_target_error: str = "report",
    on_cbw_error: str = "break-guest-write",
    cbw_timeout: Optional[float] = None,
    target_is_zero: bool = False,
    bitmap: Optional[Bitmap] = None,
    bitmap_mode: str = "on-success",
    on_complete: Optional[Callable[[int], Any]] = None,
    trace: Optional[Callable[[TraceEvent], Any]] = None,
    discard_source: bool = False,
    worker_priority: Optional[str] = None,
    cow_buffer: int = 0,
    manifest: Any = None,
    disk_id: Optional[str] = None,
    pool: Optional["WorkerPool"] = None,
) -> _Spec:
    """Check the options of :func:`backup_start` (TypeError/ValueError); the library checks
    the rest (ranges of values, combinations) when the job starts."""
    sync_v = _choice(sync, _SYNC, "sync")
    src_act = _choice(on_source_error, _ERROR_ACTION, "on_source_error")
    tgt_act = _choice(on_target_error, _ERROR_ACTION, "on_target_error")
    cbw_act = _choice(on_cbw_error, _CBW_ACTION, "on_cbw_error")
    mode_v = _choice(bitmap_mode, _BITMAP_MODE, "bitmap_mode")
    speed_v = _u64(speed, "speed")
    cs = None if cluster_size is None else _u64(cluster_size, "cluster_size")
    mc = None if max_chunk is None else _u64(max_chunk, "max_chunk")
    wk = None
    if workers is not None:
        wk = _u64(workers, "workers")
        if wk > 0xFFFFFFFF:
            raise ValueError(f"workers out of range (got {wk})")
    timeout_ms = 0
    if cbw_timeout is not None:
        if isinstance(cbw_timeout, bool) or not isinstance(cbw_timeout, (int, float)):
            raise TypeError("cbw_timeout must be a number of seconds or None")
        if not (cbw_timeout > 0) or math.isinf(cbw_timeout):
            raise ValueError(f"cbw_timeout must be a positive, finite number of seconds (got {cbw_timeout})")
        timeout_ms = max(1, math.ceil(cbw_timeout * 1000))
        if timeout_ms > U64_MAX:
            raise ValueError("cbw_timeout too large")
    if not isinstance(target_is_zero, bool):
        raise TypeError("target_is_zero must be a bool")
    if bitmap is not None and not isinstance(bitmap, Bitmap):
        raise TypeError(f"bitmap must be a cowbackup.Bitmap or None, not {type(bitmap).__name__}")
    if on_complete is not None and not callable(on_complete):
        raise TypeError("on_complete must be callable or None")
    if trace is not None and not callable(trace):
        raise TypeError("trace must be callable or None")
    if not isinstance(discard_source, bool):
        raise TypeError("discard_source must be a bool")
    prio = None if worker_priority is None else _choice(worker_priority, _WORKER_PRIORITY, "worker_priority")
    cow_buf = _u64(cow_buffer, "cow_buffer")
    man = None if manifest is None else _path_arg(manifest)
    if disk_id is not None and not isinstance(disk_id, str):
        raise TypeError("disk_id must be a str or None")
    did = None if disk_id is None else disk_id.encode()
    if pool is not None and not isinstance(pool, WorkerPool):
        raise TypeError(f"pool must be a cowbackup.WorkerPool or None, not {type(pool).__name__}")
    return _Spec(cs, sync_v, speed_v, wk, mc, src_act, tgt_act, cbw_act, timeout_ms, target_is_zero,
                 bitmap, mode_v, on_complete, trace, discard_source, prio, cow_buf, man, did, pool)


class _Options:
    """A library options object built from a :class:`_Spec`, with the job's completion and
    trace registration (made only when the job starts). ``free`` it in any case."""

    __slots__ = ("ptr", "key", "comp", "trace")

    def __init__(self, spec: _Spec) -> None:
        self.ptr = _options_new()
        if not self.ptr:
            raise CowbackupError(_errno.ENOMEM, _last_error() or "cowbackup_options_new failed")
        self.key = _new_key()
        self.comp = _Completion(spec.on_complete, self.key)
        self.trace = spec.trace
        try:
            self._set(spec)
        except BaseException:
            self.free()
            raise

    def _set(self, spec: _Spec) -> None:
        opts = self.ptr
        if spec.cluster_size is not None:
            _check(_opt_cluster_size(opts, spec.cluster_size), "cowbackup_options_set_cluster_size")
        _check(_opt_sync(opts, spec.sync), "cowbackup_options_set_sync")
        _check(_opt_speed(opts, spec.speed), "cowbackup_options_set_speed")
        if spec.workers is not None:
            _check(_opt_workers(opts, spec.workers), "cowbackup_options_set_workers")
        if spec.worker_priority is not None:
            _check(_opt_worker_priority(opts, spec.worker_priority), "cowbackup_options_set_worker_priority")
        if spec.max_chunk is not None:
            _check(_opt_max_chunk(opts, spec.max_chunk), "cowbackup_options_set_max_chunk")
        _check(_opt_on_source_error(opts, spec.on_source_error), "cowbackup_options_set_on_source_error")
        _check(_opt_on_target_error(opts, spec.on_target_error), "cowbackup_options_set_on_target_error")
        _check(_opt_on_cbw_error(opts, spec.on_cbw_error), "cowbackup_options_set_on_cbw_error")
        if spec.cbw_timeout_ms:
            _check(_opt_cbw_timeout(opts, spec.cbw_timeout_ms), "cowbackup_options_set_cbw_timeout")
        _check(_opt_target_is_zero(opts, 1 if spec.target_is_zero else 0),
               "cowbackup_options_set_target_is_zero")
        if spec.bitmap is not None:
            # The options take their own reference to the bitmap: the handle is needed only now.
            bm = spec.bitmap._h.acquire()
            try:
                _check(_opt_bitmap(opts, bm, spec.bitmap_mode), "cowbackup_options_set_bitmap")
            finally:
                spec.bitmap._h.release()
        if spec.discard_source:
            _check(_opt_discard_source(opts, 1), "cowbackup_options_set_discard_source")
        if spec.cow_buffer:
            _check(_opt_cow_buffer(opts, spec.cow_buffer), "cowbackup_options_set_cow_buffer")
        if spec.manifest is not None:
            _check(_opt_manifest(opts, spec.manifest), "cowbackup_options_set_manifest")
        if spec.disk_id is not None:
            _check(_opt_disk_id(opts, spec.disk_id), "cowbackup_options_set_disk_id")
        if spec.pool is not None:
            # The options take their own reference to the pool: the handle is needed only now.
            pp = spec.pool._h.acquire()
            try:
                _check(_opt_pool(opts, pp), "cowbackup_options_set_pool")
            finally:
                spec.pool._h.release()
        _check(_opt_completion(opts, _c_completion, self.key), "cowbackup_options_set_completion")
        if spec.trace is not None:
            _check(_opt_trace(opts, _c_trace, self.key), "cowbackup_options_set_trace")

    def register(self) -> None:
        """Right before the start call: the callbacks may run as soon as the job exists."""
        _completions[self.key] = self.comp
        if self.trace is not None:
            _traces[self.key] = self.trace

    def unregister(self) -> None:
        """The job did not start: the library never calls its callbacks."""
        _completions.pop(self.key, None)
        _traces.pop(self.key, None)

    def free(self) -> None:
        if self.ptr:
            _options_free(self.ptr)  # drops its bitmap reference; a started job has its own
            self.ptr = None


def _start(entries: List[Tuple[Driver, Driver, _Spec]], group: bool) -> List[Job]:
    """Start the jobs of ``entries``: one (``cowbackup_backup_start``) or a group
    (``cowbackup_backup_start_group``). All or none."""
    built: List[_Options] = []
    held: List[Driver] = []
    try:
        for _, _, spec in entries:
            built.append(_Options(spec))
        ptrs = []
        for source, target, _ in entries:
            src = source._ptr()
            held.append(source)
            tgt = target._ptr()
            held.append(target)
            ptrs.append((src, tgt))
        for b in built:
            b.register()
        depth = _enter_call()
        try:
            n = len(entries)
            outs = (c_void_p * max(n, 1))()
            if group:
                srcs = (c_void_p * max(n, 1))(*(p[0] for p in ptrs))
                tgts = (c_void_p * max(n, 1))(*(p[1] for p in ptrs))
                opts = (c_void_p * max(n, 1))(*(b.ptr for b in built))
                ret = _backup_start_group(n, srcs, tgts, opts, outs)
                what = "cowbackup_backup_start_group"
            else:
                ret = _backup_start(ptrs[0][0], ptrs[0][1], built[0].ptr, outs)
                what = "cowbackup_backup_start"
            if ret != 0:
                err = _error(ret, what)  # reads this thread's last error: first
                for b in built:
                    b.unregister()
                raise err
            jobs = []
            for i, (source, target, _) in enumerate(entries):
                keys = tuple(k for k in (source._key, target._key) if k is not None)
                jobs.append(Job(outs[i], built[i].comp, keys))
        finally:
            _leave_call(depth)  # a Ctrl-C in a Python driver or trace: raised here
    finally:
        for d in held:
            d._h.release()
        for b in built:
            b.free()
    return jobs


def backup_start(
    source: Driver,
    target: Driver,
    *,
    cluster_size: Optional[int] = None,
    sync: str = "full",
    speed: int = 0,
    workers: Optional[int] = None,
    max_chunk: Optional[int] = None,
    on_source_error: str = "report",
    on_target_error: str = "report",
    on_cbw_error: str = "break-guest-write",
    cbw_timeout: Optional[float] = None,
    target_is_zero: bool = False,
    bitmap: Optional[Bitmap] = None,
    bitmap_mode: str = "on-success",
    on_complete: Optional[Callable[[int], Any]] = None,
    trace: Optional[Callable[[TraceEvent], Any]] = None,
    discard_source: bool = False,
    worker_priority: Optional[str] = None,
    cow_buffer: int = 0,
    manifest: Any = None,
    disk_id: Optional[str] = None,
    pool: Optional["WorkerPool"] = None,
) -> Job:
    """Start a point-in-time backup of ``source`` into ``target`` (same size).

    When the job completes, ``target`` holds ``source`` exactly as it was when this returned,
    provided every write to the source is preceded by :meth:`Job.cow_before_write`.

    Options (None: the library's default):

    - ``cluster_size``: power of two, 4096 to 64 MiB (default 65536): the copy granularity.
    - ``sync``: ``"full"`` (every cluster), ``"top"`` (only clusters the source reports
      allocated), ``"none"`` (no background copy: the job serves the hook until cancelled),
      ``"bitmap"`` (an incremental backup: only the clusters overlapping granules dirty in
      ``bitmap``; the others are counted in ``bytes_skipped`` and not written).
    - ``bitmap``: a :class:`Bitmap` of the source (same size). Required by
      ``sync="bitmap"``; with ``"full"`` or ``"top"`` it starts a new chain (after success
      the bitmap holds only the writes made during the job); with ``"none"`` it makes a
      pull-mode job. The bitmap is frozen (busy) from now until the job ends: marks go on,
      ``clear``/``merge``/``enable``/``disable`` raise :class:`Busy`, a second job on it
      raises :class:`Busy`.
    - ``bitmap_mode``: what the bitmap holds when the job ends (QEMU's rule):
      ``"on-success"`` (default: after success, only the writes made during the job; after
      a failure or cancel, everything it had plus those writes), ``"always"`` (as
      on-success after success; after a failure or cancel, the writes made during the job
      plus what the job did not copy), ``"never"`` (nothing is removed; not with "full" or
      "top"). Ignored without ``bitmap``.
    - ``speed``: background copy limit in bytes/s, 0 = unlimited (the hook is never slowed).
    - ``workers``: background copy threads, 1 to 64 (default 2).
    - ``worker_priority``: CPU and I/O priority of those threads: ``"normal"`` (default: as
      the starting thread), ``"low"`` (``SCHED_BATCH`` at nice 19, best-effort I/O priority
      7; host threads get a CPU first, the backup still moves on a busy machine) or
      ``"idle"`` (``SCHED_IDLE``, idle I/O class: only CPU time nothing else wants; can
      stall on a busy machine). The hook runs on the caller's thread and is never lowered.
    - ``max_chunk``: largest background request in bytes (default 1 MiB).
    - ``cow_buffer``: memory in bytes in which :meth:`Job.cow_before_write` may keep old
      data instead of writing it to the target itself (default 0: none). With room left the
      hook only reads the old data and returns, so the host's write never waits for the
      target; a worker writes it soon after (its failures follow ``on_target_error``, and
      the job completes only when all of it is in the target). Old data that does not fit
      is copied by the hook as usual. With the default ``worker_priority`` the job also
      runs a second set of workers (one fewer than the CPUs, at most ``workers``) at
      ``SCHED_IDLE`` that copy while the host writes uncopied clusters (the first set
      rests meanwhile), so host threads always find a CPU (when every CPU is busy with
      other work and the second set gets no time, the first set copies on). Not with
      ``sync="none"``. Suggested: 16 MiB, for low host write latency during a backup
      (PERFORMANCE.md).
    - ``manifest``: a path; when the job completes (only then) a manifest of the backup is
      written there atomically, mode 0600: the copy set, a BLAKE3 digest per copied cluster
      of the point-in-time data, ``disk_id``, the bitmap's uuid and generations, the
      parent's root digest, times and counts (docs/manifest.md). The start fails with
      ``FileExistsError`` when the path exists. See :func:`verify` and :func:`chain_open`.
    - ``disk_id``: the host's identity of the source disk (1 to 128 bytes). A bitmap without
      one adopts it (durably, persistent bitmaps); a bitmap of another disk id fails the
      start with :class:`InvalidArgument`.
    - ``pool``: a :class:`WorkerPool` whose threads copy in the background for this job,
      shared with the other jobs started with it, instead of threads of the job's own (for
      programs running many jobs at once). Then ``workers`` is the most pool threads that copy
      for this job at once, ``worker_priority`` orders the jobs inside the pool
      (``"normal"`` before ``"low"`` before ``"idle"``; the threads run at the pool's
      priority), ``speed`` and the error policies hold as without a pool, and ``cow_buffer``
      has no second set of workers. The job holds its own reference to the pool.
    - ``on_source_error`` / ``on_target_error``: ``"report"`` (the job fails), ``"ignore"``
      (skip the clusters, copy the rest, end FAILED with ``bytes_failed``), ``"stop"``
      (pause with ``info().error``; :meth:`Job.resume` retries), ``"enospc"`` (stop on
      ENOSPC, report otherwise).
    - ``on_cbw_error``: ``"break-guest-write"`` (the hook raises, fail the write) or
      ``"break-snapshot"`` (the hook returns, the job fails).
    - ``cbw_timeout``: longest time a hook call may take to get its clusters' old data into
      the target (copying or waiting), in seconds (rounded up to whole milliseconds); past it
      the hook fails with ETIMEDOUT while the copy goes on in the background.
    - ``target_is_zero``: the target is known to read zeroes (only when true!).
    - ``discard_source``: after each background chunk is copied, discard it on the source
      (for a source that is a snapshot view, :meth:`Job.snapshot`: a push from a fleecing
      view that leaves the scratch image empty).
    - ``on_complete(ret)``: called once when the job ends, on a library thread, with 0,
      ``-errno.ECANCELED`` or the job's negative errno; exceptions are logged
      (KeyboardInterrupt/SystemExit are raised by :meth:`Job.wait`). It must not close the
      job; :meth:`Job.wait` returns only after it ran.
    - ``trace(event)``: called with a :class:`TraceEvent` for every event of the job (state
      changes, chunks, zero runs, hook calls that copy or wait, errors and the action
      taken), on the thread that caused it, possibly concurrently; exceptions are logged
      (KeyboardInterrupt/SystemExit: raised when the library call of this thread returns, or
      by :meth:`Job.wait`). Keep it quick: it runs inside the copy path.

    The job holds its own references to the drivers and the bitmap: they may be closed
    afterwards. Raises TypeError/ValueError for bad arguments, :class:`CowbackupError` when
    the library refuses: :class:`InvalidArgument` (also a ValueError: sizes differ, same
    device, bad option values, ``sync="bitmap"`` without a bitmap, a bitmap of another size,
    ``"never"`` with "full"/"top"), :class:`Busy` (the bitmap is used by another job).
    Nothing is started, and the bitmap is unchanged, when it raises.
    """
    if not isinstance(source, Driver) or not isinstance(target, Driver):
        raise TypeError("source and target must be cowbackup.Driver objects")
    spec = _job_spec(cluster_size=cluster_size, sync=sync, speed=speed, workers=workers,
                     max_chunk=max_chunk, on_source_error=on_source_error,
                     on_target_error=on_target_error, on_cbw_error=on_cbw_error,
                     cbw_timeout=cbw_timeout, target_is_zero=target_is_zero, bitmap=bitmap,
                     bitmap_mode=bitmap_mode, on_complete=on_complete, trace=trace,
                     discard_source=discard_source, worker_priority=worker_priority,
                     cow_buffer=cow_buffer, manifest=manifest, disk_id=disk_id, pool=pool)
    return _start([(source, target, spec)], group=False)[0]


class VerifyReport:
    """What :func:`verify` checked: ``clusters_checked``, ``bytes_checked``,
    ``mismatched_clusters`` and ``mismatches``, the bad byte ranges ``(offset, length)``."""

    __slots__ = ("clusters_checked", "bytes_checked", "mismatched_clusters", "mismatches")

    def __init__(self, c: Any, mismatches: List[Tuple[int, int]]) -> None:
        self.clusters_checked = int(c.clusters_checked)
        self.bytes_checked = int(c.bytes_checked)
        self.mismatched_clusters = int(c.mismatched_clusters)
        self.mismatches = mismatches

    def __repr__(self) -> str:
        return (f"VerifyReport(clusters_checked={self.clusters_checked}, bytes_checked={self.bytes_checked}, "
                f"mismatched_clusters={self.mismatched_clusters}, mismatches={self.mismatches})")


class _VerifyReportC(Structure):
    _fields_ = [("clusters_checked", c_uint64), ("bytes_checked", c_uint64), ("mismatched_clusters", c_uint64)]


_MISMATCH_FN = ctypes.CFUNCTYPE(c_int, c_void_p, c_uint64, c_uint64)
_verify = _declare("cowbackup_verify", c_int,
                   [ctypes.c_char_p, _P, _MISMATCH_FN, c_void_p, ctypes.POINTER(_VerifyReportC), ctypes.c_size_t])
_chain_open = _declare("cowbackup_chain_open", c_int,
                       [ctypes.POINTER(ctypes.c_char_p), ctypes.c_size_t, ctypes.c_uint32, ctypes.POINTER(c_void_p)])
_chain_open_drivers = _declare("cowbackup_chain_open_drivers", c_int,
                               [ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(c_void_p), ctypes.c_size_t,
                                ctypes.c_uint32, ctypes.POINTER(c_void_p)])
CHAIN_VERIFY = 1
_consolidate = _declare("cowbackup_chain_consolidate", c_int,
                        [ctypes.POINTER(ctypes.c_char_p), ctypes.c_size_t, ctypes.c_char_p, ctypes.c_char_p])


def verify(manifest: Any, target: Driver, raise_on_mismatch: bool = True) -> VerifyReport:
    """Re-read the backup in ``target`` and check every cluster of the copy set of the
    manifest at ``manifest`` (data against its digest, zero clusters for zeroes). Needs no
    source. Returns the :class:`VerifyReport`; when a cluster does not match it raises
    :class:`Corrupt` (errno EBADMSG) whose ``report`` attribute is the report, unless
    ``raise_on_mismatch`` is false. A damaged manifest raises :class:`Corrupt` too (without
    a report); a target of another size :class:`InvalidArgument`."""
    if not isinstance(target, Driver):
        raise TypeError("target must be a cowbackup.Driver")
    raw = _path_arg(manifest)
    bad: List[Tuple[int, int]] = []

    def on_mismatch(_opaque: Any, offset: int, length: int) -> int:
        bad.append((int(offset), int(length)))
        return 0

    cb = _MISMATCH_FN(on_mismatch)
    out = _VerifyReportC()
    ptr = target._h.acquire()
    try:
        ret = _verify(raw, ptr, cb, None, ctypes.byref(out), ctypes.sizeof(out))
    finally:
        target._h.release()
    if ret == 0 or (ret == -_errno.EBADMSG and (bad or out.mismatched_clusters)):
        report = VerifyReport(out, bad)
        if ret != 0 and raise_on_mismatch:
            err = _error(ret, "cowbackup_verify")
            err.report = report  # type: ignore[attr-defined]
            raise err
        return report
    raise _error(ret, "cowbackup_verify")


def chain_open(manifests: Any, verify: bool = False, targets: Any = None) -> Driver:
    """Open the backup chain of ``manifests`` (paths, oldest first: the full backup, then
    its incrementals) as a read-only :class:`Driver` of the newest point in time. Restore:
    :func:`backup_start` with it as the source; instant access: export it with the NBD
    server. ``verify`` checks each data cluster read against its digest (a bad one fails
    the read with :class:`Corrupt`). Raises :class:`InvalidArgument` naming the link of a
    broken chain, :class:`Corrupt` for a damaged manifest, ``FileNotFoundError`` ...

    Each backup's target is found from its manifest (a file relative to it, or an RBD image
    ``rbd:POOL/IMAGE`` opened read-only with librados's default conf search, ``$CEPH_CONF``
    first, and the spec's ``:id=``; :class:`CowbackupError` ENOTSUP for one when the library
    was built without librbd), unless ``targets`` is given: a
    list of :class:`Driver` objects, one per manifest in the same order, each holding its
    backup (``cowbackup_chain_open_drivers``) -- for backups in RBD images
    (:meth:`Driver.rbd_open`, read-only is enough), NBD exports, devices, or files moved
    away from their manifests. The chain keeps its own references to them: closing a
    target's :class:`Driver` afterwards does not close the chain's. Raises
    :class:`InvalidArgument` when the number of targets is not the number of manifests or
    a target's size is not its manifest's, ``TypeError`` for a target that is not a
    :class:`Driver`."""
    paths = [_path_arg(m) for m in manifests]
    arr = (ctypes.c_char_p * len(paths))(*paths)
    flags = CHAIN_VERIFY if verify else 0
    if targets is None:
        return Driver(_out_handle(_chain_open, "cowbackup_chain_open", arr, len(paths), flags), "chain")
    if isinstance(targets, (str, bytes, Driver)) or not hasattr(targets, "__iter__"):
        raise TypeError("targets must be a list of cowbackup.Driver objects, one per manifest")
    drivers = list(targets)
    for i, t in enumerate(drivers):
        if not isinstance(t, Driver):
            raise TypeError(f"targets[{i}] must be a cowbackup.Driver, not {type(t).__name__}")
    if len(drivers) != len(paths):
        raise InvalidArgument(_errno.EINVAL, f"chain_open: {len(paths)} manifests need as many targets, "
                                             f"{len(drivers)} given")
    acquired: List[Driver] = []
    try:
        ptrs = []
        for t in drivers:
            ptrs.append(t._h.acquire())
            acquired.append(t)
        targs = (c_void_p * len(ptrs))(*ptrs)
        handle = _out_handle(_chain_open_drivers, "cowbackup_chain_open_drivers", arr, targs, len(paths), flags)
    finally:
        for t in acquired:
            t._h.release()
    return Driver(handle, "chain")


def consolidate(manifests: Any, target: Any, manifest: Any) -> None:
    """Merge the backups of ``manifests`` (a contiguous part of a chain, oldest first) into
    one new backup: the image ``target`` and its manifest ``manifest`` (neither may exist:
    ``FileExistsError``). Clusters are read with digest checks (:class:`Corrupt` on damage).
    Crash-safe: image then manifest, each published whole by rename; the old backups are
    not changed. In a chain the new manifest stands in place of the merged ones."""
    paths = [_path_arg(m) for m in manifests]
    arr = (ctypes.c_char_p * len(paths))(*paths)
    _check(_consolidate(arr, len(paths), _path_arg(target), _path_arg(manifest)), "cowbackup_chain_consolidate")


def backup_start_group(jobs: Any, **defaults: Any) -> List[Job]:
    """Start several backups at **one point in time**, with one outcome (a consistency group).

    ``jobs`` is a list of ``(source, target)`` or ``(source, target, options)`` entries, where
    ``options`` is a dict of :func:`backup_start`'s keyword arguments (or None). Keyword
    arguments of this call are defaults for every entry (an entry's own options win)::

        jobs = cowbackup.backup_start_group(
            [(disk0, backup0, {"bitmap": bm0}), (disk1, backup1, {"bitmap": bm1})],
            sync="bitmap")

    Every job is set up (bitmaps frozen) before any starts copying. No job reaches COMPLETED
    before all have finished copying; when one fails or is cancelled, the others are
    cancelled, and every bitmap goes back as for a failure. Each job's :meth:`Job.wait`
    reports its own result (the failure for the job that failed, :class:`JobCancelled` for
    the others). Returns the :class:`Job` objects in the order given.

    All or none: when it raises, nothing was started and no bitmap changed. TypeError or
    ValueError for a bad entry or option (the message names the entry's index), the library's
    refusal otherwise: :class:`InvalidArgument` (an empty list, the same target or bitmap
    twice, or any refusal of :func:`backup_start` for an entry), :class:`Busy` (a bitmap used
    by another job).
    """
    if isinstance(jobs, (str, bytes, dict)) or not hasattr(jobs, "__iter__"):
        raise TypeError("jobs must be a list of (source, target) or (source, target, options) tuples")
    entries: List[Tuple[Driver, Driver, _Spec]] = []
    for i, entry in enumerate(list(jobs)):
        if not isinstance(entry, (tuple, list)) or len(entry) not in (2, 3):
            raise TypeError(f"jobs[{i}] must be a (source, target) or (source, target, options) "
                            f"tuple, not {entry!r}")
        source, target = entry[0], entry[1]
        options = entry[2] if len(entry) == 3 else None
        if not isinstance(source, Driver) or not isinstance(target, Driver):
            raise TypeError(f"jobs[{i}]: source and target must be cowbackup.Driver objects")
        if options is None:
            options = {}
        if not isinstance(options, dict):
            raise TypeError(f"jobs[{i}]: options must be a dict of backup_start keyword "
                            f"arguments or None, not {type(options).__name__}")
        kwargs = {**defaults, **options}
        try:
            spec = _job_spec(**kwargs)
        except TypeError as e:
            raise TypeError(f"jobs[{i}]: {e}") from None
        except ValueError as e:
            raise ValueError(f"jobs[{i}]: {e}") from None
        entries.append((source, target, spec))
    return _start(entries, group=True)


# --- NBD server ------------------------------------------------------------------------

NBD_WRITABLE = 1  # COWBACKUP_NBD_WRITABLE


def _nbd_name(name: Any, what: str) -> bytes:
    """An NBD name argument: str (UTF-8, no NUL)."""
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, not {type(name).__name__}")
    if "\0" in name:
        raise ValueError(f"{what} must not contain NUL")
    return name.encode("utf-8")


_live_servers: "weakref.WeakSet[NbdServer]" = weakref.WeakSet()


class NbdServer:
    """An NBD server exporting drivers (a job's :meth:`Job.snapshot` view, any
    :class:`Driver`) and dirty bitmaps to NBD clients: ``qemu-img``, ``nbdcopy``,
    ``nbdinfo``, libnbd, the kernel's ``nbd-client``.

    ::

        with cowbackup.NbdServer.start("unix:/run/backup.sock") as srv:
            srv.add("disk", job.snapshot())          # read-only; writable=True to allow writes
            srv.add_bitmap("disk", "b0", bitmap)     # context qemu:dirty-bitmap:b0
            # nbdinfo --map=qemu:dirty-bitmap:b0 'nbd+unix:///disk?socket=/run/backup.sock'
            # qemu-img convert 'nbd+unix:///disk?socket=/run/backup.sock' backup.img

    Exports answer block status for ``base:allocation`` (hole = 1, zero = 2, as the NBD spec)
    and for each bitmap (1 = dirty, QEMU's meaning); read-only exports allow multi-conn. The
    server runs its own threads (one per client, at most 16 clients) which call the exported
    drivers, Python ones included. It holds its own references to drivers and bitmaps: they may
    be closed after :meth:`add`. A context manager (``__exit__`` stops it); thread-safe.

    Security (see :meth:`start`): Unix sockets are created mode 0600; a TCP address that is
    not loopback needs TLS or ``insecure=True``; with TLS, plaintext clients learn nothing.
    """

    __slots__ = ("_h", "_address", "_tls", "__weakref__")

    def __init__(self, _ptr: int, _tls: bool = False) -> None:
        """Internal: use :meth:`start`."""
        raw = _nbd_server_address(_ptr)
        self._address = (raw or b"").decode("utf-8", "replace")
        self._tls = _tls
        self._h = _Handle(_ptr, f"cowbackup.NbdServer ({self._address})")
        _live_servers.add(self)

    @classmethod
    def start(cls, address: str, *, tls: Any = None, allow: Any = (), insecure: bool = False,
              max_connections: Optional[int] = None,
              idle_timeout: Optional[float] = None) -> "NbdServer":
        """Listen on ``address``: ``"unix:PATH"`` (a Unix socket created at ``PATH``, mode
        0600: chmod it to let other users in) or ``"tcp:HOST:PORT"`` (port 0 picks a free
        one: see :attr:`address`).

        ``tls``: ``(cert_pem, key_pem)`` or ``(cert_pem, key_pem, ca_pem)`` paths: serve over
        TLS (``NBD_OPT_STARTTLS``, TLS 1.3/1.2); before STARTTLS a client gets
        ``NBD_REP_ERR_TLS_REQD`` for every option and learns no export name or size. With
        ``ca_pem`` clients must present a certificate signed by that CA, and when ``allow``
        lists identities, one of them: ``"CN=alice,O=Example"`` (subject DN) or
        ``"sha256:HEX"`` (certificate fingerprint). ``insecure``: serve plaintext on a TCP
        address that is not loopback (refused by default: anyone reaching the port could read
        and write the exports). ``max_connections`` (default 16) and ``idle_timeout`` in
        seconds (default 300: a client that sends no whole request for that long is
        disconnected).

        Raises TypeError (wrong types), :class:`InvalidArgument` (malformed address, TLS files
        that are not PEM or do not match, a malformed identity, ``allow`` without a CA, limits
        out of range), ``FileNotFoundError`` (a TLS file is missing), ``PermissionError``
        (errno EPERM: a non-loopback TCP address without TLS or ``insecure``),
        ``FileExistsError`` (``PATH`` exists and is not a socket: it is never removed), a
        :class:`CowbackupError` with errno EADDRINUSE (a server listens there already), or the
        errno of creating the socket.
        """
        raw = _nbd_name(address, "address")
        if not isinstance(insecure, bool):
            raise TypeError("insecure must be a bool")
        if isinstance(allow, str):
            allow = (allow,)
        allow = list(allow)
        files: List[Optional[bytes]] = []
        if tls is not None:
            if not isinstance(tls, (tuple, list)) or len(tls) not in (2, 3):
                raise TypeError("tls must be (cert_pem, key_pem) or (cert_pem, key_pem, ca_pem)")
            files = [_path_arg(tls[0]), _path_arg(tls[1]),
                     _path_arg(tls[2]) if len(tls) == 3 and tls[2] is not None else None]
        raw_allow = [_nbd_name(a, "allow identity") for a in allow]
        limits = max_connections is not None or idle_timeout is not None
        mc = 16 if max_connections is None else max_connections
        it = 300.0 if idle_timeout is None else idle_timeout
        if limits:
            if not isinstance(mc, int) or isinstance(mc, bool):
                raise TypeError("max_connections must be an int")
            if not isinstance(it, (int, float)) or isinstance(it, bool):
                raise TypeError("idle_timeout must be a number of seconds")
            if not 1 <= mc <= 65536:
                raise InvalidArgument(_errno.EINVAL, f"max_connections {mc}: 1 to 65536")
            if not 0.001 <= it <= 4294967.295:
                raise InvalidArgument(_errno.EINVAL, f"idle_timeout {it}: 0.001 to 4294967 seconds")
        if tls is None and not allow and not insecure and not limits:
            return cls(_out_handle(_nbd_server_start, "cowbackup_nbd_server_start", raw))
        o = _nbd_server_options_new()
        if not o:
            raise CowbackupError(_errno.ENOMEM, _last_error() or "cowbackup_nbd_server_options_new failed")
        try:
            if tls is not None:
                _check(_nbd_server_options_set_tls(o, *files), "cowbackup_nbd_server_options_set_tls")
            for a in raw_allow:
                _check(_nbd_server_options_allow(o, a), "cowbackup_nbd_server_options_allow")
            _check(_nbd_server_options_set_insecure(o, insecure), "cowbackup_nbd_server_options_set_insecure")
            if limits:
                _check(_nbd_server_options_set_limits(o, mc, max(1, round(it * 1000))),
                       "cowbackup_nbd_server_options_set_limits")
            ptr = _out_handle(_nbd_server_start_with, "cowbackup_nbd_server_start_with", raw, o)
        finally:
            _nbd_server_options_free(o)
        return cls(ptr, tls is not None)

    @property
    def address(self) -> str:
        """The address as bound: ``"unix:PATH"`` or ``"tcp:IP:PORT"`` with the real port."""
        return self._address

    @property
    def closed(self) -> bool:
        """True after :meth:`stop`."""
        return self._h.closed

    def uri(self, export: str = "") -> str:
        """The NBD URI of ``export`` on this server (``nbd+unix:///NAME?socket=PATH`` or
        ``nbd://IP:PORT/NAME``; ``nbds+unix://`` / ``nbds://`` when serving TLS), for
        qemu-img, nbdcopy, nbdinfo and libnbd."""
        s = "s" if self._tls else ""
        if self._address.startswith("unix:"):
            return f"nbd{s}+unix:///{export}?socket={self._address[5:]}"
        return f"nbd{s}://{self._address[4:]}/{export}"

    def add(self, name: str, driver: Driver, writable: bool = False) -> None:
        """Export ``driver`` as ``name`` (``""``: the default export), read-only unless
        ``writable``. Raises :class:`InvalidArgument` (bad name), ``FileExistsError``
        (``name`` is exported already), ValueError (a closed server or driver)."""
        raw = _nbd_name(name, "name")
        if not isinstance(driver, Driver):
            raise TypeError(f"driver must be a cowbackup.Driver, not {type(driver).__name__}")
        ptr = self._h.acquire()
        try:
            dptr = driver._ptr()
            try:
                _check(_nbd_server_add(ptr, raw, dptr, NBD_WRITABLE if writable else 0),
                       "cowbackup_nbd_server_add")
            finally:
                driver._h.release()
        finally:
            self._h.release()

    def add_bitmap(self, export: str, name: str, bitmap: "Bitmap") -> None:
        """Serve ``bitmap`` on ``export`` as the metadata context ``qemu:dirty-bitmap:NAME``
        (read live). Raises :class:`InvalidArgument` (bad name, a bitmap of another size than
        the export), ``FileNotFoundError`` (no such export), ``FileExistsError`` (the name is
        taken on that export)."""
        raw_export = _nbd_name(export, "export")
        raw_name = _nbd_name(name, "name")
        if not isinstance(bitmap, Bitmap):
            raise TypeError(f"bitmap must be a cowbackup.Bitmap, not {type(bitmap).__name__}")
        ptr = self._h.acquire()
        try:
            bptr = bitmap._h.acquire()
            try:
                _check(_nbd_server_add_bitmap(ptr, raw_export, raw_name, bptr),
                       "cowbackup_nbd_server_add_bitmap")
            finally:
                bitmap._h.release()
        finally:
            self._h.release()

    def remove(self, name: str) -> None:
        """Stop exporting ``name``; its clients are disconnected. Raises ``FileNotFoundError``
        when there is no such export."""
        raw = _nbd_name(name, "name")
        ptr = self._h.acquire()
        try:
            _check(_nbd_server_remove(ptr, raw), "cowbackup_nbd_server_remove")
        finally:
            self._h.release()

    def stop(self) -> None:
        """Close the socket, disconnect every client, join the server's threads and free the
        server. Idempotent."""
        ptr = self._h.begin_close()
        if ptr is None:
            return
        self._h.drain()
        _live_servers.discard(self)
        _nbd_server_stop(ptr)

    close = stop

    def __enter__(self) -> "NbdServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __del__(self) -> None:
        if _shutting_down or not hasattr(self, "_h"):
            return
        self.stop()

    def __repr__(self) -> str:
        state = "stopped" if self.closed else "running"
        return f"<cowbackup.NbdServer {self._address} {state}>"


# --- interpreter exit ------------------------------------------------------------------

_shutting_down = False


@atexit.register
def _shutdown() -> None:
    """Close live jobs, drivers and bitmaps before the interpreter goes away.

    Library threads call Python (drivers, on_complete); they must be done before Python
    is torn down. Jobs are cancelled and joined (a cancelled job gives its bitmap back),
    then the drivers and bitmaps dropped (a persistent bitmap's file is closed and unlocked;
    every mark that returned is already in it).
    """
    global _shutting_down
    # NBD servers first: their threads call the exported drivers (Python ones too).
    for srv in list(_live_servers):
        try:
            srv.stop()
        except Exception:  # pragma: no cover
            log.exception("cowbackup: stopping an NBD server at exit")
    for job in list(_live_jobs):
        try:
            job.close()
        except Exception:  # pragma: no cover - best effort at exit
            log.exception("cowbackup: closing a job at exit")
    for drv in list(_live_drivers):
        try:
            drv.close()
        except Exception:  # pragma: no cover
            log.exception("cowbackup: closing a driver at exit")
    for bm in list(_live_bitmaps):
        try:
            bm.close()
        except Exception:  # pragma: no cover
            log.exception("cowbackup: closing a bitmap at exit")
    for pool in list(_live_pools):
        try:
            pool.close()
        except Exception:  # pragma: no cover
            log.exception("cowbackup: closing a worker pool at exit")
    _shutting_down = True
