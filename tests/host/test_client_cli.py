"""The daemon client (edgeblock.client) and its CLI commands against a fake servicer on a real gRPC server.

The fake implements the generated EdgeBlockServicer on 127.0.0.1 with canned answers and records what
arrives (requests, bearer metadata); the real daemon is tested elsewhere.
"""

from __future__ import annotations

import io
import json
import os
import sys
import threading
import types
from concurrent import futures

import grpc
import pytest
from edgeblock import client as client_mod
from edgeblock.cli import main
from edgeblock.client import ClientError, EdgeClient
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from PIL import Image

from edge_runtime.api import SERVICE_NAME, kind_name
from edge_runtime.api import edgeblock_pb2 as pb
from edge_runtime.api import edgeblock_pb2_grpc as pb_grpc

TOKEN = "s3cret-token"


def _png(side: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


class FakeEdge(pb_grpc.EdgeBlockServicer):
    def __init__(self):
        self.calls: list[tuple[str, object, dict]] = []
        self.cancelled = threading.Event()
        self.adapters = {
            "ad-1": pb.Adapter(id="ad-1", name="sks dog", token="sks", class_noun="dog", steps=3, final_loss=0.125,
                               created=1_700_000_000.0, lora_rank=4, job_id="job-0", size_bytes=11),
            "ad-2": pb.Adapter(id="ad-2", name="zwx cat", token="zwx", class_noun="cat", steps=5, final_loss=0.5,
                               created=1_700_000_100.0, lora_rank=4, job_id="job-9", size_bytes=11),
        }

    def _enter(self, name, request, context):
        md = dict(context.invocation_metadata())
        self.calls.append((name, request, md))
        if md.get("authorization") != f"Bearer {TOKEN}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    def _adapter(self, adapter_id, context):
        if adapter_id not in self.adapters:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no adapter {adapter_id!r}")
        return self.adapters[adapter_id]

    def Personalize(self, request, context):
        self._enter("Personalize", request, context)
        K = pb.JobEvent
        if request.class_noun == "hang":  # waits for CancelJob (or the client going away)
            context.add_callback(self.cancelled.set)
            yield K(kind=K.KIND_QUEUED, job_id="job-hang", queue_position=0)
            self.cancelled.wait(10)
            yield K(kind=K.KIND_CANCELLED, job_id="job-hang", message="cancelled by the client")
            return
        if request.class_noun == "drop0" and not any(r.request_id == request.request_id for n, r, _ in self.calls[:-1]
                                                     if n == "Personalize"):
            context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset before the first event")
        for i, ev in enumerate(self._events(request)):
            if request.class_noun == "drop" and i == 4:  # after the first step: the connection drops
                context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
            yield ev

    def WatchJob(self, request, context):
        self._enter("WatchJob", request, context)
        if request.job_id != "job-1":
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown job {request.job_id}")
        yield from self._events(pb.PersonalizeRequest(steps=3, token="sks"))

    def ListJobs(self, request, context):
        self._enter("ListJobs", request, context)
        jobs = [pb.Job(id="job-2", state=pb.Job.STATE_RUNNING, step=1, total_steps=3, name="zwx cat"),
                pb.Job(id="job-1", state=pb.Job.STATE_DONE, step=3, total_steps=3, name="sks dog", adapter_id="ad-new")]
        start = 1 if request.page_token == "p2" else 0
        if request.page_size == 1:
            return pb.ListJobsResponse(jobs=jobs[start:start + 1], next_page_token="" if start else "p2")
        return pb.ListJobsResponse(jobs=jobs)

    def _events(self, request):
        K = pb.JobEvent
        total = request.steps or 3
        yield K(kind=K.KIND_QUEUED, job_id="job-1", queue_position=1)
        yield K(kind=K.KIND_ENCODING, job_id="job-1")
        yield K(kind=K.KIND_PRECOMPUTING, job_id="job-1", progress=1.0)
        for s in range(1, total + 1):
            yield K(kind=K.KIND_STEP, job_id="job-1", step=s, total_steps=total, loss=1.0 / s, elapsed_s=0.1 * s)
        if request.token == "fail":
            yield K(kind=K.KIND_FAILED, job_id="job-1", message="trainer ran out of memory")
            return
        yield K(kind=K.KIND_CHECKPOINT, job_id="job-1", step=total, total_steps=total)
        yield K(kind=K.KIND_DONE, job_id="job-1", adapter_id="ad-new", step=total, total_steps=total, elapsed_s=1.25)

    def _generate(self, request, context):
        pairs = [(a.adapter_id, a.scale if a.HasField("scale") else 1.0) for a in request.adapters]
        pairs = pairs or ([(request.adapter_id, 1.0)] if request.adapter_id else [])
        for aid, _ in pairs:
            self._adapter(aid, context)
        size, seed = request.size or 8, request.seed if request.HasField("seed") else 7
        images = [pb.GeneratedImage(png=_png(size), seed=seed + i) for i in range(request.num_images or 1)]
        r = pb.GenerateResponse(png=images[0].png, seed=seed, steps=request.steps or 20, guidance=3.5, size=size,
                                adapter_id=pairs[0][0] if pairs else "", time_s=0.5, images=images,
                                adapters=[pb.AdapterWeight(adapter_id=a, scale=s) for a, s in pairs])
        r.time.FromNanoseconds(500_000_000)
        return r

    def Generate(self, request, context):
        self._enter("Generate", request, context)
        return self._generate(request, context)

    def GenerateStream(self, request, context):
        self._enter("GenerateStream", request, context)
        r = self._generate(request, context)
        for i in range(len(r.images)):
            for s in (1, 2):
                yield pb.GenerateEvent(progress=pb.GenerateProgress(image=i, step=s, total_steps=2))
        yield pb.GenerateEvent(result=r)

    def ListAdapters(self, request, context):
        self._enter("ListAdapters", request, context)
        return pb.ListAdaptersResponse(adapters=list(self.adapters.values()))

    def GetAdapter(self, request, context):
        self._enter("GetAdapter", request, context)
        return self._adapter(request.adapter_id, context)

    def DeleteAdapter(self, request, context):
        self._enter("DeleteAdapter", request, context)
        self._adapter(request.adapter_id, context)
        del self.adapters[request.adapter_id]
        return pb.DeleteAdapterResponse(deleted=True)

    def ExportAdapter(self, request, context):
        self._enter("ExportAdapter", request, context)
        a = self._adapter(request.adapter_id, context)
        return pb.ExportAdapterResponse(safetensors=b"ST:" + a.id.encode(), filename=f"{a.id}-{a.token}.safetensors",
                                        adapter=a)

    def GetJob(self, request, context):
        self._enter("GetJob", request, context)
        return pb.Job(id=request.job_id, state=pb.Job.STATE_DONE, step=3, total_steps=3, adapter_id="ad-new")

    def CancelJob(self, request, context):
        self._enter("CancelJob", request, context)
        self.cancelled.set()
        return pb.Job(id=request.job_id, state=pb.Job.STATE_CANCELLED, step=1, total_steps=3)

    def GetInfo(self, request, context):
        self._enter("GetInfo", request, context)
        return pb.Info(family="builtin", sizes=[8, 16], gen_res=8, trainer="ort", limits=pb.Limits(max_images=4))

    def names(self):
        return [c[0] for c in self.calls]


@pytest.fixture
def daemon():
    fake = FakeEdge()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_EdgeBlockServicer_to_server(fake, server)
    hs = health.HealthServicer()
    hs.set("", health_pb2.HealthCheckResponse.SERVING)
    hs.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    fake.address = f"127.0.0.1:{port}"
    yield fake
    fake.cancelled.set()
    server.stop(None)


@pytest.fixture
def token_file(tmp_path):
    p = tmp_path / "token"
    p.write_text(f"  {TOKEN}\n")
    return str(p)


@pytest.fixture(autouse=True)
def _no_env_token(monkeypatch):
    monkeypatch.delenv("EDGEBLOCK_TOKEN", raising=False)


def _bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _images(tmp_path, n=2):
    paths = []
    for i in range(n):
        p = tmp_path / f"subject{i}.png"
        p.write_bytes(_png(8 + i))
        paths.append(str(p))
    return paths


# -- the client ------------------------------------------------------------------------------------------

def test_client_calls_carry_the_bearer_token_and_map_errors(daemon, tmp_path):
    with EdgeClient(daemon.address, token=TOKEN, timeout=10) as c:
        assert c.wait_ready(10) is c
        assert c.health() == "SERVING" and c.health(SERVICE_NAME) == "SERVING"
        assert c.info().sizes == [8, 16]
        assert [a.id for a in c.list_adapters()] == ["ad-1", "ad-2"]
        assert c.get_adapter("ad-1").name == "sks dog"
        assert c.export_adapter("ad-2") == (b"ST:ad-2", "ad-2-zwx.safetensors")
        assert c.get_job("job-1").state == pb.Job.STATE_DONE
        assert c.cancel_job("job-1").state == pb.Job.STATE_CANCELLED
        r = c.generate("a photo", adapter_id="ad-1", size=16)
        assert r.png.startswith(b"\x89PNG") and r.size == 16 and r.adapter_id == "ad-1"
        with pytest.raises(ClientError) as e:
            c.get_adapter("nope")
        assert e.value.code == "NOT_FOUND" and "nope" in e.value.details
        assert isinstance(e.value, RuntimeError) and str(e.value).startswith("NOT_FOUND: ")
        assert c.delete_adapter("ad-1") is True and "ad-1" not in daemon.adapters

        paths = _images(tmp_path)
        events = list(c.personalize([paths[0], _bytes(paths[1])], token="sks", class_noun="dog", steps=2,
                                    learning_rate=1e-3, seed=5, name="rex"))
    kinds = [kind_name(e.kind) for e in events]
    assert kinds == ["QUEUED", "ENCODING", "PRECOMPUTING", "STEP", "STEP", "CHECKPOINT", "DONE"]
    assert events[-1].adapter_id == "ad-new"
    _, req, _ = daemon.calls[-1]
    assert [im.data for im in req.images] == [_bytes(p) for p in paths]
    assert (req.token, req.class_noun, req.steps, req.seed, req.name) == ("sks", "dog", 2, 5, "rex")
    assert all(md.get("authorization") == f"Bearer {TOKEN}" for _, _, md in daemon.calls)

    with EdgeClient(daemon.address) as anonymous:
        with pytest.raises(ClientError) as e:
            anonymous.info()
        assert e.value.code == "UNAUTHENTICATED"
        with pytest.raises(ClientError) as e:
            list(anonymous.personalize([b"x"], token="sks", class_noun="dog"))
        assert e.value.code == "UNAUTHENTICATED"
    assert "authorization" not in daemon.calls[-1][2]


def test_client_refuses_half_a_tls_setup_and_a_dead_address():
    with pytest.raises(ValueError, match="tls_cert and tls_key"):
        EdgeClient("127.0.0.1:1", tls_ca=b"ca", tls_cert=b"cert")
    with pytest.raises(ValueError, match="needs tls_ca"):
        EdgeClient("127.0.0.1:1", tls_cert=b"cert", tls_key=b"key")
    with EdgeClient("127.0.0.1:1") as c:
        with pytest.raises(ClientError) as e:
            c.wait_ready(0.2)
        assert e.value.code == "UNAVAILABLE"


# -- edgeblock personalize ---------------------------------------------------------------------------------

def test_personalize_streams_and_prints_the_adapter_id_last(daemon, tmp_path, token_file, capsys):
    paths = _images(tmp_path, 3)
    rc = main(["personalize", "--server", daemon.address, "--images", *paths, "--token", "sks", "--class-noun", "dog",
               "--steps", "4", "--lr", "0.001", "--seed", "9", "--name", "rex", "--auth-token-file", token_file])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.splitlines()[-1] == "ad-new"
    assert "4/4" in err and "done" in err  # the progress bar (stderr) reached the total of the STEP events
    name, req, md = daemon.calls[-1]
    assert name == "Personalize" and md["authorization"] == f"Bearer {TOKEN}"  # the file's token, stripped
    assert len(req.images) == 3 and req.images[2].data == _bytes(paths[2])
    assert (req.steps, req.seed, req.name) == (4, 9, "rex") and req.learning_rate == pytest.approx(1e-3)
    assert list(req.captions) == []  # none given: the daemon trains on "a sks dog"
    caps = ["a large sks dog on a blue background, top left", "a small sks dog on a red background, center"]
    rc = main(["personalize", "--server", daemon.address, "--images", *paths[:2], "--token", "sks", "--class-noun",
               "dog", "--caption", caps[0], "--caption", caps[1], "--quiet", "--auth-token-file", token_file])
    assert rc == 0
    assert list(daemon.calls[-1][1].captions) == caps  # in --images order
    assert list(daemon.calls[-1][1].class_images) == [] and daemon.calls[-1][1].prior_share == 0
    class_caps = ["a large red dog on a green background, left", "a large black dog on a white background, top"]
    rc = main(["personalize", "--server", daemon.address, "--images", paths[0], "--token", "sks", "--class-noun", "dog",
               "--class-images", paths[1], paths[2], "--class-caption", class_caps[0], "--class-caption", class_caps[1],
               "--prior-share", "0.4", "--quiet", "--auth-token-file", token_file])
    assert rc == 0
    req = daemon.calls[-1][1]
    assert [im.data for im in req.class_images] == [_bytes(paths[1]), _bytes(paths[2])]
    assert list(req.class_captions) == class_caps and req.prior_share == pytest.approx(0.4)
    n = len(daemon.calls)
    for extra, message in ((["--class-caption", "a dog"], "need --class-images"),
                           (["--class-images", paths[1], "--prior-share", "1"], "--prior-share must be in (0, 1)")):
        rc = main(["personalize", "--server", daemon.address, "--images", paths[0], "--token", "sks", "--class-noun",
                   "dog", *extra, "--quiet", "--auth-token-file", token_file])
        assert rc == 2 and message in capsys.readouterr().err, extra
    assert len(daemon.calls) == n  # refused before any call


def test_personalize_json_lines_and_env_token(daemon, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDGEBLOCK_TOKEN", TOKEN)
    rc = main(["personalize", "--server", daemon.address, "--images", *_images(tmp_path, 1), "--token", "sks",
               "--class-noun", "dog", "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    events = [json.loads(line) for line in out.splitlines()]
    # the proto's value names
    assert [e["kind"] for e in events][:3] == ["KIND_QUEUED", "KIND_ENCODING", "KIND_PRECOMPUTING"]
    assert events[-1]["kind"] == "KIND_DONE" and events[-1]["adapter_id"] == "ad-new"
    assert events[3]["loss"] == 1.0 and events[4]["loss"] == 0.5


def test_personalize_failed_job_exits_1_with_the_reason(daemon, tmp_path, token_file, capsys):
    rc = main(["personalize", "--server", daemon.address, "--images", *_images(tmp_path, 1), "--token", "fail",
               "--class-noun", "dog", "--auth-token-file", token_file])
    out, err = capsys.readouterr()
    assert rc == 1 and "job job-1 failed: trainer ran out of memory" in err and "ad-new" not in out


def test_personalize_ctrl_c_cancels_the_job(daemon, tmp_path, token_file, monkeypatch, capsys):
    real_next = client_mod.JobStream.__next__

    def next_then_interrupt(self):  # Ctrl-C while waiting for the event after QUEUED
        if self.last is not None:
            raise KeyboardInterrupt
        return real_next(self)

    monkeypatch.setattr(client_mod.JobStream, "__next__", next_then_interrupt)
    rc = main(["personalize", "--server", daemon.address, "--images", *_images(tmp_path, 1), "--token", "sks",
               "--class-noun", "hang", "--auth-token-file", token_file])
    err = capsys.readouterr().err
    assert rc == 130
    cancels = [req for name, req, _ in daemon.calls if name == "CancelJob"]
    assert [r.job_id for r in cancels] == ["job-hang"]
    assert "cancelled job job-hang" in err


def test_client_errors_exit_1_with_the_code(daemon, tmp_path, token_file, capsys):
    rc = main(["personalize", "--server", daemon.address, "--images", *_images(tmp_path, 1), "--token", "sks",
               "--class-noun", "dog"])
    err = capsys.readouterr().err
    assert rc == 1 and "edgeblock personalize: error: UNAUTHENTICATED: missing or wrong bearer token" in err
    assert "Traceback" not in err
    rc = main(["adapters", "--server", daemon.address, "--auth-token-file", token_file, "rm", "ghost"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("edgeblock adapters: error: NOT_FOUND: ") and "ghost" in err
    # usage errors stay exit 2
    rc = main(["personalize", "--server", daemon.address, "--images", str(tmp_path / "missing.png"), "--token", "sks",
               "--class-noun", "dog", "--auth-token-file", token_file])
    assert rc == 2 and "missing.png: no such file" in capsys.readouterr().err


# -- edgeblock generate --server ---------------------------------------------------------------------------

def test_generate_on_the_daemon_writes_the_png(daemon, tmp_path, token_file, capsys):
    out = tmp_path / "g.png"
    rc = main(["generate", "--server", daemon.address, "--prompt", "a photo of sks dog", "--adapter", "ad-1",
               "--size", "16", "--seed", "3", "-o", str(out), "--auth-token-file", token_file])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (16, 16)
    name, req, _ = daemon.calls[-1]
    assert name == "GenerateStream"  # with a progress bar
    assert (req.prompt, req.adapter_id, req.size, req.seed) == ("a photo of sks dog", "ad-1", 16, 3)
    assert req.steps == 0 and req.guidance == 0  # unset: the daemon's defaults, not the in-process ones
    assert "seed 3" in stdout and "20 steps" in stdout and "0.50 s" in stdout and "adapters ad-1" in stdout

    # several images, a negative prompt and two adapters with their scales; --quiet: plain Generate
    rc = main(["generate", "--server", daemon.address, "--prompt", "p", "--adapter", "ad-1:0.5", "--adapter", "ad-2",
               "--negative-prompt", "blurry", "--num-images", "3", "--seed", "0", "--quiet", "-o", str(tmp_path / "m.png"),
               "--auth-token-file", token_file])
    stdout = capsys.readouterr().out
    assert rc == 0
    name, req, _ = daemon.calls[-1]
    assert name == "Generate" and req.num_images == 3 and req.negative_prompt == "blurry" and not req.adapter_id
    assert [(a.adapter_id, a.scale) for a in req.adapters] == [("ad-1", 0.5), ("ad-2", 1.0)] and req.seed == 0
    assert sorted(n for n in os.listdir(tmp_path) if n.endswith(".png")) == ["g.png", "m-0.png", "m-1.png", "m-2.png"]
    assert "m-2.png: 8x8 ('p', seed 2," in stdout and "adapters ad-1 x0.5, ad-2" in stdout
    assert main(["generate", "--server", daemon.address, "--prompt", "p", "--adapter", "ad-1:lots", "-o",
                 str(tmp_path / "x.png"), "--auth-token-file", token_file]) == 2

    rc = main(["generate", "--server", daemon.address, "--prompt", "p", "--adapter", "nope", "-o",
               str(tmp_path / "n.png"), "--auth-token-file", token_file])
    assert rc == 1 and "edgeblock generate: error: NOT_FOUND:" in capsys.readouterr().err
    assert not (tmp_path / "n.png").exists()


def test_generate_flags_that_need_or_exclude_a_server(tmp_path, capsys):
    rc = main(["generate", "--prompt", "p", "--size", "16", "-o", str(tmp_path / "x.png")])
    assert rc == 2 and "--size needs --server" in capsys.readouterr().err
    rc = main(["generate", "--server", "127.0.0.1:1", "--model", "builtin", "--prompt", "p", "-o", str(tmp_path / "x.png")])
    assert rc == 2 and "exclusive" in capsys.readouterr().err


# -- edgeblock adapters ------------------------------------------------------------------------------------

def test_adapters_ls_rm_export(daemon, tmp_path, token_file, monkeypatch, capsys):
    base = ["adapters", "--server", daemon.address, "--auth-token-file", token_file]
    assert main([*base, "ls"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "NAME", "TOKEN", "STEPS", "FINAL", "LOSS", "CREATED"]
    assert lines[1].split()[:6] == ["ad-1", "sks", "dog", "sks", "3", "0.1250"] and len(lines) == 3

    # the connection flags may also follow the action
    assert main(["adapters", "ls", "--json", "--server", daemon.address, "--auth-token-file", token_file]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [a["id"] for a in listed] == ["ad-1", "ad-2"]
    assert listed[0]["final_loss"] == 0.125 and listed[0]["size_bytes"] == 11 and listed[0]["created"] == 1_700_000_000.0

    monkeypatch.chdir(tmp_path)
    assert main([*base, "export", "ad-2"]) == 0
    assert (tmp_path / "ad-2-zwx.safetensors").read_bytes() == b"ST:ad-2"
    assert main([*base, "export", "ad-1", "-o", str(tmp_path / "mine.safetensors")]) == 0
    assert (tmp_path / "mine.safetensors").read_bytes() == b"ST:ad-1"
    capsys.readouterr()

    assert main([*base, "rm", "ad-1"]) == 0
    assert capsys.readouterr().out.strip() == "deleted ad-1"
    assert list(daemon.adapters) == ["ad-2"]
    assert main(["adapters", "ls"]) == 2 and "--server" in capsys.readouterr().err


# -- edgeblock serve ---------------------------------------------------------------------------------------

def test_serve_builds_the_server_config(tmp_path, token_file, monkeypatch):
    got = {}

    class ServerConfig:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    fake = types.ModuleType("edge_runtime.server")
    fake.ServerConfig = ServerConfig
    fake.serve_forever = lambda config: got.update(config.kwargs)
    monkeypatch.setitem(sys.modules, "edge_runtime.server", fake)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    cert, key, ca = (tmp_path / n for n in ("c.pem", "k.pem", "ca.pem"))
    for f in (cert, key, ca):
        f.write_text("pem")

    assert main(["serve", "--bundle", str(bundle), "--listen", "0.0.0.0:6000", "--state", str(tmp_path / "st"),
                 "--token-file", token_file, "--tls-cert", str(cert), "--tls-key", str(key), "--tls-client-ca", str(ca),
                 "--trainer", "ort", "--train-device", "cuda:1", "--max-concurrent-generations", "2",
                 "--max-queue", "5", "--prompt-cache-mb", "0"]) == 0
    from edge_runtime.daemon.config import ServerConfig as RealConfig  # what the daemon makes of the keywords

    def settings(kwargs):
        c = RealConfig(**kwargs)
        return dict(bundle=c.bundle, listen=c.listen, state_dir=c.state_dir, token=c.token,
                    allow_insecure_remote=c.allow_insecure_remote, tls_cert=c.tls_cert, tls_key=c.tls_key,
                    tls_client_ca=c.tls_client_ca, trainer=c.trainer, train_device=c.train_device,
                    max_concurrent_generations=c.limits.max_concurrent_generations, max_queue=c.limits.max_queue,
                    prompt_cache_mb=c.prompt_cache_mb)

    assert settings(got) == dict(bundle=str(bundle), listen="0.0.0.0:6000", state_dir=str(tmp_path / "st"),
                                 token=TOKEN, allow_insecure_remote=False, tls_cert=str(cert), tls_key=str(key),
                                 tls_client_ca=str(ca), trainer="ort", train_device="cuda:1",
                                 max_concurrent_generations=2, max_queue=5, prompt_cache_mb=0.0)

    got.clear()
    monkeypatch.setenv("EDGEBLOCK_TOKEN", "from-env")
    assert main(["serve", "--bundle", str(bundle), "--state", str(tmp_path / "st"), "--allow-insecure-remote"]) == 0
    assert settings(got) == dict(bundle=str(bundle), listen="127.0.0.1:50051", state_dir=str(tmp_path / "st"),
                                 token="from-env", allow_insecure_remote=True, tls_cert=None, tls_key=None,
                                 tls_client_ca=None, trainer="auto", train_device="auto", max_concurrent_generations=2,
                                 max_queue=4, prompt_cache_mb=0.0)

    got.clear()
    assert main(["serve", "--bundle", str(bundle), "--state", "s", "--tls-cert", str(cert)]) == 2
    assert main(["serve", "--bundle", str(bundle), "--state", "s", "--prompt-cache-mb", "-1"]) == 2
    assert main(["serve", "--bundle", str(tmp_path / "nope"), "--state", "s"]) == 2
    assert not got


def test_personalize_reattaches_after_a_dropped_connection(daemon, tmp_path, token_file, capsys):
    # dropped after the first step: WatchJob re-attaches, and each event is shown once, in order
    rc = main(["personalize", "--server", daemon.address, "--images", *_images(tmp_path, 1), "--token", "sks",
               "--class-noun", "drop", "--auth-token-file", token_file, "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    kinds = [json.loads(line)["kind"].removeprefix("KIND_") for line in out.splitlines()]
    assert kinds == ["QUEUED", "ENCODING", "PRECOMPUTING", "STEP", "STEP", "STEP", "CHECKPOINT", "DONE"]
    assert [r.job_id for n, r, _ in daemon.calls if n == "WatchJob"] == ["job-1"]
    (req,) = [r for n, r, _ in daemon.calls if n == "Personalize"]
    assert len(req.request_id) == 32  # a fresh uuid4 hex per command

    # dropped before the job was known: the same request again, with the same request id
    rc = main(["personalize", "--server", daemon.address, "--images", *_images(tmp_path, 1), "--token", "sks",
               "--class-noun", "drop0", "--auth-token-file", token_file, "--request-id", "mine-1", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0 and out.strip() == "ad-new"
    again = [r for n, r, _ in daemon.calls if n == "Personalize" and r.class_noun == "drop0"]
    assert [r.request_id for r in again] == ["mine-1", "mine-1"] and again[0] == again[1]

    # --reattach-timeout 0: the drop is an error, naming the job to watch
    rc = main(["personalize", "--server", daemon.address, "--images", *_images(tmp_path, 1), "--token", "sks",
               "--class-noun", "drop", "--auth-token-file", token_file, "--reattach-timeout", "0", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and "UNAVAILABLE: connection reset" in err


def test_jobs_ls_watch_cancel(daemon, tmp_path, token_file, capsys):
    with EdgeClient(daemon.address, token=TOKEN, timeout=10) as c:
        assert [j.id for j in c.list_jobs(page_size=1)] == ["job-2", "job-1"]  # every page
    rc = main(["jobs", "--server", daemon.address, "--auth-token-file", token_file, "ls"])
    out = capsys.readouterr().out
    assert rc == 0 and out.splitlines()[0].split() == ["ID", "STATE", "STEP", "NAME", "ADAPTER", "CREATED"]
    assert out.splitlines()[1].split()[:3] == ["job-2", "RUNNING", "1/3"]
    rc = main(["jobs", "ls", "--json", "--server", daemon.address, "--auth-token-file", token_file])
    assert rc == 0 and [j["id"] for j in json.loads(capsys.readouterr().out)] == ["job-2", "job-1"]
    rc = main(["jobs", "watch", "job-1", "--server", daemon.address, "--auth-token-file", token_file, "--quiet"])
    assert rc == 0 and capsys.readouterr().out.strip() == "ad-new"
    rc = main(["jobs", "watch", "job-404", "--server", daemon.address, "--auth-token-file", token_file])
    assert rc == 1 and "NOT_FOUND: unknown job job-404" in capsys.readouterr().err
    rc = main(["jobs", "cancel", "job-1", "--server", daemon.address, "--auth-token-file", token_file])
    assert rc == 0 and "job job-1: CANCELLED at step 1/3" in capsys.readouterr().out
