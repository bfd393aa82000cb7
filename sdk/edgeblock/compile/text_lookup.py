"""The exported text encoder's token-embedding tables taken out of the graph (read on the device row by row).

A Gather of a large float32 table by a tokenizer's ids (an nn.Embedding over input ids) is replaced by a graph
input of the same name, and the table written to text_encoder/lookup_NN.npy; the device fills the input with
edge_runtime.text_lookup.lookup (the contract and the numbers are there). Only a Gather whose table no other node
reads, whose indices are a graph input and whose output is not a graph output is taken out; everything else stays.
"""

from __future__ import annotations

import os
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
    readers: dict[str, int] = {}
    for name in _reads(g):
        readers[name] = readers.get(name, 0) + 1
    producer = {o: n for n in g.node for o in n.output}
    lookups: list[dict[str, Any]] = []
    taken = []
    reshapes: dict[str, list[str]] = {}  # Gather output -> the shape inputs of the Reshapes between ids and it
    for n in g.node:
        if n.op_type != "Gather" or n.domain not in ("", "ai.onnx") or len(n.input) != 2:
            continue
        table, idx = n.input
        axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
        t = inits.get(table)
        ids, shapes = _ids_source(idx, producer, inputs)
        if (t is None or axis != 0 or ids is None or readers.get(table) != 1 or n.output[0] in outputs
                or t.data_type != onnx.TensorProto.FLOAT or len(t.dims) != 2):
            continue
        arr = numpy_helper.to_array(t)
        if arr.nbytes < min_bytes:
            continue
        rel = f"{LOOKUP_DIR}/lookup_{len(lookups):02d}.npy"
        write_table(os.path.join(out_dir, *rel.split("/")), arr)
        # the graph input the device fills: the Gather's own output, or, when Reshapes come between the ids and
        # the Gather (CLIP views its ids as (-1, length)), the rows of the ids as the tokenizer gives them,
        # reshaped in the graph as the ids were, with the width appended
        name = n.output[0] if not shapes else f"{n.output[0]}.rows"
        lookups.append({"ids": ids, "table": rel, "output": name, "rows": int(arr.shape[0]),
                        "dim": int(arr.shape[1]), "weight": table})
        reshapes[name] = shapes
        taken.append(n)
    if not lookups:
        return []
    by_out = {n.output[0]: d for d, n in zip(lookups, taken)}
    nodes = []
    for n in g.node:  # each taken Gather replaced in place by the reshapes of its rows (none: just removed)
        d = by_out.get(n.output[0]) if n.op_type == "Gather" else None
        if d is not None:
            nodes += _reshape_rows(d["output"], n.output[0], reshapes[d["output"]], d["dim"])
        else:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    for d, n in zip(lookups, taken):
        g.initializer.remove(inits[n.input[0]])
        ids_type = inputs[d["ids"]].type.tensor_type
        vi = onnx.helper.make_tensor_value_info(d["output"], onnx.TensorProto.FLOAT, None)
        dims = vi.type.tensor_type.shape.dim
        for dim in ids_type.shape.dim:
            dims.add().CopyFrom(dim)
        dims.add().dim_value = d["dim"]
        g.input.append(vi)
    still_read = set(_reads(g))
    for i in list(g.input):
        if i.name in {d["ids"] for d in lookups} and i.name not in still_read and i.name not in outputs:
            g.input.remove(i)  # the ids only the lookup read
    desc["external_data"] = save_onnx(model, path)
    desc["inputs"] = [i.name for i in g.input]
    desc["lookups"] = lookups
    return lookups


def _reads(graph) -> list[str]:
    """Every name the graph's nodes read, their subgraphs' (If/Loop bodies: outer-scope reads) included."""
    out = []
    for n in graph.node:
        out += list(n.input)
        for a in n.attribute:
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                out += _reads(sub)
    return out


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
    rows, the width appended to its shape; an Identity when there is none."""
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
