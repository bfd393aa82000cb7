"""ONNX's shape, layout and indexing ops as torch functions, and what every op function shares.

Shared: PyTorch imported on first use (importing edge_runtime never pulls it in), the op context
(the graph's opset, the device), ONNX data type -> torch dtype, and axis / int-list helpers.
An op function takes (ctx, node, inputs) and returns its outputs (a list), per the ONNX spec.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from .ort_trainer import TrainingError


def load_torch():
    try:
        import torch
    except ImportError as e:
        raise TrainingError("the torch trainer backend needs PyTorch (on Jetson: the JetPack PyTorch wheel)") from e
    return torch


class OpContext:
    """What an op function may read besides its node and inputs: the graph's default-domain opset and
    the device new tensors go to."""

    def __init__(self, opset: int, device):
        self.opset, self.device = opset, device


def torch_dtype(code: int):
    """ONNX TensorProto.DataType code -> torch dtype (TrainingError for types torch lacks here)."""
    torch = load_torch()
    m = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32, 7: torch.int64,
         9: torch.bool, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16}
    for c, name in ((4, "uint16"), (12, "uint32"), (13, "uint64")):
        if hasattr(torch, name):
            m[c] = getattr(torch, name)
    if code not in m:
        raise TrainingError(f"ONNX data type {code} has no torch dtype here")
    return m[code]


def int_list(t) -> list[int]:
    """A 0-d or 1-d int tensor (shapes, axes, pads) as a list."""
    return [int(x) for x in t.reshape(-1).tolist()]


def pos_axis(a: int, rank: int) -> int:
    """A possibly negative ONNX axis as an index into `rank` dimensions."""
    return a + rank if a < 0 else a


def axes_arg(c, n, x, since: int, key: str = "axes"):
    """Axes from the second input (opset >= since) or the attribute (older opsets); None when absent."""
    if c.opset >= since:
        return int_list(x[1]) if len(x) > 1 and x[1] is not None else None
    return n.attr(key)


def _constant(c, n, x):
    torch = load_torch()
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
    torch = load_torch()
    v = n.attr("value")
    shape = int_list(x[0])
    if v is None:
        return [torch.zeros(shape, dtype=torch.float32, device=c.device)]
    return [torch.full(shape, v.reshape(-1)[0].item(), dtype=v.dtype, device=c.device)]


def _shape(c, n, x):
    torch = load_torch()
    s = list(x[0].shape)
    r = len(s)
    start, end = n.attr("start", 0), n.attr("end", r)
    start = min(max(pos_axis(start, r), 0), r)
    end = min(max(pos_axis(end, r), 0), r)
    return [torch.tensor(s[start:end], dtype=torch.int64, device=c.device)]


def _size(c, n, x):
    torch = load_torch()
    return [torch.tensor(x[0].numel(), dtype=torch.int64, device=c.device)]


def _reshape(c, n, x):
    shape = int_list(x[1])
    if not n.attr("allowzero", 0):
        shape = [x[0].shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return [x[0].reshape(shape)]


def _flatten(c, n, x):
    t = x[0]
    a = pos_axis(n.attr("axis", 1), t.dim())
    lead = int(np.prod(t.shape[:a], dtype=np.int64)) if a else 1
    return [t.reshape(lead, -1) if t.numel() else t.reshape(lead, int(np.prod(t.shape[a:], dtype=np.int64)))]


def _transpose(c, n, x):
    t = x[0]
    perm = n.attr("perm") or list(range(t.dim()))[::-1]
    return [t.permute([pos_axis(p, t.dim()) for p in perm])]


def axes_arg(c, n, x, since: int, key: str = "axes"):
    """Axes from the second input (opset >= since) or the attribute (older opsets); None when absent."""
    if c.opset >= since:
        return int_list(x[1]) if len(x) > 1 and x[1] is not None else None
    return n.attr(key)


def _unsqueeze(c, n, x):
    t = x[0]
    axes = axes_arg(c, n, x, 13)
    r = t.dim() + len(axes)
    for a in sorted(pos_axis(a, r) for a in axes):
        t = t.unsqueeze(a)
    return [t]


def _squeeze(c, n, x):
    t = x[0]
    axes = axes_arg(c, n, x, 13)
    if axes is None:
        return [t.reshape([d for d in t.shape if d != 1])]
    axes = sorted({pos_axis(a, t.dim()) for a in axes})
    for a in axes:
        if t.shape[a] != 1:
            raise TrainingError(f"Squeeze {n.name!r}: axis {a} of shape {tuple(t.shape)} is not 1")
    return [t.reshape([d for i, d in enumerate(t.shape) if i not in axes])]


def _concat(c, n, x):
    torch = load_torch()
    xs = [t for t in x if t is not None]
    return [torch.cat(xs, dim=pos_axis(n.attr("axis"), xs[0].dim()))]


def _split(c, n, x):
    t = x[0]
    axis = pos_axis(n.attr("axis", 0), t.dim())
    parts = axes_arg(c, n, x, 13, "split")
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
    torch = load_torch()
    t = x[0]
    if c.opset < 10:
        starts, ends, axes, steps = n.attr("starts"), n.attr("ends"), n.attr("axes"), None
    else:
        starts, ends = int_list(x[1]), int_list(x[2])
        axes = int_list(x[3]) if len(x) > 3 and x[3] is not None else None
        steps = int_list(x[4]) if len(x) > 4 and x[4] is not None else None
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = pos_axis(a, t.dim())
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
    a = pos_axis(n.attr("axis", 0), t.dim())
    i = idx.to(t.device).long()
    i = i.where(i >= 0, i + t.shape[a])
    out = t.index_select(a, i.reshape(-1))
    return [out.reshape(tuple(t.shape[:a]) + tuple(idx.shape) + tuple(t.shape[a + 1 :]))]


def _gather_elements(c, n, x):
    torch = load_torch()
    t, idx = x
    a = pos_axis(n.attr("axis", 0), t.dim())
    i = idx.long()
    i = i.where(i >= 0, i + t.shape[a])
    return [torch.gather(t, a, i)]


def _expand(c, n, x):
    torch = load_torch()
    t = x[0]
    shape = torch.broadcast_shapes(tuple(t.shape), tuple(int_list(x[1])))
    return [t.expand(shape)]


def _tile(c, n, x):
    return [x[0].repeat(int_list(x[1]))]


def _where(c, n, x):
    torch = load_torch()
    return [torch.where(x[0].bool(), x[1], x[2])]


def _range(c, n, x):
    torch = load_torch()
    start, limit, delta = (v.reshape(()).item() for v in x)
    count = max(math.ceil((limit - start) / delta), 0)
    return [(start + torch.arange(count, device=c.device, dtype=torch.float64) * delta).to(x[0].dtype)
            if x[0].is_floating_point() else
            torch.arange(count, device=c.device, dtype=x[0].dtype) * delta + start]


def _pad(c, n, x):
    torch = load_torch()
    F = torch.nn.functional
    t = x[0]
    r = t.dim()
    mode = n.attr("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if c.opset < 11:
        pads, value, axes = list(n.attr("pads")), n.attr("value", 0.0), None
    else:
        pads = int_list(x[1])
        value = x[2].reshape(-1)[0].item() if len(x) > 2 and x[2] is not None and x[2].numel() else 0
        axes = int_list(x[3]) if len(x) > 3 and x[3] is not None else None
    axes = list(range(r)) if axes is None else [pos_axis(a, r) for a in axes]
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


def _cumsum(c, n, x):
    t = x[0]
    a = pos_axis(int(x[1].reshape(()).item()), t.dim())
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


def layout_ops() -> dict[str, Callable]:
    """This module's part of the op table: op type -> torch function."""
    return {
        "Constant": _constant,
        "ConstantOfShape": _constant_of_shape,
        "Shape": _shape,
        "Size": _size,
        "Range": _range,
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
    }
