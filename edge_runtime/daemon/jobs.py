"""The daemon's training jobs: one runs at a time from a bounded queue, checkpoints into the state
directory, and after a restart (crash or SIGTERM) every unfinished job resumes from its last
checkpoint. An adapter's id is fixed when its job is accepted, so no job is trained twice. A job
outlives the calls that follow it: its events are logged beside it for any watcher, a request id
makes a retried request find its job, and finished jobs are kept for a bounded time and count."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import queue
import re
import threading
import time
from dataclasses import asdict
from typing import Any

from ..faults import crash_point
from ..lr_schedule import LR_SCHEDULES
from .admission import Admission
from .generation import png_bytes
from .config import Defaults, Limits
from .errors import AlreadyExists, InvalidArgument, ResourceExhausted, Unavailable

log = logging.getLogger("edgeblock.daemon")

JOB_STATES = ("QUEUED", "RUNNING", "DONE", "FAILED", "CANCELLED")
TERMINAL = ("DONE", "FAILED", "CANCELLED")
PRIOR_SHARE = 0.5  # a job's share of class-image draws when the request leaves it 0 (DreamBooth's half a batch)
QUEUE_RETRY_S = 30.0  # RetryInfo of a full queue: a place frees when a job ends
REQUEST_ID_RE = re.compile(r"\A[A-Za-z0-9._:-]{1,64}\Z")


def request_digest(request) -> str:
    """What a retried request must repeat: the request's fields, its request_id aside."""
    from ..api import edgeblock_pb2 as pb

    r = pb.PersonalizeRequest()
    r.CopyFrom(request)
    r.request_id = ""
    return hashlib.sha256(r.SerializeToString(deterministic=True)).hexdigest()


class JobRecord:
    """A job: its job.json (data), its events so far (loaded from its log on first use after a restart),
    and the condition watchers wait on for the next one."""

    def __init__(self, data: dict, logged: list[bytes] | None = None):
        self.data = data
        self._logged = logged  # serialized events of an earlier run, parsed when first watched
        self._events: list[Any] | None = None if logged is not None else []
        self.cond = threading.Condition()
        self.cancel = threading.Event()

    @property
    def events(self) -> list[Any]:
        with self.cond:
            if self._events is None:
                from ..api import edgeblock_pb2 as pb

                self._events = [pb.JobEvent.FromString(b) for b in self._logged or ()]
                self._logged = None
            return self._events

    @property
    def id(self) -> str:
        return self.data["id"]

    @property
    def state(self) -> str:
        return self.data["state"]

    def finished(self) -> bool:
        return self.state in TERMINAL


