"""The paper's ablations as `edgeblock eval` rows (`--ablations`, issue 26): each trains as the blockskip row
(same steps, seeds, subjects, LoRA, learning rate, batch, crop side, schedule and blocks) but for one thing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from ..method.selection import choose_blocks
from ..method.train import MethodConfig

# row -> what it changes against blockskip (table order)
ABLATIONS = {
    "no_residuals": "skipped blocks dropped: nothing precomputed, the trainable blocks run one after the other",
    "schedule_shrinking": "crop side shrinks with the noise level: f(t) = f_max - (f_max - f_min) t",
    "schedule_random": "crop side uniform at random in [f_min, f_max], whatever the noise level",
    "resize_only": "no crop: the whole image resized to the training resolution (f_min = f_max = 1)",
    "skip_first": "the last top_k blocks trained, the first ones skipped (not selection's)",
    "skip_last": "the first top_k blocks trained, the last ones skipped (not selection's)",
    "selection_contiguous": "the best contiguous window of top_k blocks by the same selection scores",
}
ABLATION_ROWS = tuple(ABLATIONS)
NEEDS_SCORES = ("selection_contiguous",)  # rows that need the selection scores even where --blocks is given


def ablation_config(row: str, blockskip: MethodConfig, scores: Sequence[float] | None, top_k: int,
                    num_blocks: int) -> MethodConfig:
    """The MethodConfig of an ablation row: the blockskip row's `blockskip` with the row's one change. scores:
    the selection scores per block (selection_contiguous needs them); top_k: how many blocks the blockskip
    row trains."""
    if row not in ABLATIONS:
        raise ValueError(f"ablation row {row!r} is not one of {', '.join(ABLATION_ROWS)}")
    if blockskip.variant != "blockskip":
        raise ValueError(f"ablations change the blockskip row's config, got variant {blockskip.variant!r}")
    if not 1 <= top_k <= num_blocks:
        raise ValueError(f"top_k must be in 1..{num_blocks} (the model's blocks), got {top_k}")
    schedule = blockskip.schedule
    if row == "no_residuals":
        return replace(blockskip, residuals=False)
    if row == "schedule_shrinking":
        return replace(blockskip, schedule=replace(schedule, kind="shrinking"))
    if row == "schedule_random":
        return replace(blockskip, schedule=replace(schedule, kind="random"))
    if row == "resize_only":
        return replace(blockskip, schedule=replace(schedule, f_min=1.0, f_max=1.0))
    if row == "skip_first":
        return replace(blockskip, blocks=tuple(range(num_blocks - top_k, num_blocks)))
    if row == "skip_last":
        return replace(blockskip, blocks=tuple(range(top_k)))
    # selection_contiguous
    if scores is None or len(scores) != num_blocks:
        raise ValueError(f"selection_contiguous needs one selection score per block ({num_blocks}), got "
                         f"{'none' if scores is None else len(scores)}")
    return replace(blockskip, blocks=tuple(choose_blocks(scores, top_k, contiguous=True)))
