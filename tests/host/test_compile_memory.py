"""Compile's memory stage: the bundle's manifest carries the planner's predicted peaks of every operation the
daemon admits (a job per precompute mode, a generation per size, resident and streamed), for its own text
encoder and VAE, on the planner's name of its target."""

import pytest


def test_builtin_bundle_predicts_every_operation(builtin_bundle):
    from edge_runtime.manifest import load_manifest
    from edge_runtime.memory_plan import GENERATION_MODES
    from edge_runtime.precompute import PRECOMPUTE_MODES

    m = load_manifest(builtin_bundle[0])
    p = m.memory_plan()
    assert p is not None and p.planner_target == "host-cpu" and p.measured_on_target and p.weights == "fp32"
    assert set(p.job_peak_bytes) == set(PRECOMPUTE_MODES)
    sizes = {m.train_res, m.gen_res}
    for mode in GENERATION_MODES:
        assert set(p.generate[mode]) == sizes
    for size in sizes:
        res, st = p.generation("resident", size), p.generation("streamed", size)
        assert p.runtime_bytes < st["peak_bytes"] <= res["peak_bytes"]
        assert st["weights_bytes"] < res["weights_bytes"]
    # the resident generation holds the MiniLM text encoder (22.7M parameters, fp32) besides the transformer
    assert p.generation("resident", m.gen_res)["weights_bytes"] > 22_000_000 * 4 * 0.5
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
