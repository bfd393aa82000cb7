"""`edgeblock bench daemon`: the edge daemon's memory and speed beside the torch reference processes.

For a model (`builtin`, or `bench`: a >= 100M-parameter FLUX-shaped transformer laid out like the
built-in model, i.e. pixel space with MiniLM text, 128x128 RGB packed 4x4 = 1024 tokens at the
generation resolution, 256 at the training resolution):

1. compile it (cached; verification off: this measures, docs/compile.md verifies);
2. start the daemon (`python -m edge_runtime.server`) and sample its RSS every 20 ms while it
   personalizes (N steps, precompute included: the whole job from request to adapter) and while it
   generates (one image);
3. run the torch reference processes (edgeblock.bench.memory children: standard LoRA and block
   skip, one training step at batch 1 each) on the same model.

Figures: peak RSS (whole process, imports included, for both the daemon and torch), seconds per
personalization step (precompute included), generation latency; ratios daemon / torch standard
LoRA. Each run on an otherwise idle machine; the numbers are printed, never asserted in tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time

from edge_runtime.memory_plan import DAEMON_MODES, RESIDENT, RESIDENT_ROWS

BENCH_PIXEL = dict(  # BENCH_FLUX's transformer width and depth, with the built-in model's text and pixel I/O
    patch_size=1, in_channels=48, out_channels=48, num_layers=3, num_single_layers=6, attention_head_dim=128,
    num_attention_heads=6, joint_attention_dim=384, pooled_projection_dim=384, guidance_embeds=False,
    axes_dims_rope=[16, 56, 56],
)
BENCH_PIXEL_META = {"latent_channels": 3, "latent_size": 128, "text_len": 32, "pixel_space": True}


def _cache_root() -> str:
    return os.environ.get("EDGEBLOCK_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "edgeblock"))


def bench_pixel_dir() -> str:
    """The random-initialised >= 100M pixel-space FLUX model, saved once (builtin layout)."""
    return pixel_model_dir(BENCH_PIXEL, BENCH_PIXEL_META, "bench-pixel-flux")


def pixel_model_dir(config: dict, meta: dict, name: str = "pixel-flux") -> str:
    """A random-initialised FluxTransformer2DModel of `config`, laid out like the built-in model, saved once.

    `meta` is the folder's edgeblock.json (latent_channels, latent_size, text_len, pixel_space).
    """
    key = hashlib.sha256(json.dumps([config, meta], sort_keys=True).encode()).hexdigest()[:12]
    path = os.path.join(_cache_root(), f"{name}-{key}")
    if not os.path.exists(os.path.join(path, "transformer", "config.json")):
        import tempfile

        import torch
        from diffusers import FluxTransformer2DModel

        torch.manual_seed(0)
        model = FluxTransformer2DModel(**config)
        os.makedirs(_cache_root(), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=_cache_root())
        model.save_pretrained(os.path.join(tmp, "transformer"), safe_serialization=True)
        with open(os.path.join(tmp, "edgeblock.json"), "w") as f:
            json.dump(meta, f)
        os.replace(tmp, path)
    return path


def model_dir(model: str) -> str:
    if model == "builtin":
        return "builtin"
    if model == "bench":
        return bench_pixel_dir()
    return model


def bundle_for(model: str, blocks: tuple[int, ...] | None, progress, weights: str | None = None,
               train_res: int | None = None, gen_res: int | None = None) -> str:
    """The model's bundle for this host (cached by model, blocks, weights and resolutions; verification off)."""
    from ..compile.bundle import CompileOptions, compile_bundle

    path = model_dir(model)
    settings = [os.path.abspath(path) if path != "builtin" else path, list(blocks or [])]
    if (weights, train_res, gen_res) != (None, None, None):  # the defaults keep the key they always had
        settings += [weights, train_res, gen_res]
    key = hashlib.sha256(json.dumps(settings).encode())
    out = os.path.join(_cache_root(), "bundles", f"bench-{model if model in ('builtin', 'bench') else 'custom'}-"
                                                  f"{key.hexdigest()[:10]}")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    compile_bundle(CompileOptions(path, out, blocks=blocks, verify=False, weights=weights, train_res=train_res,
                                  gen_res=gen_res), progress=progress)
    return out


