"""A test hook: crash the process at a named point, to prove that a kill -9 anywhere loses nothing.

With EDGEBLOCK_CRASH_AT="NAME:N" in the environment, the N-th call of crash_point(NAME) (or of
crash_point(PREFIX, tag) where NAME is "PREFIX.tag") SIGKILLs the process. Unset (always, outside
tests): crash_point returns at once. tests/device/test_daemon_faults.py and docs/daemon.md list the points.
"""

from __future__ import annotations

import os
import signal
import threading

ENV = "EDGEBLOCK_CRASH_AT"


def _parse(spec: str) -> tuple[str, int] | None:
    if not spec:
        return None
    name, sep, n = spec.rpartition(":")
    if not sep or not name or not n.isdigit() or int(n) < 1:
        raise ValueError(f"{ENV} must be NAME:N with N >= 1 (e.g. checkpoint.saved:2), got {spec!r}")
    return name, int(n)


_target = _parse(os.environ.get(ENV, ""))
_hits = 0
_lock = threading.Lock()


def crash_point(name: str, tag: str = "") -> None:
    """SIGKILL this process if EDGEBLOCK_CRASH_AT names this point and this is its N-th time; else nothing.
    tag narrows a generic point: crash_point("fileio.fsynced", "checkpoint") is reached as
    "fileio.fsynced" and as "fileio.fsynced.checkpoint"."""
    if _target is None:
        return
    want, n = _target
    if want != name and want != f"{name}.{tag}":
        return
    global _hits
    with _lock:
        _hits += 1
        if _hits == n:
            os.kill(os.getpid(), signal.SIGKILL)


__all__ = ["ENV", "crash_point"]
