"""The engine plan written by `edgeblock compile`: `engines/plan.json`, read and checked field by field.

Per frozen group: the ONNX file and its sha256, the optimisation profiles, the precision and whether the
engine is refittable; also the bundle's engine file names and the profile order the engines use.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from .errors import EngineError

PLAN = "engines/plan.json"
BUILT = "engines/built.json"
CACHE_DIR = "engines/cache"
PLAN_VERSION = 1
# fp32 (no TF32), fp16, int8: weight-only, the groups' MatMul weights arrive as DequantizeLinear of int8
# initializers (`edgeblock compile --weights int8`), the rest runs in fp16 (INT8 and FP16 builder flags)
PRECISIONS = ("fp32", "fp16", "int8")
PROFILE_ORDER = ("training", "generation")
TIMING_CACHE = "engines/timing.cache"
CACHE_KEY = ("tensorrt_version", "gpu_name", "onnx_sha256")


def engine_precision(weights: str, requested: str) -> str | None:
    """The engine precision of a bundle's frozen groups: `requested` (`edgeblock compile --precision`) for fp32
    weights, fp16 / int8 for fp16 / int8 weights (Orin runs both natively), None for int4: its com.microsoft
    MatMulNBits is an ONNX Runtime contrib op TensorRT's ONNX parser does not read, so no engine is planned and
    ONNX Runtime runs the groups."""
    if weights == "int4":
        return None
    if weights in ("fp16", "int8"):
        return weights
    return requested


def plan_group(onnx: str, onnx_sha256: str, blocks: list[int], profiles: Mapping[str, Any], precision: str,
               outputs: list[str]) -> dict:
    """One frozen group's entry (what `edgeblock compile` writes): its ONNX file (bundle-relative), the engine
    file beside it, the optimisation profiles by name (PROFILE_ORDER), a refittable engine at `precision`."""
    stem = os.path.splitext(os.path.basename(onnx))[0]
    return {"onnx": onnx, "onnx_sha256": onnx_sha256, "blocks": list(blocks), "engine": f"engines/{stem}.engine",
            "profiles": dict(profiles), "precision": precision, "refittable": True, "outputs": list(outputs)}


def plan_document(groups: list[dict], precision: str, note: str) -> dict:
    """The whole engines/plan.json, checked as the device will check it."""
    return validate_plan({"version": PLAN_VERSION, "status": "not built", "note": note, "cache_key": list(CACHE_KEY),
                          "timing_cache": TIMING_CACHE, "precision": precision, "groups": groups})


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


def _profile_names(group: Mapping[str, Any]) -> list[str]:
    """Profile names in engine order: training, generation, then any others as the plan lists them."""
    names = list(group["profiles"])
    return [p for p in PROFILE_ORDER if p in names] + [p for p in names if p not in PROFILE_ORDER]
