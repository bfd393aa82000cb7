"""The exported text encoder cut into consecutive parts ("layer groups") at the ONNX level, for every family:
text_encoder/part_NN.onnx, cut in topological order where few tensors cross (the hidden state, the mask...) and
balanced by initializer bytes; each crossing tensor is an output of one part and an input of a later one.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_runtime import graph_names as gn

# a part's cut may move off its balanced place by a quarter of a part's bytes to save one crossing tensor
IMBALANCE_COST = 4.0
PARTS_REL_BOUND = 1e-5  # chained parts against the whole encoder (both ONNX Runtime, fp32)
MAX_AUTO_PARTS = 64


_GRAPH_ATTRS = (5, 10)  # onnx.AttributeProto.GRAPH, GRAPHS: nodes with subgraphs are never treated as constants


@dataclass
class _Analysis:
    """The whole graph as the cutter sees it: compute nodes in topological order, with their reads."""

    nodes: list  # onnx.NodeProto, constant nodes excluded (copied into every part that reads them)
    reads: list[list[str]]  # per node: the names it reads (subgraphs' outer-scope reads included)
    consts: dict[str, Any]  # output name of a constant node (Constant, or reading only initializers and
    # constants: the exporter's Identity of a shared weight) -> that node
    const_reads: dict[str, list[str]]  # constant output name -> the initializers and constants its node reads
    inits: dict[str, Any]  # initializer name -> TensorProto
    weight: np.ndarray  # per node: bytes of the initializers it is the first to read
    crossing: np.ndarray  # per cut after node i (0 .. n-2): tensors crossing it
    outputs: list[str]  # the graph's outputs

    @property
    def total(self) -> int:
        return int(self.weight.sum())


def tensor_bytes(t) -> int:
    """Bytes of one initializer (raw or typed data, or its external-data length)."""
    import onnx

    if t.HasField("raw_data"):
        return len(t.raw_data)
    n = int(np.prod(t.dims)) if len(t.dims) else 1
    return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def file_bytes(path: str) -> int:
    """An ONNX file's bytes with its external data file (`<file>.data`)."""
    data = path + ".data"
    return os.path.getsize(path) + (os.path.getsize(data) if os.path.exists(data) else 0)


def _outer_reads(graph) -> set[str]:
    """Names a subgraph reads from its enclosing scopes (what it reads minus what it defines)."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    read: set[str] = set()
    for n in graph.node:
        read.update(x for x in node_reads(n) if x)
        defined.update(n.output)
    read.update(o.name for o in graph.output)
    return read - defined


def node_reads(node) -> list[str]:
    import onnx

    reads = [x for x in node.input if x]
    for a in node.attribute:
        subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for g in subs:
            reads.extend(sorted(_outer_reads(g)))
    return reads


def analyse(model) -> _Analysis:
    """Order the graph's compute nodes topologically and measure every cut between them."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consts: dict[str, Any] = {}
    const_reads: dict[str, list[str]] = {}
    pending = []
    for n in g.node:  # constant nodes first (the exporter's order is topological)
        r = node_reads(n)
        if all(x in inits or x in consts for x in r) and not any(a.type in _GRAPH_ATTRS for a in n.attribute):
            for o in n.output:
                consts[o], const_reads[o] = n, r
        else:
            pending.append((n, r))
    available = {i.name for i in g.input} | set(inits) | set(consts)
    nodes, reads = [], []
    while pending:  # stable topological order (the exporter's order when it already is one)
        rest = []
        for n, r in pending:
            if all(x in available for x in r):
                nodes.append(n)
                reads.append(r)
                available.update(o for o in n.output if o)
            else:
                rest.append((n, r))
        if len(rest) == len(pending):
            missing = sorted({x for _, r in rest for x in r if x not in available})[:5]
            raise ValueError(f"text encoder graph is not a DAG over its inputs: nodes read undefined {missing}")
        pending = rest
    n = len(nodes)
    weight = np.zeros(n, np.int64)
    owner: set[str] = set()
    for i, r in enumerate(reads):
        for x in _closure(r, inits, const_reads)[1]:
            if x not in owner:
                owner.add(x)
                weight[i] += tensor_bytes(inits[x])
    producer = {o: i for i, nd in enumerate(nodes) for o in nd.output if o}
    last = dict.fromkeys(producer, -1)
    for i, r in enumerate(reads):
        for x in r:
            if x in last:
                last[x] = max(last[x], i)
    outputs = [o.name for o in g.output]
    for o in outputs:
        if o in last:
            last[o] = n  # a final output crosses every cut after it is made
    diff = np.zeros(n + 1, np.int64)
    for x, p in producer.items():
        q = last[x]
        if q > p:  # crosses the cuts after nodes p .. q-1
            diff[p] += 1
            diff[q] -= 1
    crossing = np.cumsum(diff)[: max(n - 1, 0)]
    return _Analysis(nodes, reads, consts, const_reads, inits, weight, crossing, outputs)


