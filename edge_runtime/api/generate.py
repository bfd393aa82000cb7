"""Generate the gRPC stubs of the device API from proto/edgeblock/v1/edgeblock.proto.

    python -m edge_runtime.api.generate            # (re)write edge_runtime/api/edgeblock_pb2{,_grpc}.py{,i}
    python -m edge_runtime.api.generate --check    # exit 1 and name the files that differ from a fresh run
    python -m edge_runtime.api.generate --out DIR  # write elsewhere

The stubs are only ever written by this script (grpcio-tools' bundled protoc, its
bundled well-known protos); never edit them by hand. If the committed stubs are
missing or broken so that the package no longer imports, run the file directly:
`python edge_runtime/api/generate.py` (it imports nothing from the package).

protoc runs with `-I proto`, so the descriptor's file name is the canonical
`edgeblock/v1/edgeblock.proto` (what server reflection reports). protoc then writes
absolute imports for that layout (`from edgeblock.v1 import edgeblock_pb2`), but the
top-level name `edgeblock` is the host SDK, so two exact rewrites make the stubs a
self-contained package: the grpc module imports its messages relatively, and the
messages' `__module__` names this package. A rewrite that no longer matches is an
error, not a silent no-op.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

API_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(API_DIR))
PROTO_ROOT = os.path.join(REPO_ROOT, "proto")
PROTO = "edgeblock/v1/edgeblock.proto"
PACKAGE = "edge_runtime.api"
FILES = ("edgeblock_pb2.py", "edgeblock_pb2.pyi", "edgeblock_pb2_grpc.py")

# (file, what protoc writes, what we commit): each must match exactly once or more.
_REWRITES = (
    ("edgeblock_pb2_grpc.py",
     "from edgeblock.v1 import edgeblock_pb2 as edgeblock_dot_v1_dot_edgeblock__pb2\n",
     "from . import edgeblock_pb2 as edgeblock__pb2\n"),
    ("edgeblock_pb2_grpc.py", "edgeblock_dot_v1_dot_edgeblock__pb2.", "edgeblock__pb2."),
    ("edgeblock_pb2.py",
     "_builder.BuildTopDescriptorsAndMessages(DESCRIPTOR, 'edgeblock.v1.edgeblock_pb2', _globals)",
     f"_builder.BuildTopDescriptorsAndMessages(DESCRIPTOR, '{PACKAGE}.edgeblock_pb2', _globals)"),
)


def _protoc(out_dir: str, proto_root: str) -> None:
    try:
        import grpc_tools
        from grpc_tools import protoc
    except ImportError as e:
        raise RuntimeError("the stub generator needs grpcio-tools (pip install grpcio-tools==1.85.1)") from e
    source = os.path.join(proto_root, PROTO)
    if not os.path.isfile(source):
        raise FileNotFoundError(f"{source}: no such file (the generator runs from a source checkout)")
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    rc = protoc.main([
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        source,
    ])
    if rc != 0:
        raise RuntimeError(f"protoc failed (exit {rc}) on {source}")


def generate(out_dir: str = API_DIR, proto_root: str = PROTO_ROOT) -> list[str]:
    """Write the three stub files into `out_dir`; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgeblock-protoc-") as tmp:
        _protoc(tmp, proto_root)
        gen_dir = os.path.join(tmp, os.path.dirname(PROTO))
        texts = {}
        for name in FILES:
            with open(os.path.join(gen_dir, name), encoding="utf-8") as f:
                texts[name] = f.read()
    for name, old, new in _REWRITES:
        if old not in texts[name]:
            raise RuntimeError(f"{name}: protoc output no longer contains {old.strip()!r}; update the rewrites in {__file__}")
        texts[name] = texts[name].replace(old, new)
    if "edgeblock.v1 import" in texts["edgeblock_pb2_grpc.py"] or "edgeblock_dot_v1" in texts["edgeblock_pb2_grpc.py"]:
        raise RuntimeError("edgeblock_pb2_grpc.py still refers to the absolute module edgeblock.v1")
    paths = []
    for name in FILES:
        path = os.path.join(out_dir, name)
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.write(texts[name])
        paths.append(path)
    return paths


def check(stub_dir: str = API_DIR, proto_root: str = PROTO_ROOT) -> list[str]:
    """Regenerate into a temporary directory; return the names of the files in `stub_dir` that differ
    (or are missing). Empty means the stubs are up to date, byte for byte."""
    with tempfile.TemporaryDirectory(prefix="edgeblock-stubs-") as tmp:
        generate(tmp, proto_root)
        differ = []
        for name in FILES:
            mine = os.path.join(stub_dir, name)
            if not os.path.isfile(mine):
                differ.append(name)
                continue
            with open(mine, "rb") as a, open(os.path.join(tmp, name), "rb") as b:
                if a.read() != b.read():
                    differ.append(name)
        return differ


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edge_runtime.api.generate", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=API_DIR, help=f"output directory (default: {API_DIR})")
    p.add_argument("--proto-root", default=PROTO_ROOT, help=f"the -I root holding {PROTO} (default: {PROTO_ROOT})")
    p.add_argument("--check", action="store_true", help="compare --out with a fresh generation; exit 1 if they differ")
    args = p.parse_args(argv)
    try:
        if args.check:
            differ = check(args.out, args.proto_root)
            if differ:
                print(f"stale stubs in {args.out} (run `make proto`): {', '.join(differ)}", file=sys.stderr)
                return 1
            print(f"stubs in {args.out} are up to date with {PROTO}")
            return 0
        for path in generate(args.out, args.proto_root):
            print(path)
        return 0
    except (RuntimeError, FileNotFoundError) as e:
        print(f"generate: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
