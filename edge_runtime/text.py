"""Prompt encoding on the device: the bundle's tokenizer files + text_encoder.onnx or its parts (torch-free).

The compiler describes the text graph in manifest.graphs["text_encoder"]:

    {"path": "text_encoder.onnx",
     "tokenizers": [{"file": "tokenizer/tokenizer.json", "ids": "clip_ids", "mask": null,
                     "max_length": 77, "pad_id": 49407, "pad_token": "<|endoftext|>",
                     "preprocess": "none" | "lower_strip"}, ...],
     "outputs": ["text", "pooled"] (and/or "mask")}

A text encoder compiled in parts (`edgeblock compile --text-parts`) has no "path" but "parts":
[{"path": "text_encoder/part_00.onnx", "inputs": [...], "outputs": [...], "bytes": ...}, ...], run in order.
Its token-embedding tables are not in the graphs but "lookups" (edge_runtime/text_lookup.py): each fills a graph
input from a table on disk, row by row, with the rows of the tokenizer's ids.

Each tokenizer pads (right) and truncates to its max_length, exactly as the diffusers pipeline's
`tokenizer(..., padding="max_length", truncation=True)` does; its ids (and attention mask, when
the graph reads one) feed the graph as int64. The graph's outputs are what the prologue reads:
`text` (B, L, D), `pooled` (B, P) when the family has one, `mask` (B, L) float 1/0 when it has one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from . import graph_names as gn
from .text_lookup import LookupError_, check_lookups, lookup
from .weights import FP32, apply_session_settings

PREPROCESS = ("none", "lower_strip")


class TextEncodeError(ValueError):
    """A prompt or a text-encoder description that cannot be used; the message says why."""


def preprocess(prompt: str, how: str) -> str:
    if how == "lower_strip":
        return prompt.lower().strip()
    if how == "none":
        return prompt
    raise TextEncodeError(f"unknown prompt preprocessing {how!r} (known: {', '.join(PREPROCESS)})")


class BundleTokenizer:
    """One tokenizer of the bundle: `tokenizers` file + the pipeline's padding/truncation."""

    def __init__(self, root: str, spec: dict[str, Any]):
        from tokenizers import Tokenizer

        try:
            self.spec = spec
            self.ids_name = spec["ids"]
            self.mask_name = spec.get("mask")
            self.max_length = int(spec["max_length"])
            self.preprocess = spec.get("preprocess", "none")
            path = os.path.join(root, *spec["file"].split("/"))
        except (KeyError, TypeError, ValueError) as e:
            raise TextEncodeError(f"bad tokenizer description {spec!r}: {e}") from e
        if not os.path.isfile(path):
            raise TextEncodeError(f"tokenizer file {spec['file']} is missing from the bundle")
        tok = Tokenizer.from_file(path)
        tok.no_padding()
        tok.no_truncation()
        tok.enable_truncation(max_length=self.max_length)
        tok.enable_padding(direction="right", pad_id=int(spec["pad_id"]), pad_token=str(spec["pad_token"]),
                           length=self.max_length)
        self.tokenizer = tok

    def __call__(self, prompts: list[str]) -> dict[str, np.ndarray]:
        encs = self.tokenizer.encode_batch([preprocess(p, self.preprocess) for p in prompts])
        out = {self.ids_name: np.array([e.ids for e in encs], dtype=np.int64)}
        if self.mask_name:
            out[self.mask_name] = np.array([e.attention_mask for e in encs], dtype=np.int64)
        return out


