"""Compile's stages, in order, each a function of the one CompileContext it fills in (see compile/bundle.py
for what each stage does and prints): check, select, export, train, shapes, verify, encoders, write.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from edge_runtime.manifest import ManifestError, load_manifest, write_manifest

from .checks import (
    check_blocks,
    check_options,
    check_out_dir,
    check_resolutions,
    default_gen_res,
    read_selection,
    resolution_multiple,
)
from .context import PROMPT, REL_BOUND, VERIFY_PARAM_LIMIT, CompileContext, CompileResult, fingerprint


def check(ctx: CompileContext) -> None:
    """1/7: arguments, model, resolutions, --out; sets ctx.result when the bundle there is up to date."""
    import torch

    from ..models import load_model
    from ..models.pipeline_parts import is_builtin, load_codec

    opts = ctx.opts
    ctx.say("[compile] 1/7 check: model, arguments, output directory")
    check_options(opts)
    ctx.is_bundle = check_out_dir(opts.out)
    ctx.loaded = load_model(opts.model)  # ModelError (a ValueError) for unsupported models
    adapter = ctx.adapter
    if opts.crop_ids == "image" and adapter.family != "flux":
        raise ValueError(f"--crop-ids image places FLUX's rotary position ids; a {adapter.family} model has none")
    ctx.root = ctx.loaded.root or ctx.loaded.transformer_dir
    ctx.builtin = is_builtin(opts.model)
    if not ctx.builtin and ctx.loaded.root is None:
        raise ValueError(
            f"model {opts.model!r} is a bare transformer folder; compile needs `builtin` or a full diffusers pipeline "
            "directory (text encoders, scheduler and VAE are read from it)"
        )
    ctx.codec = load_codec(opts.model)
    ctx.multiple = resolution_multiple(adapter, ctx.downsample)
    ctx.train_res, ctx.gen_res = check_resolutions(opts, ctx.multiple, default_gen_res(ctx.root, adapter, ctx.downsample))
    if opts.blocks is not None:
        ctx.blocks = check_blocks(opts.blocks, adapter.num_blocks)
    elif opts.selection:
        ctx.blocks, ctx.selection_report = read_selection(opts.selection, adapter.num_blocks)

    ctx.fingerprint = fingerprint(ctx.root, opts)
    if ctx.is_bundle and _up_to_date(ctx):
        return
    ctx.params = adapter.param_count()
    ctx.verify = opts.verify if opts.verify is not None else ctx.params < VERIFY_PARAM_LIMIT
    torch.manual_seed(opts.seed)


def _up_to_date(ctx: CompileContext) -> bool:
    """Whether the bundle at --out has this compile's fingerprint (then ctx.result says so)."""
    import time

    out = ctx.opts.out
    try:
        old = load_manifest(out)
        if old.model.get("fingerprint") == ctx.fingerprint and old.memory:
            ctx.say(f"[compile] {out} is up to date (same model files and arguments): nothing to do")
            ctx.result = CompileResult(out, True, old, old.model.get("verification", {}), time.time() - ctx.t0)
            return True
        ctx.say(f"[compile] {out} is a bundle of another model or arguments, or without the memory predictions "
                "the daemon admits by: rebuilding it")
    except ManifestError as e:
        ctx.say(f"[compile] {out} is a broken bundle ({e}): rebuilding it")
    return False


def select(ctx: CompileContext) -> None:
    """2/7: the trainable blocks, by cross-attention masking when neither --blocks nor --selection gave them."""
    opts, adapter = ctx.opts, ctx.adapter
    if ctx.blocks is None:
        ctx.say("[compile] 2/7 select: scoring blocks by cross-attention masking")
        k = ctx.recipe.blocks_of(adapter.num_blocks)
        ctx.selection_report = run_selection(opts.model, ctx.loaded, ctx.train_res, opts.select_count, opts.seed, k)
        ctx.blocks = tuple(ctx.selection_report["selected"])
    else:
        ctx.say(f"[compile] 2/7 select: trainable blocks {list(ctx.blocks)} from "
                f"{'--selection ' + opts.selection if opts.selection else '--blocks'}")
    ctx.say(f"[compile]   trainable blocks {list(ctx.blocks)} of {adapter.num_blocks}")


