"""A model's VAE with its pipeline's latent scaling (AutoencoderKL, AutoencoderDC), or the identity for pixel models."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import ModelError
from .pipeline_dir import is_builtin, read_pipeline


class LatentCodec:
    """Images (B, 3, H, W) in [-1, 1] <-> the latents the transformer reads, with the pipeline's scaling.

    FLUX/SD3: z = (mean - shift_factor) * scaling_factor; PixArt, Sana: z = latent * scaling_factor.
    AutoencoderKL is used deterministically (the posterior mean). Pixel-space models: identity.
    """

    def __init__(self, vae: nn.Module | None = None, family: str = "builtin", dtype: torch.dtype = torch.float32):
        self.vae, self.family, self.dtype = vae, family, dtype
        if vae is None:
            self.kind, self.downsample, self.channels = "identity", 1, 3
            self.scaling, self.shift = 1.0, 0.0
            return
        from diffusers import AutoencoderDC, AutoencoderKL

        cfg = vae.config
        if isinstance(vae, AutoencoderKL):
            self.kind = "kl"
            self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        elif isinstance(vae, AutoencoderDC):
            self.kind = "dc"
            self.downsample = int(vae.spatial_compression_ratio)
        else:
            raise ModelError(f"VAE class {type(vae).__name__} is not supported (AutoencoderKL, AutoencoderDC)")
        self.channels = int(cfg.latent_channels)
        self.scaling = float(cfg.scaling_factor if cfg.get("scaling_factor") is not None else 1.0)
        shift = cfg.get("shift_factor") if family in ("flux", "sd3") else None
        self.shift = float(shift) if shift is not None else 0.0

    def _check(self, x: Tensor, channels: int, what: str, multiple: int) -> None:
        if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != channels:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{what} must be (B, {channels}, H, W), got {shape}")
        if x.shape[2] % multiple or x.shape[3] % multiple:
            raise ValueError(f"{what} side {tuple(x.shape[2:])} is not divisible by {multiple}")

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, channels, H/downsample, W/downsample) float32."""
        self._check(images, 3, "images", self.downsample)
        if self.vae is None:
            return images.float()
        x = images.to(self.dtype)
        if self.kind == "kl":
            z = self.vae.encode(x).latent_dist.mean
        else:
            z = self.vae.encode(x).latent
        return ((z - self.shift) * self.scaling).float()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images (B, 3, H, W) float32, clamped to [-1, 1]."""
        self._check(latents, self.channels, "latents", 1)
        if self.vae is None:
            return latents.float().clamp(-1, 1)
        z = latents.to(self.dtype) / self.scaling + self.shift
        return self.vae.decode(z).sample.float().clamp(-1, 1)


def load_codec(spec: str, dtype: torch.dtype = torch.float32) -> LatentCodec:
    """The latent codec of `builtin` (identity) or a local pipeline directory (its vae/, if it lists one)."""
    if is_builtin(spec):
        return LatentCodec(None)
    pipe = read_pipeline(spec)
    entry = pipe.entry("vae")
    if entry is None:
        return LatentCodec(None, pipe.family)
    import diffusers

    path = pipe.component("vae")
    lib, cls_name = entry
    cls = getattr(diffusers, cls_name, None) if lib == "diffusers" else None
    if cls_name not in ("AutoencoderKL", "AutoencoderDC") or cls is None:
        raise ModelError(f"{pipe.root}/vae: class {lib}.{cls_name} is not supported (AutoencoderKL, AutoencoderDC)")
    vae = cls.from_pretrained(path, local_files_only=True, torch_dtype=dtype).eval().requires_grad_(False)
    return LatentCodec(vae, pipe.family, dtype)