def _closure(reads, inits: dict, const_reads: dict) -> tuple[list[str], list[str]]:
    """The constant outputs (dependencies first) and the initializers that `reads` need, directly or through
    constant nodes."""
    outs: list[str] = []
    init_names: list[str] = []
    seen: set[str] = set()

    def visit(x: str) -> None:
        if x in seen:
            return
        seen.add(x)
        if x in inits:
            init_names.append(x)
        elif x in const_reads:
            for y in const_reads[x]:
                visit(y)
            outs.append(x)

    for x in reads:
        visit(x)
    return outs, init_names


def plan_cuts(a: _Analysis, k: int) -> list[int]:
    """Boundaries [0, c_1, ..., n] of k parts: cut j near bytes j/k of the total at the fewest crossing tensors
    (score = crossing + IMBALANCE_COST * |offset| / part bytes). ValueError when k parts cannot all hold weights."""
    n = len(a.nodes)
    prefix = np.cumsum(a.weight)  # bytes up to and including node i
    total = float(prefix[-1]) if n else 0.0
    if k <= 1:
        return [0, n]
    if total <= 0:
        raise ValueError("text encoder has no initializers to balance: keep it whole (--text-parts 1)")
    share = total / k
    weighted_after = np.count_nonzero(a.weight > 0) - np.cumsum(a.weight > 0)  # weighted nodes after node i
    bounds = [0]
    for j in range(1, k):
        lo = bounds[-1]  # cut after node i: i >= lo, the part so far holds weights, the rest can hold k - j parts
        i = np.arange(lo, n - 1)
        before = prefix[lo - 1] if lo > 0 else 0
        ok = (prefix[i] > before) & (weighted_after[i] >= k - j)
        i = i[ok]
        if not len(i):
            raise ValueError(f"the text encoder cannot be cut into {k} parts that each hold weights; use fewer "
                             f"(--text-parts {j})")
        score = a.crossing[i] + IMBALANCE_COST * np.abs(prefix[i] - j * share) / share
        bounds.append(int(i[int(np.argmin(score))]) + 1)
    bounds.append(n)
    return bounds


def part_sizes(a: _Analysis, bounds: list[int]) -> list[int]:
    """Initializer bytes of each part (shared initializers counted in every part that reads them)."""
    out = []
    for s, e in zip(bounds, bounds[1:]):
        names = _closure([x for r in a.reads[s:e] for x in r], a.inits, a.const_reads)[1]
        out.append(sum(tensor_bytes(a.inits[x]) for x in names))
    return out


def choose_bounds(a: _Analysis, parts: int, max_bytes: int | None) -> list[int]:
    """parts >= 1: that many parts. parts == 0 (auto): the fewest parts none of which is above max_bytes (one part
    when the encoder is that small or max_bytes is None); where no count gets there, the count with the smallest
    largest part."""
    if parts < 0:
        raise ValueError(f"--text-parts must be >= 0 (0: auto, 1: whole), got {parts}")
    if parts:
        return plan_cuts(a, parts)
    if max_bytes is None or a.total <= max_bytes:
        return [0, len(a.nodes)]
    best: tuple[int, list[int]] | None = None
    for k in range(max(2, math.ceil(a.total / max_bytes)), MAX_AUTO_PARTS + 1):
        try:
            b = plan_cuts(a, k)
        except ValueError:
            break
        largest = max(part_sizes(a, b))
        if best is None or largest < best[0]:
            best = (largest, b)
        if largest <= max_bytes:
            break
    return best[1] if best is not None else [0, len(a.nodes)]


def _value_infos(model) -> dict[str, Any]:
    """Type (and shape, where known) of every tensor, by shape inference on a copy of the graph whose large
    initializers keep their dims and type but not their data (all inference reads of them; under 2 GiB)."""
    import onnx

    light = onnx.ModelProto()
    light.CopyFrom(model)
    for t in light.graph.initializer:
        if t.HasField("raw_data") and len(t.raw_data) > 4096:
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL
            del t.external_data[:]
            e = t.external_data.add()
            e.key, e.value = "location", "unused"
    g = onnx.shape_inference.infer_shapes(light).graph
    del light
    return {v.name: v for v in (*g.input, *g.value_info, *g.output)}


