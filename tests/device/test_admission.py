"""Admission control (`--memory-budget`): the accounting on its own (edge_runtime.daemon.admission), then the
daemon on the built-in model's bundle at budgets set from its own predictions: resident, streamed, refused."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from edge_runtime.daemon.admission import Admission
from edge_runtime.daemon.errors import ResourceExhausted
from edge_runtime.memory_plan import MemoryPlan

MiB = 2**20


def _plan(job=400, resident=700, weights=300, streamed=350, rows=None) -> MemoryPlan:
    fig = lambda p, w: {"peak_bytes": p * MiB, "weights_bytes": w * MiB}  # noqa: E731
    res = {**fig(resident, weights), **({"rows_peak_bytes": rows * MiB} if rows is not None else {})}
    return MemoryPlan.from_dict({
        "planner_target": "host-cpu", "measured_on_target": True, "weights": "fp32", "runtime_bytes": 200 * MiB,
        "job_peak_bytes": {"bank": job * MiB, "online": (job + 100) * MiB},
        "generate": {"resident": {"64": res}, "streamed": {"64": fig(streamed, 50)}}})


class Evictions:
    def __init__(self):
        self.n = 0

    def __call__(self):
        self.n += 1


def test_resident_when_it_fits_streamed_when_not_refused_when_never():
    ev = Evictions()
    a = Admission(_plan(), 800 * MiB, evict=ev)
    with a.generation(64, None) as mode:
        assert mode == "resident"
        assert a.in_use_bytes() == 700 * MiB
    assert a.cache_bytes == 300 * MiB and a.in_use_bytes() == 500 * MiB  # the graphs stay open
    with a.generation(64, None) as mode:  # the kept graphs serve the next one
        assert mode == "resident" and ev.n == 0
    small = Admission(_plan(), 500 * MiB, evict=ev)
    with small.generation(64, None) as mode:
        assert mode == "streamed" and small.cache_bytes == 0
    with pytest.raises(ResourceExhausted, match=r"predicted peak is 350.00 MiB streamed .* budget is 300.00 MiB"):
        with Admission(_plan(), 300 * MiB, evict=ev).generation(64, None):
            pass


def test_resident_rows_between_the_resident_and_the_rows_peak():
    """600 MiB predicted with the guidance rows one after the other, 700 with the pair: a budget between them
    generates resident_rows, holding the rows' activations; the kept graphs serve either."""
    ev = Evictions()
    plan = _plan(rows=600)
    assert plan.resident_rows_peak(64) == 600 * MiB and _plan().resident_rows_peak(64) == 700 * MiB
    assert plan.mode_peak("resident_rows", 64) == 600 * MiB and plan.mode_peak("streamed", 64) == 350 * MiB
    a = Admission(plan, 650 * MiB, evict=ev)
    with a.generation(64, None) as mode:
        assert mode == "resident_rows"
        assert a.in_use_bytes() == 600 * MiB
    assert a.cache_bytes == 300 * MiB and a.in_use_bytes() == 500 * MiB
    with Admission(plan, 700 * MiB, evict=ev).generation(64, None) as mode:
        assert mode == "resident"
    with Admission(plan, 599 * MiB, evict=ev).generation(64, None) as mode:
        assert mode == "streamed"
    with Admission(_plan(), 650 * MiB, evict=ev).generation(64, None) as mode:  # no rows figure: as before
        assert mode == "streamed"


def test_a_rows_figure_outside_weights_and_peak_is_refused():
    from edge_runtime.memory_plan import MemoryPlanError

    for rows in (701, 299):
        with pytest.raises(MemoryPlanError, match="rows_peak_bytes must lie between"):
            _plan(rows=rows)


def test_a_job_evicts_the_kept_graphs_and_is_refused_when_it_never_fits():
    ev = Evictions()
    a = Admission(_plan(), 700 * MiB, evict=ev)
    with a.generation(64, None) as mode:
        assert mode == "resident"
    assert a.cache_bytes == 300 * MiB
    with a.job("online", lambda: False):  # 500 MiB: fits only once the kept graphs are closed
        assert ev.n == 1 and a.cache_bytes == 0 and a.in_use_bytes() == 500 * MiB
    with pytest.raises(ResourceExhausted, match=r"job's predicted peak is 500.00 MiB \(precompute online.* "
                                                r"budget is 450.00 MiB.*precompute bank"):
        Admission(_plan(), 450 * MiB, evict=ev).check_job("online")
    Admission(_plan(), 450 * MiB, evict=ev).check_job("bank")  # 400 MiB fits


