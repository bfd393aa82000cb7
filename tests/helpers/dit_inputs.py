"""Random model inputs (DiTInputs) for a model preset: what the tiny-config tests feed every family."""

from __future__ import annotations

import torch


def make_inputs(preset, batch=2, size=None, seed=0, t=None):
    """Random DiTInputs for a preset at latent side `size`."""
    from edgeblock.models import DiTInputs

    g = torch.Generator().manual_seed(seed)
    size = size or preset.latent_size
    ts = t if t is not None else torch.linspace(200.0, 800.0, batch)
    mask = None
    if preset.class_name in ("PixArtTransformer2DModel", "SanaTransformer2DModel"):
        mask = torch.ones(batch, preset.text_len)
        mask[:, -2:] = 0  # padding at the end, as a tokenizer leaves it
    return DiTInputs(
        latents=torch.randn(batch, preset.latent_channels, size, size, generator=g),
        timestep=ts,
        text=torch.randn(batch, preset.text_len, preset.text_dim, generator=g),
        pooled=torch.randn(batch, preset.pooled_dim, generator=g) if preset.pooled_dim else None,
        text_mask=mask,
    )
