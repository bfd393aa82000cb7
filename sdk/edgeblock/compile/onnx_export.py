"""Inference ONNX graphs of the block graph: prologue, frozen groups, epilogue and trainable/infer.onnx.

TorchScript exporter (dynamo=False), opset 17, constant folding on. One graph per
piece covers the training and the generation shapes: the batch, image-token,
text-token and latent height/width axes are dynamic.

Naming (every graph; feed a graph what `session.get_inputs()` lists, by name):

- prologue inputs: `latents` (B, C, H, W), `timestep` (B,), `text` (B, Lt, Dt),
  and where the family takes them `pooled` (B, Dp), `text_mask` (B, Lt),
  `guidance` (B,). FLUX position ids are computed inside the graph from the
  latent shape and the FLUX-only input `crop` (3,) = (row0, col0, step): image
  token (i, j) gets ids (0, row0 + i * step, col0 + j * step), text tokens
  zeros. (0, 0, 1) is the latent's own grid (`edge_runtime.flow.image_ids`),
  what generation uses and what `run_onnx` / the runtime feed when no `crop` is
  given; a patch-sampled training crop passes
  `edge_runtime.patch_sampling.crop_position` of its box, so its tokens sit at
  the full image's coordinates of the place it was cut from.
- state tensors: `state.image` (B, N, D) and, for FLUX/SD3, `state.text`
  (B, Lt, D). Graphs that run blocks output `out.image` / `out.text`; feed
  `out.<slot>` to the next graph as `state.<slot>`. A stream that ended (SD3's
  last block ends the text stream) has no output.
- ctx tensors: `ctx.<key>` for each tensor the adapter's prologue puts in ctx
  (`ctx.temb`, `ctx.embedded_t`, `ctx.text`, `ctx.text_bias`), `ctx.<key>.<j>`
  for a tuple (FLUX rotary: `ctx.rotary.0` = cos, `ctx.rotary.1` = sin, shape
  (Lt + N, head_dim)). Python values in ctx are not tensors: the prologue
  outputs `ctx.hw`, a zeros float32 tensor of shape (H, W) (the latent size),
  whose SHAPE carries them: ctx["shape"] = (C, H, W), Sana's ctx["grid"] =
  (H / p, W / p). Graphs that need them (epilogue, Sana blocks) take `ctx.hw`.
- gap residuals (trainable/infer.onnx when its span contains skipped blocks):
  `gap_<start>_<end>.<slot>`, shaped as the state.
- LoRA weights (trainable/infer.onnx): the diffusers/PEFT saved names, e.g.
  `transformer_blocks.3.attn.to_q.lora_A.weight` (the block's name in the
  model + the PEFT parameter name without the adapter name). Dots are legal in
  ONNX names: no other sanitising. `GraphSpec.lora` maps each to its block and
  PEFT parameter.
- epilogue output: `prediction` (B, C, H, W).

Inputs a graph does not read are pruned from it; `GraphSpec.inputs` lists what
remains. Graphs whose initializers exceed ~1.8 GB are saved with external data
(`<file>.data` beside the .onnx).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edge_runtime.patch_sampling import CROP_INPUT, GRID_POSITION, with_grid_crop

from ..method.blockskip import SkipPlan, split_run
from ..method.lora import ADAPTER_NAME, LoRASpec, add_lora, lora_parameters
from ..models.base import DiTAdapter, DiTInputs, State, patchify

OPSET = 17
MAX_IR_VERSION = 10  # ONNX Runtime 1.19.2 reads IR <= 10 (FACTS)
EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # bytes of initializers; protobuf's hard limit is 2 GiB
SLOTS = ("image", "text")
HW = "ctx.hw"
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
    "prediction": {0: "batch", 2: "height", 3: "width"},
}


# ---------------------------------------------------------------------------------------------
# Export-time patches
# ---------------------------------------------------------------------------------------------
def rms_norm_decomposed(x: Tensor, normalized_shape: Sequence[int], weight: Tensor | None = None, eps: float | None = None) -> Tensor:
    """F.rms_norm as x * rsqrt(mean(x^2) + eps) * w: the TorchScript exporter has no aten::rms_norm."""
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    dims = tuple(range(-len(normalized_shape), 0))
    y = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
    return y * weight if weight is not None else y


def _unflatten_traceable(self: Tensor, dim: int, sizes: Sequence[int]) -> Tensor:
    """Tensor.unflatten as a reshape over the traced sizes.

    The exporter's unflatten (used by FLUX's attention with a -1 size) loses the
    symbolic dims: every later `x.shape` becomes a constant and the graph only
    runs at the export shape.
    """
    shape = [self.shape[i] for i in range(self.dim())]
    d = dim % self.dim()
    return self.reshape(shape[:d] + list(sizes) + shape[d + 1 :])


class _Patcher:
    def __init__(self) -> None:
        self._saved: list[tuple[Any, str, Any, bool]] = []

    def set(self, obj: Any, name: str, value: Any) -> None:
        own = isinstance(obj, type) or name in getattr(obj, "__dict__", {})
        self._saved.append((obj, name, getattr(obj, name), own))
        setattr(obj, name, value)

    def restore(self) -> None:
        for obj, name, old, own in reversed(self._saved):
            if own:
                setattr(obj, name, old)
            else:
                delattr(obj, name)
        self._saved.clear()


_GELU = F.gelu
_TANH_GELU_K = 2.0 * (2.0 / np.pi) ** 0.5  # 0.5 (1 + tanh(z)) = sigmoid(2 z)


def gelu_sigmoid_form(x: Tensor, approximate: str = "none") -> Tensor:
    """F.gelu with its tanh approximation written as x * sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3)), the
    same function. For training graphs only: with a LoRA on the linear layer before a tanh GELU (FLUX's
    proj_mlp and ff.net.0.proj), the exporter's 0.5 x (1 + tanh(...)) pattern makes ORT 1.19.2's pre-training
    fusions fail inside generate_artifacts ("Argument mismatch when removing edge"); this form fuses to nothing."""
    if approximate != "tanh":
        return _GELU(x, approximate=approximate)
    return x * torch.sigmoid(_TANH_GELU_K * (x + 0.044715 * x * x * x))


@contextlib.contextmanager
def export_patches(adapter: DiTAdapter | None = None, modules: Sequence[nn.Module] = (),
                   training: bool = False) -> Iterator[None]:
    """Make the diffusers code traceable with dynamic shapes; everything is restored on exit.

    - F.rms_norm / torch.rms_norm -> decomposed (FLUX/SD3 q/k norms);
    - Tensor.unflatten -> reshape over traced sizes;
    - PatchEmbed (PixArt sincos positions): always recompute the positional table
      from the traced grid size instead of using the cached one of the default size;
    - FLUX: position ids from the given ones or built in torch from the traced latent shape;
    - PixArt with additional conditions: resolution/aspect from the traced shape;
    - training graphs: the tanh GELU in its sigmoid form (gelu_sigmoid_form).
    """
    from diffusers.models.embeddings import PatchEmbed

    p = _Patcher()
    try:
        p.set(F, "rms_norm", rms_norm_decomposed)
        if training:
            p.set(F, "gelu", gelu_sigmoid_form)
        if hasattr(torch, "rms_norm"):
            p.set(torch, "rms_norm", rms_norm_decomposed)
        p.set(torch.Tensor, "unflatten", _unflatten_traceable)
        mods = list(modules)
        if adapter is not None:
            mods.append(adapter.shell)
            if adapter.family == "flux":
                p.set(adapter, "_model_args", lambda x, a=adapter: _flux_model_args(a, x))
            if adapter.family == "pixart":
                p.set(adapter, "_added_cond", lambda x, a=adapter: _pixart_added_cond(a, x))
        for m in mods:
            for sub in m.modules():
                if isinstance(sub, PatchEmbed) and sub.pos_embed is not None and sub.pos_embed_max_size is None:
                    p.set(sub, "height", -1)  # forces the `self.height != height` branch
        yield
    finally:
        p.restore()


def _flux_model_args(adapter: DiTAdapter, x: DiTInputs) -> dict[str, Any]:
    """FluxAdapter._model_args with the ids computed by torch ops (traced with the shape)."""
    p = adapter.pack
    img_ids = x.img_ids if x.img_ids is not None else flux_position_ids(x.latents, p, None)
    txt_ids = x.text.new_zeros((x.text.shape[1], 3)).float()
    return {
        "hidden_states": patchify(x.latents, p),
        "encoder_hidden_states": x.text,
        "pooled_projections": x.pooled,
        "timestep": x.timestep / 1000.0,
        "img_ids": img_ids,
        "txt_ids": txt_ids,
        "guidance": x.guidance if adapter.config.get("guidance_embeds") else None,
    }


def flux_position_ids(latents: Tensor, pack: int, crop: Tensor | None) -> Tensor:
    """(N, 3) image-token ids of the latent's token grid, placed by `crop` = (row0, col0, step) when given
    (torch ops over the traced shape; the same arithmetic as edge_runtime.patch_sampling.position_ids)."""
    _b, _c, h, w = latents.shape
    gh, gw = h // pack, w // pack
    rows = torch.arange(gh, dtype=torch.float32)[:, None].expand(gh, gw)
    cols = torch.arange(gw, dtype=torch.float32)[None, :].expand(gh, gw)
    if crop is not None:
        rows, cols = crop[0] + rows * crop[2], crop[1] + cols * crop[2]
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)


def _pixart_added_cond(adapter: DiTAdapter, x: DiTInputs) -> dict[str, Tensor | None]:
    if not adapter.shell.use_additional_conditions:
        return {"resolution": None, "aspect_ratio": None}
    b, _, h, w = x.latents.shape
    ones = x.latents.new_ones((b, 1))
    return {"resolution": torch.cat([ones * (h * 8.0), ones * (w * 8.0)], dim=1), "aspect_ratio": ones * (h / w)}


# ---------------------------------------------------------------------------------------------
# Flattening state and ctx into named tensors
# ---------------------------------------------------------------------------------------------
def state_names(state: State, prefix: str = "state") -> list[str | None]:
    """ONNX names of a state's slots (None where the stream ended)."""
    return [None if t is None else f"{prefix}.{SLOTS[k]}" for k, t in enumerate(state)]


