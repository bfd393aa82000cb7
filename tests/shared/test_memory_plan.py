"""The memory-plan contract (edge_runtime.memory_plan): sizes as users write them, the manifest's record of the
predicted peaks and its validation."""

import pytest

from edge_runtime.memory_plan import MemoryPlan, MemoryPlanError, format_size, parse_size

MiB, GiB = 2**20, 2**30


@pytest.mark.parametrize("text,n", [("6GiB", 6 * GiB), ("800MiB", 800 * MiB), ("1.5G", int(1.5 * GiB)),
                                    ("512m", 512 * MiB), ("2GB", 2 * 10**9), ("123456", 123456), (" 64 MiB ", 64 * MiB),
                                    (1024, 1024)])
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("bad", ["", "six GiB", "6 GiBs", "-1GiB", "0", "1e3", "6 PiB"])
def test_parse_size_refuses_what_is_not_a_size(bad):
    with pytest.raises(MemoryPlanError, match="size"):
        parse_size(bad)


def test_format_size():
    assert format_size(1536 * MiB) == "1.50 GiB" and format_size(800 * MiB) == "800.00 MiB" and format_size(12) == "12 B"


def _plan() -> dict:
    fig = lambda p, w: {"peak_bytes": p, "weights_bytes": w}  # noqa: E731
    return {"planner_target": "host-cpu", "measured_on_target": True, "weights": "fp32", "runtime_bytes": 200 * MiB,
            "job_peak_bytes": {"bank": 400 * MiB, "online": 500 * MiB},
            "generate": {"resident": {"48": fig(600 * MiB, 300 * MiB), "64": fig(650 * MiB, 300 * MiB)},
                         "streamed": {"48": fig(300 * MiB, 60 * MiB), "64": fig(320 * MiB, 60 * MiB)}}}


def test_round_trip_and_lookups():
    p = MemoryPlan.from_dict(_plan())
    assert MemoryPlan.from_dict(p.to_dict()) == p
    assert p.job_peak("bank") == 400 * MiB
    assert p.generation("streamed", 64)["peak_bytes"] == 320 * MiB
    assert p.generation("resident", 56)["peak_bytes"] == 650 * MiB  # the nearest larger size predicted
    with pytest.raises(MemoryPlanError, match="precompute"):
        p.job_peak("lazy")


@pytest.mark.parametrize("edit", [
    lambda d: d.pop("job_peak_bytes"),
    lambda d: d["generate"].pop("streamed"),
    lambda d: d["generate"]["streamed"].pop("64"),
    lambda d: d["generate"]["resident"]["48"].update(weights_bytes=0),
    lambda d: d["generate"]["resident"]["48"].update(peak_bytes="lots"),
])
def test_bad_plans_are_refused(edit):
    d = _plan()
    edit(d)
    with pytest.raises(MemoryPlanError, match="manifest memory"):
        MemoryPlan.from_dict(d)


def test_the_manifest_validates_its_memory_field():
    from edge_runtime.manifest import Manifest, ManifestError, validate_fields

    m = Manifest(family="flux", blocks=[{"index": 0}, {"index": 1}], trainable=[1], train_res=48, gen_res=64,
                 scheduler={}, patch_schedule={}, lora={"rank": 2})
    assert m.memory_plan() is None and "memory" not in m.to_dict()  # bundles compiled before it read as before
    d = m.to_dict()
    validate_fields({**d, "memory": _plan()})
    assert Manifest(**{**d, "memory": _plan()}).memory_plan().job_peak("online") == 500 * MiB
    bad = _plan()
    bad["generate"]["streamed"] = {}
    with pytest.raises(ManifestError, match="memory"):
        validate_fields({**d, "memory": bad})
