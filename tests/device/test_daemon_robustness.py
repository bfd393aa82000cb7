"""The edge daemon under malformed input and over TLS / mTLS, on the real built-in bundle.

1. Hypothesis fuzzing: a few hundred random or malformed requests against ONE daemon process, over
   every RPC (and raw bytes that are no protobuf at all). Each answer is a success or a deliberate
   status with a message, never UNKNOWN/INTERNAL (an unhandled exception in the daemon); afterwards
   the daemon is alive, SERVING, and still trains and generates.
2. TLS (server certificate) and mTLS (client certificate required), with a throwaway CA made at
   test time by the `openssl` command line.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import time
import zlib
from collections import Counter

import grpc
import pytest
from daemon_util import DaemonProc, subject_pngs
from edgeblock.client import ClientError, EdgeClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from edge_runtime.api import edgeblock_pb2 as pb
from edge_runtime.api import edgeblock_pb2_grpc as pb_grpc
from edge_runtime.api import kind_name

pytest.importorskip("onnxruntime.training")

SERVICE = "edgeblock.v1.EdgeBlock"
# What a daemon may answer a bad request with. UNKNOWN / INTERNAL mean an unhandled exception.
ALLOWED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
           grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.UNAUTHENTICATED,
           grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
# The daemon's limits (Info.limits of the default config); the fuzz test checks them against GetInfo.
MAX_IMAGES, MAX_STEPS, MAX_GENERATE_STEPS, MAX_PROMPT = 16, 5000, 200, 1000
CALL_TIMEOUT = 60.0
MIN_REQUESTS = 200


@pytest.fixture(scope="module")
def bundle(builtin_bundle):
    return builtin_bundle[0]


@pytest.fixture(scope="module")
def fuzz_daemon(bundle, tmp_path_factory):
    d = DaemonProc(bundle, str(tmp_path_factory.mktemp("fuzz") / "state"))
    yield d
    d.stop()


# ---------------------------------------------------------------------------------------------
# Images: valid, corrupt, truncated, lying about their size, other formats
# ---------------------------------------------------------------------------------------------
def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


VALID_PNGS = subject_pngs(3, side=64, seed=5)
_NOISE = Image.effect_noise((48, 40), 60).convert("RGB")
VALID_JPEG = _encode(_NOISE, "JPEG", quality=80)
OTHER_FORMATS = [_encode(_NOISE, "GIF"), _encode(_NOISE, "BMP"), _encode(_NOISE, "TIFF"), _encode(_NOISE, "PPM")]
TINY_PNG = _encode(Image.new("RGB", (8, 8), (9, 9, 9)), "PNG")  # below min_side


def _png_claiming(w: int, h: int) -> bytes:
    """A PNG whose IHDR (valid CRC) claims w x h but whose data is a 64x64 image's."""
    png = VALID_PNGS[0]
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return png[:8] + _chunk(b"IHDR", ihdr) + png[33:]


def _png_idat_length(n: int) -> bytes:
    """A PNG whose IDAT chunk lies about its length (Pillow then raises SyntaxError: "broken PNG file")."""
    png = VALID_PNGS[0]
    i = png.index(b"IDAT")
    return png[:i - 4] + struct.pack(">I", n) + png[i:]


def _jpeg_claiming(w: int, h: int) -> bytes:
    """A JPEG whose SOF0 header claims w x h."""
    i = VALID_JPEG.index(b"\xff\xc0")
    return VALID_JPEG[:i + 5] + struct.pack(">HH", h, w) + VALID_JPEG[i + 9:]


@st.composite
def _mutated(draw, base: bytes) -> bytes:
    b = bytearray(base)
    for _ in range(draw(st.integers(1, 6))):
        b[draw(st.integers(0, len(b) - 1))] = draw(st.integers(0, 255))
    return bytes(b)


