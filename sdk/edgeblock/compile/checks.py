"""Compile's checks of its arguments, the model and --out, run before anything is written.

Each raises ValueError naming the bad value and the fix.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from edge_runtime.manifest import MANIFEST
from edge_runtime.targets import BUNDLE_TARGETS
from edge_runtime.patch_sampling import CROP_IDS
from edge_runtime.weights import WEIGHTS

from .context import PRECISIONS, CompileOptions


def check_options(opts: CompileOptions) -> None:
    """The arguments on their own (before the model is loaded)."""
    if opts.target not in BUNDLE_TARGETS:
        raise ValueError(f"--target {opts.target!r} is not one of {', '.join(BUNDLE_TARGETS)}")
    if opts.precision not in PRECISIONS:
        raise ValueError(f"--precision {opts.precision!r} is not one of {', '.join(PRECISIONS)}")
    if opts.lora_rank is not None and opts.lora_rank < 1:
        raise ValueError(f"--lora-rank must be >= 1, got {opts.lora_rank}")
    if opts.blocks is not None and opts.selection:
        raise ValueError("give --blocks or --selection, not both")
    if opts.weights not in (None, *WEIGHTS):
        raise ValueError(f"--weights {opts.weights!r} is not one of {', '.join(WEIGHTS)}")
    if opts.crop_ids not in (None, *CROP_IDS):
        raise ValueError(f"--crop-ids {opts.crop_ids!r} is not one of {', '.join(CROP_IDS)}")


def check_out_dir(out: str) -> bool:
    """True when --out is an existing bundle (to be reused or replaced); False when absent or empty.

    Anything else (a file, a non-empty directory without manifest.json) is refused.
    """
    if not os.path.exists(out):
        parent = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(parent):
            raise ValueError(f"--out {out}: the parent directory {parent} does not exist")
        return False
    if not os.path.isdir(out):
        raise ValueError(f"--out {out} exists and is not a directory; give a new path or an existing bundle")
    if os.path.exists(os.path.join(out, MANIFEST)):
        return True
    if os.listdir(out):
        raise ValueError(
            f"--out {out} exists and is not a bundle (no {MANIFEST}); refusing to overwrite it. "
            "Give a new path, an empty directory or an existing bundle"
        )
    return False


def resolution_multiple(adapter, downsample: int) -> int:
    """Pixel sides must be divisible by this: the VAE downsampling x the patch (FLUX: packing) size."""
    patch = adapter.pack if adapter.family == "flux" else int(adapter.config.get("patch_size") or 1)
    return downsample * patch


def default_gen_res(root: str, adapter, downsample: int) -> int:
    side = adapter.config.get("sample_size")
    if isinstance(side, int) and side > 0:
        return side * downsample
    for name in ("vae/config.json", "edgeblock.json"):
        p = os.path.join(root, name)
        if os.path.exists(p):
            with open(p) as f:
                cfg = json.load(f)
            if name.startswith("vae") and isinstance(cfg.get("sample_size"), int):
                return cfg["sample_size"]
            if isinstance(cfg.get("latent_size"), int):
                return cfg["latent_size"] * downsample
    return 512


def check_resolutions(opts: CompileOptions, multiple: int, default_gen: int) -> tuple[int, int]:
    gen = opts.gen_res if opts.gen_res is not None else default_gen
    train = opts.train_res if opts.train_res is not None else opts.recipe().train_res(gen, multiple)
    for name, v in (("--gen-res", gen), ("--train-res", train)):
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive number of pixels, got {v!r}")
        if v % multiple:
            raise ValueError(
                f"{name} {v} is not divisible by {multiple} (the VAE downsampling x the patch size this model needs); "
                f"try {max(multiple, v // multiple * multiple)}"
            )
    if train > gen:
        raise ValueError(f"--train-res {train} is larger than --gen-res {gen}: the training crop is a part of the image")
    for w, h in opts.gen_sizes:
        if w % multiple or h % multiple:
            raise ValueError(f"--gen-sizes {w}x{h}: each side must be divisible by {multiple} (the VAE downsampling x "
                             f"the patch size this model needs); try {max(multiple, w // multiple * multiple)}x"
                             f"{max(multiple, h // multiple * multiple)}")
    return train, gen


def check_blocks(blocks: Sequence[int], num_blocks: int, what: str = "--blocks") -> tuple[int, ...]:
    chosen = sorted({int(b) for b in blocks})
    if not chosen:
        raise ValueError(f"{what} is empty: choose at least one trainable block (all blocks skipped trains nothing)")
    bad = [b for b in chosen if not 0 <= b < num_blocks]
    if bad:
        raise ValueError(f"{what}: blocks {bad} out of range; this model has blocks 0..{num_blocks - 1}")
    return tuple(chosen)


def read_selection(path: str, num_blocks: int) -> tuple[tuple[int, ...], dict]:
    try:
        with open(path) as f:
            report = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"--selection {path}: no such file")
    except json.JSONDecodeError as e:
        raise ValueError(f"--selection {path} is not JSON: {e}")
    if not isinstance(report, dict) or not isinstance(report.get("selected"), list):
        raise ValueError(f"--selection {path}: no `selected` block list (write it with `edgeblock select`)")  # noqa: TRY004
    if report.get("num_blocks") not in (None, num_blocks):
        raise ValueError(f"--selection {path} is for a model with {report['num_blocks']} blocks; this one has {num_blocks}")
    return check_blocks(report["selected"], num_blocks, f"--selection {path}"), report
