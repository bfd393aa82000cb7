"""Compile's weights step (`--weights fp16|int8|int4`): the frozen groups, the trainable runs' inference graphs
(under int4 on the int8 grid that export put their base on, compile/base_grid.py), the text encoder (each of its
parts) and the prologue and epilogue rewritten with weight-only quantized MatMul weights (compile/quantize.py), each
measured against its fp32 self on real feeds; the training artifacts and the VAE stay fp32
(edge_runtime.weights.graph_precision).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from edge_runtime import graph_names as gn
from edge_runtime.fileio import sha256_file
from edge_runtime.patch_sampling import with_grid_crop
from edge_runtime.weights import (FP32, GRAPH_ROLES, GROUP, INT4, INT4_BLOCK_SIZE, SHELL, TEXT, TRAINED, VAE,
                                  graph_precision)

from .base_grid import grid_move, trained_on_grid
from .context import PROMPT, CompileContext

# the chain graphs by the role that sets their precision (graph_precision)
CHAIN_ROLES = {gn.PROLOGUE: SHELL, gn.GROUP: GROUP, gn.TRAINABLE_INFER: TRAINED, gn.EPILOGUE: SHELL}
ROLE_NAMES = {GROUP: "frozen groups", TRAINED: "trainable blocks' inference graphs", TEXT: "text encoder",
              SHELL: "prologue and epilogue", VAE: "the VAE"}


def quantize_bundle(ctx: CompileContext) -> dict[str, Any]:
    """Quantize the bundle in ctx.tmp in place; returns the manifest's `weights` ({} for fp32).

    {"precision", "block_size" (int4) , "graphs": {graph key: {"precision", "rel_error", "max_abs", "bytes_fp32",
    "bytes", "matrices"}}, "chain": {"rel_error", "max_abs"}, "trained_base" (int4: compile/base_grid.grid_move)}:
    each graph at the precision its role takes (edge_runtime.weights.graph_precision: under int4 the text encoders,
    prologue, epilogue and trainable runs take int8);
    rel_error = max over the graph's outputs of ||fp32 - quantized|| / ||fp32||, on the generation-shape feeds the
    fp32 graphs compute (each graph on fp32 inputs); chain: the prediction of the quantized chain (zero LoRA)
    against the fp32 chain's. A non-finite error fails the compile.
    """
    precision = ctx.opts.weight_precision()
    if precision == FP32:
        return {}
    ctx.sessions = None  # the fp32 sessions of the shape/verify passes: their graphs are about to change
    block = INT4_BLOCK_SIZE if precision == INT4 else None
    by: dict[str, list[str]] = {}
    for role in GRAPH_ROLES:
        if role != VAE or "vae" in ctx.extra:  # a pixel-space model has none
            by.setdefault(graph_precision(precision, role), []).append(ROLE_NAMES[role])
    ctx.say(f"[compile]   weights {precision}" + (f" (blocks of {block})" if block else "") + ": "
            + "; ".join(f"{', '.join(names)} {p}" for p, names in by.items() if p != FP32)
            + f"; {' and '.join(by.get(FP32, []) + ['the training artifacts'])} stay fp32"
            + (" (the trainable blocks' base on their graphs' grid)" if trained_on_grid(precision) else ""))
    graphs: dict[str, dict[str, Any]] = {}
    moved = grid_move(ctx.adapter, ctx.plan.trainable, precision) if trained_on_grid(precision) else None
    if moved is not None:
        ctx.say(f"[compile]   trainable blocks' base on the {moved['precision']} grid: {moved['matrices']} matrices "
                f"moved by at most {moved['rel_error']:.2e} relative")
    pred_fp32, feeds0 = _quantize_chain(ctx, precision, graphs)
    text = ctx.extra.get("text_encoder")
    text_w = graph_precision(precision, TEXT)
    if text is not None and text.get("parts"):
        _quantize_text_parts(ctx, text, text_w, graphs)
    elif text is not None:
        text["external_data"] = _quantize_file(ctx, text["path"], text_w, _text_feeds(ctx, text), graphs)
    chain = _chain_error(ctx, pred_fp32, feeds0)
    ctx.say(f"[compile]   weights {precision}: chain prediction rel {chain['rel_error']:.2e}  "
            f"max abs {chain['max_abs']:.2e}")
    _refresh_plan_hashes(ctx)
    out: dict[str, Any] = {"precision": precision, "graphs": graphs, "chain": chain}
    if moved is not None:
        out["trained_base"] = moved
    if block:
        out["block_size"] = block
    return out


def _quantize_chain(ctx: CompileContext, precision: str, graphs: dict):
    """Prologue, frozen groups, trainable runs, epilogue at the generation shape: each on the fp32 chain's inputs.
    int4 frozen groups are rounded with their inputs' Hessians on the calibration draws (_calibration_inputs) and to
    nearest, and measured on the verification draw, which is not one of them; the rounding with the smaller error is
    kept (the trainable runs are never int4: graph_precision)."""
    from . import onnx_export as ox

    zero = {n: np.zeros(d["shape"], np.float32) for s in ctx.specs for n, d in s.lora.items()}
    feeds0 = {k: ox._np(v) for k, v in {**ox.prologue_inputs(ctx.x_gen), **zero}.items()}
    acc: dict[str, Any] = dict(feeds0)
    calibrate = any(graph_precision(precision, r) == INT4 for r in set(CHAIN_ROLES.values()))
    cal = [{k: ox._np(v) for k, v in {**ox.prologue_inputs(x), **zero}.items()}
           for x in (_calibration_inputs(ctx) if calibrate else [])]
    for spec in ctx.specs:
        acc = with_grid_crop(spec.inputs, acc)
        cal = [with_grid_crop(spec.inputs, a) for a in cal]
        out = ox.run_onnx(spec.path, acc)  # fp32, before the file changes
        cal_out = [ox.run_onnx(spec.path, a) for a in cal]
        w = graph_precision(precision, CHAIN_ROLES[spec.kind]) if spec.kind in CHAIN_ROLES else FP32
        if w != FP32:
            feeds = {n: acc[n] for n in spec.inputs if n in acc}
            cal_feeds = [{n: a[n] for n in spec.inputs if n in a} for a in cal] if w == INT4 else []
            spec.external_data = _quantize_file(ctx, ctx.rel[spec.path], w, feeds, graphs, cal_feeds)
        gn.fold_outputs(acc, out, spec.state_in, spec.state_out)
        for a, o in zip(cal, cal_out):
            gn.fold_outputs(a, o, spec.state_in, spec.state_out)
    return acc[gn.PREDICTION], feeds0


# int4 calibration draws: batch-1 generation-shape inputs at these noise levels, the compile prompt and the empty
# (guidance) prompt in turn, latents from their own seeded stream (the verification draw is not among them)
CALIBRATION_T = (0.15, 0.4, 0.65, 0.9)


def _calibration_inputs(ctx: CompileContext) -> list:
    """DiTInputs of the int4 calibration draws (CALIBRATION_T)."""
    import torch

    from .stages import _inputs

    g = torch.Generator().manual_seed(int(ctx.opts.seed) + 7919)
    side = ctx.gen_res // ctx.downsample
    conds = [ctx.cond, ctx.text.encode([""])]
    out = []
    for i, t in enumerate(CALIBRATION_T):
        latents = torch.randn(1, ctx.adapter.latent_channels, side, side, generator=g)
        out.append(_inputs(ctx, latents, t, conds[i % 2])[0])
    return out


def _quantize_file(ctx: CompileContext, rel: str, precision: str, feeds: dict, graphs: dict,
                   calibration: list[dict] | None = None) -> bool:
    """Quantize one graph file in place to `precision`, measure it on `feeds`, record it under its graph key;
    returns external data? With `calibration` feeds (int4), the codes are also rounded with the MatMul inputs'
    Hessians on them (compile/gptq.py), and the rounding with the smaller error on `feeds` is kept."""
    import onnx

    from . import onnx_export as ox
    from .gptq import input_hessians
    from .quantize import quantization_error, quantize_model, quantized_inputs

    path = os.path.join(ctx.tmp, *rel.split("/"))
    before = _file_bytes(path)
    model = onnx.load(path)  # with its external data
    q, report = quantize_model(model, precision, block_size=INT4_BLOCK_SIZE)
    errors = quantization_error(model, q, feeds)
    if calibration:  # calibrated rounding, kept where it beats rounding to nearest on the verification draw
        hessians = input_hessians(model, quantized_inputs(model), calibration)
        qc, report_c = quantize_model(model, precision, block_size=INT4_BLOCK_SIZE, hessians=hessians)
        del hessians
        errors_c = quantization_error(model, qc, feeds)
        if _worst(errors_c) < _worst(errors):
            q, report, errors = qc, report_c, errors_c
        del qc
    del model
    rel_error = max((e["rel"] for e in errors.values()), default=0.0)
    max_abs = max((e["max_abs"] for e in errors.values()), default=0.0)
    external = ox.save_onnx(q, path)
    after = _file_bytes(path)
    key = gn.graph_key(rel)
    graphs[key] = {"precision": precision, "rel_error": rel_error, "max_abs": max_abs, "bytes_fp32": before,
                   "bytes": after, "matrices": report["quantized"]}
    if calibration:  # int4 matrices rounded with calibration Hessians (0: rounding to nearest measured better)
        graphs[key]["calibrated"] = report["calibrated"]
    ctx.say(f"[compile]   {rel:<28} {precision} rel {rel_error:.2e}  max abs {max_abs:.2e}  "
            f"{before / 2**20:.2f} -> {after / 2**20:.2f} MiB ({report['quantized']} matrices)")
    if not np.isfinite(rel_error) or not np.isfinite(max_abs):
        raise RuntimeError(f"verification failed (no bundle written): {rel} at {precision} gives a non-finite error "
                           f"({rel_error}, {max_abs})")
    return external


def _worst(errors: dict) -> float:
    return max((e["rel"] for e in errors.values()), default=0.0)


def _file_bytes(path: str) -> int:
    data = path + ".data"
    return os.path.getsize(path) + (os.path.getsize(data) if os.path.exists(data) else 0)


def _text_feeds(ctx: CompileContext, desc: dict) -> dict[str, np.ndarray]:
    """The text encoder's inputs for the compile prompt and the empty guidance prompt, through the device's
    own tokenizers and embedding lookups (edge_runtime/text.py); no session is opened."""
    from edge_runtime.text import TextEncoder

    return TextEncoder(ctx.tmp, desc, streamed=True).feeds([PROMPT, ""])


def _quantize_text_parts(ctx: CompileContext, desc: dict, precision: str, graphs: dict) -> None:
    """Each part of a text encoder compiled in parts (text_encoder/part_NN.onnx), on the inputs the fp32 parts
    before it compute, recorded under its own graph key; its description's bytes become the quantized file's."""
    from . import onnx_export as ox
    from .text_parts import file_bytes

    acc: dict[str, np.ndarray] = dict(_text_feeds(ctx, desc))
    for part in desc["parts"]:
        feeds = {n: acc[n] for n in part["inputs"]}
        acc.update(ox.run_onnx(os.path.join(ctx.tmp, *part["path"].split("/")), feeds))  # fp32, before it changes
        part["external_data"] = _quantize_file(ctx, part["path"], precision, feeds, graphs)
        part["bytes"] = file_bytes(os.path.join(ctx.tmp, *part["path"].split("/")))


def _chain_error(ctx: CompileContext, pred_fp32: np.ndarray, feeds0: dict) -> dict[str, float]:
    from . import onnx_export as ox

    from .quantize import array_error

    e = array_error(pred_fp32, ox.run_chain(ctx.specs, feeds0, {})[gn.PREDICTION])
    r = {"rel_error": e["rel"], "max_abs": e["max_abs"]}
    if not all(np.isfinite(v) for v in r.values()):
        raise RuntimeError(f"verification failed (no bundle written): the quantized chain's error is not finite: {r}")
    return r


def _refresh_plan_hashes(ctx: CompileContext) -> None:
    """engines/plan.json names each frozen group's ONNX sha256 (the quantized file's now) and the engine precision
    the weights take (edge_runtime.engines.plan.engine_precision: int8 engines for int8, none for int4)."""
    from edge_runtime.engines.plan import engine_precision

    from .tensorrt_plan import PLAN_FILE

    path = os.path.join(ctx.tmp, *PLAN_FILE.split("/"))
    with open(path) as f:
        plan = json.load(f)
    precision = engine_precision(ctx.opts.weight_precision(), ctx.opts.precision)
    if precision is None:
        plan["groups"] = []
        plan["note"] += (f" No engines for {ctx.opts.weight_precision()} weights: TensorRT's ONNX parser does not "
                         "read com.microsoft MatMulNBits; ONNX Runtime runs the frozen groups.")
    else:
        plan["precision"] = precision
    for g in plan["groups"]:
        g["onnx_sha256"] = sha256_file(os.path.join(ctx.tmp, *g["onnx"].split("/")))
        g["precision"] = precision
    with open(path, "w") as f:
        json.dump(plan, f, indent=2)
