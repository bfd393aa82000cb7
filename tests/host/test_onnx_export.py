"""Inference ONNX export: prologue -> frozen groups -> trainable/infer.onnx -> epilogue in ONNX Runtime
against the diffusers model, at two shapes from one graph each, on tiny configs of every family."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from dit_inputs import make_inputs
from edgeblock.compile import onnx_export as ox
from edgeblock.method.blockskip import BlockSkipModel, SkipPlan
from edgeblock.method.lora import LoRASpec, randomize_lora
from edgeblock.models import adapter_from_module
from edgeblock.models.presets import TINY

REL = 1e-4  # fp32: max|onnx - torch| / max|torch|

# (family, trainable blocks, config overrides): FLUX (1, 2) crosses double -> single between infer_00 and infer_01,
# FLUX (3,) inside a frozen group; SD3's last block (in the trailing frozen group) ends the text stream.
# Variants of real models: guidance-distilled FLUX (FLUX.1-dev), PixArt with resolution/aspect-ratio
# conditions (sample_size 128, PixArt-Sigma 1024), both rebuilt from the traced shape in the graph.
CASES = [
    ("flux", (1, 2), {}),
    ("flux", (3,), {"guidance_embeds": True}),
    ("sd3", (1, 2), {}),
    ("pixart", (1, 2), {}),
    ("pixart", (2,), {"sample_size": 128}),
    ("sana", (1, 2), {}),
]


def _setup(family, overrides=None):
    preset = TINY[family]
    if overrides:
        preset = dataclasses.replace(preset, config={**preset.config, **overrides})
    model = preset.build(seed=1)
    return preset, model, adapter_from_module(model, preset.latent_channels)


def _inputs(preset, model, **kw):
    x = make_inputs(preset, **kw)
    if model.config.get("guidance_embeds"):
        x.guidance = torch.linspace(2.0, 4.0, x.latents.shape[0])
    return x


def zero_lora(specs):
    return {n: np.zeros(d["shape"], np.float32) for s in specs for n, d in s.lora.items()}


@pytest.mark.parametrize("family,blocks,overrides", CASES)
def test_chain_reproduces_torch_at_two_shapes(family, blocks, overrides, tmp_path):
    preset, model, adapter = _setup(family, overrides)
    plan = SkipPlan.make(adapter.num_blocks, blocks)
    specs = ox.export_inference_graphs(adapter, plan, LoRASpec(rank=2), _inputs(preset, model, batch=2), str(tmp_path))
    kinds = [s.kind for s in specs]
    assert kinds[0] == "prologue" and kinds[-1] == "epilogue" and kinds.count("trainable_infer") == len(blocks)
    files = ["infer.onnx"] if len(blocks) == 1 else [f"infer_{k:02d}.onnx" for k in range(len(blocks))]
    assert [s.path for s in specs if s.kind == "trainable_infer"] == [str(tmp_path / "trainable" / f) for f in files]
    assert [s.blocks for s in specs if s.kind == "trainable_infer"] == [[b] for b in blocks]  # one block per graph
    assert [s.blocks for s in specs[1:-1]] == [run for _, run in ox.generation_chain(plan)]
    json.dumps([s.to_dict() for s in specs])  # the descriptions are JSON-able
    for s in specs:
        m = onnx.load(s.path)
        assert m.ir_version <= ox.MAX_IR_VERSION and m.opset_import[0].version == ox.OPSET
    sessions = {}
    tokens = set()
    # generation shape (batch 2, full latent) and training shape (batch 1, half side): same graphs
    for batch, size in ((2, preset.latent_size), (1, preset.latent_size // 2)):
        x = _inputs(preset, model, batch=batch, size=size, seed=5)
        with torch.no_grad():
            ref = adapter.reference_forward(model, x)
        feeds = {**ox.prologue_inputs(x), **zero_lora(specs)}
        acc = ox.run_chain(specs, feeds, sessions)
        r = ox.compare({"prediction": acc["prediction"]}, {"prediction": ref})
        assert r.max_rel <= REL, f"{family} {blocks} at {size}x{size}: {r}"
        tokens.add(acc["state.image"].shape[1])
    assert len(tokens) == 2


def test_prologue_outputs_match_adapter(tmp_path):
    """FLUX ids are rebuilt in torch inside the graph: rotary tables equal the adapter's at another shape."""
    preset, _, adapter = _setup("flux")
    spec = ox.export_prologue(adapter, make_inputs(preset, batch=2), str(tmp_path / "p.onnx"))
    assert spec.inputs == ["latents", "timestep", "text", "pooled", ox.CROP]
    assert spec.ctx["rotary"] == ["ctx.rotary.0", "ctx.rotary.1"] and spec.ctx["shape"]["from"] == ox.HW
    x = make_inputs(preset, batch=1, size=6, seed=2)  # 3x3 tokens, not a square of the export
    with torch.no_grad():
        state, ctx = adapter.prologue(x)
    expected = {"state.image": state[0], "state.text": state[1], "ctx.temb": ctx["temb"],
                "ctx.rotary.0": ctx["rotary"][0], "ctx.rotary.1": ctx["rotary"][1]}
    r = ox.verify(spec.path, ox.prologue_inputs(x), expected)
    assert r.max_rel <= REL, r
    got = ox.run_onnx(spec.path, ox.prologue_inputs(x))  # no crop fed: the latent's own grid
    assert got[ox.HW].shape == (6, 6)


