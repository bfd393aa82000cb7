"""The LoRA adapter file, one format everywhere (numpy + safetensors only): the daemon's store, ExportAdapter,
`edgeblock generate --adapter` and a diffusers pipeline's `load_lora_weights(path)` all read the same file.

A PEFT/diffusers LoRA safetensors file: tensors `transformer.<module path>.lora_A.weight` / `.lora_B.weight`
(fp32 or fp16) and the metadata
- `format`: "pt" (what safetensors' torch loader expects),
- `lora_adapter_metadata`: the LoRA config diffusers builds its `LoraConfig` from (`transformer.r`,
  `transformer.lora_alpha`, `transformer.target_modules`: the full module paths that carry LoRA),
- `edgeblock`: JSON of edgeblock's own record (format version, bundle sha256, token, class noun, the
  training settings, ...), which diffusers ignores.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FORMAT = "edgeblock-lora/2"
PREFIX = "transformer."  # diffusers' name of the component the LoRA belongs to
DIFFUSERS_KEY = "lora_adapter_metadata"
EDGEBLOCK_KEY = "edgeblock"
DTYPES = {"fp32": np.float32, "fp16": np.float16}
_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


class AdapterFileError(ValueError):
    """Not a LoRA adapter this runtime can read: the message says what is wrong."""


@dataclass
class AdapterFile:
    """LoRA tensors by module path (no `transformer.` prefix, float32), their rank and alpha, edgeblock's record."""

    weights: dict[str, np.ndarray]
    rank: int
    alpha: float
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def modules(self) -> list[str]:
        """The module paths that carry LoRA (diffusers' target_modules)."""
        return sorted({_module_of(k) for k in self.weights})

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _module_of(name: str) -> str:
    for s in _SUFFIXES:
        if name.endswith(s):
            return name[: -len(s)]
    raise AdapterFileError(f"tensor {name!r} is not a LoRA tensor (<module>.lora_A.weight or <module>.lora_B.weight)")


def _check(weights: Mapping[str, np.ndarray]) -> int:
    """Every module has both LoRA tensors with one rank; returns the rank."""
    if not weights:
        raise AdapterFileError("an adapter needs at least one LoRA tensor")
    ranks = set()
    for m in {_module_of(k) for k in weights}:
        a, b = weights.get(m + _SUFFIXES[0]), weights.get(m + _SUFFIXES[1])
        if a is None or b is None:
            raise AdapterFileError(f"module {m}: needs both lora_A and lora_B")
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise AdapterFileError(f"module {m}: lora_A {a.shape} and lora_B {b.shape} do not share a rank")
        ranks.add(int(a.shape[0]))
    if len(ranks) != 1:
        raise AdapterFileError(f"the adapter's modules have different ranks {sorted(ranks)}")
    return ranks.pop()


def encode(weights: Mapping[str, np.ndarray], alpha: float, info: Mapping[str, Any] | None = None,
           dtype: str = "fp32") -> bytes:
    """The adapter file's bytes for LoRA tensors keyed by module path (`<module>.lora_A.weight`)."""
    import safetensors.numpy

    if dtype not in DTYPES:
        raise AdapterFileError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    weights = {k.removeprefix(PREFIX): np.asarray(v) for k, v in weights.items()}
    rank = _check(weights)
    lora = {f"{PREFIX}r": rank, f"{PREFIX}lora_alpha": float(alpha),
            f"{PREFIX}target_modules": sorted({_module_of(k) for k in weights})}
    record = {**dict(info or {}), "format": FORMAT, "rank": rank, "alpha": float(alpha), "dtype": dtype}
    meta = {"format": "pt", DIFFUSERS_KEY: json.dumps(lora, sort_keys=True), EDGEBLOCK_KEY: json.dumps(record, sort_keys=True)}
    tensors = {PREFIX + k: np.ascontiguousarray(v, DTYPES[dtype]) for k, v in sorted(weights.items())}
    return safetensors.numpy.save(tensors, metadata=meta)


def _header_metadata(data: bytes) -> dict[str, str]:
    """The safetensors header's __metadata__ (safetensors.numpy.load does not return it)."""
    if len(data) < 8:
        raise AdapterFileError("not a safetensors file (shorter than its header length)")
    n = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFileError(f"not a safetensors file (header: {e})") from e
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return dict(meta or {})


def decode(data: bytes, default_alpha: float | None = None) -> AdapterFile:
    """Read an adapter file's bytes. Besides this format it reads edgeblock's earlier adapter files (the store's,
    the host's `edgeblock-lora/1` and the first ExportAdapter files) and LoRA files diffusers wrote for a
    transformer; where a file records no alpha, default_alpha (or alpha = rank) is used."""
    import safetensors.numpy

    meta = _header_metadata(data)
    try:
        tensors = safetensors.numpy.load(data)
    except Exception as e:  # safetensors raises its own error type for a corrupt file
        raise AdapterFileError(f"not a readable safetensors file ({e})") from e
    weights = {}
    for k, v in tensors.items():
        if "." in k and k.split(".", 1)[0] in ("text_encoder", "text_encoder_2", "unet"):
            raise AdapterFileError(f"tensor {k!r}: only transformer LoRA is supported")
        weights[k.removeprefix(PREFIX)] = np.asarray(v, np.float32)
    rank = _check(weights)
    info: dict[str, Any] = {}
    alpha = None
    if EDGEBLOCK_KEY in meta:
        info = json.loads(meta[EDGEBLOCK_KEY])
    if DIFFUSERS_KEY in meta:
        lora = json.loads(meta[DIFFUSERS_KEY])
        alpha = lora.get(f"{PREFIX}lora_alpha", lora.get("lora_alpha"))
        r = lora.get(f"{PREFIX}r", lora.get("r"))
        if r is not None and int(r) != rank:
            raise AdapterFileError(f"the metadata's rank {r} differs from the tensors' rank {rank}")
    elif meta.get("format") == "edgeblock-lora/1" and "lora" in meta:  # the host's first format
        alpha = json.loads(meta["lora"]).get("alpha")
        info = json.loads(meta.get("info") or "{}")
    elif "lora_alpha" in meta and meta["lora_alpha"]:  # the first ExportAdapter files
        alpha = float(meta["lora_alpha"])
    if alpha is None:
        alpha = default_alpha if default_alpha is not None else rank
    return AdapterFile(weights, rank, float(alpha), info)


def save(path: str, weights: Mapping[str, np.ndarray], alpha: float, info: Mapping[str, Any] | None = None,
         dtype: str = "fp32") -> None:
    from .fileio import atomic_write

    atomic_write(path, encode(weights, alpha, info, dtype))


def load(path: str, default_alpha: float | None = None) -> AdapterFile:
    if not os.path.isfile(path):
        raise AdapterFileError(f"no adapter file {path}")
    with open(path, "rb") as f:
        data = f.read()
    try:
        return decode(data, default_alpha)
    except AdapterFileError as e:
        raise AdapterFileError(f"{path}: {e}") from e
