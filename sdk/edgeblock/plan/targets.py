"""Devices the planner plans for: how much memory a job can use there and what the runtimes cost.

Jetson modules share one LPDDR pool between CPU and GPU, so a process's host and device
allocations come out of the same bytes. `os_reserved_bytes` is what L4T keeps on a headless
board (firmware carveouts + kernel + system services, no desktop); `daemon_runtime_bytes` and
`torch_runtime_bytes` are a process's fixed cost (Python, libraries, CUDA context, cuBLAS/cuDNN
and TensorRT kernels) before any model tensor. For `host-cpu` both are measured on this
workstation (the calibration); for the Jetson targets they are estimates, not measurements: no
Jetson was available to this project (docs/plan.md says so).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from edge_runtime.targets import HOST_CPU, JETSONS, GiB

MiB = 2**20


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    total_bytes: int
    os_reserved_bytes: int
    daemon_runtime_bytes: int  # the edge daemon process before any model tensor
    torch_runtime_bytes: int  # a torch training process (the standard-LoRA reference) before any model tensor
    weight_bytes: int  # bytes per parameter of frozen weights at inference (TensorRT FP16 on Jetson)
    activation_bytes: int  # bytes per activation element at inference
    gpu: bool
    measured: bool  # True: the runtime costs were measured on this target

    @property
    def usable_bytes(self) -> int:
        return self.total_bytes - self.os_reserved_bytes

    def as_json(self) -> dict:
        return {**asdict(self), "usable_bytes": self.usable_bytes}


def _host_total() -> int:
    from edge_runtime.memstat import meminfo_bytes

    return meminfo_bytes("MemTotal") or 16 * GiB


# Jetson estimates: 0.9 GiB headless L4T (r36) + carveouts; a daemon with ONNX Runtime's CUDA and
# TensorRT providers ~1.0 GiB once the CUDA context and kernels are loaded; a torch CUDA process ~1.5 GiB.
_JETSON_OS = int(0.9 * GiB)
_JETSON_DAEMON = int(1.0 * GiB)
_JETSON_TORCH = int(1.5 * GiB)


def targets() -> dict[str, Target]:
    """Every target the planner predicts for (edge_runtime.targets.PLAN_TARGETS), in that order."""
    from .calibration import HOST_CPU as HOST_CAL

    host = Target(HOST_CPU, f"this machine's CPU ({os.cpu_count()} cores): ONNX Runtime CPU provider, "
                  "torch CPU, fp32 (the calibration host)", _host_total(), 0,
                  HOST_CAL.daemon_base_bytes, HOST_CAL.torch_base_bytes, 4, 4, False, True)
    jetsons = {b.name: Target(b.name, b.description, b.memory_bytes, _JETSON_OS, _JETSON_DAEMON, _JETSON_TORCH,
                              2, 2, b.gpu, False) for b in JETSONS.values()}
    return {HOST_CPU: host, **jetsons}


def get_target(name: str) -> Target:
    t = targets()
    if name not in t:
        raise ValueError(f"unknown target {name!r}; choose one of: {', '.join(t)}")
    return t[name]