_valid_image = st.sampled_from(VALID_PNGS + [VALID_JPEG])
image_bytes = st.one_of(
    _valid_image,
    st.binary(max_size=600),
    st.sampled_from(VALID_PNGS + [VALID_JPEG]).flatmap(lambda b: st.integers(0, len(b) - 1).map(lambda n: b[:n])),
    _mutated(VALID_PNGS[0]),
    _mutated(VALID_JPEG),
    st.builds(_png_claiming, st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1)),
    st.builds(_jpeg_claiming, st.integers(0, 65535), st.integers(0, 65535)),
    st.builds(_png_idat_length, st.integers(0, 2**32 - 1)),
    st.sampled_from(OTHER_FORMATS + [TINY_PNG, b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"]),
)
image_lists = st.one_of(
    st.lists(_valid_image, min_size=1, max_size=3),
    st.lists(image_bytes, min_size=0, max_size=4),
    st.integers(MAX_IMAGES + 1, MAX_IMAGES + 8).map(lambda n: [TINY_PNG] * n),  # too many
)

# ---------------------------------------------------------------------------------------------
# Fields
# ---------------------------------------------------------------------------------------------
_odd_words = st.sampled_from(["", " ", "\t\n", "s ks", "\u3000", "sks\u00a0x", "\x00", "sks\x00", "🐶", "ǅ", "\u202e",
                              "../x", "a" * 64, "a" * 65, " sks ", "\u0085"])
words = st.one_of(st.just("sks"), st.just("ring"), _odd_words, st.text(max_size=24),
                  st.text(min_size=65, max_size=120))
floats32 = st.one_of(st.floats(width=32),  # nan, inf, negative, subnormal, huge
                     st.sampled_from([0.0, -0.0, 1e-3, 1.0, 1.5, float("nan"), float("inf"), -float("inf")]))
uint32s = st.integers(0, 2**32 - 1)
uint64s = st.integers(0, 2**64 - 1)
hex32 = st.text("0123456789abcdef", min_size=32, max_size=32)
odd_ids = st.sampled_from([
    "", ".", "..", "../x", "../../etc/passwd", "/etc/passwd", "/tmp", "~", "x/../y", "\\..\\x", "a" * 32,
    "g" * 32, "A" * 32, "0" * 31, "0" * 33, "0" * 32 + "\n", "\n" + "0" * 32, "0" * 32 + "\x00", "０" * 32,
    "0" * 16 + "/" + "0" * 15, "%2e%2e%2f", "🐶" * 32, "x" * 5000,
])
ids = st.one_of(hex32, odd_ids, st.text(max_size=40), st.text(min_size=32, max_size=32))

# Valid step counts are kept tiny (an accepted request does real work); invalid ones go past the limit.
train_steps = st.one_of(st.integers(0, 3), st.integers(MAX_STEPS + 1, 2**32 - 1), st.just(MAX_STEPS + 1))
gen_steps = st.one_of(st.integers(1, 3), st.integers(MAX_GENERATE_STEPS + 1, 2**32 - 1),
                      st.just(MAX_GENERATE_STEPS + 1))

personalize_requests = st.builds(
    lambda images, **kw: pb.PersonalizeRequest(images=[pb.Image(data=b) for b in images], **kw),
    image_lists,
    token=words, class_noun=words, steps=train_steps, learning_rate=floats32, seed=uint64s,
    checkpoint_every=st.one_of(uint32s, st.sampled_from([0, 1, MAX_STEPS, MAX_STEPS + 1])),
    name=st.one_of(st.just(""), st.text(max_size=30), st.text(min_size=201, max_size=260), _odd_words),
    precompute=st.one_of(st.sampled_from(["", "bank", "online", "BANK", " bank", "none"]), st.text(max_size=12)),
)

prompts = st.one_of(
    st.text(max_size=60),
    st.sampled_from(["", "a cat", "a sks ring\x00on the beach", "\x00" * 50, "🐶" * 300, "\u202e\u0000\ufeff",
                     "x" * MAX_PROMPT, "x" * (MAX_PROMPT + 1)]),
    st.builds(lambda c, n: c * n, st.characters(), st.integers(MAX_PROMPT - 5, 3 * MAX_PROMPT)),
)
generate_requests = st.builds(
    pb.GenerateRequest,
    prompt=prompts,
    adapter_id=st.one_of(st.just(""), ids),
    seed=uint64s,
    steps=gen_steps,
    guidance=st.one_of(st.sampled_from([0.0, 1.0, 3.0, 100.0]), floats32),
    size=st.one_of(st.sampled_from([0, 32, 64]), uint32s),
)

ID_RPCS = {
    "GetAdapter": pb.GetAdapterRequest, "DeleteAdapter": pb.DeleteAdapterRequest,
    "ExportAdapter": pb.ExportAdapterRequest, "GetJob": pb.GetJobRequest, "CancelJob": pb.CancelJobRequest,
}
ALL_METHODS = ["Personalize", "Generate", "ListAdapters", "GetAdapter", "DeleteAdapter", "ExportAdapter", "GetJob",
               "CancelJob", "GetInfo"]


def _tag(field: int, wire: int) -> bytes:
    return bytes([(field << 3) | wire])


raw_payloads = st.one_of(
    st.binary(min_size=1, max_size=300),
    st.sampled_from([
        _tag(1, 2) + b"\x02\xff\xfe",  # a string field holding invalid UTF-8
        _tag(2, 2) + b"\x03\xc3\x28a",
        _tag(1, 2) + b"\xff\xff\xff\xff\x0f",  # a length far past the end
        _tag(4, 0) + b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",  # an over-long varint
        _tag(4, 0),  # a truncated varint
        _tag(1, 3),  # a group start without end
        _tag(1, 4),  # a group end without start
        _tag(0, 0) + b"\x01",  # field number 0
        b"\x0f\x01", b"\xff", b"\x80" * 20,
        _tag(1, 2) + b"\x04" + _tag(1, 2) + b"\x05xx",  # Personalize: an Image whose data overruns
    ]),
    st.tuples(st.integers(1, 12), st.integers(0, 7), st.binary(max_size=20)).map(
        lambda t: _tag(t[0], t[1]) + t[2]),
)


# ---------------------------------------------------------------------------------------------
# The fuzzing
# ---------------------------------------------------------------------------------------------
class Fuzzer:
    """Sends requests, checks each answer, counts them: histogram[(rpc, code)]."""

    def __init__(self, address: str):
        self.channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 * 2**20),
                                                               ("grpc.max_receive_message_length", 64 * 2**20)])
        self.stub = pb_grpc.EdgeBlockStub(self.channel)
        self.histogram: Counter = Counter()
        self.fuzzed = 0
        self.jobs: list[str] = []
        self.outcomes: Counter = Counter()

    def close(self) -> None:
        self.channel.close()

    def record(self, rpc: str, fn, *, fuzzed: bool = True):
        """Run fn(); returns its result or None if it failed with an allowed status."""
        if fuzzed:
            self.fuzzed += 1
        try:
            out = fn()
        except grpc.RpcError as e:
            code, details = e.code(), e.details()
            self.histogram[(rpc, code.name)] += 1
            assert code in ALLOWED, f"{rpc}: {code.name} {details!r} (an unhandled exception in the daemon?)"
            assert details and details.strip(), f"{rpc}: {code.name} without a message"
            return None
        self.histogram[(rpc, "OK")] += 1
        return out

    def personalize(self, request: pb.PersonalizeRequest, call=None, rpc: str = "Personalize") -> None:
        call = call if call is not None else self.stub.Personalize(request, timeout=CALL_TIMEOUT)
        try:
            first = self.record(rpc, lambda: next(call))
            if first is None:
                return
            # accepted: stop the job right away (its first event names it)
            assert first.job_id and kind_name(first.kind) == "QUEUED", first
            assert rpc == "Personalize", f"{rpc}: random bytes started a job"
            self.jobs.append(first.job_id)
            self.record("CancelJob", lambda: self.stub.CancelJob(pb.CancelJobRequest(job_id=first.job_id),
                                                                 timeout=CALL_TIMEOUT), fuzzed=False)
            last = first
            for ev in call:  # ends with CANCELLED (or DONE when it was quicker than the cancel)
                last = ev
            self.outcomes[kind_name(last.kind)] += 1
            # FAILED would mean the daemon accepted a request it cannot train on
            assert kind_name(last.kind) in ("CANCELLED", "DONE"), (request, last)
        finally:
            call.cancel()

    def generate(self, request: pb.GenerateRequest) -> None:
        r = self.record("Generate", lambda: self.stub.Generate(request, timeout=CALL_TIMEOUT))
        if r is not None:
            assert r.png.startswith(b"\x89PNG") and r.steps <= 3, r.steps

    def by_id(self, rpc: str, value: str) -> None:
        self.record(rpc, lambda: getattr(self.stub, rpc)(ID_RPCS[rpc](**{_id_field(rpc): value}),
                                                         timeout=CALL_TIMEOUT))

    def raw(self, method: str, payload: bytes) -> None:
        path = f"/{SERVICE}/{method}"
        if method == "Generate":
            try:
                parsed = pb.GenerateRequest.FromString(payload)
            except Exception:  # noqa: BLE001 - not a message: the daemon must say so
                parsed = None
            if parsed is not None and (parsed.steps == 0 or 3 < parsed.steps <= MAX_GENERATE_STEPS):
                payload += _tag(4, 0) + b"\x01"  # it parses: keep a valid generation to 1 step (the last field wins)
        if method == "Personalize":  # identity serializers: bytes in, bytes out
            self.personalize(None, call=self.channel.unary_stream(path)(payload, timeout=CALL_TIMEOUT), rpc="raw:Personalize")
            return
        self.record(f"raw:{method}", lambda: self.channel.unary_unary(path)(payload, timeout=CALL_TIMEOUT))


