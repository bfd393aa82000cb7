"""Feed-forward parts of an exported inference graph computed a slice of tokens at a time.

A transformer block's feed-forward widens each token 4x (an up-projection, then an elementwise activation that
the exporter writes as several ops, GELU's tanh form as nine), then narrows it again. Every wide intermediate is
tokens x 4d floats per guidance row: once the attention is cut into query slices (attention_chunks.py), these are
the largest transients of a block's run (2 x 1056 tokens x 3072 x 4 B = 26 MB each at the 120M bench scale, three
alive at once). Everything between the up-projection and the projections that narrow it again reads each token's
row alone, so the rows can be cut into `chunks` slices along the token axis (axis -2, dynamic), the part run per
slice, and the narrow results concatenated: the same result to float rounding, with one slice's wide tensors
alive at a time.

What is cut, from an up-projection MatMul(X, W) with W a constant [d, D], D >= WIDEN x d: its output and what
reads it through row-wise ops (elementwise ops whose other operand is a row-wise result, or a constant that does
not vary along axis -2; MatMul on the left with any right operand; Concat along the last axis, whose other
inputs are then sliced too: Concat needs their rows equal), up to the MatMuls that leave it narrow. A row-wise
operand computed from X elsewhere (a LoRA branch: X @ A^T @ B^T x scale) is computed per slice as well. The cut is
made only when every tensor read outside the region is narrow; otherwise the graph is left as it was.
TensorRT's parser reads the result (Shape, Slice, Concat and the ops that were there).
"""

from __future__ import annotations

from collections import defaultdict

WIDEN = 2  # an up-projection's output is at least this many times wider than its input
UNARY = frozenset({"Cast", "Tanh", "Erf", "Sigmoid", "Relu", "Neg", "Sqrt", "Exp", "Log", "Abs", "Identity",
                   "Softplus", "Gelu", "Reciprocal"})
BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"})
DERIVE_DEPTH = 8  # how far back a row-wise operand is traced to the sliced rows


def chunk_feedforward(model, chunks: int) -> int:
    """Rewrite every feed-forward part of `model` (in place) that can be cut exactly into `chunks` slices of
    tokens. Returns how many were rewritten (0: the model is untouched)."""
    from onnx import helper

    from .attention_chunks import const_shapes, slice_bounds
    from .text_parts import node_reads

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if chunks < 2 or opset < 15:  # Shape's start/end attributes (the row count) are opset 15
        return 0
    g = model.graph
    consts = const_shapes(g)
    if not any(_widening(n, consts) for n in g.node):
        return 0  # no up-projection: the shape inference below is not needed
    ranks = _ranks(model)
    producer = {o: n for n in g.node for o in n.output}
    readers = defaultdict(list)
    for n in g.node:
        for x in dict.fromkeys(node_reads(n)):
            readers[x].append(n)
    outputs = {o.name for o in g.output}
    order = {id(n): i for i, n in enumerate(g.node)}
    taken: set[int] = set()
    regions = []
    for n in g.node:
        if id(n) not in taken and _widening(n, consts):
            r = _Region(n, consts, ranks, producer, readers, outputs, taken, order).grow()
            if r is not None:
                regions.append(r)
                taken.update(r.ids)
    if not regions:
        return 0
    replace, drop = {}, set()
    for r in regions:
        x = r.seed.input[0]
        p = f"{r.seed.output[0]}.rows"
        nodes = slice_bounds(p, x, chunks)
        parts = defaultdict(list)
        for i in range(chunks):
            rename = {}
            for t in r.sliced:
                rename[t] = f"{t}.{p}{i}"
                nodes.append(helper.make_node("Slice", [t, f"{p}.at{i}", f"{p}.at{i + 1}", f"{p}.axis"], [rename[t]]))
            for node in r.nodes:  # graph order
                for o in node.output:
                    rename[o] = f"{o}.{p}{i}"
                c = helper.make_node(node.op_type, [rename.get(t, t) for t in node.input],
                                     [rename[o] for o in node.output], domain=node.domain)
                c.attribute.extend(node.attribute)
                nodes.append(c)
            for o in r.outputs:
                parts[o].append(rename[o])
        nodes += [helper.make_node("Concat", parts[o], [o], axis=-2) for o in r.outputs]
        replace[id(r.nodes[-1])] = nodes
        drop.update(r.ids)
    new = [m for n in g.node for m in (replace.get(id(n), []) if id(n) in drop else [n])]
    del g.node[:]
    g.node.extend(_toposort(new, {i.name for i in g.input} | {t.name for t in g.initializer}))
    return len(regions)