class TextEncoder:
    """prompts -> {"text", "pooled"?, "mask"?} float32 through the bundle's text_encoder.onnx, or its parts.

    A description with "parts" ([{"path", "inputs", "outputs", ...}], text_encoder/part_NN.onnx) runs them in
    order: the tokenizer feeds go to the first, each part's outputs are carried to the later parts that read
    them, and the final outputs are collected by name. Resident (default): every session opened here and kept.
    streamed: each session is opened for its own run and released after it (edge_runtime.memstat.trim_heap), so
    encoding peaks near the largest part instead of the whole encoder.
    """

    def __init__(self, root: str, desc: dict[str, Any], providers: list[str] | None = None,
                 weights: str | Callable[[str], str] = FP32, streamed: bool = False):
        """`weights`: the graphs' weight precision (the manifest's weight_precision), or a function of a graph key
        ("text_encoder", "text_encoder/part_00", ...) giving it (Manifest.graph_weights), whose ONNX Runtime
        session settings keep quantized weights small (edge_runtime/weights.py)."""
        parts = desc.get("parts") if isinstance(desc, dict) else None
        if (not isinstance(desc, dict) or not desc.get("tokenizers") or ("path" not in desc and not parts)
                or (parts is not None and not _valid_parts(parts))):
            raise TextEncodeError(f"bad text encoder description: {desc!r}")
        self.root, self.desc, self.streamed = root, desc, streamed
        self.providers = providers or ["CPUExecutionProvider"]
        self.tokenizers = [BundleTokenizer(root, t) for t in desc["tokenizers"]]
        try:
            self.lookups = check_lookups(desc.get("lookups", []))
        except LookupError_ as e:
            raise TextEncodeError(str(e)) from e
        for d in self.lookups:
            if not os.path.isfile(os.path.join(root, *d["table"].split("/"))):
                raise TextEncodeError(f"embedding table {d['table']} is missing from the bundle")
        self._weights = weights
        # (graph key, path, inputs or None) per graph run: the parts in order, or the whole encoder
        if parts:
            self.graphs = [(gn.graph_key(p["path"]), p["path"], list(p["inputs"])) for p in parts]
        else:
            self.graphs = [(gn.TEXT_ENCODER, desc["path"], None)]
        self.sessions = [] if streamed else [self._open(k, p) for k, p, _ in self.graphs]
        if parts:
            self.inputs = list(dict.fromkeys(n for _, _, ins in self.graphs for n in ins))
            self.outputs = list(desc.get("outputs") or parts[-1]["outputs"])
        elif streamed:
            self.inputs, self.outputs = list(desc.get("inputs") or []), list(desc.get("outputs") or [])
        else:
            self.inputs = [i.name for i in self.sessions[0].get_inputs()]
            self.outputs = [o.name for o in self.sessions[0].get_outputs()]

    @property
    def session(self):
        """The whole encoder's session (resident, bundles without parts)."""
        return self.sessions[0] if len(self.graphs) == 1 and self.sessions else None

    def _open(self, key: str, rel: str):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        # No CPU memory arena, as Bundle._open's chain graphs. An encoder session with ONNX Runtime's arena, opened
        # before the chain's sessions, made every chain graph keep ~165 MiB after its first run (the 120M bench
        # scale bundle, fp32: one resident generation after encoding a prompt peaked at 2170 MiB, 1298 MiB with
        # the encoder's arena off; a daemon's resident generation after a job 1927 MiB, 1173 MiB fresh).
        opts.enable_cpu_mem_arena = False
        if self.streamed and len(self.graphs) > 1:
            # parts streamed: no packed weight copies either, as the chain graphs (other MatMul kernels: ~1e-6
            # relative); a whole encoder keeps its MatMul kernels
            opts.add_session_config_entry("session.disable_prepacking", "1")
        weights = self._weights(key) if callable(self._weights) else self._weights
        apply_session_settings(opts, weights, ort)
        return ort.InferenceSession(os.path.join(self.root, *rel.split("/")), opts, providers=self.providers)

    def feeds(self, prompts: list[str]) -> dict[str, np.ndarray]:
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise TextEncodeError(f"prompts must be a non-empty list of strings, got {prompts!r}")
        feeds: dict[str, np.ndarray] = {}
        for t in self.tokenizers:
            feeds.update(t(list(prompts)))
        for d in self.lookups:  # the token embeddings the graphs read instead of a Gather over a resident table
            if d["ids"] not in feeds:
                raise TextEncodeError(f"embedding lookup {d['table']}: no tokenizer gives ids {d['ids']!r}")
            try:
                feeds[d["output"]] = lookup(os.path.join(self.root, *d["table"].split("/")), feeds[d["ids"]])
            except LookupError_ as e:
                raise TextEncodeError(str(e)) from e
        return {k: v for k, v in feeds.items() if k in self.inputs or not self.inputs}

    def encode(self, prompts: list[str]) -> dict[str, np.ndarray]:
        acc: dict[str, Any] = self.feeds(prompts)
        last: dict[str, int] = {}  # tensor -> the last graph that reads it (dropped after it)
        for j, (_, _, ins) in enumerate(self.graphs):
            for n in ins or ():
                last[n] = j
        for j, (key, rel, ins) in enumerate(self.graphs):
            sess = self.sessions[j] if self.sessions else self._open(key, rel)
            try:
                names = ins if ins is not None else [i.name for i in sess.get_inputs()]
                missing = [n for n in names if n not in acc]
                if missing:
                    raise TextEncodeError(f"text encoder graph {rel}: no value for inputs {missing}")
                produced = [o.name for o in sess.get_outputs()]
                # copies (not views that keep this run's memory alive past the session: see encode's return)
                acc.update(zip(produced, (np.array(v, copy=True) for v in sess.run(None, {n: acc[n] for n in names}))))
            finally:
                if not self.sessions:  # streamed: this graph's weights go before the next one's load
                    from .memstat import trim_heap

                    del sess
                    trim_heap()
            for n in [n for n, k in last.items() if k == j and n not in self.outputs]:
                acc.pop(n, None)
        outputs = self.outputs or produced  # a description naming no outputs: the (last) graph's
        missing = [n for n in outputs if n not in acc]
        if missing:
            raise TextEncodeError(f"text encoder: the graphs produced no {missing}")
        # copies: ONNX Runtime's output arrays are views that keep the memory block of the run they came from
        # alive (measured: ~95 MiB for MiniLM's two prompts) for as long as the prompt encodings are held
        return {n: np.array(acc[n], dtype=np.float32, copy=True) for n in outputs}


def _valid_parts(parts: Any) -> bool:
    return isinstance(parts, list) and bool(parts) and all(
        isinstance(p, dict) and isinstance(p.get("path"), str) and isinstance(p.get("inputs"), list)
        and isinstance(p.get("outputs"), list) for p in parts)