def _id_field(rpc: str) -> str:
    return "job_id" if "Job" in rpc else "adapter_id"


FUZZ_SETTINGS = {"deadline": None, "database": None,
                 "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large, HealthCheck.filter_too_much]}


def _ok_fields(**kw) -> dict:
    return {"token": "sks", "class_noun": "ring", "steps": 1, **kw}


# Requests known to have broken the daemon (UNKNOWN/INTERNAL) before: sent first, every run.
REGRESSIONS = [
    # Pillow raises SyntaxError (not OSError/ValueError) for a PNG whose IDAT length lies
    ("Personalize", pb.PersonalizeRequest(images=[pb.Image(data=_png_idat_length(10))], **_ok_fields())),
    ("Personalize", pb.PersonalizeRequest(images=[pb.Image(data=VALID_PNGS[1]), pb.Image(data=_png_idat_length(200))],
                                          **_ok_fields())),
    # bytes that are no protobuf message: grpc's own deserialization failure is INTERNAL
    ("raw:GetAdapter", _tag(1, 2) + b"\x02\xff\xfe"),
    ("raw:Generate", b"\xff\xff\xff"),
    ("raw:Personalize", _tag(1, 2) + b"\xff\xff\xff\xff\x0f"),
    ("raw:GetInfo", _tag(1, 3)),
]


def test_fuzzed_requests_never_break_the_daemon(fuzz_daemon):
    f = Fuzzer(fuzz_daemon.address)
    t0 = time.time()
    try:
        info = f.stub.GetInfo(pb.GetInfoRequest(), timeout=CALL_TIMEOUT)
        L = info.limits
        assert (L.max_images, L.max_steps, L.max_generate_steps, L.max_prompt_chars) == (
            MAX_IMAGES, MAX_STEPS, MAX_GENERATE_STEPS, MAX_PROMPT)

        @settings(max_examples=120, **FUZZ_SETTINGS)
        @given(personalize_requests)
        def fuzz_personalize(req):
            f.personalize(req)

        @settings(max_examples=100, **FUZZ_SETTINGS)
        @given(generate_requests)
        def fuzz_generate(req):
            f.generate(req)

        @settings(max_examples=80, **FUZZ_SETTINGS)
        @given(st.sampled_from(sorted(ID_RPCS)), ids, st.booleans())
        def fuzz_ids(rpc, value, known):
            if known and f.jobs and "Job" in rpc:  # ids of jobs the fuzzing got accepted: a success
                value = f.jobs[-1]
            f.by_id(rpc, value)

        @settings(max_examples=100, **FUZZ_SETTINGS)
        @given(st.sampled_from(ALL_METHODS), raw_payloads)
        def fuzz_raw(method, payload):
            f.raw(method, payload)

        for rpc, req in REGRESSIONS:
            if rpc == "Personalize":
                f.personalize(req)
            else:
                f.raw(rpc.removeprefix("raw:"), req)
        for run in (fuzz_personalize, fuzz_generate, fuzz_ids, fuzz_raw):
            run()
    finally:
        f.close()
    took = time.time() - t0
    hist = Counter({f"{rpc} {code}": n for (rpc, code), n in f.histogram.items()})
    print(f"\n{f.fuzzed} fuzzed requests in {took:.1f} s, {len(f.jobs)} accepted jobs {dict(f.outcomes)}; answers:")
    for k, n in sorted(hist.items()):
        print(f"  {k}: {n}")
    by_code = Counter()
    for (_rpc, code), n in f.histogram.items():
        by_code[code] += n
    print("  by code:", dict(sorted(by_code.items())))
    assert f.fuzzed >= MIN_REQUESTS, f.fuzzed
    assert {rpc.removeprefix("raw:") for rpc, _ in f.histogram} == set(ALL_METHODS)
    assert not {"UNKNOWN", "INTERNAL"} & set(by_code)
    assert "Traceback" not in fuzz_daemon.logs()

    # the daemon is alive, SERVING, and still does its job
    assert fuzz_daemon.alive(), fuzz_daemon.logs()[-3000:]
    with EdgeClient(fuzz_daemon.address, timeout=CALL_TIMEOUT) as c:
        assert c.health() == "SERVING" and c.health(SERVICE) == "SERVING"
        events = list(c.personalize(subject_pngs(2), token="sks", class_noun="ring", steps=3))
        assert kind_name(events[-1].kind) == "DONE", events[-1]
        aid = events[-1].adapter_id
        assert aid in {a.id for a in c.list_adapters()}
        r = c.generate("a sks ring", adapter_id=aid, steps=2, seed=1)
        im = Image.open(io.BytesIO(r.png))
        assert im.size == (info.gen_res, info.gen_res) and r.steps == 2
    assert fuzz_daemon.alive()


# ---------------------------------------------------------------------------------------------
# TLS and mTLS
# ---------------------------------------------------------------------------------------------
def _openssl(*args: str, cwd: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A throwaway CA, a server certificate for 127.0.0.1/localhost and a client certificate (EC P-256)."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command line to make test certificates with")
    d = str(tmp_path_factory.mktemp("pki"))
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=edgeblock test CA",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    exts = {
        "server": "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n",
        "client": "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n",
    }
    for name, ext in exts.items():
        with open(os.path.join(d, f"{name}.ext"), "w") as fh:
            fh.write(ext)
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=edgeblock test {name}",
                 cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
    files = {"ca": "ca.pem", "server": "server.pem", "server_key": "server.key", "client": "client.pem",
             "client_key": "client.key"}
    return {k: os.path.join(d, v) for k, v in files.items()}


