"""Samplers in numpy: flow-matching Euler (FLUX, SD3, Sana, builtin) and DDIM (epsilon models: PixArt).

The model is a callable `predict(latents (B, C, h, w), timestep (B,) on the 0..1000 scale) ->
prediction` (velocity for flow models, noise for epsilon models); classifier-free guidance is the
caller's business (see edge_runtime.generate). The manifest's `model.sampler` says which sampler
and its parameters (the compiler reads them from the pipeline's scheduler_config.json).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from . import flow
from .noise import alphas_cumprod, flow_timestep

Predict = Callable[[np.ndarray, np.ndarray], np.ndarray]


def flow_sigmas(steps: int, cfg: dict[str, Any], image_tokens: int) -> np.ndarray:
    """steps + 1 noise levels from 1 to 0: the scheduler's static shift, or FLUX's dynamic shift.

    Dynamic: mu = linear in the image token count between (base_seq_len, base_shift) and
    (max_seq_len, max_shift); sigma' = e^mu / (e^mu + 1/sigma - 1) (as FlowMatchEulerDiscreteScheduler
    with use_dynamic_shifting and the FLUX pipeline's calculate_shift).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    s = np.linspace(1.0, 0.0, steps + 1)
    if cfg.get("spacing") == "scheduler":
        # the scheduler's own spacing (SD3's pipeline passes no sigmas): from 1 to the scheduler's
        # smallest training sigma (already shifted when the shift is static), then shifted again
        n_train = int(cfg.get("num_train_timesteps", 1000))
        lo = 1.0 / n_train
        if not cfg.get("dynamic_shift"):
            lo = float(flow.shift_sigma(np.array([lo]), float(cfg.get("shift", 1.0)))[0])
        s = np.concatenate([np.linspace(1.0, lo, steps), [0.0]])
    if cfg.get("dynamic_shift"):
        b0, b1 = cfg["base_seq_len"], cfg["max_seq_len"]
        m = (cfg["max_shift"] - cfg["base_shift"]) / (b1 - b0)
        mu = image_tokens * m + (cfg["base_shift"] - m * b0)
        with np.errstate(divide="ignore"):
            out = math.exp(mu) / (math.exp(mu) + (1.0 / s[:-1] - 1.0))
        return np.concatenate([out, [0.0]])
    return flow.shifted(s, float(cfg.get("shift", 1.0)))


def sample_flow(predict: Predict, noise: np.ndarray, steps: int, cfg: dict[str, Any], image_tokens: int,
                on_step: Callable[[int, int], None] | None = None) -> np.ndarray:
    x = noise.astype(np.float32)
    sig = flow_sigmas(steps, cfg, image_tokens)
    for i in range(steps):
        t = np.full((x.shape[0],), flow_timestep(sig[i]), dtype=np.float32)
        v = predict(x, t)
        x = flow.euler_step(x, v, float(sig[i]), float(sig[i + 1])).astype(np.float32)
        if on_step:
            on_step(i + 1, steps)
    return x


def ddim_timesteps(steps: int, cfg: dict[str, Any]) -> np.ndarray:
    """'leading' spacing as DDIMScheduler: (0, k, 2k, ...) + steps_offset, descending."""
    n = int(cfg.get("num_train_timesteps", 1000))
    if not 1 <= steps <= n:
        raise ValueError(f"steps must be in [1, {n}], got {steps}")
    ratio = n // steps
    ts = (np.arange(0, steps) * ratio).round()[::-1].astype(np.int64) + int(cfg.get("steps_offset", 0))
    return np.clip(ts, 0, n - 1)


def sample_ddim(predict: Predict, noise: np.ndarray, steps: int, cfg: dict[str, Any],
                on_step: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Deterministic DDIM (eta 0) with an epsilon-predicting model."""
    ab = alphas_cumprod(cfg)
    final = 1.0 if cfg.get("set_alpha_to_one", True) else float(ab[0])
    ts = ddim_timesteps(steps, cfg)
    ratio = int(cfg.get("num_train_timesteps", 1000)) // steps
    x = noise.astype(np.float32)
    for i, k in enumerate(ts):
        eps = predict(x, np.full((x.shape[0],), float(k), dtype=np.float32))
        a_t = ab[k]
        prev = k - ratio
        a_prev = ab[prev] if prev >= 0 else final
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        x = (math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps).astype(np.float32)
        if on_step:
            on_step(i + 1, steps)
    return x


def sample(predict: Predict, noise: np.ndarray, steps: int, cfg: dict[str, Any], image_tokens: int,
           on_step: Callable[[int, int], None] | None = None) -> np.ndarray:
    kind = cfg.get("kind", "flow_euler")
    if kind == "flow_euler":
        return sample_flow(predict, noise, steps, cfg, image_tokens, on_step)
    if kind == "ddim":
        return sample_ddim(predict, noise, steps, cfg, on_step)
    raise ValueError(f"unknown sampler {kind!r} (flow_euler, ddim)")


def initial_noise(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """The starting noise of a generation with `seed`: the one rule the daemon and host-side generation share,
    so one seed gives one image wherever it is drawn."""
    return np.random.default_rng(int(seed)).standard_normal(shape).astype(np.float32)
