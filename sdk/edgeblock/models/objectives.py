"""The training objectives of the schedulers the DiT families ship with: edge_runtime.noise's schedules
(the noising, targets, noise-level distributions and timesteps the device uses too) plus torch draws.

Flow matching (FLUX, SD3, Sana): x_t = (1 - t) x0 + t eps, target eps - x0, logit-normal t.
Epsilon / DDPM (PixArt): x_t = sqrt(abar_k) x0 + sqrt(1 - abar_k) eps, target eps, uniform step k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from edge_runtime import noise


@dataclass(frozen=True)
class FlowMatching(noise.FlowMatching):
    def sample_t(self, g: torch.Generator, n: int) -> Tensor:
        """n logit-normal noise levels (SD3's training distribution)."""
        return self.level(torch.randn(n, generator=g))


@dataclass(frozen=True)
class EpsilonDDPM(noise.EpsilonDDPM):
    def sample_t(self, g: torch.Generator, n: int) -> Tensor:
        """n noise levels of uniformly drawn DDPM steps."""
        return self.level(torch.randint(0, self.num_train_timesteps, (n,), generator=g).float())


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
