"""`edgeblock bench scale`: its configurations span ~0.1B to >1B parameters, bad names fail before any work, and
its table reports every figure with the prediction's error. (The benchmark itself prints figures: docs/bench.md.)"""

import subprocess
import sys

import pytest


def test_configurations_span_a_tenth_to_over_a_billion_parameters():
    import torch
    from diffusers import FluxTransformer2DModel

    from edgeblock.bench.scale import SCALE_CONFIGS, scale_config

    params = {}
    for name in SCALE_CONFIGS:
        with torch.device("meta"):
            m = FluxTransformer2DModel(**scale_config(name))
        params[name] = sum(p.numel() for p in m.parameters())
    assert 0.1e9 <= params["flux-0.1b"] < 0.2e9
    assert 0.4e9 <= params["flux-0.5b"] < 0.7e9
    assert params["flux-1b"] >= 1.0e9
    with pytest.raises(ValueError, match="flux-0.1b"):
        scale_config("flux-9b")


def test_table_and_errors():
    from edgeblock.bench.scale import _errors, format_table

    MiB = 2**20
    r = {"params": 120_000_000, "standard_lora_peak_bytes": 2000 * MiB, "job_peak_bytes": 500 * MiB,
         "generate_peak_bytes": {"fp32": {"resident": 1400 * MiB, "streamed": 600 * MiB},
                                 "int8": {"resident": 700 * MiB}},
         "predicted": {"job_peak_bytes": 550 * MiB,
                       "generate_peak_bytes": {"fp32": {"resident": 1400 * MiB, "streamed": 540 * MiB},
                                               "int8": {"resident": 770 * MiB}}},
         "ratios": {"job_vs_standard_lora": 0.25}}
    r["prediction_errors"] = e = _errors(r)
    assert e["job"] == pytest.approx(0.1) and e["generate_fp32_streamed"] == pytest.approx(-0.1)
    assert e["generate_int8_resident"] == pytest.approx(0.1) and "generate_int8_streamed" not in e
    t = format_table({"flux-0.1b": r})
    assert ("| flux-0.1b | 120M | 2000 | 500 (0.250; pred +10%) | 1400 (+0%) | - | 600 (-10%) | 700 (+10%) | - | - "
            "| - | - | - |") in t
    assert "| gen fp32 resident | gen fp32 resident_rows | gen fp32 streamed | gen int8 resident |" in t


def test_cli_refuses_an_unknown_configuration():
    r = subprocess.run([sys.executable, "-m", "edgeblock.cli", "bench", "scale", "--configs", "flux-9b"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "flux-9b" in r.stderr and "flux-0.5b" in r.stderr


def _fake_run(monkeypatch, job_mib: int):
    """scale.run() on a stand-in bundle predicting resident 1000, resident_rows 800, streamed 400 MiB and a job of
    job_mib; measure_after_job records its calls and answers the mode each budget picks."""
    from types import SimpleNamespace

    import edge_runtime.manifest
    import edgeblock.method
    from edgeblock.bench import memory, scale

    MiB = 2**20
    peaks = {"resident": 1000 * MiB, "resident_rows": 800 * MiB, "streamed": 400 * MiB}
    plan = SimpleNamespace(generation=lambda m, res: {"peak_bytes": peaks[m]},
                           resident_rows_peak=lambda res: peaks["resident_rows"],
                           mode_peak=lambda m, res: peaks[m], job_peak=lambda pre: job_mib * MiB)
    man = SimpleNamespace(gen_res=128, train_res=64, trainable=[4, 5], memory_plan=lambda: plan,
                          model={"parameters": 120_000_000, "num_blocks": 9})
    monkeypatch.setattr(scale, "pixel_model_dir", lambda *a: "/model")
    monkeypatch.setattr(scale, "_bundle", lambda path, name, w, blocks, say: f"/bundle-{w}")
    monkeypatch.setattr(edge_runtime.manifest, "load_manifest", lambda b, verify_files: man)
    monkeypatch.setattr(edgeblock.method, "model_recipe", lambda p: SimpleNamespace(middle=lambda n: [4, 5]))
    monkeypatch.setattr(memory, "run", lambda *a, **k: {"standard_lora": {"peak_rss_total_bytes": 2000 * MiB}})
    calls = []

    def after_job(bundle, steps, gen_steps, budget, job=True):
        calls.append((bundle, budget, job))
        w = bundle.split("-")[1]
        mode = "resident" if budget is None else "resident_rows" if budget > 800 * MiB else "streamed"
        peak = {"resident": 900, "resident_rows": 780, "streamed": 350}[mode] * MiB // (2 if w == "int4" else 1)
        return ((310 + len(calls)) * MiB if job else None), peak, mode

    monkeypatch.setattr(scale, "measure_after_job", after_job)
    return scale.run(("flux-0.1b",))["flux-0.1b"], calls


def test_each_generation_follows_a_job_in_the_same_daemon(monkeypatch):
    """run(): per weights and mode one daemon runs the job then the generation (measure_after_job): resident under
    the default budget, resident_rows and streamed under budgets between the predictions that admit the job; the
    JSON keeps its keys and adds the job per weights."""
    from edgeblock.bench import scale

    MiB = 2**20
    r, calls = _fake_run(monkeypatch, 300)
    # rows: between the rows peak (800) and resident (1000); streamed: between streamed (400) and the rows peak
    assert calls == [(f"/bundle-{w}", b, True) for w in scale.WEIGHTS for b in (None, 900 * MiB, 600 * MiB)]
    assert r["job_peak_bytes"] == 311 * MiB and r["job_peak_bytes_by_weights"]["int4"] == {
        "resident": 317 * MiB, "resident_rows": 318 * MiB, "streamed": 319 * MiB}
    assert r["generate_peak_bytes"]["fp32"] == {"resident": 900 * MiB, "resident_rows": 780 * MiB,
                                                "streamed": 350 * MiB}
    assert r["generate_peak_bytes"]["int4"]["resident"] == 450 * MiB and r["generate_after_job"] is True
    assert r["generate_without_job"] == []
    assert r["standard_lora_peak_bytes"] == 2000 * MiB and r["ratios"]["job_vs_standard_lora"] == 311 / 2000
    assert r["ratios"]["generate_int4_resident_vs_fp32_resident"] == 0.5
    assert r["ratios"]["generate_int4_resident_rows_vs_fp32_resident_rows"] == 0.5
    assert r["ratios"]["generate_int4_resident_rows_vs_fp32_resident"] == 390 / 900
    assert r["prediction_errors"]["generate_fp32_resident"] == pytest.approx(1000 / 900 - 1)
    assert r["prediction_errors"]["generate_fp32_resident_rows"] == pytest.approx(800 / 780 - 1)


def test_a_mode_no_budget_admits_after_the_job_is_measured_alone(monkeypatch):
    """A job predicted above the rows peak (850 > 800 MiB): every budget that streams would refuse it, so the
    streamed generation runs in a fresh daemon without a job (budget between streamed and rows), and says so."""
    from edgeblock.bench import scale

    MiB = 2**20
    r, calls = _fake_run(monkeypatch, 850)
    assert calls == [(f"/bundle-{w}", b, j) for w in scale.WEIGHTS
                     for b, j in ((None, True), (925 * MiB, True), (600 * MiB, False))]
    assert r["generate_without_job"] == [f"{w} streamed" for w in scale.WEIGHTS]
    assert r["generate_after_job"] is False and "streamed" not in r["job_peak_bytes_by_weights"]["fp32"]
    assert r["generate_peak_bytes"]["int8"]["streamed"] == 350 * MiB

