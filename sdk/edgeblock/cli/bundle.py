"""`edgeblock compile` and `build-engines`: make a model into a device bundle, then build its TensorRT engines
(on the device).
"""

from __future__ import annotations

import argparse
import logging

from edge_runtime.targets import BUNDLE_TARGETS, CPU
from edge_runtime.weights import WEIGHTS

from . import argtypes


def cmd_compile(args: argparse.Namespace) -> int:
    from ..compile.bundle import CompileOptions, compile_bundle

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    opts = CompileOptions(
        model=args.model, out=args.out, blocks=args.blocks, selection=args.selection, target=args.target,
        train_res=args.train_res, gen_res=args.gen_res, lora_rank=args.lora_rank, precision=args.precision,
        verify=False if args.no_verify else None, seed=args.seed, max_group_mb=args.max_group_mb,
        crop_ids=args.crop_ids, top_k=args.top_k, weights=args.weights, text_parts=args.text_parts,
        gen_sizes=args.gen_sizes or (),
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


def register(sub) -> None:
    """Add compile and build-engines to `edgeblock`'s subparsers."""
    c = sub.add_parser("compile", help="compile a model into a verified device bundle (ONNX, ORT training, TensorRT plan)")
    c.add_argument("--model", required=True, help="`builtin` or a local diffusers pipeline directory")
    c.add_argument("--out", required=True, help="bundle directory (new, empty, or an existing bundle to update)")
    c.add_argument("--blocks", type=argtypes.blocks, default=None, help="trainable blocks, e.g. 3,4 (default: run selection)")
    c.add_argument("--selection", default=None, help="a selection.json written by `edgeblock select`")
    c.add_argument("--top-k", type=argtypes.positive_int, default=None,
                   help="blocks the selection picks when neither --blocks nor --selection is given "
                        "(default: the model's recipe: 5 for builtin, 2 otherwise)")
    c.add_argument("--target", default=CPU, choices=list(BUNDLE_TARGETS))
    c.add_argument("--train-res", type=int, default=None,
                   help="training crop side in pixels (default: the model's recipe: 3/4 of --gen-res for builtin, half otherwise)")
    c.add_argument("--gen-res", type=int, default=None, help="generation side in pixels (default: the model's)")
    c.add_argument("--gen-sizes", type=argtypes.sizes, default=None, metavar="WxH,...",
                   help="more generation sizes the bundle serves beside the squares of --gen-res and --train-res, "
                        "e.g. 768x512,512x768 (each side a multiple of the model's; memory predicted for each)")
    c.add_argument("--lora-rank", type=int, default=None, help="default: the model's recipe (8 for builtin, 4 otherwise)")
    c.add_argument("--precision", default="fp32", choices=["fp32", "fp16"], help="TensorRT engine precision (ONNX graphs are fp32)")
    c.add_argument("--weights", default=None, choices=list(WEIGHTS),
                   help="weight precision of the frozen groups, text encoder and generation graphs (the trainable "
                        "blocks train in fp32, under int4 on their inference graphs' int8 base): default what "
                        "--target needs (cpu fp32, AGX Orin fp16, Orin NX int8, "
                        "Orin Nano int4); the error against fp32 is measured and recorded in the manifest")
    c.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs torch verification")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--max-group-mb", type=float, default=None,
                   help="cap each frozen group's fp32 weights (MiB): the bank precompute holds one group at a time "
                        "(default: the trainable blocks' size; 0: one group per skipped run)")
    c.add_argument("--text-parts", type=int, default=None, metavar="N",
                   help="cut the text encoder into N consecutive parts (text_encoder/part_NN.onnx) the device runs one "
                        "after another, streamed when memory is short; 0: auto, so that no part is above the largest "
                        "frozen group; 1: one text_encoder.onnx (default: auto for a Jetson --target, 1 for cpu)")
    c.add_argument("--crop-ids", choices=("grid", "image"), default=None,
                   help="FLUX: position ids of the daemon's training crops, the coordinates of the place in the "
                        "image they were cut from (image, the recipe's) or their own token grid (grid)")
    c.set_defaults(func=cmd_compile)

    be = sub.add_parser("build-engines", help="build and cache the TensorRT engines of a bundle's frozen groups (on the device)")
    be.add_argument("bundle", metavar="BUNDLE", help="a bundle written by `edgeblock compile`")
    be.add_argument("--cache-dir", default=None, help="engine cache directory (default: BUNDLE/engines/cache)")
    be.add_argument("--workspace-mb", type=int, default=None, help="TensorRT builder workspace limit in MiB (default: TensorRT's)")
    be.add_argument("--force", action="store_true", help="rebuild engines even when the cache has them")
    be.set_defaults(func=cmd_build_engines)
