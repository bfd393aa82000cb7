"""compile/feedforward_chunks.py on hand-built graphs: what is cut gives the graph's own outputs at any token count
(slices uneven or empty included), and what cannot be cut exactly is left alone."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeblock.compile.feedforward_chunks import chunk_feedforward

D = 8
rng = np.random.default_rng(3)
W1 = (rng.standard_normal((D, 4 * D)) * 0.3).astype(np.float32)
B1 = rng.standard_normal(4 * D).astype(np.float32)
W2 = (rng.standard_normal((4 * D, D)) * 0.3).astype(np.float32)
W2C = (rng.standard_normal((5 * D, D)) * 0.3).astype(np.float32)  # after a Concat with a D-wide tensor


def _gelu(x: str, p: str) -> tuple[list, str]:
    """GELU's tanh form as the exporter writes it: nine elementwise ops."""
    c = [helper.make_node("Constant", [], [f"{p}c{i}"], value=numpy_helper.from_array(np.array(v, np.float32)))
         for i, v in enumerate((0.044715, 0.7978846, 1.0, 0.5))]
    n = [helper.make_node("Mul", [x, x], [f"{p}sq"]), helper.make_node("Mul", [x, f"{p}sq"], [f"{p}cube"]),
         helper.make_node("Mul", [f"{p}c0", f"{p}cube"], [f"{p}m"]), helper.make_node("Add", [x, f"{p}m"], [f"{p}in"]),
         helper.make_node("Mul", [f"{p}c1", f"{p}in"], [f"{p}s"]), helper.make_node("Tanh", [f"{p}s"], [f"{p}t"]),
         helper.make_node("Add", [f"{p}c2", f"{p}t"], [f"{p}t1"]), helper.make_node("Mul", [x, f"{p}t1"], [f"{p}h"]),
         helper.make_node("Mul", [f"{p}c3", f"{p}h"], [f"{p}g"])]
    return c + n, f"{p}g"


def _model(*, lora=False, concat=False, gate=None, wide_out=False, row_const=False, opset=17):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "tokens", D])
    inputs, inits = [x], [numpy_helper.from_array(W1, "w1"), numpy_helper.from_array(B1, "b1"),
                          numpy_helper.from_array(W2C if concat else W2, "w2")]
    nodes = [helper.make_node("Mul", ["x", "x"], ["xn"]),  # something before the feed-forward
             helper.make_node("MatMul", ["xn", "w1"], ["up"]), helper.make_node("Add", ["up", "b1"], ["upb"])]
    wide = "upb"
    if lora:  # X @ A^T @ B^T x scale, the A and B factors given as inputs (a trainable run's LoRA)
        inputs += [helper.make_tensor_value_info("lora_a", TensorProto.FLOAT, [2, D]),
                   helper.make_tensor_value_info("lora_b", TensorProto.FLOAT, [4 * D, 2])]
        inits.append(numpy_helper.from_array(np.array(0.5, np.float32), "scale"))
        nodes += [helper.make_node("Transpose", ["lora_a"], ["at"]), helper.make_node("Transpose", ["lora_b"], ["bt"]),
                  helper.make_node("MatMul", ["xn", "at"], ["la"]), helper.make_node("MatMul", ["la", "bt"], ["lb"]),
                  helper.make_node("Mul", ["lb", "scale"], ["ls"]), helper.make_node("Add", [wide, "ls"], ["wl"])]
        wide = "wl"
    if gate is not None:  # an elementwise operand read whole: a graph input, or a constant varying along the rows
        if row_const:
            inits.append(numpy_helper.from_array(gate, "gate"))
        else:
            inputs.append(helper.make_tensor_value_info("gate", TensorProto.FLOAT, ["batch", 1, 4 * D]))
        nodes.append(helper.make_node("Mul", [wide, "gate"], ["gated"]))
        wide = "gated"
    g_nodes, act = _gelu(wide, "ge.")
    nodes += g_nodes
    if concat:  # FLUX single-stream: the activation concatenated with the attention's output, then projected
        inputs.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "tokens", D]))
        nodes.append(helper.make_node("Concat", ["y", act], ["cat"], axis=2))
        act = "cat"
    nodes += [helper.make_node("MatMul", [act, "w2"], ["down"]), helper.make_node("Add", ["down", "x"], ["out"])]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "tokens", D])]
    if wide_out:
        outputs.append(helper.make_tensor_value_info(act, TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "ff", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _feeds(model, n: int) -> dict:
    r = np.random.default_rng(n)
    out = {}
    for i in model.graph.input:
        shape = [{"batch": 2, "tokens": n}.get(d.dim_param, d.dim_value) for d in i.type.tensor_type.shape.dim]
        out[i.name] = r.standard_normal(shape).astype(np.float32)
    return out


def _run(model, feeds) -> list:
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


def _cut(model, k: int):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return chunk_feedforward(m, k), m


@pytest.mark.parametrize("kw", [{}, {"lora": True}, {"concat": True}, {"lora": True, "concat": True},
                                {"gate": np.ones((1, 1, 4 * D), np.float32) * 0.7, "row_const": True}])
def test_cut_feedforward_gives_the_same_outputs(kw):
    model = _model(**kw)
    n, cut = _cut(model, 3)
    assert n == 1
    onnx.checker.check_model(cut)
    ops = [x.op_type for x in cut.graph.node]
    assert ops.count("Tanh") == 3 and ops.count("MatMul") >= 6  # the part once per slice
    assert sum(x.op_type == "Slice" for x in cut.graph.node) == 3 * (2 if kw.get("concat") else 1)
    for tokens in (10, 9, 2, 1):  # uneven slices, and empty ones (ceil(2 / 3) = 1 row each: the third is empty)
        feeds = _feeds(model, tokens)
        np.testing.assert_allclose(_run(cut, feeds)[0], _run(model, feeds)[0], rtol=1e-5, atol=1e-5)


def test_slices_run_one_after_another():
    """Each slice's wide intermediates come before the next slice's in the graph: ONNX Runtime runs a graph in its
    order, so one slice's wide tensors are alive at a time."""
    _, cut = _cut(_model(concat=True), 4)
    first = {}
    for i, x in enumerate(cut.graph.node):
        if x.op_type == "Tanh":
            first[x.output[0]] = i
    at = sorted(first.values())
    mats = [i for i, x in enumerate(cut.graph.node) if x.op_type == "MatMul" and x.input[1] == "w2"]
    assert len(at) == 4 and len(mats) == 4
    assert all(t < m for t, m in zip(at, mats)) and all(m < t for m, t in zip(mats, at[1:]))


@pytest.mark.parametrize("kw,why", [
    ({"wide_out": True}, "a wide tensor is read outside the part"),
    ({"gate": None}, "a gate computed elsewhere, read whole"),  # gate given below
    ({"gate": np.ones((5, 4 * D), np.float32), "row_const": True}, "a constant that varies along the rows"),
    ({"opset": 14}, "Shape's start/end need opset 15"),
])
def test_what_cannot_be_cut_exactly_is_left_alone(kw, why):
    if "gate" in kw and kw["gate"] is None:
        kw = {"gate": np.zeros(1, np.float32)}  # a graph input [batch, 1, 4D]: broadcast, but not provably so
    model = _model(**kw)
    n, cut = _cut(model, 3)
    assert n == 0, why
    assert cut.SerializeToString() == model.SerializeToString()


def test_one_slice_is_no_cut():
    n, cut = _cut(_model(), 1)
    assert n == 0
