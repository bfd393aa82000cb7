"""The edge daemon: Personalize and Generate over gRPC from a compiled bundle (torch-free).

    edgeblock serve --bundle B --listen 127.0.0.1:50051 --state DIR

- One training job at a time, a bounded queue behind it; generations run beside it up to
  `max_concurrent_generations` at once.
- Jobs checkpoint every N steps into the state directory; after a crash (kill -9) the restarted
  daemon resumes each unfinished job from its last checkpoint. An adapter's id is fixed when its
  job is accepted, so a job that finished just before a crash is not trained twice.
- CancelJob, or a Personalize client that goes away, stops the job before its next step.
- SIGTERM: stop accepting, checkpoint the running job at its current step (it resumes on the next
  start), exit 0.
- Beyond loopback a bearer token is required (`authorization: Bearer <token>`), compared in
  constant time; the daemon refuses to start without one unless told `allow_insecure_remote`.
  TLS (and mTLS with a client CA) optional. Tokens never reach the logs.
- grpc.health.v1 health checking and server reflection.
"""

from __future__ import annotations

import hmac
import io
import ipaddress
import logging
import math
import os
import queue
import signal
import sys
import threading
import time
from collections import OrderedDict
from concurrent import futures
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .isolation import block_host_frameworks

log = logging.getLogger("edgeblock.daemon")

JOB_STATES = ("QUEUED", "RUNNING", "DONE", "FAILED", "CANCELLED")
TERMINAL = ("DONE", "FAILED", "CANCELLED")


@dataclass
class Limits:
    max_images: int = 16
    max_image_bytes: int = 16 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_steps: int = 5000
    max_prompt_chars: int = 1000
    max_generate_steps: int = 200
    max_queue: int = 4
    max_concurrent_generations: int = 2
    max_token_chars: int = 64
    max_name_chars: int = 200


@dataclass
class Defaults:
    steps: int | None = None  # None: the bundle's recipe (manifest.json, edge_runtime.recipe)
    learning_rate: float | None = None  # None: the bundle's recipe
    checkpoint_every: int = 25
    generate_steps: int = 30
    guidance: float = 3.0
    seed: int = 0


@dataclass
class ServerConfig:
    bundle: str
    listen: str = "127.0.0.1:50051"
    state_dir: str = "edgeblock-state"
    token: str | None = None
    allow_insecure_remote: bool = False
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    trainer: str = "auto"
    train_device: str = "auto"  # auto: cuda when the trainer's runtime has it, else cpu
    max_concurrent_generations: int | None = None
    max_queue: int | None = None
    limits: Limits = field(default_factory=Limits)
    defaults: Defaults = field(default_factory=Defaults)
    threads: int | None = None
    workers: int = 32

    def __post_init__(self) -> None:
        if self.max_concurrent_generations is not None:
            self.limits.max_concurrent_generations = int(self.max_concurrent_generations)
        if self.max_queue is not None:
            self.limits.max_queue = int(self.max_queue)
        if self.limits.max_concurrent_generations < 1:
            raise ValueError("max_concurrent_generations must be >= 1")
        if self.limits.max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        if self.trainer not in ("auto", "ort", "torch"):
            raise ValueError(f"trainer must be auto, ort or torch, got {self.trainer!r}")
        if self.train_device != "auto":
            from .ort_trainer import parse_device

            parse_device(self.train_device)
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca (mTLS) needs --tls-cert and --tls-key")


class ConfigError(ValueError):
    pass


def is_loopback(listen: str) -> bool:
    host = listen.rsplit(":", 1)[0].strip("[]") if ":" in listen else listen
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_security(cfg: ServerConfig) -> None:
    if not is_loopback(cfg.listen) and not cfg.token and not cfg.allow_insecure_remote:
        raise ConfigError(
            f"refusing to listen on {cfg.listen} (beyond loopback) without a bearer token: pass --token-file "
            "(or EDGEBLOCK_TOKEN), or --allow-insecure-remote to accept unauthenticated clients"
        )


# ---------------------------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------------------------
class JobRecord:
    def __init__(self, data: dict):
        self.data = data
        self.events: list[Any] = []
        self.cond = threading.Condition()
        self.cancel = threading.Event()

    @property
    def id(self) -> str:
        return self.data["id"]

    @property
    def state(self) -> str:
        return self.data["state"]

    def finished(self) -> bool:
        return self.state in TERMINAL


def lock_state_dir(state_dir: str) -> int:
    """Hold STATE/daemon.lock (flock) for the process's life: two daemons on one state directory
    would resume the same jobs and race on the adapter index. Returns the open descriptor."""
    import fcntl

    os.makedirs(state_dir, exist_ok=True)
    path = os.path.join(state_dir, "daemon.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ConfigError(f"state directory {state_dir} is in use by another daemon (pid {other}); "
                          "give each daemon its own --state") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


