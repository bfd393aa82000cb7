"""The bundle's manifest.json (edge_runtime.manifest.Manifest) from a finished CompileContext: block
list, graph descriptions, model facts, patch schedule, LoRA spec, recipe and sampler.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Any

from edge_runtime import graph_names as gn
from edge_runtime.manifest import Manifest
from edge_runtime.patch_sampling import PatchSchedule
from edge_runtime.recipe import Recipe

from .context import CompileContext
from .tensorrt_plan import PLAN_FILE


def build_manifest(ctx: CompileContext) -> Manifest:
    """The manifest of the bundle in ctx.tmp (files and their sha256 are added when it is written)."""
    adapter, plan, opts, recipe = ctx.adapter, ctx.plan, ctx.opts, ctx.recipe
    graphs = _graphs(ctx)
    block_list = [
        {"index": i, "name": adapter.block_names[i], "kind": adapter.block_kind(i),
         "role": gn.TRAINABLE_RUN if i in plan.trainable else gn.FROZEN_RUN, "group": _group_of(ctx)[i]}
        for i in range(adapter.num_blocks)
    ]
    crop_ids = crop_ids_of(recipe, adapter.family)
    return Manifest(
        family=adapter.family, blocks=block_list, trainable=list(plan.trainable), train_res=ctx.train_res,
        gen_res=ctx.gen_res, scheduler=ctx.objective.to_dict(),
        patch_schedule={**asdict(PatchSchedule(**recipe.patch_schedule(ctx.train_res, ctx.gen_res))),
                        "train_res": ctx.train_res, "gen_res": ctx.gen_res, "crop_ids": crop_ids},
        lora={**asdict(ctx.lora), "targets": list(ctx.lora.targets), "init": "B = 0 (the adapter starts at the base model)",
              "names": "diffusers/PEFT saved names (see graphs.*.lora)"},
        target=opts.target, graphs=graphs, model=_model(ctx),
        recipe=recipe.with_(train_res_fraction=ctx.train_res / ctx.gen_res, trainable_blocks=len(plan.trainable),
                            crop_ids=crop_ids).to_dict(),
        weights=ctx.weights, memory=ctx.memory,
        gen_sizes=[list(s) for s in dict.fromkeys(opts.gen_sizes)
                   if s not in {(ctx.gen_res, ctx.gen_res), (ctx.train_res, ctx.train_res)}],
    )


def _group_of(ctx: CompileContext) -> dict[int, str]:
    """Block index -> the manifest.graphs key of the graph that runs it in generation."""
    group_of: dict[int, str] = {}
    for spec in ctx.specs[1:-1]:
        for i in spec.blocks:
            group_of.setdefault(i, gn.graph_key(ctx.rel[spec.path]))
    return group_of


def _graphs(ctx: CompileContext) -> dict[str, Any]:
    graphs = {}
    for s in ctx.specs:
        d = s.to_dict()
        d["path"] = ctx.rel[s.path]
        graphs[gn.graph_key(ctx.rel[s.path])] = d
    graphs[gn.TRAINING] = {**ctx.tspec.to_dict(), "artifact_dir": gn.TRAINABLE_DIR}
    for name, d in ctx.extra.items():
        graphs[name] = {k: v for k, v in d.items() if k != "verification"}
    return graphs


def _model(ctx: CompileContext) -> dict[str, Any]:
    """manifest.model: where the model came from, its shape facts, the chain, the sampler, the checks."""
    adapter, opts, cond = ctx.adapter, ctx.opts, ctx.cond
    chain = [(gn.TRAINABLE_RUN if s.blocks[0] in ctx.plan.trainable else gn.FROZEN_RUN, list(s.blocks))
             for s in ctx.specs[1:-1]]
    return {
        "source": "builtin" if opts.model == "builtin" else os.path.abspath(opts.model),
        "family": adapter.family,
        "parameters": int(ctx.params),
        "num_blocks": adapter.num_blocks,
        "latent_channels": adapter.latent_channels,
        "vae_downsample": ctx.downsample,
        "resolution_multiple": ctx.multiple,
        "text": {"length": int(cond.text.shape[1]), "dim": int(cond.text.shape[2]),
                 "pooled_dim": None if cond.pooled is None else int(cond.pooled.shape[1]), "mask": cond.mask is not None},
        "guidance_embeds": bool(adapter.config.get("guidance_embeds")),
        "config": {k: v for k, v in adapter.config.items() if isinstance(v, (int, float, str, bool, list, type(None)))},
        "fingerprint": ctx.fingerprint,
        "compile_args": opts.fingerprint_args(),
        "precision": opts.precision,
        "generation_chain": [{"kind": k, "blocks": run} for k, run in chain],
        "max_group_params": ctx.group_limit,
        "sampler": sampler_config(ctx.loaded.root, ctx.objective, adapter.family),
        "selection": ctx.selection_report if ctx.selection_report is not None else {"given": list(ctx.blocks)},
        "verification": ctx.verification,
        "engines": PLAN_FILE,
    }


def crop_ids_of(recipe: Recipe, family: str) -> str:
    """The manifest's patch_schedule.crop_ids: FLUX places a training crop's tokens as the recipe says (the
    image coordinates of the place it was cut from, or its own grid); the other families have no position ids."""
    if family != "flux":
        return "grid"
    return recipe.crop_ids


def sampler_config(root: str | None, objective, family: str = "flux") -> dict[str, Any]:
    """How the device samples (edge_runtime/sampler.py), from the pipeline's scheduler_config.json.

    Flow models: Euler over sigmas 1 -> 0 with the scheduler's shift, or FLUX's resolution-dependent
    (dynamic) shift; epsilon models: DDIM (eta 0) over the DDPM betas.
    """
    cfg: dict[str, Any] = {}
    path = os.path.join(root, "scheduler", "scheduler_config.json") if root else None
    if path and os.path.exists(path):
        with open(path) as f:
            cfg = json.load(f)
    if objective.kind == "flow":
        out: dict[str, Any] = {"kind": "flow_euler", "shift": float(cfg.get("shift", 1.0)),
                               "dynamic_shift": bool(cfg.get("use_dynamic_shifting", False)),
                               # FluxPipeline passes sigmas linspace(1, 1/n, n); SD3's pipeline lets the
                               # scheduler space them (edge_runtime/sampler.flow_sigmas)
                               "spacing": "scheduler" if family == "sd3" else "pipeline_sigmas",
                               "num_train_timesteps": int(cfg.get("num_train_timesteps", 1000))}
        if out["dynamic_shift"]:
            out.update(base_shift=float(cfg.get("base_shift", 0.5)), max_shift=float(cfg.get("max_shift", 1.15)),
                       base_seq_len=int(cfg.get("base_image_seq_len", 256)),
                       max_seq_len=int(cfg.get("max_image_seq_len", 4096)))
        return out
    return {"kind": "ddim", **{k: v for k, v in objective.to_dict().items() if k != "kind"},
            "steps_offset": int(cfg.get("steps_offset", 0)), "set_alpha_to_one": bool(cfg.get("set_alpha_to_one", True))}
