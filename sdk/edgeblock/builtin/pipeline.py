"""Torch reference sampler for the built-in pixel-space FLUX model.

Euler flow-matching sampling (edge_runtime.flow) with classifier-free
guidance against the empty-prompt embedding.
"""
from __future__ import annotations

import os

import torch

from edge_runtime import flow

MODEL_DIR = os.path.join(os.path.dirname(__file__), "model")
CHANNELS = 3


def transformer_inputs(text_encoder, prompts, size: int = 64, patch: int = 4, max_length: int = 32):
    states, pooled = text_encoder.encode(list(prompts), max_length=max_length)
    txt_ids = torch.zeros(states.shape[1], 3)
    img_ids = torch.from_numpy(flow.image_ids(size // patch, size // patch))
    return states, pooled, txt_ids, img_ids


@torch.no_grad()
def generate(transformer, text_encoder, prompts, seed: int = 0, steps: int = 30,
             guidance: float = 3.0, size: int = 64, patch: int = 4, shift: float = 1.0,
             return_float: bool = False, noise: torch.Tensor | None = None):
    """-> uint8 images (B, H, W, 3) for `prompts` (a list of strings); noise: the starting noise (B, 3, size, size)
    (default: drawn from `seed` with torch's generator)."""
    prompts = list(prompts)
    B = len(prompts)
    dtype = next(transformer.parameters()).dtype
    device = next(transformer.parameters()).device
    cond, pooled, txt_ids, img_ids = transformer_inputs(text_encoder, prompts, size, patch)
    if guidance != 1.0:
        unc, unc_pooled, _, _ = transformer_inputs(text_encoder, [""] * B, size, patch)
        cond = torch.cat([cond, unc])
        pooled = torch.cat([pooled, unc_pooled])
    cond, pooled = cond.to(device, dtype), pooled.to(device, dtype)
    txt_ids, img_ids = txt_ids.to(device, dtype), img_ids.to(device, dtype)
    if noise is None:
        g = torch.Generator().manual_seed(int(seed))
        noise = torch.randn(B, CHANNELS, size, size, generator=g)
    elif tuple(noise.shape) != (B, CHANNELS, size, size):
        raise ValueError(f"noise of shape {tuple(noise.shape)}, wanted {(B, CHANNELS, size, size)}")
    x = flow.pack(noise, patch).to(device, dtype)
    sig = flow.sigmas(steps, shift)
    for i in range(steps):
        xin = torch.cat([x, x]) if guidance != 1.0 else x
        t = torch.full((xin.shape[0],), float(sig[i]), device=device, dtype=dtype)
        v = transformer(hidden_states=xin, encoder_hidden_states=cond, pooled_projections=pooled,
                        timestep=t, img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]
        if guidance != 1.0:
            vc, vu = v.chunk(2)
            v = vu + guidance * (vc - vu)
        x = flow.euler_step(x, v, float(sig[i]), float(sig[i + 1]))
    img = flow.unpack(x.float().cpu(), CHANNELS, size, size, patch)
    if return_float:
        return img
    img = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return img.permute(0, 2, 3, 1).numpy()


def load_builtin(device: str = "cpu", model_dir: str | None = None):
    """-> (FluxTransformer2DModel, MiniLMTextEncoder) from the committed weights."""
    from diffusers import FluxTransformer2DModel

    from .text import MiniLMTextEncoder

    path = os.path.join(model_dir or MODEL_DIR, "transformer")
    transformer = FluxTransformer2DModel.from_pretrained(path).to(device).eval()
    return transformer, MiniLMTextEncoder(device=device)
