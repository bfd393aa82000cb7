"""Block skipping with precomputed residuals (DiT-BlockSkip).

The frozen model runs once per draw without gradients and records the state
entering the first trainable block and, for each gap of skipped blocks after
it, the summed residual (telescoping: r_i + ... + r_j = s_j - s_{i-1}). The
training graph is then trainable blocks (with LoRA) + residual adds + epilogue.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..models.base import DiTAdapter, DiTInputs, State, state_add, state_sub
from .lora import LoRASpec, add_lora, lora_parameters


@dataclass(frozen=True)
class Segment:
    kind: str  # "block": run block `start` (trainable); "gap": add the residual of blocks start..end
    start: int
    end: int


def split_run(run: Sequence[int], params: Sequence[int], limit: int | None) -> list[list[int]]:
    """Cut a run of consecutive frozen blocks into groups of at most `limit` parameters each.

    Greedy in block order; a block larger than the limit is a group of its own. None or 0: one group.
    A bank precompute holds one group at a time, so the limit bounds its peak (DESIGN.md).
    """
    run = list(run)
    if not limit:
        return [run]
    out: list[list[int]] = []
    size = 0
    for i in run:
        if out and size + params[i] <= limit:
            out[-1].append(i)
            size += params[i]
        else:
            out.append([i])
            size = params[i]
    return out


def auto_group_limit(params: Sequence[int], trainable: Sequence[int], floor: int = 16 * 2**20) -> int:
    """Default frozen-group size (parameters): the trainable blocks' total, at least `floor`.

    The training step holds the trainable blocks' weights; with frozen groups no larger, the bank
    precompute never needs more than the training step does.
    """
    return max(floor, sum(params[i] for i in trainable))


@dataclass(frozen=True)
class SkipPlan:
    """Which blocks train; everything else is skipped. Any set, not only contiguous windows."""

    num_blocks: int
    trainable: tuple[int, ...]

    @classmethod
    def make(cls, num_blocks: int, blocks: Sequence[int]) -> "SkipPlan":
        chosen = sorted(set(int(b) for b in blocks))
        if not chosen:
            raise ValueError("no trainable block: choose at least one (all blocks skipped trains nothing)")
        bad = [b for b in chosen if not 0 <= b < num_blocks]
        if bad:
            raise ValueError(f"blocks {bad} out of range: the model has blocks 0..{num_blocks - 1}")
        return cls(num_blocks, tuple(chosen))

    @classmethod
    def all_blocks(cls, num_blocks: int) -> "SkipPlan":
        return cls(num_blocks, tuple(range(num_blocks)))

    @property
    def first(self) -> int:
        return self.trainable[0]

    @property
    def skipped(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_blocks) if i not in self.trainable)

    def segments(self) -> list[Segment]:
        """From the first trainable block to the last block: blocks to run and gaps to add."""
        out: list[Segment] = []
        i = self.first
        while i < self.num_blocks:
            if i in self.trainable:
                out.append(Segment("block", i, i))
                i += 1
            else:
                j = i
                while j + 1 < self.num_blocks and j + 1 not in self.trainable:
                    j += 1
                out.append(Segment("gap", i, j))
                i = j + 1
        return out

    def record_points(self) -> set[int]:
        """Indices k whose frozen state s_k the precompute keeps (-1 = the prologue's output)."""
        pts = {self.first - 1}
        for seg in self.segments():
            if seg.kind == "gap":
                pts |= {seg.start - 1, seg.end}
        return pts


@dataclass
class Precomputed:
    """One chunk of draws, ready for the training graph."""

    entry: State  # s_{a-1}: the state entering the first trainable block
    residuals: list[State]  # one summed residual per gap, in segment order
    ctx: dict[str, Any]  # the prologue's per-draw constants (temb, rotary, text ...)
    target: Tensor


def precompute(
    adapter: DiTAdapter,
    plan: SkipPlan,
    chunks: Sequence[tuple[DiTInputs, Tensor]],
    on_block: Callable[[int], None] | None = None,
) -> list[Precomputed]:
    """Run the frozen model over every chunk, one block at a time.

    Each block is materialised once, run on all chunks, then released: the
    peak holds one block's weights plus the chunks' states (the "bank" order).
    A single chunk is the online mode (one frozen pass per training step).
    """
    with torch.no_grad():
        states, ctxs, recorded = [], [], []
        for x, _ in chunks:
            s, ctx = adapter.prologue(x)
            states.append(s)
            ctxs.append(ctx)
            recorded.append({-1: s})
        points = plan.record_points()
        for i in range(max(points) + 1):  # blocks past the last recorded state are not needed
            block = adapter.build_block(i)
            for c in range(len(chunks)):
                states[c] = adapter.run_block(block, i, states[c], ctxs[c])
                if i in points:
                    recorded[c][i] = states[c]
            del block
            if on_block:
                on_block(i)
        out = []
        for c, (_, target) in enumerate(chunks):
            rec = recorded[c]
            residuals = [state_sub(rec[g.end], rec[g.start - 1]) for g in plan.segments() if g.kind == "gap"]
            out.append(Precomputed(rec[plan.first - 1], residuals, ctxs[c], target))
    return out


class BlockSkipModel(nn.Module):
    """The training graph: trainable blocks with LoRA, residual adds for the gaps, the epilogue.

    Only the trainable blocks are built; the epilogue's weights are the adapter's.
    With every block trainable and the prologue run inline, this is standard LoRA.
    """

    def __init__(self, adapter: DiTAdapter, plan: SkipPlan, lora: LoRASpec):
        super().__init__()
        self.adapter = adapter
        self.plan = plan
        self.blocks = nn.ModuleDict({str(i): add_lora(adapter.build_block(i), lora) for i in plan.trainable})

    def lora_parameters(self) -> dict[str, nn.Parameter]:
        return lora_parameters(self.blocks)

    def run(self, state: State, ctx: dict[str, Any], residuals: Sequence[State]) -> Tensor:
        gaps = iter(residuals)
        for seg in self.plan.segments():
            if seg.kind == "block":
                state = self.adapter.run_block(self.blocks[str(seg.start)], seg.start, state, ctx)
            else:
                state = state_add(state, next(gaps))
        return self.adapter.epilogue(state, ctx)

    def forward(self, pre: Precomputed) -> Tensor:
        return self.run(pre.entry, pre.ctx, pre.residuals)

    def forward_dropped(self, x: DiTInputs) -> Tensor:
        """The skipped blocks dropped, nothing in their place (the paper's ablation of the residuals): the
        prologue without gradients, then only the trainable blocks in order, then the epilogue."""
        with torch.no_grad():
            state, ctx = self.adapter.prologue(x)
        for i in self.plan.trainable:
            state = self.adapter.run_block(self.blocks[str(i)], i, state, ctx)
        return self.adapter.epilogue(state, ctx)

    def forward_full(self, x: DiTInputs) -> Tensor:
        """Prologue inline, then the plan (standard LoRA when every block is trainable)."""
        if self.plan.first != 0 or self.plan.skipped:
            raise ValueError("forward_full needs every block trainable; use precompute() for a skip plan")
        state, ctx = self.adapter.prologue(x)
        return self.run(state, ctx, [])