class Daemon:
    """The service state: bundle, store, job queue and worker, generation slots."""

    def __init__(self, cfg: ServerConfig):
        from .personalize import ImageLimits
        from .runtime import Bundle
        from .store import Store

        self.cfg = cfg
        self.bundle = Bundle(cfg.bundle, threads=cfg.threads)
        # personalization defaults: what the bundle was compiled for (its recipe), unless configured
        self.recipe = self.bundle.manifest.training_recipe()
        self.limits = cfg.limits
        self.defaults = replace(cfg.defaults, steps=cfg.defaults.steps or self.recipe.steps,
                                learning_rate=cfg.defaults.learning_rate or self.recipe.learning_rate)
        self._state_lock = lock_state_dir(cfg.state_dir)
        self.store = Store(cfg.state_dir)
        self.trainer = self._pick_trainer(cfg.trainer)
        self.train_device = pick_train_device(self.trainer, cfg.train_device)
        self.image_limits = ImageLimits(cfg.limits.max_images, cfg.limits.max_image_bytes, cfg.limits.max_image_pixels)
        self.jobs: dict[str, JobRecord] = {}
        self.queue: queue.Queue[JobRecord] = queue.Queue()
        self.queued = 0
        self.lock = threading.Lock()
        self.gen_slots = threading.BoundedSemaphore(cfg.limits.max_concurrent_generations)
        self.shutting_down = threading.Event()
        self.adapter_cache: OrderedDict[str, dict] = OrderedDict()
        self.current: JobRecord | None = None
        self._recover()
        self.worker = threading.Thread(target=self._work, name="edgeblock-trainer", daemon=True)
        self.worker.start()

    def _pick_trainer(self, want: str) -> str:
        return pick_trainer(want)

    # ------------------------------------------------------------------ recovery
    def _recover(self) -> None:
        """Unfinished jobs of a previous run (crash or SIGTERM) resume from their last checkpoint."""
        for data in self.store.list_jobs():
            rec = JobRecord(data)
            self.jobs[rec.id] = rec
            if rec.state in TERMINAL:
                continue
            adapter_path = os.path.join(self.store.adapters_dir, data["adapter_id"], "adapter.json")
            if os.path.exists(adapter_path):  # finished just before the crash
                self._finish(rec, "DONE", message="recovered after restart")
                continue
            ck = os.path.join(self.store.job_dir(rec.id), "checkpoint")
            if not os.path.exists(ck):
                data["checkpoint_step"] = 0
            data["state"] = "QUEUED"
            data["resumed"] = int(data.get("resumed", 0)) + 1
            self.store.save_job(data)
            log.info("resuming job %s from step %d", rec.id, data.get("checkpoint_step", 0))
            self._emit(rec, "QUEUED", message=f"resumed after restart from step {data.get('checkpoint_step', 0)}")
            self.queue.put(rec)

    # ------------------------------------------------------------------ events
    def _emit(self, rec: JobRecord, kind: str, **kw) -> None:
        from .api import edgeblock_pb2 as pb

        ev = pb.JobEvent(kind=pb.JobEvent.Kind.Value(kind), job_id=rec.id,
                         elapsed_s=time.time() - rec.data.get("created", time.time()), **kw)
        with rec.cond:
            rec.events.append(ev)
            rec.cond.notify_all()

    def _finish(self, rec: JobRecord, state: str, message: str = "") -> None:
        rec.data.update(state=state, message=message)
        self.store.save_job(rec.data)
        self._emit(rec, state, message=message, adapter_id=rec.data["adapter_id"] if state == "DONE" else "",
                   step=int(rec.data.get("step", 0)), total_steps=int(rec.data["options"]["steps"]))
        self.store.drop_job_work(rec.id)

    # ------------------------------------------------------------------ submit
    def submit(self, request) -> JobRecord:
        from .personalize import JobOptions, PersonalizeError, choose_precompute, decode_images
        from .store import new_id

        L, D = self.limits, self.defaults
        if self.shutting_down.is_set():
            raise Unavailable("the daemon is shutting down")
        token, noun = request.token.strip(), request.class_noun.strip()
        if not token or len(token) > L.max_token_chars or any(c.isspace() for c in token):
            raise InvalidArgument(f"token must be one word of 1..{L.max_token_chars} characters (max_token_chars)")
        if not noun or len(noun) > L.max_token_chars:
            raise InvalidArgument(f"class_noun must have 1..{L.max_token_chars} characters (max_token_chars)")
        if len(request.name) > L.max_name_chars:
            raise InvalidArgument(f"name longer than max_name_chars={L.max_name_chars}")
        steps = int(request.steps) or D.steps
        if steps > L.max_steps:
            raise InvalidArgument(f"steps {steps} more than max_steps={L.max_steps}")
        lr = float(request.learning_rate) or D.learning_rate
        if not math.isfinite(lr) or not 0 < lr <= 1.0:
            raise InvalidArgument(f"learning_rate must be in (0, 1], got {request.learning_rate}")
        every = int(request.checkpoint_every) or D.checkpoint_every
        if every > L.max_steps:
            raise InvalidArgument(f"checkpoint_every {every} more than max_steps={L.max_steps}")
        try:
            mode = choose_precompute(self.bundle, request.precompute)
        except PersonalizeError as e:
            raise InvalidArgument(str(e)) from e
        if len(request.images) > L.max_images:  # before decoding anything
            raise InvalidArgument(f"{len(request.images)} images, more than max_images={L.max_images}")
        try:
            _imgs, pngs = decode_images([im.data for im in request.images], self.image_limits,
                                        int(self.bundle.manifest.gen_res))
        except PersonalizeError as e:
            raise InvalidArgument(str(e)) from e
        except Exception as e:  # Pillow raises e.g. SyntaxError on a corrupt PNG chunk
            raise InvalidArgument(f"an image is not a decodable PNG/JPEG ({type(e).__name__})") from e
        if len(request.class_images) > L.max_images:
            raise InvalidArgument(f"{len(request.class_images)} class images, more than max_images={L.max_images}")
        class_pngs: list[bytes] = []
        if request.class_images:
            try:
                _imgs, class_pngs = decode_images([im.data for im in request.class_images], self.image_limits,
                                                  int(self.bundle.manifest.gen_res))
            except PersonalizeError as e:
                raise InvalidArgument(f"class images: {e}") from e
            except Exception as e:  # noqa: BLE001 - as above
                raise InvalidArgument(f"a class image is not a decodable PNG/JPEG ({type(e).__name__})") from e
        elif request.class_captions or request.prior_share:
            raise InvalidArgument("class_captions and prior_share need class_images")
        captions = [c.strip() for c in request.captions]
        class_captions = [c.strip() for c in request.class_captions]
        for what, texts in (("caption", captions), ("class caption", class_captions)):
            for i, c in enumerate(texts):
                if not c or len(c) > L.max_prompt_chars:
                    raise InvalidArgument(f"{what} {i} must have 1..{L.max_prompt_chars} characters (max_prompt_chars)")
        share = float(request.prior_share) or 0.5
        try:
            opts = JobOptions(token, noun, steps, lr, int(request.seed) or D.seed, every, mode, captions=captions,
                              class_captions=class_captions, prior_share=share, batch=self.recipe.batch)
            opts.training_prompts(len(request.images))  # one caption per image, or none
            if class_pngs:
                opts.class_prompts(len(class_pngs))  # one class caption per class image, or none
        except PersonalizeError as e:
            raise InvalidArgument(str(e)) from e
        with self.lock:
            if self.queued >= L.max_queue + (0 if self.current is not None else 1):
                raise ResourceExhausted(f"the job queue is full (max_queue={L.max_queue} waiting behind the running job)")
            self.queued += 1
        now = time.time()
        data = {"id": new_id(), "adapter_id": new_id(), "state": "QUEUED", "step": 0, "checkpoint_step": 0,
                "loss": 0.0, "message": "", "created": now, "name": request.name or f"{token} {noun}",
                "options": asdict(opts), "trainer": self.trainer}
        rec = JobRecord(data)
        self.store.save_job(data)
        self.store.save_job_images(rec.id, pngs)
        if class_pngs:
            self.store.save_job_images(rec.id, class_pngs, kind="class_images")
        with self.lock:
            self.jobs[rec.id] = rec
        self._emit(rec, "QUEUED", queue_position=max(0, self.queue.qsize() + (1 if self.current else 0)))
        self.queue.put(rec)
        return rec

    # ------------------------------------------------------------------ the worker
    def _work(self) -> None:
        while not self.shutting_down.is_set():
            try:
                rec = self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            with self.lock:
                self.queued = max(0, self.queued - 1)
                if rec.cancel.is_set():
                    self._finish(rec, "CANCELLED", "cancelled while queued")
                    continue
                self.current = rec
            try:
                self._run(rec)
            finally:
                with self.lock:
                    self.current = None

    def _run(self, rec: JobRecord) -> None:
        from .personalize import Cancelled, JobOptions, Progress, images_from_pngs, run_job

        data = rec.data
        data["state"] = "RUNNING"
        self.store.save_job(data)
        opts = JobOptions(**data["options"])
        start = int(data.get("checkpoint_step", 0))
        work = self.store.job_dir(rec.id)

        def event(kind: str, **kw) -> None:
            if kind == "step":
                data["step"], data["loss"] = kw["step"], float(kw["loss"])
                self._emit(rec, "STEP", step=kw["step"], total_steps=kw["total"], loss=float(kw["loss"]))
            elif kind == "checkpoint":
                self._emit(rec, "CHECKPOINT", step=kw["step"], total_steps=kw["total"])
            elif kind == "encoding":
                self._emit(rec, "ENCODING")
            elif kind == "precomputing":
                self._emit(rec, "PRECOMPUTING", progress=float(kw.get("progress", 0.0)))

        def on_checkpoint(step: int) -> None:
            data["checkpoint_step"] = step
            self.store.save_job(data)

        def should_stop() -> bool:
            return rec.cancel.is_set() or self.shutting_down.is_set()

        try:
            images = images_from_pngs(self.store.job_images(rec.id))
            class_images = images_from_pngs(self.store.job_images(rec.id, kind="class_images"))
            result = run_job(self.bundle, opts, images, work, trainer_backend=self.trainer, train_device=self.train_device,
                             progress=Progress(event, should_stop), start_step=start, on_checkpoint=on_checkpoint,
                             checkpoint_on_stop=lambda: self.shutting_down.is_set() and not rec.cancel.is_set(),
                             class_images=class_images or None)
        except Cancelled as e:
            if rec.cancel.is_set():
                self._finish(rec, "CANCELLED", str(e))
            else:  # shutdown: stays resumable (RUNNING with its checkpoint)
                self.store.save_job(data)
            return
        except Exception as e:  # noqa: BLE001 - a failed job must not take the daemon down
            log.exception("job %s failed", rec.id)
            self._finish(rec, "FAILED", f"{type(e).__name__}: {e}")
            return
        meta = {"name": data["name"], "token": opts.token, "class_noun": opts.class_noun, "steps": opts.steps,
                "final_loss": result.final_loss, "lora_rank": int(self.bundle.manifest.lora.get("rank", 0)),
                "job_id": rec.id, "learning_rate": opts.learning_rate, "seed": opts.seed,
                "class_images": len(class_images), "prior_share": opts.prior_share if class_images else None,
                "train_seconds": result.seconds, "trainer": self.trainer, "bundle": self.bundle.model.get("fingerprint")}
        self.store.save_adapter(result.weights, meta, adapter_id=data["adapter_id"])
        data["loss"] = result.final_loss
        self._finish(rec, "DONE", f"trained {opts.steps} steps in {result.seconds:.1f} s")

    # ------------------------------------------------------------------ adapters and generation
    def adapter_weights(self, adapter_id: str) -> dict:
        with self.lock:
            w = self.adapter_cache.get(adapter_id)
            if w is not None:
                self.adapter_cache.move_to_end(adapter_id)
                return w
        weights, _info = self.store.load_adapter(adapter_id)
        for n, a in weights.items():
            want = self.bundle.lora_shapes.get(n)
            if want is not None and tuple(a.shape) != want:
                raise InvalidArgument(f"adapter {adapter_id}: {n} has shape {a.shape}, this bundle needs {want}")
        with self.lock:
            self.adapter_cache[adapter_id] = weights
            while len(self.adapter_cache) > 8:
                self.adapter_cache.popitem(last=False)
        return weights

    def generate(self, request, deadline: float | None) -> tuple[bytes, dict]:
        from .store import NotFound, StoreError, check_id

        L, D = self.limits, self.defaults
        if len(request.prompt) > L.max_prompt_chars:
            raise InvalidArgument(f"prompt of {len(request.prompt)} characters, more than max_prompt_chars={L.max_prompt_chars}")
        steps = int(request.steps) or D.generate_steps
        if steps > L.max_generate_steps:
            raise InvalidArgument(f"steps {steps} more than max_generate_steps={L.max_generate_steps}")
        g = float(request.guidance) or D.guidance
        if not math.isfinite(g) or not 0 < g <= 100:
            raise InvalidArgument(f"guidance must be in (0, 100], got {request.guidance}")
        sizes = self.bundle.sizes()
        size = int(request.size) or int(self.bundle.manifest.gen_res)
        if size not in sizes:
            raise InvalidArgument(f"size {size} is not supported by this bundle (sizes: {sizes})")
        seed = int(request.seed) or D.seed
        lora = None
        if request.adapter_id:
            try:
                check_id(request.adapter_id, "adapter_id")
                lora = self.adapter_weights(request.adapter_id)
            except NotFound as e:
                raise NotFoundError(str(e)) from e
            except StoreError as e:
                raise InvalidArgument(str(e)) from e
        timeout = None if deadline is None else max(0.0, deadline - time.time())
        if not self.gen_slots.acquire(timeout=timeout if timeout is not None else 600):
            raise ResourceExhausted(
                f"all {L.max_concurrent_generations} generation slots are busy (max_concurrent_generations)")
        try:
            def on_step(i: int, n: int) -> None:
                if deadline is not None and time.time() > deadline:
                    log.info("generate stopped: deadline passed after %d of %d sampling steps", i, n)
                    raise DeadlineExceeded(f"deadline passed after {i} of {n} sampling steps")
                if self.shutting_down.is_set():
                    raise Unavailable("the daemon is shutting down")

            t0 = time.perf_counter()
            img = self.bundle.generate(request.prompt, seed=seed, steps=steps, guidance=g, size=size, lora=lora,
                                       on_step=on_step)
            dt = time.perf_counter() - t0
        finally:
            self.gen_slots.release()
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        return buf.getvalue(), {"seed": seed, "steps": steps, "guidance": g, "size": size, "time_s": dt}

    def shutdown(self, wait: float = 60.0) -> None:
        """Stop the worker: the running job checkpoints at its current step and stays resumable."""
        self.shutting_down.set()
        self.worker.join(timeout=wait)


