"""`edgeblock compile --weights fp16|int8|int4` on a tiny model laid out like `builtin`: which graphs are quantized
(and which stay fp32), the errors compile states and records, the fingerprint, and the device runtime generating
from the quantized bundle close to the fp32 one."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from edgeblock.cli import main
from edgeblock.compile import bundle as bd

from edge_runtime.fileio import sha256_file
from edge_runtime.weights import GROUP, SHELL, TEXT, TRAINED, graph_precision
from edge_runtime.manifest import load_manifest
from edge_runtime.runtime import Bundle

pytest.importorskip("onnxruntime.training")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUANTIZED = {"prologue", "frozen/group_00", "frozen/group_01", "epilogue", "text_encoder", "trainable/infer"}
# Bounds over the measured errors of this tiny random model (seed 0), rel = ||fp32 - q|| / ||fp32||:
# int4 DiT graphs 4e-3 to 5.8e-2 (prologue), chain 8.2e-3; MiniLM text encoder 0.35 (int8 0.31, fp16 3.5e-3:
# its states are sensitive); int8 DiT graphs <= 4.1e-3, chain 5.2e-4; fp16 <= 2.0e-4, chain 2.6e-5.
GRAPH_BOUND = {"int4": 0.1, "int8": 0.01, "fp16": 5e-4}
TEXT_BOUND = {"int4": 0.5, "int8": 0.45, "fp16": 0.01}
CHAIN_BOUND = {"int4": 0.02, "int8": 2e-3, "fp16": 1e-4}
# generated image (4 steps, guidance 3) vs the fp32 bundle's: mean |difference| / 255, measured int4 1.4e-3,
# int8 6.0e-4, fp16 3.5e-6
IMAGE_BOUND = {"int4": 0.005, "int8": 0.002, "fp16": 1e-4}
# each quantized frozen group's files against fp32's, measured int4 0.25-0.27, int8 0.35-0.37, fp16 0.55-0.56
SIZE_BOUND = {"int4": 0.3, "int8": 0.4, "fp16": 0.6}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """fp32 (the reference) and int4 / int8 / fp16 bundles of one tiny pixel model, trainable block 1."""
    import edgeblock.models.pipeline_parts as parts
    from edgeblock import models
    from pixel_models import tiny_pixel_model

    tmp = tmp_path_factory.mktemp("weights")
    root = tiny_pixel_model(tmp / "builtin")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "builtin_dir", lambda: root)
        mp.setattr(parts, "builtin_dir", lambda: root)
        args = ["compile", "--model", "builtin", "--blocks", "1", "--lora-rank", "2"]
        assert main([*args, "--out", str(tmp / "fp32"), "--no-verify"]) == 0
        # int4 through the CLI and after the fp32 verification against torch, as a user runs it
        assert main([*args, "--out", str(tmp / "int4"), "--weights", "int4"]) == 0
        for p in ("int8", "fp16"):
            bd.compile_bundle(bd.CompileOptions("builtin", str(tmp / p), blocks=(1,), lora_rank=2, weights=p,
                                                verify=False), progress=None)
        for p in ("fp32", "int4", "int8", "fp16"):
            out[p] = str(tmp / p)
        out["root"] = root
        yield out


def _ops(path: str) -> set[str]:
    """The graph's op types, plus "fp16 weights" when an initializer is float16 (the fp32 graphs have Casts)."""
    g = onnx.load(path, load_external_data=False).graph
    half = any(i.data_type == onnx.TensorProto.FLOAT16 for i in g.initializer)
    return {n.op_type for n in g.node} | ({"fp16 weights"} if half else set())


