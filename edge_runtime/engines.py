"""TensorRT engines for a bundle's frozen groups: build them on the device, cache them, load and run them.

`edgeblock compile` writes `engines/plan.json` (data only: per frozen group the
ONNX file and its sha256, the training and generation optimisation profiles,
the precision, refittable). An engine is specific to the TensorRT version and
the GPU, so it is built where both are (the Jetson at first start, or a host
of the same platform) by `build_engines` / `edgeblock build-engines`, and
cached under a key of TensorRT version + GPU + ONNX sha256 (+ the group's build
settings), so an engine is never reused across any of them.

Written against the TensorRT 10 Python API (JetPack 6) and cuda-python for
device memory. Both are imported lazily: importing this module needs neither,
and it never imports torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .fileio import atomic_json, atomic_write, sha256_file

PLAN = "engines/plan.json"
BUILT = "engines/built.json"
CACHE_DIR = "engines/cache"
PLAN_VERSION = 1
PRECISIONS = ("fp32", "fp16")
PROFILE_ORDER = ("training", "generation")

NO_TENSORRT = (
    "TensorRT is not available here ({why}). Build the engines on the device with TensorRT "
    "(JetPack 6 ships it with its Python bindings, plus `pip install cuda-python`), or on a host of the "
    "same platform. Without engines the bundle runs as it is: its frozen groups run on ONNX Runtime."
)


class EngineError(ValueError):
    """A plan, engine or build that cannot be used: the message says which file and why."""


# ---------------------------------------------------------------------------------------------
# The plan written by `edgeblock compile`
# ---------------------------------------------------------------------------------------------
def _bundle_path(bundle_dir: str, rel: str) -> str:
    return os.path.join(bundle_dir, *rel.split("/"))


def _check_shapes(where: str, name: str, s: Any) -> None:
    if not isinstance(s, dict) or any(k not in s for k in ("min", "opt", "max")):
        raise EngineError(f"{where}: input {name!r} needs min, opt and max shapes, got {s!r}")
    mn, opt, mx = s["min"], s["opt"], s["max"]
    for label, dims in (("min", mn), ("opt", opt), ("max", mx)):
        if not isinstance(dims, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims):
            raise EngineError(f"{where}: input {name!r} {label} shape must be a list of non-negative ints, got {dims!r}")
    if not len(mn) == len(opt) == len(mx):
        raise EngineError(f"{where}: input {name!r} min/opt/max shapes differ in rank: {mn}, {opt}, {mx}")
    if not all(a <= b <= c for a, b, c in zip(mn, opt, mx)):
        raise EngineError(f"{where}: input {name!r} needs min <= opt <= max in every dimension: {mn}, {opt}, {mx}")


def validate_plan(plan: Any, path: str = PLAN) -> dict:
    """The plan's structure, checked field by field (EngineError naming the group and field)."""
    if not isinstance(plan, dict):
        raise EngineError(f"{path}: expected a JSON object, got {type(plan).__name__}")
    if plan.get("version") != PLAN_VERSION:
        raise EngineError(f"{path}: plan version {plan.get('version')!r} is not supported (this runtime reads {PLAN_VERSION})")
    groups = plan.get("groups")
    if not isinstance(groups, list):
        raise EngineError(f"{path}: 'groups' must be a list")
    seen = set()
    for i, g in enumerate(groups):
        where = f"{path} group {i}"
        if not isinstance(g, dict):
            raise EngineError(f"{where}: expected an object")
        missing = [k for k in ("onnx", "onnx_sha256", "profiles", "precision", "refittable") if k not in g]
        if missing:
            raise EngineError(f"{where}: missing fields {missing}")
        if not isinstance(g["onnx"], str) or not g["onnx"].endswith(".onnx"):
            raise EngineError(f"{where}: 'onnx' must be a relative path to an .onnx file, got {g['onnx']!r}")
        stem = _stem(g)
        if stem in seen:
            raise EngineError(f"{where}: two groups named {stem!r}")
        seen.add(stem)
        sha = g["onnx_sha256"]
        if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
            raise EngineError(f"{where}: 'onnx_sha256' must be 64 lowercase hex digits, got {sha!r}")
        if g["precision"] not in PRECISIONS:
            raise EngineError(f"{where}: precision {g['precision']!r} is not one of {PRECISIONS}")
        if not isinstance(g["refittable"], bool):
            raise EngineError(f"{where}: 'refittable' must be true or false")
        profiles = g["profiles"]
        if not isinstance(profiles, dict) or not profiles:
            raise EngineError(f"{where}: 'profiles' must map profile names to input shapes")
        for pname, shapes in profiles.items():
            if not isinstance(shapes, dict) or not shapes:
                raise EngineError(f"{where} profile {pname!r}: expected input name -> {{min, opt, max}}")
            for name, s in shapes.items():
                _check_shapes(f"{where} profile {pname!r}", name, s)
        if len({tuple(sorted(s)) for s in profiles.values()}) != 1:
            raise EngineError(f"{where}: the profiles name different inputs: "
                              + "; ".join(f"{p}: {sorted(s)}" for p, s in profiles.items()))
    return plan


