"""Building a bundle's engines with the TensorRT 10 builder: parse each frozen group's ONNX file, add its
optimisation profiles, set precision (fp16, or strict fp32 without TF32), refit and the workspace limit,
reuse the timing cache, and write the engines to the cache and the record to `engines/built.json`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from ..fileio import atomic_json, atomic_write, sha256_file
from .cache import _rel_or_abs, cache_key, default_cache_dir, engine_file, timing_cache_file
from .errors import EngineError
from .plan import BUILT, PLAN_VERSION, _bundle_path, _profile_names, _stem, build_settings, load_plan
from .trt_cuda import _logger, _require_tensorrt, gpu_name


def _build_one(trt, logger, onnx_path: str, rel: str, group: Mapping[str, Any], workspace_bytes: int | None,
               timing_blob: bytes) -> tuple[bytes, bytes, bool]:
    """Serialized engine, the updated timing cache, and whether the old timing cache was accepted."""
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    onnx_path = os.path.abspath(onnx_path)
    ok = parser.parse_from_file(onnx_path)  # resolves external data beside the file (no chdir: thread-safe)
    if not ok:
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineError(f"{rel}: TensorRT's ONNX parser failed with {len(errors)} error(s):\n  " + "\n  ".join(errors))

    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if group["precision"] in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
        if group["precision"] == "int8":  # explicit weight-only quantization: DequantizeLinear of int8 weights
            config.set_flag(trt.BuilderFlag.INT8)
    else:
        # fp32 means fp32: TF32 matmuls (on by default on Ampere, i.e. Orin) cost ~1e-3 relative error
        config.clear_flag(trt.BuilderFlag.TF32)
    if group["refittable"]:
        config.set_flag(trt.BuilderFlag.REFIT)

    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    for pname in _profile_names(group):
        shapes = group["profiles"][pname]
        missing, extra = sorted(set(inputs) - set(shapes)), sorted(set(shapes) - set(inputs))
        if missing or extra:
            raise EngineError(f"{rel}: profile {pname!r} does not match the graph's inputs {inputs} "
                              f"(missing {missing}, unknown {extra}): the plan is not for this ONNX file")
        profile = builder.create_optimization_profile()
        for name in inputs:
            s = shapes[name]
            profile.set_shape(name, s["min"], s["opt"], s["max"])
        if config.add_optimization_profile(profile) < 0:
            raise EngineError(f"{rel}: TensorRT refused profile {pname!r}: " + "; ".join(logger.errors[-3:]))

    try:
        cache = config.create_timing_cache(timing_blob)
        accepted = cache is not None and bool(config.set_timing_cache(cache, False))
    except Exception:  # noqa: BLE001 - an unreadable cache file is no reason to fail the build
        accepted = False
    if not accepted:  # a cache of another TensorRT version or GPU: start a fresh one
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        detail = "; ".join(logger.errors[-5:]) or "no error message from TensorRT"
        raise EngineError(f"{rel}: TensorRT failed to build the engine: {detail}")
    timing = bytes(memoryview(config.get_timing_cache().serialize()))
    return bytes(memoryview(serialized)), timing, accepted or not timing_blob


def _say(progress: Callable[[str], None] | None, msg: str) -> None:
    if progress is not None:
        progress(f"[engines] {msg}")


def build_engines(bundle_dir: str, cache_dir: str | None = None, workspace_bytes: int | None = None,
                  progress: Callable[[str], None] | None = print, force: bool = False) -> dict:
    """Build (or reuse from the cache) one engine per frozen group of the plan; write engines/built.json.

    Returns the built.json record. Raises EngineError without TensorRT, for a bad plan, an ONNX file that
    does not match the plan's sha256, parser errors (all of them listed) or a failed build."""
    plan = load_plan(bundle_dir)
    if workspace_bytes is not None and workspace_bytes <= 0:
        raise EngineError(f"the workspace limit must be positive, got {workspace_bytes} bytes")
    trt = _require_tensorrt()
    trt_version, gpu = str(trt.__version__), gpu_name()
    cache_dir = os.path.abspath(cache_dir) if cache_dir else default_cache_dir(bundle_dir)
    os.makedirs(cache_dir, exist_ok=True)
    timing_path = timing_cache_file(bundle_dir, plan, cache_dir)
    timing_blob = b""
    if os.path.isfile(timing_path):
        with open(timing_path, "rb") as f:
            timing_blob = f.read()
    logger = _logger(trt)
    _say(progress, f"TensorRT {trt_version} on {gpu}: {len(plan['groups'])} group(s), cache {cache_dir}")

    records = []
    for g in plan["groups"]:
        rel, stem = g["onnx"], _stem(g)
        onnx_path = _bundle_path(bundle_dir, rel)
        if not os.path.isfile(onnx_path):
            raise EngineError(f"{bundle_dir}: {rel} named in the plan is missing")
        sha = sha256_file(onnx_path)
        if sha != g["onnx_sha256"]:
            raise EngineError(f"{rel}: sha256 {sha[:12]}... differs from the plan's {g['onnx_sha256'][:12]}...: "
                              "the bundle is corrupt, compile it again")
        key = cache_key(trt_version, gpu, sha, build_settings(g))
        path = engine_file(cache_dir, g, key)
        profiles = _profile_names(g)
        if os.path.isfile(path) and not force:
            _say(progress, f"{stem}: cached {os.path.basename(path)}")
            seconds, cached = 0.0, True
        else:
            _say(progress, f"{stem}: building ({g['precision']}, profiles {', '.join(profiles)}"
                           f"{', refittable' if g['refittable'] else ''}) ...")
            logger.errors.clear()
            t0 = time.perf_counter()
            blob, timing_blob, accepted = _build_one(trt, logger, onnx_path, rel, g, workspace_bytes, timing_blob)
            seconds, cached = time.perf_counter() - t0, False
            if not accepted:
                _say(progress, f"{stem}: the timing cache at {timing_path} was made by another TensorRT or GPU; replaced")
            atomic_write(path, blob)
            atomic_write(timing_path, timing_blob)
            _say(progress, f"{stem}: built in {seconds:.1f} s -> {path} ({len(blob) / 2**20:.1f} MiB)")
        records.append({
            "onnx": rel,
            "onnx_sha256": sha,
            "engine": _rel_or_abs(bundle_dir, path),
            "key": key,
            "build_s": round(seconds, 3),
            "cached": cached,
            "profiles": profiles,
            "precision": g["precision"],
            "refittable": bool(g["refittable"]),
        })

    built = {
        "version": PLAN_VERSION,
        "status": "built",
        "tensorrt_version": trt_version,
        "gpu_name": gpu,
        "cache_dir": _rel_or_abs(bundle_dir, cache_dir),
        "timing_cache": _rel_or_abs(bundle_dir, timing_path),
        "workspace_bytes": workspace_bytes,
        "groups": records,
    }
    atomic_json(_bundle_path(bundle_dir, BUILT), built)
    _say(progress, f"done: {sum(not r['cached'] for r in records)} built, {sum(r['cached'] for r in records)} cached "
                   f"-> {BUILT}")
    return built
