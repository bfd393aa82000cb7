"""The daemon's state directory: adapters and jobs, written atomically with checksums.

    STATE/adapters/<id>/adapter.safetensors   the adapter file (edge_runtime.adapter_file: diffusers/PEFT LoRA)
    STATE/adapters/<id>/adapter.json          metadata + sha256 of the weights (written last)
    STATE/jobs/<id>/job.json                  request options, state, step, checkpoint step
    STATE/jobs/<id>/events                    the job's events (JobEvent messages, each after its length)
    STATE/jobs/<id>/images/NN.png             the decoded subject images (a resumed job reads them)
    STATE/jobs/<id>/checkpoint                ORT training checkpoint (with optimizer state)
    STATE/jobs/<id>/bank/                     precomputed states (bank mode)

Every file goes through edge_runtime.fileio.atomic_write (temporary name, fsync, rename, directory
fsync): a crash or power loss leaves the old file or the new one, never half of one. An adapter exists
only once its adapter.json exists; that file records the weights' sha256, checked on load.
Ids are 32 lowercase hex characters; anything else is refused before it touches a path.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np

from . import adapter_file
from .faults import crash_point
from .fileio import atomic_json, atomic_write, fsync_dir, is_temp

# what the adapter file's own record (metadata "edgeblock") keeps of an adapter's adapter.json
RECORDED = ("name", "token", "class_noun", "steps", "final_loss", "job_id", "bundle_sha256", "recipe", "learning_rate",
            "seed", "created")


def _rank(weights: Mapping[str, np.ndarray]) -> int:
    return int(next(np.shape(v)[0] for k, v in weights.items() if k.endswith(".lora_A.weight")))

ID_RE = re.compile(r"\A[0-9a-f]{32}\Z")
FINISHED = ("DONE", "FAILED", "CANCELLED")  # the job states that keep job.json only (edge_runtime.daemon.jobs.TERMINAL)


class StoreError(ValueError):
    """Bad id, unknown adapter/job or a corrupt file; the message says which."""


class NotFound(StoreError):
    pass


class CorruptData(StoreError):
    """A stored file that no longer matches its checksum or does not parse (the daemon answers DATA_LOSS)."""


def new_id() -> str:
    return uuid.uuid4().hex


def check_id(value: str, what: str = "id") -> str:
    if not isinstance(value, str) or not ID_RE.match(value):
        raise StoreError(f"{what} must be 32 lowercase hex characters, got {value[:80]!r}" if isinstance(value, str)
                         else f"{what} must be a string")
    return value


def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Store:
    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.adapters_dir = os.path.join(self.root, "adapters")
        self.jobs_dir = os.path.join(self.root, "jobs")
        os.makedirs(self.adapters_dir, exist_ok=True)
        os.makedirs(self.jobs_dir, exist_ok=True)
        self._lock = threading.Lock()
        self._clean_partial()

    def _clean_partial(self) -> None:
        """Adapter folders without adapter.json (a crash between the two writes), temp files, and the work of jobs
        that finished just before a crash go."""
        for name in os.listdir(self.adapters_dir):
            d = os.path.join(self.adapters_dir, name)
            if not ID_RE.match(name) or not os.path.exists(os.path.join(d, "adapter.json")):
                shutil.rmtree(d, ignore_errors=True)
        for name in os.listdir(self.jobs_dir):
            d = os.path.join(self.jobs_dir, name)
            # a deletion cut short, or a job accepted only up to its images (job.json is written last)
            if name.startswith(".trash-") or (ID_RE.match(name) and not os.path.exists(os.path.join(d, "job.json"))):
                shutil.rmtree(d, ignore_errors=True)
        for job in self.list_jobs():
            if job.get("state") in FINISHED:  # finished, its work not yet dropped when the daemon died
                self.drop_job_work(job["id"])
        for dirpath, _dirs, files in os.walk(self.root):
            for n in files:
                if is_temp(n):
                    with _suppress():
                        os.remove(os.path.join(dirpath, n))

    # ------------------------------------------------------------------ adapters
    def adapter_dir(self, adapter_id: str) -> str:
        return os.path.join(self.adapters_dir, check_id(adapter_id, "adapter id"))

    def save_adapter(self, weights: Mapping[str, np.ndarray], meta: dict[str, Any], adapter_id: str | None = None) -> dict:
        adapter_id = adapter_id or new_id()
        d = self.adapter_dir(adapter_id)
        os.makedirs(d, exist_ok=True)
        alpha = meta.get("lora_alpha")
        record = {k: v for k, v in meta.items() if k in RECORDED}
        data = adapter_file.encode(weights, alpha if alpha is not None else _rank(weights),
                                   {**record, "adapter_id": adapter_id})
        info = {**meta, "id": adapter_id, "sha256": sha256_bytes(data), "size_bytes": len(data),
                "created": meta.get("created", time.time())}
        try:
            atomic_write(os.path.join(d, "adapter.safetensors"), data)
            crash_point("store.adapter_weights")  # test hook (edge_runtime.faults): the weights, no adapter.json
            atomic_json(os.path.join(d, "adapter.json"), info)
        except BaseException:  # e.g. a full disk: no half adapter stays behind (an adapter is its adapter.json)
            if not os.path.exists(os.path.join(d, "adapter.json")):
                shutil.rmtree(d, ignore_errors=True)
            raise
        fsync_dir(self.adapters_dir)
        return info

    def get_adapter(self, adapter_id: str) -> dict:
        p = os.path.join(self.adapter_dir(adapter_id), "adapter.json")
        if not os.path.exists(p):
            raise NotFound(f"unknown adapter {adapter_id}")
        try:
            return read_json(p)
        except ValueError as e:  # written atomically, so only a damaged disk or a hand edit gets here
            raise CorruptData(f"adapter {adapter_id}: adapter.json does not parse ({e})") from e

    def list_adapters(self) -> list[dict]:
        out = []
        for name in sorted(os.listdir(self.adapters_dir)):
            p = os.path.join(self.adapters_dir, name, "adapter.json")
            if ID_RE.match(name) and os.path.exists(p):
                with _suppress():
                    out.append(read_json(p))
        return sorted(out, key=lambda a: a.get("created", 0))

    def load_adapter(self, adapter_id: str) -> tuple[dict[str, np.ndarray], dict]:
        """The adapter's LoRA tensors by module path (float32) and its adapter.json."""
        data, info = self.adapter_bytes(adapter_id)
        try:
            return adapter_file.decode(data, default_alpha=info.get("lora_alpha")).weights, info
        except adapter_file.AdapterFileError as e:
            raise CorruptData(f"adapter {adapter_id}: adapter.safetensors is not readable ({e})") from e

    def adapter_bytes(self, adapter_id: str) -> tuple[bytes, dict]:
        """The adapter file as stored (checked against its sha256): what ExportAdapter sends."""
        info = self.get_adapter(adapter_id)
        with open(os.path.join(self.adapter_dir(adapter_id), "adapter.safetensors"), "rb") as f:
            data = f.read()
        if sha256_bytes(data) != info["sha256"]:
            raise CorruptData(f"adapter {adapter_id}: adapter.safetensors does not match its sha256 (corrupt file): "
                              "delete the adapter and train it again")
        return data, info

    def delete_adapter(self, adapter_id: str) -> None:
        d = self.adapter_dir(adapter_id)
        if not os.path.exists(os.path.join(d, "adapter.json")):
            raise NotFound(f"unknown adapter {adapter_id}")
        trash = os.path.join(self.adapters_dir, f".trash-{adapter_id}-{os.getpid()}")
        os.replace(d, trash)  # atomic: the adapter disappears at once
        fsync_dir(self.adapters_dir)
        shutil.rmtree(trash, ignore_errors=True)

    # ------------------------------------------------------------------ jobs
    def job_dir(self, job_id: str) -> str:
        return os.path.join(self.jobs_dir, check_id(job_id, "job id"))

    def save_job(self, job: dict) -> None:
        """Write job.json, setting job["updated"] (in the caller's dict too) to now."""
        d = self.job_dir(job["id"])
        os.makedirs(d, exist_ok=True)
        job["updated"] = time.time()
        atomic_json(os.path.join(d, "job.json"), job)

    def get_job(self, job_id: str) -> dict:
        p = os.path.join(self.job_dir(job_id), "job.json")
        if not os.path.exists(p):
            raise NotFound(f"unknown job {job_id}")
        return read_json(p)

    def list_jobs(self) -> list[dict]:
        out = []
        for name in sorted(os.listdir(self.jobs_dir)):
            p = os.path.join(self.jobs_dir, name, "job.json")
            if ID_RE.match(name) and os.path.exists(p):
                with _suppress():
                    out.append(read_json(p))
        return sorted(out, key=lambda j: j.get("created", 0))

    def save_job_images(self, job_id: str, pngs: list[bytes], kind: str = "images") -> None:
        """A job's subject images ("images") or class images ("class_images")."""
        d = os.path.join(self.job_dir(job_id), kind)
        os.makedirs(d, exist_ok=True)
        for i, data in enumerate(pngs):
            atomic_write(os.path.join(d, f"{i:02d}.png"), data)

    def job_images(self, job_id: str, kind: str = "images") -> list[bytes]:
        d = os.path.join(self.job_dir(job_id), kind)
        out = []
        if kind != "images" and not os.path.isdir(d):  # a job without class images
            return out
        for n in sorted(os.listdir(d)):
            if n.endswith(".png"):
                with open(os.path.join(d, n), "rb") as f:
                    out.append(f.read())
        return out

    def append_job_event(self, job_id: str, event: bytes) -> None:
        """Add one serialized event to the job's log (a 4-byte little-endian length, then the bytes). Not fsynced:
        a crash may lose the last events, never the job (job.json is what resumes it)."""
        with open(os.path.join(self.job_dir(job_id), "events"), "ab") as f:
            f.write(len(event).to_bytes(4, "little") + event)

    def job_events(self, job_id: str) -> list[bytes]:
        """The job's logged events in order; a record cut short by a crash (the last one) is left out."""
        p = os.path.join(self.job_dir(job_id), "events")
        if not os.path.exists(p):
            return []
        with open(p, "rb") as f:
            data = f.read()
        out, i = [], 0
        while i + 4 <= len(data):
            n = int.from_bytes(data[i:i + 4], "little")
            if i + 4 + n > len(data):
                break
            out.append(data[i + 4:i + 4 + n])
            i += 4 + n
        return out

    def delete_job(self, job_id: str) -> None:
        """Forget a job: its folder goes (its adapter, if any, stays)."""
        d = self.job_dir(job_id)
        if not os.path.isdir(d):
            raise NotFound(f"unknown job {job_id}")
        trash = os.path.join(self.jobs_dir, f".trash-{job_id}-{os.getpid()}")
        os.replace(d, trash)  # atomic: the job disappears at once
        fsync_dir(self.jobs_dir)
        shutil.rmtree(trash, ignore_errors=True)

    def drop_job_work(self, job_id: str) -> None:
        """A finished job keeps job.json only (its images, checkpoint and bank are removed)."""
        d = self.job_dir(job_id)
        for n in ("images", "class_images", "bank"):
            shutil.rmtree(os.path.join(d, n), ignore_errors=True)
        for n in ("checkpoint",):
            with _suppress():
                os.remove(os.path.join(d, n))


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        return exc_type is not None and issubclass(exc_type, (OSError, ValueError))
