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
