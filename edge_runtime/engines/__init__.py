"""TensorRT engines for a bundle's frozen groups: build them on the device, cache them, load and run them.

`edgeblock compile` writes `engines/plan.json` (data only: per frozen group the
ONNX file and its sha256, the training and generation optimisation profiles,
the precision, refittable). An engine is specific to the TensorRT version and
the GPU, so it is built where both are (the Jetson at first start, or a host
of the same platform) by `build_engines` / `edgeblock build-engines`, and
cached under a key of TensorRT version + GPU + ONNX sha256 (+ the group's build
settings), so an engine is never reused across any of them.

Written against the TensorRT 10 Python API (JetPack 6) and cuda-python for
device memory. Both are imported lazily: importing this package needs neither,
and it never imports torch.

Modules: plan (engines/plan.json), cache (cache keys and layout), trt_cuda
(TensorRT and CUDA, lazily), build (the builder, built.json), status (which
backend runs the frozen groups here), executor (TrtGroup runs one engine),
errors (EngineError). This package re-exports the names other code uses.
"""

from __future__ import annotations

from .build import build_engines
from .cache import _rel_or_abs  # noqa: F401 - package-internal, checked directly by tests/device/test_engines.py
from .cache import cache_key, default_cache_dir, engine_file, timing_cache_file
from .errors import EngineError
from .executor import TrtGroup
from .plan import _profile_names  # noqa: F401 - package-internal, checked directly by tests/device/test_engines.py
from .plan import BUILT, CACHE_DIR, PLAN, PLAN_VERSION, PRECISIONS, PROFILE_ORDER, build_settings, load_plan, validate_plan
from .status import engines_status, load_built
from .trt_cuda import NO_TENSORRT, gpu_name, tensorrt_available

__all__ = [
    "BUILT", "CACHE_DIR", "NO_TENSORRT", "PLAN", "PLAN_VERSION", "PRECISIONS", "PROFILE_ORDER", "EngineError",
    "TrtGroup", "build_engines", "build_settings", "cache_key", "default_cache_dir", "engine_file", "engines_status",
    "gpu_name", "load_built", "load_plan", "tensorrt_available", "timing_cache_file", "validate_plan",
]
