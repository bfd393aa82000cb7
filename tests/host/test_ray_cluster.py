"""`edgeblock select --ray` and `edgeblock eval --ray` on a real two-CPU Ray cluster on loopback (one per module):
the ranking and results.json equal the one-process runs, also when a worker is killed mid-run (the task retried),
and a task that fails twice fails the run by name with nothing written."""

from __future__ import annotations

import json
import os

import pytest

from edgeblock.cli import main
from pipelines import make_tiny_pipeline
from ray_faults import arm, disarm, start_cluster

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # as the Ray workers run: one intra-op thread each

SELECT = ["--res", "64", "--count", "2", "--noise-levels", "0.3,0.7", "--noises", "2", "--class-noun", "dog", "--quiet"]
EVAL = ["--quick", "--quiet", "--rows", "base,blockskip", "--seed", "0"]
TIMES = {"wall_s", "selection_s", "train_s", "gen_s", "total_s", "step_s"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    ray = pytest.importorskip("ray")
    faults = str(tmp_path_factory.mktemp("faults"))
    start_cluster(ray, faults)
    yield faults
    ray.shutdown()


@pytest.fixture(scope="module")
def select_local(tmp_path_factory):
    """The one-process selection on a tiny FLUX pipeline."""
    d = tmp_path_factory.mktemp("sel")
    pipe = make_tiny_pipeline("flux", d / "pipe")
    assert main(["select", "--model", pipe, "--out", str(d / "local.json"), *SELECT]) == 0
    return pipe, json.loads((d / "local.json").read_text())


@pytest.fixture(scope="module")
def eval_local(tmp_path_factory):
    """The one-process quick eval (base and blockskip, selection included), as results.json's text."""
    out = tmp_path_factory.mktemp("ev") / "local"
    assert main(["eval", "--out", str(out), *EVAL]) == 0
    return (out / "results.json").read_text()


def _select_ray(pipe, out) -> dict:
    assert main(["select", "--model", pipe, "--out", str(out), *SELECT, "--ray", "auto", "--ray-actors", "2"]) == 0
    return json.loads(out.read_text())


def _same_ranking(got: dict, want: dict) -> None:
    assert [r["block"] for r in got["ranking"]] == [r["block"] for r in want["ranking"]]
    assert got["selected"] == want["selected"] and got["calibration"] == want["calibration"]
    assert got["scores"] == pytest.approx(want["scores"], rel=0, abs=1e-6)


def _timeless(text: str) -> str:
    """results.json with the timings left out, keys in their order."""
    def strip(o):
        if isinstance(o, dict):
            return {k: strip(v) for k, v in o.items() if k not in TIMES}
        return [strip(v) for v in o] if isinstance(o, list) else o

    return json.dumps(strip(json.loads(text)))


def _no_partial_files(folder) -> None:
    assert not [f for f in os.listdir(folder) if ".tmp" in f]


def test_select_on_ray_ranks_as_one_process_with_an_actor_killed_mid_run(cluster, select_local, tmp_path):
    """Two actors score the tasks; one is killed in a masked pass, restarted, and its calls retried."""
    pipe, want = select_local
    arm(cluster)
    try:
        got = _select_ray(pipe, tmp_path / "ray.json")
    finally:
        killed = disarm(cluster)
    assert killed  # a masked pass did kill its actor's process
    _same_ranking(got, want)
    _no_partial_files(tmp_path)


def test_eval_on_ray_writes_the_one_process_results_with_a_task_killed_mid_run(cluster, eval_local, tmp_path):
    """Each (row, subject, seed) unit a task; the first one run kills its worker and is retried on another."""
    out = tmp_path / "ray"
    arm(cluster)
    try:
        assert main(["eval", "--out", str(out), *EVAL, "--ray", "auto", "--ray-cpus-per-task", "1"]) == 0
    finally:
        killed = disarm(cluster)
    assert killed  # a unit did kill its worker
    assert _timeless((out / "results.json").read_text()) == _timeless(eval_local)
    assert (out / "results.md").exists() and (out / "grid.png").exists()
    _no_partial_files(out)


def test_eval_task_failing_twice_fails_the_run_by_name_with_nothing_written(cluster, tmp_path, capsys):
    with open(os.path.join(cluster, "fail"), "w") as f:
        f.write("blockskip")
    try:
        rc = main(["eval", "--out", str(tmp_path / "ray"), *EVAL, "--ray", "auto"])
    finally:
        os.unlink(os.path.join(cluster, "fail"))
    assert rc == 2
    err = capsys.readouterr().err
    assert "eval(row blockskip, subject ringstar, seed 0)" in err and "injected failure of blockskip" in err
    assert not (tmp_path / "ray").exists() or not os.listdir(tmp_path / "ray")


def test_eval_device_row_on_ray_uses_the_bundle_the_driver_compiled(cluster, tmp_path):
    """A device row (the daemon's job code on a compiled bundle): the driver compiles the bundle into the output
    folder, the tasks use it; results.json equals the one-process run's, times and the folder's path aside."""
    device = ["--quick", "--quiet", "--runtime", "device", "--rows", "blockskip_device", "--seed", "0"]
    local, ray_out = tmp_path / "local", tmp_path / "ray"
    assert main(["eval", "--out", str(local), *device]) == 0
    assert main(["eval", "--out", str(ray_out), *device, "--ray", "auto", "--ray-cpus-per-task", "1"]) == 0

    def comparable(folder) -> str:
        text = (folder / "results.json").read_text().replace(str(folder), "OUT")
        return _timeless(text)

    def drop_compile_s(o):
        if isinstance(o, dict):
            return {k: drop_compile_s(v) for k, v in o.items() if k != "compile_s"}
        return [drop_compile_s(v) for v in o] if isinstance(o, list) else o

    got, want = (drop_compile_s(json.loads(comparable(f))) for f in (ray_out, local))
    assert got == want
    assert os.path.isfile(ray_out / "bundle" / "manifest.json")  # compiled once, by the driver, in the run's folder
    _no_partial_files(ray_out)
