"""The trainable blocks' base weights on the grid of their inference graphs' integer precision.

Under `edgeblock compile --weights int4` the trainable runs' inference graphs (generation, the job's frozen pass)
hold their weights at int8 (edge_runtime.weights.graph_precision). An adapter learns against the base it is trained
on, so compile makes that base the quantized one before any graph is exported: each weight the quantizer will
rewrite (a Linear's 2-D weight of at least MIN_ELEMENTS) becomes the fp32 values of its own codes (quantize, then
dequantize, in the quantizer's layout). The training artifacts hold those values in fp32, the training precision,
and LoRA trains in fp32 against exactly the base that generation computes; quantizing an on-grid weight again gives
back its codes, so compile's error for those graphs is at float rounding level (docs/compile.md, Weights). An fp16
graph (the trainable runs under int8 and fp16) moves its base by ~1e-4 and keeps the fp32 base.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from edge_runtime.weights import FP16, FP32, INT4_BLOCK_SIZE, INT8, TRAINED, check_weights, graph_precision

from .quantize import MIN_ELEMENTS, dequantize_int4, dequantize_int8, pack_int4, quantize_int8


def grid_values(w: np.ndarray, precision: str, block_size: int = INT4_BLOCK_SIZE) -> np.ndarray:
    """The values a MatMul weight w (K, N) takes once compile stores it at `precision` (float32, same shape):
    fp16 rounding, int8 codes per output column times their scale, int4 codes per block of `block_size` along K
    (MatMulNBits' layout, rounded to nearest) less their zero point, times their scale."""
    check_weights(precision)
    w = np.asarray(w, np.float32)
    if precision == FP32:
        return w.copy()
    if precision == FP16:
        return w.astype(np.float16).astype(np.float32)
    if precision == INT8:
        return dequantize_int8(*quantize_int8(w))
    return dequantize_int4(*pack_int4(w, block_size), w.shape[0])


def _gridded(module: nn.Module):
    """(name, Linear) of the layers whose weights compile quantizes: 2-D, at least MIN_ELEMENTS."""
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear) and m.weight.dim() == 2 and m.weight.numel() >= MIN_ELEMENTS:
            yield name, m


def _grid_tensor(w: torch.Tensor, precision: str, block_size: int = INT4_BLOCK_SIZE) -> torch.Tensor:
    """grid_values of a Linear's weight (N, K), the MatMul weight (K, N) transposed; w's dtype and device."""
    g = grid_values(w.detach().to(torch.float32).cpu().numpy().T, precision, block_size).T
    return torch.from_numpy(np.ascontiguousarray(g)).to(dtype=w.dtype, device=w.device)


def on_grid(module: nn.Module, precision: str, block_size: int = INT4_BLOCK_SIZE) -> int:
    """Put the weights of `module`'s Linear layers that compile quantizes onto the `precision` grid, in place;
    returns how many."""
    n = 0
    for _, m in _gridded(module):
        m.weight.data = _grid_tensor(m.weight, precision, block_size)
        n += 1
    return n


def trained_on_grid(weights: str) -> bool:
    """Does a bundle compiled with `--weights weights` train its blocks on their inference graphs' grid?"""
    return graph_precision(weights, TRAINED) not in (FP32, FP16)


def base_rounding(weights: str) -> Callable[[nn.Module], int] | None:
    """What compile applies to each trainable block as it is built (DiTAdapter.set_base_rounding) in a bundle compiled
    with `--weights weights`: its base onto the int8 / int4 grid of its inference graphs; None where those are fp32 or
    fp16 (the fp32 base)."""
    if not trained_on_grid(weights):
        return None
    precision = graph_precision(weights, TRAINED)
    return lambda module: on_grid(module, precision)


def grid_move(adapter, blocks, weights: str) -> dict:
    """How far compile's rounding moves the trainable blocks' base from the stored weights (each block's weights read
    once): {"precision", "matrices", "rel_error": max over the moved weights of ||w - grid(w)|| / ||w||}."""
    precision = graph_precision(weights, TRAINED)
    worst, n = 0.0, 0
    for i in blocks:
        stored = adapter.weights.load(adapter.block_names[i])
        for name, _ in _gridded(adapter.skeleton_block(i)):
            w = stored[f"{name}.weight"].to(torch.float64)
            d = torch.linalg.vector_norm(w - _grid_tensor(w, precision)) / torch.linalg.vector_norm(w).clamp_min(1e-30)
            worst, n = max(worst, float(d)), n + 1
    return {"precision": precision, "matrices": n, "rel_error": worst}
