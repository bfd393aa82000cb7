"""`edgeblock generate`: text to image in this process (--model), or on an edge daemon (--server, through
daemon_client.generate_remote).
"""

from __future__ import annotations

import argparse
import logging
import os

from .daemon_client import client_flags, generate_remote


def cmd_generate(args: argparse.Namespace) -> int:
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise ValueError(f"-o {args.output}: no such directory {out_dir}")
    if args.server:
        return generate_remote(args)
    for flag in ("size", "negative_prompt", "num_images", "width", "height"):
        if getattr(args, flag) is not None:
            raise ValueError(f"--{flag.replace('_', '-')} needs --server (in-process generation makes one image at "
                             "the model's size)")
    if args.adapter and len(args.adapter) > 1:
        raise ValueError("in-process generation applies one --adapter file; several adapters need --server")
    from PIL import Image

    from ..generate import generate_images

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    model = args.model or "builtin"
    seed = 0 if args.seed is None else args.seed
    steps = 30 if args.steps is None else args.steps
    guidance = 3.0 if args.guidance is None else args.guidance
    adapter = args.adapter[0] if args.adapter else None
    image = generate_images(model, [args.prompt], seed=seed, steps=steps, guidance=guidance, adapter=adapter)[0]
    Image.fromarray(image).save(args.output)
    print(f"{args.output}: {image.shape[1]}x{image.shape[0]} ({args.prompt!r}, seed {seed}, {steps} steps)")
    return 0


def register(sub) -> None:
    """Add generate to `edgeblock`'s subparsers."""
    g = sub.add_parser("generate", help="text to image: in this process (--model) or on an edge daemon (--server)")
    g.add_argument("--model", default=None, help="`builtin` (default) or a directory laid out like it; not with --server")
    g.add_argument("--prompt", required=True)
    g.add_argument("-o", "--output", required=True, help="PNG to write")
    g.add_argument("--seed", type=int, default=None, help="default 0 (with --server: the daemon's default seed, Info.defaults.seed)")
    g.add_argument("--steps", type=int, default=None, help="default 30 (with --server: the bundle's default)")
    g.add_argument("--guidance", type=float, default=None, help="default 3.0 (with --server: the bundle's default)")
    g.add_argument("--adapter", action="append", default=None, metavar="ADAPTER",
                   help="LoRA adapter .safetensors (edgeblock format); with --server: an adapter id on the daemon, "
                        "ID or ID:SCALE (scale 0 = the base model, 1 = as trained), repeated to apply several at once")
    g.add_argument("--size", type=int, default=None, help="image side in pixels, one of the bundle's sizes (--server only)")
    g.add_argument("--width", type=int, default=None, help="image width in pixels, with --height: a size the bundle "
                   "serves (GetInfo's gen_sizes; compile --gen-sizes adds non-square ones; --server only)")
    g.add_argument("--height", type=int, default=None, help="image height in pixels, with --width (--server only)")
    g.add_argument("--negative-prompt", default=None,
                   help="what the image should not show: classifier-free guidance steers away from it (--server only)")
    g.add_argument("--num-images", type=int, default=None,
                   help="images to make, seeds SEED, SEED+1, ...; written as OUT-0.png, OUT-1.png, ... (--server only)")
    g.add_argument("--quiet", action="store_true", help="no progress bar (--server)")
    client_flags(g, required=False)
    g.set_defaults(func=cmd_generate)
