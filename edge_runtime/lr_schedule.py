"""The learning rate of each optimizer step of a job: a linear warmup, then constant, cosine or linear decay
(the shapes diffusers' and kohya's trainers offer). A function of the step alone, so a job resumed from a
checkpoint continues the same schedule; the daemon, both trainer backends and the docs read it from here."""

from __future__ import annotations

import math

LR_SCHEDULES = ("constant", "cosine", "linear")


def check_schedule(kind: str, warmup_steps: int, steps: int) -> None:
    """ValueError naming what is wrong with a schedule for a job of `steps` steps."""
    if kind not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {kind!r}")
    if not 0 <= int(warmup_steps) <= int(steps):
        raise ValueError(f"warmup_steps must be in [0, steps={steps}], got {warmup_steps}")


def lr_at(step: int, steps: int, base: float, kind: str = "constant", warmup_steps: int = 0) -> float:
    """The learning rate of optimizer step `step` (0-based) of `steps`. Warmup: base * (step + 1) / warmup_steps
    for the first warmup_steps steps (the first step already learns). After it, with p the share of the
    remaining steps done before this one: constant base; cosine base * (1 + cos(pi p)) / 2; linear base * (1 - p).
    Decays never reach 0 within the job (the last step's p is below 1)."""
    if step < warmup_steps:
        return base * (step + 1) / warmup_steps
    if kind == "constant":
        return base
    p = (step - warmup_steps) / max(1, steps - warmup_steps)
    if kind == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * p))
    if kind == "linear":
        return base * (1.0 - p)
    raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {kind!r}")
