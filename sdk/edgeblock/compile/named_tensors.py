"""Block-graph values as named ONNX tensors: state slots, ctx entries (CtxLayout) and dynamic axes.

The names follow edge_runtime.graph_names (the contract the device reads); this module maps the torch
adapter's (state, ctx) to and from them for the exporter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from edge_runtime import graph_names as gn
from edge_runtime.graph_names import HW, SLOTS, gap_prefix  # noqa: F401 - gap_prefix is part of this module's API
from edge_runtime.patch_sampling import CROP_INPUT

from ..models.base import State

CROP = CROP_INPUT  # FLUX prologue: (row0, col0, step) placing the image tokens (GRID_POSITION: their own grid)

# Dynamic axes by tensor name (anything else: axis 0 is the batch when its size is the batch).
_AXES: dict[str, dict[int, str]] = {
    "latents": {0: "batch", 2: "height", 3: "width"},
    "timestep": {0: "batch"},
    "text": {0: "batch", 1: "text_tokens"},
    "pooled": {0: "batch"},
    "text_mask": {0: "batch", 1: "text_tokens"},
    "guidance": {0: "batch"},
    CROP: {},
    "image": {0: "batch", 1: "tokens"},  # a state / residual slot
    "ctx.temb": {0: "batch"},
    "ctx.embedded_t": {0: "batch"},
    "ctx.text": {0: "batch", 1: "text_tokens"},
    "ctx.text_bias": {0: "batch", 2: "text_tokens"},
    "ctx.rotary.0": {0: "rope_tokens"},
    "ctx.rotary.1": {0: "rope_tokens"},
    HW: {0: "height", 1: "width"},
    gn.PREDICTION: {0: "batch", 2: "height", 3: "width"},
}


def state_names(state: State, prefix: str = gn.STATE) -> list[str | None]:
    """ONNX names of a state's slots (None where the stream ended)."""
    return [None if t is None else gn.state_name(SLOTS[k], prefix) for k, t in enumerate(state)]


def flatten_state(state: State, prefix: str = gn.STATE) -> dict[str, Tensor]:
    return {n: t for n, t in zip(state_names(state, prefix), state) if n is not None}


@dataclass
class CtxLayout:
    """How a ctx dict maps to named tensors: key -> ("tensor", name) | ("tuple", [names]) | ("none",) | ("python", value)."""

    entries: dict[str, tuple]
    patch: int | None = None  # Sana's grid = latent size // patch

    @classmethod
    def of(cls, ctx: Mapping[str, Any]) -> CtxLayout:
        entries: dict[str, tuple] = {}
        patch = None
        for k, v in ctx.items():
            if isinstance(v, Tensor):
                entries[k] = ("tensor", gn.ctx_name(k))
            elif isinstance(v, (tuple, list)) and v and all(isinstance(t, Tensor) for t in v):
                entries[k] = ("tuple", [gn.ctx_name(k, j) for j in range(len(v))])
            elif v is None:
                entries[k] = ("none",)
            elif k in ("shape", "grid"):
                entries[k] = ("python", tuple(int(a) for a in v))
            else:
                raise ValueError(
                    f"ctx[{k!r}] = {v!r}: a python value the exporter does not know how to rebuild from the "
                    "latent shape (known: shape, grid); teach onnx_export.CtxLayout about it"
                )
        if "grid" in entries:
            if "shape" not in entries:
                raise ValueError("ctx has a grid but no shape")
            _, h, w = entries["shape"][1]
            gh, gw = entries["grid"][1]
            patch = h // gh
            if patch * gh != h or w // patch != gw:
                raise ValueError(f"ctx grid {(gh, gw)} is not the latent size {(h, w)} over one patch size")
        return cls(entries, patch)

    def tensors(self, ctx: Mapping[str, Any], with_hw: bool = True) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for k, e in self.entries.items():
            if e[0] == "tensor":
                out[e[1]] = ctx[k]
            elif e[0] == "tuple":
                out.update(zip(e[1], ctx[k]))
        if with_hw and "shape" in self.entries:
            _, h, w = self.entries["shape"][1]
            out[HW] = torch.zeros(h, w)
        return out

    def rebuild(self, named: Mapping[str, Tensor], dynamic: bool = True) -> dict[str, Any]:
        """ctx from named tensors; python values from the shape of `ctx.hw` when dynamic."""
        ctx: dict[str, Any] = {}
        hw = named.get(HW) if dynamic else None
        for k, e in self.entries.items():
            if e[0] == "tensor":
                ctx[k] = named[e[1]]
            elif e[0] == "tuple":
                ctx[k] = tuple(named[n] for n in e[1])
            elif e[0] == "none":
                ctx[k] = None
            elif hw is None:
                ctx[k] = e[1]
            elif k == "shape":
                ctx[k] = (e[1][0], hw.shape[0], hw.shape[1])
            else:  # grid
                ctx[k] = (hw.shape[0] // self.patch, hw.shape[1] // self.patch)
        return ctx

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for k, e in self.entries.items():
            if e[0] in ("tensor", "tuple"):
                d[k] = e[1]
            elif e[0] == "none":
                d[k] = None
            elif k == "shape":
                d[k] = {"from": HW, "value": "(C, hw.shape[0], hw.shape[1])", "C": e[1][0]}
            else:
                d[k] = {"from": HW, "value": f"(hw.shape[0] // {self.patch}, hw.shape[1] // {self.patch})"}
        return d


def axes_for(name: str, t: Tensor, batch: int | None) -> dict[int, str]:
    if name in _AXES:
        return dict(_AXES[name])
    slot = gn.slot_of(name)
    if (gn.is_state(name) or name.startswith(gn.OUT + ".") or gn.is_gap(name)) and slot in SLOTS:
        return {0: "batch", 1: "tokens" if slot == "image" else "text_tokens"}
    if batch is not None and t.dim() >= 1 and t.shape[0] == batch:
        return {0: "batch"}
    return {}


def check_run(blocks: Sequence[int], n: int) -> list[int]:
    blocks = [int(b) for b in blocks]
    if not blocks:
        raise ValueError("a group needs at least one block")
    if any(not 0 <= b < n for b in blocks):
        raise ValueError(f"blocks {blocks} out of range 0..{n - 1}")
    if blocks != list(range(blocks[0], blocks[-1] + 1)):
        raise ValueError(f"blocks {blocks} are not a run of consecutive blocks")
    return blocks


def state_from(named: Mapping[str, Tensor], like: State, prefix: str = gn.STATE) -> State:
    """A state shaped as `like`, from named tensors (`<prefix>.<slot>`)."""
    return tuple(None if n is None else named[n] for n in state_names(like, prefix))


def graph_inputs(state: State, ctx: Mapping[str, Any], layout: CtxLayout) -> dict[str, Tensor]:
    named = flatten_state(state)
    named.update(layout.tensors(ctx))
    return named


def uses(desc: Any, inputs: Sequence[str]) -> bool:
    """Whether a graph with these inputs reads the ctx entry described by `desc` (CtxLayout.describe)."""
    if isinstance(desc, str):
        return desc in inputs
    if isinstance(desc, list):
        return any(d in inputs for d in desc)
    if isinstance(desc, dict):
        return desc.get("from") in inputs
    return False
