"""Named training recipes of the built-in model, for `train_base --preset NAME`: `v10`, the shipped model
(sdk/edgeblock/builtin/model), and `smoke`, the same recipe at a size that trains in seconds (tests)."""
from __future__ import annotations

from dataclasses import replace

from .train_config import Stage, TrainConfig

# The shipped model. Its run predates the presets: three commands, stopped with --stop-at at steps 2250 and
# 4500 and continued with --resume. A resume starts the random streams afresh from (seed, step), as a stage
# does, so the stage ends at 2250 (no other change) and 4500 (the shapes' share 0.5 -> 0.6) draw as it did.
V10 = TrainConfig(
    steps=100_000, max_minutes=120.0, batch=16, seed=0,
    dim=128, head_dim=64, double=2, single=4,
    lr=0.0015, warmup=200, ema=0.999,
    caption_dropout=0.1, attr_dropout=0.3, fg_weight=4.0, t_shift=3.0,
    low_res=32, low_res_prob=0.5, low_res_ids="grid",
    stages=(Stage(2250, "mix", 0.5), Stage(4500, "mix", 0.5), Stage(None, "mix", 0.6)),
    threads=2, log_every=50, ckpt_every=250,
)

# v10's recipe on a one-head, two-block model, a few steps, no wall-time budget: every code path in seconds
SMOKE = replace(V10, steps=4, max_minutes=None, batch=2, dim=64, double=1, single=1, warmup=1,
                stages=(Stage(2, "mix", 0.5), Stage(None, "mix", 0.6)), threads=1, log_every=1)

PRESETS: dict[str, TrainConfig] = {"v10": V10, "smoke": SMOKE}
DEFAULT = "v10"


def preset(name: str) -> TrainConfig:
    """The named preset's TrainConfig."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; one of {', '.join(PRESETS)}")
    return PRESETS[name]
