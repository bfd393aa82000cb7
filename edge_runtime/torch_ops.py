"""The ONNX -> torch op table the interpreter runs (`ops()`: op type -> torch function), and its math ops.

Elementwise ops (numpy broadcasting), casts, linear algebra, convolution, normalisation, reductions;
the shape / layout / indexing ops are in torch_layout_ops. Each function follows the ONNX spec at
the graph's opset and is differentiable wherever torch is, so autograd flows through the graph.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .ort_trainer import TrainingError
from .torch_layout_ops import axes_arg, layout_ops, load_torch, pos_axis, torch_dtype


def _binary(fn):
    return lambda c, n, x: [fn(x[0], x[1])]


def _unary(fn):
    return lambda c, n, x: [fn(x[0])]


def _div(a, b):
    torch = load_torch()
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")  # C integer division, as ONNX Runtime
    return a / b


def _pow(a, b):
    out = a**b
    return out if out.dtype == a.dtype else out.to(a.dtype)  # ONNX: the base's type


def _mod(c, n, x):
    torch = load_torch()
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


def _matmul(c, n, x):
    torch = load_torch()
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
        torch = load_torch()
        t = x[0]
        fn = torch.softmax if kind == "softmax" else torch.log_softmax
        if c.opset >= 13:
            return [fn(t, dim=pos_axis(n.attr("axis", -1), t.dim()))]
        a = pos_axis(n.attr("axis", 1), t.dim())  # opset < 13: coerced to 2-D at axis
        lead = int(np.prod(t.shape[:a], dtype=np.int64)) if a else 1
        return [fn(t.reshape(lead, -1), dim=1).reshape(t.shape)]

    return run


def _reduce(kind: str, axes_input_since: int = 18):
    def run(c, n, x):
        torch = load_torch()
        t = x[0]
        keep = bool(n.attr("keepdims", 1))
        axes = axes_arg(c, n, x, axes_input_since)
        if not axes:
            if (axes is not None or c.opset >= axes_input_since) and n.attr("noop_with_empty_axes", 0):
                return [t]
            axes = list(range(t.dim()))
        axes = sorted({pos_axis(a, t.dim()) for a in axes})
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
        torch = load_torch()
        t = x[0]
        a = pos_axis(n.attr("axis", 0), t.dim())
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
    torch = load_torch()
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


def _layer_norm(c, n, x):
    t, scale = x[0], x[1]
    bias = x[2] if len(x) > 2 else None
    a = pos_axis(n.attr("axis", -1), t.dim())
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
    torch = load_torch()
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
    torch = load_torch()
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
    torch = load_torch()
    eq = n.attr("equation")
    return [torch.einsum(eq.decode() if isinstance(eq, bytes) else eq, *x)]


def _gelu(c, n, x):
    torch = load_torch()
    approx = n.attr("approximate", b"none")
    approx = approx.decode() if isinstance(approx, bytes) else approx
    return [torch.nn.functional.gelu(x[0], approximate=approx)]


def _simplified_layer_norm(c, n, x):
    """ORT's SimplifiedLayerNormalization (RMS norm; in the default domain in ORT's registry)."""
    t, scale = x[0], x[1]
    a = pos_axis(n.attr("axis", -1), t.dim())
    dims = list(range(a, t.dim()))
    inv = ((t * t).mean(dim=dims, keepdim=True) + n.attr("epsilon", 1e-5)).rsqrt()
    return [t * inv * scale, inv][: len(n.outputs)]


def _build_ops() -> dict[str, Callable]:
    torch = load_torch()
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
        **layout_ops(),  # constants, shapes, layout, indexing
    }


_OPS: dict[str, Callable] | None = None


def ops() -> dict[str, Callable]:
    """The supported op types (default ONNX domain) -> their torch functions."""
    global _OPS
    if _OPS is None:
        _OPS = _build_ops()
    return _OPS

