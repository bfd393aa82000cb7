"""trainable/infer.onnx: the trainable blocks with the LoRA weights as graph inputs; LoRA naming; the chain.

One graph serves every adapter; skipped blocks inside its span are `gap_<s>_<e>.<slot>` residual adds.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from edge_runtime import graph_names as gn

from ..method.blockskip import SkipPlan, split_run
from ..method.lora import ADAPTER_NAME, LoRASpec, add_lora, lora_parameters
from ..models.base import DiTAdapter, State
from .export_patches import export_patches
from .graph_spec import GraphSpec
from .named_tensors import CtxLayout, check_run, flatten_state, gap_prefix, graph_inputs, state_from, uses
from .onnx_io import EXTERNAL_DATA_THRESHOLD, OPSET, export_module


_ADAPTER_IN_NAME = re.compile(r"\.(lora_[A-Za-z_]+)\." + re.escape(ADAPTER_NAME) + r"(\.|$)")


def lora_name(adapter: DiTAdapter, block: int, peft_name: str) -> str:
    """Published (diffusers/PEFT saved) name of a LoRA tensor of block `block`.

    `attn.to_q.lora_A.default.weight` of block 3 -> `transformer_blocks.3.attn.to_q.lora_A.weight`.
    """
    return adapter.block_names[block] + "." + _ADAPTER_IN_NAME.sub(r".\1\2", peft_name)


def lora_names(adapter: DiTAdapter, blocks: Mapping[int, nn.Module]) -> dict[str, tuple[int, str]]:
    """Published name -> (block index, PEFT parameter name inside the block), in a stable order."""
    out: dict[str, tuple[int, str]] = {}
    for i in sorted(blocks):
        for pn in lora_parameters(blocks[i]):
            out[lora_name(adapter, i, pn)] = (i, pn)
    return out


def dynamic_lora_rank(path: str, lora_inputs: Sequence[str]) -> None:
    """Make the LoRA inputs' rank axis symbolic (`lora_rank`: lora_A's first, lora_B's second) in the exported graph,
    so that several adapters apply at once, exactly: their A stacked along the rank and their scaled B side by side
    give B_cat A_cat = sum of scale_i B_i A_i (edge_runtime.lora_mix). The graph only multiplies through that axis."""
    import onnx

    m = onnx.load(path, load_external_data=False)  # the weights stay where export_module put them
    want = set(lora_inputs)
    for i in m.graph.input:
        if i.name in want:
            dims = i.type.tensor_type.shape.dim
            dims[0 if ".lora_A." in i.name else 1].dim_param = "lora_rank"
    del m.graph.value_info[:]  # shape hints of the export's fixed rank
    onnx.save(m, path)


def trainable_runs(plan: SkipPlan) -> list[list[int]]:
    """Maximal runs of consecutive trainable blocks."""
    runs: list[list[int]] = []
    for b in plan.trainable:
        if runs and runs[-1][-1] == b - 1:
            runs[-1].append(b)
        else:
            runs.append([b])
    return runs


def generation_chain(plan: SkipPlan, block_params: Sequence[int] | None = None,
                     max_group_params: int | None = None) -> list[tuple[str, list[int]]]:
    """The generation order over all blocks: ("frozen", run) and ("trainable", run) items.

    Each frozen run is one frozen/group_NN.onnx, or several when max_group_params cuts it
    (`split_run`; a gap's residual is then the sum of its groups' residuals); each trainable block
    one infer graph (trainable/infer.onnx when there is one trainable block; `gn.chain_runs`).
    """
    out = gn.chain_runs(plan.num_blocks, plan.trainable)
    if not max_group_params:
        return out
    if block_params is None:
        raise ValueError("max_group_params needs block_params")
    return [(k, g) for k, run in out
            for g in (split_run(run, block_params, max_group_params) if k == gn.FROZEN_RUN else [run])]


@contextlib.contextmanager
def swap_parameters(module: nn.Module, tensors: Mapping[str, Tensor]) -> Iterator[None]:
    """Use `tensors` in place of the named parameters for the duration (traceable, unlike
    torch.func.functional_call, which refuses to run under the tracer)."""
    saved = []
    try:
        for name, t in tensors.items():
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            if leaf not in owner._parameters:
                raise KeyError(f"{name} is not a parameter")
            saved.append((owner, leaf, owner._parameters[leaf]))
            owner._parameters[leaf] = t
        yield
    finally:
        for owner, leaf, p in reversed(saved):
            owner._parameters[leaf] = p


class _Span(nn.Module):
    """Trainable blocks (with LoRA) and residual adds over a span of blocks."""

    def __init__(self, adapter: DiTAdapter, plan: SkipPlan, span: Sequence[int], blocks: Mapping[int, nn.Module]):
        super().__init__()
        self.adapter = adapter
        self.span = list(span)
        self.plan = plan
        self.blocks = nn.ModuleDict({str(i): m for i, m in blocks.items()})

    def segments(self) -> list[tuple[str, int, int]]:
        segs: list[tuple[str, int, int]] = []
        for i in self.span:
            if i in self.plan.trainable:
                segs.append(("block", i, i))
            elif segs and segs[-1][0] == "gap":
                segs[-1] = ("gap", segs[-1][1], i)
            else:
                segs.append(("gap", i, i))
        return segs

    def forward(self, state: State, ctx: dict[str, Any], residuals: Mapping[str, State]) -> State:
        for kind, s, e in self.segments():
            if kind == "block":
                state = self.adapter.run_block(self.blocks[str(s)], s, state, ctx)
            else:
                r = residuals[gap_prefix(s, e)]
                state = tuple(None if a is None else a + b for a, b in zip(state, r))
        return state


def export_trainable_infer(
    adapter: DiTAdapter,
    plan: SkipPlan,
    lora: LoRASpec,
    state: State,
    ctx: Mapping[str, Any],
    path: str,
    *,
    blocks: Sequence[int] | None = None,
    residuals: Mapping[str, State] | None = None,
    modules: Mapping[int, nn.Module] | None = None,
    opset: int = OPSET,
    external_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> GraphSpec:
    """trainable/infer.onnx: the trainable blocks with the LoRA weights as GRAPH INPUTS.

    `blocks` is the span it covers (default: first..last trainable block). Skipped
    blocks inside the span are residual adds with `gap_<s>_<e>.<slot>` inputs
    (the training graph's form). For generation, compile exports one graph per
    trainable block and runs the frozen groups between them (`generation_chain`):
    a gap's residual depends on the LoRA'd state.
    `state`/`ctx`: example entering the span; `residuals`: example gaps (zeros by default).
    With all LoRA inputs zero (B = 0 suffices) the graph is the frozen blocks.
    """
    span = list(range(plan.first, plan.trainable[-1] + 1)) if blocks is None else check_run(blocks, adapter.num_blocks)
    if not any(i in plan.trainable for i in span):
        raise ValueError(f"blocks {span} hold no trainable block of the plan {plan.trainable}")
    mods = {}
    for i in span:
        if i in plan.trainable:
            mods[i] = modules[i] if modules and i in modules else add_lora(adapter.build_block(i), lora)
    net = _Span(adapter, plan, span, mods)
    names = lora_names(adapter, mods)
    layout = CtxLayout.of(ctx)

    # Example: state entering the span; gap residuals shaped as the state where the gap starts.
    with torch.no_grad(), export_patches(adapter, list(mods.values())):
        gaps: dict[str, State] = {}
        s = state
        c = dict(ctx)
        for kind, a, e in net.segments():
            if kind == "block":
                s = adapter.run_block(mods[a], a, s, c)
            else:
                key = gap_prefix(a, e)
                r = residuals[key] if residuals and key in residuals else tuple(None if t is None else torch.zeros_like(t) for t in s)
                gaps[key] = r
                s = tuple(None if x is None else x + y for x, y in zip(s, r))

    example = graph_inputs(state, ctx, layout)
    for key, r in gaps.items():
        example.update(flatten_state(r, key))
    for n, (i, pn) in names.items():
        example[n] = dict(mods[i].named_parameters())[pn].detach().clone()

    def fn(named: dict[str, Tensor]) -> dict[str, Tensor]:
        params = {f"blocks.{i}.{pn}": named[n] for n, (i, pn) in names.items()}
        rs = {key: state_from(named, r, key) for key, r in gaps.items()}
        with swap_parameters(net, params):
            out = net(state_from(named, state), layout.rebuild(named), rs)
        return flatten_state(out, gn.OUT)

    inputs, outputs, axes, ext, _ = export_module(
        fn, example, path, parts={"net": net}, opset=opset, batch=state[0].shape[0],
        external_threshold=external_threshold, adapter=adapter,
    )
    dynamic_lora_rank(path, [n for n in names if n in inputs])
    lora_desc = {
        n: {"block": i, "param": pn, "shape": list(example[n].shape), "input": n in inputs, "dynamic_rank": True}
        for n, (i, pn) in names.items()
    }
    return GraphSpec(
        gn.TRAINABLE_INFER, path, inputs, outputs, blocks=span, opset=opset,
        state_in=gn.slots(inputs),
        state_out=gn.slots(outputs, gn.OUT),
        ctx={k: v for k, v in layout.describe().items() if uses(v, inputs)},
        residuals={key: gn.slots(inputs, key) for key in gaps},
        lora=lora_desc, dynamic_axes=axes, external_data=ext,
    )
