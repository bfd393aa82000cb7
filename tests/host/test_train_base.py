"""The built-in model's training: presets (v10 is the shipped model's recipe), a curriculum of stages, stop-at and
resume, the random streams at a stage boundary, and the artifacts with their model card."""

import json
import math
import os
import shutil
from dataclasses import replace

import pytest
import torch

from edgeblock.builtin import card, presets, train_base
from edgeblock.builtin.artifacts import finalize
from edgeblock.builtin.checkpoint import load_ckpt, save_ckpt
from edgeblock.builtin.train_config import Stage, TrainConfig, build_model, model_config
from edgeblock.generate import model_meta
from edgeblock.models import objective_from_scheduler

SMOKE = presets.SMOKE
MODEL_DIR = os.path.join(os.path.dirname(train_base.__file__), "model")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """A smoke run of a 10-step budget stopped at step 3, then resumed to a 5-step budget and finalized."""
    out = str(tmp_path_factory.mktemp("smoke") / "m")
    train_base.main(["--preset", "smoke", "--out", out, "--steps", "10", "--stop-at", "3"])
    stopped = load_ckpt(os.path.join(out, "ckpt"))
    carded_before_resume = os.path.exists(os.path.join(out, "README.md"))
    train_base.main(["--preset", "smoke", "--out", out, "--steps", "5", "--resume"])
    return out, stopped, carded_before_resume


def test_shifted_noise_levels_are_sigmoid_z_plus_log_shift():
    z = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    t, s = torch.sigmoid(z), 3.0
    assert torch.allclose(s * t / (1 + (s - 1) * t), torch.sigmoid(z + math.log(s)), atol=1e-6)
    assert float((torch.sigmoid(z + math.log(s)) > 0.9).float().mean()) > 5 * float((t > 0.9).float().mean())


def test_preset_v10_is_the_shipped_models_recipe():
    v10 = train_base.config_from_args(train_base.parser().parse_args(["--preset", "v10", "--out", "x"]))
    assert v10 == presets.preset("v10") == train_base.config_from_args(train_base.parser().parse_args(["--out", "x"]))
    shipped = open(os.path.join(MODEL_DIR, "README.md")).read()
    # every row of the shipped card's table that the settings decide, as the card writer writes it for v10
    for name, row in card.recipe_rows(v10).items():
        assert row in shipped, name
    assert card.world_text(v10.stages) in shipped  # mix from step 0, the shapes' share 0.5, then 0.6 from 4500
    with open(os.path.join(MODEL_DIR, "transformer", "config.json")) as f:
        arch = json.load(f)
    assert {k: arch[k] for k in v10.model_config()} == v10.model_config()
    with open(os.path.join(MODEL_DIR, "scheduler", "scheduler_config.json")) as f:
        assert json.load(f)["shift"] == v10.t_shift
    # the card's reproduce section is the one command of this preset, stages at the shipped run's resumes
    assert card.reproduce_section(v10, "v10") in shipped
    assert "`python -m edgeblock.builtin.train_base --preset v10 --out sdk/edgeblock/builtin/model`" in shipped
    assert v10.starts() == [0, 2250, 4500] and "at steps 2250 and 4500" in shipped
    with pytest.raises(ValueError, match="unknown preset 'v9'; one of v10, smoke"):
        presets.preset("v9")
    with pytest.raises(SystemExit):
        train_base.main(["--preset", "v9", "--out", "x"])


def test_the_card_names_a_setting_once_unless_a_stage_changed_it():
    said = lambda v: f"w {v}"  # noqa: E731
    assert card.stage_text([(0, 4.0), (8000, 4.0), (9250, 4.0)], 1.0, said, "off") == "; w 4.0"
    changed = [(0, 1.0), (5, 4.0), (9, 4.0), (12, 1.0)]
    assert card.stage_text(changed, 1.0, said, "off") == "; from step 0: off; from step 5: w 4.0; from step 12: off"
    assert card.stage_text([(0, 1.0), (3, 1.0)], 1.0, said, "off") == ""


