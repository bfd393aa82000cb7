"""`edgeblock eval --ablations` (issue 26): every ablation row is run, scored and trained as named, one change
away from the blockskip row."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from edgeblock.eval.ablations import ABLATION_ROWS, ablation_config
from edgeblock.eval.run import ROWS, EvalConfig
from edgeblock.method.selection import choose_blocks
from edgeblock.method.train import MethodConfig

TOP_K = 2  # blocks trained by blockskip and each ablation: leaves room for skip_first / skip_last to differ


@pytest.fixture(scope="module")
def eval_model(tmp_path_factory):
    """`builtin` where its weights are committed, else a random model laid out like it (behaviour only)."""
    from pixel_models import builtin_present, tiny_pixel_model

    if builtin_present():
        return "builtin"
    return tiny_pixel_model(tmp_path_factory.mktemp("pixel-model"))


class _Bar:
    """tqdm's stand-in: counts the steps the run reports against the total it announced."""

    seen: list = []

    def __init__(self, total, **_):
        self.total, self.n = total, 0
        _Bar.seen.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *_):
        return False

    def update(self, n=1):
        self.n += n

    def set_postfix_str(self, *_):
        pass


@pytest.fixture(scope="module")
def run(tmp_path_factory, eval_model):
    """One quick run through the CLI with --ablations; spies record, per trained row, its MethodConfig, trainable
    blocks, precompute calls, no-residual forwards and crops."""
    from edge_runtime import patch_sampling as ps
    from edgeblock.cli import main
    from edgeblock.eval import run as run_mod
    from edgeblock.method import blockskip as bs_mod
    from edgeblock.method import train as train_mod

    rec: dict = {"row": None, "cfg": {}, "trainable": {}, "precompute": {}, "dropped": {}, "crops": {}}
    train, precompute, dropped, sample = (run_mod.Runner._train, train_mod.precompute,
                                          bs_mod.BlockSkipModel.forward_dropped, ps.PatchSampler.sample)

    def spy_train(self, variant, mcfg, *a, **k):
        rec["row"] = variant
        rec["cfg"][variant] = mcfg
        trainer = train(self, variant, mcfg, *a, **k)
        rec["trainable"][variant] = trainer.plan.trainable
        rec["row"] = None
        return trainer

    def count(key):
        rec[key][rec["row"]] = rec[key].get(rec["row"], 0) + 1

    def spy_sample(self, rng, image, t):
        img, box = sample(self, rng, image, t)
        rec["crops"].setdefault(rec["row"], []).append((box, image.shape[0], float(t)))
        return img, box

    out = tmp_path_factory.mktemp("ablations") / "eval"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_mod.Runner, "_train", spy_train)
        mp.setattr(train_mod, "precompute", lambda *a, **k: (count("precompute"), precompute(*a, **k))[1])
        mp.setattr(bs_mod.BlockSkipModel, "forward_dropped", lambda *a, **k: (count("dropped"), dropped(*a, **k))[1])
        mp.setattr(ps.PatchSampler, "sample", spy_sample)
        mp.setattr(run_mod, "tqdm", _Bar)
        _Bar.seen.clear()
        rc = main(["eval", "--out", str(out), "--model", eval_model, "--quick", "--quiet", "--ablations",
                   "--top-k", str(TOP_K)])
    assert rc == 0
    rec["results"] = json.loads((out / "results.json").read_text())
    rec["md"] = (out / "results.md").read_text()
    rec["bar"] = _Bar.seen[-1]
    return rec


def _changed(row_cfg: MethodConfig, ref: MethodConfig) -> set[str]:
    return {f.name for f in dataclasses.fields(MethodConfig) if getattr(row_cfg, f.name) != getattr(ref, f.name)}


@pytest.mark.slow
def test_every_ablation_row_is_run_and_scored(run):
    res = run["results"]
    assert list(res["rows"]) == list(ROWS) + list(ABLATION_ROWS)  # the configured rows first, then the ablations
    assert res["config"]["ablations"] is True and res["config"]["rows"] == list(ROWS) + list(ABLATION_ROWS)
    keys = set(res["rows"]["blockskip"])
    for name in ABLATION_ROWS:
        row = res["rows"][name]
        assert set(row) == keys, name  # the same metric keys as the existing rows
        for k in ("subject_fidelity", "prompt_fidelity", "first_loss", "final_loss", "step_s", "peak_train_mib"):
            assert np.isfinite(row[k]), (name, k, row[k])
        assert 0.0 <= row["subject_fidelity"] <= 1.0 and 0.0 <= row["prompt_fidelity"] <= 1.0
    ((_, subj),) = res["per_subject"].items()
    assert set(subj["rows"]) == set(ROWS) | set(ABLATION_ROWS)
    assert res["targets"]["met"] is not None  # issue 3's targets are judged as before
    assert run["bar"].n == run["bar"].total  # the progress bar's total counts the ablation rows' steps
    md = run["md"]
    main_table, ablations = md.split("## Ablations")
    assert all(f"| {r} |" in main_table for r in ROWS) and not any(f"| {r} |" in main_table for r in ABLATION_ROWS)
    for name in ABLATION_ROWS:
        d = res["rows"][name]["subject_fidelity"] - res["rows"]["blockskip"]["subject_fidelity"]
        assert f"| {name} | " in ablations and f"| {d:+.3f} |" in ablations, name


