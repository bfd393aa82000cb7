"""Faults the edge daemon survives with nothing lost (issue 24, item 6), on the real built-in model's bundle.

- kill -9 at 25 named points of a job (edge_runtime.faults: EDGEBLOCK_CRASH_AT="NAME:N" SIGKILLs the daemon the
  N-th time it reaches NAME): after each restart the job resumes; it finishes with the adapter of an uninterrupted
  run. The points are grouped in chains: one job killed at each point of its chain in turn, one daemon life each;
- the disk fills (RLIMIT_FSIZE) while a checkpoint or an adapter is written: the job fails naming the file, what
  was stored before stays as it was, the daemon goes on serving, no temporary file is left;
- a bundle file corrupted before the start (the daemon refuses to start, naming it) or while running (DATA_LOSS
  for the calls that read it, the rest work), and a damaged adapter;
- 8 clients generating while a job trains and two clients watch it, one dropping and re-attaching.
"""

from __future__ import annotations

import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from daemon_util import DaemonProc, subject_pngs, wait_job
from edgeblock.client import ClientError, EdgeClient
from PIL import Image

from edge_runtime.api import kind_name, state_name
from edge_runtime.fileio import is_temp

pytest.importorskip("onnxruntime.training")

# 4 steps of 4 draws (the built-in recipe's batch), a checkpoint after each of steps 1 to 3
JOB = {"token": "sks", "class_noun": "ring", "steps": 4, "checkpoint_every": 1, "seed": 5, "learning_rate": 2e-3}
NO_CRASH = {"EDGEBLOCK_CRASH_AT": ""}

# Each chain: a precompute mode and the points one job is killed at, in turn (each life counts from 1, starting from
# where the previous life left the job). The comments say what the job has on disk when it dies.
CHAINS = {
    "precompute": ("bank", [
        "bank.draw:2",                         # the second draw's prologue inputs banked
        "fileio.fsynced.000003.acc.npz:1",     # a banked draw fsynced under its temporary name, not renamed
        "bank.graph:3",                        # the first graph's pass over the third draw banked
        "bank.graph:20",                       # the second graph's pass part way through the draws
        "bank.feeds:2",                        # a draw's training inputs banked, its intermediate states still there
        "fileio.renamed.000009.feeds.npz:1",   # renamed into place, the folder not fsynced
        "job.draw:6",                          # mid-step: step 2's second draw loaded, no update yet
    ]),
    "training": ("online", [
        "job.draw:1",                          # mid-step 1: the first draw's frozen pass done
        "train.backward:1",                    # step 1's gradients summed, the weights not updated
        "checkpoint.written:1",                # step 1's checkpoint written under its temporary name
        "job.checkpointed:1",                  # step 1's checkpoint in place, job.json still at step 0
        "fileio.renamed.checkpoint:2",         # step 2's checkpoint renamed, job.json still at step 1
        "job.step:1",                          # resumed at step 2 (the checkpoint's own step): before step 3
    ]),
    "checkpoint": ("online", [
        "fileio.written.checkpoint:1",         # step 1's checkpoint written, not fsynced
        "fileio.fsynced.checkpoint:2",         # step 2's fsynced, not renamed (step 1's in place)
        "fileio.renamed.job.json:3",           # job.json at step 2 renamed into place, the folder not fsynced
        "fileio.written.job.json:4",           # the adapter stored, job.json DONE written under its temporary name
    ]),
    "adapter": ("online", [
        "fileio.written.adapter.safetensors:1",
        "fileio.renamed.adapter.safetensors:1",
        "store.adapter_weights:1",             # the weights in place, no adapter.json
        "fileio.written.adapter.json:1",
        "fileio.fsynced.adapter.json:1",
        "job.adapter_saved:1",                 # the adapter stored, the job not yet DONE
    ]),
    "finished": ("online", [
        "fileio.renamed.job.json:6",           # job.json DONE in place, its final event not yet logged
    ]),
    "submitted": ("online", [
        "fileio.renamed.job.json:1",           # the accepted job's job.json in place (its images were saved first)
    ]),
}
# finished: job.json says DONE, the log lacks KIND_DONE: the restarted daemon logs it (jobs._log_final_event), so a
# watcher sees the job end. submitted: the images are saved before job.json, so the resumed job has them.