def load_plan(bundle_dir: str) -> dict:
    """`engines/plan.json` of a compiled bundle, validated."""
    if not os.path.isdir(bundle_dir):
        raise EngineError(f"{bundle_dir}: no such bundle directory")
    path = _bundle_path(bundle_dir, PLAN)
    if not os.path.isfile(path):
        raise EngineError(f"{bundle_dir} has no {PLAN}: not a compiled bundle (run `edgeblock compile` first)")
    try:
        with open(path, encoding="utf-8") as f:
            plan = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineError(f"{path} is not valid JSON ({e}): the bundle is corrupt, compile it again")
    return validate_plan(plan, path)


def _stem(group: Mapping[str, Any]) -> str:
    return os.path.splitext(os.path.basename(group["onnx"]))[0]


def build_settings(group: Mapping[str, Any]) -> dict:
    """What of a plan group shapes its engine besides the ONNX file: part of the cache key."""
    return {"precision": group["precision"], "refittable": bool(group["refittable"]), "profiles": group["profiles"]}


# ---------------------------------------------------------------------------------------------
# Cache keys and layout
# ---------------------------------------------------------------------------------------------
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


def _rel_or_abs(bundle_dir: str, path: str) -> str:
    """Paths inside the bundle are recorded relative to it (POSIX), others absolute."""
    b, p = os.path.abspath(bundle_dir), os.path.abspath(path)
    if os.path.commonpath([b, p]) == b:
        return os.path.relpath(p, b).replace(os.sep, "/")
    return p


def _resolve(bundle_dir: str, path: str) -> str:
    return path if os.path.isabs(path) else _bundle_path(bundle_dir, path)


# ---------------------------------------------------------------------------------------------
# TensorRT and CUDA, imported lazily
# ---------------------------------------------------------------------------------------------
def _import_tensorrt():
    import tensorrt  # lazy on purpose: this module must import without TensorRT

    return tensorrt


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as e:
            raise ImportError(f"cuda-python is not installed ({e}); `pip install cuda-python`") from e
    return cudart


def _cuda(cudart, result):
    """Unwrap a cuda-python call's (error, *values) tuple; a CUDA error raises EngineError."""
    if not isinstance(result, tuple):
        result = (result,)
    err, rest = result[0], result[1:]
    if err != cudart.cudaError_t.cudaSuccess:
        try:
            msg = cudart.cudaGetErrorString(err)[1]
            msg = msg.decode() if isinstance(msg, bytes) else str(msg)
        except Exception:  # noqa: BLE001 - the error code alone still says what failed
            msg = ""
        raise EngineError(f"CUDA error {err}: {msg}".rstrip(": "))
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


def gpu_name(device: int = 0) -> str:
    """The GPU as the cache key names it: device name, compute capability and SM count (every Jetson
    Orin reports the name "Orin"; the SM count tells an Orin Nano from an AGX Orin)."""
    cudart = _cudart()
    props = _cuda(cudart, cudart.cudaGetDeviceProperties(device))
    name = props.name
    if isinstance(name, (bytes, bytearray)):
        name = bytes(name).split(b"\0", 1)[0].decode("utf-8", "replace")
    return f"{str(name).strip()} sm_{props.major}{props.minor} {props.multiProcessorCount}SM"


def _runtime_identity() -> tuple[str, str]:
    """(TensorRT version, GPU name) of this machine; raises when either is unavailable."""
    trt = _import_tensorrt()
    return str(trt.__version__), gpu_name()


def tensorrt_available() -> tuple[bool, str]:
    """Whether engines can be built and run here, and why not."""
    try:
        trt = _import_tensorrt()
    except Exception as e:  # noqa: BLE001 - ImportError, or OSError from a missing libnvinfer
        return False, f"the tensorrt Python package is not importable: {e}"
    try:
        gpu = gpu_name()
    except Exception as e:  # noqa: BLE001
        return False, f"tensorrt {trt.__version__} is installed but no CUDA GPU is usable: {e}"
    return True, f"tensorrt {trt.__version__} on {gpu}"