def test_prologue_places_a_training_crop_at_its_image_coordinates(tmp_path):
    """The `crop` input (crop_position of a box) gives the rotary tables of the torch path's crop_token_ids."""
    from edge_runtime.patch_sampling import CropBox, crop_position, crop_token_ids

    preset, _, adapter = _setup("flux")
    spec = ox.export_prologue(adapter, make_inputs(preset, batch=2), str(tmp_path / "p.onnx"))
    x = make_inputs(preset, batch=1, size=8, seed=3)  # a crop resized to 8 px = 4 x 4 tokens
    box = CropBox(top=3, left=6, size=11)  # cut from a larger image, at an odd place and scale
    ids = crop_token_ids(box, 8, adapter.pack)
    assert not np.allclose(ids, crop_token_ids(CropBox(0, 0, 8), 8, adapter.pack))
    with torch.no_grad():
        _, ctx = adapter.prologue(dataclasses.replace(x, img_ids=torch.from_numpy(ids)))
        _, grid_ctx = adapter.prologue(x)
    got = ox.run_onnx(spec.path, {**ox.prologue_inputs(x), ox.CROP: crop_position(box, 8, adapter.pack)})
    for j in (0, 1):
        want = ctx["rotary"][j].numpy()
        assert np.abs(got[f"ctx.rotary.{j}"] - want).max() <= 1e-5 * np.abs(want).max()
        assert np.abs(grid_ctx["rotary"][j].numpy() - want).max() > 1e-2  # the placement changed the tables
    with pytest.raises(ValueError, match="crop"):
        ox.export_prologue(adapter, dataclasses.replace(x, img_ids=torch.from_numpy(ids)), str(tmp_path / "q.onnx"))


