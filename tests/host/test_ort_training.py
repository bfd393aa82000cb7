"""ORT training artifacts against the torch block-skip step: loss, LoRA gradients, ten AdamW steps,
and an adapter trained in ORT loaded into the infer graphs, on tiny configs of every family."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from dit_inputs import make_inputs
from edgeblock.compile import onnx_export as ox
from edgeblock.compile import ort_training as ot
from edgeblock.method.blockskip import BlockSkipModel, SkipPlan, precompute
from edgeblock.method.lora import LoRASpec, randomize_lora
from edgeblock.models import adapter_from_module
from edgeblock.models.presets import TINY

pytest.importorskip("onnxruntime.training")

REL = 1e-4
# FLUX (1, 2): double -> single inside the training graph; SD3 (2, 3): its last block ends the text stream;
# PixArt (1, 3): a gap between trainable blocks (and two infer graphs for generation); Sana (1, 2).
CASES = [("flux", (1, 2)), ("sd3", (2, 3)), ("pixart", (1, 3)), ("sana", (1, 2))]


def _setup(family, blocks, seed=3):
    preset = TINY[family]
    model = preset.build(seed=1)
    adapter = adapter_from_module(model, preset.latent_channels)
    plan = SkipPlan.make(adapter.num_blocks, blocks)
    lora = LoRASpec(rank=2)
    net = BlockSkipModel(adapter, plan, lora)
    randomize_lora(net, seed=seed, scale=0.1)  # non-trivial gradients for every LoRA tensor
    x = make_inputs(preset, batch=2, size=preset.latent_size // 2)  # the training shape
    target = torch.randn(x.latents.shape, generator=torch.Generator().manual_seed(7))
    (pre,) = precompute(adapter, plan, [(x, target)])
    return preset, model, adapter, plan, lora, net, pre


def _rel(got, ref):
    return float(np.abs(np.asarray(got) - np.asarray(ref)).max() / max(np.abs(np.asarray(ref)).max(), 1e-30))


@pytest.mark.parametrize("family,blocks", CASES)
def test_ort_training_matches_torch_and_adapter_round_trips(family, blocks, tmp_path):
    preset, model, adapter, plan, lora, net, pre = _setup(family, blocks)
    cfg = ot.AdamWConfig(lr=5e-3)
    spec = ot.export_training_artifacts(adapter, plan, lora, pre, str(tmp_path / "trainable"), net=net, optimizer=cfg)
    for what in ("training", "eval", "optimizer"):
        assert onnx.load(spec.path(what), load_external_data=False).ir_version <= 10
    trainer = ot.OrtTrainer(spec.artifact_dir)
    feeds = spec.feeds(pre)
    params = {ot._published(adapter, n): p for n, p in net.lora_parameters().items()}
    assert set(spec.requires_grad) | set(spec.unreachable) == set(params)

    # (2a) one step: loss and gradients of every trainable LoRA tensor
    loss_ort, grads_ort = trainer.loss_and_grads(feeds)
    net.zero_grad()
    loss_t = torch.nn.functional.mse_loss(net(pre), pre.target)
    loss_t.backward()
    assert abs(loss_ort - loss_t.item()) <= REL * loss_t.item()
    worst = max(_rel(grads_ort[n], params[n].grad) for n in spec.requires_grad)
    assert worst <= REL, f"{family}: LoRA gradient rel error {worst}"

    # (2b) ten AdamW steps from the same initialisation (torch.optim.AdamW == ORT adam_mode 0)
    opt = cfg.torch([params[n] for n in spec.requires_grad])
    curve_t, curve_o = ot.paired_curves(net, pre, trainer, feeds, opt)
    curve_t, curve_o = np.array(curve_t), np.array(curve_o)
    assert curve_t[-1] < curve_t[0]
    assert np.max(np.abs(curve_o - curve_t) / curve_t) <= 0.01, (curve_t, curve_o)

    # (3) the ORT-trained adapter in the infer graphs changes the output as torch with the same LoRA does
    trained = trainer.lora_weights()
    assert set(trained) == set(params)
    ot.load_lora_into(net, adapter, trained)
    specs = ox.export_inference_graphs(adapter, plan, lora, make_inputs(preset, batch=2), str(tmp_path / "bundle"))
    x = make_inputs(preset, batch=2, seed=11)  # generation shape
    with torch.no_grad():
        base = adapter.reference_forward(model, x)
        state, ctx = adapter.prologue(x)
        for i in range(adapter.num_blocks):
            block = net.blocks[str(i)] if i in plan.trainable else adapter.build_block(i)
            state = adapter.run_block(block, i, state, ctx)
        ref = adapter.epilogue(state, ctx)
    got_zero = ox.run_chain(specs, {**ox.prologue_inputs(x), **{n: np.zeros_like(v) for n, v in trained.items()}})
    got = ox.run_chain(specs, {**ox.prologue_inputs(x), **trained})
    assert ox.compare({"p": got_zero["prediction"]}, {"p": base}).max_rel <= REL
    err = ox.compare({"p": got["prediction"]}, {"p": ref})
    change = ox.compare({"p": ref}, {"p": base})
    assert err.max_rel <= REL, f"{family}: trained adapter in ORT vs torch {err}"
    assert change.max_rel > 100 * max(err.max_rel, 1e-7), f"{family}: the adapter barely changes the output ({change})"


def test_unreachable_lora_is_frozen(tmp_path):
    """FLUX, only the last double block trains: the single blocks after it are skipped, so its text
    stream never reaches the loss; its text-query and text-output LoRA must not be trainable."""
    _, _, adapter, plan, lora, net, pre = _setup("flux", (1,))
    spec = ot.export_training_artifacts(adapter, plan, lora, pre, str(tmp_path / "t"), net=net, keep_base=True)
    unreach = set(spec.unreachable)
    assert {"transformer_blocks.1.attn.add_q_proj.lora_A.weight", "transformer_blocks.1.attn.to_add_out.lora_B.weight"} <= unreach
    assert "transformer_blocks.1.attn.add_k_proj.lora_A.weight" in spec.requires_grad  # text keys reach the image
    assert not unreach & set(spec.requires_grad) and unreach <= set(spec.frozen)
    # the exporter drops to_add_out (no path at all); it is kept in the checkpoint for the adapter
    assert set(ot.OrtTrainer(spec.artifact_dir).lora_weights()) == set(spec.lora)
    assert spec.inputs == ["state.image", "state.text", "ctx.temb", "ctx.rotary.0", "ctx.rotary.1", "gap_2_4.image", "target"]
    assert ot.TrainingSpec.load(spec.artifact_dir).requires_grad == spec.requires_grad
    opt = onnx.load(spec.path("optimizer"))
    node = next(n for n in opt.graph.node if n.op_type == "AdamWOptimizer")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["adam_mode"] == 0 and attrs["weight_decay"] == pytest.approx(1e-2) and attrs["epsilon"] == pytest.approx(1e-8)
    base = onnx.load(str(tmp_path / "t" / "base_model.onnx"))
    assert not any(n.op_type == "LayerNormalization" for n in base.graph.node)
    assert [o.name for o in base.graph.output] == ["loss"]
