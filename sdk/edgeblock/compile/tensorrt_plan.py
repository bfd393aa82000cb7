"""engines/plan.json: the TensorRT build plan of a bundle's frozen groups, from the shapes the ONNX Runtime
chain sees at the training and the generation shape (data only: engines are built on the device).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from edge_runtime import graph_names as gn
from edge_runtime.engines.plan import PLAN, plan_document, plan_group
from edge_runtime.fileio import sha256_file
from edge_runtime.patch_sampling import with_grid_crop

from .context import CompileContext

TENSORRT_NOTE = (
    "TensorRT is not installable on the compiling host: this plan is data only. Engines are specific to the "
    "TensorRT version and GPU; build them where both are (the device at first start, or a host of the same "
    "platform) and cache them by TensorRT version + GPU name + ONNX sha256."
)
PLAN_FILE = PLAN  # the engine plan: written here, read by the device (edge_runtime.engines.plan)


def chain_shapes(specs, feeds, sessions) -> tuple[dict[str, dict[str, list[int]]], dict[str, np.ndarray]]:
    """Run the chain in ONNX Runtime and record each graph's input shapes (by graph path)."""
    from .onnx_run import run_chain

    acc: dict[str, Any] = dict(feeds)
    shapes = {}
    for spec in specs:
        acc = with_grid_crop(spec.inputs, acc)
        shapes[spec.path] = {n: list(np.shape(acc[n])) for n in spec.inputs}
        acc = run_chain([spec], acc, sessions)
    return shapes, acc


def _profile(shapes: dict[str, list[int]], axes: dict, batch: tuple[int, int, int]) -> dict:
    """min/opt/max per input: the batch axes span `batch`, every other axis is fixed at its shape."""
    out = {}
    for name, shape in shapes.items():
        mn, opt, mx = list(shape), list(shape), list(shape)
        for a, label in axes.get(name, {}).items():
            if label == "batch":
                mn[int(a)], opt[int(a)], mx[int(a)] = batch
        out[name] = {"min": mn, "opt": opt, "max": mx}
    return out


def tensorrt_plan(ctx: CompileContext, shapes_tr: dict, shapes_gen: dict) -> dict:
    """A TensorRT build plan per frozen group: optimisation profiles for training and generation."""
    precision = ctx.opts.precision
    groups = []
    for s in ctx.specs:
        if s.kind != gn.GROUP:
            continue
        path = ctx.rel[s.path]
        profiles = {
            # training: the frozen precompute at the fixed training shape (one draw at a time)
            "training": _profile(shapes_tr[s.path], s.dynamic_axes, (1, 1, 1)),
            # generation: batch 1 (no guidance) to gen_batch (classifier-free guidance)
            "generation": _profile(shapes_gen[s.path], s.dynamic_axes, (1, ctx.opts.gen_batch, ctx.opts.gen_batch)),
        }
        groups.append(plan_group(path, sha256_file(os.path.join(ctx.tmp, *path.split("/"))), s.blocks, profiles,
                                 precision, s.outputs))
    return plan_document(groups, precision, TENSORRT_NOTE)