def test_infer_graph_lora_inputs_and_gap_residuals(tmp_path):
    """Non-contiguous plan: the span 1..3 with LoRA inputs and block 2 as a residual input, vs torch."""
    preset, _, adapter = _setup("pixart")
    plan = SkipPlan.make(adapter.num_blocks, (1, 3))
    lora = LoRASpec(rank=2)
    net = BlockSkipModel(adapter, plan, lora)
    randomize_lora(net, seed=4, scale=0.2)
    x = make_inputs(preset, batch=2)
    with torch.no_grad():
        s0, ctx = adapter.prologue(x)
        s0 = adapter.run_block(adapter.build_block(0), 0, s0, ctx)
    spec = ox.export_trainable_infer(adapter, plan, lora, s0, ctx, str(tmp_path / "infer.onnx"))
    assert spec.blocks == [1, 2, 3] and spec.residuals == {"gap_2_2": {"image": "gap_2_2.image"}}
    assert "transformer_blocks.1.attn1.to_q.lora_A.weight" in spec.lora
    assert spec.lora["transformer_blocks.3.attn2.to_v.lora_B.weight"]["param"] == "attn2.to_v.lora_B.default.weight"
    x2 = make_inputs(preset, batch=1, size=8, seed=9)
    with torch.no_grad():
        s, ctx2 = adapter.prologue(x2)
        s = adapter.run_block(adapter.build_block(0), 0, s, ctx2)
        gap = (torch.randn_like(s[0]) * 0.1,)
        ref = adapter.run_block(net.blocks["1"], 1, s, ctx2)
        ref = (ref[0] + gap[0],)
        ref = adapter.run_block(net.blocks["3"], 3, ref, ctx2)
    feeds = {"state.image": s[0], **ox.CtxLayout.of(ctx2).tensors(ctx2), "gap_2_2.image": gap[0]}
    params = {f"{i}.{d['param']}": n for n, d in spec.lora.items() for i in [d["block"]]}
    lora_params = net.lora_parameters()
    feeds.update({n: lora_params[k] for k, n in params.items()})
    r = ox.verify(spec.path, feeds, {"out.image": ref[0]})
    assert r.max_rel <= REL, r


def test_zero_lora_infer_equals_frozen_blocks(tmp_path):
    preset, _, adapter = _setup("sd3")
    plan = SkipPlan.make(adapter.num_blocks, (2, 3))  # block 3 ends the text stream
    x = make_inputs(preset, batch=2)
    with torch.no_grad():
        state, ctx = adapter.prologue(x)
        for i in (0, 1):
            state = adapter.run_block(adapter.build_block(i), i, state, ctx)
        ref = state
        for i in (2, 3):
            ref = adapter.run_block(adapter.build_block(i), i, ref, ctx)
    assert ref[1] is None
    spec = ox.export_trainable_infer(adapter, plan, LoRASpec(rank=2), state, ctx, str(tmp_path / "infer.onnx"))
    assert spec.outputs == ["out.image"] and spec.state_out == {"image": "out.image"}
    feeds = {**ox.flatten_state(state), **ox.CtxLayout.of(ctx).tensors(ctx), **zero_lora([spec])}
    r = ox.verify(spec.path, feeds, {"out.image": ref[0]})
    assert r.max_rel <= REL, r


def test_external_data_and_ir_version(tmp_path):
    preset, _, adapter = _setup("pixart")
    x = make_inputs(preset, batch=1)
    with torch.no_grad():
        state, ctx = adapter.prologue(x)
        ref = adapter.run_block(adapter.build_block(0), 0, state, ctx)
    path = tmp_path / "group_00.onnx"
    spec = ox.export_group(adapter, [0], state, ctx, str(path), external_threshold=0)
    assert spec.external_data and (tmp_path / "group_00.onnx.data").exists()
    m = onnx.load(str(path), load_external_data=False)
    assert m.ir_version <= ox.MAX_IR_VERSION
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer)
    feeds = {**ox.flatten_state(state), **ox.CtxLayout.of(ctx).tensors(ctx)}
    assert ox.verify(str(path), feeds, {"out.image": ref[0]}).max_rel <= REL
    spec2 = ox.export_group(adapter, [0], state, ctx, str(path))  # re-export small: no stale data file
    assert not spec2.external_data and not (tmp_path / "group_00.onnx.data").exists()


def test_export_patches_are_restored_and_rms_norm_decomposition():
    from diffusers.models.embeddings import PatchEmbed

    _, _, adapter = _setup("pixart")
    pe = next(m for m in adapter.shell.modules() if isinstance(m, PatchEmbed))
    before = (F.rms_norm, torch.Tensor.unflatten, pe.height, "_added_cond" in vars(adapter))
    with ox.export_patches(adapter):
        assert F.rms_norm is ox.rms_norm_decomposed and pe.height == -1
    assert (F.rms_norm, torch.Tensor.unflatten, pe.height, "_added_cond" in vars(adapter)) == before
    x = torch.randn(2, 5, 8)
    w = torch.randn(8)
    torch.testing.assert_close(ox.rms_norm_decomposed(x, [8], w, 1e-6), F.rms_norm(x, [8], w, 1e-6))


