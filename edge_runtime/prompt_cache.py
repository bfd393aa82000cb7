"""A bounded on-disk cache of prompt encodings (numpy-only): repeated prompts skip the text encoder.

An entry is one uncompressed .npz holding the text encoder's outputs for one prompt, named by the sha256 of the
bundle's identity and the prompt. Entries are written
atomically (a temporary file, then rename); the least recently used are removed once the folder holds more than
`max_bytes`. An entry that cannot be read (cut short, corrupt, another bundle's layout) is deleted and counts as a
miss: the caller encodes the prompt again, nothing is lost.
"""

from __future__ import annotations

import hashlib
import os
import threading
import zipfile

import numpy as np

from .fileio import write_atomically

SUFFIX = ".npz"


class PromptCache:
    """get/put of {output name: float32 array with a leading batch row of 1} per prompt, within max_bytes."""

    def __init__(self, root: str, max_bytes: int, identity: str):
        """root: the cache folder (created); max_bytes: the folder's bound (> 0); identity: what makes an
        encoding valid (the bundle's manifest sha256: a recompiled bundle never reads another's entries)."""
        if max_bytes <= 0:
            raise ValueError(f"a prompt cache needs a positive size bound, got {max_bytes} bytes")
        self.root, self.max_bytes, self.identity = root, int(max_bytes), str(identity)
        self.hits = self.misses = 0
        self._lock = threading.Lock()
        os.makedirs(root, exist_ok=True)

    def path(self, prompt: str) -> str:
        digest = hashlib.sha256(f"{self.identity}\0{prompt}".encode()).hexdigest()
        return os.path.join(self.root, digest + SUFFIX)

    def get(self, prompt: str) -> dict[str, np.ndarray] | None:
        path = self.path(prompt)
        try:
            with np.load(path, allow_pickle=False) as z:
                out = {k: np.asarray(z[k], dtype=np.float32) for k in z.files}
            os.utime(path)  # recently used
        except FileNotFoundError:
            out = None
        except (OSError, ValueError, zipfile.BadZipFile, EOFError):
            _remove(path)
            out = None
        if out is not None and (not out or any(v.ndim < 1 or v.shape[0] != 1 for v in out.values())):
            _remove(path)
            out = None
        with self._lock:
            if out is None:
                self.misses += 1
            else:
                self.hits += 1
        return out

    def put(self, prompt: str, outputs: dict[str, np.ndarray]) -> None:
        """Store one prompt's outputs (each with a batch row of 1), then evict down to the bound."""
        arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in outputs.items()}
        if not arrays or any(v.ndim < 1 or v.shape[0] != 1 for v in arrays.values()):
            raise ValueError(f"a prompt's encoding holds one row per output, got shapes "
                             f"{ {k: v.shape for k, v in arrays.items()} }")
        path = self.path(prompt)
        write_atomically(path, lambda tmp: _savez(tmp, arrays))  # the daemon's store removes leftovers at start
        self.evict()

    def entries(self) -> list[tuple[float, int, str]]:
        """(last use, bytes, path) of every entry, oldest first."""
        out = []
        for name in os.listdir(self.root):
            if not name.endswith(SUFFIX):
                continue
            full = os.path.join(self.root, name)
            try:
                st = os.stat(full)
            except FileNotFoundError:
                continue
            out.append((st.st_mtime, st.st_size, full))
        return sorted(out)

    def size_bytes(self) -> int:
        return sum(size for _, size, _ in self.entries())

    def evict(self) -> None:
        with self._lock:
            entries = self.entries()
            total = sum(size for _, size, _ in entries)
            for _, size, path in entries:
                if total <= self.max_bytes:
                    break
                _remove(path)
                total -= size


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _savez(path: str, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:  # a file object: numpy adds no ".npz" to the temporary name
        np.savez(f, **arrays)
