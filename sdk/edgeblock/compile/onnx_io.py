"""Tracing a function of named tensors to an ONNX file: export_module, input pruning, renaming, saving.

TorchScript exporter (dynamo=False); IR capped at what ONNX Runtime 1.19.2 reads; graphs over ~1.8 GB
of initializers saved with external data (`<file>.data`).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from ..models.base import DiTAdapter
from .export_patches import export_patches
from .named_tensors import axes_for

OPSET = 17
MAX_IR_VERSION = 10  # ONNX Runtime 1.19.2 reads IR <= 10 (FACTS)
EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # bytes of initializers; protobuf's hard limit is 2 GiB


class _Graph(nn.Module):
    """A function of named tensors returning named tensors, as a module the tracer can export."""

    def __init__(self, fn: Callable[[dict[str, Tensor]], dict[str, Tensor]], in_names: list[str], parts: Mapping[str, nn.Module]):
        super().__init__()
        self.parts = nn.ModuleDict(dict(parts))
        self._fn = fn
        self._in = list(in_names)

    def forward(self, *args: Tensor) -> tuple[Tensor, ...]:
        return tuple(self._fn(dict(zip(self._in, args))).values())


def _consumed(graph: onnx.GraphProto) -> set[str]:
    used: set[str] = set()
    for n in graph.node:
        used.update(n.input)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                used |= _consumed(a.g)
            for g in a.graphs:
                used |= _consumed(g)
    used.update(o.name for o in graph.output)
    return used


def prune_unused_inputs(model: onnx.ModelProto, keep: Sequence[str] = ()) -> list[str]:
    """Drop graph inputs no node reads (the exporter keeps them); returns the dropped names."""
    used = _consumed(model.graph) | set(keep)
    dropped = [i.name for i in model.graph.input if i.name not in used]
    kept = [i for i in model.graph.input if i.name in used]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    return dropped


def initializer_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for t in model.graph.initializer:
        if t.HasField("raw_data"):
            total += len(t.raw_data)
        else:
            n = int(np.prod(t.dims)) if len(t.dims) else 1
            total += n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


def save_onnx(model: onnx.ModelProto, path: str, external_threshold: int = EXTERNAL_DATA_THRESHOLD) -> bool:
    """Save with IR <= 10; initializers over `external_threshold` bytes go to `<file>.data`. Returns external?"""
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    location = os.path.basename(path) + ".data"
    data_path = os.path.join(os.path.dirname(os.path.abspath(path)), location)
    if os.path.exists(data_path):
        os.remove(data_path)  # save_model appends to an existing data file
    external = initializer_bytes(model) > external_threshold
    if external:
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=location, size_threshold=1024)
    else:
        onnx.save_model(model, path)
    return external


def export_module(
    fn: Callable[[dict[str, Tensor]], dict[str, Tensor]],
    example: Mapping[str, Tensor],
    path: str,
    *,
    parts: Mapping[str, nn.Module] = {},
    opset: int = OPSET,
    training: bool = False,
    dynamic: bool = True,
    batch: int | None = None,
    keep_inputs: Sequence[str] = (),
    rename: Mapping[str, str] | None = None,
    external_threshold: int = EXTERNAL_DATA_THRESHOLD,
    adapter: DiTAdapter | None = None,
) -> tuple[list[str], list[str], dict[str, dict[int, str]], bool, dict[str, Tensor]]:
    """Trace `fn` (named tensors -> named tensors) to ONNX at `path`.

    Inference (training=False): TrainingMode.EVAL, constant folding on.
    Training: TrainingMode.TRAINING, constant folding off (FACTS), no dynamic axes.
    `rename` renames initializers (module parameter names -> published names).
    Returns (inputs, outputs, dynamic_axes, external, torch outputs of the example).
    """
    in_names = list(example)
    module = _Graph(fn, in_names, parts)
    with export_patches(adapter, list(parts.values()), training), torch.no_grad():
        ref = fn(dict(example))
    out_names = list(ref)
    axes: dict[str, dict[int, str]] = {}
    if dynamic:
        for n, t in list(example.items()) + list(ref.items()):
            a = axes_for(n, t, batch)
            if a:
                axes[n] = a
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = os.path.join(tmp, "model.onnx")
        with export_patches(adapter, list(parts.values()), training), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                tuple(example[n] for n in in_names),
                tmp_path,
                dynamo=False,
                opset_version=opset,
                input_names=in_names,
                output_names=out_names,
                dynamic_axes=axes or None,
                do_constant_folding=not training,
                training=torch.onnx.TrainingMode.TRAINING if training else torch.onnx.TrainingMode.EVAL,
                export_params=True,
                keep_initializers_as_inputs=False,
            )
        model = onnx.load(tmp_path)  # external data, if torch wrote any, is read back in
    prune_unused_inputs(model, keep_inputs)
    if rename:
        rename_tensors(model, rename)
    external = save_onnx(model, path, external_threshold)
    inputs = [i.name for i in model.graph.input]
    axes = {k: v for k, v in axes.items() if k in inputs or k in out_names}
    return inputs, out_names, axes, external, ref


def rename_tensors(model: onnx.ModelProto, mapping: Mapping[str, str]) -> None:
    """Rename initializers / values everywhere in the main graph."""
    g = model.graph
    for t in g.initializer:
        if t.name in mapping:
            t.name = mapping[t.name]
    for coll in (g.input, g.output, g.value_info):
        for v in coll:
            if v.name in mapping:
                v.name = mapping[v.name]
    for n in g.node:
        for k, name in enumerate(n.input):
            if name in mapping:
                n.input[k] = mapping[name]
        for k, name in enumerate(n.output):
            if name in mapping:
                n.output[k] = mapping[name]
