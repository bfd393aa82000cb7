"""Personalization training in PyTorch: the four variants the paper compares, one loop.

standard_lora: every block with LoRA, full resolution.   patch: + dynamic patch sampling.
skip: block skipping at full resolution.                  blockskip: both (DiT-BlockSkip).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from edge_runtime.recipe import middle_blocks  # noqa: F401 - the default trainable window, as the planner's
from edge_runtime.patch_sampling import CROP_IDS, CropBox, PatchSampler, PatchSchedule, check_prior_from, crop_token_ids, pick_image

from ..models import DiTInputs, LoadedModel, Objective
from ..models.conditioning import Conditioning  # its home is the models layer; importable from here as before
from .blockskip import BlockSkipModel, Precomputed, SkipPlan, precompute
from .lora import LoRASpec

VARIANTS = ("standard_lora", "patch", "skip", "blockskip")
SKIP_VARIANTS = ("skip", "blockskip")  # the variants that train a subset of blocks, the rest skipped


@dataclass
class Prior:
    """Class images for prior preservation (DreamBooth's prior-preservation loss): the base model's own
    generations of class prompts ("a large red star on a green background, left"), each with its prompt,
    trained on alongside the subject's images. They show the adapter what it must leave as the base model
    draws it: backgrounds and places the references do not show, other colours of the class.

    images: (M, H, W, C) in model space, like the subject's; cond: one row per image.
    """

    images: np.ndarray
    cond: Conditioning


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
    # positions of a crop's tokens (patch variants, FLUX): its own token grid, or the full image's
    # coordinates of the place it was cut from ("image")
    crop_ids: str = "grid"
    prior_share: float = 0.5  # share of draws taken from the class images (Prior), when the trainer has some
    # skip variants: the skipped blocks' precomputed residuals stand in for them (the method); False drops them
    # (the paper's ablation): nothing precomputed, the prologue then only the trainable blocks, then the epilogue
    residuals: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.prior_share < 1.0:
            raise ValueError(f"prior_share must be in (0, 1), got {self.prior_share}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant {self.variant!r} is not one of {VARIANTS}")
        if self.crop_ids not in CROP_IDS:
            raise ValueError(f"crop_ids {self.crop_ids!r} is not one of {CROP_IDS}")
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if not self.residuals and not self.uses_skip:
            raise ValueError(f"residuals=False drops skipped blocks: it needs a skip variant {SKIP_VARIANTS}, "
                             f"got {self.variant!r}")

    @property
    def uses_patches(self) -> bool:
        return self.variant in ("patch", "blockskip")

    @property
    def crops_at_image_ids(self) -> bool:
        return self.uses_patches and self.crop_ids == "image"

    @property
    def uses_skip(self) -> bool:
        return self.variant in SKIP_VARIANTS

    @property
    def uses_precompute(self) -> bool:
        """The frozen model runs per draw to record the skipped blocks' residuals."""
        return self.uses_skip and self.residuals


class DrawSampler:
    """Draws (x0, noise, t) from subject images: a patch-sampled crop per draw, or the whole image.

    images: (N, H, W, C) float arrays in model space (pixels in [-1, 1], or latents);
    encode: maps a (n, C, r, r) pixel batch to latents for latent models (None: identity).
    prior_from: images from this index on are class images (prior preservation), drawn with probability
    prior_share, the others with the rest; None: every image alike.
    """

    def __init__(
        self,
        images: np.ndarray,
        objective: Objective,
        sampler: PatchSampler | None,
        seed: int,
        encode: Callable[[Tensor], Tensor] | None = None,
        prior_from: int | None = None,
        prior_share: float = 0.0,
    ):
        if images.ndim != 4:
            raise ValueError(f"expected images as (N, H, W, C), got shape {images.shape}")
        check_prior_from(prior_from, len(images))
        self.prior_from, self.prior_share = prior_from, float(prior_share)
        self.images = images.astype(np.float32)
        self.objective = objective
        self.sampler = sampler
        self.rng = np.random.default_rng(seed)
        self.g = torch.Generator().manual_seed(seed)
        self.encode = encode

    def draw(self, n: int) -> tuple[Tensor, Tensor, Tensor, list[int], list[CropBox | None]]:
        """n draws: clean x0 (a crop or the whole image), noise, noise level, and per draw the image index
        and the crop box (None without patch sampling)."""
        t = self.objective.sample_t(self.g, n)
        crops, index, boxes = [], [], []
        for k in range(n):
            index.append(pick_image(self.rng, len(self.images), self.prior_from, self.prior_share))
            img, box = self.images[index[-1]], None
            if self.sampler is not None:
                img, box = self.sampler.sample(self.rng, img, float(t[k]))
            boxes.append(box)
            crops.append(torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))))
        x0 = torch.stack(crops)  # (n, C, r, r)
        if self.encode is not None:
            x0 = self.encode(x0)
        eps = torch.randn(x0.shape, generator=self.g)
        return x0, eps, t, index, boxes


