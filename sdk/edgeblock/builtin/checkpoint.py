"""The built-in model's training checkpoint: one file, OUT/ckpt/last.pt by default (out of git), written
atomically; it holds the weights, optimizer state, EMA, loss history, the run's TrainConfig and preset name
(`train_config`, `preset`) and the steps at which the run was resumed (`resumed_at`)."""
from __future__ import annotations

import os

import torch

from .train_config import TrainConfig


def ckpt_path(ckpt_dir: str) -> str:
    return os.path.join(ckpt_dir, "last.pt")


def save_ckpt(ckpt_dir: str, state: dict) -> None:
    os.makedirs(ckpt_dir, exist_ok=True)
    tmp = ckpt_path(ckpt_dir) + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, ckpt_path(ckpt_dir))


def load_ckpt(ckpt_dir: str) -> dict:
    return torch.load(ckpt_path(ckpt_dir), map_location="cpu", weights_only=False)


def recorded_config(st: dict) -> TrainConfig | None:
    """The TrainConfig a checkpoint recorded; None for checkpoints from before presets (they record
    argparse arguments instead)."""
    d = st.get("train_config")
    return TrainConfig.from_dict(d) if d is not None else None
