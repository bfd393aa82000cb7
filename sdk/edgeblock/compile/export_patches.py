"""Export-time patches that make diffusers' DiT code traceable with dynamic shapes (TorchScript exporter).

rms_norm decomposed, unflatten as reshape, PatchEmbed and FLUX/PixArt inputs from the traced shape, the
tanh GELU as one fused node (com.microsoft FastGelu) for training graphs; everything is restored on exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.base import DiTAdapter, DiTInputs, patchify
from .train_graph import TANH_GELU_C, TANH_GELU_K


def rms_norm_decomposed(x: Tensor, normalized_shape: Sequence[int], weight: Tensor | None = None, eps: float | None = None) -> Tensor:
    """F.rms_norm as x * rsqrt(mean(x^2) + eps) * w: the TorchScript exporter has no aten::rms_norm."""
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    dims = tuple(range(-len(normalized_shape), 0))
    y = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
    return y * weight if weight is not None else y


def _unflatten_traceable(self: Tensor, dim: int, sizes: Sequence[int]) -> Tensor:
    """Tensor.unflatten as a reshape over the traced sizes.

    The exporter's unflatten (used by FLUX's attention with a -1 size) loses the
    symbolic dims: every later `x.shape` becomes a constant and the graph only
    runs at the export shape.
    """
    shape = [self.shape[i] for i in range(self.dim())]
    d = dim % self.dim()
    return self.reshape(shape[:d] + list(sizes) + shape[d + 1 :])


class _Patcher:
    def __init__(self) -> None:
        self._saved: list[tuple[Any, str, Any, bool]] = []

    def set(self, obj: Any, name: str, value: Any) -> None:
        own = isinstance(obj, type) or name in getattr(obj, "__dict__", {})
        self._saved.append((obj, name, getattr(obj, name), own))
        setattr(obj, name, value)

    def restore(self) -> None:
        for obj, name, old, own in reversed(self._saved):
            if own:
                setattr(obj, name, old)
            else:
                delattr(obj, name)
        self._saved.clear()


_GELU = F.gelu


def gelu_sigmoid_form(x: Tensor, approximate: str = "none") -> Tensor:
    """F.gelu with its tanh approximation written as x * sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3)), the
    same function, in plain ops (what train_graph.decompose_fast_gelu writes into eval_model.onnx). With a
    LoRA on the linear layer before a tanh GELU (FLUX's proj_mlp and ff.net.0.proj), the exporter's
    0.5 x (1 + tanh(...)) pattern makes ORT 1.19.2's pre-training fusions fail inside generate_artifacts
    ("Argument mismatch when removing edge"); this form fuses to nothing. Training graphs use gelu_fused."""
    if approximate != "tanh":
        return _GELU(x, approximate=approximate)
    return x * torch.sigmoid(TANH_GELU_K * (x + TANH_GELU_C * x * x * x))


class _FastGelu(torch.autograd.Function):
    """The tanh GELU, exported as one com.microsoft FastGelu node (ONNX Runtime has its gradient, FastGeluGrad)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return _GELU(x, approximate="tanh")

    @staticmethod
    def symbolic(g, x):
        return g.op("com.microsoft::FastGelu", x).setType(x.type())


def gelu_fused(x: Tensor, approximate: str = "none") -> Tensor:
    """F.gelu for training graphs: the tanh approximation exported as com.microsoft FastGelu, the same
    function. ORT's gradient then keeps only the GELU's input for backward: the decomposed forms kept 3-4
    tensors of the MLP's width per GELU (docs/compile.md, training artifacts). Fused by hand, not by ORT: with a
    LoRA on the linear layer before the GELU, ORT 1.19.2's own GELU fusions fail inside generate_artifacts
    ("Argument mismatch when removing edge"). eval_model.onnx gets the plain-op form back
    (train_graph.decompose_fast_gelu)."""
    if approximate != "tanh":
        return _GELU(x, approximate=approximate)
    return _FastGelu.apply(x)


@contextlib.contextmanager
def export_patches(adapter: DiTAdapter | None = None, modules: Sequence[nn.Module] = (),
                   training: bool = False) -> Iterator[None]:
    """Make the diffusers code traceable with dynamic shapes; everything is restored on exit.

    - F.rms_norm / torch.rms_norm -> decomposed (FLUX/SD3 q/k norms);
    - Tensor.unflatten -> reshape over traced sizes;
    - PatchEmbed (PixArt sincos positions): always recompute the positional table
      from the traced grid size instead of using the cached one of the default size;
    - FLUX: position ids from the given ones or built in torch from the traced latent shape;
    - PixArt with additional conditions: resolution/aspect from the traced shape;
    - training graphs: the tanh GELU as one com.microsoft FastGelu node (gelu_fused).
    """
    from diffusers.models.embeddings import PatchEmbed

    p = _Patcher()
    try:
        p.set(F, "rms_norm", rms_norm_decomposed)
        if training:
            p.set(F, "gelu", gelu_fused)
        if hasattr(torch, "rms_norm"):
            p.set(torch, "rms_norm", rms_norm_decomposed)
        p.set(torch.Tensor, "unflatten", _unflatten_traceable)
        mods = list(modules)
        if adapter is not None:
            mods.append(adapter.shell)
            if adapter.family == "flux":
                p.set(adapter, "_model_args", lambda x, a=adapter: _flux_model_args(a, x))
            if adapter.family == "pixart":
                p.set(adapter, "_added_cond", lambda x, a=adapter: _pixart_added_cond(a, x))
        for m in mods:
            for sub in m.modules():
                if isinstance(sub, PatchEmbed) and sub.pos_embed is not None and sub.pos_embed_max_size is None:
                    p.set(sub, "height", -1)  # forces the `self.height != height` branch
        yield
    finally:
        p.restore()


def _flux_model_args(adapter: DiTAdapter, x: DiTInputs) -> dict[str, Any]:
    """FluxAdapter._model_args with the ids computed by torch ops (traced with the shape)."""
    p = adapter.pack
    img_ids = x.img_ids if x.img_ids is not None else flux_position_ids(x.latents, p, None)
    txt_ids = x.text.new_zeros((x.text.shape[1], 3)).float()
    return {
        "hidden_states": patchify(x.latents, p),
        "encoder_hidden_states": x.text,
        "pooled_projections": x.pooled,
        "timestep": x.timestep / 1000.0,
        "img_ids": img_ids,
        "txt_ids": txt_ids,
        "guidance": x.guidance if adapter.config.get("guidance_embeds") else None,
    }


def flux_position_ids(latents: Tensor, pack: int, crop: Tensor | None) -> Tensor:
    """(N, 3) image-token ids of the latent's token grid, placed by `crop` = (row0, col0, step) when given
    (torch ops over the traced shape; the same arithmetic as edge_runtime.patch_sampling.position_ids)."""
    _b, _c, h, w = latents.shape
    gh, gw = h // pack, w // pack
    rows = torch.arange(gh, dtype=torch.float32)[:, None].expand(gh, gw)
    cols = torch.arange(gw, dtype=torch.float32)[None, :].expand(gh, gw)
    if crop is not None:
        rows, cols = crop[0] + rows * crop[2], crop[1] + cols * crop[2]
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)


def _pixart_added_cond(adapter: DiTAdapter, x: DiTInputs) -> dict[str, Tensor | None]:
    if not adapter.shell.use_additional_conditions:
        return {"resolution": None, "aspect_ratio": None}
    b, _, h, w = x.latents.shape
    ones = x.latents.new_ones((b, 1))
    return {"resolution": torch.cat([ones * (h * 8.0), ones * (w * 8.0)], dim=1), "aspect_ratio": ones * (h / w)}