@pytest.fixture(scope="module")
def bundle(builtin_bundle):
    return builtin_bundle[0]


@pytest.fixture(scope="module")
def reference(bundle, tmp_path_factory):
    """An uninterrupted run of JOB (its adapter's tensors) and a state folder holding two adapters: JOB's and a
    2-step one, with the bytes ExportAdapter gave for each."""
    from safetensors.numpy import load

    state = str(tmp_path_factory.mktemp("reference") / "state")
    d = DaemonProc(bundle, state, env=NO_CRASH)
    try:
        with EdgeClient(d.address, timeout=60) as c:
            c.wait_ready(20)
            ids = [_train(c, JOB), _train(c, {**JOB, "steps": 2, "seed": 9})]
            exported = {a: c.export_adapter(a)[0] for a in ids}
    finally:
        d.stop()
    return {"weights": load(exported[ids[0]]), "state": state, "ids": ids, "exported": exported}


def _train(c: EdgeClient, job: dict) -> str:
    events = list(c.personalize(subject_pngs(2), **job))
    assert kind_name(events[-1].kind) == "DONE", events[-1]
    return events[-1].adapter_id


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def _leftovers(state: str) -> list[str]:
    """Temporary files, and adapter folders without their adapter.json."""
    out = [os.path.join(p, n) for p, _d, files in os.walk(state) for n in files if is_temp(n)]
    adapters = os.path.join(state, "adapters")
    out += [n for n in os.listdir(adapters) if not os.path.exists(os.path.join(adapters, n, "adapter.json"))]
    return out


def _job_state(state: str, job_id: str) -> str:
    try:
        with open(os.path.join(state, "jobs", job_id, "job.json")) as f:
            return json.load(f)["state"]
    except (OSError, ValueError):
        return ""


def _dies_at(d: DaemonProc, state: str, spec: str, timeout: float = 90) -> None:
    """Wait for the daemon to kill itself at `spec`; fail at once if its job finishes first (a point not reached)."""
    deadline = time.time() + timeout
    while d.proc.poll() is None:
        jobs = [n for n in os.listdir(os.path.join(state, "jobs")) if not n.startswith(".")]
        if jobs and _job_state(state, jobs[0]) in ("DONE", "FAILED", "CANCELLED"):
            try:  # a point just after job.json turned final: the kill follows at once
                d.proc.wait(2)
                break
            except subprocess.TimeoutExpired:
                pass
            d.stop()
            pytest.fail(f"crash point {spec} was not reached: the job ended {_job_state(state, jobs[0])}\n"
                        f"{d.logs()[-2000:]}")
        if time.time() > deadline:
            d.stop()
            pytest.fail(f"crash point {spec} was not reached in {timeout} s\n{d.logs()[-2000:]}")
        time.sleep(0.05)
    d.stop()
    assert d.proc.returncode == -signal.SIGKILL, (spec, d.proc.returncode, d.logs()[-2000:])


