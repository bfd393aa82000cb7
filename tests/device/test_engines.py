"""TensorRT engines of a bundle (edge_runtime/engines/, `edgeblock build-engines`).

Without TensorRT (these hosts): the plan of a real compiled tiny bundle, the cache key and layout, the
errors for a missing or corrupt plan, the clear exit 2 of `edgeblock build-engines`, `engines_status`
choosing ONNX Runtime and saying why, and a torch/tensorrt-free import. With TensorRT (a Jetson or
a host with an NVIDIA GPU): engines built for the tiny bundle match ONNX Runtime, and a second build
reuses the cache. Those are skipped here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from edgeblock.cli import main
from pipelines import make_tiny_pipeline

from edge_runtime import engines as en
from edge_runtime.engines import status as en_status  # engines_status reads the machine's identity here
from edge_runtime.fileio import atomic_json, atomic_write
from edge_runtime.manifest import load_manifest

pytest.importorskip("onnxruntime.training")  # compile writes the ORT training artifacts

TRT_OK, TRT_WHY = en.tensorrt_available()
SKIP_REASON = ("TensorRT is not installable on these hosts (no NVIDIA GPU / no wheels); "
               "the code is written against the tensorrt 10 API")
needs_trt = pytest.mark.skipif(not TRT_OK, reason=SKIP_REASON)
without_trt = pytest.mark.skipif(TRT_OK, reason="TensorRT is installed here: the no-TensorRT path does not apply")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/device/ -> the repository

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A real tiny FLUX bundle (two frozen groups around trainable block 1), compiled without verification."""
    from edgeblock.compile.bundle import CompileOptions, compile_bundle

    root = tmp_path_factory.mktemp("engines")
    pipe = make_tiny_pipeline("flux", root / "flux")
    out = str(root / "bundle")
    compile_bundle(CompileOptions(pipe, out, blocks=(1,), gen_res=32, train_res=16, lora_rank=2, verify=False),
                   progress=None)
    return out


def _plan_only_copy(bundle, dst) -> str:
    """A directory holding just the bundle's engines/plan.json (all load_plan / engines_status read)."""
    os.makedirs(dst / "engines")
    shutil.copy(os.path.join(bundle, "engines", "plan.json"), dst / "engines" / "plan.json")
    return str(dst)


def test_plan_of_a_compiled_bundle(bundle):
    plan = en.load_plan(bundle)
    m = load_manifest(bundle)
    assert plan["version"] == 1 and plan["status"] == "not built"
    assert plan["cache_key"] == ["tensorrt_version", "gpu_name", "onnx_sha256"]
    assert [g["onnx"] for g in plan["groups"]] == ["frozen/group_00.onnx", "frozen/group_01.onnx"]
    for g in plan["groups"]:
        assert g["onnx_sha256"] == m.files[g["onnx"]]
        assert en._profile_names(g) == ["training", "generation"]
        tr, gen = g["profiles"]["training"], g["profiles"]["generation"]
        assert set(tr) == set(gen) and "state.image" in tr
        assert tr["state.image"]["min"][0] == tr["state.image"]["max"][0] == 1  # one draw at a time
        assert gen["state.image"]["min"][0] == 1 and gen["state.image"]["max"][0] == 2  # CFG batch
        assert en.build_settings(g) == {"precision": "fp32", "refittable": True, "profiles": g["profiles"]}
    # the cache layout: <cache>/<group stem>-<key[:16]>.engine, by default under the bundle
    g0 = plan["groups"][0]
    key = en.cache_key("10.3.0", "Orin sm_87 16SM", g0["onnx_sha256"], en.build_settings(g0))
    cache = en.default_cache_dir(bundle)
    assert cache == os.path.join(bundle, "engines", "cache")
    assert en.engine_file(cache, g0, key) == os.path.join(cache, f"group_00-{key[:16]}.engine")