# ---------------------------------------------------------------------------------------------
# gRPC errors
# ---------------------------------------------------------------------------------------------
class RpcFailure(Exception):
    code_name = "INTERNAL"


class InvalidArgument(RpcFailure):
    code_name = "INVALID_ARGUMENT"


class ResourceExhausted(RpcFailure):
    code_name = "RESOURCE_EXHAUSTED"


class NotFoundError(RpcFailure):
    code_name = "NOT_FOUND"


class DeadlineExceeded(RpcFailure):
    code_name = "DEADLINE_EXCEEDED"


class Unavailable(RpcFailure):
    code_name = "UNAVAILABLE"


def _abort(context, e: RpcFailure):
    import grpc

    context.abort(getattr(grpc.StatusCode, e.code_name), str(e))


# ---------------------------------------------------------------------------------------------
# The servicer
# ---------------------------------------------------------------------------------------------
def _servicer_class():
    from .api import edgeblock_pb2 as pb
    from .api import edgeblock_pb2_grpc as pb_grpc
    from .store import NotFound, StoreError, check_id

    def adapter_msg(a: dict) -> Any:
        return pb.Adapter(id=a["id"], name=a.get("name", ""), token=a.get("token", ""), class_noun=a.get("class_noun", ""),
                          steps=int(a.get("steps", 0)), final_loss=float(a.get("final_loss", 0.0)),
                          created=float(a.get("created", 0.0)), sha256=a.get("sha256", ""),
                          lora_rank=int(a.get("lora_rank", 0)), job_id=a.get("job_id", ""),
                          size_bytes=int(a.get("size_bytes", 0)))

    def job_msg(d: dict) -> Any:
        return pb.Job(id=d["id"], state=pb.Job.State.Value(d["state"]), step=int(d.get("step", 0)),
                      total_steps=int(d["options"]["steps"]), loss=float(d.get("loss", 0.0)),
                      adapter_id=d["adapter_id"] if d["state"] == "DONE" else "", message=d.get("message", ""),
                      checkpoint_step=int(d.get("checkpoint_step", 0)), created=float(d.get("created", 0.0)),
                      updated=float(d.get("updated", 0.0)))

    class Servicer(pb_grpc.EdgeBlockServicer):
        def __init__(self, daemon: Daemon):
            self.d = daemon

        def _deadline(self, context) -> float | None:
            r = context.time_remaining()
            return None if r is None or r > 1e8 else time.time() + r

        def _adapter_id(self, context, value: str) -> str:
            try:
                return check_id(value, "adapter_id")
            except StoreError as e:
                _abort(context, InvalidArgument(str(e)))

        def _job(self, context, value: str) -> JobRecord:
            try:
                check_id(value, "job_id")
            except StoreError as e:
                _abort(context, InvalidArgument(str(e)))
            rec = self.d.jobs.get(value)
            if rec is None:
                _abort(context, NotFoundError(f"unknown job {value}"))
            return rec

        def Personalize(self, request, context):
            try:
                rec = self.d.submit(request)
            except RpcFailure as e:
                _abort(context, e)
            done = threading.Event()

            def gone() -> None:  # the RPC ended: if the client went away mid-job, cancel the job
                if not done.is_set() and not rec.finished():
                    log.info("client of job %s went away: cancelling", rec.id)
                    rec.cancel.set()
                with rec.cond:
                    rec.cond.notify_all()

            context.add_callback(gone)
            i = 0
            while True:
                with rec.cond:
                    while i >= len(rec.events) and context.is_active():
                        rec.cond.wait(timeout=0.5)
                    evs = rec.events[i:]
                i += len(evs)
                for ev in evs:
                    yield ev
                    if ev.kind in (pb.JobEvent.DONE, pb.JobEvent.FAILED, pb.JobEvent.CANCELLED):
                        done.set()
                        return
                if not context.is_active():
                    return

        def Generate(self, request, context):
            try:
                png, meta = self.d.generate(request, self._deadline(context))
            except RpcFailure as e:
                _abort(context, e)
            return pb.GenerateResponse(png=png, adapter_id=request.adapter_id, **meta)

        def ListAdapters(self, request, context):
            return pb.ListAdaptersResponse(adapters=[adapter_msg(a) for a in self.d.store.list_adapters()])

        def GetAdapter(self, request, context):
            aid = self._adapter_id(context, request.adapter_id)
            try:
                return adapter_msg(self.d.store.get_adapter(aid))
            except NotFound as e:
                _abort(context, NotFoundError(str(e)))

        def DeleteAdapter(self, request, context):
            aid = self._adapter_id(context, request.adapter_id)
            try:
                self.d.store.delete_adapter(aid)
            except NotFound as e:
                _abort(context, NotFoundError(str(e)))
            with self.d.lock:
                self.d.adapter_cache.pop(aid, None)
            return pb.DeleteAdapterResponse(deleted=True)

        def ExportAdapter(self, request, context):
            import safetensors.numpy

            aid = self._adapter_id(context, request.adapter_id)
            try:
                weights, info = self.d.store.load_adapter(aid)
            except NotFound as e:
                _abort(context, NotFoundError(str(e)))
            except StoreError as e:
                _abort(context, RpcFailure(str(e)))
            data = safetensors.numpy.save({f"transformer.{k}": v for k, v in weights.items()},
                                          metadata={"format": "pt", "edgeblock_adapter_id": aid,
                                                    "lora_rank": str(info.get("lora_rank", "")),
                                                    "lora_alpha": str(self.d.bundle.manifest.lora.get("alpha", ""))})
            name = "".join(c if c.isalnum() or c in "-_" else "_" for c in info.get("name", "adapter"))[:60]
            return pb.ExportAdapterResponse(safetensors=data, filename=f"{name or 'adapter'}-{aid[:8]}.safetensors",
                                            adapter=adapter_msg(info))

        def GetJob(self, request, context):
            return job_msg(self._job(context, request.job_id).data)

        def CancelJob(self, request, context):
            rec = self._job(context, request.job_id)
            if not rec.finished():
                rec.cancel.set()
                deadline = time.time() + 30
                while not rec.finished() and rec is self.d.current and time.time() < deadline:
                    time.sleep(0.02)  # within one step
            return job_msg(rec.data)

        def GetInfo(self, request, context):
            from . import __version__

            d, b = self.d, self.d.bundle
            L, D = d.limits, d.defaults
            return pb.Info(
                family=b.manifest.family, parameters=int(b.model.get("parameters", 0)),
                trainable_blocks=list(b.manifest.trainable), num_blocks=int(b.model.get("num_blocks", 0)),
                train_res=int(b.manifest.train_res), gen_res=int(b.manifest.gen_res), sizes=b.sizes(),
                lora_rank=int(b.manifest.lora.get("rank", 0)), trainer=d.trainer, executor=b.executor,
                limits=pb.Limits(max_images=L.max_images, max_image_bytes=L.max_image_bytes,
                                 max_image_pixels=L.max_image_pixels, max_steps=L.max_steps,
                                 max_prompt_chars=L.max_prompt_chars, max_generate_steps=L.max_generate_steps,
                                 max_queue=L.max_queue, max_concurrent_generations=L.max_concurrent_generations),
                defaults=pb.Defaults(steps=D.steps, learning_rate=D.learning_rate, checkpoint_every=D.checkpoint_every,
                                     generate_steps=D.generate_steps, guidance=D.guidance, seed=D.seed),
                version=__version__,
            )

    return Servicer