class JobQueue:
    """The jobs the daemon knows (by id), the queue of those waiting, and the worker that trains them.
    Unfinished jobs of the state directory are queued again before the worker starts."""

    def __init__(self, bundle, store, *, trainer: str, train_device: str, limits: Limits, defaults: Defaults,
                 batch: int, shutting_down: threading.Event, admission: Admission | None = None):
        from ..personalize import ImageLimits

        self.bundle, self.store = bundle, store
        self.trainer, self.train_device = trainer, train_device
        self.limits, self.defaults, self.batch = limits, defaults, batch
        self.shutting_down = shutting_down
        self.admission = admission or Admission(None, None, evict=lambda: None)
        self.image_limits = ImageLimits(max_images=limits.max_images, max_image_bytes=limits.max_image_bytes,
                                        max_image_pixels=limits.max_image_pixels)
        self.jobs: dict[str, JobRecord] = {}
        self.by_request: dict[str, str] = {}  # request_id -> job id, for the jobs kept
        self.queue: queue.Queue[JobRecord] = queue.Queue()
        self.queued = 0
        self.lock = threading.RLock()  # _finish (which prunes) runs under it for a job cancelled while queued
        self.current: JobRecord | None = None
        self._recover()
        self.worker = threading.Thread(target=self._work, name="edgeblock-trainer", daemon=True)
        self.worker.start()

    def get(self, job_id: str) -> JobRecord | None:
        self.prune()
        return self.jobs.get(job_id)

    def all(self) -> list[JobRecord]:
        self.prune()
        with self.lock:
            return list(self.jobs.values())

    # ------------------------------------------------------------------ retention
    def prune(self, now: float | None = None) -> None:
        """Forget finished jobs past Limits.finished_job_retention_s (from their last update) and the oldest
        beyond Limits.max_finished_jobs; their adapters stay."""
        now = time.time() if now is None else now
        L = self.limits
        with self.lock:
            done = sorted((r for r in self.jobs.values() if r.finished()),
                          key=lambda r: (r.data.get("updated", r.data.get("created", 0)), r.id))
            expired = [r for r in done if now - r.data.get("updated", r.data.get("created", now)) > L.finished_job_retention_s]
            keep = [r for r in done if r not in expired]
            expired += keep[:max(0, len(keep) - L.max_finished_jobs)]
            for r in expired:
                self.jobs.pop(r.id, None)
                if self.by_request.get(r.data.get("request_id", "")) == r.id:
                    del self.by_request[r.data["request_id"]]
        for r in expired:
            try:
                self.store.delete_job(r.id)
            except Exception as e:  # noqa: BLE001 - forgetting a job must not fail a call
                log.warning("could not remove finished job %s: %s", r.id, e)

    # ------------------------------------------------------------------ recovery
    def _recover(self) -> None:
        """Unfinished jobs of a previous run (crash or SIGTERM) resume from their last checkpoint."""
        for data in self.store.list_jobs():
            rec = JobRecord(data, logged=self.store.job_events(data["id"]))
            self.jobs[rec.id] = rec
            if data.get("request_id"):
                self.by_request[data["request_id"]] = rec.id
            if rec.state in TERMINAL:
                self._log_final_event(rec)
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

    def _log_final_event(self, rec: JobRecord) -> None:
        """A job whose job.json says it ended but whose log lacks its final event (a crash between the two
        writes) gets that event now, so that watchers see the job end."""
        from ..api import edgeblock_pb2 as pb

        final = {pb.JobEvent.KIND_DONE, pb.JobEvent.KIND_FAILED, pb.JobEvent.KIND_CANCELLED}
        events = rec.events
        if events and events[-1].kind in final:
            return
        d = rec.data
        self._emit(rec, d["state"], message=d.get("message", ""),
                   adapter_id=d["adapter_id"] if d["state"] == "DONE" else "", step=int(d.get("step", 0)),
                   total_steps=int(d["options"]["steps"]))

    # ------------------------------------------------------------------ events
    def _emit(self, rec: JobRecord, kind: str, **kw) -> None:
        from ..api import edgeblock_pb2 as pb

        elapsed = time.time() - rec.data.get("created", time.time())
        ev = pb.JobEvent(kind=pb.JobEvent.Kind.Value(f"KIND_{kind}"), job_id=rec.id, elapsed_s=elapsed, **kw)
        ev.elapsed.FromNanoseconds(int(elapsed * 1e9))
        try:
            self.store.append_job_event(rec.id, ev.SerializeToString())
        except OSError as e:  # the log is for watchers after a restart; the job goes on without it
            log.warning("job %s: could not log its event (%s)", rec.id, e)
        with rec.cond:
            rec.events.append(ev)
            rec.cond.notify_all()

    def _finish(self, rec: JobRecord, state: str, message: str = "") -> None:
        with self.lock:  # its place is free from its final event on (a client may submit the next job at once)
            if self.current is rec:
                self.current = None
        rec.data.update(state=state, message=message)
        self.store.save_job(rec.data)
        self._emit(rec, state, message=message, adapter_id=rec.data["adapter_id"] if state == "DONE" else "",
                   step=int(rec.data.get("step", 0)), total_steps=int(rec.data["options"]["steps"]))
        self.store.drop_job_work(rec.id)
        self.prune()

    # ------------------------------------------------------------------ submit
    def _same_request(self, request_id: str, digest: str) -> JobRecord | None:
        """The kept job a request id names (call with self.lock held): None if none, AlreadyExists if that job
        was started by a different request."""
        job_id = self.by_request.get(request_id)
        rec = self.jobs.get(job_id) if job_id else None
        if rec is None:
            return None
        if rec.data.get("request_digest") != digest:
            raise AlreadyExists(f"request_id {request_id!r} was used for a different request (job {rec.id}): "
                                "choose a new request_id for a new job")
        return rec

    def submit(self, request) -> JobRecord:
        """Check a PersonalizeRequest and queue its job, or return the job its request_id already started.
        Raises InvalidArgument, ResourceExhausted, Unavailable, AlreadyExists, or PersonalizeError (a request
        the personalization code refuses)."""
        from ..personalize import JobOptions, PersonalizeError, choose_precompute, decode_images
        from ..store import new_id

        L, D = self.limits, self.defaults
        request_id, digest = request.request_id, ""
        if request_id:
            if not REQUEST_ID_RE.match(request_id):
                raise InvalidArgument(f"request_id must be 1..64 characters of letters, digits, '-', '_', '.' or "
                                      f"':', got {request_id[:80]!r}", field="request_id")
            digest = request_digest(request)
            self.prune()
            with self.lock:
                rec = self._same_request(request_id, digest)
            if rec is not None:
                return rec
        if self.shutting_down.is_set():
            raise Unavailable("the daemon is shutting down")
        token, noun = request.token.strip(), request.class_noun.strip()
        if not token or len(token) > L.max_token_chars or any(c.isspace() for c in token):
            raise InvalidArgument(f"token must be one word of 1..{L.max_token_chars} characters (max_token_chars)",
                                  field="token")
        if not noun or len(noun) > L.max_token_chars:
            raise InvalidArgument(f"class_noun must have 1..{L.max_token_chars} characters (max_token_chars)",
                                  field="class_noun")
        if len(request.name) > L.max_name_chars:
            raise InvalidArgument(f"name longer than max_name_chars={L.max_name_chars}", field="name")
        steps = int(request.steps) or D.steps
        if steps > L.max_steps:
            raise InvalidArgument(f"steps {steps} more than max_steps={L.max_steps}", field="steps")
        lr = float(request.learning_rate) or D.learning_rate
        if not math.isfinite(lr) or not 0 < lr <= 1.0:
            raise InvalidArgument(f"learning_rate must be in (0, 1], got {request.learning_rate}", field="learning_rate")
        every = int(request.checkpoint_every) or D.checkpoint_every
        if every > L.max_steps:
            raise InvalidArgument(f"checkpoint_every {every} more than max_steps={L.max_steps}", field="checkpoint_every")
        mode = choose_precompute(self.bundle, request.precompute)
        self.admission.check_job(mode)  # one that could never fit the memory budget is refused now
        if len(request.images) > L.max_images:  # before decoding anything
            raise InvalidArgument(f"{len(request.images)} images, more than max_images={L.max_images}", field="images")
        try:
            _imgs, pngs = decode_images([im.data for im in request.images], self.image_limits,
                                        int(self.bundle.manifest.gen_res))
        except PersonalizeError as e:  # a limit or an undecodable image: the field at fault is images
            raise InvalidArgument(str(e), field="images") from e
        except Exception as e:  # Pillow raises e.g. SyntaxError on a corrupt PNG chunk
            raise InvalidArgument(f"an image is not a decodable PNG/JPEG ({type(e).__name__})", field="images") from e
        if len(request.class_images) > L.max_images:
            raise InvalidArgument(f"{len(request.class_images)} class images, more than max_images={L.max_images}",
                                  field="class_images")
        class_pngs: list[bytes] = []
        if request.class_images:
            try:
                _imgs, class_pngs = decode_images([im.data for im in request.class_images], self.image_limits,
                                                  int(self.bundle.manifest.gen_res))
            except PersonalizeError as e:
                raise InvalidArgument(f"class images: {e}", field="class_images") from e
            except Exception as e:  # noqa: BLE001 - as above
                raise InvalidArgument(f"a class image is not a decodable PNG/JPEG ({type(e).__name__})",
                                      field="class_images") from e
        elif request.class_captions or request.prior_share:
            raise InvalidArgument("class_captions and prior_share need class_images", field="class_images")
        captions = [c.strip() for c in request.captions]
        class_captions = [c.strip() for c in request.class_captions]
        for what, texts in (("caption", captions), ("class caption", class_captions)):
            for i, c in enumerate(texts):
                if not c or len(c) > L.max_prompt_chars:
                    raise InvalidArgument(f"{what} {i} must have 1..{L.max_prompt_chars} characters (max_prompt_chars)",
                                          field=f"{what.replace(' ', '_')}s[{i}]")
        schedule = request.lr_schedule or D.lr_schedule
        warmup = int(request.warmup_steps) if request.HasField("warmup_steps") else D.warmup_steps
        if schedule not in LR_SCHEDULES:
            raise InvalidArgument(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {schedule!r}",
                                  field="lr_schedule")
        if warmup > steps:
            raise InvalidArgument(f"warmup_steps {warmup} more than the job's steps {steps}", field="warmup_steps")
        prompts = [p.strip() for p in request.validation_prompts]
        val_every = int(request.validation_every)
        if len(prompts) > L.max_validation_prompts:
            raise InvalidArgument(f"{len(prompts)} validation prompts, more than max_validation_prompts="
                                  f"{L.max_validation_prompts}", field="validation_prompts")
        for i, p in enumerate(prompts):
            if not p or len(p) > L.max_prompt_chars:
                raise InvalidArgument(f"validation prompt {i} must have 1..{L.max_prompt_chars} characters "
                                      "(max_prompt_chars)", field=f"validation_prompts[{i}]")
        if prompts and not 1 <= val_every <= steps:
            raise InvalidArgument(f"validation_every must be in [1, steps={steps}] with validation prompts, got "
                                  f"{val_every}", field="validation_every")
        if not prompts and val_every:
            raise InvalidArgument("validation_every needs validation_prompts", field="validation_every")
        if prompts and len(prompts) * (steps // val_every + (steps % val_every > 0)) > L.max_validation_images:
            raise InvalidArgument(f"{len(prompts)} prompts every {val_every} of {steps} steps make more than "
                                  f"max_validation_images={L.max_validation_images} images: validate less often",
                                  field="validation_every")
        share = float(request.prior_share) or PRIOR_SHARE
        if not 0.0 < share < 1.0:
            raise InvalidArgument(f"prior_share must be in (0, 1), got {request.prior_share}", field="prior_share")
        seed = int(request.seed) if request.HasField("seed") else D.seed
        opts = JobOptions(token, noun, steps, lr, seed, every, mode, captions=captions,
                          class_captions=class_captions, prior_share=share, batch=self.batch,
                          lr_schedule=schedule, warmup_steps=warmup, validation_prompts=prompts,
                          validation_every=val_every)
        opts.training_prompts(len(request.images))  # one caption per image, or none
        if class_pngs:
            opts.class_prompts(len(class_pngs))  # one class caption per class image, or none
        now = time.time()
        data = {"id": new_id(), "adapter_id": new_id(), "state": "QUEUED", "step": 0, "checkpoint_step": 0,
                "loss": 0.0, "message": "", "created": now, "name": request.name or f"{token} {noun}",
                "options": asdict(opts), "trainer": self.trainer, "request_id": request_id,
                "request_digest": digest}
        rec = JobRecord(data)
        with self.lock:  # a request id is taken at most once, even by two retries at the same time
            same = self._same_request(request_id, digest) if request_id else None
            if same is not None:
                return same
            if self.queued >= L.max_queue + (0 if self.current is not None else 1):
                raise ResourceExhausted(f"the job queue is full (max_queue={L.max_queue} waiting behind the running job)",
                                        retry_after_s=QUEUE_RETRY_S)
            self.queued += 1
            self.jobs[rec.id] = rec
            if request_id:
                self.by_request[request_id] = rec.id
        try:  # the images first: a job exists once its job.json does, and then it has what it trains on
            self.store.save_job_images(rec.id, pngs)
            if class_pngs:
                self.store.save_job_images(rec.id, class_pngs, kind="class_images")
            self.store.save_job(data)
        except BaseException:
            with self.lock:
                self.queued -= 1
                self.jobs.pop(rec.id, None)
                if self.by_request.get(request_id) == rec.id:
                    del self.by_request[request_id]
            try:
                self.store.delete_job(rec.id)
            except Exception:  # noqa: BLE001 - nothing was written, or it goes at the next start
                pass
            raise
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
        from ..personalize import Cancelled, JobOptions, Progress, images_from_pngs, run_job

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

        def validate(step: int, weights: dict) -> None:
            """The validation prompts with the adapter so far, streamed (one graph at a time beside the job)."""
            for prompt in opts.validation_prompts:
                if should_stop():
                    return
                img = self.bundle.generate(prompt, seed=opts.seed, steps=self.defaults.generate_steps,
                                           guidance=self.defaults.guidance, lora=weights, streamed=True)
                self._emit(rec, "VALIDATION", step=step, total_steps=opts.steps, prompt=prompt, png=png_bytes(img))

        try:
            images = images_from_pngs(self.store.job_images(rec.id))
            class_images = images_from_pngs(self.store.job_images(rec.id, kind="class_images"))
            with self.admission.job(opts.precompute, should_stop):  # waits until its predicted peak fits
                result = run_job(self.bundle, opts, images, work, trainer_backend=self.trainer,
                                 train_device=self.train_device, progress=Progress(event, should_stop),
                                 start_step=start, on_checkpoint=on_checkpoint,
                                 checkpoint_on_stop=lambda: self.shutting_down.is_set() and not rec.cancel.is_set(),
                                 class_images=class_images or None,
                                 validate=validate if opts.validation_prompts else None)
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
                "final_loss": result.final_loss, "lora_rank": self.bundle.manifest.lora_rank,
                "job_id": rec.id, "learning_rate": opts.learning_rate, "seed": opts.seed,
                "class_images": len(class_images), "prior_share": opts.prior_share if class_images else None,
                "train_seconds": result.seconds, "trainer": self.trainer, "bundle": self.bundle.model.get("fingerprint"),
                # the adapter file's own record (edge_runtime.adapter_file): the LoRA scale, the bundle it was trained
                # for, and the training settings
                "lora_alpha": self.bundle.manifest.lora_alpha,
                "bundle_sha256": self.bundle.manifest_sha256,
                "recipe": {**self.bundle.manifest.training_recipe().to_dict(), "learning_rate": opts.learning_rate,
                           "steps": opts.steps, "batch": opts.batch, "lr_schedule": opts.lr_schedule,
                           "warmup_steps": opts.warmup_steps}}
        try:
            self.store.save_adapter(result.weights, meta, adapter_id=data["adapter_id"])
        except Exception as e:  # noqa: BLE001 - e.g. no space: the job fails, the worker goes on
            log.exception("job %s: its adapter could not be stored", rec.id)
            self._finish(rec, "FAILED", f"{type(e).__name__}: {e}")
            return
        crash_point("job.adapter_saved")  # test hook (edge_runtime.faults): the adapter stored, the job not yet DONE
        data["loss"] = result.final_loss
        self._finish(rec, "DONE", f"trained {opts.steps} steps in {result.seconds:.1f} s")

    def shutdown(self, wait: float = 60.0) -> None:
        """Stop the worker: the running job checkpoints at its current step and stays resumable."""
        self.shutting_down.set()
        self.worker.join(timeout=wait)
