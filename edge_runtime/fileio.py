"""Crash-safe files for the device side: sha256 of a file, and atomic writes.

atomic_write: a temporary file beside the target, fsynced, renamed over it, the directory fsynced;
on any error the temporary file is removed and the old file (if any) is left as it was. The
bundle manifest, engine caches, adapters and job state all go through it. Files another library writes
(ORT checkpoints, numpy archives) go through write_atomically: temp_path(path), then commit_file, the same steps.
Every temporary name carries TMP_MARK, which is_temp recognises: the daemon's store removes leftovers at start.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Callable
from typing import Any

TMP_MARK = ".tmp-"  # in every temporary file's name: NAME.tmp-<pid>-<thread>[suffix], or NAME.tmp-XXXX (mkstemp)


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
    try:
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
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
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
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
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(d)


def atomic_json(path: str, obj: Any) -> None:
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))
