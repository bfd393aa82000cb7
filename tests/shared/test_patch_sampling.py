"""Dynamic patch sampling: the schedule and the crops (numpy only)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_runtime.patch_sampling import CropBox, PatchSampler, PatchSchedule, resize

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


# ---- the paper's ablation schedules (edgeblock eval --ablations) ------------------------------------


def _sizes(sched, ts, side=64, seed=0):
    rng = np.random.default_rng(seed)
    return np.array([PatchSampler(sched, train_res=16).crop_box(rng, side, side, float(t)).size for t in ts])


def test_shrinking_crops_fall_with_the_noise_level_where_the_growing_ones_rise():
    ts = np.linspace(0, 1, 41)
    grow = _sizes(PatchSchedule("linear", f_min=0.25), ts)
    shrink = _sizes(PatchSchedule("shrinking", f_min=0.25), ts)
    assert np.all(np.diff(grow) >= 0) and grow[0] == 16 and grow[-1] == 64
    assert np.all(np.diff(shrink) <= 0) and shrink[0] == 64 and shrink[-1] == 16
    assert np.array_equal(shrink, grow[::-1])  # f_max - span t is the linear one mirrored in t
    assert PatchSchedule("shrinking", f_min=0.4, f_max=0.9).scale(0.25) == pytest.approx(0.9 - 0.5 * 0.25)


def test_random_crops_are_uniform_in_bounds_and_independent_of_the_noise_level():
    sched = PatchSchedule("random", f_min=0.25, f_max=0.75)
    n = 4000
    low, high = _sizes(sched, np.zeros(n), seed=1), _sizes(sched, np.ones(n), seed=1)
    assert np.array_equal(low, high)  # the same random stream gives the same sizes whatever t
    assert low.min() >= 16 and low.max() <= 48 and len(set(low)) > 25  # spread over [f_min, f_max] x 64
    assert abs(low.mean() - 32) < 1.0 and abs(np.median(low) - 32) <= 1.5  # uniform: centred between the bounds
    ts = np.random.default_rng(2).random(n)
    sizes = _sizes(sched, ts, seed=3)
    assert abs(np.corrcoef(ts, sizes)[0, 1]) < 0.06
    with pytest.raises(ValueError, match="fraction"):
        sched.scale(0.5)


def test_resize_only_crops_are_the_whole_image():
    rng = np.random.default_rng(0)
    sampler = PatchSampler(PatchSchedule("step", f_min=1.0, f_max=1.0, levels=2), train_res=48)
    for t in np.linspace(0, 1, 11):
        assert sampler.crop_box(rng, 64, 64, float(t)) == CropBox(0, 0, 64)


@pytest.mark.parametrize("sched", SCHEDULES, ids=lambda s: s.kind)
def test_the_methods_schedules_draw_only_the_position_from_the_rng(sched):
    """Adding the ablation kinds left every t-driven kind's random stream as it was: a crop takes two draws."""
    rng, ref = np.random.default_rng(5), np.random.default_rng(5)
    for t in np.linspace(0, 1, 7):
        box = PatchSampler(sched, train_res=8).crop_box(rng, 64, 48, float(t))
        size = max(1, min(int(round(float(sched.scale(t)) * 48)), 48))
        assert box == CropBox(int(ref.integers(0, 64 - size + 1)), int(ref.integers(0, 48 - size + 1)), size)


def test_the_ablation_kinds_round_trip_and_are_recipe_kinds():
    from edge_runtime.recipe import SCHEDULE_KINDS, Recipe

    for kind in ("shrinking", "random"):
        s = PatchSchedule(kind, f_min=0.3)
        assert PatchSchedule.from_dict(s.to_dict()) == s and kind in SCHEDULE_KINDS
        assert Recipe("x", schedule_kind=kind).patch_schedule(32, 64)["kind"] == kind