def test_cache_key_changes_with_each_part():
    base = ("10.3.0", "Orin sm_87 16SM", "a" * 64)
    k = en.cache_key(*base)
    assert len(k) == 64 and int(k, 16) >= 0 and en.cache_key(*base) == k  # sha256 hex, deterministic
    changed = {
        "tensorrt": en.cache_key("10.4.0", base[1], base[2]),
        "gpu": en.cache_key(base[0], "Orin sm_87 8SM", base[2]),
        "onnx": en.cache_key(base[0], base[1], "b" * 64),
        "settings": en.cache_key(*base, settings={"precision": "fp16"}),
    }
    assert len({k, *changed.values()}) == 5, changed
    s1 = {"precision": "fp32", "refittable": True, "profiles": {"training": {}}}
    s2 = {"profiles": {"training": {}}, "refittable": True, "precision": "fp32"}
    assert en.cache_key(*base, settings=s1) == en.cache_key(*base, settings=s2)  # key order does not matter
    g = {"onnx": "frozen/group_03.onnx"}
    names = {en.engine_file("/c", g, x) for x in (k, *changed.values())}
    assert len(names) == 5 and all(os.path.basename(n).startswith("group_03-") for n in names)


def test_missing_and_corrupt_plan(bundle, tmp_path):
    with pytest.raises(en.EngineError, match="no such bundle directory"):
        en.load_plan(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(en.EngineError, match=r"has no engines/plan.json: not a compiled bundle"):
        en.load_plan(str(tmp_path / "empty"))
    assert issubclass(en.EngineError, ValueError)

    good = en.load_plan(bundle)

    def bad(name, content):
        d = tmp_path / name
        (d / "engines").mkdir(parents=True)
        text = content if isinstance(content, str) else json.dumps(content)
        (d / "engines" / "plan.json").write_text(text)
        return str(d)

    with pytest.raises(en.EngineError, match="not valid JSON.*compile it again"):
        en.load_plan(bad("trunc", json.dumps(good)[:-20]))
    with pytest.raises(en.EngineError, match="plan version 7 is not supported"):
        en.load_plan(bad("ver", {**good, "version": 7}))
    with pytest.raises(en.EngineError, match="'groups' must be a list"):
        en.load_plan(bad("nogroups", {k: v for k, v in good.items() if k != "groups"}))
    g = json.loads(json.dumps(good["groups"][0]))
    del g["onnx_sha256"]
    with pytest.raises(en.EngineError, match=r"group 0: missing fields \['onnx_sha256'\]"):
        en.load_plan(bad("nosha", {**good, "groups": [g]}))
    g = json.loads(json.dumps(good["groups"][0]))
    g["precision"] = "int4"
    with pytest.raises(en.EngineError, match="precision 'int4'"):
        en.load_plan(bad("prec", {**good, "groups": [g]}))
    g = json.loads(json.dumps(good["groups"][0]))
    s = g["profiles"]["generation"]["state.image"]
    s["min"], s["max"] = s["max"], s["min"]
    with pytest.raises(en.EngineError, match="profile 'generation'.*min <= opt <= max"):
        en.load_plan(bad("minmax", {**good, "groups": [g]}))
    g = json.loads(json.dumps(good["groups"][0]))
    del g["profiles"]["training"]["state.image"]
    with pytest.raises(en.EngineError, match="the profiles name different inputs"):
        en.load_plan(bad("inputs", {**good, "groups": [g]}))


@without_trt
def test_build_engines_without_tensorrt_is_a_clear_error(bundle, capsys):
    before = sorted(os.listdir(os.path.join(bundle, "engines")))
    with pytest.raises(en.EngineError) as e:
        en.build_engines(bundle, progress=None)
    msg = str(e.value)
    assert msg.startswith("TensorRT is not available here") and "on the device with TensorRT" in msg
    assert "JetPack" in msg and "ONNX Runtime" in msg
    assert sorted(os.listdir(os.path.join(bundle, "engines"))) == before == ["plan.json"]  # nothing written
    with pytest.raises(en.EngineError, match="TensorRT is not available here"):
        en.TrtGroup(os.path.join(bundle, "engines", "group_00.engine"))
    with pytest.raises(en.EngineError, match="TensorRT is not available"):
        en.TrtGroup.from_bundle(bundle, 0)

    # the CLI, in process: exit 2 and the message
    capsys.readouterr()
    assert main(["build-engines", bundle, "--workspace-mb", "512", "--force"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgeblock build-engines: error: TensorRT is not available here") and "JetPack" in err
    assert main(["build-engines", bundle, "--workspace-mb", "0"]) == 2
    assert "--workspace-mb must be positive" in capsys.readouterr().err
    assert main(["build-engines", os.path.join(bundle, "nope")]) == 2
    assert "no such bundle directory" in capsys.readouterr().err


@without_trt
def test_build_engines_cli_process_exits_2_without_traceback(bundle):
    r = subprocess.run([sys.executable, "-m", "edgeblock.cli", "build-engines", bundle, "--cache-dir",
                        os.path.join(bundle, "elsewhere")], capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.startswith("edgeblock build-engines: error: TensorRT is not available here"), r.stderr
    assert "Traceback" not in r.stderr and "ONNX Runtime" in r.stderr
    assert not os.path.exists(os.path.join(bundle, "elsewhere"))


@without_trt
def test_engines_status_says_onnxruntime_and_why(bundle):
    st = en.engines_status(bundle)
    assert st["backend"] == "onnxruntime" and st["tensorrt"] is False and st["built"] is False
    assert "TensorRT is not available" in st["reason"] and "run on ONNX Runtime" in st["reason"]
    assert "tensorrt" in st["reason"]  # the import failure itself is quoted


def test_engines_status_matches_built_json_to_this_machine(bundle, tmp_path, monkeypatch):
    """The decision logic of engines_status on a hand-written built.json. Only the machine's identity
    (TensorRT importable, its version, the GPU) is stubbed; no engine is built or run here."""
    d = _plan_only_copy(bundle, tmp_path / "b")
    plan = en.load_plan(d)
    ident = {"trt": "10.3.0", "gpu": "Orin sm_87 16SM"}
    monkeypatch.setattr(en_status, "tensorrt_available", lambda: (True, "stub"))
    monkeypatch.setattr(en_status, "_runtime_identity", lambda: (ident["trt"], ident["gpu"]))

    st = en.engines_status(d)
    assert st["backend"] == "onnxruntime" and st["tensorrt"] and not st["built"]
    assert "no engines built" in st["reason"] and "edgeblock build-engines" in st["reason"]

    cache = en.default_cache_dir(d)
    os.makedirs(cache)
    groups = []
    for g in plan["groups"]:
        key = en.cache_key("10.3.0", "Orin sm_87 16SM", g["onnx_sha256"], en.build_settings(g))
        path = en.engine_file(cache, g, key)
        open(path, "wb").close()
        groups.append({"onnx": g["onnx"], "engine": en._rel_or_abs(d, path), "key": key, "profiles": ["training", "generation"]})
    built = {"version": 1, "status": "built", "tensorrt_version": "10.3.0", "gpu_name": "Orin sm_87 16SM", "groups": groups}
    atomic_json(os.path.join(d, en.BUILT), built)
    assert groups[0]["engine"].startswith("engines/cache/group_00-")

    st = en.engines_status(d)
    assert st["backend"] == "tensorrt" and st["built"], st
    assert st["engines"]["frozen/group_01.onnx"] == os.path.join(d, *groups[1]["engine"].split("/"))

    ident["trt"] = "10.4.0"
    st = en.engines_status(d)
    assert st["backend"] == "onnxruntime" and "built with TensorRT 10.3.0, this is TensorRT 10.4.0" in st["reason"]
    ident.update(trt="10.3.0", gpu="Orin sm_87 8SM")
    st = en.engines_status(d)
    assert st["backend"] == "onnxruntime" and "built for GPU 'Orin sm_87 16SM'" in st["reason"]
    ident["gpu"] = "Orin sm_87 16SM"

    # another ONNX file (a recompiled bundle): the key no longer matches
    other = json.loads(json.dumps(plan))
    other["groups"][1]["onnx_sha256"] = "0" * 64
    atomic_json(os.path.join(d, en.PLAN), other)
    st = en.engines_status(d)
    assert st["backend"] == "onnxruntime" and "group_01.onnx was built for another ONNX file" in st["reason"]
    # same ONNX, another precision: also another engine
    other = json.loads(json.dumps(plan))
    other["groups"][0]["precision"] = "fp16"
    atomic_json(os.path.join(d, en.PLAN), other)
    assert "another ONNX file or build settings" in en.engines_status(d)["reason"]
    atomic_json(os.path.join(d, en.PLAN), plan)
    assert en.engines_status(d)["backend"] == "tensorrt"

    os.remove(os.path.join(d, *groups[0]["engine"].split("/")))
    st = en.engines_status(d)
    assert st["backend"] == "onnxruntime" and "is missing" in st["reason"]
    with open(os.path.join(d, en.BUILT), "w") as f:
        f.write("{broken")
    assert "not valid JSON" in en.engines_status(d)["reason"]


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "x" / "a.engine"
    atomic_write(str(path), b"one")
    assert path.read_bytes() == b"one"

    def boom(*a):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        atomic_write(str(path), b"two")
    assert path.read_bytes() == b"one" and os.listdir(tmp_path / "x") == ["a.engine"]


def test_import_is_torch_and_tensorrt_free():
    code = ("import sys, edge_runtime.engines as e; "
            "bad = [m for m in ('torch', 'tensorrt', 'cuda', 'diffusers', 'transformers', 'onnx') if m in sys.modules]; "
            "assert not bad, bad; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


# ---------------------------------------------------------------------------------------------
# With TensorRT (skipped on these hosts)
# ---------------------------------------------------------------------------------------------
def _feeds(plan_group, profile, which, seed):
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(s[which]).astype(np.float32) for name, s in plan_group["profiles"][profile].items()}


@needs_trt
def test_trt_engines_match_onnxruntime(bundle, tmp_path):
    import onnxruntime as ort

    b = str(tmp_path / "bundle")
    shutil.copytree(bundle, b)
    msgs = []
    built = en.build_engines(b, progress=msgs.append)
    assert built["status"] == "built" and not any(g["cached"] for g in built["groups"])
    assert all(g["profiles"] == ["training", "generation"] for g in built["groups"])
    assert os.path.isfile(os.path.join(b, en.BUILT)) and os.path.isfile(os.path.join(b, "engines", "timing.cache"))
    st = en.engines_status(b)
    assert st["backend"] == "tensorrt", st

    plan = en.load_plan(b)
    for i, g in enumerate(plan["groups"]):
        sess = ort.InferenceSession(os.path.join(b, *g["onnx"].split("/")), providers=["CPUExecutionProvider"])
        for profile, which in (("training", "opt"), ("generation", "opt"), ("generation", "min")):
            feeds = _feeds(g, profile, which, seed=i)
            ref = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
            with en.TrtGroup.from_bundle(b, i, profile) as trt_group:
                got = trt_group.run(feeds)
            assert set(got) == set(ref)
            for name, want in ref.items():
                assert got[name].shape == want.shape and got[name].dtype == want.dtype
                rel = float(np.max(np.abs(got[name] - want)) / max(np.max(np.abs(want)), 1e-12))
                assert rel <= 1e-3, (g["onnx"], profile, which, name, rel)


@needs_trt
def test_second_build_reuses_the_cache(bundle, tmp_path):
    b = str(tmp_path / "bundle")
    shutil.copytree(bundle, b)
    cache = str(tmp_path / "cache")
    first = en.build_engines(b, cache_dir=cache, progress=None)
    mtimes = {g["engine"]: os.stat(g["engine"]).st_mtime_ns for g in first["groups"]}
    assert all(os.path.dirname(p) == cache for p in mtimes)
    second = en.build_engines(b, cache_dir=cache, progress=None)
    assert all(g["cached"] and g["build_s"] == 0 for g in second["groups"])
    assert [g["key"] for g in second["groups"]] == [g["key"] for g in first["groups"]]
    assert {g["engine"]: os.stat(g["engine"]).st_mtime_ns for g in second["groups"]} == mtimes
    forced = en.build_engines(b, cache_dir=cache, progress=None, force=True)
    assert not any(g["cached"] for g in forced["groups"])
    with en.TrtGroup(forced["groups"][0]["engine"], "training", forced["groups"][0]["profiles"]) as g:
        assert set(g.inputs) == set(en.load_plan(b)["groups"][0]["profiles"]["training"])
