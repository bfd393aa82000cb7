"""Dynamic patch sampling: the schedule and the crops (numpy only)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_runtime.patch_sampling import PatchSampler, PatchSchedule, resize

SCHEDULES = [
    PatchSchedule("linear"),
    PatchSchedule("cosine", f_min=0.3),
    PatchSchedule("step", f_min=0.25, f_max=0.9, levels=4),
]


@pytest.mark.parametrize("sched", SCHEDULES, ids=lambda s: s.kind)
def test_schedule_is_monotone_and_in_bounds(sched):
    t = np.linspace(0, 1, 1001)
    f = sched.scale(t)
    assert np.all(np.diff(f) >= -1e-12)
    assert f.min() >= sched.f_min - 1e-12 and f.max() <= sched.f_max + 1e-12
    assert f[0] == pytest.approx(sched.f_min) and f[-1] == pytest.approx(sched.f_max)


def test_linear_default_matches_the_paper_form():
    s = PatchSchedule()
    assert s.scale(0.3) == pytest.approx(0.5 + 0.5 * 0.3)


def test_step_schedule_takes_its_levels():
    s = PatchSchedule("step", f_min=0.25, f_max=1.0, levels=4)
    assert sorted(set(np.round(s.scale(np.linspace(0, 1, 101)), 6))) == [0.25, 0.5, 0.75, 1.0]


@pytest.mark.parametrize(
    "kw,msg", [({"kind": "exp"}, "not one of"), ({"f_min": 0.0}, "f_min"), ({"f_min": 0.8, "f_max": 0.5}, "f_min"), ({"kind": "step", "levels": 1}, "levels")]
)
def test_bad_schedules_are_refused(kw, msg):
    with pytest.raises(ValueError, match=msg):
        PatchSchedule(**kw)


@settings(max_examples=200, deadline=None)
@given(
    h=st.integers(8, 96), w=st.integers(8, 96), t=st.floats(0, 1), seed=st.integers(0, 2**31 - 1),
)
def test_crops_stay_inside_the_image_and_follow_f(h, w, t, seed):
    sampler = PatchSampler(PatchSchedule(), train_res=8)
    box = sampler.crop_box(np.random.default_rng(seed), h, w, t)
    assert 0 <= box.top and box.top + box.size <= h
    assert 0 <= box.left and box.left + box.size <= w
    assert abs(box.size - sampler.schedule.scale(t) * min(h, w)) <= 0.5 + 1e-9


def test_sample_returns_the_training_resolution_and_the_crop_content():
    rng = np.random.default_rng(0)
    img = np.zeros((64, 64, 3), np.float32)
    img[:, :, 0] = np.arange(64)[None, :]  # a horizontal ramp
    out, box = PatchSampler(PatchSchedule(), train_res=16).sample(rng, img, t=0.0)
    assert out.shape == (16, 16, 3) and box.size == 32
    # The ramp's mean over the crop is preserved by the resize.
    assert out[:, :, 0].mean() == pytest.approx(box.left + (box.size - 1) / 2, abs=0.5)


def test_resize_is_antialiased():
    checker = (np.indices((64, 64)).sum(0) % 2).astype(np.float32)[:, :, None]
    small = resize(checker, 16)
    assert abs(small.mean() - 0.5) < 0.01 and small.std() < 0.05  # no aliasing pattern survives
