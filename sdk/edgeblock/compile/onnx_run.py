"""Running exported graphs in ONNX Runtime and comparing them with torch: sessions, the chain, errors.

Relative error is max|onnx - torch| / max|torch| per output (elementwise relative error is meaningless
near zero).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor

from edge_runtime import graph_names as gn
from edge_runtime.patch_sampling import with_grid_crop

from .graph_spec import GraphSpec


def _np(t: Any) -> np.ndarray:
    if isinstance(t, Tensor):
        return t.detach().cpu().numpy()
    return np.asarray(t)


def session(path: str, providers: Sequence[str] = ("CPUExecutionProvider",), threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(path, sess_options=opts, providers=list(providers))


def run_onnx(sess_or_path: Any, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Run a graph on the feeds it needs (`feeds` may hold more); returns outputs by name."""
    sess = session(sess_or_path) if isinstance(sess_or_path, (str, os.PathLike)) else sess_or_path
    wanted = [i.name for i in sess.get_inputs()]
    feeds = with_grid_crop(wanted, feeds)
    missing = [n for n in wanted if n not in feeds]
    if missing:
        raise KeyError(f"graph inputs {missing} not in the feeds (have {sorted(feeds)})")
    outs = sess.run(None, {n: _np(feeds[n]) for n in wanted})
    return dict(zip([o.name for o in sess.get_outputs()], outs))


@dataclass
class VerifyResult:
    max_abs: float  # max |onnx - torch| over all outputs
    max_rel: float  # max over outputs of max|onnx - torch| / max|torch|
    per_output: dict[str, tuple[float, float]]

    def ok(self, rel: float = 1e-4) -> bool:
        return self.max_rel <= rel


def compare(got: Mapping[str, Any], expected: Mapping[str, Any]) -> VerifyResult:
    per: dict[str, tuple[float, float]] = {}
    for n, ref in expected.items():
        r = _np(ref).astype(np.float64)
        g = _np(got[n]).astype(np.float64)
        if r.shape != g.shape:
            raise ValueError(f"{n}: onnx shape {g.shape} != torch shape {r.shape}")
        a = float(np.abs(g - r).max()) if r.size else 0.0
        scale = float(np.abs(r).max()) if r.size else 0.0
        per[n] = (a, a / scale if scale > 0 else a)
    return VerifyResult(max((v[0] for v in per.values()), default=0.0), max((v[1] for v in per.values()), default=0.0), per)


def verify(path: str, feeds: Mapping[str, Any], expected: Mapping[str, Any], providers: Sequence[str] = ("CPUExecutionProvider",)) -> VerifyResult:
    """Run `path` in ONNX Runtime on `feeds` and compare with the torch outputs `expected` (by output name).

    Relative error is max|onnx - torch| / max|torch| per output (elementwise
    relative error is meaningless near zero); both maxima are over all outputs.
    """
    got = run_onnx(session(path, providers), feeds)
    return compare(got, expected)


def run_chain(
    specs: Sequence[GraphSpec], feeds: Mapping[str, Any], sessions: dict[str, Any] | None = None
) -> dict[str, np.ndarray]:
    """Run graphs in order (prologue, groups / infer graphs, epilogue) in ONNX Runtime.

    Each graph takes what it needs from the accumulated feeds; `out.<slot>` becomes
    `state.<slot>` for the next, and a stream a graph ended (SD3) is dropped.
    LoRA inputs of infer graphs are looked up in `feeds` by their published names.
    Returns all accumulated tensors (`prediction` after the epilogue).
    """
    acc: dict[str, Any] = dict(feeds)
    cache = sessions if sessions is not None else {}
    for spec in specs:
        sess = cache.get(spec.path)
        if sess is None:
            sess = cache[spec.path] = session(spec.path)
        out = run_onnx(sess, acc)
        gn.fold_outputs(acc, out, spec.state_in, spec.state_out)
    return acc