def run_selection(spec: str, loaded, res: int, count: int, seed: int, k: int) -> dict:
    """Score the blocks on `count` calibration images and pick the top k."""
    from ..method.selection import score_blocks, selection_report
    from ..selection_data import calibration_set

    items = calibration_set(spec, loaded, None, "sks", None, None, res, count, seed=seed)
    scores = score_blocks(loaded.adapter, loaded.objective, items, noise_levels=(0.25, 0.5, 0.75), noises=1, seed=seed)
    report = selection_report(loaded.adapter, scores, k, False)
    report["calibration"] = {"items": len(items), "res": res, "noise_levels": [0.25, 0.5, 0.75], "noises": 1, "seed": seed,
                             "images": "procedural shapes (edgeblock.builtin.world)"}
    return report


def _inputs(ctx: CompileContext, latents, t, cond=None):
    """Noised example inputs at noise level t for the compile prompt (or `cond`, an encoded prompt):
    (DiTInputs, noise, timesteps)."""
    import torch

    eps = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    tt = torch.full((latents.shape[0],), float(t))
    guidance = 1.0 if ctx.adapter.config.get("guidance_embeds") else None
    return (ctx.cond if cond is None else cond).inputs(ctx.objective.noisy(latents, eps, tt), ctx.objective.timestep(tt), guidance), eps, tt


def _latents(ctx: CompileContext, batch: int, side: int):
    import torch

    return torch.randn(batch, ctx.adapter.latent_channels, side, side, generator=ctx.generator)


def _group_limit(ctx: CompileContext) -> int | None:
    """Frozen-group cap in parameters (None: one group per skipped run)."""
    from ..method.blockskip import auto_group_limit

    opts, adapter = ctx.opts, ctx.adapter
    if opts.max_group_mb is not None and opts.max_group_mb < 0:
        raise ValueError(f"--max-group-mb must be >= 0 (0: no cap), got {opts.max_group_mb}")
    if opts.max_group_mb == 0:
        return None
    if opts.max_group_mb:
        return max(1, int(opts.max_group_mb * 2**20 / 4))
    return auto_group_limit([adapter.block_param_count(i) for i in range(adapter.num_blocks)], ctx.plan.trainable)


def export(ctx: CompileContext) -> None:
    """3/7: the inference graphs at the generation shape (dynamic axes serve the training shape too)."""
    import torch

    from ..method.blockskip import SkipPlan
    from ..method.lora import LoRASpec
    from ..models.pipeline_parts import load_text_stack
    from . import onnx_export as ox
    from .base_grid import base_rounding

    adapter, recipe = ctx.adapter, ctx.recipe
    ctx.plan = SkipPlan.make(adapter.num_blocks, ctx.blocks)
    ctx.lora = LoRASpec(rank=recipe.lora_rank, alpha=recipe.alpha)
    # under --weights int4 the trainable blocks train against the int8 base their inference graphs will hold
    adapter.set_base_rounding(ctx.plan.trainable, base_rounding(ctx.opts.weight_precision()))
    ctx.text = load_text_stack(ctx.opts.model)
    ctx.cond = ctx.text.encode([PROMPT])
    ctx.generator = torch.Generator().manual_seed(ctx.opts.seed)
    gen_side = ctx.gen_res // ctx.downsample
    ctx.say(f"[compile] 3/7 export: inference graphs ({ctx.gen_res}px generation, latent {gen_side}x{gen_side})")
    ctx.x_gen, _, _ = _inputs(ctx, _latents(ctx, ctx.opts.gen_batch, gen_side), 0.6)
    ctx.group_limit = _group_limit(ctx)
    ctx.specs = ox.export_inference_graphs(
        adapter, ctx.plan, ctx.lora, ctx.x_gen, ctx.tmp, max_group_params=ctx.group_limit,
        on_graph=lambda s: ctx.say(f"[compile]   {os.path.relpath(s.path, ctx.tmp)}" + _slices(s)))
    ctx.rel = {s.path: os.path.relpath(s.path, ctx.tmp).replace(os.sep, "/") for s in ctx.specs}


