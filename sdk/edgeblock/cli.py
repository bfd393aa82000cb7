"""The `edgeblock` command line: the only place errors become exit codes and messages.

Subcommands mirror docs/ and ../shared/DESIGN.md: select, bench memory, ...
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

log = logging.getLogger("edgeblock")


def _blocks(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--blocks wants comma-separated block indices like 3,4; got {text!r}")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")


def cmd_select(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .method.selection import bar_chart, score_blocks, selection_report, write_report
    from .models import load_model
    from .selection_data import calibration_set

    loaded = load_model(args.model)
    items = calibration_set(args.model, loaded, args.images, args.token, args.class_noun, args.prompt, args.res, args.count)
    total = len(items) * len(args.noise_levels) * args.noises
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
    report = selection_report(loaded.adapter, scores, args.top_k, args.contiguous)
    report.update({"model": args.model, "token": args.token, "class_noun": args.class_noun, "calibration": {
        "items": len(items), "noise_levels": list(args.noise_levels), "noises": args.noises, "seed": args.seed}})
    write_report(report, args.out)
    chart = args.chart or os.path.splitext(args.out)[0] + ".png"
    bar_chart(scores, loaded.adapter.block_names, report["selected"], chart)
    print(f"selected blocks {report['selected']} -> {args.out} (chart {chart})")
    for r in report["ranking"][: min(8, len(scores))]:
        print(f"  #{r['rank']:<2} block {r['block']:>3} {r['name']:<32} {r['score']:.4f}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what != "memory":
        raise ValueError(f"unknown benchmark {args.what!r}; available: memory")
    from .bench import memory

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


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval.run import run_eval

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    results = run_eval(args.out, model=args.model, quick=args.quick, steps=args.steps, seed=args.seed,
                       blocks=args.blocks, dino=args.dino, clip=args.clip, progress=not args.quiet)
    with open(os.path.join(args.out, "results.md")) as f:
        print(f.read())
    print(f"done in {results['wall_s']:.0f} s: {args.out}/results.json, results.md, grid.png")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from PIL import Image

    from .generate import generate_images

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise ValueError(f"-o {args.output}: no such directory {out_dir}")
    image = generate_images(args.model, [args.prompt], seed=args.seed, steps=args.steps, guidance=args.guidance,
                            adapter=args.adapter)[0]
    Image.fromarray(image).save(args.output)
    print(f"{args.output}: {image.shape[1]}x{image.shape[0]} ({args.prompt!r}, seed {args.seed}, {args.steps} steps)")
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from .compile.bundle import CompileOptions, compile_bundle

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    opts = CompileOptions(
        model=args.model, out=args.out, blocks=args.blocks, selection=args.selection, target=args.target,
        train_res=args.train_res, gen_res=args.gen_res, lora_rank=args.lora_rank, precision=args.precision,
        verify=False if args.no_verify else None, seed=args.seed,
    )
    compile_bundle(opts, progress=print)
    return 0


def cmd_build_engines(args: argparse.Namespace) -> int:
    from edge_runtime.engines import build_engines

    if args.workspace_mb is not None and args.workspace_mb <= 0:
        raise ValueError(f"--workspace-mb must be positive, got {args.workspace_mb}")
    workspace = args.workspace_mb * 2**20 if args.workspace_mb is not None else None
    built = build_engines(args.bundle, cache_dir=args.cache_dir, workspace_bytes=workspace, progress=print, force=args.force)
    for g in built["groups"]:
        how = "cached" if g["cached"] else f"built in {g['build_s']:.1f} s"
        print(f"  {g['onnx']:<28} -> {g['engine']} ({how}, {g['precision']}, profiles {', '.join(g['profiles'])})")
    print(f"engines for TensorRT {built['tensorrt_version']} on {built['gpu_name']}: {args.bundle}/engines/built.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgeblock", description="On-device DiT personalization (DiT-BlockSkip)")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("select", help="rank blocks for personalization by cross-attention masking")
    s.add_argument("--model", required=True, help="`builtin` or a local diffusers pipeline directory")
    s.add_argument("--out", required=True, help="ranked JSON report (a bar chart PNG is written beside it)")
    s.add_argument("--images", nargs="*", default=None, help="subject images (default: procedural shapes)")
    s.add_argument("--token", default="sks", help="the rare subject token")
    s.add_argument("--class-noun", default=None, help="the subject's class noun (default: from the calibration images)")
    s.add_argument("--prompt", default=None, help="calibration prompt containing {token} and {noun}")
    s.add_argument("--top-k", type=int, default=2)
    s.add_argument("--contiguous", action="store_true", help="choose the best contiguous window of k blocks")
    s.add_argument("--noise-levels", type=_floats, default=(0.25, 0.5, 0.75))
    s.add_argument("--noises", type=int, default=2)
    s.add_argument("--count", type=int, default=4, help="calibration images when none are given")
    s.add_argument("--res", type=int, default=None, help="calibration image side in pixels")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--chart", default=None)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_select)

    b = sub.add_parser("bench", help="benchmarks that print figures")
    b.add_argument("what", choices=["memory"])
    b.add_argument("--model", default=None, help="default: the FLUX-shaped >=100M benchmark config")
    b.add_argument("--blocks", type=_blocks, default=None, help="trainable blocks for the skip variants")
    b.add_argument("--runtime", choices=["torch", "ort"], default="torch",
                   help="ort: add the ONNX Runtime training step (the device trainer) as ort_blockskip")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench)

    e = sub.add_parser("eval", help="personalization benchmark: quality and memory table, sample grid")
    e.add_argument("--out", required=True, help="directory for results.json, results.md and grid.png")
    e.add_argument("--model", default="builtin", help="`builtin` or a directory laid out like it")
    e.add_argument("--quick", action="store_true", help="one subject, two prompts, a few steps (smoke test)")
    e.add_argument("--steps", type=int, default=None, help="training steps per subject and variant (default 300)")
    e.add_argument("--blocks", type=_blocks, default=None, help="trainable blocks of the skip rows (default: selection)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--dino", default=None, help="local DINO ViT folder (transformers) for the DINO metric")
    e.add_argument("--clip", default=None, help="local CLIP folder (transformers) for CLIP-I and CLIP-T")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="text to image with the built-in model, in this process")
    g.add_argument("--model", default="builtin", help="`builtin` or a directory laid out like it")
    g.add_argument("--prompt", required=True)
    g.add_argument("-o", "--output", required=True, help="PNG to write")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, default=30)
    g.add_argument("--guidance", type=float, default=3.0)
    g.add_argument("--adapter", default=None, help="LoRA adapter .safetensors (edgeblock format)")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("compile", help="compile a model into a verified device bundle (ONNX, ORT training, TensorRT plan)")
    c.add_argument("--model", required=True, help="`builtin` or a local diffusers pipeline directory")
    c.add_argument("--out", required=True, help="bundle directory (new, empty, or an existing bundle to update)")
    c.add_argument("--blocks", type=_blocks, default=None, help="trainable blocks, e.g. 3,4 (default: run selection)")
    c.add_argument("--selection", default=None, help="a selection.json written by `edgeblock select`")
    c.add_argument("--target", default="cpu", choices=["cpu", "orin-nano-8gb", "orin-nx-16gb", "agx-orin-32gb", "agx-orin-64gb"])
    c.add_argument("--train-res", type=int, default=None, help="training crop side in pixels (default: half of --gen-res)")
    c.add_argument("--gen-res", type=int, default=None, help="generation side in pixels (default: the model's)")
    c.add_argument("--lora-rank", type=int, default=4)
    c.add_argument("--precision", default="fp32", choices=["fp32", "fp16"], help="TensorRT engine precision (ONNX graphs are fp32)")
    c.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs torch verification")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=cmd_compile)

    be = sub.add_parser("build-engines", help="build and cache the TensorRT engines of a bundle's frozen groups (on the device)")
    be.add_argument("bundle", metavar="BUNDLE", help="a bundle written by `edgeblock compile`")
    be.add_argument("--cache-dir", default=None, help="engine cache directory (default: BUNDLE/engines/cache)")
    be.add_argument("--workspace-mb", type=int, default=None, help="TensorRT builder workspace limit in MiB (default: TensorRT's)")
    be.add_argument("--force", action="store_true", help="rebuild engines even when the cache has them")
    be.set_defaults(func=cmd_build_engines)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"edgeblock {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