def test_stages_are_checked():
    with pytest.raises(ValueError, match="unknown world 'moon'"):
        Stage(None, "moon")
    with pytest.raises(ValueError, match=r"shapes_share must be in \[0, 1\], got 1.5"):
        Stage(None, "mix", 1.5)
    with pytest.raises(ValueError, match="only applies to world 'mix'"):
        Stage(None, "full", 0.3)
    for bad in ((Stage(3), Stage(2), Stage()), (Stage(3), Stage(5)), (Stage(), Stage()), ()):
        with pytest.raises(ValueError, match="stage"):
            replace(SMOKE, stages=bad)


def test_a_curriculum_of_stages_is_drawn_recorded_and_carded(tmp_path, capsys):
    out = str(tmp_path / "m")
    cfg = replace(SMOKE, steps=5, stages=(Stage(2, "shapes"), Stage(3, "full"), Stage(4, "mix"),
                                          Stage(None, "mix", 0.3)))
    train_base.train(cfg, out)  # no preset: a TrainConfig of its own
    said = capsys.readouterr().out
    assert all(f"stage {k}/4 from step {k}:" in said for k in (2, 3, 4)) and "stage 1/4" not in said
    st = load_ckpt(os.path.join(out, "ckpt"))
    assert TrainConfig.from_dict(st["train_config"]) == cfg and st["preset"] is None and st["resumed_at"] == []
    text = open(os.path.join(out, "README.md")).read()
    assert "Curriculum (`TrainConfig.stages`; the shapes world: a white shape on plain black" in text
    assert ("drawn): from step 0: the shapes world only; from step 2: the full world; from step 3: 50% of the "
            "draws from the shapes world, the rest from the full world; from step 4: 30% of the draws from the "
            "shapes world, the rest from the full world.") in text
    assert text.count("white shape") == 1  # the shapes world is described once, not per stage
    assert "Reproduce (a TrainConfig of its own, no preset" in text and f"`{cfg!r}`" in text
    assert "runs as 4 stages, from steps 0, 2, 3 and 4" in text


def test_the_card_names_a_plain_world_stage_and_describes_the_shapes_world_only_when_used():
    text = card.world_text((Stage(9000, "plain"), Stage(None, "full")))
    assert "from step 0: the full world on plain backgrounds only (no stripes or checks); from step 9000: the " \
           "full world." in text and "white shape" not in text
    assert "white shape on plain black" in card.world_text((Stage(5, "shapes"), Stage(None, "plain")))
    assert card.world_text((Stage(5, "full"), Stage(None, "full"))) == ""


def test_stop_at_ends_a_run_with_a_checkpoint_and_keeps_the_schedule(smoke_run):
    out, stopped, carded_before_resume = smoke_run
    assert stopped["step"] == 3 and not carded_before_resume  # no final artifacts at --stop-at
    # the learning rate of step 2 is the 10-step schedule's, not a 3-step one's (which would be at its floor)
    assert stopped["history"][-1][1] == pytest.approx(train_base.lr_at(2, 10, SMOKE.lr, SMOKE.warmup))
    assert stopped["history"][-1][1] > 0.5 * SMOKE.lr
    with pytest.raises(SystemExit):
        train_base.main(["--preset", "smoke", "--out", out, "--steps", "10", "--stop-at", "0"])
    with pytest.raises(ValueError, match="not after the checkpoint's step 5"):
        train_base.main(["--preset", "smoke", "--out", out, "--steps", "10", "--resume", "--stop-at", "5"])
    # a resume may change the budget, not the recipe
    with pytest.raises(ValueError, match=r"settings other than the checkpoint's \(seed\)"):
        train_base.main(["--preset", "smoke", "--out", out, "--steps", "10", "--resume", "--seed", "1"])
    with pytest.raises(ValueError, match="began with preset 'smoke'"):
        train_base.main(["--preset", "v10", "--out", out, "--resume", "--no-finalize"])
    st = load_ckpt(os.path.join(out, "ckpt"))
    assert st["step"] == 5 and st["resumed_at"] == [3] and st["preset"] == "smoke"
    text = open(os.path.join(out, "README.md")).read()
    assert "`python -m edgeblock.builtin.train_base --preset smoke --out sdk/edgeblock/builtin/model --steps 5`" in text
    assert "resumed (`--resume`) at step 3." in text and text.count("python -m edgeblock.builtin.train_base") == 1


