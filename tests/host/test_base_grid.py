"""compile/base_grid.py: a trainable block's base weights on the grid of the bundle's precision, and the quantizer
giving back exactly those values, so that what trains is what generates."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from edgeblock.compile.base_grid import base_rounding, grid_values, on_grid
from edgeblock.compile.quantize import MIN_ELEMENTS, quantize_model
from onnx import TensorProto, helper, numpy_helper
from torch import nn


def _weights(seed: int = 0) -> np.ndarray:
    """(K, N) = (96, 80): K not a multiple of the int4 block; one column all positive, one all zero, one with an
    outlier."""
    w = np.random.default_rng(seed).standard_normal((96, 80)).astype(np.float32)
    w[:, 3] = np.abs(w[:, 3]) + 0.1
    w[:, 5] = 0.0
    w[7, 9] = 40.0
    return w


def _run_matmul(w: np.ndarray, precision: str, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    k, n = w.shape
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
                          [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    q, report = quantize_model(m, precision)
    assert report["quantized"] == 1
    s = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


@pytest.mark.parametrize("precision", ["int4", "int8", "fp16"])
def test_the_quantizer_gives_back_an_on_grid_weight(precision):
    w = _weights()
    g = grid_values(w, precision)
    assert g.shape == w.shape and g.dtype == np.float32
    assert 0 < np.abs(g - w).max() < {"int4": 3.0, "int8": 0.2, "fp16": 0.05}[precision]
    # idempotent (int4: a block's scale, (max - min) / 15 of on-grid values, may move in its last bit)
    np.testing.assert_allclose(grid_values(g, precision), g, rtol=1e-6, atol=0)
    assert not g[:, 5].any()  # zero stays zero
    # through the real rewrite and ONNX Runtime's kernel: the on-grid weight's product is the fp32 product of g
    x = np.random.default_rng(1).standard_normal((4, w.shape[0])).astype(np.float32)
    got = _run_matmul(g, precision, x)
    np.testing.assert_allclose(got, x @ g, rtol=1e-5, atol=1e-4)
    # and the original weight's is not (the grid is what moved it)
    assert np.abs(_run_matmul(w, precision, x) - x @ w).max() > 10 * np.abs(got - x @ g).max()


def test_on_grid_moves_the_linear_weights_compile_quantizes_and_nothing_else():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 96), nn.LayerNorm(96), nn.Linear(96, 48), nn.Linear(48, 8))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    assert m[3].weight.numel() < MIN_ELEMENTS <= m[2].weight.numel()
    assert on_grid(m, "int4") == 2
    after = m.state_dict()
    for k in before:
        moved = k in ("0.weight", "2.weight")
        assert (not torch.equal(before[k], after[k])) == moved, k
        if moved:  # torch's (N, K) is the MatMul's (K, N) transposed: blocks run along K
            want = grid_values(before[k].numpy().T, "int4").T
            np.testing.assert_array_equal(after[k].numpy(), want)
    # compile rounds a trainable block only where its graphs are int8 / int4: under --weights int4 (int8 graphs)
    assert base_rounding("fp32") is base_rounding("fp16") is base_rounding("int8") is None
    r = base_rounding("int4")
    m2 = nn.Linear(64, 64)
    w = m2.weight.detach().clone()
    assert r(m2) == 1 and torch.equal(m2.weight, torch.from_numpy(grid_values(w.numpy().T, "int8").T.copy()))
    with pytest.raises(ValueError, match="int3"):
        base_rounding("int3")