def test_bad_runs_are_refused():
    _, _, adapter = _setup("pixart")
    with pytest.raises(ValueError, match="consecutive"):
        ox._check_run([0, 2], adapter.num_blocks)
    with pytest.raises(ValueError, match="out of range"):
        ox._check_run([3, 4], adapter.num_blocks)
    plan = SkipPlan.make(4, (1, 3))
    assert ox.generation_chain(plan) == [("frozen", [0]), ("trainable", [1]), ("frozen", [2]), ("trainable", [3])]
    assert ox.trainable_runs(plan) == [[1], [3]]
    # consecutive trainable blocks: one infer graph each (a streamed generation holds one fp32 block at a time)
    plan = SkipPlan.make(6, (2, 3, 4))
    assert ox.generation_chain(plan) == [("frozen", [0, 1]), ("trainable", [2]), ("trainable", [3]),
                                         ("trainable", [4]), ("frozen", [5])]
    assert ox.trainable_runs(plan) == [[2, 3, 4]]


@pytest.mark.parametrize("family,blocks,overrides", CASES)
def test_attention_in_query_slices_reproduces_torch(family, blocks, overrides, tmp_path, monkeypatch):
    """The groups' and infer graph's softmax attentions cut into query slices (compile/attention_chunks.py; a
    small slice so that the tiny configs are cut) and their feed-forward parts into token slices
    (compile/feedforward_chunks.py): the chain still matches torch at both shapes, the training shape's fewer
    queries included."""
    from edgeblock.compile import attention_chunks

    monkeypatch.setattr(attention_chunks, "QUERY_ROWS", 24)
    preset, model, adapter = _setup(family, overrides)
    specs = ox.export_inference_graphs(adapter, SkipPlan.make(adapter.num_blocks, blocks), LoRASpec(rank=2),
                                       _inputs(preset, model, batch=2), str(tmp_path))
    cut = {s.kind: s.attention_chunks for s in specs if s.attention_chunks}
    assert all(k > 1 for k in cut.values())
    # Sana's self-attention is linear (no queries x keys matrix) and its cross-attention adds a mask computed in
    # the graph, which the rewrite does not cut: nothing is cut there
    assert set(cut) == (set() if family == "sana" else {"group", "trainable_infer"}), cut
    slices = sum(n.op_type == "Slice" and ".chunks" in n.output[0] for s in specs for n in onnx.load(s.path).graph.node)
    assert slices >= 2 * min(cut.values(), default=0)
    # every family's feed-forward (FLUX single-stream blocks: concatenated with the attention's output) is cut but
    # Sana's, a convolution over the image grid (GLUMBConv), which is not row-wise
    ff = {s.kind: s.feedforward_chunks for s in specs if s.feedforward_chunks}
    assert set(ff) == (set() if family == "sana" else {"group", "trainable_infer"}), ff
    assert all(ff[k] == cut[k] for k in ff)
    rows = sum(n.op_type == "Slice" and ".rows" in n.output[0] for s in specs for n in onnx.load(s.path).graph.node)
    assert rows >= 2 * min(ff.values(), default=0)
    sessions = {}
    for batch, size in ((2, preset.latent_size), (1, preset.latent_size // 2)):
        x = _inputs(preset, model, batch=batch, size=size, seed=5)
        with torch.no_grad():
            ref = adapter.reference_forward(model, x)
        acc = ox.run_chain(specs, {**ox.prologue_inputs(x), **zero_lora(specs)}, sessions)
        r = ox.compare({"prediction": acc["prediction"]}, {"prediction": ref})
        assert r.max_rel <= REL, f"{family} {blocks} at {size}x{size}: {r}"
