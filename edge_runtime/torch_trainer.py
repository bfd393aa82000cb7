"""On-device LoRA training on PyTorch, for devices without ONNX Runtime training (same interface as OrtTrainer).

JetPack ships PyTorch wheels but no onnxruntime-training build. This backend trains from the same
bundle artifacts (trainable/, see the compiler's ort_training.py) without ONNX Runtime:

- the forward + loss graph is `eval_model.onnx` (the training graph without its gradient nodes),
  read with a small protobuf decoder (no `onnx` package needed) and run by an ONNX -> torch
  interpreter (`ops()`: op type -> torch function, per the ONNX spec at the graph's opset);
- the parameter values are `params.safetensors` (every parameter the graph takes as an input, by
  that name, float32; ORT's checkpoint format is not readable without ONNX Runtime);
- the spec's `requires_grad` tensors are torch leaves; autograd gives their gradients and
  `torch.optim.AdamW` with the spec's optimizer settings updates them (the ORT optimizer model is
  torch's AdamW, adam_mode 0).

Checkpoints are `torch.save` files (LoRA tensors, AdamW state, step count), not ORT checkpoints;
one backend cannot resume the other's. torch is imported lazily: importing edge_runtime never
pulls it in. Never imports onnxruntime, transformers or diffusers.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .ort_trainer import TrainingError, load_spec

CHECKPOINT_FORMAT = "edgeblock-torch-trainer/1"
DEFAULT_FILES = {"eval": "eval_model.onnx", "training": "training_model.onnx", "params": "params.safetensors"}


def _torch():
    try:
        import torch
    except ImportError as e:
        raise TrainingError("the torch trainer backend needs PyTorch (on Jetson: the JetPack PyTorch wheel)") from e
    return torch


# =============================================================================================
# A minimal ONNX protobuf decoder (wire format; only the fields the interpreter needs)
# =============================================================================================
class OnnxFormatError(TrainingError):
    pass


def _varint(b: memoryview, i: int) -> tuple[int, int]:
    r = s = 0
    while True:
        c = b[i]
        i += 1
        r |= (c & 0x7F) << s
        if c < 0x80:
            return r, i
        s += 7


def _fields(b: memoryview):
    """(field number, wire type, value): int for varints, memoryview for the rest."""
    i, n = 0, len(b)
    try:
        while i < n:
            key, i = _varint(b, i)
            f, wt = key >> 3, key & 7
            if wt == 0:
                v, i = _varint(b, i)
            elif wt == 1:
                v, i = b[i : i + 8], i + 8
            elif wt == 2:
                ln, i = _varint(b, i)
                v, i = b[i : i + ln], i + ln
            elif wt == 5:
                v, i = b[i : i + 4], i + 4
            else:
                raise OnnxFormatError(f"not an ONNX protobuf: wire type {wt}")
            if i > n:
                raise OnnxFormatError("not an ONNX protobuf: truncated")
            yield f, wt, v
    except IndexError as e:
        raise OnnxFormatError("not an ONNX protobuf: truncated varint") from e


def _s64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _ints(wt: int, v) -> list[int]:
    if wt == 0:
        return [_s64(v)]
    out, i = [], 0
    while i < len(v):
        x, i = _varint(v, i)
        out.append(_s64(x))
    return out


def _floats(wt: int, v, fmt: str = "<f4") -> list[float]:
    return np.frombuffer(bytes(v), dtype=fmt).tolist()


def _str(v) -> str:
    return bytes(v).decode("utf-8")


# TensorProto.DataType -> numpy dtype (bfloat16 is read as its float32 value, then cast)
_NP = {1: "<f4", 2: "u1", 3: "i1", 4: "<u2", 5: "<i2", 6: "<i4", 7: "<i8", 9: "?", 10: "<f2", 11: "<f8",
       12: "<u4", 13: "<u8", 16: "bf16"}


def torch_dtype(code: int):
    torch = _torch()
    m = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32, 7: torch.int64,
         9: torch.bool, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16}
    for c, name in ((4, "uint16"), (12, "uint32"), (13, "uint64")):
        if hasattr(torch, name):
            m[c] = getattr(torch, name)
    if code not in m:
        raise TrainingError(f"ONNX data type {code} has no torch dtype here")
    return m[code]


def _tensor(b, base_dir: str):
    """TensorProto -> (name, torch tensor)."""
    torch = _torch()
    dims: list[int] = []
    dt, name, raw, loc, ext = 0, "", None, 0, {}
    data: dict[int, list] = {}
    for f, wt, v in _fields(b):
        if f == 1:
            dims += _ints(wt, v)
        elif f == 2:
            dt = v
        elif f == 8:
            name = _str(v)
        elif f == 9:
            raw = v
        elif f == 4:
            data.setdefault(4, []).extend(_floats(wt, v) if wt == 2 else np.frombuffer(bytes(v), "<f4").tolist())
        elif f == 10:
            data.setdefault(10, []).extend(_floats(wt, v, "<f8") if wt == 2 else np.frombuffer(bytes(v), "<f8").tolist())
        elif f in (5, 7, 11):
            data.setdefault(f, []).extend(_ints(wt, v))
        elif f == 6:
            raise OnnxFormatError(f"tensor {name or '?'}: string tensors are not supported")
        elif f == 13:
            kv = {k: _str(x) for k, _, x in _fields(v)}
            ext[kv.get(1, "")] = kv.get(2, "")
        elif f == 14:
            loc = v
    if dt not in _NP:
        raise OnnxFormatError(f"tensor {name or '?'}: data type {dt} is not supported")
    npdt = np.dtype("<u2") if dt == 16 else np.dtype(_NP[dt])
    if loc == 1:  # EXTERNAL
        path = os.path.join(base_dir, ext.get("location", ""))
        off, ln = int(ext.get("offset", 0) or 0), ext.get("length")
        with open(path, "rb") as fh:
            fh.seek(off)
            raw = fh.read(int(ln) if ln else -1)
    n = int(np.prod(dims, dtype=np.int64)) if dims else 1
    if raw is not None:
        a = np.frombuffer(bytes(raw), dtype=npdt)
    elif dt == 1:
        a = np.asarray(data.get(4, []), np.float32)
    elif dt == 11:
        a = np.asarray(data.get(10, []), np.float64)
    elif dt == 7:
        a = np.asarray(data.get(7, []), np.int64)
    elif dt in (12, 13):
        a = np.asarray([x & ((1 << 64) - 1) for x in data.get(11, [])], np.uint64).astype(npdt)
    elif dt in (10, 16):
        a = np.asarray(data.get(5, []), np.int64).astype(np.uint16)
    else:  # int32_data holds int8/16/32, uint8/16 and bool
        a = np.asarray(data.get(5, []), np.int64).astype(npdt)
    if a.size != n:
        raise OnnxFormatError(f"tensor {name or '?'}: {a.size} values for shape {dims}")
    a = a.reshape(dims)
    if dt == 16:
        t = torch.from_numpy((a.astype(np.uint32) << 16).view(np.float32).copy()).to(torch.bfloat16)
    elif dt == 10:
        t = torch.from_numpy(a.view(np.float16).copy())
    else:
        t = torch.from_numpy(a.astype(a.dtype.newbyteorder("="), copy=True))
    return name, t


class Node:
    __slots__ = ("attrs", "domain", "inputs", "name", "op_type", "outputs")

    def __init__(self, op_type, domain, name, inputs, outputs, attrs):
        self.op_type, self.domain, self.name = op_type, domain, name
        self.inputs, self.outputs, self.attrs = inputs, outputs, attrs

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)

    def __repr__(self) -> str:
        return f"{self.op_type}({self.name or self.outputs[0] if self.outputs else ''})"


def _attribute(b, base_dir: str) -> tuple[str, Any]:
    name, value, typ = "", None, 0
    floats: list[float] = []
    ints: list[int] = []
    strings: list[str] = []
    tensors: list = []
    seen: set[int] = set()
    for f, wt, v in _fields(b):
        seen.add(f)
        if f == 1:
            name = _str(v)
        elif f == 20:
            typ = v
        elif f == 2:
            value = float(np.frombuffer(bytes(v), "<f4")[0])
        elif f == 3:
            value = _s64(v)
        elif f == 4:
            value = bytes(v)
        elif f == 5:
            value = _tensor(v, base_dir)[1]
        elif f == 7:
            floats += _floats(wt, v) if wt == 2 else np.frombuffer(bytes(v), "<f4").tolist()
        elif f == 8:
            ints += _ints(wt, v)
        elif f == 9:
            strings.append(bytes(v))
        elif f == 10:
            tensors.append(_tensor(v, base_dir)[1])
        elif f in (6, 11, 22, 23):
            value = _Unsupported(f"attribute {name or '?'}: graph / sparse / type attributes are not supported")
        elif f == 21:
            value = _Unsupported(f"attribute {name or '?'}: references to function attributes are not supported")
    # AttributeType: FLOAT 1, INT 2, STRING 3, TENSOR 4, GRAPH 5, FLOATS 6, INTS 7, STRINGS 8, TENSORS 9
    if typ == 6 or (7 in seen and value is None):
        value = floats
    elif typ == 7 or (8 in seen and value is None):
        value = ints
    elif typ == 8 or (9 in seen and value is None):
        value = strings
    elif typ == 9 or (10 in seen and value is None):
        value = tensors
    elif value is None and typ == 1:
        value = 0.0
    elif value is None and typ == 2:
        value = 0
    elif value is None and typ == 3:
        value = b""
    return name, value


class _Unsupported:
    def __init__(self, msg: str):
        self.msg = msg


def _node(b, base_dir: str) -> Node:
    inputs, outputs, attrs = [], [], {}
    name = op = domain = ""
    for f, _, v in _fields(b):
        if f == 1:
            inputs.append(_str(v))
        elif f == 2:
            outputs.append(_str(v))
        elif f == 3:
            name = _str(v)
        elif f == 4:
            op = _str(v)
        elif f == 7:
            domain = _str(v)
        elif f == 5:
            k, val = _attribute(v, base_dir)
            attrs[k] = val
    return Node(op, domain, name, inputs, outputs, attrs)


def _value_info_name(b) -> str:
    for f, _, v in _fields(b):
        if f == 1:
            return _str(v)
    return ""


class OnnxGraph:
    """The parts of an ONNX model the interpreter runs: nodes (topological order), initializers,
    input / output names and the default-domain opset."""

    def __init__(self, nodes, initializers, inputs, outputs, opset, ir_version):
        self.nodes: list[Node] = nodes
        self.initializers: dict[str, Any] = initializers
        self.inputs: list[str] = inputs
        self.outputs: list[str] = outputs
        self.opset: int = opset
        self.ir_version: int = ir_version

    @classmethod
    def load(cls, path: str) -> OnnxGraph:
        with open(path, "rb") as f:
            data = f.read()
        return cls.parse(data, os.path.dirname(os.path.abspath(path)))

    @classmethod
    def parse(cls, data: bytes, base_dir: str = ".") -> OnnxGraph:
        b = memoryview(data)
        graph, opset, ir = None, None, 0
        for f, _, v in _fields(b):
            if f == 1:
                ir = v
            elif f == 7:
                graph = v
            elif f == 8:
                kv = {k: x for k, _, x in _fields(v)}
                dom = _str(kv[1]) if 1 in kv else ""
                if dom in ("", "ai.onnx"):
                    opset = int(kv.get(2, 0))
        if graph is None:
            raise OnnxFormatError("not an ONNX model: no graph")
        nodes, inits, inputs, outputs = [], {}, [], []
        for f, _, v in _fields(graph):
            if f == 1:
                nodes.append(_node(v, base_dir))
            elif f == 5:
                n, t = _tensor(v, base_dir)
                inits[n] = t
            elif f == 11:
                inputs.append(_value_info_name(v))
            elif f == 12:
                outputs.append(_value_info_name(v))
            elif f == 15:
                raise OnnxFormatError("sparse initializers are not supported")
        return cls(nodes, inits, inputs, outputs, opset if opset is not None else 1, ir)


# =============================================================================================
# The interpreter: op type -> torch function (ctx, node, inputs) -> outputs
# =============================================================================================
class _Ctx:
    def __init__(self, opset: int, device):
        self.opset, self.device = opset, device


def _ilist(t) -> list[int]:
    return [int(x) for x in t.reshape(-1).tolist()]


def _axis(a: int, rank: int) -> int:
    return a + rank if a < 0 else a


def _binary(fn):
    return lambda c, n, x: [fn(x[0], x[1])]


def _unary(fn):
    return lambda c, n, x: [fn(x[0])]


def _div(a, b):
    torch = _torch()
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")  # C integer division, as ONNX Runtime
    return a / b


def _pow(a, b):
    out = a**b
    return out if out.dtype == a.dtype else out.to(a.dtype)  # ONNX: the base's type


def _mod(c, n, x):
    torch = _torch()
    a, b = x
    return [torch.fmod(a, b) if n.attr("fmod", 0) else torch.remainder(a, b)]


def _variadic(fn):
    def run(c, n, x):
        out = x[0]
        for y in x[1:]:
            out = fn(out, y)
        return [out]

    return run


def _mean(c, n, x):
    out = x[0]
    for y in x[1:]:
        out = out + y
    return [out / len(x)]


def _cast(c, n, x):
    return [x[0].to(torch_dtype(n.attr("to")))]


def _castlike(c, n, x):
    return [x[0].to(x[1].dtype)]


def _constant(c, n, x):
    torch = _torch()
    a = n.attrs
    if "value" in a:
        return [a["value"].to(c.device)]
    if "value_float" in a:
        return [torch.tensor(a["value_float"], dtype=torch.float32, device=c.device)]
    if "value_floats" in a:
        return [torch.tensor(a["value_floats"], dtype=torch.float32, device=c.device)]
    if "value_int" in a:
        return [torch.tensor(a["value_int"], dtype=torch.int64, device=c.device)]
    if "value_ints" in a:
        return [torch.tensor(a["value_ints"], dtype=torch.int64, device=c.device)]
    raise TrainingError(f"Constant {n.name!r}: only tensor / float(s) / int(s) values are supported, not {sorted(a)}")


def _constant_of_shape(c, n, x):
    torch = _torch()
    v = n.attr("value")
    shape = _ilist(x[0])
    if v is None:
        return [torch.zeros(shape, dtype=torch.float32, device=c.device)]
    return [torch.full(shape, v.reshape(-1)[0].item(), dtype=v.dtype, device=c.device)]


def _shape(c, n, x):
    torch = _torch()
    s = list(x[0].shape)
    r = len(s)
    start, end = n.attr("start", 0), n.attr("end", r)
    start = min(max(_axis(start, r), 0), r)
    end = min(max(_axis(end, r), 0), r)
    return [torch.tensor(s[start:end], dtype=torch.int64, device=c.device)]


def _size(c, n, x):
    torch = _torch()
    return [torch.tensor(x[0].numel(), dtype=torch.int64, device=c.device)]


def _reshape(c, n, x):
    shape = _ilist(x[1])
    if not n.attr("allowzero", 0):
        shape = [x[0].shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return [x[0].reshape(shape)]


def _flatten(c, n, x):
    t = x[0]
    a = _axis(n.attr("axis", 1), t.dim())
    lead = int(np.prod(t.shape[:a], dtype=np.int64)) if a else 1
    return [t.reshape(lead, -1) if t.numel() else t.reshape(lead, int(np.prod(t.shape[a:], dtype=np.int64)))]


def _transpose(c, n, x):
    t = x[0]
    perm = n.attr("perm") or list(range(t.dim()))[::-1]
    return [t.permute([_axis(p, t.dim()) for p in perm])]


def _axes_arg(c, n, x, since: int, key: str = "axes"):
    """Axes from the second input (opset >= since) or the attribute (older opsets); None when absent."""
    if c.opset >= since:
        return _ilist(x[1]) if len(x) > 1 and x[1] is not None else None
    return n.attr(key)


def _unsqueeze(c, n, x):
    t = x[0]
    axes = _axes_arg(c, n, x, 13)
    r = t.dim() + len(axes)
    for a in sorted(_axis(a, r) for a in axes):
        t = t.unsqueeze(a)
    return [t]


def _squeeze(c, n, x):
    t = x[0]
    axes = _axes_arg(c, n, x, 13)
    if axes is None:
        return [t.reshape([d for d in t.shape if d != 1])]
    axes = sorted({_axis(a, t.dim()) for a in axes})
    for a in axes:
        if t.shape[a] != 1:
            raise TrainingError(f"Squeeze {n.name!r}: axis {a} of shape {tuple(t.shape)} is not 1")
    return [t.reshape([d for i, d in enumerate(t.shape) if i not in axes])]


def _concat(c, n, x):
    torch = _torch()
    xs = [t for t in x if t is not None]
    return [torch.cat(xs, dim=_axis(n.attr("axis"), xs[0].dim()))]


def _split(c, n, x):
    t = x[0]
    axis = _axis(n.attr("axis", 0), t.dim())
    parts = _axes_arg(c, n, x, 13, "split")
    k = len(n.outputs)
    if parts is None:
        if n.attr("num_outputs") is not None:  # opset 18: ceil-sized chunks, the last one smaller
            k = n.attr("num_outputs")
            size = -(-t.shape[axis] // k)
            parts = [min(size, t.shape[axis] - i * size) for i in range(k)]
        else:
            if t.shape[axis] % k:
                raise TrainingError(f"Split {n.name!r}: axis of {t.shape[axis]} does not split into {k} equal parts")
            parts = [t.shape[axis] // k] * k
    return list(t.split(parts, dim=axis))


def _slice(c, n, x):
    torch = _torch()
    t = x[0]
    if c.opset < 10:
        starts, ends, axes, steps = n.attr("starts"), n.attr("ends"), n.attr("axes"), None
    else:
        starts, ends = _ilist(x[1]), _ilist(x[2])
        axes = _ilist(x[3]) if len(x) > 3 and x[3] is not None else None
        steps = _ilist(x[4]) if len(x) > 4 and x[4] is not None else None
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = _axis(a, t.dim())
        dim = t.shape[a]
        if st == 0:
            raise TrainingError(f"Slice {n.name!r}: step 0")
        s = s + dim if s < 0 else s
        e = e + dim if e < 0 else e
        if st > 0:
            s, e = min(max(s, 0), dim), min(max(e, 0), dim)
            idx = [slice(None)] * t.dim()
            idx[a] = slice(s, e, st)
            t = t[tuple(idx)]
        else:
            s, e = min(max(s, 0), dim - 1), min(max(e, -1), dim - 1)
            sel = torch.arange(s, e, st, device=t.device, dtype=torch.int64) if s > e else torch.zeros(0, dtype=torch.int64, device=t.device)
            t = t.index_select(a, sel)
    return [t]


def _gather(c, n, x):
    t, idx = x
    a = _axis(n.attr("axis", 0), t.dim())
    i = idx.to(t.device).long()
    i = i.where(i >= 0, i + t.shape[a])
    out = t.index_select(a, i.reshape(-1))
    return [out.reshape(tuple(t.shape[:a]) + tuple(idx.shape) + tuple(t.shape[a + 1 :]))]


def _gather_elements(c, n, x):
    torch = _torch()
    t, idx = x
    a = _axis(n.attr("axis", 0), t.dim())
    i = idx.long()
    i = i.where(i >= 0, i + t.shape[a])
    return [torch.gather(t, a, i)]


def _expand(c, n, x):
    torch = _torch()
    t = x[0]
    shape = torch.broadcast_shapes(tuple(t.shape), tuple(_ilist(x[1])))
    return [t.expand(shape)]


def _tile(c, n, x):
    return [x[0].repeat(_ilist(x[1]))]


def _where(c, n, x):
    torch = _torch()
    return [torch.where(x[0].bool(), x[1], x[2])]


def _range(c, n, x):
    torch = _torch()
    start, limit, delta = (v.reshape(()).item() for v in x)
    count = max(math.ceil((limit - start) / delta), 0)
    return [(start + torch.arange(count, device=c.device, dtype=torch.float64) * delta).to(x[0].dtype)
            if x[0].is_floating_point() else
            torch.arange(count, device=c.device, dtype=x[0].dtype) * delta + start]


def _matmul(c, n, x):
    torch = _torch()
    return [torch.matmul(x[0], x[1])]


def _gemm(c, n, x):
    a, b = x[0], x[1]
    if n.attr("transA", 0):
        a = a.transpose(0, 1)
    if n.attr("transB", 0):
        b = b.transpose(0, 1)
    y = a @ b
    alpha, beta = n.attr("alpha", 1.0), n.attr("beta", 1.0)
    if alpha != 1.0:
        y = y * alpha
    if len(x) > 2 and x[2] is not None:
        y = y + (x[2] if beta == 1.0 else x[2] * beta)
    return [y]


def _softmax_like(kind: str):
    def run(c, n, x):
        torch = _torch()
        t = x[0]
        fn = torch.softmax if kind == "softmax" else torch.log_softmax
        if c.opset >= 13:
            return [fn(t, dim=_axis(n.attr("axis", -1), t.dim()))]
        a = _axis(n.attr("axis", 1), t.dim())  # opset < 13: coerced to 2-D at axis
        lead = int(np.prod(t.shape[:a], dtype=np.int64)) if a else 1
        return [fn(t.reshape(lead, -1), dim=1).reshape(t.shape)]

    return run


def _reduce(kind: str, axes_input_since: int = 18):
    def run(c, n, x):
        torch = _torch()
        t = x[0]
        keep = bool(n.attr("keepdims", 1))
        axes = _axes_arg(c, n, x, axes_input_since)
        if not axes:
            if (axes is not None or c.opset >= axes_input_since) and n.attr("noop_with_empty_axes", 0):
                return [t]
            axes = list(range(t.dim()))
        axes = sorted({_axis(a, t.dim()) for a in axes})
        if not axes:  # a 0-d tensor
            return [t]
        if kind == "mean":
            y = t.mean(dim=axes, keepdim=keep)
        elif kind == "sum":
            y = t.sum(dim=axes, keepdim=keep)
        elif kind == "max":
            y = t.amax(dim=axes, keepdim=keep)
        elif kind == "min":
            y = t.amin(dim=axes, keepdim=keep)
        elif kind == "sumsquare":
            y = (t * t).sum(dim=axes, keepdim=keep)
        elif kind == "l2":
            y = (t * t).sum(dim=axes, keepdim=keep).sqrt()
        elif kind == "l1":
            y = t.abs().sum(dim=axes, keepdim=keep)
        elif kind == "logsumexp":
            y = torch.logsumexp(t, dim=axes, keepdim=keep)
        elif kind == "prod":
            y = t
            for a in reversed(axes):
                y = y.prod(dim=a, keepdim=keep)
        else:  # pragma: no cover
            raise AssertionError(kind)
        return [y]

    return run


def _arg(kind: str):
    def run(c, n, x):
        torch = _torch()
        t = x[0]
        a = _axis(n.attr("axis", 0), t.dim())
        keep = bool(n.attr("keepdims", 1))
        if n.attr("select_last_index", 0):
            r = (torch.argmax if kind == "max" else torch.argmin)(t.flip(a), dim=a, keepdim=keep)
            return [t.shape[a] - 1 - r]
        return [(torch.argmax if kind == "max" else torch.argmin)(t, dim=a, keepdim=keep)]

    return run


def _pads_for_conv(n, x_shape, w_shape, strides, dilations):
    k = len(x_shape) - 2
    kernel = n.attr("kernel_shape") or list(w_shape[2:])
    auto = n.attr("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads_b, pads_e = [], []
        for i in range(k):
            size = x_shape[2 + i]
            out = -(-size // strides[i])
            total = max((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size, 0)
            small, big = total // 2, total - total // 2
            pads_b.append(small if auto == "SAME_UPPER" else big)
            pads_e.append(big if auto == "SAME_UPPER" else small)
        return pads_b, pads_e
    if auto == "VALID":
        return [0] * k, [0] * k
    pads = n.attr("pads") or [0] * (2 * k)
    return list(pads[:k]), list(pads[k:])


def _conv(c, n, x):
    torch = _torch()
    F = torch.nn.functional
    t, w = x[0], x[1]
    b = x[2] if len(x) > 2 else None
    k = t.dim() - 2
    if k not in (1, 2, 3):
        raise TrainingError(f"Conv {n.name!r}: {k}-d convolution is not supported")
    strides = n.attr("strides") or [1] * k
    dilations = n.attr("dilations") or [1] * k
    pb, pe = _pads_for_conv(n, tuple(t.shape), tuple(w.shape), strides, dilations)
    if pb != pe:
        flat = []
        for i in reversed(range(k)):
            flat += [pb[i], pe[i]]
        t = F.pad(t, flat)
        pad = [0] * k
    else:
        pad = pb
    conv = (F.conv1d, F.conv2d, F.conv3d)[k - 1]
    return [conv(t, w, b, stride=strides, padding=pad, dilation=dilations, groups=n.attr("group", 1))]


def _pad(c, n, x):
    torch = _torch()
    F = torch.nn.functional
    t = x[0]
    r = t.dim()
    mode = n.attr("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if c.opset < 11:
        pads, value, axes = list(n.attr("pads")), n.attr("value", 0.0), None
    else:
        pads = _ilist(x[1])
        value = x[2].reshape(-1)[0].item() if len(x) > 2 and x[2] is not None and x[2].numel() else 0
        axes = _ilist(x[3]) if len(x) > 3 and x[3] is not None else None
    axes = list(range(r)) if axes is None else [_axis(a, r) for a in axes]
    k = len(axes)
    begin, end = [0] * r, [0] * r
    for j, a in enumerate(axes):
        begin[a], end[a] = pads[j], pads[k + j]
    if mode == "constant":
        flat = []
        for a in reversed(range(r)):
            flat += [begin[a], end[a]]
        return [F.pad(t, flat, mode="constant", value=value)]
    if mode not in ("reflect", "edge", "wrap"):
        raise TrainingError(f"Pad {n.name!r}: mode {mode!r} is not supported")
    for a in range(r):
        if not (begin[a] or end[a]):
            continue
        dim = t.shape[a]
        idx = []
        for j in range(-begin[a], dim + end[a]):
            if mode == "edge":
                idx.append(min(max(j, 0), dim - 1))
            elif mode == "wrap":
                idx.append(j % dim)
            else:
                period = 2 * (dim - 1)
                m = j % period if period else 0
                idx.append(m if m < dim else period - m)
        t = t.index_select(a, torch.tensor(idx, dtype=torch.int64, device=t.device))
    return [t]


def _layer_norm(c, n, x):
    t, scale = x[0], x[1]
    bias = x[2] if len(x) > 2 else None
    a = _axis(n.attr("axis", -1), t.dim())
    eps = n.attr("epsilon", 1e-5)
    dims = list(range(a, t.dim()))
    mean = t.mean(dim=dims, keepdim=True)
    d = t - mean
    var = (d * d).mean(dim=dims, keepdim=True)
    inv = (var + eps).rsqrt()
    y = d * inv * scale
    if bias is not None:
        y = y + bias
    return [y, mean, inv][: len(n.outputs)]


def _dropout(c, n, x):
    torch = _torch()
    t = x[0]
    if c.opset < 12:
        ratio, training = n.attr("ratio", 0.5), False  # opset < 12: inference is the identity
    else:
        ratio = float(x[1].reshape(()).item()) if len(x) > 1 and x[1] is not None else 0.5
        training = bool(x[2].reshape(()).item()) if len(x) > 2 and x[2] is not None else False
    if not training or ratio == 0.0:
        out = [t, torch.ones_like(t, dtype=torch.bool)]
    else:
        mask = torch.rand_like(t) >= ratio
        out = [t * mask / (1.0 - ratio), mask]
    return out[: len(n.outputs)]


def _clip(c, n, x):
    torch = _torch()
    t = x[0]
    if c.opset < 11:
        lo, hi = n.attr("min"), n.attr("max")
    else:
        lo = x[1] if len(x) > 1 and x[1] is not None else None
        hi = x[2] if len(x) > 2 and x[2] is not None else None
    if lo is not None:
        t = torch.maximum(t, lo) if torch.is_tensor(lo) else t.clamp(min=lo)
    if hi is not None:
        t = torch.minimum(t, hi) if torch.is_tensor(hi) else t.clamp(max=hi)
    return [t]


def _einsum(c, n, x):
    torch = _torch()
    eq = n.attr("equation")
    return [torch.einsum(eq.decode() if isinstance(eq, bytes) else eq, *x)]


def _gelu(c, n, x):
    torch = _torch()
    approx = n.attr("approximate", b"none")
    approx = approx.decode() if isinstance(approx, bytes) else approx
    return [torch.nn.functional.gelu(x[0], approximate=approx)]


def _cumsum(c, n, x):
    t = x[0]
    a = _axis(int(x[1].reshape(()).item()), t.dim())
    if n.attr("reverse", 0):
        t = t.flip(a)
    y = t.cumsum(a)
    if n.attr("exclusive", 0):
        y = y - t
    return [y.flip(a) if n.attr("reverse", 0) else y]


def _trilu(c, n, x):
    t = x[0]
    k = int(x[1].reshape(()).item()) if len(x) > 1 and x[1] is not None else 0
    return [t.triu(k) if n.attr("upper", 1) else t.tril(k)]


def _simplified_layer_norm(c, n, x):
    """ORT's SimplifiedLayerNormalization (RMS norm; in the default domain in ORT's registry)."""
    t, scale = x[0], x[1]
    a = _axis(n.attr("axis", -1), t.dim())
    dims = list(range(a, t.dim()))
    inv = ((t * t).mean(dim=dims, keepdim=True) + n.attr("epsilon", 1e-5)).rsqrt()
    return [t * inv * scale, inv][: len(n.outputs)]


def _build_ops() -> dict[str, Callable]:
    torch = _torch()
    F = torch.nn.functional
    return {
        # elementwise, numpy broadcasting
        "Add": _binary(lambda a, b: a + b),
        "Sub": _binary(lambda a, b: a - b),
        "Mul": _binary(lambda a, b: a * b),
        "Div": _binary(_div),
        "Pow": _binary(_pow),
        "Mod": _mod,
        "Equal": _binary(torch.eq),
        "Less": _binary(torch.lt),
        "LessOrEqual": _binary(torch.le),
        "Greater": _binary(torch.gt),
        "GreaterOrEqual": _binary(torch.ge),
        "And": _binary(torch.logical_and),
        "Or": _binary(torch.logical_or),
        "Xor": _binary(torch.logical_xor),
        "Max": _variadic(torch.maximum),
        "Min": _variadic(torch.minimum),
        "Sum": _variadic(lambda a, b: a + b),
        "Mean": _mean,
        "Neg": _unary(torch.neg),
        "Abs": _unary(torch.abs),
        "Sqrt": _unary(torch.sqrt),
        "Exp": _unary(torch.exp),
        "Log": _unary(torch.log),
        "Reciprocal": _unary(torch.reciprocal),
        "Sigmoid": _unary(torch.sigmoid),
        "Tanh": _unary(torch.tanh),
        "Relu": _unary(torch.relu),
        "Erf": _unary(torch.erf),
        "Sin": _unary(torch.sin),
        "Cos": _unary(torch.cos),
        "Floor": _unary(torch.floor),
        "Ceil": _unary(torch.ceil),
        "Round": _unary(torch.round),  # half to even, as ONNX
        "Sign": _unary(torch.sign),
        "Not": _unary(torch.logical_not),
        "IsNaN": _unary(torch.isnan),
        "Identity": _unary(lambda t: t),
        "Softplus": _unary(F.softplus),
        "Softsign": _unary(lambda t: t / (1 + t.abs())),
        "LeakyRelu": lambda c, n, x: [F.leaky_relu(x[0], n.attr("alpha", 0.01))],
        "Elu": lambda c, n, x: [F.elu(x[0], n.attr("alpha", 1.0))],
        "HardSigmoid": lambda c, n, x: [(x[0] * n.attr("alpha", 0.2) + n.attr("beta", 0.5)).clamp(0, 1)],
        "HardSwish": _unary(lambda t: t * (t / 6 + 0.5).clamp(0, 1)),
        "Gelu": _gelu,
        "Clip": _clip,
        "Cast": _cast,
        "CastLike": _castlike,
        # constants and shapes
        "Constant": _constant,
        "ConstantOfShape": _constant_of_shape,
        "Shape": _shape,
        "Size": _size,
        "Range": _range,
        # layout
        "Reshape": _reshape,
        "Flatten": _flatten,
        "Transpose": _transpose,
        "Squeeze": _squeeze,
        "Unsqueeze": _unsqueeze,
        "Concat": _concat,
        "Split": _split,
        "Slice": _slice,
        "Gather": _gather,
        "GatherElements": _gather_elements,
        "Expand": _expand,
        "Tile": _tile,
        "Where": _where,
        "Pad": _pad,
        "Trilu": _trilu,
        "CumSum": _cumsum,
        # linear algebra, normalisation, reductions
        "MatMul": _matmul,
        "Gemm": _gemm,
        "Einsum": _einsum,
        "Conv": _conv,
        "Softmax": _softmax_like("softmax"),
        "LogSoftmax": _softmax_like("log_softmax"),
        "LayerNormalization": _layer_norm,
        "SimplifiedLayerNormalization": _simplified_layer_norm,
        "Dropout": _dropout,
        "ReduceMean": _reduce("mean"),
        "ReduceSum": _reduce("sum", 13),
        "ReduceMax": _reduce("max"),
        "ReduceMin": _reduce("min"),
        "ReduceProd": _reduce("prod"),
        "ReduceSumSquare": _reduce("sumsquare"),
        "ReduceL1": _reduce("l1"),
        "ReduceL2": _reduce("l2"),
        "ReduceLogSumExp": _reduce("logsumexp"),
        "ArgMax": _arg("max"),
        "ArgMin": _arg("min"),
    }


_OPS: dict[str, Callable] | None = None


def ops() -> dict[str, Callable]:
    """The supported op types (default ONNX domain) -> their torch functions."""
    global _OPS
    if _OPS is None:
        _OPS = _build_ops()
    return _OPS


class UnsupportedOp(TrainingError):
    pass


class Interpreter:
    """Runs an OnnxGraph on torch tensors (autograd flows through every float op)."""

    def __init__(self, graph: OnnxGraph, device="cpu"):
        torch = _torch()
        self.graph = graph
        self.device = torch.device(device)
        self.ctx = _Ctx(graph.opset, self.device)
        table = ops()
        bad = sorted({f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
                      for n in graph.nodes if n.domain not in ("", "ai.onnx") or n.op_type not in table})
        if bad:
            raise UnsupportedOp(f"the torch trainer's ONNX interpreter does not support op type(s) {', '.join(bad)} "
                                f"(supported: {', '.join(sorted(table))})")
        for n in graph.nodes:
            for v in n.attrs.values():
                if isinstance(v, _Unsupported):
                    raise UnsupportedOp(f"{n.op_type} node {n.name!r}: {v.msg}")
        self._fns = [table[n.op_type] for n in graph.nodes]
        # Constants once, on the device; the last use of every value (to drop references early).
        self._consts: dict[str, Any] = {k: v.to(self.device) for k, v in graph.initializers.items()}
        self._nodes = []
        for n, fn in zip(graph.nodes, self._fns):
            if n.op_type == "Constant":
                self._consts[n.outputs[0]] = fn(self.ctx, n, [])[0]
            else:
                self._nodes.append((n, fn))
        last: dict[str, int] = {}
        for i, (n, _) in enumerate(self._nodes):
            for name in n.inputs:
                if name:
                    last[name] = i
        keep = set(graph.outputs)
        self._free = [[] for _ in self._nodes]
        for name, i in last.items():
            if name not in keep:
                self._free[i].append(name)

    def run(self, feeds: Mapping[str, Any], outputs: list[str] | None = None) -> dict[str, Any]:
        env: dict[str, Any] = dict(self._consts)
        env.update(feeds)
        missing = [n for n in self.graph.inputs if n not in env]
        if missing:
            raise TrainingError(f"graph inputs {missing[:5]} were not fed")
        for i, (n, fn) in enumerate(self._nodes):
            try:
                args = [env[name] if name else None for name in n.inputs]
            except KeyError as e:
                raise TrainingError(f"{n.op_type} node {n.name!r}: input {e.args[0]!r} has no value") from None
            while args and args[-1] is None:
                args.pop()
            try:
                outs = fn(self.ctx, n, args)
            except TrainingError:
                raise
            except Exception as e:
                shapes = [None if a is None else tuple(a.shape) for a in args]
                raise TrainingError(f"{n.op_type} node {n.name!r} (input shapes {shapes}) failed: {e}") from e
            for name, v in zip(n.outputs, outs):
                if name:
                    env[name] = v
            for name in self._free[i]:
                env.pop(name, None)
        wanted = outputs or self.graph.outputs
        return {k: env[k] for k in wanted}


# =============================================================================================
# The trainer
# =============================================================================================
class TorchTrainer:
    """One LoRA training session over the artifacts on PyTorch: the interface of OrtTrainer.

    checkpoint: a checkpoint written by save_checkpoint to start from (default: the artifacts'
    initial parameters); one saved with include_optimizer_state=True resumes AdamW's moments and
    step count as well. threads: torch intra-op threads during this trainer's calls (restored
    after each). device: a torch device ("cpu" by default; "cuda" on a Jetson's GPU).
    """

    def __init__(self, artifact_dir: str, lr: float | None = None, checkpoint: str | None = None,
                 threads: int | None = None, *, device: str = "cpu"):
        torch = _torch()
        self.dir = artifact_dir
        self.spec = load_spec(artifact_dir)
        files = {**DEFAULT_FILES, **self.spec["files"]}
        self.threads = int(threads) if threads else None
        self.device = torch.device(device)
        eval_path = os.path.join(artifact_dir, files["eval"])
        params_path = os.path.join(artifact_dir, files["params"])
        if not os.path.exists(eval_path):
            raise TrainingError(f"training artifact {files['eval']} is missing from {artifact_dir}")
        if not os.path.exists(params_path):
            raise TrainingError(
                f"{files['params']} is missing from {artifact_dir}: the torch trainer needs the parameter values "
                "(bundles compiled before it existed lack it: recompile the bundle)")
        self.inputs: list[str] = list(self.spec["inputs"])
        self.shapes = {k: tuple(v) for k, v in self.spec["input_shapes"].items()}
        self.lr = float(self.spec.get("optimizer", {}).get("lr", 1e-3) if lr is None else lr)

        with self._threads():
            self.graph = OnnxGraph.load(eval_path)
            self._interp = Interpreter(self.graph, self.device)
            self._loss_name = "loss" if "loss" in self.graph.outputs else self.graph.outputs[0]
            from .safetensors_np import load_file

            values, _ = load_file(params_path)
            user = set(self.inputs)
            needed = [n for n in self.graph.inputs if n not in user and n not in self.graph.initializers]
            missing = [n for n in needed if n not in values]
            if missing:
                raise TrainingError(f"{files['params']} lacks parameters the eval graph takes: {missing[:5]}")
            trainable = list(self.spec["requires_grad"])
            absent = [n for n in trainable if n not in values]
            if absent:
                raise TrainingError(f"{files['params']} lacks trainable parameters {absent[:5]}")
            self._params = {n: torch.from_numpy(np.array(v, dtype=np.float32 if v.dtype.kind == "f" else v.dtype))
                            .to(self.device) for n, v in values.items()}
            del values
            for n in trainable:
                self._params[n].requires_grad_(True)
            self._trainable = trainable
            opt = self.spec.get("optimizer", {}) or {}
            kind = str(opt.get("type", "AdamW"))
            if kind != "AdamW" or int(opt.get("adam_mode", 0)) != 0:
                raise TrainingError(f"optimizer {kind} (adam_mode {opt.get('adam_mode')}) is not torch's AdamW")
            betas = tuple(float(b) for b in opt.get("betas", (0.9, 0.999)))
            self._optimizer = torch.optim.AdamW(
                [self._params[n] for n in trainable], lr=self.lr, betas=betas, eps=float(opt.get("eps", 1e-8)),
                weight_decay=float(opt.get("weight_decay", 1e-2)))
            self.step_count = 0
            if checkpoint:
                self._load_checkpoint(os.fspath(checkpoint))
            self.set_learning_rate(self.lr)

    # ------------------------------------------------------------------ helpers
    @contextlib.contextmanager
    def _threads(self):
        if not self.threads:
            yield
            return
        torch = _torch()
        old = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(old)

    def _feeds(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        torch = _torch()
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise TrainingError(f"training feeds lack {missing}")
        out = {}
        for n in self.inputs:
            a = np.ascontiguousarray(feeds[n], dtype=np.float32)
            if a.shape != self.shapes[n]:
                raise TrainingError(f"training input {n}: shape {a.shape}, the artifacts take {self.shapes[n]}")
            out[n] = torch.from_numpy(a).to(self.device)
        return out

    def _loss(self, feeds: Mapping[str, Any]):
        env = dict(self._params)
        env.update(self._feeds(feeds))
        return self._interp.run(env, [self._loss_name])[self._loss_name].reshape(())

    def _backward(self, feeds: Mapping[str, Any]) -> float:
        torch = _torch()
        self._optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = self._loss(feeds)
            loss.backward()
        return float(loss.detach().cpu())

    # ------------------------------------------------------------------ steps
    def step(self, feeds: Mapping[str, Any]) -> float:
        """Forward, backward, AdamW update; the loss before the update."""
        with self._threads():
            loss = self._backward(feeds)
            self._optimizer.step()
            self._optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        return loss

    def loss_and_grads(self, feeds: Mapping[str, Any]) -> tuple[float, dict[str, np.ndarray]]:
        """Forward + backward without an update: the loss and each trainable LoRA tensor's gradient."""
        with self._threads():
            loss = self._backward(feeds)
            grads = {}
            for n in self._trainable:
                g = self._params[n].grad
                grads[n] = None if g is None else g.detach().cpu().numpy().copy()
            self._optimizer.zero_grad(set_to_none=True)
        return loss, grads

    def eval_loss(self, feeds: Mapping[str, Any]) -> float:
        torch = _torch()
        with self._threads(), torch.no_grad():
            return float(self._loss(feeds).cpu())

    def set_learning_rate(self, lr: float) -> None:
        self.lr = float(lr)
        for g in self._optimizer.param_groups:
            g["lr"] = self.lr

    # ------------------------------------------------------------------ weights
    def lora_weights(self) -> dict[str, np.ndarray]:
        """Every LoRA tensor by published name (unreachable ones as initialised)."""
        return {n: self._params[n].detach().cpu().numpy().copy() for n in self.spec["lora"] if n in self._params}

    def set_lora_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        torch = _torch()
        for n, v in weights.items():
            if n not in self._params:
                raise TrainingError(f"{n} is not a parameter of these training artifacts")
            p = self._params[n]
            a = np.ascontiguousarray(v, np.float32)
            if tuple(a.shape) != tuple(p.shape):
                raise TrainingError(f"{n}: shape {a.shape}, the parameter has {tuple(p.shape)}")
            with torch.no_grad():
                p.copy_(torch.from_numpy(a))

    def _saved_names(self) -> list[str]:
        """What a checkpoint holds: the trainable tensors and every LoRA tensor (the frozen base
        weights are the artifacts' own, in params.safetensors)."""
        return list(dict.fromkeys([*self._trainable, *(n for n in self.spec["lora"] if n in self._params)]))

    def save_checkpoint(self, path: str, include_optimizer_state: bool = True) -> None:
        """Write the training state to `path` atomically (tmp file + rename)."""
        torch = _torch()
        state = {
            "format": CHECKPOINT_FORMAT,
            "requires_grad": list(self._trainable),
            "params": {n: self._params[n].detach().cpu().clone() for n in self._saved_names()},
            "step": int(self.step_count),
            "lr": float(self.lr),
            "optimizer": self._optimizer.state_dict() if include_optimizer_state else None,
        }
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def _load_checkpoint(self, path: str) -> None:
        torch = _torch()
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError as e:
            raise TrainingError(f"checkpoint {path} does not exist") from e
        except Exception as e:
            raise TrainingError(f"{path} is not a torch trainer checkpoint ({type(e).__name__}: {e}); an ONNX Runtime "
                                "checkpoint resumes only with the ort backend") from e
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise TrainingError(f"{path} is not a torch trainer checkpoint ({CHECKPOINT_FORMAT})")
        if list(state.get("requires_grad", [])) != self._trainable:
            raise TrainingError(f"checkpoint {path} was written for other training artifacts (trainable tensors differ)")
        self.set_lora_weights({n: t.numpy() for n, t in state["params"].items()})
        if state.get("optimizer") is not None:
            self._optimizer.load_state_dict(state["optimizer"])
            for st in self._optimizer.state.values():  # state tensors follow their parameters' device
                for k, v in list(st.items()):
                    if torch.is_tensor(v) and k != "step":
                        st[k] = v.to(self.device)
        self.step_count = int(state.get("step", 0))


__all__ = ["Interpreter", "OnnxGraph", "TorchTrainer", "TrainingError", "UnsupportedOp", "ops"]
