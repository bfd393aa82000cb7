"""Which backend runs a bundle's frozen groups here: TensorRT when it is usable and `engines/built.json`
records engines for this TensorRT version, GPU, ONNX files and build settings, else ONNX Runtime, with
the reason.
"""

from __future__ import annotations

import json
import os

from .cache import _resolve, cache_key
from .errors import EngineError
from .plan import BUILT, _bundle_path, build_settings, load_plan
from .trt_cuda import _runtime_identity, tensorrt_available


def load_built(bundle_dir: str) -> dict | None:
    """`engines/built.json` of the bundle, or None when no engines were built for it."""
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
