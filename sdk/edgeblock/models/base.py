"""The block-graph view of a diffusers DiT: prologue P, blocks B_1..B_L, epilogue E.

Blocks are materialised one at a time from a WeightSource, so a caller that
never asks for a block never holds its weights. Family adapters (flux.py,
sd3.py, pixart.py, sana.py) say how each piece is called.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from edge_runtime import flow

# A block's state: (image tokens, text tokens) for joint-attention families,
# (image tokens,) for cross-attention families. A None entry is a stream that ended.
State = tuple[Tensor | None, ...]


@dataclass
class DiTInputs:
    """One batch for the transformer, in image layout.

    latents:   (B, C, H, W) noisy latents (pixels for pixel-space models)
    timestep:  (B,) the scheduler's timestep on its 0..1000 scale
    text:      (B, Lt, Dt) text-encoder token states
    pooled:    (B, Dp) pooled text embedding (FLUX, SD3) or None
    text_mask: (B, Lt) 1 = keep, 0 = padding (PixArt, Sana) or None
    guidance:  (B,) guidance for guidance-distilled models, or None
    img_ids:   FLUX only: image-token position ids (0, row, col), (N, 3) shared or (B, N, 3) per sample
               (a patch-sampled crop at the coordinates of the place it was cut from); None: the
               latent's own token grid
    """

    latents: Tensor
    timestep: Tensor
    text: Tensor
    pooled: Tensor | None = None
    text_mask: Tensor | None = None
    guidance: Tensor | None = None
    img_ids: Tensor | None = None


class WeightSource:
    """Where a model's tensors come from: safetensors files on disk, or a module in memory."""

    def __init__(self, files: list[str] | None = None, tensors: dict[str, Tensor] | None = None):
        self._files = files or []
        self._tensors = tensors
        self._index: dict[str, str] = {}
        if files:
            from safetensors import safe_open

            for f in files:
                with safe_open(f, framework="pt") as h:
                    for k in h.keys():
                        self._index[k] = f

    @classmethod
    def from_module(cls, module: nn.Module) -> "WeightSource":
        return cls(tensors={k: v.detach() for k, v in module.state_dict().items()})

    @classmethod
    def from_dir(cls, path: str) -> "WeightSource":
        """A diffusers model folder: one safetensors file or a sharded index."""
        index = os.path.join(path, "diffusion_pytorch_model.safetensors.index.json")
        single = os.path.join(path, "diffusion_pytorch_model.safetensors")
        if os.path.exists(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return cls(files=[os.path.join(path, s) for s in shards])
        if os.path.exists(single):
            return cls(files=[single])
        found = sorted(os.listdir(path)) if os.path.isdir(path) else []
        raise FileNotFoundError(
            f"no safetensors weights in {path} (found: {found}); expected "
            "diffusion_pytorch_model.safetensors or its .index.json"
        )

    def keys(self) -> list[str]:
        return list(self._tensors) if self._tensors is not None else list(self._index)

    def get(self, key: str) -> Tensor:
        """One tensor by its exact name."""
        if self._tensors is not None:
            if key not in self._tensors:
                raise KeyError(f"weights have no tensor {key!r}")
            return self._tensors[key].clone()
        if key not in self._index:
            raise KeyError(f"weights have no tensor {key!r}")
        from safetensors import safe_open

        with safe_open(self._index[key], framework="pt") as h:
            return h.get_tensor(key)

    def load(self, prefix: str) -> dict[str, Tensor]:
        """All tensors under `prefix.`, keyed without the prefix (copies; the caller owns them)."""
        p = prefix + "."
        if self._tensors is not None:
            return {k[len(p) :]: v.clone() for k, v in self._tensors.items() if k.startswith(p)}
        from safetensors import safe_open

        out: dict[str, Tensor] = {}
        by_file: dict[str, list[str]] = {}
        for k, f in self._index.items():
            if k.startswith(p):
                by_file.setdefault(f, []).append(k)
        for f, keys in by_file.items():
            with safe_open(f, framework="pt") as h:
                for k in keys:
                    out[k[len(p) :]] = h.get_tensor(k)
        return out


def load_into(module: nn.Module, tensors: dict[str, Tensor], what: str, dtype: torch.dtype | None = None) -> None:
    """Load a module's persistent tensors (floating ones cast to `dtype`), refusing missing or unexpected ones."""
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    expected = set(module.state_dict().keys())
    missing = sorted(expected - set(tensors))
    unexpected = sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(f"weights for {what} do not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
    module.load_state_dict(tensors, strict=True, assign=True)


class DiTAdapter:
    """Block-graph access to one diffusers transformer class.

    The shell is the model built with zero blocks (prologue and epilogue, real
    tensors); blocks come from a meta-device skeleton and are materialised on
    demand by `build_block`.
    """

    family: ClassVar[str]
    model_class: ClassVar[type]
    # How text keys sit in the attention that mixes text into image tokens.
    text_layout: ClassVar[str]  # "txt_first" | "img_first" | "cross"
    prologue_names: ClassVar[tuple[str, ...]]
    epilogue_names: ClassVar[tuple[str, ...]]
    block_lists: ClassVar[tuple[str, ...]] = ("transformer_blocks",)

    def __init__(
        self,
        config: dict,
        weights: WeightSource,
        latent_channels: int | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        self.config = dict(config)
        self.weights = weights
        self.dtype = dtype  # checkpoints stored in bf16/fp16 are cast on load
        init_keys = self._init_keys()
        self._cfg = {k: v for k, v in self.config.items() if k in init_keys}
        with torch.device("meta"):
            self._skeleton = self.model_class(**self._cfg)
        self.block_names = [f"{lst}.{i}" for lst in self.block_lists for i in range(len(getattr(self._skeleton, lst)))]
        self.shell = self.model_class(**{**self._cfg, **self._zero_blocks()}).to(dtype)
        self.shell.eval().requires_grad_(False)
        for name in self.prologue_names + self.epilogue_names:
            self._load_part(name)
        self.latent_channels = latent_channels or self.default_latent_channels()
        self._base_rounding: dict[int, Callable[[nn.Module], Any]] = {}

    # ---- construction helpers -------------------------------------------------
    def _init_keys(self) -> set[str]:
        import inspect

        return set(inspect.signature(self.model_class.__init__).parameters) - {"self"}

    def _zero_blocks(self) -> dict:
        raise NotImplementedError

    def default_latent_channels(self) -> int:
        raise NotImplementedError

    def _load_part(self, name: str) -> None:
        obj = getattr(self.shell, name)
        if isinstance(obj, nn.Parameter):  # held directly by the model, e.g. scale_shift_table
            obj.data = self.weights.get(name).to(self.dtype)
            return
        load_into(obj, self.weights.load(name), name, self.dtype)

    # ---- the block graph ------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.block_names)

    def check_block_index(self, i: int) -> None:
        if not (0 <= i < self.num_blocks):
            raise ValueError(f"block index {i} out of range: this {self.family} model has blocks 0..{self.num_blocks - 1}")

    def skeleton_block(self, i: int) -> nn.Module:
        lst, j = self.block_names[i].split(".")
        return getattr(self._skeleton, lst)[int(j)]

    def build_block(self, i: int) -> nn.Module:
        """Block i with real weights, frozen, in eval mode."""
        self.check_block_index(i)
        # Assign the loaded tensors into a meta copy: no second allocation of the weights.
        block = copy.deepcopy(self.skeleton_block(i))
        load_into(block, self.weights.load(self.block_names[i]), self.block_names[i], self.dtype)
        left = [n for n, t in list(block.named_parameters()) + list(block.named_buffers()) if t.is_meta]
        if left:
            raise ValueError(f"{self.block_names[i]}: tensors {left[:5]} were not in the weights")
        if i in self._base_rounding:
            self._base_rounding[i](block)
        return block.eval().requires_grad_(False)

    def set_base_rounding(self, blocks: Iterable[int], fn: Callable[[nn.Module], Any] | None) -> None:
        """From now on build_block(i), for i in `blocks`, applies fn to the loaded block (in place: compile puts a
        trainable block's base weights on its bundle's quantization grid, compile/base_grid.py); None: as stored."""
        for i in blocks:
            self.check_block_index(i)
            if fn is None:
                self._base_rounding.pop(i, None)
            else:
                self._base_rounding[i] = fn

    def block_param_count(self, i: int) -> int:
        return sum(p.numel() for p in self.skeleton_block(i).parameters())

    def param_count(self) -> int:
        return sum(p.numel() for p in self._skeleton.parameters())

    def drop_prologue(self) -> None:
        """Release the prologue's weights (after the precompute the training step never needs them)."""
        for name in self.prologue_names:
            obj = getattr(self.shell, name)
            if isinstance(obj, nn.Module):
                obj.to("meta")

    def prologue(self, x: DiTInputs) -> tuple[State, dict[str, Any]]:
        raise NotImplementedError

    def run_block(self, block: nn.Module, i: int, state: State, ctx: dict[str, Any]) -> State:
        raise NotImplementedError

    def epilogue(self, state: State, ctx: dict[str, Any]) -> Tensor:
        """The prediction in image layout (B, C, H, W)."""
        raise NotImplementedError

    def attention_to_mask(self, block: nn.Module) -> nn.Module:
        """The attention module of a block in which image queries read text keys."""
        raise NotImplementedError

    def reference_forward(self, model: nn.Module, x: DiTInputs) -> Tensor:
        """The diffusers model's own forward on the same inputs, in image layout (for tests)."""
        raise NotImplementedError

    def block_kind(self, i: int) -> str:
        return self.block_names[i].split(".")[0]


def state_add(a: State, b: State) -> State:
    return tuple(None if y is None else x + y for x, y in zip(a, b))


def state_sub(a: State, b: State) -> State:
    return tuple(None if x is None else x - y for x, y in zip(a, b))


# FLUX-style packing (channel-major within a patch) is shared with the device: edge_runtime.flow.
patchify = flow.pack
unpatchify = flow.unpack


def unpatchify_last(tokens: Tensor, c: int, h: int, w: int, p: int) -> Tensor:
    """(B, N, p p C) with the channel last within a patch (SD3, PixArt, Sana) -> (B, C, H, W)."""
    b = tokens.shape[0]
    x = tokens.reshape(b, h // p, w // p, p, p, c)  # (B, h, w, p, q, C)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, q)
    return x.reshape(b, c, h, w)
