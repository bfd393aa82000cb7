"""Training targets of the schedulers the DiT families ship with.

Flow matching (FLUX, SD3, Sana): x_t = (1 - t) x0 + t eps, target eps - x0.
Epsilon / DDPM (PixArt): x_t = sqrt(abar_k) x0 + sqrt(1 - abar_k) eps, target eps.
Both expose the noise level t in [0, 1] (1 = pure noise) that the patch
schedule reads, and the timestep on the scheduler's 0..1000 scale the model reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class FlowMatching:
    kind: str = "flow"
    logit_mean: float = 0.0
    logit_std: float = 1.0

    def sample_t(self, g: torch.Generator, n: int) -> Tensor:
        """Logit-normal noise levels (SD3's training distribution)."""
        return torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(n, generator=g))

    def timestep(self, t: Tensor) -> Tensor:
        return t * 1000.0

    def noisy(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        t = t.view(-1, *([1] * (x0.ndim - 1)))
        return (1 - t) * x0 + t * eps

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        return eps - x0

    def to_dict(self) -> dict:
        return {"kind": self.kind, "logit_mean": self.logit_mean, "logit_std": self.logit_std}


@dataclass(frozen=True)
class EpsilonDDPM:
    kind: str = "epsilon"
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"

    def alphas_cumprod(self) -> Tensor:
        n = self.num_train_timesteps
        if self.beta_schedule == "scaled_linear":
            betas = torch.linspace(self.beta_start**0.5, self.beta_end**0.5, n, dtype=torch.float64) ** 2
        elif self.beta_schedule == "linear":
            betas = torch.linspace(self.beta_start, self.beta_end, n, dtype=torch.float64)
        else:
            raise ValueError(f"beta_schedule {self.beta_schedule!r} not supported (linear, scaled_linear)")
        return torch.cumprod(1 - betas, 0).float()

    def sample_t(self, g: torch.Generator, n: int) -> Tensor:
        k = torch.randint(0, self.num_train_timesteps, (n,), generator=g)
        return k.float() / (self.num_train_timesteps - 1)

    def _index(self, t: Tensor) -> Tensor:
        return torch.round(t * (self.num_train_timesteps - 1)).long()

    def timestep(self, t: Tensor) -> Tensor:
        return self._index(t).float()

    def noisy(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        ab = self.alphas_cumprod()[self._index(t)].view(-1, *([1] * (x0.ndim - 1)))
        return ab.sqrt() * x0 + (1 - ab).sqrt() * eps

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        return eps

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "num_train_timesteps": self.num_train_timesteps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "beta_schedule": self.beta_schedule,
        }


Objective = FlowMatching | EpsilonDDPM


def static_shift(config: dict | None) -> float:
    """The static time shift of a flow scheduler config (1.0 when absent, invalid or dynamic: FLUX shifts
    by resolution at sampling time and trains unshifted)."""
    if not config or config.get("use_dynamic_shifting"):
        return 1.0
    shift = float(config.get("shift", 1.0))
    return shift if shift > 0 else 1.0


def objective_from_scheduler(config: dict | None, family: str) -> Objective:
    """Pick the objective from a diffusers scheduler_config.json (or the family's default)."""
    if not config:
        return EpsilonDDPM() if family == "pixart" else FlowMatching()
    name = config.get("_class_name", "")
    pred = config.get("prediction_type", "")
    if "FlowMatch" in name or pred == "flow_prediction" or config.get("use_flow_sigmas"):
        # diffusers' DreamBooth scripts draw logit-normal u and take the scheduler's sigma at it: with a static
        # shift s (SD3: 3.0) that is sigmoid(z + ln s); with dynamic shifting (FLUX) the training sigmas are unshifted
        return FlowMatching(logit_mean=math.log(static_shift(config)))
    if pred in ("", "epsilon"):
        return EpsilonDDPM(
            num_train_timesteps=config.get("num_train_timesteps", 1000),
            beta_start=config.get("beta_start", 0.0001),
            beta_end=config.get("beta_end", 0.02),
            beta_schedule=config.get("beta_schedule", "linear"),
        )
    raise ValueError(f"scheduler {name} with prediction_type={pred!r} is not supported (flow matching or epsilon)")
