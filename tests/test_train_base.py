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
