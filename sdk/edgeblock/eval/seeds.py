"""`edgeblock eval --seeds 0,1,2`: one run per seed (OUT/seed-N, each a complete eval folder), then every metric's
mean and spread (min-max) per row in OUT/results.json and results.md; the targets are judged on the means.

The seed-to-seed spread of one row (standard LoRA's subject fidelity 0.482 vs 0.458 on two seeds) is as large as
the gaps the tables judge, so a table over several seeds states it beside each figure.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence

import numpy as np

from edge_runtime.fileio import atomic_write

from .report import markdown, quantized_targets, targets

# the metrics the spread table shows
_FIDELITY = ("subject_fidelity", "prompt_fidelity")


def seed_dir(out_dir: str, seed: int) -> str:
    return os.path.join(out_dir, f"seed-{seed}")


def run_seeds(out_dir: str, seeds: Sequence[int], run_one: Callable[[str, int], dict]) -> dict:
    """run_one(folder, seed) per seed (each writes its own results), then the aggregate into out_dir."""
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must name distinct seeds, got {seeds}")
    os.makedirs(out_dir, exist_ok=True)
    per_seed = {s: run_one(seed_dir(out_dir, s), s) for s in seeds}
    results = aggregate(per_seed)
    atomic_write(os.path.join(out_dir, "results.json"), json.dumps(results, indent=2).encode())
    atomic_write(os.path.join(out_dir, "results.md"), seeds_markdown(results).encode())
    grid = os.path.join(seed_dir(out_dir, seeds[0]), "grid.png")
    if os.path.exists(grid):
        with open(grid, "rb") as f:
            atomic_write(os.path.join(out_dir, "grid.png"), f.read())
    return results


def aggregate(per_seed: dict[int, dict]) -> dict:
    """The runs of several seeds as one result: "rows" the per-metric means (the keys of a single run), "spread"
    {row: {metric: [min, max]}}, "per_seed" {seed: rows}, targets judged on the means, each target ratio's
    spread over the seeds under "target_spread"."""
    seeds = list(per_seed)
    first = per_seed[seeds[0]]
    names = list(first["rows"])
    for s, r in per_seed.items():
        if list(r["rows"]) != names:
            raise ValueError(f"seed {s} ran rows {list(r['rows'])}, seed {seeds[0]} ran {names}")
    rows, spread = {}, {}
    for name in names:
        rows[name], spread[name] = {}, {}
        for key in first["rows"][name]:
            vals = [per_seed[s]["rows"][name].get(key) for s in seeds]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
                rows[name][key] = float(np.mean(vals))
                spread[name][key] = [float(min(vals)), float(max(vals))]
            else:
                rows[name][key] = None
    per_targets = {s: targets(per_seed[s]["rows"]) for s in seeds}
    target_spread = {}
    for key in ("subject_fidelity_ratio", "prompt_fidelity_diff", "subject_fidelity_over_base"):
        vals = [t[key] for t in per_targets.values() if t.get(key) is not None]
        if vals:
            target_spread[key] = [float(min(vals)), float(max(vals))]
    cfg = dict(first["config"])
    cfg["seed"] = ",".join(str(s) for s in seeds)
    cfg["seeds"] = seeds
    return {
        "rows": rows,
        "spread": spread,
        "per_seed": {str(s): per_seed[s]["rows"] for s in seeds},
        "seeds": seeds,
        "targets": targets(rows),
        "target_spread": target_spread,
        "quantized_targets": quantized_targets(rows),
        "reference_check": first["reference_check"],
        "per_subject": first["per_subject"],  # the first seed's (blocks, per-subject scores); each seed-N has its own
        "config": cfg,
        "selection_s": float(sum(per_seed[s].get("selection_s", 0.0) for s in seeds)),
        "wall_s": float(sum(per_seed[s].get("wall_s", 0.0) for s in seeds)),
    }


def seeds_markdown(results: dict) -> str:
    """A single run's report over the means, then the spread table: each row's fidelities per seed, min-max."""
    seeds = results["seeds"]
    lines = [markdown(results).replace("# edgeblock eval", f"# edgeblock eval: mean over seeds {results['config']['seed']}", 1),
             "## Spread over seeds", "",
             f"Each figure above is the mean of {len(seeds)} runs (seed-N/ holds each run's own results); min-max:", "",
             "| row | subject fid. mean (min-max) | prompt fid. mean (min-max) | "
             + " | ".join(f"subject fid. seed {s}" for s in seeds) + " |",
             "|---|---|---|" + "---|" * len(seeds)]
    for name, r in results["rows"].items():
        sp = results["spread"].get(name, {})
        cells = []
        for k in _FIDELITY:
            cells.append(f"{r[k]:.3f} ({sp[k][0]:.3f}-{sp[k][1]:.3f})" if r.get(k) is not None and k in sp else "-")
        per = [results["per_seed"][str(s)][name].get("subject_fidelity") for s in seeds]
        lines.append(f"| {name} | " + " | ".join(cells) + " | "
                     + " | ".join("-" if v is None else f"{v:.3f}" for v in per) + " |")
    ts = results.get("target_spread", {})
    if ts:
        lines += ["", "Targets judged on the means (above); over the seeds: " + "; ".join(
            f"{k} {lo:+.3f} to {hi:+.3f}" if k != "subject_fidelity_ratio" else f"{k} {lo:.3f}-{hi:.3f}"
            for k, (lo, hi) in ts.items()) + "."]
    return "\n".join(lines) + "\n"
