"""`edgeblock select`, `bench`, `plan` and `eval`: the commands that study a model and print what they find
(block scores, benchmark figures, predicted memory, the personalization benchmark's table).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from edge_runtime.memory_plan import DAEMON_MODES, GENERATION_MODES, RESIDENT
from edge_runtime.precompute import PRECOMPUTE_MODES
from edge_runtime.targets import HOST_CPU, JETSONS
from edge_runtime.weights import WEIGHTS

from . import argtypes


def cmd_select(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..method import model_recipe
    from ..method.selection import bar_chart, score_blocks, selection_report, write_report
    from ..models import load_model
    from ..selection_data import calibration_set

    loaded = load_model(args.model)
    items = calibration_set(args.model, loaded, args.images, args.token, args.class_noun, args.prompt, args.res, args.count)
    total = len(items) * len(args.noise_levels) * args.noises
    if args.ray:
        from ..cluster.selection import ActorResources, score_blocks_ray
        from ..cluster.session import connect

        resources = ActorResources(args.ray_actors, args.ray_cpus_per_task, args.ray_gpus_per_task)
        with connect(args.ray) as ray, tqdm(total=total * loaded.adapter.num_blocks, desc="selection", unit="task",
                                             disable=args.quiet) as bar:
            scores = score_blocks_ray(ray, args.model, loaded.adapter.num_blocks, items, args.noise_levels,
                                      args.noises, seed=args.seed, resources=resources,
                                      progress=lambda done, _: bar.update(done - bar.n))
    else:
        with tqdm(total=total, desc="selection", unit="draw", disable=args.quiet) as bar:
            scores = score_blocks(
                loaded.adapter,
                loaded.objective,
                items,
                noise_levels=args.noise_levels,
                noises=args.noises,
                seed=args.seed,
                progress=lambda done, _: bar.update(done - bar.n),
            )
    top_k = args.top_k if args.top_k is not None else model_recipe(args.model).blocks_of(len(scores))
    report = selection_report(loaded.adapter, scores, top_k, args.contiguous)
    report.update({"model": args.model, "token": args.token, "class_noun": args.class_noun, "calibration": {
        "items": len(items), "noise_levels": list(args.noise_levels), "noises": args.noises, "seed": args.seed}})
    write_report(report, args.out)
    chart = args.chart or os.path.splitext(args.out)[0] + ".png"
    bar_chart(scores, loaded.adapter.block_names, report["selected"], chart)
    print(f"selected blocks {report['selected']} -> {args.out} (chart {chart})")
    for r in report["ranking"][: min(8, len(scores))]:
        print(f"  #{r['rank']:<2} block {r['block']:>3} {r['name']:<32} {r['score']:.4f}")
    return 0


_DAEMON_ONLY = ("weights", "train_res", "gen_res", "generation", "no_torch")


def cmd_bench(args: argparse.Namespace) -> int:
    given = [n for n in _DAEMON_ONLY if getattr(args, n) not in (None, False)]
    if given and args.what != "daemon":
        flags = ", ".join("--" + n.replace("_", "-") for n in given)
        raise ValueError(f"{flags}: only `edgeblock bench daemon` takes these (bench scale compiles every weights "
                         "precision and measures every generation mode itself)")
    if args.what == "daemon":
        return _bench_daemon(args)
    if args.what == "scale":
        return _bench_scale(args)
    if args.what != "memory":
        raise ValueError(f"unknown benchmark {args.what!r}; available: memory, daemon, scale")
    from ..bench import memory

    def show(v, r):
        if not args.json:
            tensors = f"{r['peak_bytes'] / 2**20:8.1f} MiB" if r["peak_bytes"] is not None else "       -    "
            pre = f"{r['precompute_s']:.3f} s" if r["precompute_s"] is not None else "(as blockskip)"
            print(
                f"{v:<14} peak tensors {tensors}  peak RSS {r['peak_rss_bytes'] / 2**20:8.1f} MiB"
                f"  step {r['step_s']:.3f} s  precompute {pre}  ({r['tokens']} tokens)"
            )
        else:
            print(f"[bench] {v} done", file=sys.stderr)

    result = memory.run(args.model, args.blocks, progress=show, runtime=args.runtime)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.get("ratios", {}).items():
            print(f"{k}: {v:.3f}")
        for k, v in result.get("ort_vs_torch_blockskip", {}).items():
            print(f"ort_blockskip_{k}_vs_torch_blockskip: {v:.3f}")
    return 0


def _bench_scale(args: argparse.Namespace) -> int:
    from ..bench import scale

    names = args.configs or list(scale.SCALE_CONFIGS)
    for n in names:
        scale.scale_config(n)  # unknown names fail before any work
    say = (lambda m: print(m, file=sys.stderr)) if args.json else print
    results = scale.run(names, steps=args.steps or 2, gen_steps=args.gen_steps or 1, progress=say)
    print(json.dumps(results, indent=2) if args.json else scale.format_table(results))
    return 0


def _bench_daemon(args: argparse.Namespace) -> int:
    from ..bench import daemon

    models = [args.model] if args.model else ["builtin", "bench"]
    say = (lambda m: print(m, file=sys.stderr)) if args.json else print
    results = {}
    for m in models:
        results[m] = daemon.run(m, steps=args.steps or 20, gen_steps=args.gen_steps or 10, blocks=args.blocks,
                                progress=say, torch_reference=not args.no_torch, weights=args.weights,
                                train_res=args.train_res, gen_res=args.gen_res, generation=args.generation or RESIDENT)
        if not args.json:
            print(daemon.format_table(results[m]))
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from ..plan.predict import PlanOptions, format_plan, plan
    from ..plan.targets import targets

    if args.table:
        from ..plan.table import fits_table

        print(fits_table(args.table_out))
        return 0
    if not args.config:
        raise ValueError("--config is required (a transformer config.json, its folder, `builtin`, or a shipped name: "
                         "flux1-dev, sd35-medium, pixart-sigma-xl-2-1024, sana-600m-1024, sana-1600m-1024)")
    names = list(targets()) if args.target == "all" else [args.target]
    results = {}
    for t in names:
        results[t] = plan(PlanOptions(args.config, t, train_res=args.train_res, gen_res=args.gen_res, blocks=args.blocks,
                                      weights=args.weights, generation=args.generation,
                                      text_encoder=args.text_encoder, lora_rank=args.lora_rank,
                                      precompute=args.precompute, max_group_mb=args.max_group_mb))
    if args.json:
        print(json.dumps(results[names[0]] if len(names) == 1 else results, indent=2))
    else:
        print("\n\n".join(format_plan(r) for r in results.values()))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ..eval.run import run_eval

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    if args.seeds is not None and args.seed is not None:
        print("edgeblock eval: give --seed or --seeds, not both", file=sys.stderr)
        return 2

    settings = dict(steps=args.steps, blocks=args.blocks, dino=args.dino, clip=args.clip,
                    lr=args.lr, lora_rank=args.rank, top_k=args.top_k, captions=args.captions,
                    crop_ids=args.crop_ids, contiguous=args.contiguous or None, samples=args.samples,
                    prior=args.prior, prior_share=args.prior_share, subject_set=args.subject_set, rows=args.rows,
                    train_res=args.train_res, patch_min=args.patch_min, runtime=args.runtime,
                    weights=args.weights or (), ablations=args.ablations or None)

    if args.ray:  # every seed's units on the cluster at once; then the folders as the runs below write them
        from ..cluster.evaluation import run_eval_ray
        from ..cluster.session import connect
        from ..eval.run import EvalConfig
        from ..eval.seeds import seed_dir

        seeds = args.seeds if args.seeds is not None else [args.seed if args.seed is not None else 0]
        runs = {s: (seed_dir(args.out, s) if args.seeds is not None else args.out,
                    EvalConfig.make(args.model, args.quick, seed=s, **settings)) for s in seeds}
        with connect(args.ray) as ray:
            done = run_eval_ray(ray, runs, args.ray_cpus_per_task, args.ray_gpus_per_task, progress=not args.quiet)

        def one(out: str, seed: int) -> dict:  # the finished runs, for run_seeds to aggregate
            return done[seed]
    else:
        def one(out: str, seed: int) -> dict:
            return run_eval(out, model=args.model, quick=args.quick, seed=seed, progress=not args.quiet, **settings)

    if args.seeds is not None:
        from ..eval.seeds import run_seeds

        results = run_seeds(args.out, args.seeds, one)
    else:
        results = one(args.out, args.seed if args.seed is not None else 0)
    with open(os.path.join(args.out, "results.md")) as f:
        print(f.read())
    print(f"done in {results['wall_s']:.0f} s: {args.out}/results.json, results.md, grid.png"
          + (" (each seed's run in seed-N/)" if args.seeds is not None else ""))
    return 0


def _ray_arguments(p: argparse.ArgumentParser, what: str, whose: str) -> None:
    p.add_argument("--ray", default=None, metavar="ADDRESS",
                   help=f"run {what} on a Ray cluster: auto (the one Ray finds), local (one started in this "
                        "process) or HOST:PORT (needs `pip install edgeblock[cluster]`; docs/scale.md)")
    p.add_argument("--ray-cpus-per-task", type=float, default=1.0, metavar="N",
                   help=f"with --ray: CPUs {whose} (default 1)")
    p.add_argument("--ray-gpus-per-task", type=float, default=0.0, metavar="N",
                   help=f"with --ray: GPUs {whose} (default 0)")


def register(sub) -> None:
    """Add select, bench, plan and eval to `edgeblock`'s subparsers."""
    s = sub.add_parser("select", help="rank blocks for personalization by cross-attention masking")
    s.add_argument("--model", required=True, help="`builtin` or a local diffusers pipeline directory")
    s.add_argument("--out", required=True, help="ranked JSON report (a bar chart PNG is written beside it)")
    s.add_argument("--images", nargs="*", default=None, help="subject images (default: procedural shapes)")
    s.add_argument("--token", default="sks", help="the rare subject token")
    s.add_argument("--class-noun", default=None, help="the subject's class noun (default: from the calibration images)")
    s.add_argument("--prompt", default=None, help="calibration prompt containing {token} and {noun}")
    s.add_argument("--top-k", type=argtypes.positive_int, default=None,
                   help="blocks to select (default: the model's recipe: 5 for builtin, 2 otherwise)")
    s.add_argument("--contiguous", action="store_true", help="choose the best contiguous window of k blocks")
    s.add_argument("--noise-levels", type=argtypes.floats, default=(0.25, 0.5, 0.75))
    s.add_argument("--noises", type=int, default=2)
    s.add_argument("--count", type=int, default=4, help="calibration images when none are given")
    s.add_argument("--res", type=int, default=None, help="calibration image side in pixels")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--chart", default=None)
    s.add_argument("--quiet", action="store_true")
    _ray_arguments(s, "the masked passes on Ray actors, one per worker, each holding the model once",
                   "of each actor")
    s.add_argument("--ray-actors", type=argtypes.positive_int, default=None,
                   help="with --ray: actors to start (default: as many as the cluster's free CPUs, or GPUs, hold)")
    s.set_defaults(func=cmd_select)

    b = sub.add_parser("bench", help="benchmarks that print figures")
    b.add_argument("what", choices=["memory", "daemon", "scale"],
                   help="memory: the method's training variants; daemon: the edge daemon beside torch; scale: the "
                        "daemon's job and generation peaks (fp32/int8/int4; resident, resident_rows, streamed) on "
                        "0.1B-1.1B models")
    b.add_argument("--model", default=None,
                   help="memory: default the FLUX-shaped >=100M benchmark config; daemon: builtin, bench (the >=100M "
                        "FLUX-shaped config laid out like builtin) or a builtin-layout directory (default: both)")
    b.add_argument("--steps", type=int, default=None,
                   help="daemon: personalization steps (default 20); scale: steps of its job (default 2)")
    b.add_argument("--configs", type=lambda s: [c for c in s.split(",") if c], default=None,
                   help="scale: comma-separated configurations (default: flux-0.1b,flux-0.5b,flux-1b)")
    b.add_argument("--gen-steps", type=int, default=None,
                   help="sampling steps of each generation (daemon: the timed one, default 10; scale: default 1)")
    b.add_argument("--blocks", type=argtypes.blocks, default=None, help="trainable blocks for the skip variants")
    b.add_argument("--runtime", choices=["torch", "ort"], default="torch",
                   help="ort: add the ONNX Runtime training step (the device trainer) as ort_blockskip")
    b.add_argument("--weights", choices=list(WEIGHTS), default=None,
                   help="daemon: compile the bundle with these frozen weights (default: compile's, fp32 on this host)")
    b.add_argument("--train-res", type=argtypes.positive_int, default=None,
                   help="daemon: compile's --train-res (default: the model's recipe)")
    b.add_argument("--gen-res", type=argtypes.positive_int, default=None,
                   help="daemon: compile's --gen-res (default: the model's own resolution)")
    b.add_argument("--generation", choices=list(DAEMON_MODES), default=None,
                   help="daemon: generate resident (default: the daemon's default budget), resident_rows or streamed "
                        "(under a --memory-budget between the bundle's predicted peak in that mode and its resident "
                        "peak, so that the daemon's admission control picks it; in a second daemon, with the job's "
                        "adapter, where the job is predicted above the resident generation)")
    b.add_argument("--no-torch", action="store_true",
                   help="daemon: skip the torch reference processes (they train at the model's own resolution)")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench)

    pl = sub.add_parser("plan", help="predict the peak memory of each device phase from a transformer config.json")
    pl.add_argument("--config", default=None,
                    help="diffusers transformer config.json (or its folder), `builtin`, or a shipped name: flux1-dev, "
                         "sd35-medium, pixart-sigma-xl-2-1024, sana-600m-1024, sana-1600m-1024")
    pl.add_argument("--target", default="orin-nx-16gb",
                    help=f"{', '.join((*JETSONS, HOST_CPU))}, or all")
    pl.add_argument("--train-res", type=int, default=None,
                    help="training crop side in pixels (default: the model's recipe; gen-res / 2 without a measured one)")
    pl.add_argument("--gen-res", type=int, default=None, help="generation side in pixels (default: the family's)")
    pl.add_argument("--blocks", type=argtypes.blocks, default=None,
                    help="trainable blocks (default: the recipe's number of blocks, the middle ones; two without a measured recipe)")
    pl.add_argument("--weights", choices=list(WEIGHTS), default=None,
                    help="as `edgeblock compile --weights`: the frozen groups, text encoders and generation graphs "
                         "(default: fp16 on Jetson, fp32 on host-cpu; the trainable blocks' inference graphs take "
                         "int8 under int4 and fp16 under int8 / fp16, their training stays fp32)")
    pl.add_argument("--generation", choices=list(GENERATION_MODES), default=RESIDENT,
                    help="resident: every graph held while sampling (fast); streamed: one graph at a time, as the "
                         "daemon generates when its memory budget is short (default: resident)")
    pl.add_argument("--text-encoder", choices=list(GENERATION_MODES), default=None,
                    help="resident: the text encoders loaded whole (and kept open by a resident generation); "
                         "streamed: in parts, each loaded for its own run in every job and generation (`edgeblock "
                         "compile --text-parts`; default: as compile does for the target, parts on Jetson)")
    pl.add_argument("--lora-rank", type=int, default=None, help="default: the model's recipe (4 without a measured one)")
    pl.add_argument("--precompute", choices=list(PRECOMPUTE_MODES), default=None,
                    help="default: the daemon's rule (bank above 256 MiB of transformer weights)")
    pl.add_argument("--max-group-mb", type=float, default=None,
                    help="as `edgeblock compile --max-group-mb` (default: auto, the trainable blocks' size; 0: no cap)")
    pl.add_argument("--table", action="store_true", help="print the what-fits-where table of the shipped configs")
    pl.add_argument("--table-out", default=None, help="with --table: also write it (Markdown) to this file")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_plan)

    e = sub.add_parser("eval", help="personalization benchmark: quality and memory table, sample grid")
    e.add_argument("--out", required=True, help="directory for results.json, results.md and grid.png")
    e.add_argument("--model", default="builtin", help="`builtin` or a directory laid out like it")
    e.add_argument("--quick", action="store_true", help="one subject, two prompts, a few steps (smoke test)")
    e.add_argument("--steps", type=int, default=None, help="training steps per subject and variant (default 300)")
    e.add_argument("--blocks", type=argtypes.blocks, default=None, help="trainable blocks of the skip rows (default: selection)")
    e.add_argument("--top-k", type=int, default=None, help="blocks selection picks for the skip rows (default 5)")
    e.add_argument("--contiguous", action="store_true",
                   help="selection picks the best window of --top-k consecutive blocks (default: the top-k blocks)")
    e.add_argument("--lr", type=float, default=None, help="learning rate of every fine-tuned row (default 0.003)")
    e.add_argument("--rank", type=int, default=None, help="LoRA rank of every fine-tuned row (default 8)")
    e.add_argument("--captions", choices=("per-image", "token"), default=None,
                   help="training prompts: each reference's own caption, 'a large sks star on a blue background, "
                        "top left' (per-image, default), or 'a sks <noun>' for every reference (token)")
    e.add_argument("--crop-ids", choices=("grid", "image"), default=None,
                   help="position ids of the patch rows' crops: the coordinates of the place in the image they "
                        "were cut from (image, default; what the daemon does) or their own token grid (grid)")
    e.add_argument("--train-res", type=int, default=None, metavar="PX",
                   help="training crop side of the patch rows in pixels (default: 3/4 of the generation side, 48 on builtin)")
    e.add_argument("--patch-min", type=float, default=None, metavar="F",
                   help="the smallest crop (noise level 0) as a fraction of the image side, in (0, 1] (default: "
                        "--train-res / the generation side: the smallest crop at the image's own scale)")
    e.add_argument("--samples", type=int, default=None,
                   help="images generated per prompt, each from its own noise (default 1)")
    e.add_argument("--prior", type=int, default=None, metavar="N",
                   help="prior preservation: N class images per subject, generated by the base model from prompts "
                        "of the subject's class noun, trained on by every fine-tuned row (default 0: none)")
    e.add_argument("--prior-share", type=float, default=None,
                   help="share of the training draws taken from the class images, in (0, 1) (default 0.5)")
    e.add_argument("--subject-set", choices=("benchmark", "validation"), default=None,
                   help="the benchmark's subjects (default) or the validation designs, held out from every choice "
                        "of the defaults")
    e.add_argument("--rows", type=argtypes.rows, default=None,
                   help="comma-separated rows to run, of base, standard_lora, patch, skip, blockskip, the "
                        "ablation rows (--ablations), and blockskip_device with --runtime device (default: all of them; the targets need base, "
                        "standard_lora and blockskip, the device target blockskip_device too)")
    e.add_argument("--runtime", choices=("torch", "device"), default=None,
                   help="device: add the row blockskip_device, DiT-BlockSkip through `edgeblock compile` (into OUT/bundle), "
                        "the daemon's ONNX Runtime trainer and the device's generation (default: torch rows only)")
    e.add_argument("--weights", type=argtypes.rows, default=None, metavar="int8,int4",
                   help="add the quantized device rows blockskip_device_<w>: DiT-BlockSkip through a bundle compiled "
                        "with --weights w (into OUT/bundle-w), judged against the fp32 blockskip_device row (which "
                        "runs too; implies --runtime device)")
    e.add_argument("--ablations", action="store_true",
                   help="add the paper's ablation rows beside blockskip, each trained as it but for one thing: "
                        "no_residuals, schedule_shrinking, schedule_random, resize_only, skip_first, skip_last, "
                        "selection_contiguous (docs/eval.md)")
    e.add_argument("--seed", type=int, default=None, help="seed of the training draws and generations (default 0)")
    e.add_argument("--seeds", type=argtypes.seeds, default=None, metavar="0,1,2",
                   help="one run per seed into OUT/seed-N, then each metric's mean and min-max spread per row in "
                        "OUT/results.json and results.md; the targets are judged on the means")
    e.add_argument("--dino", default=None, help="local DINO ViT folder (transformers) for the DINO metric")
    e.add_argument("--clip", default=None, help="local CLIP folder (transformers) for CLIP-I and CLIP-T")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    _ray_arguments(e, "each (row, subject, seed) fine-tune and its generations as a task", "of each task")
    e.set_defaults(func=cmd_eval)
