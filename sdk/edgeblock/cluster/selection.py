"""`edgeblock select --ray`: block selection's masked passes on Ray actors. Each actor loads the model once (block by
block, as the method does) and scores tasks of (block, calibration item, noise level); the driver sums the scores
in the draws' canonical order, so the ranking is the one-process run's (method/selection.py).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..method.selection import BlockScorer, CalibrationItem, Draw, Reference, mean_scores, selection_draws
from .session import RETRIES, result

IN_FLIGHT = 2  # calls queued per actor: the next task is there when one finishes
_CACHED = 4  # unmasked passes an actor keeps (tasks of one (item, noise level) come together)


@dataclass(frozen=True)
class ActorResources:
    """What each selection actor holds: `actors` of them (None: as many as the cluster's CPUs, or GPUs with gpus > 0,
    hold), each with `cpus` CPUs and `gpus` GPUs."""

    actors: int | None = None
    cpus: float = 1.0
    gpus: float = 0.0

    def __post_init__(self) -> None:
        if self.actors is not None and self.actors < 1:
            raise ValueError(f"--ray-actors must be >= 1, got {self.actors}")
        if self.cpus < 0 or self.gpus < 0 or self.cpus + self.gpus <= 0:
            raise ValueError(f"an actor needs CPUs or GPUs (--ray-cpus-per-task, --ray-gpus-per-task), got "
                             f"{self.cpus} and {self.gpus}")

    def count(self, available: dict, tasks: int) -> int:
        if self.actors is not None:
            return min(self.actors, tasks)
        fits = [available.get(k, 0.0) // v for k, v in (("CPU", self.cpus), ("GPU", self.gpus)) if v > 0]
        return max(1, min(int(min(fits)), tasks))


class SelectionActor:
    """One model on one Ray worker: its BlockScorer, the calibration items and draws, and the last few unmasked
    passes (wrapped by ray.remote when a run starts, so this module imports without Ray)."""

    def __init__(self, model: str, items: Sequence[CalibrationItem], draws: Sequence[Draw], guidance: float | None):
        from ..models import load_model

        loaded = load_model(model)
        self.scorer = BlockScorer(loaded.adapter, loaded.objective, guidance)
        self.items, self.draws = items, draws
        self.refs: OrderedDict[int, Reference] = OrderedDict()

    def _reference(self, k: int) -> Reference:
        if k not in self.refs:
            d = self.draws[k]
            self.refs[k] = self.scorer.reference(self.items[d.item], d)
            while len(self.refs) > _CACHED:
                self.refs.popitem(last=False)
        return self.refs[k]

    def score(self, block: int, item: int, level: int) -> list[float]:
        """Block `block`'s score on each noise draw of (item, noise level), in draw order."""
        return [self.scorer.masked(self._reference(k), block)
                for k, d in enumerate(self.draws) if d.item == item and d.level == level]


def score_blocks_ray(
    ray,
    model: str,
    num_blocks: int,
    items: Sequence[CalibrationItem],
    noise_levels: Sequence[float],
    noises: int,
    seed: int = 0,
    guidance: float | None = 1.0,
    resources: ActorResources = ActorResources(),
    progress: Callable[[int, int], None] | None = None,
) -> list[float]:
    """score_blocks over Ray actors (the model at `model` must be readable on every node): the same floats."""
    draws = selection_draws(items, noise_levels, noises, seed)
    tasks = [(b, n, lv) for n in range(len(items)) for lv in range(len(noise_levels)) for b in range(num_blocks)]
    cls = ray.remote(num_cpus=resources.cpus, num_gpus=resources.gpus, max_restarts=-1,
                     max_task_retries=RETRIES)(SelectionActor)
    items_ref, draws_ref = ray.put(list(items)), ray.put(draws)
    actors = [cls.remote(model, items_ref, draws_ref, guidance)
              for _ in range(resources.count(ray.available_resources(), len(tasks)))]
    queue, inflight, done = deque(tasks), {}, {}

    def submit(actor) -> None:
        task = queue.popleft()
        inflight[actor.score.options(retry_exceptions=True).remote(*task)] = (task, actor)

    try:
        for actor in actors:
            for _ in range(IN_FLIGHT):
                if queue:
                    submit(actor)
        while inflight:
            (ref,), _ = ray.wait(list(inflight), num_returns=1)
            task, actor = inflight.pop(ref)
            b, n, lv = task
            done[task] = result(ray, ref, f"select(block {b}, item {n}, noise level {noise_levels[lv]})")
            if progress:
                progress(len(done), len(tasks))
            if queue:
                submit(actor)
    finally:
        for actor in actors:
            ray.kill(actor)
    # per draw, each block's score; then the sum in draw order, as score_blocks does
    per_draw, seen = [], {}
    for d in draws:
        k = seen.get((d.item, d.level), 0)
        seen[(d.item, d.level)] = k + 1
        per_draw.append([done[(b, d.item, d.level)][k] for b in range(num_blocks)])
    return mean_scores(per_draw, num_blocks)
