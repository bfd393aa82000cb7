"""The built-in model's training script: a tiny run, a resume that changes the time shift, the artifacts."""

import json
import math
import os
import shutil

import pytest
import torch

from edgeblock.builtin import train_base
from edgeblock.generate import model_meta
from edgeblock.models import objective_from_scheduler

TINY = ["--dim", "64", "--double", "1", "--single", "1", "--threads", "1", "--batch", "2", "--log-every", "1"]


def test_shifted_noise_levels_are_sigmoid_z_plus_log_shift():
    z = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    t, s = torch.sigmoid(z), 3.0
    assert torch.allclose(s * t / (1 + (s - 1) * t), torch.sigmoid(z + math.log(s)), atol=1e-6)
    assert float((torch.sigmoid(z + math.log(s)) > 0.9).float().mean()) > 5 * float((t > 0.9).float().mean())


def test_the_card_names_a_setting_once_unless_a_stage_changed_it():
    def st(step, **a):
        return {"start_step": step, "args": a}

    said = lambda v: f"w {v}"  # noqa: E731
    same = [st(0, fg_weight=4.0), st(8000, fg_weight=4.0), st(9250, fg_weight=4.0)]
    assert train_base.stage_text(same, "fg_weight", 1.0, said, "off") == "; w 4.0"
    changed = [st(0, fg_weight=1.0), st(5, fg_weight=4.0), st(9, fg_weight=4.0), st(12, fg_weight=1.0)]
    assert train_base.stage_text(changed, "fg_weight", 1.0, said, "off") == "; from step 0: off; from step 5: w 4.0; from step 12: off"
    assert train_base.stage_text([st(0), st(3)], "fg_weight", 1.0, said, "off") == ""  # absent (older checkpoints): neutral


def test_a_curriculum_stage_on_the_shapes_world_is_recorded_and_carded(tmp_path):
    out = str(tmp_path / "m")
    with pytest.raises(SystemExit):
        train_base.main(["--out", out, "--steps", "2", "--no-finalize", "--world", "moon", *TINY])
    train_base.main(["--out", out, "--steps", "2", "--no-finalize", "--world", "shapes", *TINY])
    train_base.main(["--out", out, "--steps", "3", "--resume", *TINY])
    st = torch.load(os.path.join(out, "ckpt", "last.pt"), weights_only=False)
    assert [(s["start_step"], s["args"]["world"]) for s in st["stages"]] == [(0, "shapes"), (2, "full")]
    assert train_base.reproduce_command(st["stages"][0]["args"]).endswith("--world shapes")
    assert "--world" not in train_base.reproduce_command(st["stages"][1]["args"], resume=True)
    card = open(os.path.join(out, "README.md")).read()
    assert "Curriculum (`--world`; the shapes world: a white shape on plain black" in card
    assert "drawn): from step 0: the shapes world only; from step 2: the full world." in card
    assert card.count("white shape") == 1  # the shapes world is described once, not per stage
    train_base.main(["--out", out, "--steps", "4", "--resume", "--world", "mix", *TINY])
    card = open(os.path.join(out, "README.md")).read()
    assert "from step 3: 50% of the draws from the shapes world, the rest from the full world" in card
    assert "--world mix --resume" in card
    for bad in (["--shapes-share", "1.5", "--world", "mix"], ["--shapes-share", "0.3"]):  # range; mix only
        with pytest.raises(SystemExit):
            train_base.main(["--out", out, "--steps", "5", "--resume", *bad, *TINY])
    train_base.main(["--out", out, "--steps", "5", "--resume", "--world", "mix", "--shapes-share", "0.3", *TINY])
    card = open(os.path.join(out, "README.md")).read()
    assert "from step 4: 30% of the draws from the shapes world" in card
    assert "--world mix --shapes-share 0.3 --resume" in card
    # every stage but the last stops where the next one resumed: the reproduce commands run as written
    assert "--world shapes --stop-at 2`" in card and "--stop-at 3 --resume`" in card and "--stop-at 4 --resume`" in card
    assert "--stop-at 5" not in card


def test_the_card_names_a_plain_world_stage_and_describes_the_shapes_world_only_when_used():
    st = lambda step, w: {"start_step": step, "args": {"world": w}}  # noqa: E731
    text = train_base.world_text([st(0, "plain"), st(9000, "full")])
    assert "from step 0: the full world on plain backgrounds only (no stripes or checks); from step 9000: the " \
           "full world." in text and "white shape" not in text
    assert "white shape on plain black" in train_base.world_text([st(0, "shapes"), st(5, "plain")])
    assert train_base.world_text([st(0, "full"), st(5, "full")]) == ""


