"""The edge daemon end to end over loopback, on the real built-in model's bundle.

The daemon runs as its own process (`python -m edge_runtime.server`); the tests talk to it with
sdk/edgeblock/client.py only.
"""

from __future__ import annotations

import io
import os
import threading
import time

import numpy as np
import pytest
from daemon_util import DaemonProc, subject_pngs, wait_job
from edgeblock.client import ClientError, EdgeClient
from PIL import Image

from edge_runtime.api import edgeblock_pb2 as pb
from edge_runtime.api import kind_name, state_name
from edge_runtime.manifest import load_manifest

pytest.importorskip("onnxruntime.training")

KIND = kind_name


@pytest.fixture(scope="module")
def bundle(builtin_bundle):
    return builtin_bundle[0]


@pytest.fixture()
def daemon(bundle, tmp_path):
    d = DaemonProc(bundle, str(tmp_path / "state"))
    yield d
    d.stop()


def _img(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _personalize(c: EdgeClient, steps: int = 12, **kw) -> tuple[list, str]:
    events = list(c.personalize(subject_pngs(3), token="sks", class_noun="ring", steps=steps, **kw))
    last = events[-1]
    assert KIND(last.kind) == "DONE", last
    return events, last.adapter_id


def test_end_to_end_personalize_generate_adapters(daemon, bundle, tmp_path):
    with EdgeClient(daemon.address, timeout=60) as c:
        c.wait_ready(20)
        assert c.health() == "SERVING" and c.health("edgeblock.v1.EdgeBlock") == "SERVING"
        info = c.info()
        assert info.family == "flux" and list(info.trainable_blocks) == [0, 2] and info.gen_res == 64
        assert info.trainer == "ort" and info.executor == "onnxruntime" and 64 in info.sizes
        events, aid = _personalize(c, steps=12, checkpoint_every=5, learning_rate=2e-3, seed=7)
        kinds = [KIND(e.kind) for e in events]
        assert kinds[0] == "QUEUED" and "ENCODING" in kinds and kinds[-1] == "DONE"
        steps = [e for e in events if KIND(e.kind) == "STEP"]
        assert [e.step for e in steps] == list(range(1, 13)) and all(e.total_steps == 12 for e in steps)
        assert all(np.isfinite(e.loss) and e.loss > 0 for e in steps)
        assert [e.step for e in events if KIND(e.kind) == "CHECKPOINT"] == [5, 10]
        job = c.get_job(events[0].job_id)
        assert state_name(job.state) == "DONE" and job.adapter_id == aid and job.step == 12
        ads = c.list_adapters()
        assert [a.id for a in ads] == [aid] and ads[0].token == "sks" and ads[0].steps == 12 and ads[0].lora_rank == 4
        assert c.get_adapter(aid).sha256 == ads[0].sha256

        base = c.generate("a sks ring on a blue background", steps=4, seed=3)
        tuned = c.generate("a sks ring on a blue background", steps=4, seed=3, adapter_id=aid)
        again = c.generate("a sks ring on a blue background", steps=4, seed=3, adapter_id=aid)
        a, b = _img(base.png), _img(tuned.png)
        assert a.shape == b.shape == (64, 64, 3) and base.seed == 3 and base.steps == 4 and base.time_s > 0
        assert np.abs(a.astype(int) - b.astype(int)).max() > 0  # the adapter acts
        assert tuned.png == again.png  # seeded: reproducible

        data, name = c.export_adapter(aid)
        assert name.endswith(".safetensors")
        from safetensors.numpy import load

        exported = load(data)
        assert exported and all(k.startswith("transformer.") and ".lora_" in k for k in exported)
        assert any(np.abs(v).max() > 0 for k, v in exported.items() if "lora_B" in k)  # trained, not the init
        assert c.delete_adapter(aid) and c.list_adapters() == []
        with pytest.raises(ClientError) as e:
            c.get_adapter(aid)
        assert e.value.code == "NOT_FOUND"

        # prior preservation: class images from the daemon's own base model, each with its class caption
        caps = ["a large red ring on a green background, left", "a large white ring on a black background, top"]
        cls = [c.generate(cap, steps=4, seed=11 + k).png for k, cap in enumerate(caps)]
        events, pid = _personalize(c, steps=6, seed=7, class_images=cls, class_captions=caps)
        assert [e.step for e in events if KIND(e.kind) == "STEP"] == list(range(1, 7))
        import json

        with open(tmp_path / "state" / "adapters" / pid / "adapter.json") as f:
            meta = json.load(f)
        assert meta["class_images"] == 2 and meta["prior_share"] == 0.5
        job_dir = tmp_path / "state" / "jobs" / events[0].job_id
        deadline = time.time() + 10  # the job's work is dropped right after its DONE event
        while (job_dir / "class_images").exists() and time.time() < deadline:
            time.sleep(0.05)
        assert not (job_dir / "class_images").exists() and (job_dir / "job.json").exists()


def test_exported_adapter_is_the_one_adapter_file_the_host_and_diffusers_read(daemon, bundle, tmp_path):
    """ExportAdapter's file (edge_runtime.adapter_file) records the bundle and the training settings, loads into the
    diffusers FluxTransformer2DModel of the built-in model by its own metadata (rank, alpha, target modules), and
    `edgeblock generate --model builtin --adapter FILE` draws from it the image the daemon draws for the same prompt
    and seed."""
    import torch
    from diffusers import FluxTransformer2DModel
    from edgeblock.builtin.pipeline import MODEL_DIR
    from edgeblock.cli import main

    from edge_runtime import adapter_file
    from edge_runtime.manifest import MANIFEST, sha256_file

    prompt = "a sks ring on a blue background, top left"
    with EdgeClient(daemon.address, timeout=60) as c:
        c.wait_ready(20)
        _, aid = _personalize(c, steps=8, learning_rate=5e-3)
        data, _ = c.export_adapter(aid)
        on_device = _img(c.generate(prompt, steps=6, seed=5, guidance=3.0, adapter_id=aid).png)
        base = _img(c.generate(prompt, steps=6, seed=5, guidance=3.0).png)
    f = adapter_file.decode(data)
    m = load_manifest(bundle)
    assert f.info["format"] == adapter_file.FORMAT and f.info["adapter_id"] == aid and f.info["token"] == "sks"
    assert f.info["bundle_sha256"] == sha256_file(os.path.join(bundle, MANIFEST))
    assert f.info["recipe"]["steps"] == 8 and f.info["recipe"]["learning_rate"] == pytest.approx(5e-3, rel=1e-6)
    assert (f.rank, f.alpha) == (m.lora["rank"], m.lora["alpha"])
    path = tmp_path / "adapter.safetensors"
    path.write_bytes(data)

    tr = FluxTransformer2DModel.from_pretrained(os.path.join(MODEL_DIR, "transformer")).eval()
    tr.load_lora_adapter(str(path), prefix="transformer", adapter_name="sks")
    loaded = {n: p for n, p in tr.named_parameters() if "lora_" in n}
    for k, v in f.weights.items():
        name = k.replace(".weight", ".sks.weight")
        assert name in loaded, name
        assert torch.equal(loaded[name].detach(), torch.from_numpy(v))
    assert tr.peft_config["sks"].r == f.rank and tr.peft_config["sks"].lora_alpha == f.alpha  # read from the file

    # the CLI's fp16 export: the same file at half precision, read by the same reader
    half = tmp_path / "half.safetensors"
    assert main(["adapters", "--server", daemon.address, "export", aid, "--dtype", "fp16", "-o", str(half)]) == 0
    h = adapter_file.load(str(half))
    assert h.info["dtype"] == "fp16" and (h.rank, h.alpha, h.info["adapter_id"]) == (f.rank, f.alpha, aid)
    assert all(np.allclose(h.weights[k], v, rtol=1e-3, atol=1e-3 * float(np.abs(v).max())) for k, v in f.weights.items())
    out = tmp_path / "host.png"
    assert main(["generate", "--model", "builtin", "--prompt", prompt, "--adapter", str(path), "--seed", "5",
                 "--steps", "6", "--guidance", "3.0", "-o", str(out)]) == 0
    on_host = _img(out.read_bytes())
    diff = np.abs(on_host.astype(int) - on_device.astype(int))
    print(f"host vs daemon with the adapter: max {diff.max()}, mean {diff.mean():.3f}; adapter effect max "
          f"{np.abs(on_device.astype(int) - base.astype(int)).max()}")
    assert np.abs(on_device.astype(int) - base.astype(int)).max() > 8  # the adapter changes the image
    assert diff.max() <= 2  # the same image, within fp rounding of the two runtimes


def test_daemon_process_is_torch_free(daemon):
    with EdgeClient(daemon.address, timeout=60) as c:
        c.wait_ready(20)
        _personalize(c, steps=3)
        c.generate("a red circle", steps=2)
    with open(f"/proc/{daemon.pid}/maps") as f:
        maps = f.read()
    for lib in ("libtorch", "/torch/", "/transformers/", "/diffusers/"):
        assert lib not in maps, f"{lib} is mapped into the daemon"


def test_cancel_job_and_a_job_outliving_its_client(daemon):
    with EdgeClient(daemon.address, timeout=60) as c:
        c.wait_ready(20)
        stream = c.personalize(subject_pngs(2), token="sks", class_noun="ring", steps=3000)
        job_id = None
        for ev in stream:
            job_id = ev.job_id
            if KIND(ev.kind) == "STEP" and ev.step >= 2:
                break
        t0 = time.time()
        j = c.cancel_job(job_id)
        j = wait_job(c, job_id, timeout=30)
        assert state_name(j.state) == "CANCELLED" and time.time() - t0 < 10
        assert j.step < 3000
        rest = [KIND(e.kind) for e in stream]
        assert rest and rest[-1] == "CANCELLED"

        # a client that goes away mid-job: the job goes on, and another client follows it from its first event
        stream = c.personalize(subject_pngs(2), token="sks", class_noun="ring", steps=3000)
        for ev in stream:
            job_id = ev.job_id
            if KIND(ev.kind) == "STEP":
                break
        stream.cancel()
        time.sleep(1.5)
        j = c.get_job(job_id)
        assert state_name(j.state) == "RUNNING" and j.step >= 1
        with EdgeClient(daemon.address, timeout=60) as other:
            watch = other.watch_job(job_id)
            seen = []
            for ev in watch:
                seen.append(ev)
                if KIND(ev.kind) == "STEP" and ev.step > j.step:  # past the events so far: a live one
                    break
            assert KIND(seen[0].kind) == "QUEUED" and all(e.job_id == job_id for e in seen)
            steps = [e.step for e in seen if KIND(e.kind) == "STEP"]
            assert steps == list(range(1, len(steps) + 1))  # every event, in order, none twice
            assert [j.id for j in other.list_jobs()][0] == job_id  # newest first
            other.cancel_job(job_id)
            rest = [KIND(e.kind) for e in watch]
            assert rest and rest[-1] == "CANCELLED"
        assert [KIND(e.kind) for e in c.watch_job(job_id)][-1] == "CANCELLED"  # a finished job: at once
        assert c.list_adapters() == []
        # and the daemon still trains the next job
        _personalize(c, steps=3)


def test_request_id_retries_pages_and_retention(bundle, tmp_path):
    d = DaemonProc(bundle, str(tmp_path / "state"), "--max-finished-jobs", "2", "--job-retention", "15s",
                   "--max-queue", "0")
    try:
        with EdgeClient(d.address, timeout=60) as c:
            c.wait_ready(20)
            info = c.info()
            assert info.limits.max_finished_jobs == 2 and info.limits.finished_job_retention.seconds == 15
            first = next(iter(c.personalize(subject_pngs(2), token="sks", class_noun="ring", steps=3000,
                                            request_id="retry-1")))
            # the retry (same request, same id) gets the same job's events from its first, not a second job,
            # even with the queue full (max_queue 0 and a job running)
            again = c.personalize(subject_pngs(2), token="sks", class_noun="ring", steps=3000, request_id="retry-1")
            ev = next(again)
            assert ev.job_id == first.job_id and KIND(ev.kind) == "QUEUED"
            assert c.get_job(first.job_id).request_id == "retry-1"
            with pytest.raises(ClientError) as e:  # a new request while the queue is full: retry later
                next(iter(c.personalize(subject_pngs(2), token="sks", class_noun="ring", steps=3)))
            assert e.value.code == "RESOURCE_EXHAUSTED" and e.value.retry_after == 30.0
            c.cancel_job(first.job_id)
            assert KIND(list(again)[-1].kind) == "CANCELLED"
            with pytest.raises(ClientError) as e:  # the same id for another request
                next(iter(c.personalize(subject_pngs(2), token="sks", class_noun="ring", steps=4,
                                        request_id="retry-1")))
            assert e.value.code == "ALREADY_EXISTS" and first.job_id in e.value.details
            with pytest.raises(ClientError) as e:
                next(iter(c.personalize(subject_pngs(2), token="sks", class_noun="ring", request_id="no spaces")))
            assert e.value.code == "INVALID_ARGUMENT" and "request_id" in e.value.details
            assert e.value.violations and e.value.violations[0][0] == "request_id" and e.value.retry_after is None
            ids = [first.job_id] + [_personalize(c, steps=2)[0][-1].job_id for _ in range(2)]
            # three finished jobs, two kept: the oldest is forgotten (adapters stay)
            assert [j.id for j in c.list_jobs()] == ids[:0:-1]
            assert [j.id for j in c.list_jobs(page_size=1)] == ids[:0:-1]  # page by page
            with pytest.raises(ClientError) as e:
                c.get_job(ids[0])
            assert e.value.code == "NOT_FOUND"
            assert len(c.list_adapters(page_size=1)) == 2  # the cancelled first job trained none
            page = c.stub.ListJobs(pb.ListJobsRequest(page_size=1))
            assert len(page.jobs) == 1 and page.next_page_token
            with pytest.raises(ClientError) as e:
                c._unary(c.stub.ListAdapters, pb.ListAdaptersRequest(page_token=page.next_page_token))
            assert e.value.code == "INVALID_ARGUMENT"  # a token of another list
            with pytest.raises(ClientError) as e:
                c._unary(c.stub.ListJobs, pb.ListJobsRequest(page_token="forged.0123"))
            assert e.value.code == "INVALID_ARGUMENT"
            newest = c.get_job(ids[-1]).update_time.ToNanoseconds() / 1e9
            time.sleep(max(0.0, newest + 15.5 - time.time()))  # past the retention: finished jobs go, adapters stay
            assert c.list_jobs() == [] and len(c.list_adapters()) == 2
    finally:
        d.stop()


def test_kill_9_mid_training_resumes_from_checkpoint(bundle, tmp_path):
    state = str(tmp_path / "state")
    d = DaemonProc(bundle, state)
    try:
        with EdgeClient(d.address, timeout=60) as c:
            c.wait_ready(20)
            stream = c.personalize(subject_pngs(3), token="sks", class_noun="ring", steps=40, checkpoint_every=5,
                                   seed=11, learning_rate=2e-3)
            for ev in stream:
                job_id = ev.job_id
                if KIND(ev.kind) == "STEP" and ev.step >= 13:
                    break
        d.kill9()
    finally:
        d.stop()
    d2 = DaemonProc(bundle, state)
    try:
        with EdgeClient(d2.address, timeout=60) as c:
            c.wait_ready(20)
            # WatchJob after the restart: the events logged before the crash, the resumption, then to the end
            kinds = [(KIND(e.kind), e.step) for e in c.watch_job(job_id)]
            assert kinds[0] == ("QUEUED", 0) and ("STEP", 13) in kinds and kinds[-1][0] == "DONE"
            resumed_at = [i for i, (k, _) in enumerate(kinds) if k == "QUEUED"]
            assert len(resumed_at) == 2 and kinds.index(("STEP", 13)) < resumed_at[1]
            j = wait_job(c, job_id, timeout=120)
            assert state_name(j.state) == "DONE", j.message
            ads = c.list_adapters()
            assert [a.id for a in ads] == [j.adapter_id] and ads[0].job_id == job_id
            resumed, _ = c.export_adapter(j.adapter_id)
            # the same job run without interruption gives the same adapter (deterministic draws + exact resume)
            events, aid = _personalize(c, steps=40, checkpoint_every=5, seed=11, learning_rate=2e-3)
            straight, _ = c.export_adapter(aid)
    finally:
        d2.stop()
    from safetensors.numpy import load

    a, b = load(resumed), load(straight)
    assert a.keys() == b.keys()
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-6


def test_sigterm_checkpoints_and_exits_0_then_resumes(bundle, tmp_path):
    state = str(tmp_path / "state")
    d = DaemonProc(bundle, state)
    try:
        with EdgeClient(d.address, timeout=60) as c:
            c.wait_ready(20)
            stream = c.personalize(subject_pngs(2), token="sks", class_noun="ring", steps=60, checkpoint_every=1000)
            for ev in stream:
                job_id = ev.job_id
                if KIND(ev.kind) == "STEP" and ev.step >= 5:
                    break
            assert d.terminate(timeout=60) == 0
    finally:
        d.stop()
    import json

    with open(os.path.join(state, "jobs", job_id, "job.json")) as f:
        saved = json.load(f)
    assert saved["state"] == "RUNNING" and saved["checkpoint_step"] >= 5  # checkpointed at the stop
    d2 = DaemonProc(bundle, state)
    try:
        with EdgeClient(d2.address, timeout=60) as c:
            c.wait_ready(20)
            j = wait_job(c, job_id, timeout=120)
            assert state_name(j.state) == "DONE" and j.step == 60
    finally:
        d2.stop()


def test_limits_answer_with_the_named_limit(daemon):
    with EdgeClient(daemon.address, timeout=60) as c:
        c.wait_ready(20)
        info = c.info()
        L = info.limits

        def code(fn, *a, **kw):
            with pytest.raises(ClientError) as e:
                r = fn(*a, **kw)
                if hasattr(r, "__next__"):
                    list(r)
            violations.append(e.value.violations)
            return e.value.code, e.value.details

        violations: list = []  # google.rpc.BadRequest of each case, in order

        cases = [
            (code(c.personalize, subject_pngs(1) * (L.max_images + 1), "sks", "ring"), "max_images"),
            (code(c.personalize, [b"not an image"], "sks", "ring"), "decodable"),
            (code(c.personalize, subject_pngs(1), "sks", "ring", steps=L.max_steps + 1), "max_steps"),
            (code(c.personalize, subject_pngs(1), "", "ring"), "token"),
            (code(c.personalize, subject_pngs(2), "sks", "ring", captions=["a sks ring"]), "one per image"),
            (code(c.personalize, subject_pngs(1), "sks", "ring", captions=["a red ring"]), "does not name the token"),
            (code(c.personalize, subject_pngs(1), "sks", "ring", captions=["a sks " + "x" * L.max_prompt_chars]),
             "max_prompt_chars"),
            (code(c.personalize, subject_pngs(1), "sks", "ring", class_captions=["a red ring"]), "need class_images"),
            (code(c.personalize, subject_pngs(1), "sks", "ring", class_images=subject_pngs(1) * (L.max_images + 1)),
             "max_images"),
            (code(c.personalize, subject_pngs(1), "sks", "ring", class_images=[b"nope"]), "class image"),
            (code(c.personalize, subject_pngs(1), "sks", "ring", class_images=subject_pngs(1),
                  class_captions=["a sks ring"]), "names the token"),
            (code(c.personalize, subject_pngs(1), "sks", "ring", class_images=subject_pngs(2),
                  class_captions=["a red ring"]), "one per class image"),
            (code(c.personalize, subject_pngs(1), "sks", "ring", class_images=subject_pngs(1), prior_share=1.5),
             "prior_share"),
            (code(c.generate, "x" * (L.max_prompt_chars + 1)), "max_prompt_chars"),
            (code(c.generate, "a cat", steps=L.max_generate_steps + 1), "max_generate_steps"),
            (code(c.generate, "a cat", adapter_id="../../etc/passwd"), "adapter_id"),
        ]
        for (got, details), word in cases:
            assert got == "INVALID_ARGUMENT" and word in details, (got, details, word)
        # the field at fault travels as a google.rpc.BadRequest field violation where the daemon names one
        fields = [[f for f, _ in v] for v in violations]
        assert fields[0] == ["images"] and fields[1] == ["images"] and fields[2] == ["steps"] and fields[3] == ["token"]
        assert fields[6] == ["captions[0]"] and fields[7] == ["class_images"] and fields[8] == ["class_images"]
        assert fields[12] == ["prior_share"] and fields[13] == ["prompt"] and fields[14] == ["steps"]
        # a size valid in itself but not one the bundle was compiled for: FAILED_PRECONDITION
        got, details = code(c.generate, "a cat", size=next(s for s in (40, 48, 56) if s not in info.sizes))
        assert got == "FAILED_PRECONDITION" and "compiled for" in details
        assert code(c.generate, "a cat", adapter_id="0" * 32)[0] == "NOT_FOUND"
        assert code(c.get_job, "f" * 32)[0] == "NOT_FOUND"
        assert code(c.export_adapter, "..")[0] == "INVALID_ARGUMENT"
        big = Image.new("RGB", (4097, 4097))
        buf = io.BytesIO()
        big.save(buf, format="PNG")
        got, details = code(c.personalize, [buf.getvalue()], "sks", "ring")
        assert got == "INVALID_ARGUMENT" and "max_image_pixels" in details
        assert c.health() == "SERVING"


def test_generate_honours_the_client_deadline(bundle, tmp_path):
    """A deadline shorter than the sampling: DEADLINE_EXCEEDED, the daemon stops sampling and frees the slot."""
    import re

    import grpc

    d = DaemonProc(bundle, str(tmp_path / "state"), "--max-concurrent-generations", "1")
    try:
        with EdgeClient(d.address, timeout=60) as c:
            c.wait_ready(20)
            req = pb.GenerateRequest(prompt="a red star", steps=200, seed=1)
            with pytest.raises(grpc.RpcError) as e:
                c.stub.Generate(req, timeout=0.5)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            ok = c.generate("a red star", steps=2, seed=1)  # the one slot is free again
            assert ok.steps == 2 and ok.png
        deadline = time.time() + 10
        while time.time() < deadline and "deadline passed" not in d.logs():
            time.sleep(0.1)
        m = re.search(r"deadline passed after (\d+) of 200 sampling steps", d.logs())
        assert m and int(m.group(1)) < 200
    finally:
        d.stop()


def test_eight_clients_generate_while_a_job_trains(daemon):
    with EdgeClient(daemon.address, timeout=120) as c:
        c.wait_ready(20)
        stream = c.personalize(subject_pngs(2), token="sks", class_noun="ring", steps=40)
        first = next(iter(stream))
        results, errors = [], []

        def gen(k: int) -> None:
            try:
                with EdgeClient(daemon.address, timeout=120) as ck:
                    r = ck.generate(f"a red circle, {k}", steps=3, seed=k + 1)
                    results.append(_img(r.png).shape)
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=gen, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert not errors and results == [(64, 64, 3)] * 8
        rest = [KIND(e.kind) for e in stream]
        assert rest[-1] == "DONE" and state_name(c.get_job(first.job_id).state) == "DONE"


def test_remote_listen_needs_a_token_and_tokens_are_checked(bundle, tmp_path):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "edge_runtime.server", "--bundle", bundle, "--listen", "0.0.0.0:0",
                        "--state", str(tmp_path / "s0")], capture_output=True, text=True, timeout=60,
                       env={k: v for k, v in os.environ.items() if k != "EDGEBLOCK_TOKEN"})
    assert p.returncode == 2 and "bearer token" in p.stderr
    secret = "s3cret-token-0123456789"
    d = DaemonProc(bundle, str(tmp_path / "s1"), token=secret, listen="0.0.0.0:0")
    try:
        with EdgeClient(d.address, timeout=30) as anon:
            anon.wait_ready(20)
            assert anon.health() == "SERVING"  # health stays open for probes
            with pytest.raises(ClientError) as e:
                anon.info()
            assert e.value.code == "UNAUTHENTICATED"
        with EdgeClient(d.address, token="wrong", timeout=30) as bad:
            with pytest.raises(ClientError) as e:
                list(bad.personalize(subject_pngs(1), "sks", "ring", steps=2))
            assert e.value.code == "UNAUTHENTICATED"
        with EdgeClient(d.address, token=secret, timeout=30) as ok:
            assert ok.info().family == "flux"
            _personalize(ok, steps=2)
    finally:
        d.stop()
    assert secret not in d.logs()
