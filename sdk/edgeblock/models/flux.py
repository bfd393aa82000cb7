"""FLUX (FluxTransformer2DModel): double-stream then single-stream blocks on an (image, text) pair.

Latents are packed p x p into tokens outside the model (p = 2 for FLUX.1 with
its 16-channel VAE, 4 for the built-in 3-channel pixel model).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.transformers import transformer_flux
from torch import Tensor, nn

from edge_runtime import flow

from .base import DiTAdapter, DiTInputs, State, patchify, unpatchify


_rope = transformer_flux.apply_rotary_emb


def _rope_per_sample(x: Tensor, freqs_cis, use_real: bool = True, use_real_unbind_dim: int = -1,
                     sequence_dim: int = 2) -> Tensor:
    """diffusers' apply_rotary_emb, also for per-sample (B, S, D) cos/sin (each sample its own positions)."""
    cos, sin = freqs_cis
    if cos.ndim == 2:
        return _rope(x, freqs_cis, use_real, use_real_unbind_dim, sequence_dim)
    if not use_real or use_real_unbind_dim != -1:
        raise NotImplementedError("per-sample rotary embeddings: only FLUX's real, interleaved form")
    if sequence_dim == 1:  # x (B, S, H, D)
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    else:  # x (B, H, S, D)
        cos, sin = cos[:, None, :, :], sin[:, None, :, :]
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos.to(x.device) + rotated.float() * sin.to(x.device)).to(x.dtype)


@contextlib.contextmanager
def per_sample_rotary() -> Iterator[None]:
    """FLUX's attention accepting per-sample rotary tables while the context is open."""
    transformer_flux.apply_rotary_emb = _rope_per_sample
    try:
        yield
    finally:
        transformer_flux.apply_rotary_emb = _rope


class FluxAdapter(DiTAdapter):
    family = "flux"
    model_class = FluxTransformer2DModel
    text_layout = "txt_first"  # FluxAttnProcessor concatenates [text, image]
    prologue_names = ("x_embedder", "time_text_embed", "context_embedder", "pos_embed")
    epilogue_names = ("norm_out", "proj_out")
    block_lists = ("transformer_blocks", "single_transformer_blocks")

    def _zero_blocks(self) -> dict:
        return {"num_layers": 0, "num_single_layers": 0}

    def default_latent_channels(self) -> int:
        return self.config.get("in_channels", 64) // 4

    @property
    def pack(self) -> int:
        p = math.isqrt(self.config.get("in_channels", 64) // self.latent_channels)
        if p * p * self.latent_channels != self.config.get("in_channels", 64):
            raise ValueError(
                f"FLUX in_channels={self.config.get('in_channels')} is not latent_channels="
                f"{self.latent_channels} times a square packing factor"
            )
        return p

    def _model_args(self, x: DiTInputs) -> dict[str, Any]:
        b, c, h, w = x.latents.shape
        p = self.pack
        if h % p or w % p:
            raise ValueError(f"latent size {h}x{w} is not divisible by the packing factor {p}")
        return {
            "hidden_states": patchify(x.latents, p),
            "encoder_hidden_states": x.text,
            "pooled_projections": x.pooled,
            "timestep": x.timestep / 1000.0,  # the model multiplies by 1000 itself
            "img_ids": torch.from_numpy(flow.image_ids(h // p, w // p)) if x.img_ids is None else x.img_ids,
            "txt_ids": torch.zeros(x.text.shape[1], 3),
            "guidance": x.guidance if self.config.get("guidance_embeds") else None,
        }

    def prologue(self, x: DiTInputs) -> tuple[State, dict[str, Any]]:
        m, a = self.shell, self._model_args(x)
        img = m.x_embedder(a["hidden_states"])  # (B, N, D)
        t = a["timestep"].to(img.dtype) * 1000
        if a["guidance"] is not None:
            temb = m.time_text_embed(t, a["guidance"].to(img.dtype) * 1000, a["pooled_projections"])
        else:
            temb = m.time_text_embed(t, a["pooled_projections"])  # (B, D)
        txt = m.context_embedder(a["encoder_hidden_states"])  # (B, Lt, D)
        ids = a["img_ids"]
        if ids.ndim == 2:
            rotary = m.pos_embed(torch.cat((a["txt_ids"], ids), dim=0))  # (cos, sin), (Lt+N, head_dim)
        else:  # per sample: (cos, sin), (B, Lt+N, head_dim)
            if ids.shape[0] != img.shape[0]:
                raise ValueError(f"img_ids for {ids.shape[0]} samples, latents for {img.shape[0]}")
            b = ids.shape[0]
            rows = torch.cat((a["txt_ids"].expand(b, -1, -1), ids), dim=1)  # (B, Lt+N, 3)
            rotary = tuple(r.reshape(b, rows.shape[1], -1) for r in m.pos_embed(rows.reshape(-1, 3)))
        b, c, h, w = x.latents.shape
        return (img, txt), {"temb": temb, "rotary": rotary, "shape": (c, h, w)}

    def run_block(self, block: nn.Module, i: int, state: State, ctx: dict[str, Any]) -> State:
        img, txt = state
        batched = ctx["rotary"][0].ndim == 3
        with per_sample_rotary() if batched else contextlib.nullcontext():
            txt, img = block(
                hidden_states=img,
                encoder_hidden_states=txt,
                temb=ctx["temb"],
                image_rotary_emb=ctx["rotary"],
                joint_attention_kwargs=None,
            )
        return (img, txt)

    def epilogue(self, state: State, ctx: dict[str, Any]) -> Tensor:
        img = self.shell.norm_out(state[0], ctx["temb"])
        tokens = self.shell.proj_out(img)  # (B, N, C p p)
        c, h, w = ctx["shape"]
        return unpatchify(tokens, c, h, w, self.pack)

    def attention_to_mask(self, block: nn.Module) -> nn.Module:
        return block.attn

    def reference_forward(self, model: nn.Module, x: DiTInputs) -> Tensor:
        if x.img_ids is not None and x.img_ids.ndim == 3:
            raise ValueError("the diffusers model takes one set of img_ids per batch; run per-sample ids "
                             "through the block graph")
        a = self._model_args(x)
        out = model(**a, return_dict=False)[0]
        c, h, w = x.latents.shape[1:]
        return unpatchify(out, c, h, w, self.pack)
