"""`edgeblock eval --ray`: every (row, subject, seed) unit of the benchmark as one Ray task with the resources
asked for, each worker keeping its models between tasks; the driver merges the units in the table's order
(eval/units.py), so results.json is the one-process run's, times aside.
"""

from __future__ import annotations

import dataclasses
import os
import time

from tqdm import tqdm

from ..eval import units
from ..eval.run import ON_DEVICE, EvalConfig, Runner
from .session import RETRIES, wait_all

_RUNNERS: dict[EvalConfig, Runner] = {}  # in a worker process: the Runner of the config (seed aside) it last ran


def run_unit(cfg: EvalConfig, row: str, si: int, out_dir: str) -> units.UnitResult:
    """One unit in a Ray worker: the Runner of cfg (kept for the next task of the same run; the seed only
    changes what it computes), then Runner.run_unit, as the one-process run calls it. A device row uses the
    bundle the driver compiled into out_dir (which every node must see, as the model directory)."""
    key = dataclasses.replace(cfg, seed=0)
    runner = _RUNNERS.get(key)
    if runner is None:
        _RUNNERS.clear()  # one model set per worker
        runner = _RUNNERS[key] = Runner(cfg, progress=False)
    runner.cfg = cfg
    if row in ON_DEVICE:
        runner.prepare_devices(out_dir)
    return runner.run_unit(row, si, runner.subjects[si])


def run_eval_ray(ray, runs: dict[int, tuple[str, EvalConfig]], cpus: float = 1.0, gpus: float = 0.0,
                 progress: bool = True) -> dict[int, dict]:
    """runs: seed -> (output folder, config). All seeds' units go to the cluster at once, one bar over them;
    when every unit is in, each seed's results are merged and written (nothing is written if a task fails).
    Returns seed -> results."""
    if cpus < 0 or gpus < 0 or cpus + gpus <= 0:
        raise ValueError(f"a task needs CPUs or GPUs (--ray-cpus-per-task, --ray-gpus-per-task), got {cpus} and {gpus}")
    t_start = time.perf_counter()
    runners = {}
    for seed, (out_dir, cfg) in runs.items():
        runners[seed] = Runner(cfg, progress=progress)
        if set(cfg.rows) & set(ON_DEVICE):  # the device rows' bundles, compiled here once for the workers
            os.makedirs(out_dir, exist_ok=True)
            runners[seed].prepare_devices(out_dir)
        runners[seed].progress = False
    fn = ray.remote(run_unit).options(num_cpus=cpus, num_gpus=gpus, max_retries=RETRIES, retry_exceptions=True)
    refs = {(seed, si, row): fn.remote(runs[seed][1], row, si, runs[seed][0])
            for seed, r in runners.items() for si in range(len(r.subjects)) for row in r.unit_rows()}

    def name(key) -> str:
        seed, si, row = key
        return f"eval(row {row}, subject {runners[seed].subjects[si].name}, seed {seed})"

    with tqdm(total=len(refs), desc="eval", unit="task", disable=not progress) as bar:
        done = wait_all(ray, refs, name, bar)
    wall = (time.perf_counter() - t_start) / len(runs)  # the seeds ran together: each its share of the wall time
    results = {}
    for seed, r in runners.items():
        per_subject = {}
        for si, subject in enumerate(r.subjects):
            per_subject[subject.name] = record = r.subject_record(subject)
            for row in r.unit_rows():
                units.merge(r, record, done[(seed, si, row)])
        results[seed] = r.finish(runs[seed][0], per_subject, t_start, wall_s=wall)
    return results
