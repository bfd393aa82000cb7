"""The gRPC servicer of edgeblock.v1.EdgeBlock over a Daemon, and the one place where what goes
wrong in a request (RpcFailure, PersonalizeError, StoreError, NotFound, a request that does not
parse) becomes a gRPC status code and message."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Any, Iterator

import grpc

from ..api import edgeblock_pb2 as pb
from ..api import edgeblock_pb2_grpc as pb_grpc
from ..manifest import CorruptBundle
from ..personalize import PersonalizeError
from ..store import CorruptData, NotFound, StoreError, check_id
from .errors import Cancelled, DataLoss, InvalidArgument, NotFoundError, RpcFailure, Unavailable
from .jobs import PRIOR_SHARE, JobRecord
from .settings import settings_msg
from .state import Daemon

log = logging.getLogger("edgeblock.daemon")


def _abort(context, e: RpcFailure):
    """End the call with e's code and message, and its details (google.rpc.Status): a BadRequest field violation
    when e names the field at fault, RetryInfo when a retry may succeed."""
    code = getattr(grpc.StatusCode, e.code_name)
    if not e.field and e.retry_after_s is None:
        context.abort(code, str(e))
    from google.protobuf.duration_pb2 import Duration
    from google.rpc import error_details_pb2, status_pb2
    from grpc_status import rpc_status

    status = status_pb2.Status(code=code.value[0], message=str(e))
    if e.field:
        status.details.add().Pack(error_details_pb2.BadRequest(
            field_violations=[error_details_pb2.BadRequest.FieldViolation(field=e.field, description=str(e))]))
    if e.retry_after_s is not None:
        delay = Duration()
        delay.FromNanoseconds(int(e.retry_after_s * 1e9))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    context.abort_with_status(rpc_status.to_status(status))


@contextmanager
def answering(context, store_error: type[RpcFailure] | None = InvalidArgument) -> Iterator[None]:
    """Errors of the block as the RPC's status: an RpcFailure its own code, PersonalizeError
    INVALID_ARGUMENT, NotFound NOT_FOUND, CorruptData (stored data that fails its checksum) and CorruptBundle (a
    bundle file damaged since the start) DATA_LOSS, another StoreError store_error's code (None: not answered)."""
    try:
        yield
    except RpcFailure as e:
        _abort(context, e)
    except PersonalizeError as e:
        _abort(context, InvalidArgument(str(e)))
    except NotFound as e:
        _abort(context, NotFoundError(str(e)))
    except (CorruptData, CorruptBundle) as e:
        _abort(context, DataLoss(str(e)))
    except StoreError as e:
        if store_error is None:
            raise
        _abort(context, store_error(str(e)))


def _timestamp(t: float) -> Any:
    from google.protobuf.timestamp_pb2 import Timestamp

    ts = Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


def _duration(seconds: float) -> Any:
    from google.protobuf.duration_pb2 import Duration

    d = Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def generate_response(images: list[tuple[bytes, int]], meta: dict) -> Any:
    """A GenerateResponse: every image, the first also in png/seed (clients of one image read those)."""
    adapters = [pb.AdapterWeight(adapter_id=aid, scale=s) for aid, s in meta["adapters"]]
    r = pb.GenerateResponse(png=images[0][0], seed=images[0][1], steps=meta["steps"], guidance=meta["guidance"],
                            size=meta["width"], width=meta["width"], height=meta["height"], time_s=meta["time_s"],
                            mode=meta["mode"],
                            adapter_id=adapters[0].adapter_id if adapters else "", adapters=adapters,
                            images=[pb.GeneratedImage(png=png, seed=seed) for png, seed in images])
    r.time.FromNanoseconds(int(meta["time_s"] * 1e9))
    return r


def adapter_msg(a: dict) -> Any:
    created = float(a.get("created", 0.0))
    return pb.Adapter(id=a["id"], name=a.get("name", ""), token=a.get("token", ""), class_noun=a.get("class_noun", ""),
                      steps=int(a.get("steps", 0)), final_loss=float(a.get("final_loss", 0.0)),
                      created=created, create_time=_timestamp(created), sha256=a.get("sha256", ""),
                      lora_rank=int(a.get("lora_rank", 0)), job_id=a.get("job_id", ""),
                      size_bytes=int(a.get("size_bytes", 0)))


