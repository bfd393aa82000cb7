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

The naming rules and the chain order are edge_runtime/graph_names.py (the device reads
them from there). This module gathers the exporter's parts under one name:
export_patches.py (traceability patches, rms_norm decomposed), named_tensors.py (state,
ctx and dynamic axes as named tensors), onnx_io.py (export_module, saving), graph_spec.py
(GraphSpec), graphs.py (prologue, groups, epilogue, the chain), trainable_infer.py (LoRA
names, trainable/infer.onnx), onnx_run.py (ONNX Runtime runs and comparisons).
"""

from __future__ import annotations

from .export_patches import (  # noqa: F401
    _flux_model_args,
    _pixart_added_cond,
    _unflatten_traceable,
    export_patches,
    flux_position_ids,
    rms_norm_decomposed,
)
from .graph_spec import GraphSpec  # noqa: F401
from .graphs import export_epilogue, export_group, export_inference_graphs, export_prologue, prologue_inputs  # noqa: F401
from .named_tensors import (  # noqa: F401
    _AXES,
    CROP,
    HW,
    SLOTS,
    CtxLayout,
    axes_for,
    check_run,
    flatten_state,
    gap_prefix,
    graph_inputs,
    state_from,
    state_names,
    uses,
)
from .onnx_io import (  # noqa: F401
    EXTERNAL_DATA_THRESHOLD,
    MAX_IR_VERSION,
    OPSET,
    export_module,
    initializer_bytes,
    prune_unused_inputs,
    rename_tensors,
    save_onnx,
)
from .onnx_run import VerifyResult, _np, compare, run_chain, run_onnx, session, verify  # noqa: F401
from .trainable_infer import (  # noqa: F401
    export_trainable_infer,
    generation_chain,
    lora_name,
    lora_names,
    swap_parameters,
    trainable_runs,
)

# the helpers' names before the split into modules
_axes_for, _check_run, _state_from, _graph_inputs, _uses = axes_for, check_run, state_from, graph_inputs, uses