def _fails(client: EdgeClient) -> ClientError:
    with pytest.raises(ClientError) as e:
        client.info()
    return e.value


def test_tls_server_certificate(bundle, pki, tmp_path):
    d = DaemonProc(bundle, str(tmp_path / "state"), "--tls-cert", pki["server"], "--tls-key", pki["server_key"])
    try:
        with EdgeClient(d.address, tls_ca=pki["ca"], timeout=20) as c:
            assert c.info().family == "flux"
            assert c.health() == "SERVING"
        with EdgeClient(f"localhost:{d.port}", tls_ca=pki["ca"], timeout=20) as c:  # the DNS name is in the SAN too
            assert c.info().gen_res > 0
        with EdgeClient(d.address, timeout=10) as plain:
            err = _fails(plain)
            assert err.code == "UNAVAILABLE", err
        with EdgeClient(d.address, tls_ca=pki["client"], timeout=10) as wrong_ca:  # not the CA that signed it
            assert _fails(wrong_ca).code == "UNAVAILABLE"
        assert d.alive()
    finally:
        d.stop()


def test_mtls_requires_a_client_certificate(bundle, pki, tmp_path):
    d = DaemonProc(bundle, str(tmp_path / "state"), "--tls-cert", pki["server"], "--tls-key", pki["server_key"],
                   "--tls-client-ca", pki["ca"])
    try:
        with EdgeClient(d.address, tls_ca=pki["ca"], timeout=10) as anon:
            err = _fails(anon)
            assert err.code == "UNAVAILABLE", err
        with EdgeClient(d.address, timeout=10) as plain:
            assert _fails(plain).code == "UNAVAILABLE"
        with EdgeClient(d.address, tls_ca=pki["ca"], tls_cert=pki["client"], tls_key=pki["client_key"],
                        timeout=20) as c:
            info = c.info()
            assert info.family == "flux" and c.health() == "SERVING"
            r = c.generate("a red circle", steps=1, seed=2)
            assert r.png.startswith(b"\x89PNG")
        assert d.alive()
    finally:
        d.stop()


def test_a_second_daemon_on_the_same_port_or_state_is_refused(bundle, tmp_path):
    """Not two daemons on one port (no SO_REUSEPORT sharing) nor on one state directory (flock)."""
    import sys

    first = DaemonProc(bundle, str(tmp_path / "state"))
    try:
        def second(listen: str, state: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "edge_runtime.server", "--bundle", bundle, "--listen", listen,
                                   "--state", state, "--threads", "1"], capture_output=True, text=True, timeout=120)

        same_port = second(first.address, str(tmp_path / "other-state"))
        assert same_port.returncode == 2 and "cannot listen on" in same_port.stderr, same_port.stderr[-2000:]
        same_state = second("127.0.0.1:0", str(tmp_path / "state"))
        assert same_state.returncode == 2 and "in use by another daemon" in same_state.stderr, same_state.stderr[-2000:]
        assert f"pid {first.pid}" in same_state.stderr
        with EdgeClient(first.address, timeout=30) as c:  # the first one is untouched
            assert c.health() == "SERVING"
    finally:
        first.stop()
