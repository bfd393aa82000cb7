"""The training graph's fused tanh GELU: FastGelu (and FastGeluGrad) in training_model.onnx, plain default-domain
ops with the same values in eval_model.onnx, and the same loss and LoRA gradients as the decomposed GELU."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from dit_inputs import make_inputs
from edgeblock.compile import export_patches as ep
from edgeblock.compile import ort_training as ot
from edgeblock.compile import train_graph as tg
from edgeblock.method.blockskip import BlockSkipModel, SkipPlan, precompute
from edgeblock.method.lora import LoRASpec, randomize_lora
from edgeblock.models import adapter_from_module
from edgeblock.models.presets import TINY
from onnx import helper

pytest.importorskip("onnxruntime.training")


def _ops(path: str) -> list[tuple[str, str]]:
    return [(n.domain, n.op_type) for n in onnx.load(path, load_external_data=False).graph.node]


def test_decompose_fast_gelu_keeps_the_values():
    import onnxruntime as ort

    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, 7])
    b = helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, [7])
    nodes = [helper.make_node("FastGelu", ["x"], ["y"], domain=tg.MS_DOMAIN, name="g0"),
             helper.make_node("FastGelu", ["y", "b"], ["z"], domain=tg.MS_DOMAIN)]
    out = helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [3, 7])
    model = helper.make_model(helper.make_graph(nodes, "g", [x, b], [out]),
                              opset_imports=[helper.make_opsetid("", 15), helper.make_opsetid(tg.MS_DOMAIN, 1)])
    model.ir_version = 10
    feeds = {"x": np.linspace(-6, 6, 21, dtype=np.float32).reshape(3, 7), "b": np.linspace(-1, 1, 7, dtype=np.float32)}

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(["z"], feeds)[0]

    ref = run(model)
    assert tg.decompose_fast_gelu(model) == 2
    assert all(n.domain == "" for n in model.graph.node)
    assert [o.domain for o in model.opset_import] == [""]
    onnx.checker.check_model(model)
    np.testing.assert_allclose(run(model), ref, rtol=1e-6, atol=1e-6)
    t = torch.from_numpy(feeds["x"])
    np.testing.assert_allclose(ref, torch.nn.functional.gelu(torch.nn.functional.gelu(t, approximate="tanh") + torch.from_numpy(feeds["b"]),
                                                             approximate="tanh").numpy(), rtol=1e-6, atol=1e-6)
    assert tg.decompose_fast_gelu(model) == 0


def test_training_graph_fuses_the_tanh_gelu_with_the_same_loss_and_gradients(tmp_path, monkeypatch):
    """FLUX (1, 2): a double block (ff and ff_context GELUs) and a single block (act_mlp), LoRA before each."""
    preset = TINY["flux"]
    adapter = adapter_from_module(preset.build(seed=1), preset.latent_channels)
    plan = SkipPlan.make(adapter.num_blocks, (1, 2))
    lora = LoRASpec(rank=2)
    net = BlockSkipModel(adapter, plan, lora)
    randomize_lora(net, seed=3, scale=0.1)
    x = make_inputs(preset, batch=1, size=preset.latent_size // 2)
    (pre,) = precompute(adapter, plan, [(x, torch.randn(x.latents.shape, generator=torch.Generator().manual_seed(7)))])

    spec = ot.export_training_artifacts(adapter, plan, lora, pre, str(tmp_path / "fused"), net=net)
    train_ops, eval_ops = _ops(spec.path("training")), _ops(spec.path("eval"))
    assert train_ops.count((tg.MS_DOMAIN, "FastGelu")) == 3 and train_ops.count((tg.MS_DOMAIN, "FastGeluGrad")) == 3
    assert not any(op == "Sigmoid" for _, op in train_ops)  # nothing left of a decomposed GELU
    assert {d for d, _ in eval_ops} == {""}  # the torch trainer backend reads default-domain ops only

    monkeypatch.setattr(ep, "gelu_fused", ep.gelu_sigmoid_form)  # the decomposed GELU, as before the fusion
    plain = ot.export_training_artifacts(adapter, plan, lora, pre, str(tmp_path / "plain"), net=net)
    assert (tg.MS_DOMAIN, "FastGelu") not in _ops(plain.path("training"))

    feeds = spec.feeds(pre)
    fused_t, plain_t = ot.OrtTrainer(spec.artifact_dir), ot.OrtTrainer(plain.artifact_dir)
    (loss_f, grads_f), (loss_p, grads_p) = fused_t.loss_and_grads(feeds), plain_t.loss_and_grads(feeds)
    assert loss_f == pytest.approx(loss_p, rel=1e-6)
    for n in spec.requires_grad:
        assert np.abs(grads_f[n] - grads_p[n]).max() <= 1e-5 * np.abs(grads_p[n]).max(), n
    assert fused_t.eval_loss(feeds) == pytest.approx(plain_t.eval_loss(feeds), rel=1e-6)
