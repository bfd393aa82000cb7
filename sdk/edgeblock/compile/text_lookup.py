"""The exported text encoder's token-embedding tables taken out of the graph (read on the device row by row).

A Gather of a large float32 table by a tokenizer's ids (an nn.Embedding over input ids) is replaced by a graph
input of the same name, and the table written to text_encoder/lookup_NN.npy; the device fills the input with
edge_runtime.text_lookup.lookup (the contract and the numbers are there). Only a Gather whose table no other node
reads, whose indices are a graph input and whose output is not a graph output is taken out; everything else stays.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

from edge_runtime.text_lookup import write_table

MIN_TABLE_BYTES = 1 << 20  # smaller tables (position and token-type embeddings) stay in the graph
LOOKUP_DIR = "text_encoder"


def externalize_lookups(out_dir: str, desc: dict[str, Any], min_bytes: int = MIN_TABLE_BYTES) -> list[dict[str, Any]]:
    """Take the token-embedding Gathers out of the whole text encoder `desc` describes (graphs["text_encoder"],
    before any cut into parts), in place: the graph is saved again, desc gets "lookups" and its "inputs" and
    "external_data" follow the new graph. Returns the lookups (empty: the graph is left untouched)."""
    import onnx
    from onnx import numpy_helper

    from .onnx_io import save_onnx

    path = os.path.join(out_dir, *desc["path"].split("/"))
    model = onnx.load(path)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    inputs = {i.name: i for i in g.input}
    outputs = {o.name for o in g.output}
    readers = Counter(_reads(g))
    producer = {o: n for n in g.node for o in n.output}
    found = []  # (lookup, its Gather, the shape inputs of the Reshapes between the ids and it)
    for n in g.node:
        if n.op_type != "Gather" or n.domain not in ("", "ai.onnx") or len(n.input) != 2:
            continue
        table, idx = n.input
        axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
        t = inits.get(table)
        ids, shapes = _ids_source(idx, producer, inputs)
        if (t is None or axis != 0 or ids is None or readers[table] != 1 or n.output[0] in outputs
                or t.data_type != onnx.TensorProto.FLOAT or len(t.dims) != 2):
            continue
        arr = numpy_helper.to_array(t)
        if arr.nbytes < min_bytes:
            continue
        rel = f"{LOOKUP_DIR}/lookup_{len(found):02d}.npy"
        write_table(os.path.join(out_dir, *rel.split("/")), arr)
        # the graph input the device fills: the Gather's own output, or, when Reshapes come between the ids and
        # the Gather (CLIP views its ids as (-1, length)), the rows of the ids as the tokenizer gives them,
        # reshaped in the graph as the ids were, with the width appended
        name = n.output[0] if not shapes else f"{n.output[0]}.rows"
        found.append(({"ids": ids, "table": rel, "output": name, "rows": int(arr.shape[0]), "dim": int(arr.shape[1]),
                       "weight": table}, n, shapes))
    if not found:
        return []
    replace = {n.output[0]: _reshape_rows(d["output"], n.output[0], shapes, d["dim"]) for d, n, shapes in found}
    nodes = [m for n in g.node for m in (replace[n.output[0]] if n.output and n.output[0] in replace else [n])]
    del g.node[:]
    g.node.extend(nodes)  # each taken Gather replaced in place by the reshapes of its rows (none: just removed)
    for d, _, _ in found:
        g.initializer.remove(inits[d["weight"]])
        vi = onnx.helper.make_tensor_value_info(d["output"], onnx.TensorProto.FLOAT, None)
        dims = vi.type.tensor_type.shape.dim
        for dim in inputs[d["ids"]].type.tensor_type.shape.dim:
            dims.add().CopyFrom(dim)
        dims.add().dim_value = d["dim"]
        g.input.append(vi)
    lookups = [d for d, _, _ in found]
    unread = {d["ids"] for d in lookups} - set(_reads(g)) - outputs
    for i in [i for i in g.input if i.name in unread]:
        g.input.remove(i)  # the ids only the lookups read
    desc["external_data"] = save_onnx(model, path)
    desc["inputs"] = [i.name for i in g.input]
    desc["lookups"] = lookups
    return lookups


def _reads(graph) -> list[str]:
    """Every name the graph's nodes read, their subgraphs' outer-scope reads included."""
    from .text_parts import node_reads

    return [x for n in graph.node for x in node_reads(n)]


_TRANSPARENT = ("Cast", "Identity")  # ops between the ids and a Gather that leave the rows as they are


def _ids_source(name: str, producer: dict, inputs: dict) -> tuple[str | None, list[str]]:
    """The graph input a Gather's indices come from through Cast/Identity/Reshape nodes, and the Reshapes' shape
    inputs in the order they apply; (None, []) when the indices come from anything else."""
    shapes: list[str] = []
    while name not in inputs:
        n = producer.get(name)
        if n is None or n.domain not in ("", "ai.onnx"):
            return None, []
        if n.op_type == "Reshape":
            shapes.insert(0, n.input[1])
        elif n.op_type not in _TRANSPARENT:
            return None, []
        name = n.input[0]
    return name, shapes


def _reshape_rows(rows: str, out: str, shapes: list[str], dim: int) -> list:
    """Nodes that give `out` from the looked-up `rows` (ids' shape + (dim,)): each Reshape of the ids applied to the
    rows, the width appended to its shape; none when the ids were not reshaped (`rows` is `out` itself)."""
    from onnx import TensorProto, helper

    if not shapes:
        return []
    nodes, cur = [], rows
    width = f"{out}.width"
    nodes.append(helper.make_node("Constant", [], [width], value=helper.make_tensor(width, TensorProto.INT64, [1],
                                                                                      [dim])))
    for k, shape in enumerate(shapes):
        full, nxt = f"{out}.shape{k}", (out if k == len(shapes) - 1 else f"{out}.reshaped{k}")
        nodes.append(helper.make_node("Concat", [shape, width], [full], axis=0))
        nodes.append(helper.make_node("Reshape", [cur, full], [nxt]))
        cur = nxt
    return nodes