def _require_tensorrt():
    ok, why = tensorrt_available()
    if not ok:
        raise EngineError(NO_TENSORRT.format(why=why))
    return _import_tensorrt()


def _logger(trt, severity=None):
    """A TensorRT logger that prints warnings and keeps the errors for the exception message."""

    threshold = severity if severity is not None else trt.ILogger.Severity.WARNING

    class _Log(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, sev, msg):
            if sev in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(str(msg))
            if int(sev) <= int(threshold):  # INTERNAL_ERROR 0, ERROR 1, WARNING 2, INFO 3, VERBOSE 4
                print(f"[tensorrt] {msg}", flush=True)

    return _Log()


# ---------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------
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
    if group["precision"] == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
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


def _profile_names(group: Mapping[str, Any]) -> list[str]:
    """Profile names in engine order: training, generation, then any others as the plan lists them."""
    names = list(group["profiles"])
    return [p for p in PROFILE_ORDER if p in names] + [p for p in names if p not in PROFILE_ORDER]


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
    timing_path = (_bundle_path(bundle_dir, plan.get("timing_cache") or "engines/timing.cache")
                   if os.path.abspath(cache_dir) == os.path.abspath(default_cache_dir(bundle_dir))
                   else os.path.join(cache_dir, "timing.cache"))
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


# ---------------------------------------------------------------------------------------------
# Which backend runs the frozen groups here
# ---------------------------------------------------------------------------------------------
def load_built(bundle_dir: str) -> dict | None:
    path = _bundle_path(bundle_dir, BUILT)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            built = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineError(f"{path} is not valid JSON ({e}): run `edgeblock build-engines --force`")
    if not isinstance(built, dict) or not isinstance(built.get("groups"), list):
        raise EngineError(f"{path} is malformed: run `edgeblock build-engines --force`")
    return built


def engines_status(bundle_dir: str) -> dict:
    """Whether the frozen groups can run on TensorRT engines here (TensorRT present, engines built for this
    TensorRT version, GPU and ONNX files), else on ONNX Runtime; `reason` says why.

    {"backend": "tensorrt" | "onnxruntime", "tensorrt": bool, "built": bool, "reason": str,
     "engines": {onnx path: engine path} (tensorrt only)}"""
    plan = load_plan(bundle_dir)

    def ort(reason: str, tensorrt: bool, built: bool = False) -> dict:
        return {"backend": "onnxruntime", "tensorrt": tensorrt, "built": built,
                "reason": f"{reason}; the frozen groups run on ONNX Runtime"}

    if not plan["groups"]:
        return ort("the bundle has no frozen groups", tensorrt_available()[0])
    ok, why = tensorrt_available()
    if not ok:
        return ort(f"TensorRT is not available ({why})", False)
    try:
        built = load_built(bundle_dir)
    except EngineError as e:
        return ort(str(e), True)
    if built is None or built.get("status") != "built":
        return ort(f"no engines built for this bundle (run `edgeblock build-engines {bundle_dir}`)", True)
    trt_version, gpu = _runtime_identity()
    if built.get("tensorrt_version") != trt_version:
        return ort(f"the engines were built with TensorRT {built.get('tensorrt_version')}, this is TensorRT "
                   f"{trt_version} (run `edgeblock build-engines {bundle_dir}`)", True, True)
    if built.get("gpu_name") != gpu:
        return ort(f"the engines were built for GPU {built.get('gpu_name')!r}, this is {gpu!r} "
                   f"(run `edgeblock build-engines {bundle_dir}`)", True, True)
    by_onnx = {r.get("onnx"): r for r in built["groups"] if isinstance(r, dict)}
    engines = {}
    for g in plan["groups"]:
        r = by_onnx.get(g["onnx"])
        if r is None:
            return ort(f"no engine built for {g['onnx']} (run `edgeblock build-engines {bundle_dir}`)", True, True)
        want = cache_key(trt_version, gpu, g["onnx_sha256"], build_settings(g))
        if r.get("key") != want:
            return ort(f"the engine of {g['onnx']} was built for another ONNX file or build settings "
                       f"(run `edgeblock build-engines {bundle_dir}`)", True, True)
        path = _resolve(bundle_dir, str(r.get("engine", "")))
        if not os.path.isfile(path):
            return ort(f"the engine file {path} of {g['onnx']} is missing (run `edgeblock build-engines {bundle_dir}`)",
                       True, True)
        engines[g["onnx"]] = path
    return {"backend": "tensorrt", "tensorrt": True, "built": True, "engines": engines,
            "reason": f"engines built for TensorRT {trt_version} on {gpu}"}


# ---------------------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------------------
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
