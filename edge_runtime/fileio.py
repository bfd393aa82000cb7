"""Crash-safe files for the device side: sha256 of a file, and atomic writes.

atomic_write: a temporary file beside the target, fsynced, renamed over it, the directory fsynced;
on any error the temporary file is removed and the old file (if any) is left as it was. The
bundle manifest, engine caches, adapters and job state all go through it. Files another library writes
(ORT checkpoints, numpy archives) go through write_atomically: temp_path(path), then commit_file, the same steps.
Every temporary name carries TMP_MARK, which is_temp recognises: the daemon's store removes leftovers at start.
A write the disk (or the file-size limit) has no room for raises NoSpace, naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Callable
from typing import Any

from .faults import crash_point

# a full disk, the file-size limit (RLIMIT_FSIZE), a quota
SPACE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
TMP_MARK = ".tmp-"  # in every temporary file's name: NAME.tmp-<pid>-<thread>[suffix], or NAME.tmp-XXXX (mkstemp)


class NoSpace(OSError):
    """A write that found no room: the disk is full or the file outgrew the size limit (the message names the file)."""


def _discard(tmp: str, path: str, e: BaseException) -> None:
    """After write `e` of `path` failed: remove its temporary file, and raise NoSpace from e if it ran out of room.
    Another library's writer (ONNX Runtime's checkpoint) may raise its own exception type: its message then carries
    the system's reason."""
    with contextlib.suppress(OSError):
        os.unlink(tmp)
    if isinstance(e, NoSpace):
        return
    if isinstance(e, OSError):
        code = e.errno if e.errno in SPACE_ERRNOS else None
    else:
        code = next((c for c in SPACE_ERRNOS if os.strerror(c) in str(e)), None)
    if code is not None:
        raise NoSpace(code, f"no space to write {path} ({os.strerror(code)}): free space on its disk (or raise the "
                            "file-size limit) and retry") from e


def temp_path(path: str, suffix: str = "") -> str:
    """A temporary name beside `path`, unique to this process and thread (suffix: for writers that want one,
    such as numpy's .npz)."""
    return f"{path}{TMP_MARK}{os.getpid()}-{threading.get_ident()}{suffix}"


def is_temp(name: str) -> bool:
    """A file name temp_path or atomic_write made (also the `.NAME.XXXX.tmp` of earlier versions)."""
    return TMP_MARK in name or (name.startswith(".") and name.endswith(".tmp"))


def commit_file(tmp: str, path: str) -> None:
    """Make a finished temporary file `path`: fsync it, rename it over `path`, fsync the folder; on any error the
    temporary file is removed and `path` left as it was."""
    name = os.path.basename(path)
    try:
        crash_point("fileio.written", name)  # test hook (edge_runtime.faults): written, not yet fsynced
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        crash_point("fileio.fsynced", name)  # fsynced, not yet renamed
        os.replace(tmp, path)
    except BaseException as e:
        _discard(tmp, path, e)
        raise
    crash_point("fileio.renamed", name)  # renamed, the folder not yet fsynced
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: str) -> None:
    """fsync a directory so the renames in it survive a power cut (best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomically(path: str, write: Callable[[str], None], suffix: str = "") -> None:
    """write(tmp) fills a temporary file beside `path` (another library's writer: ORT checkpoints, numpy
    archives, torch.save), then commit_file makes it `path`; a failed write leaves no temporary file."""
    tmp = temp_path(path, suffix)
    try:
        write(tmp)
    except BaseException as e:
        _discard(tmp, path, e)
        raise
    commit_file(tmp, path)


def atomic_write(path: str, data: bytes) -> None:
    """Write `data` to `path` so a crash leaves the old file or the new one, never part of one."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{os.path.basename(path)}{TMP_MARK}", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            crash_point("fileio.written", os.path.basename(path))  # test hook (edge_runtime.faults), as commit_file
            os.fsync(f.fileno())
        crash_point("fileio.fsynced", os.path.basename(path))
        os.replace(tmp, path)
    except BaseException as e:
        _discard(tmp, path, e)
        raise
    crash_point("fileio.renamed", os.path.basename(path))
    fsync_dir(d)


def atomic_json(path: str, obj: Any) -> None:
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))
