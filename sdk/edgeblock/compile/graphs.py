"""The inference graphs of the generation chain: prologue, frozen groups, epilogue, and the whole chain.

export_inference_graphs writes prologue.onnx, frozen/group_NN.onnx, trainable/infer*.onnx (trainable_infer.py)
and epilogue.onnx in chain order (edge_runtime.graph_names) from one example input.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from edge_runtime import graph_names as gn
from edge_runtime.patch_sampling import GRID_POSITION

from ..method.blockskip import SkipPlan
from ..method.lora import LoRASpec, add_lora
from ..models.base import DiTAdapter, DiTInputs, State
from .export_patches import flux_position_ids
from .graph_spec import GraphSpec
from .named_tensors import CROP, HW, SLOTS, CtxLayout, check_run, flatten_state, graph_inputs, state_from, state_names, uses
from .attention_chunks import chunk_file, query_chunks
from .onnx_io import EXTERNAL_DATA_THRESHOLD, OPSET, export_module
from .trainable_infer import export_trainable_infer, generation_chain


def prologue_inputs(x: DiTInputs) -> dict[str, Tensor]:
    named = {"latents": x.latents, "timestep": x.timestep, "text": x.text}
    for k in ("pooled", "text_mask", "guidance"):
        v = getattr(x, k)
        if v is not None:
            named[k] = v
    return named


def export_prologue(adapter: DiTAdapter, x: DiTInputs, path: str, *, opset: int = OPSET, external_threshold: int = EXTERNAL_DATA_THRESHOLD) -> GraphSpec:
    """prologue.onnx: latents/timestep/text(/pooled/text_mask/guidance)(/crop) -> state.* + ctx.* + ctx.hw."""
    if x.img_ids is not None:
        raise ValueError("the prologue graph takes the crop's placement as its `crop` input, not img_ids")
    with torch.no_grad():
        state, ctx = adapter.prologue(x)
    layout = CtxLayout.of(ctx)
    slots = state_names(state)
    flux = adapter.family == "flux"

    def fn(named: dict[str, Tensor]) -> dict[str, Tensor]:
        ids = flux_position_ids(named["latents"], adapter.pack, named[CROP]) if flux else None
        xi = DiTInputs(
            latents=named["latents"], timestep=named["timestep"], text=named["text"],
            pooled=named.get("pooled"), text_mask=named.get("text_mask"), guidance=named.get("guidance"),
            img_ids=ids,
        )
        s, c = adapter.prologue(xi)
        out = flatten_state(s)
        out.update(layout.tensors(c, with_hw=False))
        lat = named["latents"]
        out[HW] = lat.new_zeros((lat.shape[2], lat.shape[3]))
        return out

    example = prologue_inputs(x)
    if flux:
        example[CROP] = torch.tensor(GRID_POSITION, dtype=torch.float32)
    inputs, outputs, axes, ext, _ = export_module(
        fn, example, path, parts={"shell": adapter.shell}, opset=opset, batch=x.latents.shape[0],
        external_threshold=external_threshold, adapter=adapter,
    )
    return GraphSpec(
        gn.PROLOGUE, path, inputs, outputs, opset=opset,
        state_out={SLOTS[k]: n for k, n in enumerate(slots) if n is not None},
        ctx=layout.describe(), dynamic_axes=axes, external_data=ext,
    )


def export_group(
    adapter: DiTAdapter,
    blocks: Sequence[int],
    state: State,
    ctx: Mapping[str, Any],
    path: str,
    *,
    modules: Mapping[int, nn.Module] | None = None,
    opset: int = OPSET,
    external_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> GraphSpec:
    """frozen/group_NN.onnx: a run of consecutive frozen blocks; state.* + the ctx it reads -> out.*.

    `state`/`ctx` are the example entering the first block (e.g. from adapter.prologue).
    Blocks are built from the adapter's weights unless given in `modules`.
    """
    blocks = check_run(blocks, adapter.num_blocks)
    mods = {i: (modules[i] if modules and i in modules else adapter.build_block(i)) for i in blocks}
    layout = CtxLayout.of(ctx)

    def fn(named: dict[str, Tensor]) -> dict[str, Tensor]:
        s = state_from(named, state)
        c = layout.rebuild(named)
        for i in blocks:
            s = adapter.run_block(mods[i], i, s, c)
        return flatten_state(s, gn.OUT)

    example = graph_inputs(state, ctx, layout)
    inputs, outputs, axes, ext, _ref = export_module(
        fn, example, path, parts={str(i): m for i, m in mods.items()}, opset=opset, batch=state[0].shape[0],
        external_threshold=external_threshold, adapter=adapter,
    )
    return GraphSpec(
        gn.GROUP, path, inputs, outputs, blocks=blocks, opset=opset,
        state_in=gn.slots(inputs),
        state_out=gn.slots(outputs, gn.OUT),
        ctx={k: v for k, v in layout.describe().items() if uses(v, inputs)},
        dynamic_axes=axes, external_data=ext,
    )


def export_epilogue(
    adapter: DiTAdapter, state: State, ctx: Mapping[str, Any], path: str, *, opset: int = OPSET,
    external_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> GraphSpec:
    """epilogue.onnx: state.* + ctx.* (+ ctx.hw) -> prediction (B, C, H, W)."""
    layout = CtxLayout.of(ctx)

    def fn(named: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"prediction": adapter.epilogue(state_from(named, state), layout.rebuild(named))}

    example = graph_inputs(state, ctx, layout)
    inputs, outputs, axes, ext, _ = export_module(
        fn, example, path, parts={"shell": adapter.shell}, opset=opset, batch=state[0].shape[0],
        external_threshold=external_threshold, adapter=adapter,
    )
    return GraphSpec(
        gn.EPILOGUE, path, inputs, outputs, opset=opset,
        state_in=gn.slots(inputs),
        ctx={k: v for k, v in layout.describe().items() if uses(v, inputs)},
        dynamic_axes=axes, external_data=ext,
    )


def export_inference_graphs(
    adapter: DiTAdapter,
    plan: SkipPlan,
    lora: LoRASpec,
    x: DiTInputs,
    out_dir: str,
    *,
    opset: int = OPSET,
    external_threshold: int = EXTERNAL_DATA_THRESHOLD,
    on_graph: Callable[[GraphSpec], None] | None = None,
    max_group_params: int | None = None,
) -> list[GraphSpec]:
    """Every inference graph of the generation chain, in chain order, from one example input.

    Layout under out_dir: prologue.onnx, frozen/group_NN.onnx (NN = 00, 01 ... in
    block order), trainable/infer.onnx (trainable/infer_NN.onnx, one per trainable
    block, when there are several), epilogue.onnx. Each block is
    materialised once: exported, then run on the example to get the next state. The frozen groups' and
    trainable runs' softmax attentions are computed in slices of queries (attention_chunks.py), their
    feed-forward parts in slices of tokens (feedforward_chunks.py), as many as the attentions'.
    """
    with torch.no_grad():
        state, ctx = adapter.prologue(x)
    specs = [export_prologue(adapter, x, os.path.join(out_dir, gn.PROLOGUE_FILE), opset=opset, external_threshold=external_threshold)]
    if on_graph:
        on_graph(specs[-1])
    # the blocks' attentions over the generation's queries (image tokens, and text tokens where they are joint)
    chunks = query_chunks(sum(t.shape[1] for t in state if t is not None))
    chain = generation_chain(plan, [adapter.block_param_count(i) for i in range(adapter.num_blocks)], max_group_params)
    n_train = sum(kind == gn.TRAINABLE_RUN for kind, _ in chain)
    counters = {gn.FROZEN_RUN: 0, gn.TRAINABLE_RUN: 0}
    for kind, run in chain:
        k = counters[kind]
        counters[kind] += 1
        if kind == gn.FROZEN_RUN:
            mods = {i: adapter.build_block(i) for i in run}
            path = os.path.join(out_dir, *gn.group_file(k).split("/"))
            spec = export_group(adapter, run, state, ctx, path, modules=mods, opset=opset, external_threshold=external_threshold)
        else:
            mods = {i: add_lora(adapter.build_block(i), lora) for i in run}
            spec = export_trainable_infer(
                adapter, plan, lora, state, ctx, os.path.join(out_dir, *gn.infer_file(k, n_train).split("/")), blocks=run, modules=mods,
                opset=opset, external_threshold=external_threshold,
            )
        with torch.no_grad():
            for i in run:
                state = adapter.run_block(mods[i], i, state, ctx)  # fresh LoRA has B = 0: the frozen block
        del mods
        attention, feedforward = chunk_file(spec.path, chunks, spec.external_data)
        spec.attention_chunks, spec.feedforward_chunks = (chunks if attention else 0), (chunks if feedforward else 0)
        specs.append(spec)
        if on_graph:
            on_graph(spec)
    specs.append(export_epilogue(adapter, state, ctx, os.path.join(out_dir, gn.EPILOGUE_FILE), opset=opset, external_threshold=external_threshold))
    if on_graph:
        on_graph(specs[-1])
    return specs
