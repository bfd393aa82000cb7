"""Compile's memory stage: the planner's predicted peak of each daemon operation on this bundle (a job per
precompute mode, a generation per size, resident and streamed) for the bundle's target, written into
manifest.memory (edge_runtime.memory_plan) for the daemon's admission control (`edgeblock serve --memory-budget`).

The planner reads the transformer's config; the text encoders and the VAE it is given are the bundle's own
(their parameter counts, the text length), not its family's published defaults.
"""

from __future__ import annotations

import os
from typing import Any

from edge_runtime.memory_plan import (GENERATION_MODES, RESIDENT, ROWS_PEAK, STREAMED, MemoryPlan, equivalent_side,
                                      text_encoder_streamed)
from edge_runtime.precompute import PRECOMPUTE_MODES
from edge_runtime.targets import CPU, HOST_CPU


def _params(module: Any, prefixes: tuple[str, ...] | None = None) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if prefixes is None or n.startswith(prefixes))


def text_stack_params(stack: Any) -> int:
    """Parameters of every torch module a text stack holds, through edgeblock's own wrappers (the builtin
    MiniLM encoder); tokenizers hold none."""
    from torch import nn

    seen: set[int] = set()

    def walk(obj: Any, depth: int) -> int:
        if id(obj) in seen:
            return 0
        seen.add(id(obj))
        if isinstance(obj, nn.Module):
            return _params(obj)
        if isinstance(obj, (list, tuple)):
            return sum(walk(v, depth) for v in obj)
        if depth < 3 and type(obj).__module__.startswith("edgeblock") and hasattr(obj, "__dict__"):
            return sum(walk(v, depth + 1) for v in vars(obj).values())
        return 0

    return walk(stack, 0)


def transformer_config(root: str) -> str:
    """The model's transformer config.json (a pipeline's transformer/, or the transformer folder itself)."""
    for p in (os.path.join(root, "transformer", "config.json"), os.path.join(root, "config.json")):
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(f"{root}: no transformer/config.json or config.json")


def planner_target(bundle_target: str) -> str:
    """The planner's name of a bundle target: a CPU bundle runs on a CPU like the calibration host's."""
    return HOST_CPU if bundle_target == CPU else bundle_target


def predict_memory(ctx) -> dict[str, Any]:
    """manifest.memory for the bundle ctx is building."""
    from ..plan.inventory import load_inventory
    from ..plan.predict import PlanOptions, plan

    opts = ctx.opts
    config = transformer_config(ctx.root)
    inv = load_inventory(config, pipeline_text=False)  # the text terms come from the loaded encoders below
    inv.text_encoder_params = text_stack_params(ctx.text)
    inv.text_lookup_params = sum(d["rows"] * d["dim"] for d in ctx.extra.get("text_encoder", {}).get("lookups", []))
    inv.text_tokens = int(ctx.text.length)
    vae = getattr(ctx.codec, "vae", None)
    if vae is not None:
        inv.pixel_space = False
        inv.vae_scale = ctx.downsample
        inv.vae_encoder_params = _params(vae, ("encoder.", "quant_conv."))
        inv.vae_decoder_params = _params(vae, ("decoder.", "post_quant_conv."))
    target = planner_target(opts.target)
    # a text encoder in parts is streamed in every operation, resident generations included (the device's rule)
    text_mode = STREAMED if text_encoder_streamed(ctx.extra.get("text_encoder")) else RESIDENT
    base = dict(target=target, blocks=tuple(ctx.plan.trainable), weights=opts.weight_precision(),
                lora_rank=ctx.lora.rank, max_group_mb=opts.max_group_mb, text_encoder=text_mode)
    jobs, by_size, r = {}, {}, None
    for mode in PRECOMPUTE_MODES:  # the precompute mode does not change generation: gen_res's comes with these
        r = plan(PlanOptions(config, train_res=ctx.train_res, gen_res=ctx.gen_res, precompute=mode, **base), inv=inv)
        jobs[mode] = r["methods"]["blockskip"]["job_peak_bytes"]
        by_size[ctx.gen_res] = r["generation"]
    extra = {equivalent_side(w, h, ctx.multiple) for w, h in opts.gen_sizes}  # what the daemon looks them up by
    for size in ({ctx.train_res} | extra) - {ctx.gen_res}:
        by_size[size] = plan(PlanOptions(config, train_res=size, gen_res=size, **base), inv=inv)["generation"]
    generate: dict[str, dict] = {m: {} for m in GENERATION_MODES}
    for size, g in sorted(by_size.items()):
        for m in GENERATION_MODES:
            generate[m][size] = {"peak_bytes": g[m]["peak_bytes"], "weights_bytes": g[m]["parts"]["weights_bytes"],
                                 **({ROWS_PEAK: g[m][ROWS_PEAK]} if ROWS_PEAK in g[m] else {})}
    plan_ = MemoryPlan(target, bool(r["target"]["measured"]), opts.weight_precision(),
                       int(r["target"]["daemon_runtime_bytes"]), jobs, generate)
    return plan_.to_dict()


def memory(ctx) -> None:
    """The stage: predictions into ctx.memory (manifest.memory)."""
    from edge_runtime.memory_plan import format_size

    ctx.memory = predict_memory(ctx)
    m = ctx.memory
    ctx.say(f"[compile]   predicted peaks on {m['planner_target']}: job "
            + ", ".join(f"{k} {format_size(v)}" for k, v in m["job_peak_bytes"].items()) + "; generate "
            + ", ".join(f"{s}px {mode} {format_size(f['peak_bytes'])}"
                        for mode, by in m["generate"].items() for s, f in by.items()))