def flatten_state(state: State, prefix: str = "state") -> dict[str, Tensor]:
    return {n: t for n, t in zip(state_names(state, prefix), state) if n is not None}


def gap_prefix(start: int, end: int) -> str:
    return f"gap_{start}_{end}"


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
                entries[k] = ("tensor", f"ctx.{k}")
            elif isinstance(v, (tuple, list)) and v and all(isinstance(t, Tensor) for t in v):
                entries[k] = ("tuple", [f"ctx.{k}.{j}" for j in range(len(v))])
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


def _axes_for(name: str, t: Tensor, batch: int | None) -> dict[int, str]:
    if name in _AXES:
        return dict(_AXES[name])
    slot = name.rsplit(".", 1)[-1]
    if name.startswith(("state.", "out.", "gap_")) and slot in SLOTS:
        return {0: "batch", 1: "tokens" if slot == "image" else "text_tokens"}
    if batch is not None and t.dim() >= 1 and t.shape[0] == batch:
        return {0: "batch"}
    return {}


# ---------------------------------------------------------------------------------------------
# Graph description
# ---------------------------------------------------------------------------------------------
@dataclass
class GraphSpec:
    """What one exported graph is and how its named inputs/outputs map to the block graph (JSON-able)."""

    kind: str  # prologue | group | epilogue | trainable_infer | training
    path: str
    inputs: list[str]
    outputs: list[str]
    blocks: list[int] = field(default_factory=list)
    opset: int = OPSET
    state_in: dict[str, str] = field(default_factory=dict)  # slot -> input name
    state_out: dict[str, str] = field(default_factory=dict)  # slot -> output name
    ctx: dict[str, Any] = field(default_factory=dict)  # ctx key -> name(s) / rule
    residuals: dict[str, dict[str, str]] = field(default_factory=dict)  # gap_s_e -> slot -> input name
    lora: dict[str, dict[str, Any]] = field(default_factory=dict)  # onnx name -> {block, param, shape}
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    external_data: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dynamic_axes"] = {k: {str(a): n for a, n in v.items()} for k, v in self.dynamic_axes.items()}
        return d


