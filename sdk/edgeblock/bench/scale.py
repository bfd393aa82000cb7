"""`edgeblock bench scale`: how the daemon's memory follows model size, on FLUX-shaped transformers of about
0.1B, 0.5B and 1.1B parameters laid out like the built-in model (pixel space, MiniLM text, 128 px).

Per configuration, on an otherwise idle machine:
- the torch standard-LoRA training step (a child process, batch 1, the generation resolution): peak RSS;
- per weights precision (fp32, int8, int4 bundles) and generation mode, one daemon as the product runs it: a
  personalization job (request to adapter; a phase of its own), then one generation in the same daemon:
  resident (the daemon's default budget), resident_rows and streamed (a `--memory-budget` between the larger of
  the bundle's predicted peak in that mode and its job, and its resident peak, so the daemon's own admission
  admits the job and picks that mode; the guidance rows one after the other through the open graphs, or each
  graph loaded for its own run): peak RSS of each phase;
- beside each figure, the bundle's prediction (manifest.memory, the planner's), measured before it was known.

The peaks are the kernel's RSS high-water mark per phase (demo.RssSampler), exact under CPU load; times are not
reported (other jobs on the machine change them).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

from edge_runtime.memory_plan import DAEMON_MODES as MODES  # the generation modes measured
from edge_runtime.memory_plan import RESIDENT, RESIDENT_ROWS

from .daemon import BENCH_PIXEL, BENCH_PIXEL_META, _cache_root, job_prediction, mode_budget, pixel_model_dir

# name -> (attention heads of 128 channels, double-stream blocks, single-stream blocks)
SCALE_CONFIGS = {
    "flux-0.1b": (6, 3, 6),  # 120M: the `bench` config
    "flux-0.5b": (10, 5, 10),  # 549M
    "flux-1b": (16, 4, 8),  # 1127M
}
WEIGHTS = ("fp32", "int8", "int4")


def scale_config(name: str) -> dict:
    if name not in SCALE_CONFIGS:
        raise ValueError(f"unknown scale configuration {name!r}; choose from {', '.join(SCALE_CONFIGS)}")
    heads, double, single = SCALE_CONFIGS[name]
    return {**BENCH_PIXEL, "num_attention_heads": heads, "num_layers": double, "num_single_layers": single}


def _bundle(path: str, name: str, weights: str, blocks: tuple[int, ...], say) -> str:
    from ..compile.bundle import CompileOptions, compile_bundle

    key = hashlib.sha256(json.dumps([os.path.abspath(path), list(blocks), weights]).encode()).hexdigest()[:10]
    out = os.path.join(_cache_root(), "bundles", f"scale-{name}-{weights}-{key}")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    compile_bundle(CompileOptions(path, out, blocks=blocks, verify=False, weights=weights), progress=say)
    return out


def _daemon(bundle: str, *extra: str):
    from ..demo import RssSampler, start_daemon

    state = tempfile.mkdtemp(prefix="edgeblock-scale-")
    proc, address = start_daemon(bundle, state, os.path.join(state, "daemon.log"), *extra)
    return proc, address, RssSampler(proc.pid, every=0.01), state


def _stop(proc, rss) -> None:
    from ..demo import stop_daemon

    rss.stop()
    stop_daemon(proc)


def _subject_pngs():
    from ..eval.subjects import load_subjects

    subject = load_subjects(names=["ringstar"])[0]
    ref_dir = os.path.join(os.path.dirname(os.path.dirname(__file__)), "eval", "data")
    return subject, [os.path.join(ref_dir, r.file) for r in subject.references]


def _personalize(c, steps: int) -> None:
    from ..client import kind_name

    subject, pngs = _subject_pngs()
    last = None
    for ev in c.personalize(pngs, token="sks", class_noun=subject.noun, steps=steps, seed=1):
        last = ev
    if last is None or kind_name(last.kind) != "DONE":
        raise RuntimeError(f"the job did not finish: {last}")


def measure_after_job(bundle: str, steps: int, gen_steps: int, budget: int | None,
                      job: bool = True) -> tuple[int | None, int, str]:
    """One daemon as the product runs it: a personalization job (job=False: none), then one generation.
    Returns (the job's peak RSS or None, the generation's peak RSS, the mode the daemon generated in); each phase's
    high-water mark is reset at its start."""
    from ..client import EdgeClient

    proc, address, rss, _ = _daemon(bundle, *(["--memory-budget", str(budget)] if budget else []))
    try:
        with EdgeClient(address, timeout=7200) as c:
            c.wait_ready(120)
            if job:
                rss.phase = "job"
                _personalize(c, steps)
            rss.phase = "generate"
            g = c.generate("a sks star on a blue background", steps=gen_steps, seed=1)
            rss.phase = None
    finally:
        _stop(proc, rss)
    return (int(rss.peaks["job"]) if job else None), int(rss.peaks["generate"]), g.mode


def run(names=tuple(SCALE_CONFIGS), steps: int = 2, gen_steps: int = 1, weights=WEIGHTS, progress=None) -> dict:
    from edge_runtime.manifest import load_manifest

    from ..method import model_recipe
    from . import memory

    say = progress or (lambda m: None)
    out: dict = {}
    for name in names:
        path = pixel_model_dir(scale_config(name), BENCH_PIXEL_META, f"scale-{name}")
        cfg = scale_config(name)
        blocks = tuple(model_recipe(path).middle(cfg["num_layers"] + cfg["num_single_layers"]))
        say(f"[bench scale] {name}: compile fp32/int8/int4 bundles (cached after the first run)")
        bundles = {w: _bundle(path, name, w, blocks, lambda m: say("  " + m)) for w in weights}
        man = {w: load_manifest(b, verify_files=False) for w, b in bundles.items()}
        plans = {w: m.memory_plan() for w, m in man.items()}
        first = man[weights[0]]
        gen_res = int(first.gen_res)
        r: dict = {"params": int(first.model["parameters"]), "num_blocks": int(first.model["num_blocks"]),
                   "trainable_blocks": list(first.trainable), "gen_res": gen_res, "train_res": int(first.train_res)}
        say(f"[bench scale] {name}: {r['params'] / 1e6:.0f}M parameters; torch standard LoRA step")
        sl = memory.run(path, blocks, variants=("standard_lora",))["standard_lora"]
        r["standard_lora_peak_bytes"] = int(sl["peak_rss_total_bytes"])
        gen: dict = {}
        jobs: dict = {}
        fresh: list[str] = []  # generations measured in a daemon without a job before (below)
        for w in weights:
            gen[w], jobs[w] = {}, {}
            job = job_prediction(plans[w], man[w])  # the job runs first
            for mode in MODES:
                budget, after_job = None, True  # resident: the daemon's default budget
                if mode != RESIDENT:
                    budget = mode_budget(plans[w], mode, gen_res, job)
                    if budget is None:
                        # every budget that picks this mode refuses the job (predicted above the mode's peak): the
                        # generation alone, in a fresh daemon (a board that serves adapters made elsewhere)
                        budget, after_job = mode_budget(plans[w], mode, gen_res), False
                        if budget is None:
                            continue
                        fresh.append(f"{w} {mode}")
                say(f"[bench scale] {name}: {w} weights, {mode}: daemon "
                    + (f"job ({steps} steps), then generate" if after_job else "generate (no job before)"))
                j, peak, ran = measure_after_job(bundles[w], steps, gen_steps, budget, job=after_job)
                if ran != mode:
                    raise RuntimeError(f"{name} {w}: the daemon generated {ran}, expected {mode} (budget {budget})")
                gen[w][mode] = peak
                if j is not None:
                    jobs[w][mode] = j
        # the job's figure: the first weights' (fp32) daemon under the default budget
        r["job_peak_bytes"] = jobs[weights[0]]["resident"]
        r["job_peak_bytes_by_weights"] = jobs
        r["generate_after_job"] = not fresh
        r["generate_without_job"] = fresh  # "<weights> <mode>" measured in a daemon that ran no job first
        r["generate_peak_bytes"] = gen
        base = plans[weights[0]]
        r["predicted"] = {
            "job_peak_bytes": job_prediction(base, first),
            "job_peak_bytes_by_weights": {w: job_prediction(plans[w], man[w]) for w in weights},
            "generate_peak_bytes": {w: {m: plans[w].mode_peak(m, gen_res) for m in gen[w]} for w in weights},
        }
        fp32_res = gen.get("fp32", {}).get("resident")
        r["ratios"] = {"job_vs_standard_lora": r["job_peak_bytes"] / r["standard_lora_peak_bytes"]}
        if fp32_res:
            for w in weights:
                for m, v in gen[w].items():
                    if (w, m) != ("fp32", "resident"):
                        r["ratios"][f"generate_{w}_{m}_vs_fp32_resident"] = v / fp32_res
        fp32_rows = gen.get("fp32", {}).get(RESIDENT_ROWS)
        if fp32_rows:  # like for like: the same mode at fp32
            for w in weights:
                if w != "fp32" and RESIDENT_ROWS in gen[w]:
                    rows = gen[w][RESIDENT_ROWS]
                    r["ratios"][f"generate_{w}_resident_rows_vs_fp32_resident_rows"] = rows / fp32_rows
        r["prediction_errors"] = _errors(r)
        out[name] = r
    return out


def _errors(r: dict) -> dict:
    """predicted / measured - 1 of every figure with a prediction."""
    p = r["predicted"]
    e = {"job": p["job_peak_bytes"] / r["job_peak_bytes"] - 1}
    for w, by in r["generate_peak_bytes"].items():
        for m, v in by.items():
            e[f"generate_{w}_{m}"] = p["generate_peak_bytes"][w][m] / v - 1
    return e


def format_table(results: dict) -> str:
    mb = 2**20
    lines = ["| config | params | standard LoRA | job (ratio) | " + " | ".join(
        f"gen {w} {m}" for w in WEIGHTS for m in MODES) + " |",
             "|---|---|---|---|" + "---|" * (len(MODES) * len(WEIGHTS))]
    for name, r in results.items():
        cells = []
        for w in WEIGHTS:
            for m in MODES:
                v = r["generate_peak_bytes"].get(w, {}).get(m)
                e = r["prediction_errors"].get(f"generate_{w}_{m}")
                cells.append("-" if v is None else f"{v / mb:.0f} ({e:+.0%})")
        lines.append(f"| {name} | {r['params'] / 1e6:.0f}M | {r['standard_lora_peak_bytes'] / mb:.0f} | "
                     f"{r['job_peak_bytes'] / mb:.0f} ({r['ratios']['job_vs_standard_lora']:.3f}; pred "
                     f"{r['prediction_errors']['job']:+.0%}) | " + " | ".join(cells) + " |")
    lines.append("MiB of peak RSS (whole process); in brackets: the bundle's prediction / measured - 1.")
    return "\n".join(lines)