@pytest.mark.parametrize("precision", ["int4", "int8", "fp16"])
def test_quantized_bundle_records_errors_the_trained_runs_on_their_grid_the_training_artifacts_fp32(bundles, precision):
    out = bundles[precision]
    m = load_manifest(out)  # every file matches its sha256
    assert m.weight_precision == precision and set(m.weights["graphs"]) == QUANTIZED
    assert m.weights.get("block_size") == (32 if precision == "int4" else None)
    assert m.model["compile_args"]["weights"] == precision
    ops = {"int4": "MatMulNBits", "int8": "DequantizeLinear", "fp16": "fp16 weights"}
    for key, g in m.weights["graphs"].items():
        # each graph at its role's precision: under int4 the text encoder, prologue, epilogue and the trainable run's
        # inference graph int8; the trainable run fp16 under int8 and fp16
        role = (GROUP if key.startswith("frozen/") else TRAINED if key.startswith("trainable/")
                else TEXT if key == "text_encoder" else SHELL)
        assert g["precision"] == graph_precision(precision, role) == m.graph_weights(key), (key, g)
        assert g["precision"] == ("int8" if precision == "int4" and role != GROUP
                                  else "fp16" if role == TRAINED else precision), (key, g)
        assert g["matrices"] > 0 and ops[g["precision"]] in _ops(os.path.join(out, key + ".onnx")), key
        if role == TRAINED and precision == "int4":  # its base was put on the int8 grid before export: quantizing
            # gives back its own codes
            assert np.isfinite(g["max_abs"]) and g["rel_error"] <= 1e-6, (key, g)
        else:
            bound = TEXT_BOUND[g["precision"]] if key == "text_encoder" else GRAPH_BOUND[g["precision"]]
            assert np.isfinite(g["max_abs"]) and 0 < g["rel_error"] <= bound, (key, g)
        assert g["bytes"] < g["bytes_fp32"]
        # int4 frozen groups' codes are rounded with the calibration draws' Hessians (compile/gptq.py) where that
        # measures better than rounding to nearest: every matrix of them, or none; an on-grid base to nearest
        assert g.get("calibrated", 0) in ((0, g["matrices"]) if g["precision"] == "int4" else (0,)), (key, g)
        assert ("calibrated" in g) == (g["precision"] == "int4" and role == GROUP), (key, g)
        if key.startswith("frozen/"):
            assert g["bytes"] <= SIZE_BOUND[precision] * g["bytes_fp32"], (key, g)
            assert g["bytes"] == os.path.getsize(os.path.join(out, key + ".onnx"))
    assert 0 < m.weights["chain"]["rel_error"] <= CHAIN_BOUND[precision]
    # the training artifacts stay fp32, the same graphs as the fp32 bundle's; under int4 their trainable blocks' base
    # weights are the fp32 bundle's on the trainable run's int8 grid (what its inference graph computes), the rest
    # (LoRA, norms, biases, the epilogue) the same; under int8 and fp16 every tensor the same
    for name in ("training_model.onnx", "eval_model.onnx"):
        assert not _ops(os.path.join(out, "trainable", name)) & {"MatMulNBits", "DequantizeLinear", "fp16 weights"}
        with open(os.path.join(out, "trainable", name), "rb") as a, \
                open(os.path.join(bundles["fp32"], "trainable", name), "rb") as b:
            assert a.read() == b.read(), name
    from safetensors.numpy import load_file

    from edgeblock.compile.base_grid import grid_values
    from edgeblock.compile.quantize import MIN_ELEMENTS

    mine, ref = (load_file(os.path.join(b, "trainable", "params.safetensors")) for b in (out, bundles["fp32"]))
    assert mine.keys() == ref.keys()
    on_grid = [k for k, v in ref.items() if k.startswith("parts.net.blocks.") and k.endswith(".weight")
               and v.ndim == 2 and v.size >= MIN_ELEMENTS]
    assert len(on_grid) == 6  # q, k, v, the modulation, proj_mlp, proj_out of single block 0 (block 1)
    # the manifest states how far the base moved: int8 per channel, a few 1e-3 of each weight
    if precision == "int4":
        moved = m.weights["trained_base"]
        assert moved["precision"] == "int8" and moved["matrices"] == 6 and 1e-4 < moved["rel_error"] < 1e-2, moved
    else:
        assert "trained_base" not in m.weights
    for k, v in ref.items():
        if k in on_grid and precision == "int4":
            assert not np.array_equal(mine[k], v), k
            np.testing.assert_array_equal(mine[k], grid_values(v.T, "int8").T, err_msg=k)
        else:
            np.testing.assert_array_equal(mine[k], v, err_msg=k)
    # the TensorRT plan names the quantized files, at the precision the weights take (int8 engines for int8, fp16
    # for fp16); int4's MatMulNBits is not TensorRT's: no engines, ONNX Runtime runs the groups
    with open(os.path.join(out, "engines", "plan.json")) as f:
        plan = json.load(f)
    assert all(g["onnx_sha256"] == sha256_file(os.path.join(out, g["onnx"])) for g in plan["groups"])
    if precision == "int4":
        assert plan["groups"] == [] and "MatMulNBits" in plan["note"]
    else:
        assert plan["groups"] and {g["precision"] for g in plan["groups"]} == {precision} == {plan["precision"]}
        from edge_runtime.engines.plan import validate_plan

        validate_plan(plan)


