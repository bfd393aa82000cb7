"""The host/device boundary: what both sides read lives in numpy-only contract modules of edge_runtime, and
the host imports only those (plus a short, reviewed list of device modules it runs on purpose); model
adapters know nothing of the method.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]  # tests/shared/ -> the repository
DEVICE = ROOT / "edge_runtime"
HOST = ROOT / "sdk" / "edgeblock"

# The contracts: written once for the device and the host, importing only the standard library, numpy,
# PIL and each other. A module that needs more cannot be one.
CONTRACTS = {
    "edge_runtime",  # the package itself: its docstring and __version__
    "edge_runtime.adapter_file",  # the LoRA adapter file (safetensors)
    "edge_runtime.engines.errors",  # the engine plan's error type
    "edge_runtime.engines.plan",  # engines/plan.json: compile writes it, the device builds engines from it
    "edge_runtime.faults",  # the crash points test hook (standard library only), reached by fileio's writes
    "edge_runtime.fileio",  # atomic writes, sha256
    "edge_runtime.flow",  # flow-matching sampling levels, Euler step, patch packing, position ids
    "edge_runtime.graph_names",  # the bundle graphs' tensor names, kinds and chain order
    "edge_runtime.manifest",  # manifest.json schema
    "edge_runtime.lr_schedule",  # a job's learning-rate schedules (the daemon trains by them, the CLI offers them)
    "edge_runtime.memory_plan",  # predicted peaks per operation (compile writes them, the daemon admits by them)
    "edge_runtime.noise",  # noise schedules, training noise levels, noising, targets, timesteps
    "edge_runtime.patch_sampling",  # timestep-aware patch sampling
    "edge_runtime.precompute",  # the bank-or-online precompute rule
    "edge_runtime.recipe",  # the method's recommended settings per model
    "edge_runtime.sampler",  # the samplers
    "edge_runtime.targets",  # deployment target names and boards
    "edge_runtime.text_lookup",  # the text encoders' token tables: compile writes them, the device reads rows
    "edge_runtime.training_spec",  # training_spec.json of the trainable artifacts
    "edge_runtime.weights",  # weight precisions, their ORT session settings, each target's default
}
THIRD_PARTY_OK = {"numpy", "PIL"}
# a contract's one dependency beyond THIRD_PARTY_OK, each with its reason
CONTRACT_EXTRAS = {
    "edge_runtime.adapter_file": {"safetensors"},  # the adapter file format is safetensors (a device dependency)
}

# Host tools that run (or measure) the device runtime itself: device module or package -> host paths allowed to
# import it (a path without .py matches that module and, for a package, everything under it), with the reason.
HOST_TOOLS = {
    "edge_runtime.server": (["sdk/edgeblock/cli"], "`edgeblock serve` starts the daemon"),
    "edge_runtime.daemon.config": (["sdk/edgeblock/cli"],
                                   "`edgeblock serve` takes the daemon's own flags; its clients read the token as it does"),
    "edge_runtime.engines": (["sdk/edgeblock/cli", "sdk/edgeblock/deploy/remote/build_engines"],
                             "`edgeblock build-engines` and deploy's script run on the target build the TensorRT engines"),
    "edge_runtime.api": (["sdk/edgeblock/client"], "the client speaks the daemon's gRPC API (generated stubs)"),
    "edge_runtime.text": (["sdk/edgeblock/compile/encoders", "sdk/edgeblock/compile/bundle_weights"],
                          "compile verifies the exported text encoder with the device's own tokenizer and session, "
                          "and measures the quantized one on that tokenizer's feeds"),
    "edge_runtime.ort_trainer": (["sdk/edgeblock/compile/ort_training", "sdk/edgeblock/bench/memory"],
                                 "compile verifies the training artifacts with the device's trainer; the memory "
                                 "benchmark measures its training step"),
    "edge_runtime.runtime": (["sdk/edgeblock/eval/device_row"], "eval's device row generates with the device runtime"),
    "edge_runtime.personalize": (["sdk/edgeblock/eval/device_row"],
                                 "eval's device row personalizes with the daemon's job code"),
    "edge_runtime.isolation": (["sdk/edgeblock/bench/memory"],
                               "the memory benchmark proves its device process loads no torch"),
    "edge_runtime.memstat": (["sdk/edgeblock/bench", "sdk/edgeblock/demo", "sdk/edgeblock/plan/targets"],
                             "benchmarks and the demo measure memory as the daemon reports it; the planner reads "
                             "this machine's memory as the daemon does"),
}

def _module_name(path: Path) -> tuple[str, list[str]]:
    """(dotted module name, its package's parts) of a file under edge_runtime/ or sdk/."""
    rel = path.relative_to(ROOT / "sdk" if path.is_relative_to(ROOT / "sdk") else ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
        return ".".join(parts), parts
    return ".".join(parts), parts[:-1]


def imports_of(path: Path) -> set[str]:
    """Absolute names of every module a file imports, at module level or inside functions; `from P import N`
    gives P.N when N is a module of an edge_runtime or edgeblock package, else P."""
    _, package = _module_name(path)
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            out.add(mod)
            for a in node.names:
                if _is_local_module(f"{mod}.{a.name}"):
                    out.add(f"{mod}.{a.name}")
    return out


def _is_local_module(name: str) -> bool:
    parts = name.split(".")
    if parts[0] == "edge_runtime":
        base = ROOT.joinpath(*parts)
    elif parts[0] == "edgeblock":
        base = ROOT.joinpath("sdk", *parts)
    else:
        return False
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def _device_module(name: str) -> str:
    """The edge_runtime module an import names: the longest prefix that is a module."""
    parts = name.split(".")
    while len(parts) > 1 and not _is_local_module(".".join(parts)):
        parts.pop()
    return ".".join(parts)


def _under(name: str, prefix: str, sep: str) -> bool:
    return name == prefix or name.startswith(prefix + sep)


def _host_tool(mod: str) -> str | None:
    """The HOST_TOOLS key covering a device module (itself or its package), if any."""
    return next((k for k in HOST_TOOLS if _under(mod, k, ".")), None)


def _host_files():
    return sorted(HOST.rglob("*.py"))


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).with_suffix("").as_posix()


def test_the_host_imports_only_contracts_and_the_listed_host_tools():
    bad = []
    for path in _host_files():
        for name in imports_of(path):
            if name.split(".")[0] != "edge_runtime":
                continue
            mod = _device_module(name)
            if mod in CONTRACTS:
                continue
            key = _host_tool(mod)
            allowed = HOST_TOOLS[key][0] if key else []
            here = _rel(path)
            if not any(_under(here, a, "/") for a in allowed):
                bad.append(f"{here}.py imports {mod}")
    assert not bad, ("the host may import only edge_runtime's contract modules (CONTRACTS) and the reviewed host "
                     f"tools (HOST_TOOLS): {bad}")


def test_the_listed_host_tools_are_still_used():
    """A host tool entry nobody needs any more goes: the list says what the host runs of the device today."""
    used: dict[str, set[str]] = {}
    for path in _host_files():
        for name in imports_of(path):
            if name.split(".")[0] == "edge_runtime":
                key = _host_tool(_device_module(name))
                if key:
                    used.setdefault(key, set()).add(_rel(path))
    stale = []
    for mod, (allowed, _reason) in HOST_TOOLS.items():
        for a in allowed:
            if not (ROOT / f"{a}.py").exists() and not (ROOT / a).is_dir():
                continue  # that host file is not (or no longer) in the tree
            if not any(_under(u, a, "/") for u in used.get(mod, ())):
                stale.append(f"{mod} for {a}")
    assert not stale, f"HOST_TOOLS entries no host file needs: {stale}"


@pytest.mark.parametrize("module", sorted(m for m in CONTRACTS if _is_local_module(m)))
def test_contract_modules_import_only_the_standard_library_numpy_pil_and_contracts(module):
    parts = module.split(".")
    base = ROOT.joinpath(*parts)
    path = base / "__init__.py" if (base / "__init__.py").exists() else base.with_suffix(".py")
    ok = THIRD_PARTY_OK | CONTRACT_EXTRAS.get(module, set())
    bad = []
    for name in imports_of(path):
        top = name.split(".")[0]
        if top == "__future__" or top in sys.stdlib_module_names or top in ok:
            continue
        if top == "edge_runtime" and _device_module(name) in CONTRACTS:
            continue
        bad.append(name)
    assert not bad, f"{module} is a contract: it may import the standard library, {sorted(ok)} and contracts, not {bad}"


def test_model_adapters_import_nothing_of_the_method():
    bad = []
    for path in sorted((HOST / "models").rglob("*.py")):
        for name in imports_of(path):
            if name == "edgeblock.method" or name.startswith("edgeblock.method."):
                bad.append(f"{_rel(path)}.py imports {name}")
    assert not bad, f"sdk/edgeblock/models/ must not import sdk/edgeblock/method/: {bad}"


def test_imports_of_resolves_relative_and_lazy_imports(tmp_path):
    """The checker itself: relative imports resolve against the file's package, function-level ones count."""
    src = HOST / "models" / "text_stacks.py"
    names = imports_of(src)
    assert "edgeblock.models" in names and "edgeblock.models.conditioning" in names
    assert "transformers" in imports_of(HOST / "models" / "pipeline_dir.py")  # imported inside a function
    assert "edge_runtime.noise" in imports_of(HOST / "models" / "objectives.py")
    assert "edge_runtime.noise" in imports_of(DEVICE / "sampler.py")