def _slices(spec) -> str:
    """What compile printed beside a graph: the slices its attention and feed-forward parts run in."""
    said = [f"attention in {spec.attention_chunks} query slices"] if spec.attention_chunks else []
    said += [f"feed-forward in {spec.feedforward_chunks} token slices"] if spec.feedforward_chunks else []
    return f"  ({', '.join(said)})" if said else ""


def train(ctx: CompileContext) -> None:
    """4/7: the ORT training artifacts at the fixed training shape (one precomputed draw, batch 1)."""
    from edge_runtime import graph_names as gn

    from ..method.blockskip import precompute
    from . import ort_training as ot

    train_side = ctx.train_res // ctx.downsample
    ctx.say(f"[compile] 4/7 train: ORT training artifacts ({ctx.train_res}px crops, latent {train_side}x{train_side})")
    x0 = _latents(ctx, 1, train_side)
    x_tr, eps, tt = _inputs(ctx, x0, 0.5)
    (ctx.pre,) = precompute(ctx.adapter, ctx.plan, [(x_tr, ctx.objective.target(x0, eps, tt))])
    # through the module attribute: tests replace it to fail midway
    ctx.tspec = ot.export_training_artifacts(ctx.adapter, ctx.plan, ctx.lora, ctx.pre,
                                             os.path.join(ctx.tmp, gn.TRAINABLE_DIR))