def test_fp32_bundle_is_as_before(bundles):
    m = load_manifest(bundles["fp32"])
    assert m.weights == {} and m.weight_precision == "fp32" and "weights" not in m.model["compile_args"]
    with open(os.path.join(bundles["fp32"], "manifest.json")) as f:
        assert "weights" not in json.load(f)
    assert not _ops(os.path.join(bundles["fp32"], "frozen", "group_00.onnx")) & {"MatMulNBits", "DequantizeLinear",
                                                                                "fp16 weights"}


@pytest.mark.parametrize("precision", ["int4", "int8", "fp16"])
def test_device_runtime_generates_close_to_fp32(bundles, precision, monkeypatch):
    import edge_runtime.runtime as rt
    import edge_runtime.text as text

    applied = []
    for mod in (rt, text):
        real = mod.apply_session_settings
        monkeypatch.setattr(mod, "apply_session_settings",
                            lambda o, p, e, _real=real: (applied.append(p), _real(o, p, e))[1])
    kw = dict(seed=0, steps=4, guidance=3.0)
    ref = Bundle(bundles["fp32"]).generate("a photo of sks dog", **kw).astype(np.float64)
    assert set(applied) == {"fp32"}
    applied.clear()
    b = Bundle(bundles[precision])
    img = b.generate("a photo of sks dog", **kw).astype(np.float64)
    # every graph's session got its own precision's settings (int4: int8 beside the frozen groups; the trainable
    # infer graph fp16 under int8)
    own = [b.manifest.graph_weights(k) for k in QUANTIZED]
    assert sorted(applied) == sorted(own) and own.count(precision) >= 2 - (precision == "int4")
    assert b.manifest.graph_weights("trainable/infer") == {"int4": "int8", "int8": "fp16", "fp16": "fp16"}[precision]
    diff = np.abs(img - ref).mean() / 255
    assert diff <= IMAGE_BOUND[precision], diff


def test_fingerprint_and_bad_weights(bundles, tmp_path, capsys, monkeypatch):
    import edgeblock.models.pipeline_parts as parts
    from edgeblock import models

    opts = dict(model="builtin", out="x", blocks=(1,))
    base = bd.CompileOptions(**opts).fingerprint_args()
    assert bd.CompileOptions(**opts, weights="fp32").fingerprint_args() == base  # fp32 keeps the old key
    # quantized bundles say each role's precision (the VAE fp32: a bundle compiled when the VAE was quantized is
    # rebuilt) and int4 how its codes are rounded (a bundle compiled when int4 quantized
    # every graph, or rounded to nearest, is rebuilt)
    assert bd.CompileOptions(**opts, weights="int8").fingerprint_args() == {
        **base, "weights": "int8",
        "graph_weights": {"group": "int8", "trained": "fp16", "text_encoder": "int8", "shell": "int8", "vae": "fp32"}}
    assert bd.CompileOptions(**opts, weights="int4").fingerprint_args() == {
        **base, "weights": "int4",
        "graph_weights": {"group": "int4", "trained": "int8", "text_encoder": "int8", "shell": "int8", "vae": "fp32"},
        "int4_rounding": "gptq"}
    # a Jetson target without --weights gets its default, which is part of the key
    assert bd.CompileOptions(**opts, target="orin-nx-16gb").fingerprint_args()["weights"] == "fp16"  # the Jetson default
    with pytest.raises(ValueError, match="--weights 'int3'"):
        bd.check_options(bd.CompileOptions(**opts, weights="int3"))
    with pytest.raises(SystemExit) as e:
        main(["compile", "--model", "builtin", "--out", str(tmp_path / "b"), "--weights", "int3"])
    assert e.value.code == 2 and "--weights" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    # the same --weights again: up to date
    monkeypatch.setattr(models, "builtin_dir", lambda: bundles["root"])
    monkeypatch.setattr(parts, "builtin_dir", lambda: bundles["root"])
    r = bd.compile_bundle(bd.CompileOptions("builtin", bundles["int8"], blocks=(1,), lora_rank=2, weights="int8",
                                            verify=False), progress=None)
    assert r.up_to_date
