"""Compile's memory stage: the bundle's manifest carries the planner's predicted peaks of every operation the
daemon admits (a job per precompute mode, a generation per size, resident and streamed), for its own text
encoder and VAE, on the planner's name of its target."""

import pytest


def test_builtin_bundle_predicts_every_operation(builtin_bundle):
    from edge_runtime.manifest import load_manifest
    from edge_runtime.memory_plan import GENERATION_MODES, equivalent_side
    from edge_runtime.precompute import PRECOMPUTE_MODES

    m = load_manifest(builtin_bundle[0])
    p = m.memory_plan()
    assert p is not None and p.planner_target == "host-cpu" and p.measured_on_target and p.weights == "fp32"
    assert set(p.job_peak_bytes) == set(PRECOMPUTE_MODES)
    # the squares, and each --gen-sizes entry at the square side of as many pixels (the fixture's 64x48: 56)
    multiple = int(m.model.get("resolution_multiple", 1))
    sizes = {m.train_res, m.gen_res} | {equivalent_side(w, h, multiple) for w, h in m.gen_sizes}
    assert m.gen_sizes == [[64, 48]] and sizes == {32, 56, 64}
    for mode in GENERATION_MODES:
        assert set(p.generate[mode]) == sizes
    for size in sizes:
        res, st = p.generation("resident", size), p.generation("streamed", size)
        assert p.runtime_bytes < st["peak_bytes"] <= res["peak_bytes"]
        assert st["weights_bytes"] < res["weights_bytes"]
        # classifier-free guidance (two rows): one row's activations through the open graphs are predicted lower
        assert res["weights_bytes"] < res["rows_peak_bytes"] == p.resident_rows_peak(size) < res["peak_bytes"]
    # the resident generation holds the MiniLM text encoder's session (22.7M parameters, fp32, less its 11.7M-row
    # token table, a lookup read from disk) besides the transformer (2.4M)
    table = sum(d["rows"] * d["dim"] for d in m.graphs["text_encoder"]["lookups"])
    assert table == 30522 * 384
    held = p.generation("resident", m.gen_res)["weights_bytes"]
    assert (22_713_216 - table) * 4 * 0.5 < held < (22_713_216 - table + 3_000_000) * 4 * 1.2
    assert all(p.runtime_bytes < v for v in p.job_peak_bytes.values())


def test_the_predictions_follow_the_bundles_weights(builtin_bundle, tmp_path):
    """An int8 bundle predicts smaller resident generation weights than the fp32 one (the planner's own
    --weights), the same trainable blocks' training."""
    pytest.importorskip("onnxruntime.training")
    from edgeblock.compile import bundle as bd

    from edge_runtime.manifest import load_manifest

    fp32 = load_manifest(builtin_bundle[0]).memory_plan()
    out = str(tmp_path / "int8")
    r = bd.compile_bundle(bd.CompileOptions("builtin", out, blocks=(0, 2), lora_rank=4, train_res=32, verify=False,
                                            weights="int8"), progress=None)
    q = r.manifest.memory_plan()
    assert q.weights == "int8"
    size = r.manifest.gen_res
    assert q.generation("resident", size)["weights_bytes"] < 0.5 * fp32.generation("resident", size)["weights_bytes"]


def test_predictions_are_the_planners_for_this_model(tmp_path):
    """A builtin-layout pixel model of another size: compile's figures are the planner's on that model's own
    config (not the built-in model's), with the bundle's blocks, resolutions and weights."""
    pytest.importorskip("onnxruntime.training")
    from edgeblock.bench.daemon import pixel_model_dir
    from edgeblock.compile import bundle as bd
    from edgeblock.plan.calibration import _cfg, _meta
    from edgeblock.plan.predict import PlanOptions, plan

    import os

    path = pixel_model_dir(_cfg(256, 2, 1, 2), _meta(32), "test-mem-pixel")
    r = bd.compile_bundle(bd.CompileOptions(path, str(tmp_path / "b"), blocks=(1,), verify=False), progress=None)
    m = r.manifest
    p = m.memory_plan()
    ref = plan(PlanOptions(os.path.join(path, "transformer", "config.json"), "host-cpu", train_res=m.train_res,
                           gen_res=m.gen_res, blocks=(1,), weights="fp32", lora_rank=m.lora_rank))
    assert ref["model"]["parameters"] == m.model["parameters"]
    assert p.generation("resident", m.gen_res)["peak_bytes"] == ref["generation"]["resident"]["peak_bytes"]
    assert p.generation("streamed", m.gen_res)["peak_bytes"] == ref["generation"]["streamed"]["peak_bytes"]
    assert p.job_peak(ref["model"]["precompute"]) == ref["methods"]["blockskip"]["job_peak_bytes"]


def test_a_text_encoder_in_parts_lowers_the_predicted_encode(builtin_bundle, tmp_path):
    """With --text-parts the job and every generation encode part by part: the predictions hold one part of the
    text encoder there, and a resident generation does not keep it among the graphs it holds open."""
    pytest.importorskip("onnxruntime.training")
    from edgeblock.compile import bundle as bd

    from edge_runtime.manifest import load_manifest

    whole = load_manifest(builtin_bundle[0]).memory_plan()
    r = bd.compile_bundle(bd.CompileOptions("builtin", str(tmp_path / "parts"), blocks=(0, 2), lora_rank=4,
                                            train_res=32, verify=False, text_parts=3), progress=None)
    assert len(r.manifest.graphs["text_encoder"]["parts"]) == 3
    p, size = r.manifest.memory_plan(), r.manifest.gen_res
    assert p.job_peak("online") < whole.job_peak("online")
    assert p.generation("streamed", size)["peak_bytes"] < whole.generation("streamed", size)["peak_bytes"]
    res, res_whole = p.generation("resident", size), whole.generation("resident", size)
    assert res["peak_bytes"] < res_whole["peak_bytes"] and res["weights_bytes"] < res_whole["weights_bytes"]