def job_msg(d: dict) -> Any:
    created, updated = float(d.get("created", 0.0)), float(d.get("updated", 0.0))
    return pb.Job(id=d["id"], state=pb.Job.State.Value(f"STATE_{d['state']}"), step=int(d.get("step", 0)),
                  total_steps=int(d["options"]["steps"]), loss=float(d.get("loss", 0.0)),
                  adapter_id=d["adapter_id"] if d["state"] == "DONE" else "", message=d.get("message", ""),
                  checkpoint_step=int(d.get("checkpoint_step", 0)), created=created, updated=updated,
                  create_time=_timestamp(created), update_time=_timestamp(updated),
                  request_id=d.get("request_id", ""), name=d.get("name", ""))


class Servicer(pb_grpc.EdgeBlockServicer):
    def __init__(self, daemon: Daemon):
        self.d = daemon

    def _deadline(self, context) -> float | None:
        r = context.time_remaining()
        return None if r is None or r > 1e8 else time.time() + r

    def _adapter_id(self, context, value: str) -> str:
        with answering(context):
            return check_id(value, "adapter_id")

    def _job(self, context, value: str) -> JobRecord:
        with answering(context):
            check_id(value, "job_id")
        rec = self.d.jobs.get(value)
        if rec is None:
            _abort(context, NotFoundError(f"unknown job {value}"))
        return rec

    def _follow(self, rec: JobRecord, context) -> Iterator[Any]:
        """The job's events from the first, then live ones until its final event or until the client goes
        away (the job goes on: only CancelJob stops it)."""
        final = (pb.JobEvent.KIND_DONE, pb.JobEvent.KIND_FAILED, pb.JobEvent.KIND_CANCELLED)

        def wake() -> None:
            with rec.cond:
                rec.cond.notify_all()

        context.add_callback(wake)
        i = 0
        while True:
            with rec.cond:
                while i >= len(rec.events) and context.is_active() and not self.d.shutting_down.is_set():
                    rec.cond.wait(timeout=0.5)
                evs = rec.events[i:]
            i += len(evs)
            for ev in evs:
                yield ev
                if ev.kind in final:
                    return
            if not context.is_active():
                return
            if self.d.shutting_down.is_set() and not evs:
                _abort(context, Unavailable("the daemon is shutting down; the job resumes at its next start: "
                                            f"WatchJob {rec.id} then"))

    def Personalize(self, request, context):
        with answering(context):
            rec = self.d.submit(request)
        yield from self._follow(rec, context)

    def WatchJob(self, request, context):
        yield from self._follow(self._job(context, request.job_id), context)

    def ListJobs(self, request, context):
        with answering(context):
            recs, token = self.d.pager.page("jobs", self.d.jobs.all(), lambda r: [r.data.get("created", 0.0), r.id],
                                            request.page_size, request.page_token, newest_first=True)
        return pb.ListJobsResponse(jobs=[job_msg(r.data) for r in recs], next_page_token=token)

    def Generate(self, request, context):
        with answering(context):
            images, meta = self.d.generate(request, self._deadline(context))
        return generate_response(images, meta)

    def GenerateStream(self, request, context):
        """Generate on a worker thread; this one streams its progress, then the result (or ends with its
        error). A client that goes away stops the generation at its next sampling step."""
        import queue as queue_mod
        import threading

        events: queue_mod.Queue = queue_mod.Queue()
        t0 = time.monotonic()

        def progress(image: int, step: int, total: int) -> None:
            if not context.is_active():
                raise Cancelled("the client went away")
            p = pb.GenerateProgress(image=image, step=step, total_steps=total)
            p.elapsed.FromNanoseconds(int((time.monotonic() - t0) * 1e9))
            events.put(("progress", p))

        def work() -> None:
            try:
                events.put(("result", self.d.generate(request, self._deadline(context), progress)))
            except BaseException as e:  # noqa: BLE001 - answered below, in the RPC's thread
                events.put(("error", e))

        threading.Thread(target=work, name="edgeblock-generate-stream", daemon=True).start()
        while True:
            kind, value = events.get()
            if kind == "progress":
                yield pb.GenerateEvent(progress=value)
            elif kind == "result":
                yield pb.GenerateEvent(result=generate_response(*value))
                return
            else:
                with answering(context):
                    raise value

    def ListAdapters(self, request, context):
        with answering(context):
            items, token = self.d.pager.page("adapters", self.d.store.list_adapters(),
                                             lambda a: [a.get("created", 0.0), a["id"]], request.page_size,
                                             request.page_token)
        return pb.ListAdaptersResponse(adapters=[adapter_msg(a) for a in items], next_page_token=token)

    def GetAdapter(self, request, context):
        aid = self._adapter_id(context, request.adapter_id)
        with answering(context, store_error=None):
            return adapter_msg(self.d.store.get_adapter(aid))

    def DeleteAdapter(self, request, context):
        aid = self._adapter_id(context, request.adapter_id)
        with answering(context, store_error=None):
            self.d.store.delete_adapter(aid)
        self.d.generator.forget(aid)
        return pb.DeleteAdapterResponse(deleted=True)

    def ExportAdapter(self, request, context):
        """The adapter file as stored (edge_runtime.adapter_file: diffusers/PEFT LoRA with edgeblock's record); an
        adapter stored by an earlier daemon is rewritten into that format on the way out."""
        from .. import adapter_file

        aid = self._adapter_id(context, request.adapter_id)
        try:
            data, info = self.d.store.adapter_bytes(aid)
            f = adapter_file.decode(data, default_alpha=info.get("lora_alpha", self.d.bundle.manifest.lora_alpha))
        except NotFound as e:
            _abort(context, NotFoundError(str(e)))
        except CorruptData as e:
            _abort(context, DataLoss(str(e)))
        except (StoreError, adapter_file.AdapterFileError) as e:
            _abort(context, RpcFailure(str(e)))
        if f.info.get("format") != adapter_file.FORMAT:
            data = adapter_file.encode(f.weights, f.alpha, {**{k: info[k] for k in ("name", "token", "class_noun") if k in info},
                                                             "adapter_id": aid})
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
            while not rec.finished() and rec is self.d.jobs.current and time.time() < deadline:
                time.sleep(0.02)  # within one step
        return job_msg(rec.data)

    def GetInfo(self, request, context):
        from .. import __version__
        from ..personalize import choose_precompute

        d, b = self.d, self.d.bundle
        L, D = d.limits, d.defaults
        return pb.Info(
            family=b.manifest.family, parameters=int(b.model.get("parameters", 0)),
            trainable_blocks=list(b.manifest.trainable), num_blocks=int(b.model.get("num_blocks", 0)),
            train_res=int(b.manifest.train_res), gen_res=int(b.manifest.gen_res), sizes=b.sizes(),
            lora_rank=b.manifest.lora_rank, trainer=d.trainer, executor=b.executor,
            limits=pb.Limits(max_images=L.max_images, max_image_bytes=L.max_image_bytes,
                             max_image_pixels=L.max_image_pixels, max_steps=L.max_steps,
                             max_prompt_chars=L.max_prompt_chars, max_generate_steps=L.max_generate_steps,
                             max_queue=L.max_queue, max_concurrent_generations=L.max_concurrent_generations,
                             max_finished_jobs=L.max_finished_jobs, max_page_size=L.max_page_size,
                             finished_job_retention=_duration(L.finished_job_retention_s),
                             max_num_images=L.max_num_images,
                             max_adapters_per_generation=L.max_adapters_per_generation,
                             max_validation_prompts=L.max_validation_prompts,
                             max_validation_images=L.max_validation_images),
            defaults=pb.Defaults(steps=D.steps, learning_rate=D.learning_rate, checkpoint_every=D.checkpoint_every,
                                 generate_steps=D.generate_steps, guidance=D.guidance, seed=D.seed,
                                 lr_schedule=D.lr_schedule, warmup_steps=D.warmup_steps, prior_share=PRIOR_SHARE,
                                 precompute=choose_precompute(b), num_images=1, adapter_scale=1.0,
                                 size=int(b.manifest.gen_res)),
            version=__version__, memory=self._memory(), settings=settings_msg(d.cfg),
            guidance_embedded=b.guidance_embedded, multi_adapter=b.lora_rank_dynamic,
            gen_sizes=[pb.ImageSize(width=w, height=h) for w, h in b.gen_sizes()],
        )

    def _memory(self):
        from ..personalize import choose_precompute

        b = self.d.bundle
        s = self.d.admission.summary(choose_precompute(b), int(b.manifest.gen_res))
        return pb.Memory(admission=s.pop("enabled"), **s)


class _Undecodable:
    """A request whose bytes are not a valid message of its type (its deserializer failed)."""

    def __init__(self, error: Exception):
        self.error = error


def decode_interceptor(service: str):
    """A request that does not parse is INVALID_ARGUMENT, not grpc's INTERNAL "Exception deserializing request!"."""

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
