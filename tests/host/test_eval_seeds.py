"""`edgeblock eval --seeds`: one run per seed, the means and min-max spread per row, targets on the means."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from edgeblock.cli import main
from edgeblock.eval.seeds import aggregate


def _run(rows: dict, wall: float = 1.0) -> dict:
    return {"rows": rows, "config": {"seed": 0}, "reference_check": {}, "per_subject": {}, "wall_s": wall}


def test_aggregate_means_spreads_and_targets_on_the_means():
    r0 = {"base": {"subject_fidelity": 0.1, "prompt_fidelity": 1.0, "peak_train_mib": None},
          "standard_lora": {"subject_fidelity": 0.50, "prompt_fidelity": 0.90, "peak_train_mib": 40.0},
          "blockskip": {"subject_fidelity": 0.46, "prompt_fidelity": 0.90, "peak_train_mib": 20.0}}
    r1 = {"base": {"subject_fidelity": 0.2, "prompt_fidelity": 1.0, "peak_train_mib": None},
          "standard_lora": {"subject_fidelity": 0.40, "prompt_fidelity": 0.80, "peak_train_mib": 40.0},
          "blockskip": {"subject_fidelity": 0.42, "prompt_fidelity": 0.86, "peak_train_mib": 22.0}}
    a = aggregate({3: _run(r0, 2.0), 7: _run(r1, 3.0)})
    assert a["seeds"] == [3, 7] and a["config"]["seed"] == "3,7" and a["wall_s"] == 5.0
    assert a["rows"]["blockskip"]["subject_fidelity"] == pytest.approx(0.44)
    assert a["spread"]["blockskip"]["subject_fidelity"] == [0.42, 0.46]
    assert a["rows"]["base"]["peak_train_mib"] is None and "peak_train_mib" not in a["spread"]["base"]
    # judged on the means: 0.44 / 0.45 = 0.978 >= 0.95 (seed 3 alone: 0.92, not met)
    assert a["targets"]["subject_fidelity_ratio"] == pytest.approx(0.44 / 0.45) and a["targets"]["met"]
    assert a["target_spread"]["subject_fidelity_ratio"] == pytest.approx([0.92, 1.05])
    assert a["per_seed"]["7"] == r1
    with pytest.raises(ValueError, match="rows"):
        aggregate({0: _run(r0), 1: _run({"base": r0["base"]})})


def test_eval_seeds_runs_each_seed_and_writes_the_aggregate(tmp_path, capsys):
    out = str(tmp_path / "ev")
    rc = main(["eval", "--out", out, "--quick", "--quiet", "--seeds", "0,1", "--rows", "base,standard_lora,blockskip"])
    assert rc == 0
    with open(os.path.join(out, "results.json")) as f:
        r = json.load(f)
    runs = {}
    for s in (0, 1):
        with open(os.path.join(out, f"seed-{s}", "results.json")) as f:
            runs[s] = json.load(f)
        assert runs[s]["config"]["seed"] == s
    for row in ("base", "standard_lora", "blockskip"):
        vals = [runs[s]["rows"][row]["subject_fidelity"] for s in (0, 1)]
        assert r["rows"][row]["subject_fidelity"] == pytest.approx(np.mean(vals))
        assert r["spread"][row]["subject_fidelity"] == pytest.approx([min(vals), max(vals)])
    assert runs[0]["rows"]["blockskip"] != runs[1]["rows"]["blockskip"]  # the seeds ran different draws
    assert r["targets"]["subject_fidelity_ratio"] == pytest.approx(
        r["rows"]["blockskip"]["subject_fidelity"] / r["rows"]["standard_lora"]["subject_fidelity"])
    md = open(os.path.join(out, "results.md")).read()
    assert "mean over seeds 0,1" in md and "## Spread over seeds" in md
    assert os.path.exists(os.path.join(out, "grid.png"))
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    assert "## Spread over seeds" in capsys.readouterr().out


def test_seed_and_seeds_together_is_an_error(tmp_path, capsys):
    assert main(["eval", "--out", str(tmp_path), "--quick", "--seed", "1", "--seeds", "0,1"]) == 2
    assert "--seeds" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--out", str(tmp_path), "--quick", "--seeds", "0,0"])