def mode_budget(plan, mode: str, size: int, job_bytes: int = 0) -> int | None:
    """A `--memory-budget` under which the daemon's own admission control generates in `mode` (resident_rows or
    streamed) at `size` px and still admits what the benchmark runs before it in the same daemon (a job predicted
    at `job_bytes`): midway between the larger of the mode's predicted peak and the job, and the peak of the mode
    the daemon prefers to it (resident for resident_rows; the rows peak for streamed). None when there is no such
    budget (the mode not predicted smaller, or the job as large as the preferred mode's peak)."""
    above = plan.generation(RESIDENT, size)["peak_bytes"] if mode == RESIDENT_ROWS else plan.resident_rows_peak(size)
    low = max(plan.mode_peak(mode, size), int(job_bytes))
    return (above + low) // 2 if low < above else None


def job_prediction(plan, manifest, precompute: str = "") -> int:
    """The bundle's predicted peak of a job the daemon runs with `precompute` ("": the daemon's own choice)."""
    from edge_runtime.precompute import precompute_mode

    return plan.job_peak(precompute or precompute_mode(int(manifest.model["parameters"])))


def run(model: str = "builtin", steps: int = 20, gen_steps: int = 10, blocks: tuple[int, ...] | None = None,
        precompute: str = "", torch_reference: bool = True, progress=None,
        reference_variants: tuple[str, ...] = ("standard_lora", "blockskip"), weights: str | None = None,
        train_res: int | None = None, gen_res: int | None = None, generation: str = RESIDENT) -> dict:
    """Compile `model` (cached), run one daemon job then one generation in that daemon, and the torch references.

    weights / train_res / gen_res: `edgeblock compile`'s --weights, --train-res, --gen-res (None: its defaults).
    generation: the mode to generate in: resident under the daemon's default budget, or resident_rows / streamed
    under a `--memory-budget` that its admission control answers with that mode (mode_budget);
    where every such budget would refuse the job (its prediction above the resident generation's), the job runs
    under the default budget and a second daemon on the same state generates with its adapter
    (`daemon.generate_after_job`: false).
    Beside the measured peaks, `predicted` holds the bundle's own predictions (the figures the daemon's admission
    control reads) and `prediction_errors` predicted / measured - 1."""
    from ..client import EdgeClient, kind_name
    from ..demo import RssSampler, start_daemon, stop_daemon
    from . import memory

    say = progress or (lambda m: None)
    say(f"[bench daemon] compile {model} (cached after the first run)")
    if generation not in DAEMON_MODES:
        raise ValueError(f"generation {generation!r} is not one of {', '.join(DAEMON_MODES)}")
    bundle = bundle_for(model, blocks, lambda m: say("  " + m), weights, train_res, gen_res)
    from edge_runtime.manifest import load_manifest

    man = load_manifest(bundle, verify_files=False)
    trainable = tuple(man.trainable)
    plan = man.memory_plan()
    extra: list[str] = []
    restart: list[str] = []  # a second daemon's flags: it generates with the first one's adapter
    if generation != RESIDENT:
        budget = (mode_budget(plan, generation, int(man.gen_res), job_prediction(plan, man, precompute))
                  if plan is not None else None)
        if budget is not None:
            extra = ["--memory-budget", str(budget)]
        else:  # every budget for that mode refuses the job: on a board such a daemon serves adapters made elsewhere
            alone = mode_budget(plan, generation, int(man.gen_res)) if plan is not None else None
            if alone is None:
                raise ValueError(f"{model}: the bundle predicts no {generation} generation below its resident one "
                                 f"at {man.gen_res} px; generate resident")
            restart = ["--memory-budget", str(alone)]
            say(f"[bench daemon] the job is predicted above the resident generation, so no budget admits it and "
                f"generates {generation}: the job runs under the default budget, the generation in a second daemon "
                f"under --memory-budget {alone} (the first one's adapter)")
    result: dict = {"model": {"name": model, "path": model_dir(model), "parameters": man.model["parameters"],
                              "num_blocks": man.model["num_blocks"], "trainable_blocks": list(trainable),
                              "train_res": man.train_res, "gen_res": man.gen_res, "bundle": bundle,
                              "weights": man.weight_precision}}
    import tempfile

    state = tempfile.mkdtemp(prefix="edgeblock-bench-state-")
    say("[bench daemon] daemon: personalize + generate")
    proc, address = start_daemon(bundle, state, os.path.join(state, "daemon.log"), *extra)
    rss = RssSampler(proc.pid, every=0.01)
    try:
        from ..eval.subjects import load_subjects

        subject = load_subjects(names=["ringstar"])[0]
        ref_dir = os.path.join(os.path.dirname(os.path.dirname(__file__)), "eval", "data")
        pngs = [os.path.join(ref_dir, r.file) for r in subject.references]
        with EdgeClient(address, timeout=3600) as c:
            c.wait_ready(120)
            info = c.info()
            from edge_runtime.memstat import rss_bytes

            idle = rss_bytes(proc.pid)
            rss.phase = "encode"
            t0 = time.perf_counter()
            last = None
            for ev in c.personalize(pngs, token="sks", class_noun=subject.noun, steps=steps, seed=1,
                                    precompute=precompute):
                last = ev
                rss.phase = _phase(ev, rss.phase)
            job_s = time.perf_counter() - t0
            if kind_name(last.kind) != "DONE":
                raise RuntimeError(f"the benchmark job did not finish: {last}")
            if not restart:
                g, gen_wall = _generate(c, rss, last.adapter_id, gen_steps)
        from edge_runtime.memstat import rss_peak_bytes

        hwm = max([rss_peak_bytes(proc.pid), *rss.peaks.values()])  # the sampler resets the mark per phase
    finally:
        rss.stop()
        stop_daemon(proc)
    if restart:
        say(f"[bench daemon] second daemon: generate {generation}")
        proc, address = start_daemon(bundle, state, os.path.join(state, "daemon.log"), *restart)
        second = RssSampler(proc.pid, every=0.01)
        try:
            with EdgeClient(address, timeout=3600) as c:
                c.wait_ready(120)
                g, gen_wall = _generate(c, second, last.adapter_id, gen_steps)
            hwm = max(hwm, rss_peak_bytes(proc.pid), *second.peaks.values())
        finally:
            second.stop()
            stop_daemon(proc)
        rss.peaks["generate"] = second.peaks.get("generate", 0)
    if g.mode != generation:
        raise RuntimeError(f"the daemon generated {g.mode}, expected {generation} ({' '.join(extra or restart)})")
    with open(os.path.join(state, "jobs", last.job_id, "job.json")) as f:
        job = json.load(f)
    result["daemon"] = {
        "trainer": info.trainer, "executor": info.executor, "precompute": job["options"]["precompute"],
        "steps": steps, "job_s": job_s, "s_per_step": job_s / steps,
        "peak_rss_personalize_bytes": int(max(rss.peaks.get(k, 0) for k in JOB_PHASES)),
        # the job's phases as its event stream marks them: encode (request -> first PRECOMPUTING),
        # precompute (bank: until the last group is done; online mode interleaves it with train),
        # train (trainer construction, steps, adapter save)
        **{f"peak_rss_{k}_bytes": int(rss.peaks.get(k, 0)) for k in JOB_PHASES},
        "peak_rss_generate_bytes": int(rss.peaks.get("generate", 0)),
        "peak_rss_hwm_bytes": int(hwm), "idle_rss_bytes": int(idle),
        "generate_steps": gen_steps, "generate_latency_s": float(g.time_s), "generate_wall_s": gen_wall,
        "generate_mode": g.mode,
        # False: a second daemon generated (streamed: no budget both admits the job and streams), so no job's
        # leftovers are in its peak, which the bundle's generation prediction (after a job) includes
        "generate_after_job": not restart,
    }
    if plan is not None:
        d = result["daemon"]
        result["predicted"] = {"job_peak_bytes": plan.job_peak(d["precompute"]),
                               "generate_peak_bytes": plan.mode_peak(g.mode, int(man.gen_res))}
        result["prediction_errors"] = {
            "job": result["predicted"]["job_peak_bytes"] / d["peak_rss_personalize_bytes"] - 1,
            "generate": result["predicted"]["generate_peak_bytes"] / d["peak_rss_generate_bytes"] - 1}
    if torch_reference:
        say(f"[bench daemon] torch reference processes ({', '.join(reference_variants)})")
        path = model_dir(model)
        table = memory.run(path if path != "builtin" else "builtin", trainable,
                           variants=reference_variants)
        result["torch"] = {}
        for v in reference_variants:
            r = table[v]
            result["torch"][v] = {"peak_rss_bytes": r["peak_rss_total_bytes"], "peak_rss_above_imports_bytes":
                                  r["peak_rss_bytes"], "s_per_step": r["step_s"] + (r["precompute_s"] or 0.0),
                                  "tokens": r["tokens"]}
        s = result["torch"]["standard_lora"]
        d = result["daemon"]
        result["ratios"] = {
            "daemon_peak_rss_vs_torch_standard_lora": d["peak_rss_personalize_bytes"] / s["peak_rss_bytes"],
            "daemon_s_per_step_vs_torch_standard_lora": d["s_per_step"] / s["s_per_step"],
        }
        if "blockskip" in result["torch"]:
            result["ratios"]["daemon_peak_rss_vs_torch_blockskip"] = (
                d["peak_rss_personalize_bytes"] / result["torch"]["blockskip"]["peak_rss_bytes"])
    return result


