"""Crash-safe files: one temporary naming for every writer, and the store's start-up cleanup finds them all."""

from __future__ import annotations

import os

import numpy as np
import pytest

from edge_runtime.fileio import atomic_write, commit_file, is_temp, temp_path, write_atomically
from edge_runtime.store import Store


def test_every_temporary_name_is_recognised(tmp_path):
    p = str(tmp_path / "adapter.safetensors")
    assert is_temp(os.path.basename(temp_path(p))) and is_temp(os.path.basename(temp_path(p, ".npz")))
    assert temp_path(p).startswith(p) and temp_path(p, ".npz").endswith(".npz")
    assert is_temp(".adapter.json.k3j2x.tmp")  # atomic_write's name before TMP_MARK
    assert not any(is_temp(n) for n in ("adapter.json", "adapter.safetensors", "step.tmpl", "a.tmp.json"))


def test_atomic_write_and_commit_leave_the_old_file_or_the_new_one(tmp_path):
    p = str(tmp_path / "state.json")
    atomic_write(p, b"old")
    with pytest.raises(TypeError):
        atomic_write(p, "not bytes")  # fails inside the write: the old file stays, no temporary is left
    assert open(p, "rb").read() == b"old" and os.listdir(tmp_path) == ["state.json"]
    tmp = temp_path(p)
    with open(tmp, "wb") as f:
        f.write(b"new")
    commit_file(tmp, p)
    assert open(p, "rb").read() == b"new" and os.listdir(tmp_path) == ["state.json"]
    with pytest.raises(FileNotFoundError):
        commit_file(temp_path(p), p)  # nothing written: the file stays as it was
    assert open(p, "rb").read() == b"new"


def test_write_atomically_hands_the_writer_a_temporary_name_and_cleans_up_a_failure(tmp_path):
    p = str(tmp_path / "bank.npz")
    write_atomically(p, lambda tmp: np.savez(tmp, a=np.arange(3)), ".npz")
    assert np.load(p)["a"].tolist() == [0, 1, 2] and os.listdir(tmp_path) == ["bank.npz"]

    def fail(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_atomically(p, fail)
    assert np.load(p)["a"].tolist() == [0, 1, 2] and os.listdir(tmp_path) == ["bank.npz"]


def test_store_removes_leftover_temporaries_of_every_writer_at_start(tmp_path):
    root = tmp_path / "state"
    Store(str(root))
    job = root / "jobs" / "j1"
    job.mkdir(parents=True)
    leftovers = [job / os.path.basename(temp_path(str(job / "ckpt"))),  # ORT / torch checkpoints
                 job / os.path.basename(temp_path(str(job / "bank.npz"), ".npz")),  # precompute banks
                 job / ".state.json.ab12cd.tmp",  # atomic_write before TMP_MARK
                 root / "adapters.tmp-77"]
    kept = [job / "state.json", job / "ckpt"]
    for f in leftovers + kept:
        f.write_bytes(b"x")
    np.savez(str(job / "bank.npz"), a=np.zeros(2))
    Store(str(root))
    assert not any(f.exists() for f in leftovers)
    assert all(f.exists() for f in kept) and (job / "bank.npz").exists()