def shapes(ctx: CompileContext) -> None:
    """5/7: the ORT chain (zero LoRA) at the training and generation shapes -> engines/plan.json."""
    from .onnx_export import prologue_inputs
    from .tensorrt_plan import PLAN_FILE, chain_shapes, tensorrt_plan

    ctx.say("[compile] 5/7 shapes: ORT chain at the training and generation shapes -> engines/plan.json")
    zero = {n: np.zeros(d["shape"], np.float32) for s in ctx.specs for n, d in s.lora.items()}
    # ORT sessions are kept for the verification (small models); without it each graph's session is
    # dropped after its run, so the shape pass never holds the whole model in ONNX Runtime at once.
    ctx.sessions = {} if ctx.verify else None
    train_side, gen_side = ctx.train_res // ctx.downsample, ctx.gen_res // ctx.downsample
    ctx.x_tr, _, _ = _inputs(ctx, _latents(ctx, 1, train_side), 0.5)
    x_gen1, _, _ = _inputs(ctx, _latents(ctx, 1, gen_side), 0.5)
    shapes_tr, _ = chain_shapes(ctx.specs, {**prologue_inputs(ctx.x_tr), **zero}, ctx.sessions)
    shapes_gen, _ = chain_shapes(ctx.specs, {**prologue_inputs(x_gen1), **zero}, ctx.sessions)
    plan = tensorrt_plan(ctx, shapes_tr, shapes_gen)
    path = os.path.join(ctx.tmp, *PLAN_FILE.split("/"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(plan, f, indent=2)


def verify(ctx: CompileContext) -> None:
    """6/7: ONNX Runtime against torch (compile/verify.py), or why it is skipped."""
    from .verify import verify_bundle

    opts = ctx.opts
    ctx.verification = {"run": bool(ctx.verify)}
    if ctx.verify:
        ctx.say("[compile] 6/7 verify: ONNX Runtime against torch")
        ctx.verification = verify_bundle(ctx)
        ctx.verification["run"] = True
    else:
        why = "--no-verify" if opts.verify is False else f"{ctx.params / 1e9:.2f} B parameters >= 1 B"
        ctx.say(f"[compile] 6/7 verify: skipped ({why})")
        ctx.verification["skipped"] = why


def encoders(ctx: CompileContext) -> None:
    """The text encoder(s) + tokenizers, and the VAE of latent models, verified on the device's code path."""
    from ..models.pipeline_parts import load_codec
    from .encoders import export_text_encoder, export_vae

    opts = ctx.opts
    extra: dict[str, dict[str, Any]] = {}
    ctx.say("[compile]   text_encoder.onnx + tokenizer files")
    extra["text_encoder"] = export_text_encoder(ctx.text, ctx.tmp, ctx.verify)
    _text_parts(ctx, extra["text_encoder"])
    if ctx.downsample > 1:
        ctx.say("[compile]   vae_encoder.onnx + vae_decoder.onnx")
        extra["vae"] = export_vae(load_codec(opts.model), ctx.tmp, ctx.train_res, ctx.gen_res, ctx.verify, seed=opts.seed)
    if ctx.verify:
        for name, d in extra.items():
            r = d["verification"]
            ctx.verification[name] = r
            ctx.say(f"[compile]   {name:<28s} max abs {r['max_abs']:.2e}  rel {r['max_rel']:.2e}")
            if r["max_rel"] > REL_BOUND["fp32"]:
                raise RuntimeError(f"verification failed (no bundle written): {name} rel {r['max_rel']:.2e}")
    ctx.extra = extra


def _text_parts(ctx: CompileContext, desc: dict[str, Any]) -> None:
    """--text-parts: the text encoder cut into text_encoder/part_NN.onnx (compile/text_parts.py), the chained parts
    checked against the whole encoder (unless --no-verify); auto (0) cuts it when it is above the largest frozen
    group (the group cap, or the largest group's bytes when there is no cap)."""
    from edge_runtime import graph_names as gn

    from .text_parts import file_bytes, make_parts

    opts = ctx.opts
    count = opts.text_part_count()  # validated by CompileOptions
    limit = None
    if count == 0:
        groups = [file_bytes(s.path) for s in ctx.specs if s.kind == gn.GROUP]
        caps = [*groups, *([ctx.group_limit * 4] if ctx.group_limit else [])]  # the cap is in fp32 parameters
        limit = max(caps) if caps else None
    r = make_parts(ctx.tmp, desc, count, limit, check=opts.verify is not False)
    if r is None:
        return
    sizes = ", ".join(f"{p['bytes'] / 2**20:.1f}" for p in desc["parts"])
    ctx.say(f"[compile]   text encoder in {len(desc['parts'])} parts ({sizes} MiB; whole "
            f"{desc['whole_bytes'] / 2**20:.1f} MiB)" + (f": chained parts vs whole max abs {r['max_abs']:.2e}  "
                                                       f"rel {r['max_rel']:.2e}" if "max_rel" in r else ""))
    ctx.verification["text_encoder_parts"] = r


def weights(ctx: CompileContext) -> None:
    """--weights fp16/int8/int4: the frozen and generation graphs quantized and measured against fp32
    (compile/bundle_weights.py); nothing for fp32."""
    from .bundle_weights import quantize_bundle

    ctx.weights = quantize_bundle(ctx)


def memory(ctx: CompileContext) -> None:
    """The planner's predicted peaks of the daemon's operations on this bundle (compile/memory.py)."""
    from .memory import memory as predict

    predict(ctx)


def write(ctx: CompileContext) -> None:
    """7/7: manifest.json (sha256 of every file) into the bundle being built."""
    from .manifest_build import build_manifest

    ctx.manifest = build_manifest(ctx)
    ctx.say("[compile] 7/7 write: manifest.json")
    write_manifest(ctx.tmp, ctx.manifest)


# the stages that build the bundle in ctx.tmp, in order (check and select run before it exists)
BUILD = (export, train, shapes, verify, encoders, weights, memory, write)
