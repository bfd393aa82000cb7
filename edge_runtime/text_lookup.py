"""Token-embedding lookups of a bundle's text encoder, read from disk row by row (numpy only; host and device).

A text encoder's token-embedding table is most of a small encoder's bytes and a large share of a big one's
(all-MiniLM-L6-v2: 11.7M of 22.7M parameters; Gemma-2-2B: 590M of 2.6B; T5-XXL: 132M of 4.8B), yet a prompt
reads a few dozen of its rows. `edgeblock compile` takes each such Gather out of the text graph
(compile/text_lookup.py): the table goes to `text_encoder/lookup_NN.npy` (float32, rows x dim, C order) and the
Gather's output becomes a graph input, which the device fills with `lookup(path, ids)`: one positioned read per
distinct token id, so the table is never resident (weight-only quantization leaves a Gather's table at fp32, which
kept the whole table in the session before).

Manifest (graphs["text_encoder"]["lookups"]): [{"ids": tokenizer ids input, "table": bundle-relative .npy,
"output": the graph input it feeds, "rows": int, "dim": int, "weight": the initializer it was in the exported
graph}, ...]. When Reshapes came between the ids and the Gather (CLIP's view of its ids as (-1, length)), "output"
is `<the Gather's output>.rows` and the graph applies them to the rows.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

LOOKUP_DTYPE = np.dtype("<f4")


class LookupError_(ValueError):
    """A lookup description, table file or token id that cannot be used; the message says why."""


def write_table(path: str, table: np.ndarray) -> None:
    """Save an embedding table (rows x dim) as the lookup reads it: .npy, little-endian float32, C order."""
    t = np.ascontiguousarray(table, dtype=LOOKUP_DTYPE)
    if t.ndim != 2:
        raise LookupError_(f"an embedding table is 2-D (rows x dim), got shape {t.shape}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.save(path, t, allow_pickle=False)


def table_layout(path: str) -> tuple[int, int, int]:
    """(rows, dim, byte offset of row 0) of a table written by write_table; LookupError_ for anything else."""
    try:
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            offset = f.tell()
    except (OSError, ValueError) as e:
        raise LookupError_(f"embedding table {path}: {e}") from e
    if len(shape) != 2 or fortran or np.dtype(dtype) != LOOKUP_DTYPE:
        raise LookupError_(f"embedding table {path}: expected a C-order float32 rows x dim array, found "
                           f"{dtype} {shape}{' (Fortran order)' if fortran else ''}")
    return int(shape[0]), int(shape[1]), offset


def lookup(path: str, ids: np.ndarray) -> np.ndarray:
    """The rows of `ids` (any integer shape) from the table at `path`: float32 of shape ids.shape + (dim,).
    Reads each distinct row once (os.pread); the rest of the table is never read."""
    rows, dim, offset = table_layout(path)
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise LookupError_(f"token ids must be integers, got {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= rows):
        bad = ids[(ids < 0) | (ids >= rows)]
        raise LookupError_(f"token id {int(bad.flat[0])} is outside the embedding table's {rows} rows ({path})")
    uniq, inverse = np.unique(ids.reshape(-1), return_inverse=True)
    got = np.empty((len(uniq), dim), LOOKUP_DTYPE)
    width = dim * LOOKUP_DTYPE.itemsize
    fd = os.open(path, os.O_RDONLY)
    try:
        for k, i in enumerate(uniq.tolist()):
            buf = os.pread(fd, width, offset + i * width)
            if len(buf) != width:
                raise LookupError_(f"embedding table {path} is truncated at row {i}")
            got[k] = np.frombuffer(buf, LOOKUP_DTYPE)
    finally:
        os.close(fd)
    return got[inverse].reshape(*ids.shape, dim).astype(np.float32, copy=False)


def check_lookups(lookups: Any) -> list[dict[str, Any]]:
    """The manifest's lookups list, validated (LookupError_ naming what is wrong)."""
    if not isinstance(lookups, list):
        raise LookupError_(f"text encoder lookups must be a list, got {lookups!r}")
    for d in lookups:
        if not (isinstance(d, dict) and all(isinstance(d.get(k), str) for k in ("ids", "table", "output"))
                and all(isinstance(d.get(k), int) and d[k] > 0 for k in ("rows", "dim"))):
            raise LookupError_(f"bad text encoder lookup {d!r} (ids, table, output: names; rows, dim: sizes)")
    return lookups
