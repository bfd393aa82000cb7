"""Pixel-space FLUX models laid out like the built-in one, for generation and eval tests.

`builtin_present()` says whether the committed weights are in this checkout; `tiny_pixel_model`
saves a random-initialised model with the built-in's input/output shapes (64x64 RGB, 4x4 packing,
MiniLM text) but fewer, narrower blocks, so tests run where the weights are absent.
"""

from __future__ import annotations

import json
import os

import torch


def builtin_present() -> bool:
    from edgeblock.models import builtin_dir

    return os.path.exists(os.path.join(builtin_dir(), "transformer", "config.json"))


def tiny_pixel_model(path, seed: int = 0) -> str:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=48, out_channels=48, num_layers=1, num_single_layers=2,
        attention_head_dim=32, num_attention_heads=2, joint_attention_dim=384, pooled_projection_dim=384,
        guidance_embeds=False, axes_dims_rope=(8, 12, 12),
    )
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(os.path.join(path, "transformer"), safe_serialization=True)
    with open(os.path.join(path, "edgeblock.json"), "w") as f:
        json.dump({"latent_channels": 3, "latent_size": 64, "text_len": 32, "pixel_space": True}, f)
    return str(path)