class _Undecodable:
    """A request whose bytes are not a valid message of its type (its deserializer failed)."""

    def __init__(self, error: Exception):
        self.error = error


def _decode_interceptor(service: str):
    """A request that does not parse is INVALID_ARGUMENT, not grpc's INTERNAL "Exception deserializing request!"."""
    import grpc

    def lenient(deserialize):
        def parse(data: bytes):
            try:
                return deserialize(data)
            except Exception as e:  # noqa: BLE001 - DecodeError, invalid UTF-8 in a string field, ...
                return _Undecodable(e)

        return parse

    def refuse(request, context):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                      f"the request is not a valid protobuf message of its type ({type(request.error).__name__})")

    class Decode(grpc.ServerInterceptor):
        def intercept_service(self, continuation, details):
            handler = continuation(details)
            if handler is None or not details.method.startswith(f"/{service}/") or handler.request_streaming:
                return handler
            kw = {"request_deserializer": lenient(handler.request_deserializer),
                  "response_serializer": handler.response_serializer}
            if handler.response_streaming:
                inner_stream = handler.unary_stream

                def behavior_stream(request, context):
                    if isinstance(request, _Undecodable):
                        refuse(request, context)
                    yield from inner_stream(request, context)

                return grpc.unary_stream_rpc_method_handler(behavior_stream, **kw)
            inner = handler.unary_unary

            def behavior(request, context):
                if isinstance(request, _Undecodable):
                    refuse(request, context)
                return inner(request, context)

            return grpc.unary_unary_rpc_method_handler(behavior, **kw)

    return Decode()


