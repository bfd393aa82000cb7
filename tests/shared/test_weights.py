"""The weight-precision contract (edge_runtime.weights) and the manifest's record of it: names, ORT session
settings, each target's default, and older manifests (no `weights`) reading as fp32."""

from __future__ import annotations

import pytest

from edge_runtime import weights as w
from edge_runtime.manifest import Manifest, ManifestError, validate_fields
from edge_runtime.targets import BUNDLE_TARGETS


def test_default_weights_per_target():
    """fp32 on cpu, fp16 on every Jetson (int8/int4 are opt-in until eval has measured them)."""
    assert {t: w.default_weights(t) for t in BUNDLE_TARGETS} == {
        "cpu": "fp32", "agx-orin-64gb": "fp16", "agx-orin-32gb": "fp16", "orin-nx-16gb": "fp16", "orin-nano-8gb": "fp16"}
    with pytest.raises(ValueError, match="jetson-tx9"):
        w.default_weights("jetson-tx9")


class _Opts:
    """Records what apply_session_settings sets (an onnxruntime.SessionOptions stand-in)."""

    def __init__(self):
        self.execution_order = "DEFAULT"
        self.graph_optimization_level = "ORT_ENABLE_ALL"


class _Ort:
    """The onnxruntime enums apply_session_settings reads (a stand-in module)."""

    class ExecutionOrder:
        PRIORITY_BASED = "priority"

    class GraphOptimizationLevel:
        ORT_DISABLE_ALL = "none"


def test_session_settings_per_precision():
    """int8 and fp16 graphs: each weight's fp32 copy made just before its MatMul (priority order, no graph
    optimizations: their fusions had every copy alive at once); fp32 and int4 keep ORT's defaults."""
    seen = {}
    for p in w.WEIGHTS:
        o = _Opts()
        w.apply_session_settings(o, p, _Ort)
        seen[p] = (o.execution_order, o.graph_optimization_level)
    assert seen == {"fp32": ("DEFAULT", "ORT_ENABLE_ALL"), "int4": ("DEFAULT", "ORT_ENABLE_ALL"),
                    "int8": ("priority", "none"), "fp16": ("priority", "none")}
    w.session_settings("fp16")["execution_order"] = "DEFAULT"  # a copy: the table itself is unchanged
    assert w.SESSION_SETTINGS["fp16"]["execution_order"] == "PRIORITY_BASED"
    with pytest.raises(ValueError, match="int3"):
        w.apply_session_settings(_Opts(), "int3", _Ort)


def _manifest(**kw) -> Manifest:
    return Manifest(family="flux", blocks=[{"index": 0}, {"index": 1}], trainable=[1], train_res=32, gen_res=64,
                    scheduler={}, patch_schedule={}, lora={"rank": 2}, **kw)


def test_manifest_weights_field_is_optional_and_typed():
    old = _manifest()
    assert old.weight_precision == "fp32" and old.graph_weights("frozen/group_00") == "fp32"
    assert "weights" not in old.to_dict()  # fp32 bundles read exactly as before the field existed
    q = _manifest(weights={"precision": "int4", "block_size": 32, "graphs": {"frozen/group_00": {"rel_error": 0.01}}})
    assert q.weight_precision == "int4" and q.to_dict()["weights"]["block_size"] == 32
    assert q.graph_weights("frozen/group_00") == "int4" and q.graph_weights("trainable/infer") == "fp32"
    d = {**q.to_dict(), "files": {}}
    validate_fields(d)
    with pytest.raises(ManifestError, match="weights"):
        validate_fields({**d, "weights": {"precision": "int3"}})


def test_int4_keeps_the_graphs_whose_error_reaches_every_output_and_the_trained_runs_at_int8():
    # the trainable runs' inference graphs take int8 under int4 (their base trains on that grid,
    # compile/base_grid.py), fp16 under int8 and fp16, fp32 in an fp32 bundle (docs/results.md)
    assert dict(zip(w.GRAPH_ROLES, [w.graph_precision("int4", r) for r in w.GRAPH_ROLES])) == {
        "group": "int4", "trained": "int8", "text_encoder": "int8", "shell": "int8", "vae": "fp32"}
    for p in ("fp16", "int8"):
        assert {r: w.graph_precision(p, r) for r in w.GRAPH_ROLES} == {
            "group": p, "trained": "fp16", "text_encoder": p, "shell": p, "vae": "fp32"}
    assert {w.graph_precision("fp32", r) for r in w.GRAPH_ROLES} == {"fp32"}
    with pytest.raises(ValueError, match="decoder"):
        w.graph_precision("int4", "decoder")
    with pytest.raises(ValueError, match="int3"):
        w.graph_precision("int3", "group")


def test_a_graph_records_its_own_precision():
    q = _manifest(weights={"precision": "int4", "graphs": {"frozen/group_00": {"precision": "int4"},
                                                           "text_encoder": {"precision": "int8"}}})
    assert q.graph_weights("frozen/group_00") == "int4" and q.graph_weights("text_encoder") == "int8"
    assert q.graph_weights("trainable/infer") == "fp32"
    d = {**q.to_dict(), "files": {}}
    validate_fields(d)
    with pytest.raises(ManifestError, match="text_encoder"):
        validate_fields({**d, "weights": {"precision": "int4", "graphs": {"text_encoder": {"precision": "int5"}}}})
