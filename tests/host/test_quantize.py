"""Weight-only quantization of ONNX graphs (edgeblock.compile.quantize): packing, graph rewrite, errors, sizes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeblock.compile.quantize import (
    WEIGHTS,
    dequantize_int4,
    dequantize_int8,
    pack_int4,
    quantization_error,
    quantize_int8,
    quantize_model,
)

K_IN = 100  # not a multiple of the block size: the first layer's K is padded to 128


def _mlp() -> onnx.ModelProto:
    """x (6, 100) -> MatMul+Add -> Relu -> Gemm(transB, alpha, beta) -> Relu -> MatMul = y; plus three
    MatMuls that must stay fp32: B a graph input (z), B too small (s), B 3-D (t)."""
    rng = np.random.default_rng(0)

    def init(name, shape, scale):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [
        init("w1", (K_IN, 128), K_IN**-0.5), init("b1", (128,), 0.1),
        init("w2", (160, 128), 128**-0.5), init("c2", (160,), 0.1),  # Gemm B is (N, K): transB=1
        init("w3", (160, 64), 160**-0.5),
        init("w_small", (160, 4), 0.1), init("w_3d", (2, 160, 8), 0.1),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1m"], name="fc1"),
        helper.make_node("Add", ["h1m", "b1"], ["h1a"]),
        helper.make_node("Relu", ["h1a"], ["h1"]),
        helper.make_node("Gemm", ["h1", "w2", "c2"], ["h2g"], name="fc2", transB=1, alpha=0.5, beta=2.0),
        helper.make_node("Relu", ["h2g"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w3"], ["y"], name="fc3"),
        helper.make_node("MatMul", ["x", "w_dyn"], ["z"], name="dyn"),
        helper.make_node("MatMul", ["h2", "w_small"], ["s"], name="small"),
        helper.make_node("MatMul", ["h2", "w_3d"], ["t"], name="batched"),
    ]
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", f, [6, K_IN]), helper.make_tensor_value_info("w_dyn", f, [K_IN, 8])],
        [helper.make_tensor_value_info(n, f, [6, 64]) for n in ("y", "z", "s", "t")],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _feeds() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {"x": rng.standard_normal((6, K_IN)).astype(np.float32),
            "w_dyn": rng.standard_normal((K_IN, 8)).astype(np.float32)}


def _init_bytes(model: onnx.ModelProto) -> int:
    return sum(numpy_helper.to_array(i).nbytes for i in model.graph.initializer)


def test_int4_packing_matches_ort_and_numpy_reference():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((K_IN, 40)).astype(np.float32)  # 4 blocks of 32, the last padded from 4 rows
    packed, scales, zeros = pack_int4(w, 32)
    assert packed.shape == (40, 4, 16) and scales.shape == (160,) and zeros.shape == (80,)
    w_hat = dequantize_int4(packed, scales, zeros, K_IN)
    # rounding error at most half a step of the element's block
    step = np.repeat(scales.reshape(40, 4), 32, axis=1)[:, :K_IN].T
    assert np.all(np.abs(w - w_hat) <= 0.5 * step + 1e-6)
    # ORT reads the same layout: A = identity gives back the dequantized matrix
    node = helper.make_node("MatMulNBits", ["a", "b", "s", "z"], ["y"], domain="com.microsoft",
                            K=K_IN, N=40, bits=4, block_size=32)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [K_IN, K_IN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [K_IN, 40])],
        [numpy_helper.from_array(packed, "b"), numpy_helper.from_array(scales, "s"),
         numpy_helper.from_array(zeros, "z")])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"a": np.eye(K_IN, dtype=np.float32)})[0]
    np.testing.assert_allclose(got, w_hat, rtol=1e-6, atol=1e-6)


def test_int4_odd_block_count_packs_zero_points_per_row():
    w = np.random.default_rng(3).standard_normal((96, 5)).astype(np.float32) + 1.0  # 3 blocks: odd
    packed, scales, zeros = pack_int4(w, 32)
    assert zeros.shape == (5 * 2,)  # each row's 3 zero points take 2 bytes
    assert np.all(np.abs(dequantize_int4(packed, scales, zeros, 96) - w) <= 0.5 * scales.max() + 1e-6)


def test_int8_round_trip_within_half_a_step():
    w = np.random.default_rng(4).standard_normal((96, 33)).astype(np.float32)
    q, scales = quantize_int8(w)
    assert q.dtype == np.int8 and scales.shape == (33,)
    assert np.all(np.abs(dequantize_int8(q, scales) - w) <= 0.5 * scales + 1e-7)


# Measured on this model (3 quantized layers, errors compound through them; one Gaussian layer alone:
# int4 ~0.08, int8 ~0.008): y rel int4 0.121, int8 0.0100, fp16 3.1e-4; s and t (fp32 weights fed by the
# quantized h2) up to 1.3x that. A wrong nibble order or scale layout gives rel ~1.
@pytest.mark.parametrize("weights, rel_bound, op", [("int4", 0.15, "MatMulNBits"),
                                                    ("int8", 0.0125, "DequantizeLinear"),
                                                    ("fp16", 5e-4, "Cast")])
def test_quantized_outputs_match_fp32(weights, rel_bound, op):
    model = _mlp()
    q, report = quantize_model(model, weights)
    onnx.checker.check_model(q)
    assert sum(n.op_type == op for n in q.graph.node) == 3
    errors = quantization_error(model, q, _feeds())
    assert set(errors) == {"y", "z", "s", "t"}
    assert 0 < errors["y"]["rel"] < rel_bound
    assert errors["s"]["rel"] < 1.5 * rel_bound and errors["t"]["rel"] < 1.5 * rel_bound
    assert errors["z"]["max_abs"] == 0.0 and errors["z"]["rel"] == 0.0  # B a graph input: untouched


@pytest.mark.parametrize("weights, low, high", [("int4", 0.125, 0.2), ("int8", 0.25, 0.27), ("fp16", 0.5, 0.5)])
def test_weight_bytes_shrink(weights, low, high):
    model = _mlp()
    q, report = quantize_model(model, weights)
    assert report["quantized"] == 3
    assert report["bytes_before"] == 4 * (K_IN * 128 + 160 * 128 + 160 * 64)
    assert low <= report["bytes_after"] / report["bytes_before"] <= high
    # the report says what the file holds: the model shrank by exactly that much
    assert _init_bytes(model) - _init_bytes(q) == report["bytes_before"] - report["bytes_after"]
    assert not {"w1", "w2", "w3"} & {i.name for i in q.graph.initializer}


def test_skipped_matmuls_are_listed_with_their_reason():
    _, report = quantize_model(_mlp(), "int8")
    reasons = {s["node"]: s["reason"] for s in report["skipped"]}
    assert set(reasons) == {"dyn", "small", "batched"}
    assert "not a constant initializer" in reasons["dyn"]
    assert "640 elements < min_elements=4096" in reasons["small"]
    assert "not 2-D" in reasons["batched"]
    assert [m["node"] for m in report["matrices"]] == ["fc1", "fc2", "fc3"]
    assert report["matrices"][1]["shape"] == [128, 160]  # the Gemm's weight as (K, N)


def test_fp32_returns_an_identical_graph():
    model = _mlp()
    q, report = quantize_model(model, "fp32")
    assert q.SerializeToString() == model.SerializeToString()
    assert report["quantized"] == 0 and report["skipped"] == []


def test_int4_declares_the_contrib_domain_and_settings_name_the_session_options():
    q, report = quantize_model(_mlp(), "int4", block_size=64)
    assert any(o.domain == "com.microsoft" for o in q.opset_import)
    assert {helper.get_attribute_value(a) for n in q.graph.node if n.op_type == "MatMulNBits"
            for a in n.attribute if a.name == "block_size"} == {64}
    assert quantize_model(_mlp(), "fp16")[1]["session"]["execution_order"] == "PRIORITY_BASED"


def test_bad_arguments_raise_value_error_naming_the_fix():
    with pytest.raises(ValueError, match="fp32, fp16, int8, int4"):
        quantize_model(_mlp(), "int2")
    with pytest.raises(ValueError, match="power of two"):
        quantize_model(_mlp(), "int4", block_size=48)
    assert WEIGHTS == ("fp32", "fp16", "int8", "int4")


def test_unloaded_external_data_raises(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_mlp(), path, save_as_external_data=True, size_threshold=0)
    with pytest.raises(ValueError, match="onnx.load"):
        quantize_model(onnx.load(path, load_external_data=False), "int4")


def test_only_replaced_weights_are_dropped():
    model = _mlp()
    model.graph.initializer.append(numpy_helper.from_array(np.ones(3, np.float32), "unused"))
    # an If branch reads w3 from the outer scope: w3 must stay although the main graph no longer reads it
    branch = helper.make_graph([helper.make_node("Identity", ["w3"], ["w3_out"])], "branch", [],
                               [helper.make_tensor_value_info("w3_out", TensorProto.FLOAT, [160, 64])])
    model.graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    model.graph.node.append(helper.make_node("If", ["cond"], ["w3_copy"], then_branch=branch, else_branch=branch))
    q, report = quantize_model(model, "int4")
    names = {i.name for i in q.graph.initializer}
    assert {"unused", "w3", "cond"} <= names and not {"w1", "w2", "c2"} & names
    assert report["quantized"] == 3



@pytest.mark.parametrize("weights", ["fp16", "int8", "int4"])
def test_token_activations_of_rank_3_keep_their_shape(weights):
    rng = np.random.default_rng(5)
    w = numpy_helper.from_array(rng.standard_normal((96, 80)).astype(np.float32), "w")  # 3 blocks of 32
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "tokens",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", 96])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "t", 80])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    q, _ = quantize_model(model, weights)
    errors = quantization_error(model, q, {"x": rng.standard_normal((2, 7, 96)).astype(np.float32)})
    assert errors["y"]["rel"] < {"fp16": 5e-4, "int8": 0.0125, "int4": 0.12}[weights]  # one layer: 2e-4, 0.006, 0.077


@pytest.mark.parametrize("weights", ["fp16", "int8", "int4"])
def test_a_weight_read_by_several_matmuls_is_stored_once_and_copied_per_reader(weights):
    """Token slices (compile/feedforward_chunks.py) read one weight from several MatMuls: its codes are stored once,
    and an int8 / fp16 weight gets an fp32 copy per reader, made just before it (not one held across all of them)."""
    rng = np.random.default_rng(6)
    w = numpy_helper.from_array(rng.standard_normal((96, 80)).astype(np.float32), "w")
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node("MatMul", [x, "w"], [y]) for x, y in (("a", "ya"), ("b", "yb"), ("c", "yc"))], "slices",
        [helper.make_tensor_value_info(x, f, [5, 96]) for x in "abc"],
        [helper.make_tensor_value_info(y, f, [5, 80]) for y in ("ya", "yb", "yc")], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    q, report = quantize_model(model, weights)
    assert report["quantized"] == 1 and len(report["matrices"]) == 1
    stored = {"fp16": 96 * 80 * 2, "int8": 96 * 80 + 80 * 4}
    if weights in stored:
        assert _init_bytes(q) == stored[weights]
        op = {"fp16": "Cast", "int8": "DequantizeLinear"}[weights]
        nodes = list(q.graph.node)
        copies = [n for n in nodes if n.op_type == op]
        assert len(copies) == 3 and len({n.output[0] for n in copies}) == 3
        assert len({tuple(n.input) for n in copies}) == 1  # one stored weight
        for k, n in enumerate(nodes):  # each copy is read by the MatMul right after it, and only by it
            if n.op_type == op:
                assert nodes[k + 1].op_type == "MatMul" and nodes[k + 1].input[1] == n.output[0]
                assert sum(n.output[0] in m.input for m in nodes) == 1
    else:
        assert sum(n.op_type == "MatMulNBits" for n in q.graph.node) == 3 and len(q.graph.initializer) == 3
    feeds = {x: rng.standard_normal((5, 96)).astype(np.float32) for x in "abc"}
    errors = quantization_error(model, q, feeds)
    assert max(e["rel"] for e in errors.values()) < {"fp16": 5e-4, "int8": 0.0125, "int4": 0.12}[weights]


def test_column_blocks_cover_the_columns_within_the_copy_size():
    from edgeblock.compile.quantize import column_blocks

    assert column_blocks(96, 80, 96 * 80 * 4) == [(0, 80)]  # fits: one block
    blocks = column_blocks(96, 80, 96 * 80 * 4 // 3)
    assert len(blocks) == 3 and blocks[0][0] == 0 and blocks[-1][1] == 80
    assert all(a < b and b == c for (a, b), (c, _) in zip(blocks, blocks[1:] + [(80, 0)]))
    assert max(b - a for a, b in blocks) * 96 * 4 <= 96 * 80 * 4 // 3 + 96 * 4  # near-equal widths
    assert column_blocks(4, 3, 1) == [(0, 1), (1, 2), (2, 3)]  # never below one column


@pytest.mark.parametrize("weights", ["fp16", "int8"])
def test_a_large_weight_is_stored_in_column_blocks_each_copied_before_its_own_matmul(weights):
    """An int8 / fp16 weight whose fp32 copy is above copy_block_bytes: stored in column blocks (the same bytes),
    each block's copy made right before the MatMul that reads it, the products concatenated; the outputs equal the
    unblocked graph's exactly (per-column scales: the same codes)."""
    rng = np.random.default_rng(8)
    w = numpy_helper.from_array(rng.standard_normal((96, 80)).astype(np.float32), "w")
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node("MatMul", [x, "w"], [y]) for x, y in (("a", "ya"), ("b", "yb"))], "slices",
        [helper.make_tensor_value_info(x, f, ["t", 96]) for x in "ab"],
        [helper.make_tensor_value_info(y, f, ["t", 80]) for y in ("ya", "yb")], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    whole, _ = quantize_model(model, weights)
    blocked, report = quantize_model(model, weights, copy_block_bytes=96 * 80 * 4 // 3)
    assert report["quantized"] == 1 and _init_bytes(blocked) == _init_bytes(whole)
    op = {"fp16": "Cast", "int8": "DequantizeLinear"}[weights]
    nodes = list(blocked.graph.node)
    copies = [n for n in nodes if n.op_type == op]
    assert len(copies) == 2 * 3 and len({tuple(n.input) for n in copies}) == 3  # 3 stored blocks, a copy per reader
    for k, n in enumerate(nodes):
        if n.op_type == op:
            assert nodes[k + 1].op_type == "MatMul" and nodes[k + 1].input[1] == n.output[0]
            assert sum(n.output[0] in m.input for m in nodes) == 1
    cats = [n for n in nodes if n.op_type == "Concat"]
    assert sorted(c.output[0] for c in cats) == ["ya", "yb"] and all(len(c.input) == 3 for c in cats)
    feeds = {x: rng.standard_normal((7, 96)).astype(np.float32) for x in "ab"}
    sess = {k: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
            for k, m in (("whole", whole), ("blocked", blocked))}
    a, b = (sess[k].run(None, feeds) for k in ("whole", "blocked"))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