def test_operations_wait_for_room_and_a_generation_streams_beside_a_job():
    a = Admission(_plan(), 750 * MiB, evict=Evictions())
    started = threading.Event()
    release = threading.Event()

    def job():
        with a.job("online", lambda: False):
            started.set()
            release.wait(10)

    t = threading.Thread(target=job)
    t.start()
    started.wait(5)
    with a.generation(64, None) as mode:  # 500 held: resident (500 more) does not fit, streamed (150 more) does
        assert mode == "streamed"
    # a second job waits for the first (500 + 300 > 750)
    got, second = [], a.job("online", lambda: False)  # kept referenced: it holds its memory until exited
    t2 = threading.Thread(target=lambda: (second.__enter__(), got.append(time.time())))
    t0 = time.time()
    t2.start()
    time.sleep(0.6)
    assert not got
    release.set()
    t.join(5)
    t2.join(5)
    assert got and got[0] - t0 >= 0.5
    b = Admission(_plan(streamed=500), 750 * MiB, evict=Evictions())
    running = b.job("online", lambda: False)
    running.__enter__()  # a job that runs on: 500 MiB held
    with pytest.raises(ResourceExhausted, match="no memory for a 64px generation now"):
        with b.generation(64, time.time() + 0.3):  # 300 more streamed, 250 free: waits, then gives up
            pass
    running.__exit__(None, None, None)
    with b.generation(64, time.time() + 0.3) as mode:  # alone, the resident 700 MiB fits
        assert mode == "resident"
    second.__exit__(None, None, None)
    assert a.in_use_bytes() == 200 * MiB


def test_no_predictions_admits_everything():
    a = Admission(None, 1, evict=Evictions())
    assert not a.enabled
    a.check_job("online")
    with a.generation(64, None) as mode:
        assert mode == "resident"


# ---------------------------------------------------------------------- the daemon


@pytest.fixture(scope="module")
def bundle(builtin_bundle):
    pytest.importorskip("onnxruntime.training")
    return builtin_bundle[0]


def _start(bundle, tmp_path, *extra):
    from daemon_util import DaemonProc
    from edgeblock.client import EdgeClient

    tmp_path.mkdir(parents=True, exist_ok=True)
    d = DaemonProc(bundle, str(tmp_path / "state"), *extra)
    c = EdgeClient(d.address, timeout=120)
    c.wait_ready(30)
    return d, c


def test_daemon_streams_below_the_resident_peak_and_refuses_below_the_streamed_one(bundle, tmp_path):
    from daemon_util import subject_pngs
    from edgeblock.client import ClientError

    from edge_runtime.manifest import load_manifest

    m = load_manifest(bundle)
    p = m.memory_plan()
    size = m.gen_res
    resident, streamed = p.generation("resident", size)["peak_bytes"], p.generation("streamed", size)["peak_bytes"]
    rows = p.resident_rows_peak(size)  # the built-in model guides by classifier-free guidance: two rows
    assert streamed < rows < resident
    between = (streamed + rows) // 2
    d, c = _start(bundle, tmp_path / "a", "--memory-budget", str(between))
    try:
        info = c.info().memory
        assert info.admission and info.budget_bytes == between and info.planner_target == "host-cpu"
        assert info.generate_resident_bytes == resident and info.generate_streamed_bytes == streamed
        assert info.generate_resident_rows_bytes == rows
        assert info.in_use_bytes == p.runtime_bytes
        g = c.generate("a red ring on a blue background", steps=2, seed=1)
        assert g.mode == "streamed" and g.size == size
        streamed_png = g.png
    finally:
        c.close()
        d.stop()
    d, c = _start(bundle, tmp_path / "r", "--memory-budget", str((rows + resident) // 2))
    try:
        g = c.generate("a red ring on a blue background", steps=2, seed=1)
        assert g.mode == "resident_rows" and g.size == size
        assert _pixels(g.png).shape == _pixels(streamed_png).shape
        assert np.abs(_pixels(g.png).astype(int) - _pixels(streamed_png)).max() <= 1  # the same rows, held open
    finally:
        c.close()
        d.stop()
    d, c = _start(bundle, tmp_path / "b")  # the default budget: this machine's free memory
    try:
        assert c.info().memory.budget_bytes > resident
        assert c.generate("a red ring on a blue background", steps=2, seed=1).mode == "resident"
    finally:
        c.close()
        d.stop()
    low = min(streamed, min(p.job_peak_bytes.values())) - 1
    d, c = _start(bundle, tmp_path / "c", "--memory-budget", str(low))
    try:
        with pytest.raises(ClientError) as e:
            c.generate("a red ring on a blue background", steps=2, seed=1)
        assert e.value.code == "RESOURCE_EXHAUSTED" and "predicted peak" in e.value.details
        assert "--weights int4" in e.value.details and e.value.retry_after is None  # a retry cannot succeed
        with pytest.raises(ClientError) as e:
            list(c.personalize(subject_pngs(2), token="sks", class_noun="ring", steps=2))
        assert e.value.code == "RESOURCE_EXHAUSTED" and "job's predicted peak" in e.value.details
        assert c.list_adapters() == []  # nothing was queued
    finally:
        c.close()
        d.stop()


def _pixels(png: bytes):
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)))


def test_bad_memory_budget_is_a_clear_error(bundle, tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "edge_runtime.server", "--bundle", bundle, "--state",
                        str(tmp_path / "s"), "--memory-budget", "lots"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--memory-budget" in r.stderr and "lots" in r.stderr