@pytest.mark.parametrize("chain", list(CHAINS))
def test_kill_9_at_each_point_of_a_job_resumes_to_the_same_adapter(bundle, reference, tmp_path, chain):
    mode, points = CHAINS[chain]
    state = str(tmp_path / "state")
    for k, spec in enumerate(points):
        d = DaemonProc(bundle, state, env={"EDGEBLOCK_CRASH_AT": spec})
        if k == 0:  # the job is submitted to the first life; the later ones resume it
            with EdgeClient(d.address, timeout=60) as c:
                stream = c.personalize(subject_pngs(2), precompute=mode, **JOB)
                try:
                    next(stream)
                except ClientError:  # the daemon may die before the first event reaches us
                    pass
        _dies_at(d, state, spec)
    (job_id,) = [n for n in os.listdir(os.path.join(state, "jobs")) if not n.startswith(".")]
    d = DaemonProc(bundle, state, env=NO_CRASH)
    try:
        with EdgeClient(d.address, timeout=60) as c:
            c.wait_ready(20)
            j = wait_job(c, job_id, timeout=120)
            assert state_name(j.state) == "DONE", j.message
            ads = c.list_adapters()
            assert [a.id for a in ads] == [j.adapter_id] and ads[0].job_id == job_id  # one adapter, trained once
            data, _ = c.export_adapter(j.adapter_id)
            events = list(c.watch_job(job_id, timeout=5))  # the log of every life, ending with the final event
            assert kind_name(events[0].kind) == "QUEUED" and kind_name(events[-1].kind) == "DONE"
        assert d.terminate() == 0
    finally:
        d.stop()
    from safetensors.numpy import load

    assert _max_diff(load(data), reference["weights"]) <= 1e-6, chain
    assert _leftovers(state) == []
    assert sorted(os.listdir(os.path.join(state, "jobs", job_id))) == ["events", "job.json"]  # its work dropped


def test_a_job_finished_just_before_a_crash_has_its_work_dropped_at_the_start(tmp_path):
    from edge_runtime.store import Store, new_id

    s = Store(str(tmp_path / "state"))
    for state in ("DONE", "RUNNING"):
        job = {"id": new_id(), "state": state}
        s.save_job(job)
        s.save_job_images(job["id"], [b"png"])
    Store(str(tmp_path / "state"))  # a restart
    kept = {j["state"]: sorted(os.listdir(s.job_dir(j["id"]))) for j in s.list_jobs()}
    assert kept == {"DONE": ["job.json"], "RUNNING": ["images", "job.json"]}


def test_the_crash_points_are_distinct_and_twenty_or_more():
    points = [p for _mode, ps in CHAINS.values() for p in ps]
    assert len(set(points)) == len(points) >= 20


# ---------------------------------------------------------------------------------------------------------------
# A full disk
# ---------------------------------------------------------------------------------------------------------------
def _file_size_limit(limit: int):
    def apply() -> None:  # in the daemon's process before it starts: writes past `limit` fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return apply


def _png(data: bytes) -> tuple[int, ...]:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).shape


def test_disk_full_while_a_checkpoint_or_an_adapter_is_written(bundle, reference, tmp_path):
    """64 KiB per file: the checkpoint (megabytes) and then the adapter (about 110 KiB) find no room; job.json,
    the event log and the subject images do."""
    state = str(tmp_path / "state")
    shutil.copytree(reference["state"], state)
    a1, a2 = reference["ids"]
    d = DaemonProc(bundle, state, env=NO_CRASH, preexec_fn=_file_size_limit(64 * 1024))
    try:
        with EdgeClient(d.address, timeout=60) as c:
            c.wait_ready(20)
            for job, what in ((JOB, "checkpoint"),
                              ({**JOB, "steps": 2, "checkpoint_every": 100}, "adapter.safetensors")):
                events = list(c.personalize(subject_pngs(2), **job))
                last = events[-1]
                assert kind_name(last.kind) == "FAILED", last
                assert what in last.message and "no space" in last.message and "File too large" in last.message, \
                    last.message
                assert state_name(c.get_job(last.job_id).state) == "FAILED"
            # the daemon goes on serving, and what it had stored is as it was
            assert c.info().family == "flux"
            assert sorted(a.id for a in c.list_adapters()) == sorted([a1, a2])
            for a in (a1, a2):
                assert c.export_adapter(a)[0] == reference["exported"][a]
            assert _png(c.generate("a sks ring", adapter_id=a1, steps=2, seed=1).png) == (64, 64, 3)
            assert d.alive()
    finally:
        d.stop()
    assert _leftovers(state) == []