def test_finalize_writes_the_time_shift_the_samplers_read_and_reads_back_the_generations(smoke_run, tmp_path):
    out = smoke_run[0]
    with open(os.path.join(out, "scheduler", "scheduler_config.json")) as f:
        sched = json.load(f)
    assert sched["shift"] == 3.0 and not sched["use_dynamic_shifting"]
    text = open(os.path.join(out, "README.md")).read()
    assert "; shifted by 3.0 towards noise" in text and "the shape's pixels weighted 4.0 x the background's" in text
    assert "0.5 of the batches area-downsampled to 32x32 (64 tokens, positional ids of their own token grid)" in text
    assert "each attribute left out of a caption with probability 0.3" in text
    # the card reads its own generations back: a table of accuracies and the shape confusion
    assert "| shape (chance 0.14) |" in text and "| asked | circle |" in text
    # and the same scenes asked without size and colour words, colour not scored
    partial = text.split("without their size and colour words")[1]
    assert "| shape (chance 0.14) |" in partial and "foreground colour" not in partial
    # the model directory is laid out like builtin: the samplers and personalization read the shift
    shutil.copy(os.path.join(MODEL_DIR, "edgeblock.json"), out)
    assert model_meta(out)["shift"] == 3.0
    assert objective_from_scheduler(sched, "flux").logit_mean == pytest.approx(math.log(3.0))
    # a checkpoint from before presets records no TrainConfig: finalize says how to record one
    old = str(tmp_path / "old")
    save_ckpt(old, {"config": {}, "args": {"t_shift": 3.0}, "step": 1, "history": [], "wall_s": 0.0})
    with pytest.raises(ValueError, match="records no TrainConfig"):
        finalize(str(tmp_path), old)


def test_dynamic_shift_trains_unshifted():
    flux = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "use_dynamic_shifting": True}
    assert objective_from_scheduler(flux, "flux").logit_mean == 0.0
    assert objective_from_scheduler({"_class_name": "FlowMatchEulerDiscreteScheduler"}, "flux").logit_mean == 0.0


def test_low_res_ids_sit_at_the_full_resolution_coordinates_of_the_same_places():
    from edge_runtime import flow

    full = flow.image_ids(16, 16).reshape(16, 16, 3)
    scaled = train_base.low_res_ids(32, "scaled").reshape(8, 8, 3)
    # each low-res token covers 2x2 full-res tokens: its id is their centre
    centres = (full[0::2, 0::2] + full[1::2, 1::2]) / 2
    assert (scaled == centres).all() and scaled[..., 0].max() == 0
    assert (train_base.low_res_ids(32, "grid") == flow.image_ids(8, 8)).all()
    with pytest.raises(ValueError, match="unknown low-res ids"):
        train_base.low_res_ids(32, "bogus")
    with pytest.raises(ValueError, match="unknown low_res_ids 'bogus'"):
        replace(SMOKE, low_res_ids="bogus")
    with pytest.raises(ValueError, match="low_res 24 must divide 64"):
        replace(SMOKE, low_res=24)


def test_the_reproduce_command_is_the_preset_and_the_flags_that_override_it():
    cmd = card.reproduce_command(replace(SMOKE, steps=7, max_minutes=30.0, seed=2, threads=2), "smoke")
    assert cmd == ("python -m edgeblock.builtin.train_base --preset smoke --out sdk/edgeblock/builtin/model "
                   "--steps 7 --max-minutes 30.0 --seed 2 --threads 2")
    assert card.reproduce_command(replace(presets.V10, max_minutes=None), "v10").endswith("--max-minutes 0")
    args = train_base.parser().parse_args(["--preset", "v10", "--out", "x", "--max-minutes", "0", "--steps", "9"])
    assert train_base.config_from_args(args) == replace(presets.V10, max_minutes=None, steps=9)
    # a setting no flag sets is named beside the command
    section = card.reproduce_section(replace(SMOKE, lr=0.01), "smoke")
    assert "with settings no flag sets changed from the preset" in section and "lr 0.01." in section