class Trainer:
    """One personalization run of a variant: builds only what the variant needs."""

    def __init__(
        self,
        model: LoadedModel,
        cfg: MethodConfig,
        cond: Conditioning,
        images: np.ndarray,
        encode: Callable[[Tensor], Tensor] | None = None,
        prior: Prior | None = None,
    ):
        if cond.rows not in (1, len(images)):
            raise ValueError(f"conditioning has {cond.rows} rows for {len(images)} images: give one prompt, "
                             "or one per image")
        prior_from = None
        if prior is not None and len(prior.images):
            if prior.cond.rows != len(prior.images):
                raise ValueError(f"{prior.cond.rows} class prompts for {len(prior.images)} class images: give one each")
            if prior.images.shape[1:] != images.shape[1:]:
                raise ValueError(f"class images of shape {prior.images.shape[1:]} differ from the subject's "
                                 f"{images.shape[1:]}")
            # one row per image, the subject's first: every draw takes its own image's prompt
            cond = Conditioning.cat([cond if cond.rows > 1 else cond.take([0] * len(images)), prior.cond])
            prior_from = len(images)
            images = np.concatenate([images, prior.images])
        if cfg.crops_at_image_ids and model.adapter.family != "flux":
            raise ValueError(f"crop_ids='image' needs FLUX's position ids; {model.adapter.family} has none")
        if cfg.crops_at_image_ids and encode is not None:
            raise ValueError("crop_ids='image' is for pixel-space models (the crop box is in latent tokens)")
        self.model, self.cfg, self.cond = model, cfg, cond
        adapter = model.adapter
        full = images.shape[1]
        res = cfg.train_res or full // 2
        sampler = PatchSampler(cfg.schedule, res) if cfg.uses_patches else None
        self.draws = DrawSampler(images, model.objective, sampler, cfg.seed, encode, prior_from, cfg.prior_share)
        blocks = cfg.blocks if cfg.blocks is not None else middle_blocks(adapter.num_blocks)
        self.plan = SkipPlan.make(adapter.num_blocks, blocks) if cfg.uses_skip else SkipPlan.all_blocks(adapter.num_blocks)
        torch.manual_seed(cfg.seed)
        self.net = BlockSkipModel(adapter, self.plan, cfg.lora)
        self.opt = torch.optim.AdamW(list(self.net.lora_parameters().values()), lr=cfg.lr)
        self.step_count = 0

    def chunk(self) -> tuple[DiTInputs, Tensor]:
        """One batch of draws as model inputs and targets."""
        obj = self.model.objective
        x0, eps, t, index, boxes = self.draws.draw(self.cfg.batch)
        cond = self.cond if self.cond.rows == 1 else self.cond.take(index)
        ids = None
        if self.cfg.crops_at_image_ids:
            res, p = x0.shape[-1], self.model.adapter.pack
            ids = torch.from_numpy(np.stack([crop_token_ids(b, res, p) for b in boxes]))  # (B, N, 3)
        x = cond.inputs(obj.noisy(x0, eps, t), obj.timestep(t), self.cfg.guidance, ids)
        return x, obj.target(x0, eps, t)

    def precompute(self, chunks: list[tuple[DiTInputs, Tensor]], on_block=None) -> list[Precomputed]:
        return precompute(self.model.adapter, self.plan, chunks, on_block)

    def train_on(self, pre: Precomputed | tuple[DiTInputs, Tensor]) -> float:
        """One optimizer step on precomputed draws (skip variants) or raw draws (the others, and a skip variant
        without residuals, which drops its skipped blocks)."""
        self.opt.zero_grad(set_to_none=True)
        if isinstance(pre, Precomputed):
            pred, target = self.net(pre), pre.target
        elif not self.cfg.residuals:
            pred, target = self.net.forward_dropped(pre[0]), pre[1]
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
        if self.cfg.uses_precompute:
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
