"""Sana (SanaTransformer2DModel): linear self-attention blocks with cross-attention to text."""

from __future__ import annotations

from typing import Any

from diffusers import SanaTransformer2DModel
from torch import Tensor, nn

from .base import DiTAdapter, DiTInputs, State, unpatchify_last
from .pixart import mask_to_bias


class SanaAdapter(DiTAdapter):
    family = "sana"
    model_class = SanaTransformer2DModel
    text_layout = "cross"
    prologue_names = ("patch_embed", "time_embed", "caption_projection", "caption_norm")
    epilogue_names = ("norm_out", "proj_out", "scale_shift_table")

    def _zero_blocks(self) -> dict:
        return {"num_layers": 0}

    def default_latent_channels(self) -> int:
        return self.config.get("in_channels", 32)

    def prologue(self, x: DiTInputs) -> tuple[State, dict[str, Any]]:
        m = self.shell
        b, c, h, w = x.latents.shape
        p = self.config.get("patch_size", 1)
        img = m.patch_embed(x.latents)  # (B, N, D)
        if x.guidance is not None and self.config.get("guidance_embeds"):
            temb, embedded = m.time_embed(x.timestep, guidance=x.guidance, hidden_dtype=img.dtype)
        else:
            temb, embedded = m.time_embed(x.timestep, batch_size=b, hidden_dtype=img.dtype)
        txt = m.caption_norm(m.caption_projection(x.text).view(b, -1, img.shape[-1]))  # (B, Lt, D)
        ctx = {
            "temb": temb,
            "embedded_t": embedded,
            "text": txt,
            "text_bias": mask_to_bias(x.text_mask, img.dtype),
            "shape": (c, h, w),
            "grid": (h // p, w // p),
        }
        return (img,), ctx

    def run_block(self, block: nn.Module, i: int, state: State, ctx: dict[str, Any]) -> State:
        gh, gw = ctx["grid"]
        img = block(state[0], None, ctx["text"], ctx["text_bias"], ctx["temb"], gh, gw)
        return (img,)

    def epilogue(self, state: State, ctx: dict[str, Any]) -> Tensor:
        m = self.shell
        img = m.norm_out(state[0], ctx["embedded_t"], m.scale_shift_table)
        tokens = m.proj_out(img)  # (B, N, p p C)
        c, h, w = ctx["shape"]
        return unpatchify_last(tokens, self.config.get("out_channels") or c, h, w, self.config.get("patch_size", 1))

    def attention_to_mask(self, block: nn.Module) -> nn.Module:
        return block.attn2

    def reference_forward(self, model: nn.Module, x: DiTInputs) -> Tensor:
        return model(
            x.latents,
            encoder_hidden_states=x.text,
            timestep=x.timestep,
            encoder_attention_mask=x.text_mask,
            return_dict=False,
        )[0]