class _Region:
    """The row-wise part grown from one up-projection."""

    def __init__(self, seed, consts, ranks, producer, readers, outputs, taken, order):
        self.seed, self.consts, self.ranks, self.order = seed, consts, ranks, order
        self.producer, self.readers, self.graph_outputs, self.taken = producer, readers, outputs, taken
        x = seed.input[0]
        self.wide = {x: False, seed.output[0]: True}  # row-wise tensors -> wide?
        self.sliced = [x]  # tensors cut into slices at the region's input
        self.members = {id(seed): seed}

    @property
    def ids(self) -> set[int]:
        return set(self.members)

    def grow(self):
        if self.ranks.get(self.seed.input[0], 0) < 2:
            return None
        queue = [self.seed.output[0]]
        while queue:
            t = queue.pop()
            if not self.wide.get(t):
                continue  # the region ends where the rows are narrow again
            for r in self.readers.get(t, []):
                if id(r) not in self.members and id(r) not in self.taken and self._try(r):
                    queue.extend(r.output)
        self.nodes = sorted(self.members.values(), key=lambda n: self.order[id(n)])
        made = {o for n in self.nodes for o in n.output}
        if any(n.op_type == "MatMul" and n.input[1] in self.wide for n in self.nodes) or made & set(self.sliced):
            return None  # a right operand or a sliced input became one of the rows after it was read whole
        self.outputs = [o for n in self.nodes for o in n.output
                        if o in self.graph_outputs or any(id(r) not in self.members for r in self.readers.get(o, []))]
        if not self.outputs or any(self.wide[o] for o in self.outputs):
            return None  # a wide tensor is read outside: cutting would not shrink anything
        return self

    def _try(self, node) -> bool:
        """Add a reader of a row-wise tensor if it is row-wise itself; left as it was otherwise."""
        return self._undo_on_false(self._add, node)

    def _undo_on_false(self, f, *args) -> bool:
        saved = dict(self.members), dict(self.wide), list(self.sliced)
        if f(*args):
            return True
        self.members, self.wide, self.sliced = saved
        return False

    def _add(self, node) -> bool:
        if not _plain(node):
            return False
        op = node.op_type
        if op in UNARY and len(node.input) == 1:
            return self._join(node, self.wide[node.input[0]])
        if op in BINARY and len(node.input) == 2:
            return all(self._operand(x) for x in node.input) and self._join(node, self._any_wide(node))
        if op == "MatMul":
            a, b = node.input
            if a not in self.wide or b in self.wide:
                return False
            return self._join(node, self._widens(b, self.wide[a]))
        if op == "Concat":
            rank = self.ranks.get(node.output[0], 0)
            axis = next((a.i for a in node.attribute if a.name == "axis"), None)
            if rank < 2 or axis is None or axis % rank != rank - 1:
                return False
            extra = [x for x in dict.fromkeys(node.input) if not self._derive(x)]
            if any(x in self.consts or self.ranks.get(x, 0) != rank for x in extra):
                return False
            for x in extra:  # Concat needs the rows of every input equal: these are cut like the region's input
                self.sliced.append(x)
                self.wide[x] = False
            return self._join(node, self._any_wide(node))
        return False

    def _operand(self, x: str) -> bool:
        """An elementwise operand: row-wise (traced back if need be), or a constant that is the same for every row."""
        if x in self.consts:
            shape = self.consts[x]
            return len(shape) < 2 or shape[-2] == 1
        return self._derive(x)

    def _derive(self, x: str, depth: int = 0) -> bool:
        """x is row-wise: already one of the region's rows, or computed from them by row-wise ops (then joined;
        nothing is joined when it is not)."""
        return x in self.wide or self._undo_on_false(self._derive_from, x, depth)

    def _derive_from(self, x: str, depth: int) -> bool:
        p = self.producer.get(x)
        if p is None or depth > DERIVE_DEPTH or id(p) in self.taken or not _plain(p):
            return False
        op = p.op_type
        if op in UNARY and len(p.input) == 1:
            return self._derive(p.input[0], depth + 1) and self._join(p, self._any_wide(p))
        if op in BINARY and len(p.input) == 2:
            if not all(self._derive(i, depth + 1) if i not in self.consts else self._operand(i) for i in p.input):
                return False
            return any(i in self.wide for i in p.input) and self._join(p, self._any_wide(p))
        if op == "MatMul":
            a, b = p.input
            if b in self.wide or not self._derive(a, depth + 1):
                return False
            return self._join(p, self._widens(b, self.wide[a]))
        return False

    def _any_wide(self, node) -> bool:
        return any(self.wide.get(i, False) for i in node.input)

    def _widens(self, b: str, a_wide: bool) -> bool:
        """Is MatMul(A, b) wide? A constant [d, D] with D >= WIDEN d widens and one that keeps a wide A's width
        keeps it; one that narrows ends the wide part, as does a computed right operand (a LoRA factor: rank
        columns)."""
        shape = self.consts.get(b)
        if shape is not None and len(shape) == 2:
            return shape[1] >= WIDEN * shape[0] or (a_wide and shape[1] * WIDEN > shape[0])
        return False

    def _join(self, node, wide: bool) -> bool:
        self.members[id(node)] = node
        for o in node.output:
            self.wide[o] = wide
        return True


