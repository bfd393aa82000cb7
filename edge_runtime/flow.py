"""Flow-matching sampling helpers shared by the device and the host (numpy-only): sampling noise
levels and their time shift, the Euler step, FLUX-style packing into patch tokens and position ids.

t in [0, 1] with 1 = pure noise; the training-time noising and targets are edge_runtime.noise's.
pack/unpack also accept torch tensors (duck-typed; no torch import).
"""
from __future__ import annotations

import numpy as np


def shift_sigma(s, shift: float = 1.0):
    """Time shift s' = shift * s / (1 + (shift - 1) * s)."""
    return shift * s / (1.0 + (shift - 1.0) * s)


def sigmas(num_steps: int, shift: float = 1.0) -> np.ndarray:
    """num_steps + 1 noise levels from 1 down to 0 (float64)."""
    if num_steps < 1:
        raise ValueError("num_steps must be >= 1")
    return shifted(np.linspace(1.0, 0.0, num_steps + 1), shift)


def shifted(s: np.ndarray, shift: float = 1.0) -> np.ndarray:
    """Noise levels s (descending, ending at 0) under a static time shift; the final 0 stays 0."""
    return np.concatenate([shift_sigma(s[:-1], shift), [0.0]]) if shift != 1.0 else s


def euler_step(x, v, sigma, sigma_next):
    """One Euler step of dx/dt = v from sigma to sigma_next."""
    return x + (sigma_next - sigma) * v


def _permute(x, axes):
    return x.permute(*axes) if hasattr(x, "permute") else x.transpose(axes)


def pack(images, p: int):
    """(B, C, H, W) -> (B, (H/p)*(W/p), C*p*p), row-major over patches."""
    B, C, H, W = images.shape
    if H % p or W % p:
        raise ValueError(f"image {H}x{W} not divisible by patch {p}")
    x = images.reshape(B, C, H // p, p, W // p, p)
    x = _permute(x, (0, 2, 4, 1, 3, 5))
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def unpack(tokens, C: int, H: int, W: int, p: int):
    """Inverse of pack: (B, N, C*p*p) -> (B, C, H, W)."""
    B = tokens.shape[0]
    x = tokens.reshape(B, H // p, W // p, C, p, p)
    x = _permute(x, (0, 3, 1, 4, 2, 5))
    return x.reshape(B, C, H, W)


def image_ids(h_tokens: int, w_tokens: int) -> np.ndarray:
    """FLUX positional ids (0, row, col) for an h x w token grid: (N, 3) float32."""
    ids = np.zeros((h_tokens, w_tokens, 3), dtype=np.float32)
    ids[..., 1] = np.arange(h_tokens, dtype=np.float32)[:, None]
    ids[..., 2] = np.arange(w_tokens, dtype=np.float32)[None, :]
    return ids.reshape(h_tokens * w_tokens, 3)