JOB_PHASES = ("encode", "precompute", "train")


def _generate(client, rss, adapter_id: str, steps: int):
    """One benchmark image with the job's adapter, its RSS in the "generate" phase: (GenerateResult, wall s)."""
    rss.phase = "generate"
    t0 = time.perf_counter()
    g = client.generate("a sks star on a blue background", adapter_id=adapter_id, steps=steps, seed=1)
    wall = time.perf_counter() - t0
    rss.phase = None
    return g, wall


def _phase(ev, current: str | None) -> str | None:
    """The job phase a progress event opens (the RSS sampler attributes samples to it)."""
    from ..client import kind_name

    kind = kind_name(ev.kind)
    if kind == "PRECOMPUTING":
        return "train" if ev.progress >= 1.0 else "precompute"  # 1.0: every frozen group done
    if kind in ("STEP", "CHECKPOINT"):
        return "train"
    return current


def format_table(r: dict) -> str:
    mb = 2**20
    d = r["daemon"]
    lines = [f"model {r['model']['name']}: {r['model']['parameters'] / 1e6:.1f}M parameters, trainable blocks "
             f"{r['model']['trainable_blocks']}, train {r['model']['train_res']}px, generate {r['model']['gen_res']}px",
             f"daemon ({d['trainer']}, {d['executor']}, {d['precompute']} precompute): personalize peak RSS "
             f"{d['peak_rss_personalize_bytes'] / mb:.0f} MiB, {d['s_per_step']:.3f} s/step (whole job, {d['steps']} steps); "
             f"generate peak RSS {d['peak_rss_generate_bytes'] / mb:.0f} MiB, {d['generate_latency_s']:.2f} s "
             f"({d['generate_steps']} steps)"]
    for v, t in r.get("torch", {}).items():
        lines.append(f"torch {v:<14} peak RSS {t['peak_rss_bytes'] / mb:.0f} MiB, {t['s_per_step']:.3f} s/step "
                     f"(precompute included, {t['tokens']} tokens)")
    if "predicted" in r:
        p, e = r["predicted"], r["prediction_errors"]
        lines.append(f"the bundle's predictions ({r['model']['weights']} weights): job {p['job_peak_bytes'] / mb:.0f} MiB "
                     f"({e['job']:+.1%}), generate {d['generate_mode']} {p['generate_peak_bytes'] / mb:.0f} MiB "
                     f"({e['generate']:+.1%}) (predicted / measured - 1)")
    for k, v in r.get("ratios", {}).items():
        lines.append(f"{k}: {v:.3f}")
    return "\n".join(lines)