# ---------------------------------------------------------------------------------------------
# Export core
# ---------------------------------------------------------------------------------------------
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
            a = _axes_for(n, t, batch)
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


# ---------------------------------------------------------------------------------------------
# The pieces
# ---------------------------------------------------------------------------------------------
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
        "prologue", path, inputs, outputs, opset=opset,
        state_out={SLOTS[k]: n for k, n in enumerate(slots) if n is not None},
        ctx=layout.describe(), dynamic_axes=axes, external_data=ext,
    )


def _check_run(blocks: Sequence[int], n: int) -> list[int]:
    blocks = [int(b) for b in blocks]
    if not blocks:
        raise ValueError("a group needs at least one block")
    if any(not 0 <= b < n for b in blocks):
        raise ValueError(f"blocks {blocks} out of range 0..{n - 1}")
    if blocks != list(range(blocks[0], blocks[-1] + 1)):
        raise ValueError(f"blocks {blocks} are not a run of consecutive blocks")
    return blocks


def _state_from(named: Mapping[str, Tensor], like: State, prefix: str = "state") -> State:
    return tuple(None if n is None else named[n] for n in state_names(like, prefix))


def _graph_inputs(state: State, ctx: Mapping[str, Any], layout: CtxLayout) -> dict[str, Tensor]:
    named = flatten_state(state)
    named.update(layout.tensors(ctx))
    return named


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
    blocks = _check_run(blocks, adapter.num_blocks)
    mods = {i: (modules[i] if modules and i in modules else adapter.build_block(i)) for i in blocks}
    layout = CtxLayout.of(ctx)

    def fn(named: dict[str, Tensor]) -> dict[str, Tensor]:
        s = _state_from(named, state)
        c = layout.rebuild(named)
        for i in blocks:
            s = adapter.run_block(mods[i], i, s, c)
        return flatten_state(s, "out")

    example = _graph_inputs(state, ctx, layout)
    inputs, outputs, axes, ext, _ref = export_module(
        fn, example, path, parts={str(i): m for i, m in mods.items()}, opset=opset, batch=state[0].shape[0],
        external_threshold=external_threshold, adapter=adapter,
    )
    return GraphSpec(
        "group", path, inputs, outputs, blocks=blocks, opset=opset,
        state_in={k.split(".")[1]: k for k in inputs if k.startswith("state.")},
        state_out={k.split(".")[1]: k for k in outputs},
        ctx={k: v for k, v in layout.describe().items() if _uses(v, inputs)},
        dynamic_axes=axes, external_data=ext,
    )


