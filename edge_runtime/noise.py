"""Noise schedules and training-time noising, written once for the device and the host (numpy-only).

Flow matching (FLUX, SD3, Sana, builtin): x_t = (1 - t) x0 + t eps, target eps - x0, t logit-normal.
Epsilon / DDPM (PixArt): x_t = sqrt(abar_k) x0 + sqrt(1 - abar_k) eps, target eps, step k uniform.
t in [0, 1] is the noise level (1 = pure noise) the patch schedule reads; the timestep is what the model
reads (0..1000 scale). Every rule takes Python floats, numpy arrays or torch tensors (duck-typed: no torch
import) and takes its random numbers as arguments: the caller draws them from its own generator.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

TIMESTEP_SCALE = 1000.0  # a flow model's timestep is t on the 0..1000 scale
BETA_SCHEDULES = ("linear", "scaled_linear")


# ---------------------------------------------------------------------------------------------
# Arithmetic on floats, numpy arrays and torch tensors alike
# ---------------------------------------------------------------------------------------------
def _is_scalar(x: Any) -> bool:
    return isinstance(x, (int, float))  # np.float64 is a float


def sigmoid(x):
    """1 / (1 + e^-x): math for Python floats, the tensor's own sigmoid for torch, numpy otherwise."""
    if _is_scalar(x):
        return 1.0 / (1.0 + math.exp(-x))
    if hasattr(x, "sigmoid"):
        return x.sigmoid()
    return 1.0 / (1.0 + np.exp(-x))


def _sqrt(x):
    if _is_scalar(x):
        return math.sqrt(x)
    return x.sqrt() if hasattr(x, "sqrt") else np.sqrt(x)


def _round_int(x):
    """Nearest integer (ties to even, as torch.round and np.rint): int, int64 array or long tensor."""
    if _is_scalar(x):
        return int(round(x))
    if hasattr(x, "long"):
        return x.round().long()
    return np.rint(x).astype(np.int64)


def per_sample(v, x):
    """v as a per-sample factor of the batch x: a scalar as is, a (B,) vector as (B, 1, ..., 1)."""
    if _is_scalar(v):
        return v
    return v.reshape((-1,) + (1,) * (x.ndim - 1))


# ---------------------------------------------------------------------------------------------
# The rules
# ---------------------------------------------------------------------------------------------
def flow_noisy(x0, eps, t):
    """Flow matching's x_t = (1 - t) x0 + t eps, for one t or one per sample."""
    t = per_sample(t, x0)
    return (1.0 - t) * x0 + t * eps


def flow_target(x0, eps):
    """Flow matching's velocity target eps - x0."""
    return eps - x0


def flow_timestep(t):
    """The timestep a flow model reads for noise level t."""
    return t * TIMESTEP_SCALE


def logit_normal(z, mean: float = 0.0, std: float = 1.0):
    """Noise levels sigmoid(mean + std z) from standard normal z (SD3's training distribution; mean ln s is
    the static time shift s)."""
    return sigmoid(mean + std * z)


def ddpm_noisy(x0, eps, alpha_bar):
    """DDPM's x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, for one abar or one per sample."""
    ab = per_sample(alpha_bar, x0)
    return _sqrt(ab) * x0 + _sqrt(1 - ab) * eps


def ddpm_target(x0, eps):
    """An epsilon model's target: the noise."""
    return eps


@functools.lru_cache(maxsize=16)
def _alphas_cumprod(n: int, beta_start: float, beta_end: float, kind: str) -> np.ndarray:
    if kind == "scaled_linear":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
    elif kind == "linear":
        betas = np.linspace(beta_start, beta_end, n, dtype=np.float64)
    else:
        raise ValueError(f"beta_schedule {kind!r} not supported ({', '.join(BETA_SCHEDULES)})")
    out = np.cumprod(1.0 - betas)
    out.flags.writeable = False  # cached: shared by every caller
    return out


def alphas_cumprod(cfg: dict[str, Any]) -> np.ndarray:
    """abar_k = prod_{j <= k} (1 - beta_j), float64, from a scheduler config (num_train_timesteps, beta_start,
    beta_end, beta_schedule; diffusers' defaults where absent). Read-only."""
    return _alphas_cumprod(int(cfg.get("num_train_timesteps", 1000)), float(cfg.get("beta_start", 1e-4)),
                           float(cfg.get("beta_end", 0.02)), str(cfg.get("beta_schedule", "linear")))


# ---------------------------------------------------------------------------------------------
# The schedules: what the manifest's `scheduler` records and the host's objectives extend
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FlowMatching:
    """Flow matching; level(z) takes a standard normal draw z."""

    kind: str = "flow"
    logit_mean: float = 0.0
    logit_std: float = 1.0

    def level(self, z):
        return logit_normal(z, self.logit_mean, self.logit_std)

    def timestep(self, t):
        return flow_timestep(t)

    def noisy(self, x0, eps, t):
        return flow_noisy(x0, eps, t)

    def target(self, x0, eps, t=None):
        return flow_target(x0, eps)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class EpsilonDDPM:
    """DDPM with an epsilon model; level(k) takes a step k drawn uniformly from 0 .. num_train_timesteps - 1."""

    kind: str = "epsilon"
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"

    def alphas_cumprod(self) -> np.ndarray:
        return alphas_cumprod(self.to_dict())

    def level(self, k):
        """The noise level of step k: k / (n - 1)."""
        return k / (self.num_train_timesteps - 1)

    def step(self, t):
        """The step of noise level t: round(t (n - 1))."""
        return _round_int(t * (self.num_train_timesteps - 1))

    def timestep(self, t):
        """The timestep the model reads: the step, as a float."""
        k = self.step(t)
        if isinstance(k, int):
            return float(k)
        return k.float() if hasattr(k, "float") else k.astype(np.float32)

    def alpha_bar(self, t):
        """abar at the step of t: a float for a float t (float64), else one per sample in t's dtype."""
        ab = self.alphas_cumprod()
        k = self.step(t)
        if isinstance(k, int):
            return float(ab[k])
        if hasattr(t, "new_tensor"):  # torch: the table in t's dtype and device, then the rows
            return t.new_tensor(ab)[k]
        return ab[k].astype(np.asarray(t).dtype)

    def noisy(self, x0, eps, t):
        return ddpm_noisy(x0, eps, self.alpha_bar(t))

    def target(self, x0, eps, t=None):
        return ddpm_target(x0, eps)

    def to_dict(self) -> dict:
        return asdict(self)


Schedule = FlowMatching | EpsilonDDPM
SCHEDULES: dict[str, type] = {"flow": FlowMatching, "epsilon": EpsilonDDPM}


def schedule_from_dict(d: dict[str, Any]) -> Schedule:
    """The schedule a manifest's `scheduler` (a schedule's to_dict()) records; unknown keys are ignored."""
    kind = d.get("kind", "flow")
    if kind not in SCHEDULES:
        raise ValueError(f"scheduler kind {kind!r} is not one of {', '.join(SCHEDULES)}")
    cls = SCHEDULES[kind]
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})
