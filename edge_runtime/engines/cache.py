"""Where built engines live: the cache key (TensorRT version + GPU + ONNX sha256 + build settings) and the
cache layout (`<cache>/<group stem>-<key[:16]>.engine`, the timing cache beside them), so an engine is never
reused across another TensorRT, GPU, ONNX file or build setting.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

from .plan import CACHE_DIR, TIMING_CACHE, _bundle_path, _stem


def cache_key(trt_version: str, gpu_name: str, onnx_sha256: str, settings: Mapping[str, Any] | None = None) -> str:
    """sha256 hex of TensorRT version, GPU name and ONNX sha256 (and, when given, the group's build
    settings: the same ONNX file with another precision or other profiles is another engine)."""
    parts = [str(trt_version), str(gpu_name), str(onnx_sha256)]
    if settings is not None:
        parts.append(json.dumps(settings, sort_keys=True, separators=(",", ":")))
    return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()


def default_cache_dir(bundle_dir: str) -> str:
    return _bundle_path(bundle_dir, CACHE_DIR)


def engine_file(cache_dir: str, group: Mapping[str, Any], key: str) -> str:
    """`<cache_dir>/<group stem>-<key[:16]>.engine`."""
    return os.path.join(cache_dir, f"{_stem(group)}-{key[:16]}.engine")


def timing_cache_file(bundle_dir: str, plan: Mapping[str, Any], cache_dir: str) -> str:
    """The persistent timing cache: the plan's `timing_cache` (default `engines/timing.cache`) for the bundle's
    own cache directory, `<cache_dir>/timing.cache` for any other."""
    if os.path.abspath(cache_dir) == os.path.abspath(default_cache_dir(bundle_dir)):
        return _bundle_path(bundle_dir, plan.get("timing_cache") or TIMING_CACHE)
    return os.path.join(cache_dir, "timing.cache")


def _rel_or_abs(bundle_dir: str, path: str) -> str:
    """Paths inside the bundle are recorded relative to it (POSIX), others absolute."""
    b, p = os.path.abspath(bundle_dir), os.path.abspath(path)
    if os.path.commonpath([b, p]) == b:
        return os.path.relpath(p, b).replace(os.sep, "/")
    return p


def _resolve(bundle_dir: str, path: str) -> str:
    return path if os.path.isabs(path) else _bundle_path(bundle_dir, path)
