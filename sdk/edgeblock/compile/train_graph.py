"""The tanh GELU of the training graph: one com.microsoft FastGelu for ONNX Runtime's gradient, plain ops for eval.

The training export emits FastGelu (export_patches.gelu_fused) so that ORT's gradient graph keeps only the
GELU's input for backward (FastGeluGrad) instead of the intermediates of a decomposed GELU. eval_model.onnx,
which the torch trainer backend interprets with default-domain ops only, gets the same function back as
x * sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3)) (decompose_fast_gelu). Measured figures: docs/compile.md.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

MS_DOMAIN = "com.microsoft"
TANH_GELU_K = 2.0 * (2.0 / np.pi) ** 0.5  # 0.5 (1 + tanh(z)) = sigmoid(2 z)
TANH_GELU_C = 0.044715


def _const(name: str, value: float) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=name, value=helper.make_tensor(name, onnx.TensorProto.FLOAT, [], [value]))


def _sigmoid_form(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """FastGelu(x[, bias]) as default-domain nodes with the same output name."""
    p = (node.name or node.output[0]) + "/gelu"
    x = node.input[0]
    nodes = []
    if len(node.input) > 1 and node.input[1]:
        nodes.append(helper.make_node("Add", [x, node.input[1]], [p + "/x"], name=p + "/bias"))
        x = p + "/x"
    nodes += [
        _const(p + "/c", TANH_GELU_C),
        _const(p + "/k", TANH_GELU_K),
        helper.make_node("Mul", [x, x], [p + "/x2"], name=p + "/mul_x2"),
        helper.make_node("Mul", [p + "/x2", x], [p + "/x3"], name=p + "/mul_x3"),
        helper.make_node("Mul", [p + "/x3", p + "/c"], [p + "/cx3"], name=p + "/mul_c"),
        helper.make_node("Add", [x, p + "/cx3"], [p + "/inner"], name=p + "/add"),
        helper.make_node("Mul", [p + "/inner", p + "/k"], [p + "/z"], name=p + "/mul_k"),
        helper.make_node("Sigmoid", [p + "/z"], [p + "/s"], name=p + "/sigmoid"),
        helper.make_node("Mul", [x, p + "/s"], [node.output[0]], name=p + "/mul_out"),
    ]
    return nodes


def decompose_fast_gelu(model: onnx.ModelProto) -> int:
    """Replace every com.microsoft FastGelu of the main graph by its default-domain form (in place); drop the
    com.microsoft opset import when no node of that domain is left. Returns how many were replaced."""
    g = model.graph
    out: list[onnx.NodeProto] = []
    count = 0
    for n in g.node:
        if n.op_type == "FastGelu" and n.domain == MS_DOMAIN:
            out += _sigmoid_form(n)
            count += 1
        else:
            out.append(n)
    if not count:
        return 0
    del g.node[:]
    g.node.extend(out)
    if not any(n.domain == MS_DOMAIN for n in g.node):
        kept = [o for o in model.opset_import if o.domain != MS_DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(kept)
    return count
