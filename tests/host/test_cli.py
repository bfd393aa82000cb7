"""The command line: select on a saved diffusers pipeline, and clear errors for bad models."""

from __future__ import annotations

import json
import os

import pytest

from edgeblock.cli import main
from pipelines import make_tiny_pipeline


@pytest.mark.parametrize(("fam", "top_k"), [("flux", 3), ("pixart", None)])
def test_select_writes_a_ranked_report_and_chart(tmp_path, fam, top_k, capsys):
    """--top-k picks how many are selected; without it, the model's recipe (a model with no measured recipe
    gets the paper's: 2)."""
    pipe = make_tiny_pipeline(fam, tmp_path / "pipe")
    out = tmp_path / "sel.json"
    k_args = ["--top-k", str(top_k)] if top_k else []
    rc = main([
        "select", "--model", str(pipe), "--out", str(out), "--res", "64", "--count", "2",
        "--noise-levels", "0.5", "--noises", "1", "--class-noun", "dog", "--quiet", *k_args,
    ])
    assert rc == 0
    rep = json.loads(out.read_text())
    n = rep["num_blocks"]
    assert [r["rank"] for r in rep["ranking"]] == list(range(1, n + 1))
    scores = [r["score"] for r in rep["ranking"]]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0
    assert len(rep["selected"]) == (top_k or 2) and set(rep["selected"]) <= set(range(n))
    assert rep["family"] == fam and rep["calibration"]["items"] == 2
    assert os.path.getsize(tmp_path / "sel.png") > 0
    assert "selected blocks" in capsys.readouterr().out


def test_select_refuses_a_missing_model(tmp_path, capsys):
    rc = main(["select", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "s.json")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "no such directory" in err and "builtin" in err
    assert not (tmp_path / "s.json").exists()


def test_select_refuses_a_directory_without_transformer(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "vae").mkdir()
    rc = main(["select", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "s.json")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "has no transformer" in err and "vae" in err


def test_unknown_transformer_class_is_named(tmp_path, capsys):
    d = tmp_path / "m" / "transformer"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    rc = main(["select", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "s.json")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "UNet2DConditionModel" in err and "FluxTransformer2DModel" in err


@pytest.mark.parametrize("command", [["select", "--model", "builtin", "--out", "s.json"],
                                     ["compile", "--model", "builtin", "--out", "b"]])
def test_top_k_below_one_is_a_usage_error(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command, "--top-k", "0"])
    assert e.value.code == 2
    assert "--top-k" in capsys.readouterr().err


def test_bad_blocks_argument_is_explained(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "memory", "--blocks", "a,b"])
    assert "comma-separated block indices" in capsys.readouterr().err


def test_bench_daemon_flags_are_refused_on_the_other_benchmarks(capsys):
    """--weights/--train-res/--gen-res/--generation/--no-torch configure `bench daemon` only; elsewhere they are an
    error before any work, not silently ignored."""
    rc = main(["bench", "scale", "--configs", "flux-0.1b", "--weights", "int8", "--no-torch"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--weights, --no-torch: only `edgeblock bench daemon` takes these" in err
    assert main(["bench", "memory", "--generation", "streamed"]) == 2
    assert "--generation" in capsys.readouterr().err


def test_bench_daemon_streams_under_a_budget_between_the_predicted_peaks():
    """--generation streamed needs a budget between the predicted streamed and resident peaks: refused (before a
    daemon starts) when the bundle predicts no streamed generation below its resident one."""
    from edgeblock.bench import daemon

    from edge_runtime.memory_plan import MemoryPlan

    def plan(streamed: int, rows: int = 100) -> MemoryPlan:
        return MemoryPlan.from_dict({
            "planner_target": "host-cpu", "measured_on_target": True, "weights": "fp32", "runtime_bytes": 1,
            "job_peak_bytes": {"bank": 5, "online": 5},
            "generate": {"resident": {"64": {"peak_bytes": 100, "weights_bytes": 1, "rows_peak_bytes": rows}},
                         "streamed": {"64": {"peak_bytes": streamed, "weights_bytes": 1}}}})

    assert daemon.mode_budget(plan(100), "streamed", 64) is None
    assert daemon.mode_budget(plan(60), "streamed", 64) == 80
    # the job the benchmark runs first in the same daemon must be admitted under the budget too
    assert daemon.mode_budget(plan(60), "streamed", 64, job_bytes=90) == 95
    assert daemon.mode_budget(plan(60), "streamed", 64, job_bytes=100) is None
    # resident_rows: between the rows peak and the resident one; streamed below the rows peak
    assert daemon.mode_budget(plan(60), "resident_rows", 64) is None
    assert daemon.mode_budget(plan(60, rows=80), "resident_rows", 64) == 90
    assert daemon.mode_budget(plan(60, rows=80), "resident_rows", 64, job_bytes=90) == 95
    assert daemon.mode_budget(plan(60, rows=80), "streamed", 64) == 70
    with pytest.raises(ValueError, match="generation 'sometimes'"):
        daemon.run("builtin", generation="sometimes")
