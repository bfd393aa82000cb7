"""compile/attention_chunks.py: softmax attentions cut into query slices, on hand-built graphs (the exported
models' graphs: tests/host/test_onnx_export.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from edgeblock.compile.attention_chunks import MAX_CHUNKS, QUERY_ROWS, chunk_attention, query_chunks
from onnx import TensorProto, helper, numpy_helper


def _attention(mask: np.ndarray | None = None, reader: bool = False) -> onnx.ModelProto:
    """q (B, H, N, d), kt (B, H, d, M), v (B, H, M, d) -> softmax(q kt * 0.5 [+ mask]) v, N and M dynamic."""
    f = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("q", f, ["b", 2, "n", 4]),
              helper.make_tensor_value_info("kt", f, ["b", 2, 4, "m"]),
              helper.make_tensor_value_info("v", f, ["b", 2, "m", 4])]
    inits = [numpy_helper.from_array(np.array(0.5, np.float32), "scale")]
    nodes = [helper.make_node("MatMul", ["q", "kt"], ["s"]), helper.make_node("Mul", ["s", "scale"], ["s2"])]
    last = "s2"
    if mask is not None:
        inits.append(numpy_helper.from_array(mask, "mask"))
        nodes.append(helper.make_node("Add", ["mask", "s2"], ["s3"]))
        last = "s3"
    nodes += [helper.make_node("Softmax", [last], ["p"], axis=-1), helper.make_node("MatMul", ["p", "v"], ["o"])]
    outputs = [helper.make_tensor_value_info("o", f, ["b", 2, "n", 4])]
    if reader:  # the scores read elsewhere too: not cut
        nodes.append(helper.make_node("ReduceSum", ["s"], ["s_sum"], keepdims=0))
        outputs.append(helper.make_tensor_value_info("s_sum", f, []))
    g = helper.make_graph(nodes, "attn", inputs, outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _run(model, n: int, m: int = 7, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    feeds = {"q": rng.standard_normal((2, 2, n, 4)).astype(np.float32),
             "kt": rng.standard_normal((2, 2, 4, m)).astype(np.float32),
             "v": rng.standard_normal((2, 2, m, 4)).astype(np.float32)}
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(["o"], feeds)[0]


@pytest.mark.parametrize("mask", [None, np.linspace(-1, 1, 7, dtype=np.float32).reshape(1, 1, 1, 7)])
def test_sliced_attention_equals_the_whole_at_any_query_count(mask):
    whole = _attention(mask)
    cut = _attention(mask)
    assert chunk_attention(cut, 4) == 1
    ops = [n.op_type for n in cut.graph.node]
    assert ops.count("Softmax") == 4 and ops.count("Slice") == 4 and ops.count("Concat") == 1
    onnx.checker.check_model(cut)
    for n in (1, 3, 4, 5, 13, 64):  # fewer queries than slices (empty slices), uneven last slice, many
        np.testing.assert_allclose(_run(cut, n), _run(whole, n), rtol=1e-6, atol=1e-6)


def test_what_cannot_be_cut_exactly_is_left_alone():
    varying = np.zeros((1, 1, 5, 7), np.float32)  # a mask that differs per query: slicing would misplace it
    for model in (_attention(varying), _attention(reader=True)):
        before = model.SerializeToString()
        assert chunk_attention(model, 4) == 0
        assert model.SerializeToString() == before
    model = _attention()
    assert chunk_attention(model, 1) == 0  # one slice: nothing to do
    model.opset_import[0].version = 14  # Shape(start, end) needs opset 15
    assert chunk_attention(model, 4) == 0


def test_slice_count_rule():
    assert query_chunks(1) == 1 and query_chunks(QUERY_ROWS) == 1
    assert query_chunks(QUERY_ROWS + 1) == 2
    assert query_chunks(1056) == -(-1056 // QUERY_ROWS)
    assert query_chunks(128 * 128) == min(MAX_CHUNKS, -(-128 * 128 // QUERY_ROWS))


def test_a_saved_graph_keeps_its_weights_layout(tmp_path):
    from edgeblock.compile.attention_chunks import chunk_file
    from edgeblock.compile.onnx_io import save_onnx

    mask = np.linspace(-1, 1, 400, dtype=np.float32).reshape(1, 1, 1, 400)  # 1.6 kB: external when asked
    for external in (True, False):
        path = str(tmp_path / f"attn_{external}.onnx")
        assert save_onnx(_attention(mask), path, -1 if external else 1 << 30) == external
        assert chunk_file(path, 3, external) == (1, 0)
        assert (tmp_path / f"attn_{external}.onnx.data").exists() == external
        np.testing.assert_allclose(_run(onnx.load(path), 9, m=400), _run(_attention(mask), 9, m=400), rtol=1e-6,
                                   atol=1e-6)