def build_part(model, a: _Analysis, start: int, end: int, infos: dict[str, Any], index: int):
    """The ModelProto of nodes start..end-1 (+ the Constants and initializers they read) and its interface."""
    import onnx

    nodes = a.nodes[start:end]
    produced = {o for nd in nodes for o in nd.output if o}
    read = list(dict.fromkeys(x for r in a.reads[start:end] for x in r))
    later = {x for r in a.reads[end:] for x in r} | set(a.outputs)
    const_outs, init_names = _closure(read, a.inits, a.const_reads)
    consts = list({id(a.consts[x]): a.consts[x] for x in const_outs}.values())  # a node once, in dependency order
    inits = [a.inits[x] for x in init_names]
    inputs = [x for x in read if x not in produced and x not in a.inits and x not in a.consts]
    outputs = [o for nd in nodes for o in nd.output if o and o in later]
    missing = [x for x in (*inputs, *outputs) if x not in infos]
    if missing:
        raise ValueError(f"text encoder part {index}: no type for tensors {missing[:5]} (shape inference found none)")
    graph = onnx.helper.make_graph([*consts, *nodes], f"text_encoder_part_{index:02d}",
                                   [infos[x] for x in inputs], [infos[x] for x in outputs], initializer=inits)
    part = onnx.helper.make_model(graph, opset_imports=list(model.opset_import), producer_name="edgeblock")
    part.ir_version = model.ir_version
    part.functions.extend(model.functions)
    return part, inputs, outputs


def split_text_encoder(out_dir: str, whole_rel: str, parts: int, max_bytes: int | None) -> list[dict[str, Any]]:
    """Cut out_dir/whole_rel into text_encoder/part_NN.onnx under out_dir; returns the parts' descriptions
    [{"path", "inputs", "outputs", "bytes", "external_data"}] ([] when it stays whole). The whole file is left
    in place (the caller checks the parts against it, then removes it)."""
    import onnx

    from .onnx_io import save_onnx

    model = onnx.load(os.path.join(out_dir, *whole_rel.split("/")))  # with its external data
    a = analyse(model)
    bounds = choose_bounds(a, parts, max_bytes)
    if len(bounds) <= 2:
        return []
    infos = _value_infos(model)
    # the final outputs keep the whole graph's declared types
    infos.update({o.name: o for o in model.graph.output})
    infos.update({i.name: i for i in model.graph.input})
    descs = []
    for k, (s, e) in enumerate(zip(bounds, bounds[1:])):
        part, inputs, outputs = build_part(model, a, s, e, infos, k)
        rel = gn.text_part_file(k)
        path = os.path.join(out_dir, *rel.split("/"))
        external = save_onnx(part, path)
        del part
        descs.append({"path": rel, "inputs": inputs, "outputs": outputs, "bytes": file_bytes(path),
                      "external_data": external})
    return descs


def make_parts(out_dir: str, desc: dict[str, Any], parts: int, max_bytes: int | None, check: bool = True,
               prompts: list[str] | None = None) -> dict[str, Any] | None:
    """Cut the exported text encoder described by `desc` (graphs["text_encoder"]) into parts in place: desc gets
    "parts" and loses the whole file ("path", "external_data"), which is deleted. With check, the chained parts
    are compared with the whole encoder first (encoders.check_text_parts: RuntimeError past PARTS_REL_BOUND).
    Returns that
    comparison (or {"parts": n} unchecked); None when the encoder stays whole."""
    from .encoders import VERIFY_PROMPTS, check_text_parts

    whole_rel = desc["path"]
    descs = split_text_encoder(out_dir, whole_rel, parts, max_bytes)
    if not descs:
        return None
    desc["whole_bytes"] = file_bytes(os.path.join(out_dir, *whole_rel.split("/")))
    desc["parts"] = descs
    if check:
        result = check_text_parts(out_dir, desc, prompts or VERIFY_PROMPTS, PARTS_REL_BOUND)
    else:
        result = {"parts": len(descs)}
    whole = os.path.join(out_dir, *whole_rel.split("/"))
    for p in (whole, whole + ".data"):
        if os.path.exists(p):
            os.remove(p)
    del desc["path"]
    desc.pop("external_data", None)
    return result
