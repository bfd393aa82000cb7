"""An ONNX graph run on torch tensors: read with the `onnx` package, walked node by node.

OnnxGraph holds what the walk needs (nodes in topological order, initializers as torch tensors, input /
output names, the default-domain opset); Interpreter runs it with the op table of torch_ops, so autograd
flows through every float op. onnx and torch are imported on first use, never by importing this module.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from .ort_trainer import TrainingError
from .torch_layout_ops import OpContext, load_torch, torch_dtype
from .torch_ops import ops

# TensorProto.DataType codes read here: float, uint8, int8, uint16, int16, int32, int64, bool, float16,
# double, uint32, uint64, bfloat16 (strings, float8 and int4 are not).
_READABLE = {1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 16}
_BFLOAT16 = 16


class OnnxFormatError(TrainingError):
    pass


class UnsupportedOp(TrainingError):
    pass


def _onnx():
    try:
        import onnx
    except ImportError as e:
        raise TrainingError("the torch trainer backend reads graphs with the onnx package "
                            "(pip install onnx==1.17.0, as in deploy/requirements-edge.txt)") from e
    return onnx


def _to_torch(t, base_dir: str):
    """TensorProto -> torch tensor (CPU), its external data read from base_dir."""
    torch = load_torch()
    from onnx import numpy_helper
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    name = t.name or "?"
    if t.data_type not in _READABLE:
        raise OnnxFormatError(f"tensor {name}: data type {t.data_type} is not supported")
    try:
        if t.data_type == _BFLOAT16:  # bit patterns in raw_data or int32_data; numpy has no bfloat16
            if uses_external_data(t):
                load_external_data_for_tensor(t, base_dir)
            bits = np.frombuffer(t.raw_data, "<u2") if t.raw_data else np.asarray(t.int32_data, np.uint32)
            f32 = (bits.astype(np.uint32) << 16).view(np.float32).reshape(tuple(t.dims))
            return torch.from_numpy(f32.copy()).to(torch.bfloat16)
        a = numpy_helper.to_array(t, base_dir)
    except (ValueError, OSError) as e:
        raise OnnxFormatError(f"tensor {name}: {e}") from e
    return torch.from_numpy(np.array(a, dtype=a.dtype.newbyteorder("="), copy=True)).to(torch_dtype(t.data_type))


class _Unsupported:
    """An attribute the interpreter cannot use; refused (with `msg`) when an Interpreter is built."""

    def __init__(self, msg: str):
        self.msg = msg


def _attribute(a, base_dir: str) -> Any:
    """AttributeProto -> python value: float, int, bytes, torch tensor, or a list of one of them."""
    from onnx import AttributeProto as A
    from onnx import helper

    if a.ref_attr_name:
        return _Unsupported(f"attribute {a.name or '?'}: references to function attributes are not supported")
    if a.type == A.TENSOR:
        return _to_torch(a.t, base_dir)
    if a.type == A.TENSORS:
        return [_to_torch(t, base_dir) for t in a.tensors]
    if a.type in (A.GRAPH, A.GRAPHS, A.SPARSE_TENSOR, A.SPARSE_TENSORS, A.TYPE_PROTO, A.TYPE_PROTOS):
        return _Unsupported(f"attribute {a.name or '?'}: graph / sparse / type attributes are not supported")
    return helper.get_attribute_value(a)


class Node:
    """One graph node: op type, domain, name, input / output value names ("" for an omitted optional one)
    and attributes by name."""

    __slots__ = ("attrs", "domain", "inputs", "name", "op_type", "outputs")

    def __init__(self, op_type, domain, name, inputs, outputs, attrs):
        self.op_type, self.domain, self.name = op_type, domain, name
        self.inputs, self.outputs, self.attrs = inputs, outputs, attrs

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)

    def __repr__(self) -> str:
        return f"{self.op_type}({self.name or self.outputs[0] if self.outputs else ''})"


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
        """An .onnx file; tensors stored as external data are read from beside it."""
        onnx = _onnx()
        try:
            model = onnx.load(path)
        except OSError:
            raise  # a missing or unreadable file (or its external data) is not a format error
        except Exception as e:  # protobuf's DecodeError and the like
            raise OnnxFormatError(f"{path} is not an ONNX model ({type(e).__name__}: {e})") from e
        return cls.from_model(model, os.path.dirname(os.path.abspath(path)))

    @classmethod
    def parse(cls, data: bytes, base_dir: str = ".") -> OnnxGraph:
        """A serialized ModelProto; external data (if any) is read from base_dir."""
        onnx = _onnx()
        try:
            model = onnx.load_model_from_string(data)
        except Exception as e:
            raise OnnxFormatError(f"not an ONNX model ({type(e).__name__}: {e})") from e
        return cls.from_model(model, base_dir)

    @classmethod
    def from_model(cls, model, base_dir: str = ".") -> OnnxGraph:
        """An onnx.ModelProto (tensors left as external data are read from base_dir)."""
        if not model.HasField("graph"):
            raise OnnxFormatError("not an ONNX model: no graph")
        g = model.graph
        if len(g.sparse_initializer):
            raise OnnxFormatError("sparse initializers are not supported")
        opset = 1
        for o in model.opset_import:
            if o.domain in ("", "ai.onnx"):
                opset = int(o.version)
        nodes = [Node(n.op_type, n.domain, n.name, list(n.input), list(n.output),
                      {a.name: _attribute(a, base_dir) for a in n.attribute}) for n in g.node]
        inits = {t.name: _to_torch(t, base_dir) for t in g.initializer}
        return cls(nodes, inits, [i.name for i in g.input], [o.name for o in g.output], opset, int(model.ir_version))


class Interpreter:
    """Runs an OnnxGraph on torch tensors (autograd flows through every float op)."""

    def __init__(self, graph: OnnxGraph, device="cpu"):
        torch = load_torch()
        self.graph = graph
        self.device = torch.device(device)
        self.ctx = OpContext(graph.opset, self.device)
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