def _uses(desc: Any, inputs: Sequence[str]) -> bool:
    if isinstance(desc, str):
        return desc in inputs
    if isinstance(desc, list):
        return any(d in inputs for d in desc)
    if isinstance(desc, dict):
        return desc.get("from") in inputs
    return False


def export_epilogue(
    adapter: DiTAdapter, state: State, ctx: Mapping[str, Any], path: str, *, opset: int = OPSET,
    external_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> GraphSpec:
    """epilogue.onnx: state.* + ctx.* (+ ctx.hw) -> prediction (B, C, H, W)."""
    layout = CtxLayout.of(ctx)

    def fn(named: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"prediction": adapter.epilogue(_state_from(named, state), layout.rebuild(named))}

    example = _graph_inputs(state, ctx, layout)
    inputs, outputs, axes, ext, _ = export_module(
        fn, example, path, parts={"shell": adapter.shell}, opset=opset, batch=state[0].shape[0],
        external_threshold=external_threshold, adapter=adapter,
    )
    return GraphSpec(
        "epilogue", path, inputs, outputs, opset=opset,
        state_in={k.split(".")[1]: k for k in inputs if k.startswith("state.")},
        ctx={k: v for k, v in layout.describe().items() if _uses(v, inputs)},
        dynamic_axes=axes, external_data=ext,
    )


# ---------------------------------------------------------------------------------------------
# LoRA naming and trainable/infer.onnx
# ---------------------------------------------------------------------------------------------
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
    (`split_run`; a gap's residual is then the sum of its groups' residuals); each trainable run
    one infer graph (trainable/infer.onnx when the trainable set is contiguous).
    """
    out: list[tuple[str, list[int]]] = []
    for i in range(plan.num_blocks):
        kind = "trainable" if i in plan.trainable else "frozen"
        if out and out[-1][0] == kind:
            out[-1][1].append(i)
        else:
            out.append((kind, [i]))
    if not max_group_params:
        return out
    if block_params is None:
        raise ValueError("max_group_params needs block_params")
    return [(k, g) for k, run in out for g in (split_run(run, block_params, max_group_params) if k == "frozen" else [run])]


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
    (the training graph's form). For generation with a non-contiguous trainable
    set, export one graph per `trainable_runs(plan)` run and run the frozen groups
    between them (`generation_chain`): a gap's residual depends on the LoRA'd state.
    `state`/`ctx`: example entering the span; `residuals`: example gaps (zeros by default).
    With all LoRA inputs zero (B = 0 suffices) the graph is the frozen blocks.
    """
    span = list(range(plan.first, plan.trainable[-1] + 1)) if blocks is None else _check_run(blocks, adapter.num_blocks)
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

    example = _graph_inputs(state, ctx, layout)
    for key, r in gaps.items():
        example.update(flatten_state(r, key))
    for n, (i, pn) in names.items():
        example[n] = dict(mods[i].named_parameters())[pn].detach().clone()

    def fn(named: dict[str, Tensor]) -> dict[str, Tensor]:
        params = {f"blocks.{i}.{pn}": named[n] for n, (i, pn) in names.items()}
        rs = {key: _state_from(named, r, key) for key, r in gaps.items()}
        with swap_parameters(net, params):
            out = net(_state_from(named, state), layout.rebuild(named), rs)
        return flatten_state(out, "out")

    inputs, outputs, axes, ext, _ = export_module(
        fn, example, path, parts={"net": net}, opset=opset, batch=state[0].shape[0],
        external_threshold=external_threshold, adapter=adapter,
    )
    lora_desc = {
        n: {"block": i, "param": pn, "shape": list(example[n].shape), "input": n in inputs} for n, (i, pn) in names.items()
    }
    return GraphSpec(
        "trainable_infer", path, inputs, outputs, blocks=span, opset=opset,
        state_in={k.split(".")[1]: k for k in inputs if k.startswith("state.")},
        state_out={k.split(".")[1]: k for k in outputs},
        ctx={k: v for k, v in layout.describe().items() if _uses(v, inputs)},
        residuals={key: {k.split(".")[1]: k for k in inputs if k.startswith(key + ".")} for key in gaps},
        lora=lora_desc, dynamic_axes=axes, external_data=ext,
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
    block order), trainable/infer.onnx (trainable/infer_NN.onnx, one per run,
    when the trainable set is not contiguous), epilogue.onnx. Each block is
    materialised once: exported, then run on the example to get the next state.
    """
    with torch.no_grad():
        state, ctx = adapter.prologue(x)
    specs = [export_prologue(adapter, x, os.path.join(out_dir, "prologue.onnx"), opset=opset, external_threshold=external_threshold)]
    if on_graph:
        on_graph(specs[-1])
    chain = generation_chain(plan, [adapter.block_param_count(i) for i in range(adapter.num_blocks)], max_group_params)
    n_train = sum(kind == "trainable" for kind, _ in chain)
    counters = {"frozen": 0, "trainable": 0}
    for kind, run in chain:
        k = counters[kind]
        counters[kind] += 1
        if kind == "frozen":
            mods = {i: adapter.build_block(i) for i in run}
            path = os.path.join(out_dir, "frozen", f"group_{k:02d}.onnx")
            spec = export_group(adapter, run, state, ctx, path, modules=mods, opset=opset, external_threshold=external_threshold)
        else:
            mods = {i: add_lora(adapter.build_block(i), lora) for i in run}
            name = "infer.onnx" if n_train == 1 else f"infer_{k:02d}.onnx"
            spec = export_trainable_infer(
                adapter, plan, lora, state, ctx, os.path.join(out_dir, "trainable", name), blocks=run, modules=mods,
                opset=opset, external_threshold=external_threshold,
            )
        with torch.no_grad():
            for i in run:
                state = adapter.run_block(mods[i], i, state, ctx)  # fresh LoRA has B = 0: the frozen block
        del mods
        specs.append(spec)
        if on_graph:
            on_graph(spec)
    specs.append(export_epilogue(adapter, state, ctx, os.path.join(out_dir, "epilogue.onnx"), opset=opset, external_threshold=external_threshold))
    if on_graph:
        on_graph(specs[-1])
    return specs


# ---------------------------------------------------------------------------------------------
# Running and verifying in ONNX Runtime
# ---------------------------------------------------------------------------------------------
def _np(t: Any) -> np.ndarray:
    if isinstance(t, Tensor):
        return t.detach().cpu().numpy()
    return np.asarray(t)


def session(path: str, providers: Sequence[str] = ("CPUExecutionProvider",), threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(path, sess_options=opts, providers=list(providers))


def run_onnx(sess_or_path: Any, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Run a graph on the feeds it needs (`feeds` may hold more); returns outputs by name."""
    sess = session(sess_or_path) if isinstance(sess_or_path, (str, os.PathLike)) else sess_or_path
    wanted = [i.name for i in sess.get_inputs()]
    feeds = with_grid_crop(wanted, feeds)
    missing = [n for n in wanted if n not in feeds]
    if missing:
        raise KeyError(f"graph inputs {missing} not in the feeds (have {sorted(feeds)})")
    outs = sess.run(None, {n: _np(feeds[n]) for n in wanted})
    return dict(zip([o.name for o in sess.get_outputs()], outs))


@dataclass
class VerifyResult:
    max_abs: float  # max |onnx - torch| over all outputs
    max_rel: float  # max over outputs of max|onnx - torch| / max|torch|
    per_output: dict[str, tuple[float, float]]

    def ok(self, rel: float = 1e-4) -> bool:
        return self.max_rel <= rel


def compare(got: Mapping[str, Any], expected: Mapping[str, Any]) -> VerifyResult:
    per: dict[str, tuple[float, float]] = {}
    for n, ref in expected.items():
        r = _np(ref).astype(np.float64)
        g = _np(got[n]).astype(np.float64)
        if r.shape != g.shape:
            raise ValueError(f"{n}: onnx shape {g.shape} != torch shape {r.shape}")
        a = float(np.abs(g - r).max()) if r.size else 0.0
        scale = float(np.abs(r).max()) if r.size else 0.0
        per[n] = (a, a / scale if scale > 0 else a)
    return VerifyResult(max((v[0] for v in per.values()), default=0.0), max((v[1] for v in per.values()), default=0.0), per)


def verify(path: str, feeds: Mapping[str, Any], expected: Mapping[str, Any], providers: Sequence[str] = ("CPUExecutionProvider",)) -> VerifyResult:
    """Run `path` in ONNX Runtime on `feeds` and compare with the torch outputs `expected` (by output name).

    Relative error is max|onnx - torch| / max|torch| per output (elementwise
    relative error is meaningless near zero); both maxima are over all outputs.
    """
    got = run_onnx(session(path, providers), feeds)
    return compare(got, expected)


def run_chain(
    specs: Sequence[GraphSpec], feeds: Mapping[str, Any], sessions: dict[str, Any] | None = None
) -> dict[str, np.ndarray]:
    """Run graphs in order (prologue, groups / infer graphs, epilogue) in ONNX Runtime.

    Each graph takes what it needs from the accumulated feeds; `out.<slot>` becomes
    `state.<slot>` for the next, and a stream a graph ended (SD3) is dropped.
    LoRA inputs of infer graphs are looked up in `feeds` by their published names.
    Returns all accumulated tensors (`prediction` after the epilogue).
    """
    acc: dict[str, Any] = dict(feeds)
    cache = sessions if sessions is not None else {}
    for spec in specs:
        sess = cache.get(spec.path)
        if sess is None:
            sess = cache[spec.path] = session(spec.path)
        out = run_onnx(sess, acc)
        for slot in spec.state_in:
            if spec.state_out and slot not in spec.state_out:
                acc.pop(f"state.{slot}", None)
        for n, v in out.items():
            acc[f"state.{n[4:]}" if n.startswith("out.") else n] = v
    return acc
