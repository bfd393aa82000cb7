"""Personalization training in PyTorch: the four variants the paper compares, one loop.

standard_lora: every block with LoRA, full resolution.   patch: + dynamic patch sampling.
skip: block skipping at full resolution.                  blockskip: both (DiT-BlockSkip).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from edge_runtime.patch_sampling import PatchSampler, PatchSchedule

from ..models import DiTInputs, LoadedModel, Objective
from .blockskip import BlockSkipModel, Precomputed, SkipPlan, precompute
from .lora import LoRASpec

VARIANTS = ("standard_lora", "patch", "skip", "blockskip")


@dataclass
class Conditioning:
    """Text conditioning: one prompt (batch 1), broadcast over a batch of draws, or one row per prompt."""

    text: Tensor  # (K, Lt, Dt)
    pooled: Tensor | None = None  # (K, Dp)
    mask: Tensor | None = None  # (K, Lt)

    @property
    def rows(self) -> int:
        return int(self.text.shape[0])

    def take(self, index: Tensor | Sequence[int]) -> Conditioning:
        """The rows at index (one per draw), e.g. each draw's own image caption."""
        idx = torch.as_tensor(index, dtype=torch.long)
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return Conditioning(pick(self.text), pick(self.pooled), pick(self.mask))

    def inputs(self, latents: Tensor, timestep: Tensor, guidance: float | None = None) -> DiTInputs:
        n = latents.shape[0]
        if self.rows not in (1, n):
            raise ValueError(f"conditioning has {self.rows} rows for a batch of {n}")
        rep = lambda t: None if t is None else t.expand(n, *t.shape[1:])  # noqa: E731
        g = None if guidance is None else torch.full((n,), float(guidance))
        return DiTInputs(latents, timestep, rep(self.text), rep(self.pooled), rep(self.mask), g)


@dataclass(frozen=True)
class MethodConfig:
    variant: str = "blockskip"
    blocks: tuple[int, ...] | None = None  # trainable blocks for skip variants (None: two middle blocks)
    lora: LoRASpec = field(default_factory=LoRASpec)
    schedule: PatchSchedule = field(default_factory=PatchSchedule)
    train_res: int | None = None  # latent side for patch variants (None: half the full side)
    lr: float = 1e-4
    batch: int = 1
    seed: int = 0
    guidance: float | None = 1.0  # for guidance-distilled models

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant {self.variant!r} is not one of {VARIANTS}")
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")

    @property
    def uses_patches(self) -> bool:
        return self.variant in ("patch", "blockskip")

    @property
    def uses_skip(self) -> bool:
        return self.variant in ("skip", "blockskip")


def middle_blocks(num_blocks: int, k: int = 2) -> tuple[int, ...]:
    start = max(0, (num_blocks - k) // 2)
    return tuple(range(start, min(num_blocks, start + k)))


class DrawSampler:
    """Draws (x0, noise, t) from subject images: a patch-sampled crop per draw, or the whole image.

    images: (N, H, W, C) float arrays in model space (pixels in [-1, 1], or latents);
    encode: maps a (n, C, r, r) pixel batch to latents for latent models (None: identity).
    """

    def __init__(
        self,
        images: np.ndarray,
        objective: Objective,
        sampler: PatchSampler | None,
        seed: int,
        encode: Callable[[Tensor], Tensor] | None = None,
    ):
        if images.ndim != 4:
            raise ValueError(f"expected images as (N, H, W, C), got shape {images.shape}")
        self.images = images.astype(np.float32)
        self.objective = objective
        self.sampler = sampler
        self.rng = np.random.default_rng(seed)
        self.g = torch.Generator().manual_seed(seed)
        self.encode = encode

    def draw(self, n: int) -> tuple[Tensor, Tensor, Tensor, list[int]]:
        """n draws: clean x0 (a crop or the whole image), noise, noise level, and the image index of each."""
        t = self.objective.sample_t(self.g, n)
        crops, index = [], []
        for k in range(n):
            index.append(int(self.rng.integers(0, len(self.images))))
            img = self.images[index[-1]]
            if self.sampler is not None:
                img, _ = self.sampler.sample(self.rng, img, float(t[k]))
            crops.append(torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))))
        x0 = torch.stack(crops)  # (n, C, r, r)
        if self.encode is not None:
            x0 = self.encode(x0)
        eps = torch.randn(x0.shape, generator=self.g)
        return x0, eps, t, index


