"""Generate the gRPC stubs and the API reference (docs/api.md) from proto/edgeblock/v1/edgeblock.proto.

    python -m edge_runtime.api.generate            # (re)write edge_runtime/api/edgeblock_pb2{,_grpc}.py{,i} and docs/api.md
    python -m edge_runtime.api.generate --check    # exit 1 and name the files that differ from a fresh run
    python -m edge_runtime.api.generate --out DIR  # write the stubs elsewhere (--docs PATH: the reference)

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

docs/api.md is rendered from a FileDescriptorSet that the same protoc writes with
`--include_source_info`: services, rpcs, messages, fields and enums with the `//`
comments attached to each (a declaration's leading comment, else its trailing one).
To change the reference, edit the proto's comments and run `make proto`.
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
DOCS_API = os.path.join(REPO_ROOT, "docs", "api.md")

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


def _run_protoc(proto_root: str, outputs: list[str]) -> None:
    """grpcio-tools' bundled protoc on PROTO with the given output flags."""
    try:
        import grpc_tools
        from grpc_tools import protoc
    except ImportError as e:
        raise RuntimeError("the stub generator needs grpcio-tools (pip install grpcio-tools==1.85.1)") from e
    source = os.path.join(proto_root, PROTO)
    if not os.path.isfile(source):
        raise FileNotFoundError(f"{source}: no such file (the generator runs from a source checkout)")
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    rc = protoc.main(["grpc_tools.protoc", f"-I{proto_root}", f"-I{well_known}", *outputs, source])
    if rc != 0:
        raise RuntimeError(f"protoc failed (exit {rc}) on {source}")


