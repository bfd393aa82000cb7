"""The method's recipes (edge_runtime.recipe): validation, the patch schedule they give, and the round trip
through the manifest's dict."""

from __future__ import annotations

import numpy as np
import pytest

from edge_runtime.patch_sampling import PatchSampler, PatchSchedule
from edge_runtime.recipe import BUILTIN, PAPER, Recipe


def test_builtin_schedule_crops_at_the_images_own_scale_or_whole():
    """The built-in recipe's two-size step schedule: below t = 0.5 a crop of exactly R = 48 px of the 64 px
    image (no resampling), from t = 0.5 on the whole image resized to 48."""
    res = BUILTIN.train_res(64, 4)
    sched = PatchSchedule(**BUILTIN.patch_schedule(res, 64))
    assert res == 48 and (sched.kind, sched.levels, sched.f_min) == ("step", 2, 0.75)
    sampler, rng = PatchSampler(sched, res), np.random.default_rng(0)
    sizes = {t: {sampler.crop_box(rng, 64, 64, t).size for _ in range(20)} for t in (0.0, 0.2, 0.49, 0.5, 0.8, 1.0)}
    assert sizes == {0.0: {48}, 0.2: {48}, 0.49: {48}, 0.5: {64}, 0.8: {64}, 1.0: {64}}


def test_paper_schedule_is_linear_from_r_over_s():
    d = PAPER.patch_schedule(32, 64)
    assert d == {"kind": "linear", "f_min": 0.5, "f_max": 1.0, "levels": 3}
    assert PAPER.patch_schedule(32, 64, f_min=0.25)["f_min"] == 0.25  # an override wins


def test_round_trip_and_bad_values():
    assert Recipe.from_dict(BUILTIN.to_dict()) == BUILTIN
    assert Recipe.from_dict({**BUILTIN.to_dict(), "unknown_key": 1}) == BUILTIN  # newer manifests' extra keys
    with pytest.raises(ValueError, match="schedule_kind"):
        Recipe("x", schedule_kind="exponential")
    with pytest.raises(ValueError, match="schedule_levels"):
        Recipe("x", schedule_kind="step", schedule_levels=1)
