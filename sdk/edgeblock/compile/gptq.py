"""Calibrated int4 rounding for MatMulNBits: each weight row's rounding error is spread over the rows not yet
rounded, weighted by the inverse of the layer's input second moments H = X^T X (the optimal-brain-quantizer
update of GPTQ, Frantar et al. 2022), with the per-block scale and zero point taken from the updated weights.

`input_hessians` runs a frozen graph in ONNX Runtime on calibration feeds and sums X^T X of each MatMul input;
`gptq_int4` rounds one (K, N) weight with it into the MatMulNBits layout of quantize.pack_int4. numpy only.
"""

from __future__ import annotations

import numpy as np

from .quantize import _INT4_MAX, int4_scale_zero

DAMP = 0.01  # added to H's diagonal, times its mean: keeps the inverse stable for directions X never took
_FLOAT64_MAX_K = 4096  # larger K: the (K, K) algebra in float32
_CHUNK_ROWS = 128  # rows rounded between two BLAS updates of the rest (a multiple of every block size <= 128)


def gptq_int4(w: np.ndarray, h: np.ndarray, block_size: int, damp: float = DAMP) -> tuple[np.ndarray, ...]:
    """Round w (K, N) to 4-bit codes in blocks of `block_size` along K, compensating each row's error with the
    input Hessian h (K, K); returns (codes uint8 (N, n_blocks, block_size), scales float32 (N, n_blocks),
    zero points uint8 (N, n_blocks)), dequantized as (code - zero) * scale. An input H never saw (zero
    diagonal, e.g. K's padding) keeps its row, rounded to nearest."""
    k, n = w.shape
    if h.shape != (k, k):
        raise ValueError(f"the Hessian is {h.shape}, the weight has K={k}: expected ({k}, {k})")
    n_blocks = -(-k // block_size)
    kp = n_blocks * block_size
    dtype = np.float64 if kp <= _FLOAT64_MAX_K else np.float32  # a (K, K) float64 of K = 15360 is 1.9 GB
    wt = np.zeros((kp, n), dtype)
    wt[:k] = w
    hh = np.zeros((kp, kp), dtype)
    hh[:k, :k] = h
    dead = np.diagonal(hh) <= 0
    hh[np.flatnonzero(dead), np.flatnonzero(dead)] = 1.0
    u = _upper_cholesky_of_inverse(hh, damp)
    del hh
    codes = np.zeros((kp, n), np.uint8)
    scales = np.ones((n_blocks, n), np.float64)
    zeros = np.zeros((n_blocks, n), np.float64)
    chunk = max(block_size, _CHUNK_ROWS - _CHUNK_ROWS % block_size)
    for c0 in range(0, kp, chunk):
        c1 = min(c0 + chunk, kp)
        wc = wt[c0:c1].copy()
        err = np.zeros_like(wc)
        for i in range(c1 - c0):
            r = c0 + i
            if r % block_size == 0:
                b = r // block_size
                block = wc[i:i + block_size]
                scales[b], zeros[b] = int4_scale_zero(block.min(axis=0), block.max(axis=0))
            b = r // block_size
            q = np.clip(np.round(wc[i] / scales[b]) + zeros[b], 0, _INT4_MAX)
            codes[r] = q.astype(np.uint8)
            e = (wc[i] - (q - zeros[b]) * scales[b]) / u[r, r]
            wc[i + 1:] -= np.outer(u[r, r + 1:c1], e)
            err[i] = e
        if c1 < kp:
            wt[c1:] -= u[c0:c1, c1:].T @ err
    return (np.ascontiguousarray(codes.T.reshape(n, n_blocks, block_size)), scales.T.astype(np.float32),
            zeros.T.astype(np.uint8))


def _upper_cholesky_of_inverse(h: np.ndarray, damp: float) -> np.ndarray:
    """U upper triangular with inv(h + d I) = U^T U, d = damp x the mean of h's diagonal (h symmetric positive
    semi-definite); the damping grows tenfold while the factorization fails (float32 round-off on large K)."""
    idx = np.arange(h.shape[0])
    mean = float(np.mean(np.diagonal(h)))
    added = 0.0
    for _ in range(4):
        h[idx, idx] += damp * mean - added
        added = damp * mean
        try:
            hinv = np.linalg.inv(h)
            hinv += hinv.T
            hinv *= 0.5
            return np.linalg.cholesky(hinv).T
        except np.linalg.LinAlgError:
            damp *= 10
    raise np.linalg.LinAlgError(f"the input Hessian ({h.shape[0]}x{h.shape[0]}) stays singular at damping {damp / 10}")


def input_hessians(model, names: list[str], feeds_list: list[dict[str, np.ndarray]],
                   max_outputs_per_run: int = 8) -> dict[str, np.ndarray]:
    """{name: X^T X (float32, (K, K))} of each tensor in `names` (MatMul inputs, last axis K), summed over every
    token of every calibration feed. The graph runs in ONNX Runtime (CPU) with at most `max_outputs_per_run` of
    those tensors added as outputs at a time, so a large graph never holds them all."""
    import os
    import tempfile

    import onnx
    import onnxruntime as ort

    out: dict[str, np.ndarray] = {}
    graph_inputs = {i.name for i in model.graph.input}
    for feeds in feeds_list:
        for name in names:
            if name in graph_inputs and name in feeds:
                _accumulate(out, name, feeds[name])
    inner = [n for n in dict.fromkeys(names) if n not in graph_inputs]
    if not inner:
        return out
    with tempfile.TemporaryDirectory() as tmp:
        for start in range(0, len(inner), max_outputs_per_run):
            part = inner[start:start + max_outputs_per_run]
            m = onnx.ModelProto()
            m.CopyFrom(model)
            existing = {o.name for o in m.graph.output}
            m.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                                  for n in part if n not in existing)
            path = os.path.join(tmp, f"calib{start}.onnx")
            onnx.save(m, path, save_as_external_data=m.ByteSize() > 1 << 30)
            del m
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            # unoptimized: an optimization that removes a node (a Cast to the type its input has, as Sana's attention
            # exports) would leave its output, which the MatMul reads, unanswered (None)
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            sess = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
            wanted = {i.name for i in sess.get_inputs()}
            for feeds in feeds_list:
                values = sess.run(part, {k: v for k, v in feeds.items() if k in wanted})
                for n, v in zip(part, values):
                    _accumulate(out, n, v)
            del sess
    return out


def _accumulate(out: dict[str, np.ndarray], name: str, x: np.ndarray) -> None:
    x2 = np.asarray(x, np.float32).reshape(-1, x.shape[-1])
    h = x2.T @ x2  # float32 (sgemm): a large model's inputs have K up to ~15k and tens of thousands of tokens
    if name in out:
        out[name] += h
    else:
        out[name] = h
