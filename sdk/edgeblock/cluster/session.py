"""Joining a Ray cluster and waiting on its work: `--ray auto|local|ADDRESS`, one progress bar over all tasks,
each task retried once by Ray, and a failure named after the task that failed (TaskFailed).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Hashable, Iterator
from typing import Any

RETRIES = 1  # each task (or actor call) is run again once after a failure: a crashed worker or an exception


class TaskFailed(RuntimeError):
    """A task failed on both its attempts; `task` names it, `error` is the last attempt's error."""

    def __init__(self, task: str, error: BaseException):
        super().__init__(f"task {task} failed on both attempts (the first retried once): "
                         f"{type(error).__name__}: {error}")
        self.task, self.error = task, error


def import_ray():
    """Ray, or a ValueError that says how to install it."""
    os.environ.setdefault("RAY_DISABLE_IMPORT_WARNING", "1")
    try:
        import ray
    except ImportError as e:
        raise ValueError(f"--ray needs Ray ({e}): pip install 'edgeblock[cluster]'") from e
    return ray


@contextlib.contextmanager
def connect(address: str) -> Iterator[Any]:
    """The ray module, joined to the cluster at `address` for the block: `auto` (the cluster Ray finds: RAY_ADDRESS
    or one started with `ray start` on this machine), `local` (a new one-machine cluster in this process, stopped
    after) or HOST:PORT / ray://HOST:PORT. A process already joined (ray.init before) keeps its cluster."""
    if not address:
        raise ValueError("--ray needs an address: auto, local, or HOST:PORT of the cluster's head")
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    kw: dict = {"address": address, "log_to_driver": False}
    if address == "local":
        kw["include_dashboard"] = False
    try:
        ray.init(**kw)
    except ConnectionError as e:
        raise ValueError(f"--ray {address}: no Ray cluster there ({e}); start one with `ray start --head` "
                         "or give --ray local") from e
    try:
        yield ray
    finally:
        ray.shutdown()


def result(ray, ref, task: str) -> Any:
    """ray.get of one task's result; a failure (after Ray's retry) becomes TaskFailed naming the task."""
    try:
        return ray.get(ref)
    except Exception as e:  # noqa: BLE001 - Ray wraps every kind of failure; name the task and keep its cause
        cause = getattr(e, "cause", None)
        raise TaskFailed(task, cause if isinstance(cause, BaseException) else e) from e


def wait_all(ray, refs: dict[Hashable, Any], name: Callable[[Hashable], str], bar) -> dict[Hashable, Any]:
    """Every task's result keyed as `refs`, in the order they finish, one bar step each; on the first task that
    fails, the others are cancelled and TaskFailed raised."""
    pending = {ref: key for key, ref in refs.items()}
    out: dict[Hashable, Any] = {}
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                key = pending.pop(ref)
                out[key] = result(ray, ref, name(key))
                bar.update(1)
    finally:
        for ref in pending:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
    return {key: out[key] for key in refs}  # the callers' order