def _protoc(out_dir: str, proto_root: str) -> None:
    _run_protoc(proto_root, [f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}"])


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


# ---------------------------------------------------------------------------------------------
# docs/api.md
# ---------------------------------------------------------------------------------------------
# Field numbers of descriptor.proto, for SourceCodeInfo.Location.path.
_FILE_MESSAGE, _FILE_ENUM, _FILE_SERVICE, _FILE_SYNTAX = 4, 5, 6, 12
_MSG_FIELD, _MSG_NESTED, _MSG_ENUM, _MSG_ONEOF = 2, 3, 4, 8
_ENUM_VALUE, _SERVICE_METHOD = 2, 2

_SCALARS = {
    1: "double", 2: "float", 3: "int64", 4: "uint64", 5: "int32", 6: "fixed64", 7: "fixed32", 8: "bool",
    9: "string", 12: "bytes", 13: "uint32", 15: "sfixed32", 16: "sfixed64", 17: "sint32", 18: "sint64",
}
_TYPE_MESSAGE, _TYPE_ENUM, _LABEL_REPEATED = 11, 14, 3


def descriptor(proto_root: str = PROTO_ROOT):
    """PROTO's FileDescriptorProto with source info (comments), as protoc parses it."""
    from google.protobuf import descriptor_pb2

    with tempfile.TemporaryDirectory(prefix="edgeblock-descriptor-") as tmp:
        out = os.path.join(tmp, "edgeblock.pb")
        _run_protoc(proto_root, ["--include_source_info", f"--descriptor_set_out={out}"])
        with open(out, "rb") as f:
            fds = descriptor_pb2.FileDescriptorSet.FromString(f.read())
    for fd in fds.file:
        if fd.name == PROTO:
            return fd
    raise RuntimeError(f"protoc's descriptor set has no {PROTO}")


def _comment(text: str) -> str:
    """A protoc comment: one leading space per line dropped, outer blank lines stripped."""
    lines = [ln.removeprefix(" ") for ln in text.splitlines()]
    return "\n".join(ln.rstrip() for ln in lines).strip("\n")


def _escape_html(text: str) -> str:
    """`<` and `>` outside backtick spans become entities (Markdown would read `<token>` as a tag)."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):  # even parts lie outside code spans
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def _cell(text: str) -> str:
    """A comment as one Markdown table cell."""
    return _escape_html(" ".join(text.split())).replace("|", "\\|")


def _slug(kind: str, name: str) -> str:
    """The anchor GitHub gives the heading `<kind> <name>` (lower case, dots dropped, space -> dash)."""
    return f"{kind}-" + "".join(c for c in name.lower() if c.isalnum() or c in "-_")


def _first_sentence(text: str) -> str:
    flat = " ".join(text.split())
    for i, c in enumerate(flat):
        if c == "." and (i + 2 >= len(flat) or (flat[i + 1] == " " and flat[i + 2].isupper())):
            return flat[: i + 1]
    return flat


class _Doc:
    """Renders one FileDescriptorProto as Markdown."""

    def __init__(self, fd):
        self.fd = fd
        self.prefix = f".{fd.package}." if fd.package else "."
        self.comments: dict[tuple[int, ...], str] = {}
        self.detached: dict[tuple[int, ...], list[str]] = {}
        for loc in fd.source_code_info.location:
            path = tuple(loc.path)
            text = loc.leading_comments or loc.trailing_comments
            if text and path not in self.comments:
                self.comments[path] = _comment(text)
            if loc.leading_detached_comments:
                self.detached.setdefault(path, []).extend(_comment(c) for c in loc.leading_detached_comments)
        # fully qualified name -> (kind, display name) of every message and enum in the file
        self.types: dict[str, tuple[str, str]] = {}
        self.maps: dict[str, object] = {}

        def index(msgs, scope: str) -> None:
            for m in msgs:
                name = f"{scope}{m.name}"
                if m.options.map_entry:
                    self.maps[self.prefix + name] = m
                else:
                    self.types[self.prefix + name] = ("message", name)
                for e in m.enum_type:
                    self.types[f"{self.prefix}{name}.{e.name}"] = ("enum", f"{name}.{e.name}")
                index(m.nested_type, f"{name}.")

        index(fd.message_type, "")
        for e in fd.enum_type:
            self.types[self.prefix + e.name] = ("enum", e.name)

    def ref(self, type_name: str) -> str:
        """A message or enum type as a link to its section (types of other files: their full name)."""
        if type_name in self.types:
            kind, name = self.types[type_name]
            return f"[{name}](#{_slug(kind, name)})"
        return f"`{type_name.lstrip('.')}`"

    def field_type(self, f) -> str:
        if f.type in (_TYPE_MESSAGE, _TYPE_ENUM):
            if f.type_name in self.maps:
                entry = self.maps[f.type_name]
                key, value = entry.field[0], entry.field[1]
                return f"map&lt;{self.field_type(key)}, {self.field_type(value)}&gt;"
            base = self.ref(f.type_name)
        else:
            base = _SCALARS.get(f.type, f"type {f.type}")
        if f.label == _LABEL_REPEATED:
            return f"repeated {base}"
        if f.proto3_optional:
            return f"optional {base}"
        return base

    def render(self) -> str:
        fd = self.fd
        out = [
            "# Device API reference",
            "",
            (f"<!-- Generated from proto/{fd.name} by `make proto` (python -m edge_runtime.api.generate). "
             "Do not edit: edit the proto's comments and regenerate. -->"),
            "",
            (f"The gRPC API of the edge daemon, package `{fd.package}`, rendered from the comments of "
             f"`proto/{fd.name}`. `make proto` rewrites this file with the stubs; "
             "`python -m edge_runtime.api.generate --check` and tests/device/test_proto.py fail when it is stale."),
            "",
        ]
        head = self.detached.get((_FILE_SYNTAX,), []) + [self.comments.get((_FILE_SYNTAX,), "")]
        for text in head:
            if text:
                out += [_escape_html(text), ""]
        out += ["## Contents", ""]
        for s in fd.service:
            out.append(f"- [service {s.name}](#{_slug('service', s.name)})")
        out.append("- messages: " + ", ".join(
            f"[{name}](#{_slug(kind, name)})" for kind, name in self.types.values() if kind == "message"))
        enums = [name for kind, name in self.types.values() if kind == "enum"]
        if enums:
            out.append("- enums: " + ", ".join(f"[{n}](#{_slug('enum', n)})" for n in enums))
        out.append("")
        for si, s in enumerate(fd.service):
            out += self.service(s, (_FILE_SERVICE, si))
        out += ["## Messages", ""]
        for mi, m in enumerate(fd.message_type):
            out += self.message(m, (_FILE_MESSAGE, mi), "")
        if fd.enum_type:
            out += ["## Enums", ""]
            for ei, e in enumerate(fd.enum_type):
                out += self.enum(e, (_FILE_ENUM, ei), e.name)
        while out and out[-1] == "":
            out.pop()
        return "\n".join(out) + "\n"

    def service(self, s, path: tuple[int, ...]) -> list[str]:
        full = f"{self.fd.package}.{s.name}" if self.fd.package else s.name
        out = [f"## service {s.name}", ""]
        if self.comments.get(path):
            out += [_escape_html(self.comments[path]), ""]
        out += [f"Full name `{full}`.", "", "| rpc | request | response | summary |", "|---|---|---|---|"]
        for mi, m in enumerate(s.method):
            req = ("stream " if m.client_streaming else "") + self.ref(m.input_type)
            resp = ("stream " if m.server_streaming else "") + self.ref(m.output_type)
            summary = _cell(_first_sentence(self.comments.get(path + (_SERVICE_METHOD, mi), "")))
            out.append(f"| [{m.name}](#{_slug('rpc', m.name)}) | {req} | {resp} | {summary} |")
        out.append("")
        for mi, m in enumerate(s.method):
            req = ("stream " if m.client_streaming else "") + m.input_type.rsplit(".", 1)[-1]
            resp = ("stream " if m.server_streaming else "") + m.output_type.rsplit(".", 1)[-1]
            out += [f"### rpc {m.name}", "", f"    rpc {m.name}({req}) returns ({resp})", ""]
            text = self.comments.get(path + (_SERVICE_METHOD, mi))
            if text:
                out += [_escape_html(text), ""]
            stream = "a stream of " if m.server_streaming else ""
            out += [f"Request: {self.ref(m.input_type)}. Response: {stream}{self.ref(m.output_type)}.", ""]
        return out

    def message(self, m, path: tuple[int, ...], scope: str) -> list[str]:
        name = f"{scope}{m.name}"
        out = [f"### message {name}", ""]
        if self.comments.get(path):
            out += [_escape_html(self.comments[path]), ""]
        if m.field:
            out += ["| field | number | type | description |", "|---|---|---|---|"]
            for fi, f in enumerate(m.field):
                desc = self.comments.get(path + (_MSG_FIELD, fi), "")
                if f.HasField("oneof_index") and not f.proto3_optional:
                    oneof = m.oneof_decl[f.oneof_index].name
                    desc = f"(oneof `{oneof}`) {desc}".strip()
                out.append(f"| `{f.name}` | {f.number} | {self.field_type(f)} | {_cell(desc)} |")
            out.append("")
        else:
            out += ["No fields.", ""] if not self.comments.get(path) else []
        for ei, e in enumerate(m.enum_type):
            out += self.enum(e, path + (_MSG_ENUM, ei), f"{name}.{e.name}")
        for ni, n in enumerate(m.nested_type):
            if not n.options.map_entry:
                out += self.message(n, path + (_MSG_NESTED, ni), f"{name}.")
        return out

    def enum(self, e, path: tuple[int, ...], name: str) -> list[str]:
        out = [f"### enum {name}", ""]
        if self.comments.get(path):
            out += [_escape_html(self.comments[path]), ""]
        out += ["| name | number | description |", "|---|---|---|"]
        for vi, v in enumerate(e.value):
            out.append(f"| `{v.name}` | {v.number} | {_cell(self.comments.get(path + (_ENUM_VALUE, vi), ''))} |")
        return out + [""]


def api_markdown(proto_root: str = PROTO_ROOT) -> str:
    """docs/api.md's text: the proto's services, rpcs, messages, fields and enums with their comments."""
    return _Doc(descriptor(proto_root)).render()


def write_api_doc(path: str = DOCS_API, proto_root: str = PROTO_ROOT) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(api_markdown(proto_root))
    return path


def check_api_doc(path: str = DOCS_API, proto_root: str = PROTO_ROOT) -> bool:
    """True when `path` equals a fresh rendering, byte for byte."""
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8", newline="") as f:
        return f.read() == api_markdown(proto_root)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edge_runtime.api.generate", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=API_DIR, help=f"stub output directory (default: {API_DIR})")
    p.add_argument("--docs", default=DOCS_API, help=f"the API reference to write (default: {DOCS_API})")
    p.add_argument("--proto-root", default=PROTO_ROOT, help=f"the -I root holding {PROTO} (default: {PROTO_ROOT})")
    p.add_argument("--check", action="store_true",
                   help="compare --out and --docs with a fresh generation; exit 1 if they differ")
    args = p.parse_args(argv)
    try:
        if args.check:
            differ = check(args.out, args.proto_root)
            if differ:
                print(f"stale stubs in {args.out} (run `make proto`): {', '.join(differ)}", file=sys.stderr)
            doc_ok = check_api_doc(args.docs, args.proto_root)
            if not doc_ok:
                print(f"stale API reference {args.docs} (run `make proto`)", file=sys.stderr)
            if differ or not doc_ok:
                return 1
            print(f"stubs in {args.out} and {args.docs} are up to date with {PROTO}")
            return 0
        for path in generate(args.out, args.proto_root):
            print(path)
        print(write_api_doc(args.docs, args.proto_root))
        return 0
    except (RuntimeError, FileNotFoundError) as e:
        print(f"generate: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
