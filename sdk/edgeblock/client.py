"""A typed client of the edge daemon (`edgeblock serve`), over the generated stubs in edge_runtime.api.

    from edgeblock.client import ClientError, EdgeClient

    with EdgeClient("jetson.local:50051", token="...", tls_ca="ca.pem") as c:
        c.wait_ready(10)
        for ev in c.personalize(["dog1.jpg", "dog2.jpg"], token="sks", class_noun="dog"):
            ...                                    # JobEvent: QUEUED, ..., STEP, ..., DONE
        png = c.generate("a photo of sks dog on the beach", adapter_id=ev.adapter_id).png

Every failed call raises ClientError(code, details), code being the gRPC status name
("NOT_FOUND", "UNAUTHENTICATED", ...). Imports grpcio and the stubs, never torch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TypeVar

import grpc

from edge_runtime.api import edgeblock_pb2 as pb
from edge_runtime.api import edgeblock_pb2_grpc as pb_grpc
from edge_runtime.api import kind_name, state_name

__all__ = ["ClientError", "EdgeClient", "JobStream", "kind_name", "pb", "state_name"]

T = TypeVar("T")

# Images in, PNGs and safetensors out: well beyond gRPC's 4 MiB default. The daemon enforces its own limits.
_MAX_MESSAGE = 512 * 2**20
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", _MAX_MESSAGE),
    ("grpc.max_receive_message_length", _MAX_MESSAGE),
    # keepalive: a ping every 30 s finds a dead connection (a board that rebooted, a Wi-Fi that roamed) within
    # 40 s even while a job's stream is quiet; the daemon allows pings 20 s apart (edge_runtime/daemon/server.py)
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


class ClientError(RuntimeError):
    """A failed call: `code` is the gRPC status name (e.g. "NOT_FOUND"), `details` the daemon's message,
    `violations` the request fields at fault as (field, description) pairs (google.rpc.BadRequest), and
    `retry_after` the seconds after which a retry may succeed (google.rpc.RetryInfo; None: a retry will not)."""

    exit_code = 1  # what the CLI exits with

    def __init__(self, code: str, details: str, violations: Sequence[tuple[str, str]] = (),
                 retry_after: float | None = None):
        super().__init__(f"{code}: {details}" + (f" (retry after {retry_after:g} s)" if retry_after is not None else ""))
        self.code = code
        self.details = details
        self.violations = list(violations)
        self.retry_after = retry_after

    @classmethod
    def from_rpc(cls, e: grpc.RpcError) -> ClientError:
        code = e.code() if hasattr(e, "code") else None
        details = e.details() if hasattr(e, "details") else None
        violations, retry_after = _status_details(e)
        return cls(code.name if code is not None else "UNKNOWN", details or str(e), violations, retry_after)


def _status_details(e: grpc.RpcError) -> tuple[list[tuple[str, str]], float | None]:
    """The BadRequest field violations and RetryInfo delay a status carries (none without grpcio-status)."""
    try:
        from google.rpc import error_details_pb2
        from grpc_status import rpc_status

        status = rpc_status.from_call(e) if hasattr(e, "trailing_metadata") else None
    except (ImportError, ValueError):  # no grpcio-status, or a status the server did not fill consistently
        return [], None
    violations, retry_after = [], None
    for d in status.details if status is not None else ():
        if d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            d.Unpack(br)
            violations += [(v.field, v.description) for v in br.field_violations]
        elif d.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            ri = error_details_pb2.RetryInfo()
            d.Unpack(ri)
            retry_after = ri.retry_delay.ToNanoseconds() / 1e9
    return violations, retry_after


def _call(fn: Callable[..., T], *args, **kwargs) -> T:
    try:
        return fn(*args, **kwargs)
    except grpc.RpcError as e:
        raise ClientError.from_rpc(e) from None


def _read(path_or_bytes, what: str) -> bytes:
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return bytes(path_or_bytes)
    path = os.fspath(path_or_bytes)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path}: no such file")
    with open(path, "rb") as f:
        return f.read()


class JobStream(Iterator["pb.JobEvent"]):
    """The events of one Personalize or WatchJob call. `job_id` is known from the first event on; `cancel()`
    ends the stream only (the job goes on: CancelJob stops it)."""

    def __init__(self, call):
        self._call = call
        self.job_id = ""
        self.last: pb.JobEvent | None = None

    def __iter__(self) -> JobStream:
        return self

    def __next__(self) -> pb.JobEvent:
        try:
            ev = next(self._call)
        except grpc.RpcError as e:
            raise ClientError.from_rpc(e) from None
        if ev.job_id:
            self.job_id = ev.job_id
        self.last = ev
        return ev

    def cancel(self) -> None:
        self._call.cancel()


class EdgeClient:
    """A connection to one edge daemon.

    address: "host:port". token: sent as `authorization: Bearer <token>` on every call.
    tls_ca: PEM (path or bytes) of the CA that signed the daemon's certificate; without it the
    channel is plaintext. tls_cert/tls_key: a client certificate for mTLS (with tls_ca).
    timeout: deadline in seconds of each unary call (None: none); Personalize streams are
    not bounded by it (training takes as long as it takes)."""

    def __init__(self, address: str, token: str | None = None, tls_ca=None, tls_cert=None, tls_key=None,
                 timeout: float | None = None):
        if not address:
            raise ValueError("no daemon address (host:port)")
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("a client certificate needs both tls_cert and tls_key")
        if tls_cert is not None and tls_ca is None:
            raise ValueError("a client certificate (mTLS) needs tls_ca too")
        self.address = address
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        if tls_ca is not None:
            creds = grpc.ssl_channel_credentials(
                root_certificates=_read(tls_ca, "TLS CA"),
                private_key=_read(tls_key, "TLS key") if tls_key is not None else None,
                certificate_chain=_read(tls_cert, "TLS certificate") if tls_cert is not None else None,
            )
            self.channel = grpc.secure_channel(address, creds, options=_CHANNEL_OPTIONS)
        else:
            self.channel = grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
        self.stub = pb_grpc.EdgeBlockStub(self.channel)

    # -- lifecycle ---------------------------------------------------------------------------------
    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> EdgeClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wait_ready(self, timeout: float | None = None) -> EdgeClient:
        """Block until the channel is connected; ClientError("UNAVAILABLE") after `timeout` seconds."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise ClientError("UNAVAILABLE", f"{self.address}: not ready within {timeout} s") from None
        return self

    def _unary(self, method, request, timeout: float | None = None):
        return _call(method, request, metadata=self._metadata, timeout=timeout if timeout is not None else self.timeout)

    # -- the API -----------------------------------------------------------------------------------
    def health(self, service: str = "") -> str:
        """grpc.health.v1 Check: "SERVING", "NOT_SERVING", ... ("" = the whole daemon)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        resp = self._unary(health_pb2_grpc.HealthStub(self.channel).Check, health_pb2.HealthCheckRequest(service=service))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def info(self) -> pb.Info:
        return self._unary(self.stub.GetInfo, pb.GetInfoRequest())

    def personalize(self, images: Sequence[bytes | str | os.PathLike], token: str, class_noun: str, steps: int = 0,
                    learning_rate: float = 0.0, seed: int | None = None, checkpoint_every: int = 0, name: str = "",
                    precompute: str = "", timeout: float | None = None, captions: Sequence[str] = (),
                    class_images: Sequence[bytes | str | os.PathLike] = (), class_captions: Sequence[str] = (),
                    prior_share: float = 0.0, request_id: str = "", lr_schedule: str = "",
                    warmup_steps: int | None = None, validation_prompts: Sequence[str] = (),
                    validation_every: int = 0) -> JobStream:
        """Start a training job; iterate the result for its JobEvents (the last one DONE, FAILED or
        CANCELLED). Images are PNG/JPEG bytes or paths to such files; `captions`, if given, one training
        caption per image naming the token (PersonalizeRequest.captions). `class_images` (prior
        preservation: the base model's generations of the class, e.g. from `generate` without an adapter),
        with `class_captions` (one each, not naming the token) and `prior_share` (0: the daemon's 0.5).
        `request_id` (e.g. a uuid4 hex): the same request sent again with it returns the same job, so a retry
        after a dropped connection never starts a second one. `lr_schedule` ("constant", "cosine", "linear"; "":
        the daemon's) and `warmup_steps` (None: the daemon's): edge_runtime.lr_schedule. `validation_prompts`
        (up to 4) are generated with the adapter so far every `validation_every` steps and after the last: the
        stream's KIND_VALIDATION events (prompt, png)."""
        for what, v in (("images", images), ("class_images", class_images)):
            if isinstance(v, (str, bytes, os.PathLike)):
                raise TypeError(f"{what} must be a list of paths or bytes, not a single one")
        req = pb.PersonalizeRequest(
            images=[pb.Image(data=_read(im, "image")) for im in images], token=token, class_noun=class_noun,
            steps=steps, learning_rate=learning_rate, seed=seed, checkpoint_every=checkpoint_every, name=name,
            precompute=precompute, captions=list(captions),
            class_images=[pb.Image(data=_read(im, "class image")) for im in class_images],
            class_captions=list(class_captions), prior_share=prior_share, request_id=request_id,
            lr_schedule=lr_schedule, warmup_steps=warmup_steps, validation_prompts=list(validation_prompts),
            validation_every=validation_every,
        )
        return JobStream(_call(self.stub.Personalize, req, metadata=self._metadata, timeout=timeout))

    def watch_job(self, job_id: str, timeout: float | None = None) -> JobStream:
        """Follow a job from its first event to its final one (at once for a finished job)."""
        return JobStream(_call(self.stub.WatchJob, pb.WatchJobRequest(job_id=job_id), metadata=self._metadata,
                               timeout=timeout))

    def _pages(self, method, request_type, field: str, page_size: int) -> list:
        out, token = [], ""
        while True:
            resp = self._unary(method, request_type(page_size=page_size, page_token=token))
            out.extend(getattr(resp, field))
            token = resp.next_page_token
            if not token:
                return out

    def list_jobs(self, page_size: int = 0) -> list[pb.Job]:
        """Every job the daemon keeps, newest first (all pages; page_size 0: the daemon's largest page)."""
        return self._pages(self.stub.ListJobs, pb.ListJobsRequest, "jobs", page_size)

    @staticmethod
    def generate_request(prompt: str, adapter_id: str = "", seed: int | None = None, steps: int = 0,
                         guidance: float = 0.0, size: int = 0, negative_prompt: str = "", num_images: int = 0,
                         adapters: Sequence[tuple[str, float]] | Mapping[str, float] = (), width: int = 0,
                         height: int = 0) -> pb.GenerateRequest:
        """A GenerateRequest; `adapters`: (adapter id, scale) pairs (or a dict) applied together, instead of
        `adapter_id`; width and height (both): a non-square size the bundle serves (Info.gen_sizes); 0 and empty
        fields: the daemon's defaults."""
        pairs = list(adapters.items()) if isinstance(adapters, Mapping) else list(adapters)
        return pb.GenerateRequest(prompt=prompt, adapter_id=adapter_id, seed=seed, steps=steps, guidance=guidance,
                                  size=size, negative_prompt=negative_prompt, num_images=num_images, width=width,
                                  height=height,
                                  adapters=[pb.AdapterWeight(adapter_id=a, scale=s) for a, s in pairs])

    def generate(self, prompt: str, adapter_id: str = "", seed: int | None = None, steps: int = 0, guidance: float = 0.0,
                 size: int = 0, negative_prompt: str = "", num_images: int = 0,
                 adapters: Sequence[tuple[str, float]] | Mapping[str, float] = (), width: int = 0,
                 height: int = 0) -> pb.GenerateResponse:
        """Images for `prompt` (response.images; the first also in .png and .seed). See generate_request."""
        req = self.generate_request(prompt, adapter_id, seed, steps, guidance, size, negative_prompt, num_images,
                                    adapters, width, height)
        return self._unary(self.stub.Generate, req)

    def generate_stream(self, prompt: str, **kwargs) -> Iterator[pb.GenerateEvent]:
        """As generate, streaming a GenerateEvent with `progress` after each sampling step, then one with
        `result` (the GenerateResponse)."""
        req = self.generate_request(prompt, **kwargs)
        call = _call(self.stub.GenerateStream, req, metadata=self._metadata, timeout=self.timeout)
        try:
            yield from call
        except grpc.RpcError as e:
            raise ClientError.from_rpc(e) from None

    def list_adapters(self, page_size: int = 0) -> list[pb.Adapter]:
        """Every adapter, oldest first (all pages; page_size 0: the daemon's largest page)."""
        return self._pages(self.stub.ListAdapters, pb.ListAdaptersRequest, "adapters", page_size)

    def get_adapter(self, adapter_id: str) -> pb.Adapter:
        return self._unary(self.stub.GetAdapter, pb.GetAdapterRequest(adapter_id=adapter_id))

    def delete_adapter(self, adapter_id: str) -> bool:
        return self._unary(self.stub.DeleteAdapter, pb.DeleteAdapterRequest(adapter_id=adapter_id)).deleted

    def export_adapter(self, adapter_id: str) -> tuple[bytes, str]:
        """(safetensors bytes in diffusers/PEFT naming, the file name the daemon suggests)."""
        resp = self._unary(self.stub.ExportAdapter, pb.ExportAdapterRequest(adapter_id=adapter_id))
        return resp.safetensors, resp.filename

    def get_job(self, job_id: str) -> pb.Job:
        return self._unary(self.stub.GetJob, pb.GetJobRequest(job_id=job_id))

    def cancel_job(self, job_id: str) -> pb.Job:
        return self._unary(self.stub.CancelJob, pb.CancelJobRequest(job_id=job_id))
