"""Softmax attentions of an exported inference graph computed a slice of queries at a time.

The exported attention, MatMul(Q, K^T) -> [scale / mask] -> Softmax -> MatMul(., V), materialises the whole
queries x keys matrix (and its softmax) per head: at 1056 tokens and 6 heads that is 27 MB per guidance row, the
largest transient of a small model's generation step on the CPU. Cutting Q into `chunks` slices along its token
axis (each ceil(N / chunks) rows; the axis stays dynamic) and concatenating the outputs keeps one slice's matrix
at a time. The result is the same to float rounding: each query's row of the softmax only reads its own scores.

Only what can be cut exactly is cut: the ops between the first MatMul and the Softmax must be elementwise with a
constant other operand that does not vary along the query axis (rank < 2, or a 1 at axis -2), and each
intermediate must have no other reader. TensorRT's parser reads the result (Shape, Slice, Concat, standard ops).
"""

from __future__ import annotations

from collections import Counter

ELEMENTWISE = ("Mul", "Div", "Add", "Sub")
QUERY_ROWS = 256  # queries per slice at the generation shape (measured: FLUX blocks at 1056 tokens, docs/plan.md)
MAX_CHUNKS = 64


def query_chunks(queries: int) -> int:
    """How many slices compile cuts an attention over `queries` queries at the generation shape into (1: none).
    The planner predicts with the same rule."""
    return max(1, min(MAX_CHUNKS, -(-int(queries) // QUERY_ROWS)))


def chunk_file(path: str, chunks: int, external: bool) -> tuple[int, int]:
    """chunk_attention, then feedforward_chunks.chunk_feedforward, on a saved graph whose weights are in
    `<file>.data` (external) or inline; returns (attentions cut, feed-forward parts cut). The file is rewritten,
    its weights where they were, only when something was cut."""
    import onnx

    from .feedforward_chunks import chunk_feedforward
    from .onnx_io import EXTERNAL_DATA_THRESHOLD, save_onnx

    if chunks < 2:
        return 0, 0
    model = onnx.load(path)
    cut = chunk_attention(model, chunks), chunk_feedforward(model, chunks)
    if any(cut):
        save_onnx(model, path, -1 if external else EXTERNAL_DATA_THRESHOLD)
    return cut


def chunk_attention(model, chunks: int) -> int:
    """Rewrite every exact-cuttable softmax attention of `model` (in place) into `chunks` query slices. Returns how
    many attentions were rewritten (0: the model is untouched)."""
    from onnx import helper

    from .text_parts import node_reads

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if chunks < 2 or opset < 15:  # Shape's start/end attributes (the query count) are opset 15
        return 0
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    readers = Counter(x for n in g.node for x in node_reads(n))  # subgraphs' outer-scope reads included
    outputs = {o.name for o in g.output}
    consts = const_shapes(g)

    def private(name: str) -> bool:  # read by exactly one node, not a graph output
        return readers[name] == 1 and name not in outputs

    consumer = {x: n for n in g.node for x in n.input}  # the reader of a private name
    found = []  # (first MatMul, elementwise chain, Softmax, second MatMul)
    for sm in g.node:
        if sm.op_type != "Softmax" or sm.domain not in ("", "ai.onnx"):
            continue
        if next((a.i for a in sm.attribute if a.name == "axis"), -1) != -1:
            continue
        mm2 = consumer.get(sm.output[0])
        if not private(sm.output[0]) or mm2 is None or mm2.op_type != "MatMul" or mm2.input[0] != sm.output[0]:
            continue
        chain, cur = [], sm.input[0]
        while True:
            p = producer.get(cur)
            if p is None or not private(cur) or p.domain not in ("", "ai.onnx"):
                break
            if p.op_type == "MatMul":
                chain.reverse()
                found.append((p, chain, sm, mm2))
                break
            if p.op_type not in ELEMENTWISE or len(p.input) != 2:
                break
            a, b = p.input
            if (a in consts) == (b in consts):
                break  # the scores and a constant, or nothing this rewrite can cut
            data, other = (a, b) if b in consts else (b, a)
            shape = consts[other]
            if len(shape) >= 2 and shape[-2] != 1:
                break  # varies along the queries
            chain.append(p)
            cur = data
    if not found:
        return 0

    replace, drop = {}, set()
    for mm1, chain, sm, mm2 in found:
        out = mm2.output[0]
        q, kt, v = mm1.input[0], mm1.input[1], mm2.input[1]
        p = f"{out}.chunks"
        nodes = slice_bounds(p, q, chunks)
        parts = []
        for i in range(chunks):
            c = f"{p}{i}"
            nodes.append(helper.make_node("Slice", [q, f"{p}.at{i}", f"{p}.at{i + 1}", f"{p}.axis"], [f"{c}.q"]))
            nodes.append(helper.make_node("MatMul", [f"{c}.q", kt], [f"{c}.s0"]))
            cur = f"{c}.s0"
            for j, e in enumerate(chain):
                nxt = f"{c}.s{j + 1}"
                prev = mm1.output[0] if j == 0 else chain[j - 1].output[0]
                ins = [cur if x == prev else x for x in e.input]
                nodes.append(helper.make_node(e.op_type, ins, [nxt]))
                cur = nxt
            nodes.append(helper.make_node("Softmax", [cur], [f"{c}.p"], axis=-1))
            nodes.append(helper.make_node("MatMul", [f"{c}.p", v], [f"{c}.o"]))
            parts.append(f"{c}.o")
        nodes.append(helper.make_node("Concat", parts, [out], axis=-2))
        replace[id(mm2)] = nodes
        drop.update(id(x) for x in (mm1, *chain, sm))
    new = [m for n in g.node if id(n) not in drop for m in replace.get(id(n), [n])]
    del g.node[:]
    g.node.extend(new)
    return len(found)




def slice_bounds(p: str, rows_of: str, chunks: int) -> list:
    """Nodes that compute the bounds of `chunks` slices along axis -2 of tensor `rows_of` (ceil(N / chunks) rows
    each; the last ones may be short or empty): `<p>.at0` ... `<p>.at<chunks>` (int64 [1]) and `<p>.axis` ([-2]),
    for Slice(x, <p>.at<i>, <p>.at<i+1>, <p>.axis). The row count is read at run time (Shape, opset 15)."""
    from onnx import TensorProto, helper

    def const(name: str, values: list[int]):
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64,
                                                                                  [len(values)], values))

    nodes = [helper.make_node("Shape", [rows_of], [f"{p}.n"], start=-2, end=-1), const(f"{p}.k1", [chunks - 1]),
             const(f"{p}.k", [chunks]), const(f"{p}.axis", [-2]),
             helper.make_node("Add", [f"{p}.n", f"{p}.k1"], [f"{p}.n_up"]),
             helper.make_node("Div", [f"{p}.n_up", f"{p}.k"], [f"{p}.rows"])]
    for i in range(chunks + 1):
        nodes += [const(f"{p}.i{i}", [i]), helper.make_node("Mul", [f"{p}.rows", f"{p}.i{i}"], [f"{p}.at{i}"])]
    return nodes


def const_shapes(g) -> dict[str, list[int]]:
    """The shapes of a graph's constants: its initializers and its Constant nodes' values."""
    from onnx import numpy_helper

    shapes = {t.name: list(t.dims) for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            value = next((a for a in n.attribute if a.name == "value"), None)
            if value is not None:
                shapes[n.output[0]] = list(numpy_helper.to_array(value.t).shape)
    return shapes