CHECKPOINT_UNDER_LIMIT = r"""
import os, resource, signal, sys
from edge_runtime.fileio import NoSpace
from edge_runtime.ort_trainer import OrtTrainer
art, ck = sys.argv[1], sys.argv[2]
t = OrtTrainer(art)
t.save_checkpoint(ck, step=2)
before = open(ck, "rb").read()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))  # the checkpoint is megabytes
try:
    t.save_checkpoint(ck, step=4)
except NoSpace as e:
    print("NoSpace:", e)
print("intact:", open(ck, "rb").read() == before, "files:", os.listdir(os.path.dirname(ck)))
print("resumed_step:", OrtTrainer(art, checkpoint=ck).resumed_step)
"""


def test_a_checkpoint_that_finds_no_room_leaves_the_last_one_loadable(bundle, tmp_path):
    """The daemon drops a failed job's checkpoint with the job: the trainer's writes are checked here, in a process
    of their own under the file-size limit."""
    ck = str(tmp_path / "checkpoint")
    p = subprocess.run([sys.executable, "-c", CHECKPOINT_UNDER_LIMIT, os.path.join(bundle, "trainable"), ck],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.splitlines()
    assert lines[0].startswith("NoSpace:") and ck in lines[0] and "File too large" in lines[0], p.stdout
    assert lines[1:] == ["intact: True files: ['checkpoint']", "resumed_step: 2"], p.stdout


# ---------------------------------------------------------------------------------------------------------------
# Corrupt files
# ---------------------------------------------------------------------------------------------------------------
def _flip_byte(path: str, at: int | None = None) -> bytes:
    """Flip one byte (the middle one by default) in place; returns the file as it was."""
    with open(path, "rb") as f:
        data = f.read()
    i = len(data) // 2 if at is None else at % len(data)
    with open(path, "r+b") as f:
        f.seek(i)
        f.write(bytes([data[i] ^ 0xFF]))
    return data


def test_a_bundle_file_corrupted_before_the_start_stops_the_daemon_naming_it(bundle, tmp_path):
    b = str(tmp_path / "bundle")
    shutil.copytree(bundle, b)
    _flip_byte(os.path.join(b, "frozen", "group_01.onnx"))
    with pytest.raises(RuntimeError) as e:
        DaemonProc(b, str(tmp_path / "state"), env=NO_CRASH)
    assert "frozen/group_01.onnx" in str(e.value) and "corrupt" in str(e.value)


def test_files_corrupted_while_running_are_data_loss_for_the_calls_that_read_them(bundle, reference, tmp_path):
    b, state = str(tmp_path / "bundle"), str(tmp_path / "state")
    shutil.copytree(bundle, b)
    shutil.copytree(reference["state"], state)
    a1, a2 = reference["ids"]
    d = DaemonProc(b, state, env=NO_CRASH)
    try:
        with EdgeClient(d.address, timeout=60) as c:
            c.wait_ready(20)

            def code(fn, *a, **kw) -> tuple[str, str]:
                with pytest.raises(ClientError) as e:
                    r = fn(*a, **kw)
                    if hasattr(r, "__next__"):
                        list(r)
                return e.value.code, e.value.details

            # a graph generation opens (no generation ran yet: nothing is open)
            epilogue = os.path.join(b, "epilogue.onnx")
            original = _flip_byte(epilogue)
            got, details = code(c.generate, "a ring", steps=2)  # the base model (a1 stays unread: not cached)
            assert got == "DATA_LOSS" and "epilogue.onnx" in details, details
            assert c.info().family == "flux" and len(c.list_adapters()) == 2  # the rest works
            assert c.export_adapter(a2)[0] == reference["exported"][a2]
            # the training artifacts: the job fails naming the file (the call itself was valid)
            training = os.path.join(b, "trainable", "training_model.onnx")
            training_original = _flip_byte(training)
            last = list(c.personalize(subject_pngs(2), **{**JOB, "steps": 2}))[-1]
            assert kind_name(last.kind) == "FAILED" and "trainable/training_model.onnx" in last.message, last
            # repaired: served again, without a restart
            for path, data in ((epilogue, original), (training, training_original)):
                with open(path, "wb") as f:
                    f.write(data)
            assert _png(c.generate("a sks ring", adapter_id=a2, steps=2).png) == (64, 64, 3)
            # a damaged adapter: DATA_LOSS where it is read, the other adapter and the rest keep working
            _flip_byte(os.path.join(state, "adapters", a1, "adapter.safetensors"), at=-8)
            for got, details in (code(c.generate, "a sks ring", adapter_id=a1, steps=2), code(c.export_adapter, a1)):
                assert got == "DATA_LOSS" and a1 in details, details
            assert _png(c.generate("a sks ring", adapter_id=a2, steps=2).png) == (64, 64, 3)
            assert c.get_adapter(a1).id == a1 and c.info().family == "flux"
    finally:
        d.stop()


# ---------------------------------------------------------------------------------------------------------------
# Many clients
# ---------------------------------------------------------------------------------------------------------------
def test_eight_generating_clients_and_two_watchers_one_reattaching_lose_nothing(bundle, tmp_path):
    d = DaemonProc(bundle, str(tmp_path / "state"), env=NO_CRASH)
    try:
        with EdgeClient(d.address, timeout=120) as c:
            c.wait_ready(20)
            submit = c.personalize(subject_pngs(2), **{**JOB, "steps": 10, "checkpoint_every": 4})
            job_id = next(submit).job_id
            submit.cancel()  # the submitting client goes away: the job goes on
            results, errors, watched = [], [], {}

            def gen(k: int) -> None:
                try:
                    with EdgeClient(d.address, timeout=180) as ck:
                        results.append(_png(ck.generate(f"a red circle, {k}", steps=3, seed=k + 1).png))
                except Exception as e:  # noqa: BLE001 - collected, asserted below
                    errors.append(e)

            def watch(name: str, drop_after: int | None) -> None:
                try:
                    with EdgeClient(d.address, timeout=60) as cw:
                        seen = []
                        stream = cw.watch_job(job_id, timeout=300)
                        for ev in stream:
                            seen.append(ev)
                            if drop_after is not None and kind_name(ev.kind) == "STEP" and ev.step >= drop_after:
                                stream.cancel()  # drops mid-job ...
                                break
                        if drop_after is not None:  # ... and re-attaches: every event again, from the first
                            assert state_name(cw.get_job(job_id).state) != "DONE"
                            watched[f"{name} before"] = seen
                            seen = list(cw.watch_job(job_id, timeout=300))
                        watched[name] = seen
                except Exception as e:  # noqa: BLE001
                    errors.append(e)

            threads = [threading.Thread(target=gen, args=(k,)) for k in range(8)]
            threads += [threading.Thread(target=watch, args=("steady", None)),
                        threading.Thread(target=watch, args=("dropping", 2))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
            assert not any(t.is_alive() for t in threads)
            assert not errors, errors
            assert results == [(64, 64, 3)] * 8
            steady, again = watched["steady"], watched["dropping"]
            ser = [e.SerializeToString() for e in steady]
            assert [e.SerializeToString() for e in again] == ser  # the same events, in the same order
            assert ser[:len(watched["dropping before"])] == [e.SerializeToString() for e in watched["dropping before"]]
            kinds = [kind_name(e.kind) for e in steady]
            assert kinds[0] == "QUEUED" and kinds[-1] == "DONE" and kinds.count("STEP") == 10
            assert [e.step for e in steady if kind_name(e.kind) == "STEP"] == list(range(1, 11))
            assert state_name(c.get_job(job_id).state) == "DONE"
    finally:
        d.stop()
