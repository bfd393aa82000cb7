"""Prompt encoding on the device: the bundle's tokenizer files + text_encoder.onnx (torch-free).

The compiler describes the text graph in manifest.graphs["text_encoder"]:

    {"path": "text_encoder.onnx",
     "tokenizers": [{"file": "tokenizer/tokenizer.json", "ids": "clip_ids", "mask": null,
                     "max_length": 77, "pad_id": 49407, "pad_token": "<|endoftext|>",
                     "preprocess": "none" | "lower_strip"}, ...],
     "outputs": ["text", "pooled"] (and/or "mask")}

Each tokenizer pads (right) and truncates to its max_length, exactly as the diffusers pipeline's
`tokenizer(..., padding="max_length", truncation=True)` does; its ids (and attention mask, when
the graph reads one) feed the graph as int64. The graph's outputs are what the prologue reads:
`text` (B, L, D), `pooled` (B, P) when the family has one, `mask` (B, L) float 1/0 when it has one.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

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
    """prompts -> {"text", "pooled"?, "mask"?} float32 through the bundle's text_encoder.onnx."""

    def __init__(self, root: str, desc: dict[str, Any], providers: list[str] | None = None, weights: str = FP32):
        """`weights`: the graph's weight precision (the manifest's weight_precision), whose ONNX Runtime session
        settings keep quantized weights small (edge_runtime/weights.py)."""
        import onnxruntime as ort

        if not isinstance(desc, dict) or "path" not in desc or not desc.get("tokenizers"):
            raise TextEncodeError(f"bad text encoder description: {desc!r}")
        self.root, self.desc = root, desc
        self.tokenizers = [BundleTokenizer(root, t) for t in desc["tokenizers"]]
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        apply_session_settings(opts, weights, ort.ExecutionOrder)
        self.session = ort.InferenceSession(os.path.join(root, *desc["path"].split("/")), opts,
                                            providers=providers or ["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def feeds(self, prompts: list[str]) -> dict[str, np.ndarray]:
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise TextEncodeError(f"prompts must be a non-empty list of strings, got {prompts!r}")
        feeds: dict[str, np.ndarray] = {}
        for t in self.tokenizers:
            feeds.update(t(list(prompts)))
        return {k: v for k, v in feeds.items() if k in self.inputs}

    def encode(self, prompts: list[str]) -> dict[str, np.ndarray]:
        outs = self.session.run(None, self.feeds(prompts))
        return {n: np.asarray(v, dtype=np.float32) for n, v in zip(self.outputs, outs)}