def _auth_interceptor(token: str, service: str):
    import grpc

    expected = f"Bearer {token}".encode()

    def deny(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token (metadata 'authorization: Bearer <token>')")

    class Auth(grpc.ServerInterceptor):
        def intercept_service(self, continuation, details):
            if not details.method.startswith(f"/{service}/"):
                return continuation(details)  # health and reflection stay open
            got = b""
            for k, v in details.invocation_metadata or ():
                if k == "authorization":
                    got = v.encode() if isinstance(v, str) else bytes(v)
            if hmac.compare_digest(got, expected):
                return continuation(details)
            handler = continuation(details)
            if handler is None:
                return None
            if handler.response_streaming:
                def deny_stream(request, context):
                    deny(request, context)
                    yield from ()

                return grpc.unary_stream_rpc_method_handler(deny_stream, request_deserializer=handler.request_deserializer,
                                                            response_serializer=handler.response_serializer)
            return grpc.unary_unary_rpc_method_handler(deny, request_deserializer=handler.request_deserializer,
                                                       response_serializer=handler.response_serializer)

    return Auth()


class Server:
    """A running daemon: gRPC server + Daemon. `port` is the bound port (listen ':0' picks one)."""

    def __init__(self, cfg: ServerConfig):
        import grpc
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        from grpc_reflection.v1alpha import reflection

        from .api import SERVICE_NAME
        from .api import edgeblock_pb2_grpc as pb_grpc

        check_security(cfg)
        self.cfg = cfg
        interceptors = [_auth_interceptor(cfg.token, SERVICE_NAME)] if cfg.token else []
        interceptors.append(_decode_interceptor(SERVICE_NAME))
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="edgeblock-rpc"),
                                  interceptors=interceptors,
                                  options=[("grpc.max_receive_message_length", _max_message(cfg)),
                                           ("grpc.max_send_message_length", _max_message(cfg)),
                                           ("grpc.so_reuseport", 0)])  # a second daemon on the port fails
        if cfg.tls_cert:
            with open(cfg.tls_key, "rb") as f:
                key = f.read()
            with open(cfg.tls_cert, "rb") as f:
                cert = f.read()
            ca = None
            if cfg.tls_client_ca:
                with open(cfg.tls_client_ca, "rb") as f:
                    ca = f.read()
            creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)
        try:
            if cfg.tls_cert:
                self.port = self.server.add_secure_port(cfg.listen, creds)
            else:
                self.port = self.server.add_insecure_port(cfg.listen)
        except RuntimeError as e:  # grpcio raises when the address cannot be bound
            self.port = 0
            why = str(e)
        else:
            why = ""
        if not self.port:
            raise ConfigError(f"cannot listen on {cfg.listen} ({why or 'bind failed'}): is another process "
                              "using that port?")
        # the service state only once the port is ours: a failed start resumes no job
        self.daemon = Daemon(cfg)
        pb_grpc.add_EdgeBlockServicer_to_server(_servicer_class()(self.daemon), self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.server)
        self._health_pb2 = health_pb2
        self._service = SERVICE_NAME

    def start(self) -> Server:
        self.server.start()
        for name in ("", self._service):
            self.health.set(name, self._health_pb2.HealthCheckResponse.SERVING)
        log.info("edgeblock daemon on %s (port %d), bundle %s, trainer %s on %s, executor %s", self.cfg.listen,
                 self.port, self.cfg.bundle, self.daemon.trainer, self.daemon.train_device, self.daemon.bundle.executor)
        return self

    def stop(self, grace: float = 5.0) -> None:
        """Graceful: health NOT_SERVING, no new RPCs, the running job checkpoints, then the server stops."""
        self.health.enter_graceful_shutdown()
        self.daemon.shutting_down.set()
        ev = self.server.stop(grace)
        self.daemon.shutdown()
        ev.wait(grace + 1)


