"""The trainable blocks' base weights on the grid of the bundle's weight precision.

Under `edgeblock compile --weights fp16|int8|int4` the trainable runs' inference graphs (generation, the job's
frozen pass) hold their weights at the bundle's precision, like the frozen groups. An adapter learns against the
base it is trained on, so compile makes that base the quantized one before any graph is exported: each weight the
quantizer will rewrite (a Linear's 2-D weight of at least MIN_ELEMENTS) becomes the fp32 values of its own codes
(quantize, then dequantize, in the quantizer's layout). The training artifacts hold those values in fp32, the
training precision, and LoRA trains in fp32 against exactly the base that generation computes; quantizing an
on-grid weight again gives back its codes, so compile's error for those graphs is at float rounding level
(docs/quantization.md).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from edge_runtime.weights import FP16, FP32, INT4_BLOCK_SIZE, INT8, check_weights

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


def on_grid(module: nn.Module, precision: str, block_size: int = INT4_BLOCK_SIZE) -> int:
    """Put the weights of `module`'s Linear layers that compile quantizes onto the `precision` grid, in place;
    returns how many. A Linear's weight (N, K) is the MatMul weight (K, N) transposed."""
    n = 0
    for m in module.modules():
        if isinstance(m, nn.Linear) and m.weight.dim() == 2 and m.weight.numel() >= MIN_ELEMENTS:
            w = m.weight.detach()
            g = grid_values(w.to(torch.float32).cpu().numpy().T, precision, block_size).T
            m.weight.data = torch.from_numpy(np.ascontiguousarray(g)).to(dtype=w.dtype, device=w.device)
            n += 1
    return n


def base_rounding(precision: str) -> Callable[[nn.Module], int] | None:
    """What compile applies to each trainable block as it is built (DiTAdapter.set_base_rounding): None at fp32."""
    if check_weights(precision) == FP32:
        return None
    return lambda module: on_grid(module, precision)

