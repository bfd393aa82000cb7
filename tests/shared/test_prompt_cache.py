"""The on-disk prompt-encoding cache: hits skip the encoder, the folder stays within its bound, a damaged entry
is a miss that is encoded again, and another bundle never reads an entry."""

from __future__ import annotations

import os

import numpy as np
import pytest

from edge_runtime.prompt_cache import PromptCache


def _enc(seed: int, length: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"text": rng.standard_normal((1, length, 16)).astype(np.float32),
            "pooled": rng.standard_normal((1, 16)).astype(np.float32)}


def test_round_trip_bound_and_identity(tmp_path):
    c = PromptCache(str(tmp_path / "c"), max_bytes=10**6, identity="bundle-a")
    assert c.get("a star") is None and c.misses == 1
    c.put("a star", _enc(0))
    got = c.get("a star")
    assert got is not None and c.hits == 1
    assert all(np.array_equal(got[k], v) for k, v in _enc(0).items())
    assert PromptCache(str(tmp_path / "c"), 10**6, identity="bundle-b").get("a star") is None  # another bundle
    # the bound: entries of ~4.3 KB each in 10 KB keep the two most recently used
    small = PromptCache(str(tmp_path / "s"), max_bytes=10_000, identity="x")
    for i in range(3):
        small.put(f"p{i}", _enc(i, length=64))
        os.utime(small.path(f"p{i}"), (1000 + i, 1000 + i))
    small.get("p1")  # p1 now most recent, p0 oldest ... and evicted first
    small.put("p3", _enc(3, length=64))
    assert small.size_bytes() <= 10_000
    kept = {p for p in ("p0", "p1", "p2", "p3") if os.path.exists(small.path(p))}
    assert kept == {"p1", "p3"}


def test_damaged_entry_is_a_miss_and_is_removed(tmp_path):
    c = PromptCache(str(tmp_path), max_bytes=10**6, identity="b")
    c.put("x", _enc(1))
    with open(c.path("x"), "r+b") as f:
        f.truncate(100)
    assert c.get("x") is None and not os.path.exists(c.path("x"))
    with pytest.raises(ValueError, match="one row"):
        c.put("y", {"text": np.zeros((2, 4, 8), np.float32)})
    with pytest.raises(ValueError, match="positive size bound"):
        PromptCache(str(tmp_path), 0, "b")
