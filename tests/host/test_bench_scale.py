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
    assert "| flux-0.1b | 120M | 2000 | 500 (0.250; pred +10%) | 1400 (+0%) | 600 (-10%) | 700 (+10%) | - |" in t


def test_cli_refuses_an_unknown_configuration():
    r = subprocess.run([sys.executable, "-m", "edgeblock.cli", "bench", "scale", "--configs", "flux-9b"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "flux-9b" in r.stderr and "flux-0.5b" in r.stderr