def _max_message(cfg: ServerConfig) -> int:
    """Large enough for a Personalize request at the image limits, so the daemon's own checks answer."""
    return max(256 * 2**20, cfg.limits.max_images * cfg.limits.max_image_bytes + 4 * 2**20)


def pick_train_device(trainer: str, want: str) -> str:
    """auto: cuda when the trainer's runtime can train there (ORT's CUDA provider, torch.cuda), else cpu."""
    if want != "auto":
        return want
    if trainer == "ort":
        try:
            from .ort_trainer import _capi

            return "cuda" if "CUDAExecutionProvider" in _capi().get_available_providers() else "cpu"
        except Exception:  # noqa: BLE001 - no training API: the job reports it
            return "cpu"
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def pick_trainer(want: str) -> str:
    """ort when ONNX Runtime's training API is importable (auto, ort), else torch (auto, torch)."""
    if want in ("auto", "ort"):
        try:
            from .ort_trainer import _capi

            _capi()
            return "ort"
        except Exception as e:  # noqa: BLE001
            if want == "ort":
                raise ConfigError(str(e)) from e
            log.warning("ONNX Runtime training is not available (%s): the torch trainer backend trains", e)
    return "torch"


def serve_forever(cfg: ServerConfig | None = None, **kwargs) -> int:
    """Run until SIGTERM/SIGINT; exit status 0 after a graceful stop."""
    cfg = cfg or ServerConfig(**kwargs)
    # the daemon's log is its operational record: INFO by default, whoever configured logging before
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    names = ("transformers", "diffusers", "peft") if cfg.trainer == "torch" else ("torch", "transformers", "diffusers", "peft")
    already = block_host_frameworks(names, strict=False)
    if already:
        log.warning("host frameworks already imported in this process: %s (the device runtime does not use them)", already)
    if cfg.trainer == "auto":
        from dataclasses import replace

        cfg = replace(cfg, trainer=pick_trainer("auto"))  # with torch blocked: the ORT check must not load it
        if cfg.trainer == "torch" and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]  # the torch backend trains: let it import torch
    srv = Server(cfg).start()
    print(f"edgeblock daemon listening on {cfg.listen} (port {srv.port})", flush=True)
    stop = threading.Event()

    def handle(signum, _frame):
        log.info("signal %d: stopping (the running job checkpoints and resumes on the next start)", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    while not stop.is_set():
        stop.wait(0.5)
    srv.stop()
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m edge_runtime.server --bundle B --listen ADDR --state DIR [...]` (the device entrypoint)."""
    import argparse

    p = argparse.ArgumentParser(prog="edgeblock-daemon")
    p.add_argument("--bundle", required=True)
    p.add_argument("--listen", default="127.0.0.1:50051")
    p.add_argument("--state", required=True)
    p.add_argument("--token-file", default=None)
    p.add_argument("--allow-insecure-remote", action="store_true")
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--tls-client-ca")
    p.add_argument("--trainer", default="auto", choices=["auto", "ort", "torch"])
    p.add_argument("--train-device", default="auto", help="auto, cpu or cuda[:N] (auto: cuda when the trainer has it)")
    p.add_argument("--max-concurrent-generations", type=int, default=None)
    p.add_argument("--max-queue", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    token = os.environ.get("EDGEBLOCK_TOKEN")
    if a.token_file:
        with open(a.token_file) as f:
            token = f.read().strip()
    try:
        cfg = ServerConfig(bundle=a.bundle, listen=a.listen, state_dir=a.state, token=token or None,
                           allow_insecure_remote=a.allow_insecure_remote, tls_cert=a.tls_cert, tls_key=a.tls_key,
                           tls_client_ca=a.tls_client_ca, trainer=a.trainer, train_device=a.train_device,
                           max_concurrent_generations=a.max_concurrent_generations, max_queue=a.max_queue,
                           threads=a.threads)
        return serve_forever(cfg)
    except (ConfigError, ValueError, OSError) as e:
        print(f"edgeblock-daemon: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
