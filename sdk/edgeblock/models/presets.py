"""Named model configurations: tiny random ones for tests, the FLUX-shaped benchmark config.

Each preset is (transformer class name, constructor kwargs, latent channels,
latent size); `build` makes a random-initialised diffusers model from one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class Preset:
    class_name: str
    config: dict = field(default_factory=dict)
    latent_channels: int = 4
    latent_size: int = 16  # full-resolution latent side
    text_len: int = 8
    text_dim: int = 32
    pooled_dim: int | None = None

    def build(self, seed: int = 0) -> nn.Module:
        import diffusers

        torch.manual_seed(seed)
        model = getattr(diffusers, self.class_name)(**self.config).eval()
        # diffusers zero-initialises some projections (AdaLN, outputs); perturb every
        # tensor so no path is silently zero and equality tests mean something.
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        return model


TINY: dict[str, Preset] = {
    "flux": Preset(
        "FluxTransformer2DModel",
        dict(
            patch_size=1, in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24, axes_dims_rope=[4, 6, 6],
        ),
        latent_channels=4, latent_size=16, text_len=8, text_dim=32, pooled_dim=24,
    ),
    "sd3": Preset(
        "SD3Transformer2DModel",
        dict(
            sample_size=16, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=8, num_attention_heads=4,
            caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=24, out_channels=4,
            pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm",
        ),
        latent_channels=4, latent_size=16, text_len=8, text_dim=32, pooled_dim=24,
    ),
    "pixart": Preset(
        "PixArtTransformer2DModel",
        dict(
            sample_size=16, num_layers=4, patch_size=2, attention_head_dim=8, num_attention_heads=3,
            caption_channels=32, in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True,
            activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
            norm_elementwise_affine=False, norm_eps=1e-6,
        ),
        latent_channels=4, latent_size=16, text_len=8, text_dim=32,
    ),
    "sana": Preset(
        "SanaTransformer2DModel",
        dict(
            patch_size=1, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=4, num_attention_heads=4,
            num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=32,
            sample_size=16,
        ),
        latent_channels=4, latent_size=16, text_len=8, text_dim=32,
    ),
}

# The memory benchmark's default: FLUX-shaped, >= 100M parameters, 512x512-equivalent
# tokens (a 64x64 latent of 16 channels packed 2x2 = 1024 image tokens).
BENCH_FLUX = Preset(
    "FluxTransformer2DModel",
    dict(
        patch_size=1, in_channels=64, num_layers=3, num_single_layers=6, attention_head_dim=128,
        num_attention_heads=6, joint_attention_dim=512, pooled_projection_dim=256, axes_dims_rope=[16, 56, 56],
    ),
    latent_channels=16, latent_size=64, text_len=64, text_dim=512, pooled_dim=256,
)
