"""The device API stubs: generated (never hand-edited), torch-free, and the service the proto declares."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from edge_runtime.api import SERVICE_NAME
from edge_runtime.api import edgeblock_pb2 as pb
from edge_runtime.api import edgeblock_pb2_grpc as pb_grpc

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/device/ -> the repository


def test_committed_stubs_equal_a_fresh_generation():
    pytest.importorskip("grpc_tools")
    from edge_runtime.api.generate import check

    assert check() == [], "stale stubs: run `make proto` (python -m edge_runtime.api.generate)"


def test_check_names_a_drifted_stub(tmp_path, capsys):
    pytest.importorskip("grpc_tools")
    from edge_runtime.api.generate import FILES, check, generate, main

    generate(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(FILES)
    grpc_src = (tmp_path / "edgeblock_pb2_grpc.py").read_text()
    assert "from . import edgeblock_pb2 as edgeblock__pb2\n" in grpc_src  # never the SDK's top-level `edgeblock`
    assert not re.search(r"^\s*(from|import) edgeblock", grpc_src, re.MULTILINE) and "edgeblock_dot_v1" not in grpc_src
    with open(tmp_path / "edgeblock_pb2.pyi", "a") as f:
        f.write("# hand edit\n")
    (tmp_path / "edgeblock_pb2.py").unlink()
    assert check(str(tmp_path)) == ["edgeblock_pb2.py", "edgeblock_pb2.pyi"]
    assert main(["--out", str(tmp_path), "--check"]) == 1
    assert "edgeblock_pb2.py, edgeblock_pb2.pyi" in capsys.readouterr().err


def test_stubs_and_client_import_without_torch():
    code = (
        "import sys\n"
        "import edge_runtime.api as api\n"
        "from edge_runtime.api import edgeblock_pb2, edgeblock_pb2_grpc\n"
        "import edgeblock.client\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'diffusers'))\n"
        "assert not heavy, heavy\n"
        "print(api.SERVICE_NAME, edgeblock_pb2.JobEvent.__module__)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["edgeblock.v1.EdgeBlock", "edge_runtime.api.edgeblock_pb2"]


def test_messages_round_trip():
    req = pb.PersonalizeRequest(images=[pb.Image(data=b"\x89PNG\r\n\x1a\nfirst"), pb.Image(data=bytes(range(256)))],
                                token="sks", class_noun="dog", steps=200, learning_rate=1e-4, seed=2**63 + 5,
                                checkpoint_every=50, name="my dog", precompute="bank")
    back = pb.PersonalizeRequest.FromString(req.SerializeToString())
    assert back == req
    assert [im.data for im in back.images] == [b"\x89PNG\r\n\x1a\nfirst", bytes(range(256))]
    assert back.seed == 2**63 + 5 and back.precompute == "bank"
    assert back.learning_rate == pytest.approx(1e-4)

    names = ["KIND_UNSPECIFIED", "KIND_QUEUED", "KIND_ENCODING", "KIND_PRECOMPUTING", "KIND_STEP", "KIND_CHECKPOINT",
             "KIND_DONE", "KIND_FAILED", "KIND_CANCELLED", "KIND_VALIDATION"]  # buf lint: each value its enum's prefix
    assert [pb.JobEvent.Kind.Name(i) for i in range(len(names))] == names
    for kind in names[1:]:
        ev = pb.JobEvent(kind=pb.JobEvent.Kind.Value(kind), job_id="j1", step=3, total_steps=10, loss=0.25,
                         adapter_id="a1", message="m", queue_position=2, progress=0.5, elapsed_s=1.5)
        got = pb.JobEvent.FromString(ev.SerializeToString())
        assert got == ev and pb.JobEvent.Kind.Name(got.kind) == kind
    assert pb.JobEvent().kind == pb.JobEvent.KIND_UNSPECIFIED  # the proto3 default is never a real kind
    assert [pb.Job.State.Name(i) for i in range(6)] == ["STATE_UNSPECIFIED", "STATE_QUEUED", "STATE_RUNNING",
                                                        "STATE_DONE", "STATE_FAILED", "STATE_CANCELLED"]
    info = pb.Info(family="flux", sizes=[256, 512], limits=pb.Limits(max_images=8), defaults=pb.Defaults(steps=300))
    assert pb.Info.FromString(info.SerializeToString()) == info


def test_the_proto_passes_buf_lint(tmp_path):
    """`buf lint` with proto/buf.yaml (the STANDARD rules, less the four that would rename the wire's service
    path, share its response types or split GenerateStream's request from Generate's; the file says why).
    `make test` installs buf from npm into .tools/."""
    buf = os.path.join(REPO, ".tools", "node_modules", ".bin", "buf")
    if not os.path.exists(buf):
        pytest.skip("buf is not installed in .tools/ (`make test` installs it with npm; npm was not available)")
    r = subprocess.run([buf, "lint"], cwd=os.path.join(REPO, "proto"), capture_output=True, text=True, timeout=120,
                       check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    # and the wire stays compatible with clients built against the proto before the lint renames (commit 3d7ab40):
    # field numbers and types, enum numbers (the names changed: JSON clients see KIND_/STATE_ names, docs/api.md)
    # (that proto taken out with git archive: buf's own git input clones 50 commits deep, and 3d7ab40 is older)
    old = tmp_path / "proto-3d7ab40.tar"
    subprocess.run(["git", "-C", REPO, "archive", "--format=tar", "-o", str(old), "3d7ab40", "proto"], check=True,
                   capture_output=True, timeout=60)
    subprocess.run(["tar", "-xf", str(old), "-C", str(tmp_path)], check=True, timeout=60)
    r = subprocess.run([buf, "breaking", "--against", str(tmp_path / "proto")],
                       cwd=os.path.join(REPO, "proto"), capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_service_has_exactly_the_declared_rpcs():
    svc = pb.DESCRIPTOR.services_by_name["EdgeBlock"]
    assert SERVICE_NAME == svc.full_name == "edgeblock.v1.EdgeBlock"
    assert pb.DESCRIPTOR.name == "edgeblock/v1/edgeblock.proto"
    rpcs = {m.name: (m.client_streaming, m.server_streaming, m.input_type.name, m.output_type.name) for m in svc.methods}
    assert rpcs == {
        "Personalize": (False, True, "PersonalizeRequest", "JobEvent"),
        "WatchJob": (False, True, "WatchJobRequest", "JobEvent"),
        "ListJobs": (False, False, "ListJobsRequest", "ListJobsResponse"),
        "Generate": (False, False, "GenerateRequest", "GenerateResponse"),
        "GenerateStream": (False, True, "GenerateRequest", "GenerateEvent"),
        "ListAdapters": (False, False, "ListAdaptersRequest", "ListAdaptersResponse"),
        "GetAdapter": (False, False, "GetAdapterRequest", "Adapter"),
        "DeleteAdapter": (False, False, "DeleteAdapterRequest", "DeleteAdapterResponse"),
        "ExportAdapter": (False, False, "ExportAdapterRequest", "ExportAdapterResponse"),
        "GetJob": (False, False, "GetJobRequest", "Job"),
        "CancelJob": (False, False, "CancelJobRequest", "Job"),
        "GetInfo": (False, False, "GetInfoRequest", "Info"),
    }
    for name in rpcs:
        assert callable(getattr(pb_grpc.EdgeBlockServicer, name))
    assert callable(pb_grpc.add_EdgeBlockServicer_to_server)


def test_api_doc_equals_a_fresh_rendering_of_the_proto(tmp_path, capsys):
    pytest.importorskip("grpc_tools")
    from edge_runtime.api.generate import DOCS_API, api_markdown, check_api_doc, main

    assert check_api_doc(), "stale docs/api.md: run `make proto` (python -m edge_runtime.api.generate)"
    stale = tmp_path / "api.md"
    stale.write_text(api_markdown().replace("Train a LoRA adapter", "Train an adapter"))
    assert not check_api_doc(str(stale))
    assert main(["--docs", str(stale), "--check"]) == 1
    assert f"stale API reference {stale}" in capsys.readouterr().err
    assert DOCS_API == os.path.join(REPO, "docs", "api.md")


def test_api_doc_names_every_rpc_message_field_and_enum_value():
    with open(os.path.join(REPO, "docs", "api.md"), encoding="utf-8") as f:
        doc = f.read()
    svc = pb.DESCRIPTOR.services_by_name["EdgeBlock"]
    assert "## service EdgeBlock" in doc
    for m in svc.methods:
        assert f"### rpc {m.name}\n" in doc
        stream = "stream " if m.server_streaming else ""
        assert f"    rpc {m.name}({m.input_type.name}) returns ({stream}{m.output_type.name})\n" in doc

    def walk(msg, prefix=""):
        name = prefix + msg.name
        assert f"### message {name}\n" in doc
        section = doc.split(f"### message {name}\n", 1)[1].split("\n### ", 1)[0]
        for field in msg.fields:
            assert f"| `{field.name}` | {field.number} |" in section, (name, field.name)
        for enum in msg.enum_types:
            esection = doc.split(f"### enum {name}.{enum.name}\n", 1)[1].split("\n### ", 1)[0]
            for v in enum.values:
                assert f"| `{v.name}` | {v.number} |" in esection, (enum.name, v.name)
        for nested in msg.nested_types:
            walk(nested, name + ".")

    assert pb.DESCRIPTOR.message_types_by_name
    for msg in pb.DESCRIPTOR.message_types_by_name.values():
        walk(msg)
