"""`edgeblock bench memory --json` runs every variant in its own process and reports the figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from edgeblock.models.presets import TINY


def test_variant_names_match_the_method():
    from edgeblock.bench import memory
    from edgeblock.method.train import VARIANTS

    assert memory.VARIANTS == VARIANTS


def test_bench_memory_json_on_a_tiny_flux(tmp_path):
    preset = TINY["flux"]
    model = preset.build(seed=0)
    model.save_pretrained(tmp_path, safe_serialization=True)
    (tmp_path / "edgeblock.json").write_text(
        json.dumps({"latent_channels": preset.latent_channels, "latent_size": preset.latent_size, "text_len": 8})
    )
    proc = subprocess.run(
        [sys.executable, "-m", "edgeblock.cli", "bench", "memory", "--model", str(tmp_path), "--blocks", "2,3", "--json",
         "--runtime", "ort"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "EDGEBLOCK_CACHE": str(tmp_path / "cache")},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    for v in ("standard_lora", "patch", "skip", "blockskip"):
        r = out[v]
        assert set(r) >= {"peak_bytes", "peak_rss_bytes", "step_s", "precompute_s"}
        assert r["peak_bytes"] > 0 and r["step_s"] > 0
        assert (r["precompute_s"] > 0) == (v in ("skip", "blockskip"))
    assert out["standard_lora"]["tokens"] == 64 and out["blockskip"]["tokens"] == 16  # (16/2)^2 and (8/2)^2
    assert out["skip"]["trainable_blocks"] == [2, 3]
    # Fewer tokens and fewer blocks hold fewer tensor bytes.
    assert out["patch"]["peak_bytes"] < out["standard_lora"]["peak_bytes"]
    assert out["blockskip"]["peak_bytes"] < out["skip"]["peak_bytes"] < out["standard_lora"]["peak_bytes"]
    assert 0 < out["ratios"]["blockskip_peak_bytes_vs_standard"] < 1
    # --runtime ort: the device trainer (ONNX Runtime, no torch in its process) on the same first draw
    o = out["ort_blockskip"]
    assert o["host_frameworks_loaded"] == [] and o["tokens"] == 16
    assert o["peak_rss_bytes"] > 0 and o["step_s"] > 0 and o["trainable_lora_tensors"] > 0
    b = out["blockskip"]["loss"]
    assert abs(o["loss"] - b) <= 1e-4 * abs(b)  # B = 0: both start at the base model's loss on that draw
    assert set(out["ort_vs_torch_blockskip"]) == {"peak_rss", "step_time"}