class Trainer:
    """One personalization run of a variant: builds only what the variant needs."""

    def __init__(
        self,
        model: LoadedModel,
        cfg: MethodConfig,
        cond: Conditioning,
        images: np.ndarray,
        encode: Callable[[Tensor], Tensor] | None = None,
    ):
        if cond.rows not in (1, len(images)):
            raise ValueError(f"conditioning has {cond.rows} rows for {len(images)} images: give one prompt, "
                             "or one per image")
        self.model, self.cfg, self.cond = model, cfg, cond
        adapter = model.adapter
        full = images.shape[1]
        res = cfg.train_res or full // 2
        sampler = PatchSampler(cfg.schedule, res) if cfg.uses_patches else None
        self.draws = DrawSampler(images, model.objective, sampler, cfg.seed, encode)
        blocks = cfg.blocks if cfg.blocks is not None else middle_blocks(adapter.num_blocks)
        self.plan = SkipPlan.make(adapter.num_blocks, blocks) if cfg.uses_skip else SkipPlan.all_blocks(adapter.num_blocks)
        torch.manual_seed(cfg.seed)
        self.net = BlockSkipModel(adapter, self.plan, cfg.lora)
        self.opt = torch.optim.AdamW(list(self.net.lora_parameters().values()), lr=cfg.lr)
        self.step_count = 0

    def chunk(self) -> tuple[DiTInputs, Tensor]:
        """One batch of draws as model inputs and targets."""
        obj = self.model.objective
        x0, eps, t, index = self.draws.draw(self.cfg.batch)
        cond = self.cond if self.cond.rows == 1 else self.cond.take(index)
        x = cond.inputs(obj.noisy(x0, eps, t), obj.timestep(t), self.cfg.guidance)
        return x, obj.target(x0, eps, t)

    def precompute(self, chunks: list[tuple[DiTInputs, Tensor]], on_block=None) -> list[Precomputed]:
        return precompute(self.model.adapter, self.plan, chunks, on_block)

    def train_on(self, pre: Precomputed | tuple[DiTInputs, Tensor]) -> float:
        """One optimizer step on precomputed draws (skip variants) or raw draws (the others)."""
        self.opt.zero_grad(set_to_none=True)
        if isinstance(pre, Precomputed):
            pred, target = self.net(pre), pre.target
        else:
            pred, target = self.net.forward_full(pre[0]), pre[1]
        loss = torch.nn.functional.mse_loss(pred, target)
        loss.backward()
        self.opt.step()
        self.step_count += 1
        return float(loss.detach())

    def step(self) -> dict[str, float]:
        """Draw, (precompute,) train: the online mode, timed."""
        t0 = time.perf_counter()
        chunk = self.chunk()
        pre_s = 0.0
        if self.cfg.uses_skip:
            item: Precomputed | tuple[DiTInputs, Tensor] = self.precompute([chunk])[0]
            pre_s = time.perf_counter() - t0
        else:
            item = chunk
        t1 = time.perf_counter()
        loss = self.train_on(item)
        return {"loss": loss, "step_s": time.perf_counter() - t1, "precompute_s": pre_s}

    def lora_state(self) -> dict[str, Tensor]:
        """LoRA tensors keyed by the diffusers module path (e.g. transformer_blocks.3.attn.to_q.lora_A.weight)."""
        names = self.model.adapter.block_names
        out = {}
        for k, p in self.net.lora_parameters().items():
            idx, rest = k.split(".", 1)
            out[f"{names[int(idx)]}.{rest.replace('.default', '')}"] = p.detach().clone()
        return out
