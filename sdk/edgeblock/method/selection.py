"""Block selection by cross-attention masking (DiT-BlockSkip).

For each block i, the attention from image queries to the subject / class-noun
text tokens is masked in block i only; the relative change of the prediction,
averaged over a calibration set (images x timesteps x noises), scores the
block. The top-k blocks (optionally a contiguous window) become trainable.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ..models import DiTAdapter, Objective
from .train import Conditioning

_ACTIVE: list["TextKeyMask"] = []


@dataclass(frozen=True)
class TextKeyMask:
    """Which attention entries to remove: image queries x the given text-token positions."""

    layout: str  # "txt_first" | "img_first" | "cross" (see DiTAdapter.text_layout)
    text_len: int
    positions: tuple[int, ...]

    def bias(self, q_len: int, k_len: int, dtype: torch.dtype) -> Tensor:
        """(q_len, k_len) additive bias: -inf where an image query meets a masked text key."""
        b = torch.zeros(q_len, k_len, dtype=dtype)
        pos = torch.tensor(self.positions, dtype=torch.long)
        if self.layout == "cross":
            b[:, pos] = float("-inf")
        elif self.layout == "txt_first":
            b[self.text_len :, pos] = float("-inf")
        elif self.layout == "img_first":
            n_img = q_len - self.text_len
            b[:n_img, n_img + pos] = float("-inf")
        else:
            raise ValueError(f"unknown text layout {self.layout!r}")
        return b


_sdpa = torch.nn.functional.scaled_dot_product_attention


def _masked_sdpa(*args, **kwargs):
    """scaled_dot_product_attention with the active TextKeyMask added to its mask."""
    if not _ACTIVE:
        return _sdpa(*args, **kwargs)
    names = ("query", "key", "value", "attn_mask")
    kw = dict(zip(names, args))
    kw.update(kwargs)
    q, k = kw["query"], kw["key"]  # (B, H, Lq, D), (B, H, Lk, D)
    bias = _ACTIVE[-1].bias(q.shape[-2], k.shape[-2], q.dtype)
    mask = kw.get("attn_mask")
    if mask is not None:
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, float("-inf"))
        bias = mask + bias
    kw["attn_mask"] = bias
    return _sdpa(**kw)


@contextlib.contextmanager
def masked_attention(module: nn.Module, mask: TextKeyMask) -> Iterator[None]:
    """While `module` runs inside this context, its attention ignores the masked text keys."""
    def enter(*_):
        _ACTIVE.append(mask)

    def leave(*_):  # a forward hook's return value would replace the output: return None
        _ACTIVE.pop()

    pre = module.register_forward_pre_hook(enter)
    post = module.register_forward_hook(leave)
    torch.nn.functional.scaled_dot_product_attention = _masked_sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = _sdpa
        pre.remove()
        post.remove()
        _ACTIVE.clear()


@dataclass
class CalibrationItem:
    latents: Tensor  # (1, C, H, W) clean latents of a subject image
    cond: Conditioning
    positions: tuple[int, ...]  # text-token positions of the subject token and class noun


@dataclass(frozen=True)
class Draw:
    """One noise draw of the calibration set: item `item` noised at noise_levels[level] with `eps`."""

    item: int
    level: int
    t: float
    eps: Tensor  # (1, C, H, W), the draw's noise


def selection_draws(
    items: Sequence[CalibrationItem], noise_levels: Sequence[float], noises: int, seed: int
) -> list[Draw]:
    """Every draw of the calibration set in its one canonical order (item, noise level, noise), the noises
    taken from one generator in that order: the same draws wherever the passes then run."""
    for item in items:
        if not item.positions:
            raise ValueError("a calibration item has no text positions to mask")
    g = torch.Generator().manual_seed(seed)
    return [Draw(n, lv, float(t), torch.randn(item.latents.shape, generator=g))
            for n, item in enumerate(items) for lv, t in enumerate(noise_levels) for _ in range(noises)]


@dataclass
class Reference:
    """The unmasked pass of one draw: the state entering each block, the context, the prediction and the mask."""

    inputs_to: list  # state entering block i, unmasked
    ctx: object
    base: Tensor
    mask: TextKeyMask


class BlockScorer:
    """The masked passes of block selection over one model: each block built once (adapter.build_block), then
    per draw one unmasked pass and, per block i, the pass with block i's text attention masked."""

    def __init__(self, adapter: DiTAdapter, objective: Objective, guidance: float | None = 1.0):
        self.adapter, self.objective, self.guidance = adapter, objective, guidance
        self.blocks = [adapter.build_block(i) for i in range(adapter.num_blocks)]

    @torch.no_grad()
    def reference(self, item: CalibrationItem, draw: Draw) -> Reference:
        adapter = self.adapter
        t = torch.tensor([draw.t])
        x = item.cond.inputs(self.objective.noisy(item.latents, draw.eps, t), self.objective.timestep(t), self.guidance)
        state, ctx = adapter.prologue(x)
        if adapter.text_layout == "cross" and len(set(item.positions)) >= x.text.shape[1]:
            raise ValueError("masking every text token leaves cross-attention nothing to attend to")
        mask = TextKeyMask(adapter.text_layout, x.text.shape[1], tuple(item.positions))
        inputs_to = []
        for i, block in enumerate(self.blocks):
            inputs_to.append(state)
            state = adapter.run_block(block, i, state, ctx)
        return Reference(inputs_to, ctx, adapter.epilogue(state, ctx), mask)

    @torch.no_grad()
    def masked(self, ref: Reference, i: int) -> float:
        """||pred with block i's text attention masked - pred|| / ||pred|| for one draw."""
        adapter = self.adapter
        with masked_attention(adapter.attention_to_mask(self.blocks[i]), ref.mask):
            s = adapter.run_block(self.blocks[i], i, ref.inputs_to[i], ref.ctx)
        for j in range(i + 1, len(self.blocks)):
            s = adapter.run_block(self.blocks[j], j, s, ref.ctx)
        pred = adapter.epilogue(s, ref.ctx)
        return float((pred - ref.base).norm() / ref.base.norm().clamp_min(1e-12))