def _plain(node) -> bool:
    """A standard op with one output and no subgraph."""
    return node.domain in ("", "ai.onnx") and len(node.output) == 1 and not any(a.type in (5, 10)
                                                                                for a in node.attribute)


def _widening(node, consts) -> bool:
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
        return False
    shape = consts.get(node.input[1])
    return shape is not None and len(shape) == 2 and shape[1] >= WIDEN * shape[0]


def _ranks(model, small: int = 1024) -> dict[str, int]:
    """Every tensor's rank where ONNX shape inference finds it, on a copy without the large weights (their
    types and dims stand in as graph inputs; small constants, shapes among them, are kept)."""
    import onnx
    from onnx import helper

    g = model.graph
    declared = {i.name for i in g.input}
    keep, typed = [], []
    for t in g.initializer:
        n = 1
        for d in t.dims:
            n *= d
        if n <= small and t.data_location != onnx.TensorProto.EXTERNAL:
            keep.append(t)
        elif t.name not in declared:
            typed.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    light = helper.make_graph(list(g.node), g.name, [*g.input, *typed], list(g.output), keep)
    m = helper.make_model(light, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    try:
        m = onnx.shape_inference.infer_shapes(m, data_prop=True)
    except Exception:  # noqa: BLE001 - no ranks: nothing is cut (a Concat needs its rank)
        return {}
    ranks = {}
    for v in [*m.graph.input, *m.graph.value_info, *m.graph.output]:
        if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape"):
            ranks[v.name] = len(v.type.tensor_type.shape.dim)
    for t in g.initializer:
        ranks[t.name] = len(t.dims)
    return ranks


def _toposort(nodes, available: set[str]):
    """nodes in an order where each reads only what is available before it, the given order kept where it
    allows (a ready node of lower index first): a region's slices come out one after another."""
    import heapq

    from .text_parts import node_reads

    have = set(available) | {""}
    made = {o for n in nodes for o in n.output}
    waiting = {}
    by_input = defaultdict(list)
    ready = []
    for i, n in enumerate(nodes):
        need = {x for x in node_reads(n) if x in made and x not in have}
        waiting[i] = len(need)
        for x in need:
            by_input[x].append(i)
        if not need:
            heapq.heappush(ready, i)
    out = []
    while ready:
        i = heapq.heappop(ready)
        out.append(nodes[i])
        for o in nodes[i].output:
            for j in by_input.pop(o, []):
                waiting[j] -= 1
                if waiting[j] == 0:
                    heapq.heappush(ready, j)
    if len(out) != len(nodes):
        raise RuntimeError("feed-forward slices: the rewritten graph has a cycle")
    return out