def test_a_stage_boundary_draws_as_a_stop_and_resume_did(tmp_path):
    """A stop/resume restarts the random streams from (seed, step), so the shipped run's resume at 2250 drew
    differently from a run without it; a stage boundary there restarts them the same way."""
    one = replace(SMOKE, stages=(Stage(None, "mix", 0.5),))
    two = replace(one, stages=(Stage(2, "mix", 0.5), Stage(None, "mix", 0.5)))

    def run(cfg, name, stop=None):
        out = str(tmp_path / name)
        torch.manual_seed(0)  # the initial weights come from torch's global generator
        if stop:
            train_base.train(cfg, out, stop_at=stop)
        train_base.train(cfg, out, resume=stop is not None, finalize_after=False)
        return load_ckpt(os.path.join(out, "ckpt"))

    straight, stopped, staged = run(one, "straight"), run(one, "stopped", stop=2), run(two, "staged")
    losses = lambda st: [h[0] for h in st["history"]]  # noqa: E731
    same = lambda a, b: all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # noqa: E731
    assert losses(straight)[:2] == losses(stopped)[:2] and losses(straight)[2:] != losses(stopped)[2:]
    assert not same(straight, stopped)
    assert losses(staged) == losses(stopped) and same(staged, stopped)


def test_fg_weight_weights_the_shapes_pixels_and_the_settings_are_checked_and_recorded(tmp_path):
    masks = torch.zeros(1, 1, 8, 8)
    masks[..., :2, :2] = 1.0
    w = torch.from_numpy(train_base.pixel_weights(masks.numpy(), 5.0))
    assert float(w.max()) == 5.0 and float(w.min()) == 1.0
    # an error only on the shape's pixels counts 5 x as much under the weighted mean as under plain MSE
    err_on_shape = (masks.expand(-1, 3, -1, -1) * 2.0) ** 2
    plain = float(err_on_shape.mean())
    weighted = float((err_on_shape * w).sum() / (w.expand(-1, 3, -1, -1).sum()))
    assert weighted > 3.0 * plain
    # flow_loss: unit weights are plain MSE; weights on the shape move the loss towards the shape's error
    from edge_runtime import flow

    torch.manual_seed(0)
    model = build_model(model_config(64, 32, 1, 1))
    x0, ids = torch.rand(2, 3, 8, 8) * 2 - 1, torch.from_numpy(flow.image_ids(2, 2))
    states, pooled = torch.randn(2, 4, 384), torch.randn(2, 384)
    args = (model, x0, states, pooled, torch.zeros(4, 3), ids)
    loss = lambda w: train_base.flow_loss(*args, torch.Generator().manual_seed(1), 1.0, w).item()  # noqa: E731
    assert loss(torch.ones(2, 1, 8, 8)) == pytest.approx(loss(None), rel=1e-6)
    assert loss(torch.from_numpy(train_base.pixel_weights(masks.expand(2, -1, -1, -1).numpy(), 50.0))) != \
        pytest.approx(loss(None), rel=1e-3)
    for bad, match in (({"fg_weight": 0.0}, "fg_weight must be > 0"), ({"t_shift": 0.0}, "t_shift must be > 0"),
                       ({"attr_dropout": 1.5}, r"attr_dropout must be in \[0, 1\]"),
                       ({"dim": 96}, "dim 96 must be a multiple of head_dim 64")):
        with pytest.raises(ValueError, match=match):
            replace(SMOKE, **bad)
    with pytest.raises(ValueError, match="dim 96 must be a multiple of head_dim 64"):
        model_config(96, 64)
    with pytest.raises(SystemExit):
        train_base.main(["--preset", "smoke", "--out", str(tmp_path), "--threads", "0"])
    out = str(tmp_path / "m")
    train_base.main(["--preset", "smoke", "--out", out, "--steps", "2", "--no-finalize"])
    st = load_ckpt(os.path.join(out, "ckpt"))
    recorded = TrainConfig.from_dict(st["train_config"])
    assert (recorded.fg_weight, recorded.attr_dropout, recorded.low_res) == (4.0, 0.3, 32)
    assert all(math.isfinite(h[0]) for h in st["history"])