def mean_scores(per_draw: Sequence[Sequence[float]], num_blocks: int) -> list[float]:
    """Each block's mean over the draws, summed in the draws' canonical order (the same floats however the
    passes were spread)."""
    scores = np.zeros(num_blocks)
    for row in per_draw:
        scores += np.asarray(row, dtype=np.float64)
    return list(scores / max(len(per_draw), 1))


def score_blocks(
    adapter: DiTAdapter,
    objective: Objective,
    items: Sequence[CalibrationItem],
    noise_levels: Sequence[float] = (0.25, 0.5, 0.75),
    noises: int = 2,
    seed: int = 0,
    guidance: float | None = 1.0,
    progress: Callable[[int, int], None] | None = None,
) -> list[float]:
    """Mean relative change ||pred_masked_i - pred|| / ||pred|| per block i over the calibration set."""
    draws = selection_draws(items, noise_levels, noises, seed)
    scorer = BlockScorer(adapter, objective, guidance)
    per_draw = []
    for d in draws:
        ref = scorer.reference(items[d.item], d)
        per_draw.append([scorer.masked(ref, i) for i in range(adapter.num_blocks)])
        if progress:
            progress(len(per_draw), len(draws))
    return mean_scores(per_draw, adapter.num_blocks)


def choose_blocks(scores: Sequence[float], k: int, contiguous: bool = False) -> list[int]:
    """The top-k blocks by score, or the contiguous window of k with the largest total."""
    if not 1 <= k <= len(scores):
        raise ValueError(f"k must be in 1..{len(scores)}, got {k}")
    if contiguous:
        sums = [sum(scores[i : i + k]) for i in range(len(scores) - k + 1)]
        start = int(np.argmax(sums))
        return list(range(start, start + k))
    return sorted(int(i) for i in np.argsort(-np.asarray(scores), kind="stable")[:k])


def selection_report(adapter: DiTAdapter, scores: Sequence[float], k: int, contiguous: bool) -> dict:
    order = np.argsort(-np.asarray(scores), kind="stable")
    return {
        "family": adapter.family,
        "num_blocks": adapter.num_blocks,
        "method": "cross-attention masking",
        "ranking": [
            {"rank": r + 1, "block": int(i), "name": adapter.block_names[i], "score": float(scores[i])}
            for r, i in enumerate(order)
        ],
        "scores": [float(s) for s in scores],
        "top_k": k,
        "contiguous": contiguous,
        "selected": choose_blocks(scores, k, contiguous),
    }


def write_report(report: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=2)


def bar_chart(scores: Sequence[float], names: Sequence[str], selected: Sequence[int], path: str) -> None:
    """A PNG bar chart of block scores; selected blocks drawn in a second colour."""
    from PIL import Image, ImageDraw

    n = len(scores)
    bar, gap, top, bottom, left = 28, 8, 30, 70, 50
    width = left + n * (bar + gap) + gap
    height = 320
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.text((left, 8), "block score: relative change of the prediction when text attention is masked", fill="black")
    peak = max(max(scores), 1e-12)
    plot_h = height - top - bottom
    d.line([(left - 4, top), (left - 4, top + plot_h)], fill="black")
    d.text((4, top - 4), f"{peak:.3g}", fill="black")
    d.text((4, top + plot_h - 8), "0", fill="black")
    for i, s in enumerate(scores):
        x0 = left + gap + i * (bar + gap)
        h = int(plot_h * s / peak)
        colour = (214, 96, 39) if i in selected else (70, 110, 170)
        d.rectangle([x0, top + plot_h - h, x0 + bar, top + plot_h], fill=colour)
        d.text((x0 + 4, top + plot_h + 6), str(i), fill="black")
        kind = names[i].split(".")[0]
        d.text((x0, top + plot_h + 22), "S" if kind.startswith("single") else "D" if "transformer" in kind else "?", fill="gray")
    d.text((left, height - 22), "orange: selected   D: double/joint block   S: single-stream block", fill="black")
    img.save(path)