@pytest.mark.slow
def test_each_ablation_row_differs_from_blockskip_in_one_thing(run):
    cfg, ref = run["cfg"], run["cfg"]["blockskip"]
    assert _changed(cfg["no_residuals"], ref) == {"residuals"} and cfg["no_residuals"].residuals is False
    for row in ("schedule_shrinking", "schedule_random", "resize_only"):
        assert _changed(cfg[row], ref) == {"schedule"}, row
    assert cfg["schedule_shrinking"].schedule == dataclasses.replace(ref.schedule, kind="shrinking")
    assert cfg["schedule_random"].schedule == dataclasses.replace(ref.schedule, kind="random")
    assert (cfg["resize_only"].schedule.f_min, cfg["resize_only"].schedule.f_max) == (1.0, 1.0)
    for row in ("skip_first", "skip_last", "selection_contiguous"):
        assert _changed(cfg[row], ref) <= {"blocks"}, row  # the same blocks as selection's, where they coincide


@pytest.mark.slow
def test_no_residuals_never_precomputes_and_drops_the_skipped_blocks(run):
    pre, dropped = run["precompute"], run["dropped"]
    steps = run["results"]["config"]["steps"]
    assert "no_residuals" not in pre and dropped == {"no_residuals": steps}
    for row in ("skip", "blockskip", *(r for r in ABLATION_ROWS if r != "no_residuals")):
        assert pre.get(row) == steps, row  # every other skip row precomputes once per step


@pytest.mark.slow
def test_the_schedule_rows_crop_as_named(run):
    crops = run["crops"]
    sched = run["cfg"]["blockskip"].schedule
    span = sched.f_max - sched.f_min
    for box, side, t in crops["schedule_shrinking"]:
        assert box.size == max(1, round((sched.f_max - span * t) * side))
    shrink = sorted((t, box.size) for box, _, t in crops["schedule_shrinking"])
    assert shrink[0][1] > shrink[-1][1]  # the crop falls as the noise level rises
    random = [(box.size, side) for box, side, _ in crops["schedule_random"]]
    assert all(round(sched.f_min * side) <= s <= round(sched.f_max * side) for s, side in random)
    assert all(box.size == side and box.top == box.left == 0 for box, side, _ in crops["resize_only"])
    for box, side, t in crops["blockskip"]:  # the row they are judged against keeps the recipe's schedule
        assert box.size == max(1, round(float(sched.scale(t)) * side))


@pytest.mark.slow
def test_the_block_rows_train_the_blocks_named(run):
    res, trainable = run["results"], run["trainable"]
    ((_, subj),) = res["per_subject"].items()
    n, k = len(subj["block_scores"]), TOP_K
    assert trainable["blockskip"] == tuple(subj["blocks"]) and len(subj["blocks"]) == k
    assert trainable["skip_first"] == tuple(range(n - k, n))  # the first blocks skipped
    assert trainable["skip_last"] == tuple(range(k))  # the last blocks skipped
    window = trainable["selection_contiguous"]
    assert window == tuple(range(window[0], window[0] + k))
    assert list(window) == choose_blocks(subj["block_scores"], k, contiguous=True)
    for row in ("no_residuals", "schedule_shrinking", "schedule_random", "resize_only"):
        assert trainable[row] == trainable["blockskip"], row
    # the record keeps each ablation row's blocks where they differ from selection's
    differ = {r: list(trainable[r]) for r in ABLATION_ROWS if trainable[r] != trainable["blockskip"]}
    assert subj.get("ablation_blocks", {}) == differ


def test_ablations_add_blockskip_and_every_ablation_row_and_rows_may_name_them():
    cfg = EvalConfig.make("builtin", quick=True, ablations=True, rows=("base",))
    assert cfg.rows == ("base", "blockskip", *ABLATION_ROWS)
    assert EvalConfig.make("builtin", rows=("skip_last", "no_residuals")).rows == ("no_residuals", "skip_last")
    assert EvalConfig.make("builtin").rows == ROWS and EvalConfig().ablations is False
    with pytest.raises(ValueError, match="rows must be"):
        EvalConfig.make("builtin", rows=("no_residual",))


def test_ablation_config_changes_one_thing():
    ref = MethodConfig("blockskip", blocks=(1, 2, 3))
    scores = [0.0, 0.1, 0.9, 0.2, 0.8, 0.7]
    assert ablation_config("skip_first", ref, None, 3, 6).blocks == (3, 4, 5)
    assert ablation_config("skip_last", ref, None, 3, 6).blocks == (0, 1, 2)
    assert ablation_config("selection_contiguous", ref, scores, 3, 6).blocks == (2, 3, 4)
    assert ablation_config("no_residuals", ref, None, 3, 6) == dataclasses.replace(ref, residuals=False)
    with pytest.raises(ValueError, match="one selection score per block"):
        ablation_config("selection_contiguous", ref, None, 3, 6)
    with pytest.raises(ValueError, match="not one of"):
        ablation_config("skip_middle", ref, None, 3, 6)
    with pytest.raises(ValueError, match="blockskip"):
        ablation_config("skip_first", dataclasses.replace(ref, variant="skip"), None, 3, 6)
