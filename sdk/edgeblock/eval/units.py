"""One unit of the benchmark, a (row, subject) pair of one seed's run: what Runner.run_unit returns (the row's
per-image metric values, timings, peak, generations and its part of the subject's record), and how units combine,
in the table's order, into the run. The one-process run and the Ray run (cluster/evaluation.py) both go through it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from . import metrics
from .subjects import Subject


@contextlib.contextmanager
def swapped_blocks(transformer: nn.Module, names: list[str], blocks: dict[int, nn.Module]) -> Iterator[None]:
    """Trained blocks are drop-in replacements: put them into the diffusers transformer, then restore."""
    saved = {}
    for i, block in blocks.items():
        lst, j = names[i].split(".")
        saved[i] = getattr(transformer, lst)[int(j)]
        getattr(transformer, lst)[int(j)] = block
    try:
        yield
    finally:
        for i, block in saved.items():
            lst, j = names[i].split(".")
            getattr(transformer, lst)[int(j)] = block


def score_images(images: np.ndarray, subject: Subject, prompts, ref_descs, dreambench=None) -> dict[str, list[float]]:
    """Per-image metric values for one subject's generations."""
    out: dict[str, list[float]] = {}
    for img, p in zip(images, prompts):
        for k, v in metrics.score(img, ref_descs, p.background, p.position).items():
            out.setdefault(k, []).append(v)
    if dreambench is not None and dreambench.enabled:
        for k, v in dreambench.score(images, subject.images, [p.text for p in prompts]).items():
            out[k] = [float(x) for x in v]
    return out


def fresh_timing() -> dict:
    return {"train_s": 0.0, "gen_s": 0.0, "step_times": [], "first_losses": [], "final_losses": []}


@dataclass
class UnitResult:
    row: str
    subject: str
    values: dict[str, list[float]]  # metric -> value per generated image
    timing: dict  # as fresh_timing()
    peak_mib: float | None  # the tracked training's peak (the first subject's trained rows), else None
    images: np.ndarray  # (N, H, W, 3) the row's generations
    record: dict = field(default_factory=dict)  # {"rows": {row: means}} and the shared parts it saw (blocks, ...)
    selection_s: float = 0.0  # time this unit spent on block selection (0 when another unit of the subject did it)


# the subject record's parts every trained unit of a subject carries (the same in each)
SHARED_KEYS = ("blocks", "block_scores", "prior_prompts")


def subject_record(prompts: list[str], samples: int, blocks) -> dict:
    """A subject's record before any unit: its prompts, samples, and the blocks given (selection replaces them)."""
    return {"prompts": prompts, "samples": samples, "rows": {}, "blocks": list(blocks) or None, "block_scores": None}


def merge(runner, record: dict, u: UnitResult) -> None:
    """Add unit u to the runner's accumulators (values, timing, peak_mib, generations, selection_s) and to its
    subject's record; called in the table's order (subjects, then rows), so means sum in one order."""
    for k, v in u.values.items():
        runner.values[u.row].setdefault(k, []).extend(v)
    t = runner.timing[u.row]
    t["train_s"] += u.timing["train_s"]
    t["gen_s"] += u.timing["gen_s"]
    for k in ("step_times", "first_losses", "final_losses"):
        t[k].extend(u.timing[k])
    if u.peak_mib is not None:
        runner.peak_mib[u.row] = u.peak_mib
    runner.generations[u.subject][u.row] = u.images
    runner.selection_s += u.selection_s
    record["rows"][u.row] = u.record["rows"][u.row]
    for k in SHARED_KEYS:
        if k in u.record:
            record[k] = u.record[k]
    if "ablation_blocks" in u.record:
        record.setdefault("ablation_blocks", {}).update(u.record["ablation_blocks"])
