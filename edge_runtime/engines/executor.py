"""Running a built engine as a frozen group: `TrtGroup` loads one engine on one optimisation profile
("training" or "generation"), copies numpy inputs to the GPU with cuda-python, runs it and returns the
outputs by name, like an ONNX Runtime session of the same group.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import EngineError
from .plan import PROFILE_ORDER, _profile_names, _stem, load_plan
from .status import engines_status, load_built
from .trt_cuda import _cuda, _cudart, _logger, _require_tensorrt


def _np_dtype(trt, dt) -> np.dtype:
    table = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64, "INT8": np.int8,
             "UINT8": np.uint8, "BOOL": np.bool_}
    for name, np_type in table.items():
        if hasattr(trt.DataType, name) and dt == getattr(trt.DataType, name):
            return np.dtype(np_type)
    raise EngineError(f"engine tensor type {dt} has no numpy equivalent (bf16/fp8/int4 are not used by edgeblock graphs)")


class TrtGroup:
    """One built engine of a frozen group, on one optimisation profile ("training" or "generation").

        with TrtGroup(path, "generation") as g:
            outs = g.run({"state.image": x, ...})

    Device buffers grow to the largest shapes run so far and are freed by close()."""

    def __init__(self, engine_path: str, profile: str = "generation", profiles: tuple[str, ...] | list[str] = PROFILE_ORDER):
        self._closed = True
        trt = _require_tensorrt()
        self._trt, self._cudart = trt, _cudart()
        if not os.path.isfile(engine_path):
            raise EngineError(f"{engine_path}: no such engine file (run `edgeblock build-engines`)")
        profiles = list(profiles)
        if profile not in profiles:
            raise EngineError(f"profile {profile!r} is not one of the engine's {profiles}")
        self.path, self.profile, self.profile_index = engine_path, profile, profiles.index(profile)
        self._logger = _logger(trt)
        self._runtime = trt.Runtime(self._logger)
        with open(engine_path, "rb") as f:
            self._engine = self._runtime.deserialize_cuda_engine(f.read())
        if self._engine is None:
            raise EngineError(f"{engine_path}: TensorRT could not load the engine ("
                              + ("; ".join(self._logger.errors[-3:]) or "built by another TensorRT version or GPU?")
                              + "): rebuild it with `edgeblock build-engines --force`")
        if self.profile_index >= self._engine.num_optimization_profiles:
            raise EngineError(f"{engine_path} has {self._engine.num_optimization_profiles} optimisation profile(s), "
                              f"profile {profile!r} is number {self.profile_index}")
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise EngineError(f"{engine_path}: TensorRT could not create an execution context (out of GPU memory?)")
        self._mem: dict[str, tuple[int, int]] = {}  # tensor name -> (device pointer, bytes)
        self._stream = _cuda(self._cudart, self._cudart.cudaStreamCreate())
        self._closed = False
        try:
            self._describe(engine_path)
        except BaseException:
            self.close()
            raise

    def _describe(self, engine_path: str) -> None:
        trt = self._trt
        if not self._context.set_optimization_profile_async(self.profile_index, int(self._stream)):
            raise EngineError(f"{engine_path}: TensorRT refused optimisation profile {self.profile_index} ({self.profile})")
        _cuda(self._cudart, self._cudart.cudaStreamSynchronize(self._stream))
        self.inputs: dict[str, dict[str, Any]] = {}
        self.outputs: dict[str, np.dtype] = {}
        for i in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(i)
            dtype = _np_dtype(trt, self._engine.get_tensor_dtype(name))
            if self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                mn, opt, mx = (tuple(int(d) for d in s) for s in self._engine.get_tensor_profile_shape(name, self.profile_index))
                self.inputs[name] = {"dtype": dtype, "min": mn, "opt": opt, "max": mx}
            else:
                self.outputs[name] = dtype

    @classmethod
    def from_bundle(cls, bundle_dir: str, group: int | str, profile: str = "generation") -> TrtGroup:
        """The engine of a bundle's frozen group (index into the plan, ONNX path or stem) from built.json;
        EngineError with engines_status's reason when the engines are not built for this machine."""
        status = engines_status(bundle_dir)
        if status["backend"] != "tensorrt":
            raise EngineError(status["reason"])
        plan = load_plan(bundle_dir)
        if isinstance(group, int):
            if not 0 <= group < len(plan["groups"]):
                raise EngineError(f"group {group} out of range: the plan has {len(plan['groups'])}")
            g = plan["groups"][group]
        else:
            found = [g for g in plan["groups"] if group in (g["onnx"], _stem(g))]
            if not found:
                raise EngineError(f"no group {group!r} in the plan ({[g['onnx'] for g in plan['groups']]})")
            g = found[0]
        record = next(r for r in load_built(bundle_dir)["groups"] if r["onnx"] == g["onnx"])
        return cls(status["engines"][g["onnx"]], profile, record.get("profiles") or _profile_names(g))

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._mem.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                _cuda(self._cudart, self._cudart.cudaFree(ptr))
                del self._mem[name]
            ptr = int(_cuda(self._cudart, self._cudart.cudaMalloc(max(nbytes, 1))))
            self._mem[name] = (ptr, max(nbytes, 1))
        return ptr

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name for the inputs by name (cast to the engine's input types; extra feeds ignored)."""
        if self._closed:
            raise EngineError(f"{self.path}: the engine was closed")
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise EngineError(f"engine inputs {missing} not in the feeds (have {sorted(feeds)})")
        cudart, ctx, stream = self._cudart, self._context, self._stream
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        host_in = {}
        for name, spec in self.inputs.items():
            arr = np.ascontiguousarray(feeds[name], dtype=spec["dtype"])
            if arr.ndim != len(spec["min"]) or not all(a <= d <= b for a, d, b in zip(spec["min"], arr.shape, spec["max"])):
                raise EngineError(f"input {name!r} has shape {list(arr.shape)}, outside the {self.profile} profile "
                                  f"{list(spec['min'])}..{list(spec['max'])}")
            if not ctx.set_input_shape(name, arr.shape):
                raise EngineError(f"TensorRT refused shape {list(arr.shape)} for input {name!r}")
            ptr = self._buffer(name, arr.nbytes)
            if arr.nbytes:
                _cuda(cudart, cudart.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes, h2d, stream))
            ctx.set_tensor_address(name, ptr)
            host_in[name] = arr  # alive until the stream is synchronised
        outs = {}
        for name, dtype in self.outputs.items():
            shape = tuple(int(d) for d in ctx.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise EngineError(f"output {name!r} has a data-dependent shape {list(shape)}: not supported")
            out = np.empty(shape, dtype)
            ctx.set_tensor_address(name, self._buffer(name, out.nbytes))
            outs[name] = out
        if not ctx.execute_async_v3(int(stream)):
            raise EngineError(f"{self.path}: TensorRT execution failed: " + "; ".join(self._logger.errors[-3:]))
        for name, out in outs.items():
            if out.nbytes:
                _cuda(cudart, cudart.cudaMemcpyAsync(out.ctypes.data, self._mem[name][0], out.nbytes, d2h, stream))
        _cuda(cudart, cudart.cudaStreamSynchronize(stream))
        del host_in
        return outs

    def close(self) -> None:
        """Free the device buffers, the stream, the context and the engine; idempotent."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        cudart = self._cudart
        with contextlib.suppress(Exception):
            cudart.cudaStreamSynchronize(self._stream)
        for ptr, _ in self._mem.values():
            with contextlib.suppress(Exception):
                cudart.cudaFree(ptr)
        self._mem.clear()
        with contextlib.suppress(Exception):
            cudart.cudaStreamDestroy(self._stream)
        self._context = None  # context before engine before runtime
        self._engine = None
        self._runtime = None

    def __enter__(self) -> TrtGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()