def test_stop_at_ends_a_stage_with_a_checkpoint_and_keeps_the_schedule(tmp_path):
    out = str(tmp_path / "m")
    with pytest.raises(SystemExit):
        train_base.main(["--out", out, "--steps", "10", "--stop-at", "0", *TINY])
    train_base.main(["--out", out, "--steps", "10", "--warmup", "1", "--stop-at", "3", *TINY])
    st = torch.load(os.path.join(out, "ckpt", "last.pt"), weights_only=False)
    assert st["step"] == 3 and not os.path.exists(os.path.join(out, "README.md"))  # no final artifacts
    # the learning rate of step 2 is the 10-step schedule's, not a 3-step one's (which would be at its floor)
    assert st["history"][-1][1] == pytest.approx(train_base.lr_at(2, 10, st["args"]["lr"], 1))
    assert st["history"][-1][1] > 0.5 * st["args"]["lr"]
    with pytest.raises(ValueError, match="not after the checkpoint's step 3"):
        train_base.main(["--out", out, "--steps", "10", "--resume", "--stop-at", "3", *TINY])
    train_base.main(["--out", out, "--steps", "4", "--resume", *TINY])
    assert os.path.exists(os.path.join(out, "README.md"))
    card = open(os.path.join(out, "README.md")).read()
    assert "--steps 10 --lr" in card and "--stop-at 3`" in card and "--steps 4 --lr" in card


def test_resume_with_a_time_shift_records_both_stages(tmp_path):
    out = str(tmp_path / "m")
    train_base.main(["--out", out, "--steps", "2", "--no-finalize", "--low-res", "32", "--low-res-prob", "1", *TINY])
    with pytest.raises(SystemExit):
        train_base.main(["--out", out, "--steps", "4", "--resume", "--t-shift", "0", *TINY])
    train_base.main(["--out", out, "--steps", "4", "--resume", "--t-shift", "3", *TINY])
    st = torch.load(os.path.join(out, "ckpt", "last.pt"), weights_only=False)
    assert st["step"] == 4 and [s["start_step"] for s in st["stages"]] == [0, 2]
    assert [s["args"]["t_shift"] for s in st["stages"]] == [1.0, 3.0]
    with open(os.path.join(out, "scheduler", "scheduler_config.json")) as f:
        sched = json.load(f)
    assert sched["shift"] == 3.0 and not sched["use_dynamic_shifting"]
    card = open(os.path.join(out, "README.md")).read()
    assert "from step 2: shifted by 3.0" in card and card.count("python -m edgeblock.builtin.train_base") == 2
    assert "--t-shift 3.0 --resume" in card
    assert "--low-res 32 --low-res-prob 1.0 --low-res-ids scaled" in card.split("- from step 0:")[1].split("- from step 2:")[0]
    # the card reads its own generations back: a table of accuracies and the shape confusion
    assert "| shape (chance 0.14) |" in card and "| asked | circle |" in card
    # and the same scenes asked without size and colour words, colour not scored
    partial = card.split("without their size and colour words")[1]
    assert "| shape (chance 0.14) |" in partial and "foreground colour" not in partial
    # the model directory is laid out like builtin: the samplers and personalization read the shift
    shutil.copy(os.path.join(train_base.__file__.rsplit(os.sep, 1)[0], "model", "edgeblock.json"), out)
    assert model_meta(out)["shift"] == 3.0
    assert objective_from_scheduler(sched, "flux").logit_mean == pytest.approx(math.log(3.0))


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
    cmd = train_base.reproduce_command({"steps": 5, "lr": 1e-3, "batch": 2, "seed": 0, "dim": 64, "double": 1,
                                        "single": 1, "low_res": 32, "low_res_prob": 0.5})
    assert cmd.endswith("--low-res 32 --low-res-prob 0.5 --low-res-ids grid")  # recorded before the option: grid


def test_fg_weight_weights_the_shapes_pixels_and_it_and_attr_dropout_are_recorded(tmp_path):
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
    model = train_base.build_model(train_base.model_config(64, 32, 1, 1))
    x0, ids = torch.rand(2, 3, 8, 8) * 2 - 1, torch.from_numpy(flow.image_ids(2, 2))
    states, pooled = torch.randn(2, 4, 384), torch.randn(2, 384)
    args = (model, x0, states, pooled, torch.zeros(4, 3), ids)
    loss = lambda w: train_base.flow_loss(*args, torch.Generator().manual_seed(1), 1.0, w).item()
    assert loss(torch.ones(2, 1, 8, 8)) == pytest.approx(loss(None), rel=1e-6)
    assert loss(torch.from_numpy(train_base.pixel_weights(masks.expand(2, -1, -1, -1).numpy(), 50.0))) != \
        pytest.approx(loss(None), rel=1e-3)
    out = str(tmp_path / "m")
    with pytest.raises(SystemExit):
        train_base.main(["--out", out, "--steps", "2", "--no-finalize", "--fg-weight", "0", *TINY])
    with pytest.raises(SystemExit):
        train_base.main(["--out", out, "--steps", "2", "--no-finalize", "--attr-dropout", "1.5", *TINY])
    train_base.main(["--out", out, "--steps", "2", "--no-finalize", "--fg-weight", "4", "--low-res", "32",
                     "--low-res-prob", "0.5", "--attr-dropout", "0.3", *TINY])
    st = torch.load(os.path.join(out, "ckpt", "last.pt"), weights_only=False)
    assert st["stages"][0]["args"]["fg_weight"] == 4.0 and all(math.isfinite(h[0]) for h in st["history"])
    assert "--fg-weight 4.0 --attr-dropout 0.3" in train_base.reproduce_command(st["stages"][0]["args"])
