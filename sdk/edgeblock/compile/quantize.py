"""Weight-only quantization of frozen ONNX graphs: the constant MatMul/Gemm weights go to fp16, int8 or int4.

Activations stay fp32. int4 is com.microsoft MatMulNBits (packed here with numpy); int8 is DequantizeLinear
(per output channel) feeding MatMul; fp16 is a Cast feeding MatMul; a large int8 / fp16 weight is stored in column
blocks, each dequantized and multiplied on its own (COPY_BLOCK_BYTES). docs/quantization.md has the formats,
the measured errors and memory, and the session options a loader must set (edge_runtime.weights).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge_runtime.weights import COPY_BLOCK_BYTES, SESSION_SETTINGS, WEIGHTS  # noqa: F401 - part of this module's API

# SESSION_SETTINGS (what an ORT session over each precision must set) is the device's contract:
# edge_runtime/weights.py, shared by compile and the runtime.

_INT4_MAX = 15  # uint4 codes 0..15, asymmetric with a zero point per block
_INT8_MAX = 127  # int8 codes -127..127, symmetric (zero point 0) per output channel
MIN_ELEMENTS = 4096  # a smaller MatMul/Gemm weight keeps fp32 (its bytes are negligible)


# ---------------------------------------------------------------- numpy packing and its reference


def pack_int4(w: np.ndarray, block_size: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize w (K, N) for MatMulNBits bits=4: blocks of block_size along K, asymmetric min/max.

    Returns (B uint8 (N, n_blocks, block_size // 2), scales float32 (N * n_blocks,),
    zero_points uint8 (N * ceil(n_blocks / 2),)), in ORT's layout: the element of lower K index in the
    low nibble, zero points packed the same way row by row. K is zero-padded to n_blocks * block_size.
    """
    _check_block_size(block_size)
    k, n = w.shape
    n_blocks = -(-k // block_size)
    wt = np.zeros((n, n_blocks * block_size), np.float32)
    wt[:, :k] = w.T  # (N, K_pad); the padding is exactly 0, so it dequantizes to 0
    blocks = wt.reshape(n, n_blocks, block_size)
    scales, zero = int4_scale_zero(blocks.min(axis=2), blocks.max(axis=2))
    zero = zero.astype(np.uint8)  # (N, n_blocks)
    q = np.clip(np.round(blocks / scales[..., None]) + zero[..., None], 0, _INT4_MAX).astype(np.uint8)
    return pack_codes(q, scales, zero)


def int4_scale_zero(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point (float, in [0, 15]) of asymmetric 4-bit codes over each block's [lo, hi], the range
    widened to hold 0 so that 0 is exact (code == zero point); an all-zero block gets scale 1."""
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    scale = (hi - lo) / _INT4_MAX
    scale = np.where(scale > 0, scale, 1.0).astype(lo.dtype)
    return scale, np.clip(np.round(-lo / scale), 0, _INT4_MAX)


def pack_int4_calibrated(w: np.ndarray, hessian: np.ndarray, block_size: int = 32) -> tuple[np.ndarray, ...]:
    """pack_int4's layout, the codes rounded with the layer's input Hessian X^T X (K, K) so that the error of
    x @ w on inputs like the calibration's is smallest (compile/gptq.py)."""
    from .gptq import gptq_int4

    _check_block_size(block_size)
    return pack_codes(*gptq_int4(w, hessian, block_size))


def pack_codes(q: np.ndarray, scales: np.ndarray, zero: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MatMulNBits' layout of 4-bit codes q (N, n_blocks, block_size), scales and zero points (N, n_blocks)."""
    n, n_blocks, _ = q.shape
    packed = q[..., 0::2] | (q[..., 1::2] << 4)  # (N, n_blocks, block_size // 2)
    zero_pad = np.zeros((n, n_blocks + n_blocks % 2), np.uint8)
    zero_pad[:, :n_blocks] = zero
    zero_packed = (zero_pad[:, 0::2] | (zero_pad[:, 1::2] << 4)).reshape(-1)
    return packed, np.ascontiguousarray(scales, np.float32).reshape(-1), zero_packed


def dequantize_int4(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, k: int) -> np.ndarray:
    """The numpy reference of MatMulNBits bits=4: (code - zero_point) * scale, back to (K, N) float32."""
    n, n_blocks, half = packed.shape
    q = np.empty((n, n_blocks, 2 * half), np.uint8)
    q[..., 0::2] = packed & 0x0F
    q[..., 1::2] = packed >> 4
    zp = np.empty((n, 2 * zero_points.size // n), np.uint8)
    zp_rows = zero_points.reshape(n, -1)
    zp[:, 0::2] = zp_rows & 0x0F
    zp[:, 1::2] = zp_rows >> 4
    zp = zp[:, :n_blocks].astype(np.float32)
    w = (q.astype(np.float32) - zp[..., None]) * scales.reshape(n, n_blocks)[..., None]
    return np.ascontiguousarray(w.reshape(n, -1)[:, :k].T)


def quantize_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output channel of w (K, N): (codes int8 (K, N), scales float32 (N,))."""
    amax = np.abs(w).max(axis=0)
    scales = np.where(amax > 0, amax / _INT8_MAX, 1.0).astype(np.float32)
    q = np.clip(np.round(w / scales), -_INT8_MAX, _INT8_MAX).astype(np.int8)
    return q, scales


def dequantize_int8(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The numpy reference of DequantizeLinear(axis=1, zero point 0)."""
    return q.astype(np.float32) * scales


def _check_block_size(block_size: int) -> None:
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size={block_size}: MatMulNBits needs a power of two >= 16 (e.g. 32 or 64)")


# ---------------------------------------------------------------- the graph rewrite


@dataclass
class _Rewrite:
    """State of one quantize_model call: new nodes and initializers, names in use, the report."""

    model: onnx.ModelProto
    weights: str
    block_size: int
    hessians: dict[str, np.ndarray] = field(default_factory=dict)  # weight -> X^T X of its inputs (int4 calibration)
    copy_block_bytes: int = COPY_BLOCK_BYTES  # int8 / fp16: the largest fp32 copy of a stored column block
    names: set[str] = field(default_factory=set)
    new_inits: list[TensorProto] = field(default_factory=list)
    cache: dict[tuple, tuple] = field(default_factory=dict)  # (init, transB, alpha) -> int4: its initializer names;
    # int8 / fp16: one tuple of initializer names per stored column block
    report: dict[str, Any] = field(default_factory=dict)
    replaced: set[str] = field(default_factory=set)  # initializers the rewrite stopped reading

    def fresh(self, base: str) -> str:
        name, i = base, 0
        while name in self.names:
            i += 1
            name = f"{base}_{i}"
        self.names.add(name)
        return name

    def add_init(self, array: np.ndarray, base: str, weight: bool = True) -> str:
        name = self.fresh(base)
        self.new_inits.append(numpy_helper.from_array(array, name))
        if weight:  # bytes of a quantized matrix (codes, scales, zero points), not of a Gemm bias
            self.report["bytes_after"] += int(array.nbytes)
        return name


def quantize_model(
    model: onnx.ModelProto, weights: str, block_size: int = 32, min_elements: int = MIN_ELEMENTS,
    hessians: dict[str, np.ndarray] | None = None, copy_block_bytes: int = COPY_BLOCK_BYTES,
) -> tuple[onnx.ModelProto, dict]:
    """Rewrite each MatMul/Gemm of the main graph whose B is a constant 2-D float32 initializer.

    `model` must have its external data loaded (onnx.load(path) does so by default); save the result with
    onnx.save(model, path, save_as_external_data=True) when it is large. Returns (new model, report):
    report = {"weights", "block_size", "quantized" (count), "bytes_before"/"bytes_after" (of the quantized
    matrices: fp32 weights vs codes + scales + zero points), "matrices" [{node, weight, shape}],
    "skipped" [{node, op, reason}], "session" (SESSION_SETTINGS[weights]), "calibrated" (int4 matrices
    rounded with a Hessian)}. The input is not modified.

    `hessians` (int4): {MatMul input name: X^T X} from calibration feeds (gptq.input_hessians); a matrix whose
    input has one is rounded with it (pack_int4_calibrated), the others to nearest (pack_int4).

    `copy_block_bytes` (int8 / fp16): a weight is stored in column blocks (column_blocks) whose fp32 copies are at
    most this size; each reader multiplies block by block and concatenates the products (same numbers).
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}: choose one of {', '.join(WEIGHTS)}")
    if weights == "int4":
        _check_block_size(block_size)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    report: dict[str, Any] = {
        "weights": weights,
        "block_size": block_size if weights == "int4" else None,
        "quantized": 0,
        "bytes_before": 0,
        "bytes_after": 0,
        "matrices": [],
        "skipped": [],
        "session": copy.deepcopy(SESSION_SETTINGS[weights]),
        "calibrated": 0,
    }
    if weights == "fp32":
        return out, report
    if weights == "int8" and _default_opset(out) < 13:
        raise ValueError(f"int8 needs opset >= 13 (per-axis DequantizeLinear); the model has {_default_opset(out)}")
    g = out.graph
    rw = _Rewrite(out, weights, block_size, hessians=_weight_hessians(g.node, hessians or {}), report=report,
                  copy_block_bytes=int(copy_block_bytes))
    rw.names = {i.name for i in g.initializer} | {i.name for i in g.input} | {n.name for n in g.node}
    rw.names |= {o for n in g.node for o in n.output} | _names_read(g.node)
    inits = {i.name: i for i in g.initializer}
    overridable = {i.name for i in g.input}
    new_nodes: list[onnx.NodeProto] = []
    for idx, node in enumerate(g.node):
        if node.op_type not in ("MatMul", "Gemm"):
            new_nodes.append(node)
            continue
        label = node.name or f"{node.op_type}_{idx}"
        reason = _why_not(node, inits, overridable, min_elements)
        if reason:
            report["skipped"].append({"node": label, "op": node.op_type, "reason": reason})
            new_nodes.append(node)
        else:
            new_nodes.extend(_rewrite_node(rw, node, label, inits[node.input[1]]))
    used = _names_read(new_nodes) | {o.name for o in g.output}
    kept = [i for i in g.initializer if i.name not in rw.replaced or i.name in used or i.name in overridable]
    del g.node[:]
    g.node.extend(new_nodes)
    del g.initializer[:]
    g.initializer.extend(kept + rw.new_inits)
    if weights == "int4" and not any(o.domain == "com.microsoft" for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return out, report


def _weight_hessians(nodes, hessians: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{weight: X^T X summed over the distinct inputs of the MatMul/Gemm nodes that read it}: a weight read by
    several nodes (a feed-forward cut into token slices, compile/feedforward_chunks.py) is rounded for all its rows."""
    by_weight: dict[str, dict[str, np.ndarray]] = {}
    for n in nodes:
        if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[0] in hessians:
            by_weight.setdefault(n.input[1], {})[n.input[0]] = hessians[n.input[0]]
    return {w: sum(parts.values()) for w, parts in by_weight.items()}


def quantized_inputs(model: onnx.ModelProto, min_elements: int = MIN_ELEMENTS) -> list[str]:
    """The A inputs of the MatMul/Gemm nodes quantize_model rewrites (what int4 calibration measures), in order."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    overridable = {i.name for i in g.input}
    return list(dict.fromkeys(n.input[0] for n in g.node if n.op_type in ("MatMul", "Gemm")
                              and _why_not(n, inits, overridable, min_elements) is None))


def _names_read(nodes) -> set[str]:
    """Every name the nodes read, including from inside their If/Loop/Scan subgraphs (outer-scope names)."""
    names: set[str] = set()
    for node in nodes:
        names.update(node.input)
        for a in node.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                names |= _names_read(sub.node) | {o.name for o in sub.output}
    return names


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _why_not(node: onnx.NodeProto, inits: dict, overridable: set, min_elements: int) -> str | None:
    """The reason this MatMul/Gemm keeps its fp32 weight, or None when it is quantized."""
    b = node.input[1] if len(node.input) > 1 else ""
    if b not in inits:
        return f"B ({b}) is not a constant initializer"
    if b in overridable:
        return f"B ({b}) is also a graph input, so it can be overridden at run time"
    init = inits[b]
    if init.data_location == TensorProto.EXTERNAL:
        raise ValueError(f"initializer {b} has its data outside the model: load it with onnx.load(path) "
                         "(load_external_data=True) before quantizing")
    if len(init.dims) != 2:
        return f"B ({b}) is not 2-D (shape {list(init.dims)})"
    if init.data_type != TensorProto.FLOAT:
        return f"B ({b}) is {TensorProto.DataType.Name(init.data_type)}, not FLOAT"
    if int(np.prod(init.dims)) < min_elements:
        return f"B ({b}) has {int(np.prod(init.dims))} elements < min_elements={min_elements}"
    if node.op_type == "Gemm" and _attr(node, "transA", 0):
        return "Gemm with transA=1"
    return None


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _rewrite_node(rw: _Rewrite, node: onnx.NodeProto, label: str, init: TensorProto) -> list[onnx.NodeProto]:
    """The nodes replacing one MatMul/Gemm: weight nodes (DQ/Cast), the matmul, and the Gemm bias."""
    gemm = node.op_type == "Gemm"
    trans_b = bool(_attr(node, "transB", 0)) if gemm else False
    alpha = float(_attr(node, "alpha", 1.0)) if gemm else 1.0
    w = numpy_helper.to_array(init).astype(np.float32)
    w = w.T if trans_b else w  # (K, N)
    if alpha != 1.0:
        w = w * np.float32(alpha)
    y = node.output[0]
    bias = _gemm_bias(rw, node, label, y) if gemm else ([], y)
    mm_out = bias[1]
    nodes: list[onnx.NodeProto] = []
    key = (init.name, trans_b, alpha)
    rw.replaced.add(init.name)
    first = key not in rw.cache
    if first:
        rw.report["quantized"] += 1
        rw.report["bytes_before"] += int(w.nbytes)
        rw.report["matrices"].append({"node": label, "weight": init.name, "shape": list(w.shape)})
    if rw.weights == "int4":
        if first:
            h = rw.hessians.get(init.name)
            if h is not None:
                packed, scales, zeros = pack_int4_calibrated(w, h, rw.block_size)
                rw.report["calibrated"] += 1
            else:
                packed, scales, zeros = pack_int4(w, rw.block_size)
            names = [rw.add_init(packed, f"{init.name}_q4"), rw.add_init(scales, f"{init.name}_q4_scale"),
                     rw.add_init(zeros, f"{init.name}_q4_zero")]
            rw.cache[key] = tuple(names)
        k, n = w.shape
        nodes.append(helper.make_node(
            "MatMulNBits", [node.input[0], *rw.cache[key]], [mm_out], name=rw.fresh(f"{label}_q4"),
            domain="com.microsoft", K=k, N=n, bits=4, block_size=rw.block_size))
    else:
        # the stored weight once, in column blocks of at most COPY_BLOCK_BYTES in fp32; per reader, each block's fp32
        # copy (DequantizeLinear / Cast) is made just before its own MatMul and freed after it, and the blocks'
        # products are concatenated: a run holds one block's copy, not the whole matrix's (docs/quantization.md)
        if first:
            rw.cache[key] = tuple(_stored_blocks(rw, init.name, w))
        op, suffix, attrs = (("DequantizeLinear", "dq", {"axis": 1}) if rw.weights == "int8"
                             else ("Cast", "cast", {"to": TensorProto.FLOAT}))
        blocks = rw.cache[key]
        outs = [mm_out] if len(blocks) == 1 else [rw.fresh(f"{mm_out}_col{j}") for j in range(len(blocks))]
        for stored, out in zip(blocks, outs):
            w_out = rw.fresh(f"{init.name}_fp32")
            nodes.append(helper.make_node(op, list(stored), [w_out], name=rw.fresh(f"{label}_{suffix}"), **attrs))
            nodes.append(helper.make_node("MatMul", [node.input[0], w_out], [out], name=rw.fresh(f"{label}_matmul")))
        if len(blocks) > 1:
            nodes.append(helper.make_node("Concat", outs, [mm_out], name=rw.fresh(f"{label}_cols"), axis=-1))
    return nodes + bias[0]


def column_blocks(k: int, n: int, block_bytes: int = COPY_BLOCK_BYTES) -> list[tuple[int, int]]:
    """The column ranges [(start, stop)] an int8 / fp16 weight of shape (k, n) is stored in: as few as keep each
    block's fp32 copy within block_bytes (one column at least), of near-equal width."""
    count = min(n, max(1, -(-k * n * 4 // int(block_bytes))))
    edges = [round(j * n / count) for j in range(count + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _stored_blocks(rw: _Rewrite, name: str, w: np.ndarray) -> list[tuple[str, ...]]:
    """Store w (K, N) at rw.weights (int8: codes + per-column scales; fp16) in column blocks; their initializer names."""
    out = []
    blocks = column_blocks(*w.shape, rw.copy_block_bytes)
    for j, (a, b) in enumerate(blocks):
        part = np.ascontiguousarray(w[:, a:b])
        tag = f"{name}_c{j}" if len(blocks) > 1 else name
        if rw.weights == "int8":
            q, scales = quantize_int8(part)  # per-column scales: the same codes as the whole matrix's
            out.append((rw.add_init(q, f"{tag}_q8"), rw.add_init(scales, f"{tag}_q8_scale")))
        else:
            out.append((rw.add_init(part.astype(np.float16), f"{tag}_fp16"),))
    return out


def _gemm_bias(rw: _Rewrite, node: onnx.NodeProto, label: str, y: str) -> tuple[list[onnx.NodeProto], str]:
    """For a rewritten Gemm: (nodes making Y = mm + beta * C, the name mm the matmul must write).

    C is optional; beta is folded into C when C is a constant initializer, else applied by a Mul.
    """
    c = node.input[2] if len(node.input) > 2 else ""
    beta = float(_attr(node, "beta", 1.0))
    if not c or beta == 0.0:
        return [], y
    mm = rw.fresh(f"{y}_matmul")
    nodes = []
    if beta != 1.0:
        g = rw.model.graph
        const = next((i for i in g.initializer if i.name == c), None)
        if const is not None and c not in {i.name for i in g.input}:
            cv = numpy_helper.to_array(const)
            rw.replaced.add(const.name)
            c = rw.add_init((cv * beta).astype(cv.dtype), f"{c}_beta", weight=False)
        else:
            b = rw.add_init(np.asarray(beta, np.float32), f"{label}_beta", weight=False)
            scaled = rw.fresh(f"{c}_beta")
            nodes.append(helper.make_node("Mul", [c, b], [scaled], name=rw.fresh(f"{label}_beta")))
            c = scaled
    nodes.append(helper.make_node("Add", [mm, c], [y], name=rw.fresh(f"{label}_bias")))
    return nodes, mm


# ---------------------------------------------------------------- error of a quantized model


def quantization_error(
    original: onnx.ModelProto, quantized: onnx.ModelProto, feeds: dict[str, np.ndarray]
) -> dict:
    """Run both models in ORT CPU on `feeds`; per output: {"max_abs", "rel"} with rel = ||a - b|| / ||a||."""
    a = _run(original, feeds)
    b = _run(quantized, feeds)
    return {name: array_error(ref, b[name]) for name, ref in a.items()}


def array_error(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """{"max_abs", "rel"} of got against ref, rel = ||ref - got|| / ||ref|| (the plain norm when ref is 0)."""
    ref64, got64 = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    norm = float(np.linalg.norm(ref64))
    diff = float(np.linalg.norm(ref64 - got64))
    return {"max_abs": float(np.abs(ref64 - got64).max()) if ref64.size else 0.0,
            "rel": diff / norm if norm > 0 else diff}


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import os
    import tempfile

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")  # a file, so models over protobuf's 2 GB limit work too
        onnx.save(model, path, save_as_external_data=model.ByteSize() > 1 << 30)
        sess = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        names = {i.name for i in sess.get_inputs()}
        outs = sess.run(None, {k: v for k, v in feeds.items() if k in names})
    return {o.name: v for o, v in zip(sess.get_outputs(), outs)}
