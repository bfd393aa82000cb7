"""Calibrated int4 rounding (compile/gptq.py): equal to round-to-nearest when the inputs are white, a smaller
output error than it on held-out inputs like the calibration's, and the Hessians taken from a real graph."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeblock.compile.gptq import gptq_int4, input_hessians
from edgeblock.compile.quantize import (
    dequantize_int4,
    pack_codes,
    pack_int4,
    pack_int4_calibrated,
    quantization_error,
    quantize_model,
    quantized_inputs,
)


def _correlated(rng, k: int, tokens: int, mix: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return (rng.standard_normal((tokens, k)) @ mix) * scale


def test_white_inputs_round_to_nearest():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((96, 40)).astype(np.float32)  # K = 96: three blocks of 32
    (codes, scales, zeros), (codes0, scales0, zeros0) = pack_int4_calibrated(w, 7.0 * np.eye(96), 32), pack_int4(w, 32)
    np.testing.assert_array_equal(codes, codes0)
    np.testing.assert_array_equal(zeros, zeros0)
    np.testing.assert_allclose(scales, scales0, rtol=1e-6)  # float64 there, float32 here


def test_calibrated_rounding_beats_round_to_nearest_on_held_out_inputs():
    rng = np.random.default_rng(1)
    k, n = 256, 128
    mix = rng.standard_normal((k, k)) / np.sqrt(k)
    scale = np.exp(rng.standard_normal(k))  # channels of very different size, as in a transformer's activations
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    x_cal, x_test = _correlated(rng, k, 4096, mix, scale), _correlated(rng, k, 4096, mix, scale)

    def err(packed):
        wq = dequantize_int4(*packed, k)
        return np.linalg.norm(x_test @ (w - wq)) / np.linalg.norm(x_test @ w)

    rtn, cal = err(pack_int4(w, 32)), err(pack_int4_calibrated(w, x_cal.T @ x_cal, 32))
    assert cal < 0.9 * rtn, (cal, rtn)  # measured 0.062 vs 0.081
    assert rtn < 0.1


def test_unseen_inputs_and_padding_stay_finite_and_exact_zero():
    rng = np.random.default_rng(2)
    k, n = 50, 16  # K padded to 64
    x = rng.standard_normal((500, k))
    x[:, 3] = 0.0  # an input the calibration never saw
    w = rng.standard_normal((k, n)).astype(np.float32)
    q, scales, zeros = gptq_int4(w, x.T @ x, 32)
    assert q.shape == (n, 2, 32) and q.max() <= 15 and np.isfinite(scales).all()
    wq = dequantize_int4(*pack_codes(q, scales, zeros), k)
    assert np.abs(wq[3] - w[3]).max() <= scales.max() / 2 + 1e-6  # its row is rounded to nearest, not dropped
    assert np.linalg.norm(x @ (w - wq)) / np.linalg.norm(x @ w) < 0.1


def _two_layers() -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array((rng.standard_normal((64, 128)) * 0.1).astype(np.float32), "w1"),
             numpy_helper.from_array((rng.standard_normal((128, 64)) * 0.1).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Tanh", ["h"], ["a"]),
             helper.make_node("MatMul", ["a", "w2"], ["y"], name="fc2")]
    f = TensorProto.FLOAT
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", f, [None, 5, 64])],
                              [helper.make_tensor_value_info("y", f, [None, 5, 64])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_hessians_of_a_graph_and_a_calibrated_int4_model():
    model = _two_layers()
    rng = np.random.default_rng(4)
    mix = rng.standard_normal((64, 64)) / 8
    feeds = [{"x": (_correlated(rng, 64, 10, mix, np.exp(rng.standard_normal(64)))
                    .reshape(2, 5, 64).astype(np.float32))} for _ in range(3)]
    names = quantized_inputs(model)
    assert names == ["x", "a"]
    hs = input_hessians(model, names, feeds, max_outputs_per_run=1)
    w1 = numpy_helper.to_array(model.graph.initializer[0])
    xs = np.concatenate([f["x"].reshape(-1, 64) for f in feeds]).astype(np.float64)
    a = np.tanh(xs @ w1)
    np.testing.assert_allclose(hs["x"], xs.T @ xs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(hs["a"], a.T @ a, rtol=1e-4, atol=1e-6)
    q, report = quantize_model(model, "int4", hessians=hs, min_elements=1024)
    assert report["calibrated"] == 2 and report["quantized"] == 2
    assert sum(n.op_type == "MatMulNBits" for n in q.graph.node) == 2
    assert quantization_error(model, q, feeds[0])["y"]["rel"] < 0.15


def test_hessian_of_a_matmul_input_that_an_optimizer_would_remove():
    """A MatMul reading a transposed tensor through a Cast to the type it already has (Sana's exported attention
    output): ONNX Runtime's graph optimizations fold the Transpose and the Cast into the MatMul and answer the Cast's
    output with None, so it must be measured in the graph as written."""
    rng = np.random.default_rng(6)
    w = numpy_helper.from_array((rng.standard_normal((32, 48)) / 4).astype(np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32, "tokens"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "tokens", 48])
    nodes = [helper.make_node("Tanh", ["x"], ["h"]), helper.make_node("Transpose", ["h"], ["t"], perm=[0, 2, 1]),
             helper.make_node("Cast", ["t"], ["c"], to=TensorProto.FLOAT), helper.make_node("MatMul", ["c", "w"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "cast", [x], [y], [w]),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    feeds = [{"x": rng.standard_normal((2, 32, 5)).astype(np.float32)}]
    assert quantized_inputs(model, min_elements=256) == ["c"]
    hs = input_hessians(model, ["c"], feeds)
    t = np.tanh(feeds[0]["x"].astype(np.float64)).transpose(0, 2, 1).reshape(-1, 32)
    np.testing.assert_allclose(hs["c"], t.T @ t, rtol=1e-4, atol=1e-5)


def test_a_weight_read_in_token_slices_is_rounded_with_all_its_rows():
    """The same weight read by several MatMuls (a feed-forward cut into token slices): its codes are rounded with
    the slices' Hessians summed, which is the whole input's X^T X, so they equal the uncut graph's."""
    from edgeblock.compile.feedforward_chunks import chunk_feedforward

    rng = np.random.default_rng(5)
    w_up = numpy_helper.from_array((rng.standard_normal((16, 64)) / 4).astype(np.float32), "up")
    w_down = numpy_helper.from_array((rng.standard_normal((64, 16)) / 8).astype(np.float32), "down")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "tokens", 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "tokens", 16])
    nodes = [helper.make_node("MatMul", ["x", "up"], ["h"]), helper.make_node("Tanh", ["h"], ["t"]),
             helper.make_node("MatMul", ["t", "down"], ["y"])]
    whole = helper.make_model(helper.make_graph(nodes, "ff", [x], [y], [w_up, w_down]),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    cut = onnx.ModelProto()
    cut.CopyFrom(whole)
    assert chunk_feedforward(cut, 3) == 1
    mix = rng.standard_normal((16, 16)) / 4
    feeds = [{"x": _correlated(rng, 16, 14, mix, np.exp(rng.standard_normal(16))).reshape(2, 7, 16)
              .astype(np.float32)}]
    packed = []
    for m in (whole, cut):
        hs = input_hessians(m, quantized_inputs(m, min_elements=256), feeds)
        q, report = quantize_model(m, "int4", hessians=hs, min_elements=256)
        assert report["calibrated"] == 2 and report["quantized"] == 2
        packed.append({t.name: numpy_helper.to_array(t) for t in q.graph.initializer})
    assert set(packed[0]) == set(packed[1])
    for name, codes in packed[0].items():  # codes, scales and zero points of both weights
        np.testing.assert_allclose(packed[1][name], codes, rtol=1e-5, atol=1e-6)
