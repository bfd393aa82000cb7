"""SD3 / SD3.5 (SD3Transformer2DModel): joint-attention blocks on an (image, text) pair.

The last block is context-pre-only: it ends the text stream (its text output is None).
"""

from __future__ import annotations

from typing import Any

from diffusers import SD3Transformer2DModel
from torch import Tensor, nn

from .base import DiTAdapter, DiTInputs, State, unpatchify_last


class SD3Adapter(DiTAdapter):
    family = "sd3"
    model_class = SD3Transformer2DModel
    text_layout = "img_first"  # JointAttnProcessor2_0 concatenates [image, text]
    prologue_names = ("pos_embed", "time_text_embed", "context_embedder")
    epilogue_names = ("norm_out", "proj_out")

    def _zero_blocks(self) -> dict:
        return {"num_layers": 0}

    def default_latent_channels(self) -> int:
        return self.config.get("in_channels", 16)

    def prologue(self, x: DiTInputs) -> tuple[State, dict[str, Any]]:
        m = self.shell
        img = m.pos_embed(x.latents).contiguous()  # (B, N, D), positional embedding added
        temb = m.time_text_embed(x.timestep, x.pooled)  # (B, D)
        txt = m.context_embedder(x.text)  # (B, Lt, D)
        return (img, txt), {"temb": temb, "shape": tuple(x.latents.shape[1:])}

    def run_block(self, block: nn.Module, i: int, state: State, ctx: dict[str, Any]) -> State:
        img, txt = state
        txt, img = block(hidden_states=img, encoder_hidden_states=txt, temb=ctx["temb"], joint_attention_kwargs=None)
        return (img, txt)

    def epilogue(self, state: State, ctx: dict[str, Any]) -> Tensor:
        img = self.shell.norm_out(state[0], ctx["temb"])
        tokens = self.shell.proj_out(img)  # (B, N, p p C)
        c, h, w = ctx["shape"]
        return unpatchify_last(tokens, self.shell.out_channels, h, w, self.config.get("patch_size", 2))

    def attention_to_mask(self, block: nn.Module) -> nn.Module:
        return block.attn

    def reference_forward(self, model: nn.Module, x: DiTInputs) -> Tensor:
        return model(
            hidden_states=x.latents,
            encoder_hidden_states=x.text,
            pooled_projections=x.pooled,
            timestep=x.timestep,
            return_dict=False,
        )[0]
