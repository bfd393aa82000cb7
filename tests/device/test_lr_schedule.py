"""Learning-rate schedules of a job (edge_runtime.lr_schedule): the values, the checks, and that both trainer
backends train each step at the schedule's rate (a resumed job included)."""

from __future__ import annotations

import math

import pytest
from daemon_util import subject_pngs

from edge_runtime.lr_schedule import LR_SCHEDULES, check_schedule, lr_at


def test_values():
    assert [lr_at(i, 10, 1.0) for i in range(10)] == [1.0] * 10
    assert [lr_at(i, 10, 2.0, "constant", 4) for i in range(5)] == [0.5, 1.0, 1.5, 2.0, 2.0]  # warmup, then base
    lin = [lr_at(i, 10, 1.0, "linear", 2) for i in range(10)]
    assert lin[:2] == [0.5, 1.0] and lin[2] == 1.0 and lin[-1] == pytest.approx(1 / 8)
    assert all(a > b for a, b in zip(lin[2:], lin[3:]))  # falls after the warmup, never to 0 within the job
    cos = [lr_at(i, 10, 1.0, "cosine") for i in range(10)]
    assert cos[0] == 1.0 and cos[5] == pytest.approx(0.5) and cos[-1] == pytest.approx((1 + math.cos(0.9 * math.pi)) / 2)
    assert all(a > b for a, b in zip(cos, cos[1:]))
    assert lr_at(3, 3, 1.0, "linear", 3) == pytest.approx(1.0)  # warmup as long as the job: past it, p = 0
    assert set(LR_SCHEDULES) == {"constant", "cosine", "linear"}


def test_checks():
    check_schedule("cosine", 0, 10)
    check_schedule("linear", 10, 10)
    with pytest.raises(ValueError, match="lr_schedule must be one of constant, cosine, linear"):
        check_schedule("step", 0, 10)
    with pytest.raises(ValueError, match="warmup_steps"):
        check_schedule("cosine", 11, 10)
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_at(5, 10, 1.0, "exponential")


@pytest.mark.parametrize("backend", ["ort", "torch"])
def test_each_step_trains_at_the_schedules_rate_and_a_resumed_job_keeps_it(builtin_bundle, tmp_path, backend,
                                                                          monkeypatch):
    pytest.importorskip("onnxruntime.training")
    from edge_runtime import personalize
    from edge_runtime.personalize import ImageLimits, JobOptions, PersonalizeError, decode_images, run_job
    from edge_runtime.runtime import Bundle

    rates: list[float] = []
    real = personalize.make_trainer

    def spying(*a, **kw):
        t = real(*a, **kw)
        set_lr = t.set_learning_rate

        def record(lr):
            rates.append(lr)
            set_lr(lr)

        t.set_learning_rate = record
        return t

    monkeypatch.setattr(personalize, "make_trainer", spying)
    b = Bundle(builtin_bundle[0], threads=1)
    images, _ = decode_images(subject_pngs(2), ImageLimits(), int(b.manifest.gen_res))
    opts = JobOptions(token="sks", class_noun="ring", steps=6, learning_rate=4e-3, seed=3, checkpoint_every=3,
                      lr_schedule="cosine", warmup_steps=2)
    want = [lr_at(i, 6, 4e-3, "cosine", 2) for i in range(6)]
    straight = run_job(b, opts, images, str(tmp_path / "a"), trainer_backend=backend)
    assert rates == pytest.approx(want, rel=1e-12)
    rates.clear()
    # the same job resumed from its checkpoint of step 3 runs steps 4-6 at the rates they have in one run
    again = run_job(b, opts, images, str(tmp_path / "a"), trainer_backend=backend, start_step=3)
    assert rates == pytest.approx(want[3:], rel=1e-12)
    assert max(float(abs(again.weights[n] - straight.weights[n]).max()) for n in straight.weights) <= 1e-6
    constant = run_job(b, JobOptions(**{**opts.__dict__, "lr_schedule": "constant", "warmup_steps": 0}), images,
                       str(tmp_path / "c"), trainer_backend=backend)
    assert max(float(abs(constant.weights[n] - straight.weights[n]).max()) for n in straight.weights) > 1e-6
    with pytest.raises(PersonalizeError, match="warmup_steps"):
        JobOptions(token="sks", class_noun="ring", steps=6, learning_rate=4e-3, seed=3, checkpoint_every=3,
                   warmup_steps=7)
