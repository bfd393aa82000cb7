"""PixArt-Alpha/Sigma (PixArtTransformer2DModel): image-token blocks with cross-attention to text.

Epsilon prediction; with a learned variance the model returns 2C channels, of
which the first C are the noise prediction the training target compares with.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import PixArtTransformer2DModel
from torch import Tensor, nn

from .base import DiTAdapter, DiTInputs, State, unpatchify_last


def mask_to_bias(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """(B, Lt) keep-mask -> (B, 1, Lt) additive bias, as the diffusers models convert it."""
    if mask is None:
        return None
    return ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1)


class PixArtAdapter(DiTAdapter):
    family = "pixart"
    model_class = PixArtTransformer2DModel
    text_layout = "cross"
    prologue_names = ("pos_embed", "adaln_single", "caption_projection")
    epilogue_names = ("norm_out", "proj_out", "scale_shift_table")

    def _zero_blocks(self) -> dict:
        return {"num_layers": 0}

    def default_latent_channels(self) -> int:
        return self.config.get("in_channels", 4)

    def _added_cond(self, x: DiTInputs) -> dict[str, Tensor | None]:
        if not self.shell.use_additional_conditions:
            return {"resolution": None, "aspect_ratio": None}
        b, _, h, w = x.latents.shape
        return {
            "resolution": torch.tensor([[h * 8.0, w * 8.0]]).repeat(b, 1),
            "aspect_ratio": torch.tensor([[h / w]]).repeat(b, 1),
        }

    def prologue(self, x: DiTInputs) -> tuple[State, dict[str, Any]]:
        m = self.shell
        b, c, h, w = x.latents.shape
        img = m.pos_embed(x.latents)  # (B, N, D)
        temb, embedded = m.adaln_single(x.timestep, self._added_cond(x), batch_size=b, hidden_dtype=img.dtype)
        txt = m.caption_projection(x.text).view(b, -1, img.shape[-1])  # (B, Lt, D)
        ctx = {"temb": temb, "embedded_t": embedded, "text": txt, "text_bias": mask_to_bias(x.text_mask, img.dtype), "shape": (c, h, w)}
        return (img,), ctx

    def run_block(self, block: nn.Module, i: int, state: State, ctx: dict[str, Any]) -> State:
        img = block(
            state[0],
            attention_mask=None,
            encoder_hidden_states=ctx["text"],
            encoder_attention_mask=ctx["text_bias"],
            timestep=ctx["temb"],
            cross_attention_kwargs=None,
            class_labels=None,
        )
        return (img,)

    def epilogue(self, state: State, ctx: dict[str, Any]) -> Tensor:
        m = self.shell
        shift, scale = (m.scale_shift_table[None] + ctx["embedded_t"][:, None]).chunk(2, dim=1)
        img = m.norm_out(state[0])
        img = img * (1 + scale) + shift
        tokens = m.proj_out(img)  # (B, N, p p C_out)
        c, h, w = ctx["shape"]
        out = unpatchify_last(tokens, m.out_channels, h, w, self.config.get("patch_size", 2))
        return out[:, :c]  # the epsilon half when the variance is learned

    def attention_to_mask(self, block: nn.Module) -> nn.Module:
        return block.attn2

    def reference_forward(self, model: nn.Module, x: DiTInputs) -> Tensor:
        out = model(
            x.latents,
            encoder_hidden_states=x.text,
            timestep=x.timestep,
            added_cond_kwargs=self._added_cond(x),
            encoder_attention_mask=x.text_mask,
            return_dict=False,
        )[0]
        return out[:, : x.latents.shape[1]]
