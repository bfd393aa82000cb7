"""`edgeblock compile --text-parts`: the text encoder cut into text_encoder/part_NN.onnx at the ONNX level (MiniLM of
the built-in model, CLIP + T5 of a tiny FLUX pipeline, the other families' stacks), the manifest's description of
the parts, the chained parts against the whole encoder, streamed against resident encoding on the device, and the
weights step quantizing every part under its own graph key."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from edgeblock.compile import bundle as bd

from edge_runtime.manifest import load_manifest
from edge_runtime.runtime import Bundle
from edge_runtime.text import TextEncoder

pytest.importorskip("onnxruntime.training")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["a photo of sks dog on a beach", "", "a red cat in the snow"]
EXACT = 1e-5  # chained parts vs the whole encoder, both ONNX Runtime fp32 (measured 0.0 on every model here)


def _whole(spec: str, out: str) -> dict:
    """The model's whole text_encoder.onnx exported as compile does (no parts): the reference."""
    from edgeblock.compile.encoders import export_text_encoder
    from edgeblock.models.pipeline_parts import load_text_stack

    return export_text_encoder(load_text_stack(spec), out, verify=False)


def _close(got: dict, ref: dict, tol: float = EXACT) -> None:
    assert set(got) == set(ref)
    for k in ref:
        scale = max(float(np.abs(ref[k]).max()), 1e-12)
        assert float(np.abs(got[k] - ref[k]).max()) <= tol * scale, k


@pytest.fixture(scope="module")
def builtin_parts(tmp_path_factory):
    """The built-in model (MiniLM text) compiled with its text encoder in 3 parts, verified."""
    out = str(tmp_path_factory.mktemp("builtin-parts") / "bundle")
    result = bd.compile_bundle(bd.CompileOptions("builtin", out, blocks=(0, 2), lora_rank=4, train_res=32,
                                                 text_parts=3), progress=None)
    whole = str(tmp_path_factory.mktemp("builtin-whole"))
    return out, result, whole, _whole("builtin", whole)


@pytest.fixture(scope="module")
def flux_parts(tmp_path_factory):
    """A tiny FLUX pipeline (CLIP pooled + T5 states) compiled with its text encoders in 3 parts, unverified
    against torch (the parts are still checked against the whole encoder)."""
    from pipelines import make_tiny_pipeline

    root = tmp_path_factory.mktemp("flux-parts")
    pipe = make_tiny_pipeline("flux", root / "pipe")
    out = str(root / "bundle")
    result = bd.compile_bundle(bd.CompileOptions(pipe, out, blocks=(1,), lora_rank=2, text_parts=3, verify=False),
                               progress=None)
    whole = str(root / "whole")
    return out, result, whole, _whole(pipe, whole)


@pytest.mark.parametrize("which", ["builtin_parts", "flux_parts"])
def test_parts_replace_the_whole_encoder_and_encode_as_it_does(which, request):
    out, result, whole_dir, whole = request.getfixturevalue(which)
    m = load_manifest(out)  # validates graphs.text_encoder.parts and every file's sha256
    te = m.graphs["text_encoder"]
    parts = te["parts"]
    assert [p["path"] for p in parts] == [f"text_encoder/part_{k:02d}.onnx" for k in range(3)]
    assert "path" not in te and "text_encoder.onnx" not in m.files
    assert not os.path.exists(os.path.join(out, "text_encoder.onnx"))  # the bundle holds the weights once
    whole_bytes = os.path.getsize(os.path.join(whole_dir, "text_encoder.onnx"))
    for p in parts:
        assert p["path"] in m.files and p["bytes"] == os.path.getsize(os.path.join(out, p["path"]))
        assert 0 < p["bytes"] < whole_bytes and p["outputs"]
    # the first part reads tokenizer feeds and embedding lookups only; every later input is one of those or an
    # earlier part's output
    feeds = {t["ids"] for t in te["tokenizers"]} | {t["mask"] for t in te["tokenizers"] if t["mask"]}
    feeds |= {d["output"] for d in te.get("lookups", [])}
    if which == "builtin_parts":  # MiniLM's word embeddings are read row by row, in no part
        assert [(d["rows"], d["dim"]) for d in te["lookups"]] == [(30522, 384)]
        assert te["lookups"][0]["table"] in m.files and te["lookups"] == whole["lookups"]
    assert set(parts[0]["inputs"]) <= feeds
    made = set(feeds)
    for p in parts:
        assert set(p["inputs"]) <= made, p
        made |= set(p["outputs"])
    assert set(te["outputs"]) <= made
    v = result.verification["text_encoder_parts"]  # compile's own check, skipped by --no-verify only
    assert v["parts"] == 3 and (v["max_rel"] <= EXACT if which == "builtin_parts" else "max_rel" not in v)
    # the device: chained parts (resident and streamed) equal the whole encoder in ONNX Runtime
    ref = TextEncoder(whole_dir, whole).encode(PROMPTS)
    b = Bundle(out, threads=1)
    resident = b.text_encoder().encode(PROMPTS)
    _close(resident, ref)
    streamed = Bundle(out, threads=1)._encoder(streamed=True)
    assert streamed is not None and streamed.sessions == []  # nothing kept open
    # streamed sessions skip ONNX Runtime's weight prepacking (memory): other MatMul kernels, ~1e-6 relative
    _close(streamed.encode(PROMPTS), resident)


def test_generation_opens_one_part_at_a_time_in_either_mode(builtin_parts, monkeypatch):
    """Bundle.generate encodes part by part (each session released before the next opens), streamed and resident
    (edge_runtime.memory_plan.text_encoder_streamed: a resident generation keeps its DiT graphs open, not the
    parts), and both give the same image; the personalize job's encode phase streams too."""
    import onnxruntime as ort

    out = builtin_parts[0]
    live, peak, opened = [0], [0], []
    real = ort.InferenceSession

    class Counted(real):
        def __init__(self, path, *a, **kw):
            super().__init__(path, *a, **kw)
            if "text_encoder" in str(path):
                opened.append(os.path.basename(str(path)))
                live[0] += 1
                peak[0] = max(peak[0], live[0])
                self._text = True

        def __del__(self):
            if getattr(self, "_text", False):
                live[0] -= 1

    kw = dict(seed=0, steps=2, guidance=3.0)
    ref = Bundle(out, threads=1).generate("a sks star", **kw)
    monkeypatch.setattr(ort, "InferenceSession", Counted)
    b = Bundle(out, threads=1)
    img = b.generate("a sks star", streamed=True, **kw)
    assert np.abs(img.astype(int) - ref.astype(int)).max() <= 1  # the encodings' ~1e-6 kernel differences
    assert opened == ["part_00.onnx", "part_01.onnx", "part_02.onnx"] and peak[0] == 1 and live[0] == 0
    assert getattr(b, "_text", None) is None  # no resident encoder was opened

    opened.clear()
    r = Bundle(out, threads=1)
    assert r.text_streamed
    img = r.generate("a sks star", **kw)  # resident
    assert np.abs(img.astype(int) - ref.astype(int)).max() <= 1
    assert opened == ["part_00.onnx", "part_01.onnx", "part_02.onnx"] and peak[0] == 1 and live[0] == 0
    assert getattr(r, "_text", None) is None and set(r._sessions) == set(r.chain_names)  # the DiT graphs stay open
    r.generate("a red star", **kw)  # a new prompt reads the parts again
    assert len(opened) == 6 and live[0] == 0


def test_other_text_stacks_split_generically(tmp_path):
    """PixArt (T5 + mask), SD3 (two CLIPs + T5), Sana (Gemma-2 + mask): cut at the ONNX level into parts whose
    chain gives the whole encoder's outputs."""
    from edgeblock.compile.text_parts import make_parts
    from pipelines import make_tiny_pipeline

    for fam in ("pixart", "sd3", "sana"):
        pipe = make_tiny_pipeline(fam, tmp_path / fam)
        d = str(tmp_path / f"{fam}-te")
        desc = _whole(pipe, d)
        ref = TextEncoder(d, desc).encode(PROMPTS)
        r = make_parts(d, desc, 2, None)
        assert r["parts"] == 2 and r["max_rel"] <= EXACT, (fam, r)
        assert not os.path.exists(os.path.join(d, "text_encoder.onnx")) and len(desc["parts"]) == 2
        _close(TextEncoder(d, desc).encode(PROMPTS), ref)
        _close(TextEncoder(d, desc, streamed=True).encode(PROMPTS), ref)


def test_auto_parts_stay_under_the_limit(builtin_parts, tmp_path):
    """--text-parts 0: the fewest parts none above the limit (the largest frozen group), one part when the encoder
    is under it; an explicit count the encoder cannot hold is refused."""
    import onnx
    from edgeblock.compile import text_parts as tp

    whole_dir = builtin_parts[2]
    a = tp.analyse(onnx.load(os.path.join(whole_dir, "text_encoder.onnx")))
    assert tp.choose_bounds(a, 0, None) == [0, len(a.nodes)] and tp.choose_bounds(a, 0, a.total) == [0, len(a.nodes)]
    limit = int(0.6 * a.total)  # above MiniLM's word embeddings (53 % of its bytes)
    b = tp.choose_bounds(a, 0, limit)
    assert len(b) == 3 and max(tp.part_sizes(a, b)) <= limit
    assert sum(tp.part_sizes(a, b)) == a.total  # no initializer duplicated
    with pytest.raises(ValueError, match="--text-parts"):
        tp.choose_bounds(a, -1, None)
    with pytest.raises(ValueError, match="cannot be cut into 400 parts"):
        tp.plan_cuts(a, 400)
    with pytest.raises(ValueError, match="--text-parts must be an integer"):
        bd.CompileOptions("builtin", str(tmp_path / "x"), text_parts=-2)


def test_old_bundles_without_parts_still_encode(builtin_parts, tmp_path):
    """A text encoder description without parts (bundles compiled before them): resident and streamed unchanged."""
    whole_dir, whole = builtin_parts[2], builtin_parts[3]
    ref = TextEncoder(whole_dir, whole).encode(PROMPTS)
    assert TextEncoder(whole_dir, whole).session is not None
    streamed = TextEncoder(whole_dir, whole, streamed=True)
    assert streamed.sessions == []
    _close(streamed.encode(PROMPTS), ref, 0.0)  # the same session settings as before parts existed


def test_int8_weights_quantize_every_part(tmp_path, monkeypatch):
    """--weights int8 with auto parts (through the CLI): every part quantized, measured and recorded under its own
    graph key, and its session opened with int8's settings."""
    import edgeblock.models.pipeline_parts as parts
    import onnx
    from edgeblock import models
    from edgeblock.cli import main
    from pixel_models import tiny_pixel_model

    import edge_runtime.text as text

    root = tiny_pixel_model(tmp_path / "builtin")
    monkeypatch.setattr(models, "builtin_dir", lambda: root)
    monkeypatch.setattr(parts, "builtin_dir", lambda: root)
    out = str(tmp_path / "int8")
    # auto parts against a 25 MiB group cap: MiniLM's graph (41 MiB: its word embeddings are a lookup) in two
    assert main(["compile", "--model", "builtin", "--blocks", "1", "--lora-rank", "2", "--out", out, "--no-verify",
                 "--weights", "int8", "--text-parts", "0", "--max-group-mb", "25"]) == 0
    m = load_manifest(out)
    te = m.graphs["text_encoder"]
    keys = [p["path"][: -len(".onnx")] for p in te["parts"]]
    assert keys == ["text_encoder/part_00", "text_encoder/part_01"] and m.model["compile_args"]["text_parts"] == 0
    assert "text_encoder" not in m.weights["graphs"]
    # MiniLM's 6 layers' 36 matrices, split between the parts
    matrices = [m.weights["graphs"][k]["matrices"] for k in keys]
    assert sum(matrices) == 36 and min(matrices) > 0
    for p, key in zip(te["parts"], keys):
        g = m.weights["graphs"][key]
        assert m.graph_weights(key) == "int8" and np.isfinite(g["rel_error"])
        assert p["bytes"] == g["bytes"] == os.path.getsize(os.path.join(out, p["path"])) <= 25 * 2**20
        ops = {n.op_type for n in onnx.load(os.path.join(out, p["path"])).graph.node}
        assert ("DequantizeLinear" in ops) == (g["matrices"] > 0), key
        assert (g["bytes"] < 0.3 * g["bytes_fp32"]) if g["matrices"] else g["bytes"] == g["bytes_fp32"]
    applied = []
    real = text.apply_session_settings
    monkeypatch.setattr(text, "apply_session_settings", lambda o, p, e: (applied.append(p), real(o, p, e))[1])
    b = Bundle(out, threads=1)
    q = b.text_encoder().encode(PROMPTS)
    assert applied == ["int8", "int8"]
    s = Bundle(out, threads=1)._encoder(streamed=True).encode(PROMPTS)
    for k in q:
        np.testing.assert_allclose(s[k], q[k], rtol=1e-5, atol=1e-5)


def test_bad_parts_description_is_refused(builtin_parts, tmp_path):
    """The manifest refuses malformed parts; the device refuses a description whose chain misses an input."""
    from edge_runtime.manifest import ManifestError
    from edge_runtime.text import TextEncodeError

    out = builtin_parts[0]
    bad = str(tmp_path / "bad")
    shutil.copytree(out, bad)
    path = os.path.join(bad, "manifest.json")
    with open(path) as f:
        d = json.load(f)
    good = d["graphs"]["text_encoder"]["parts"]
    for parts in ([], [{"path": "x.bin", "inputs": [], "outputs": ["text"]}], [{**good[0], "outputs": []}],
                  [{**good[0], "bytes": -1}]):
        d["graphs"]["text_encoder"]["parts"] = parts
        with open(path, "w") as f:
            json.dump(d, f)
        with pytest.raises(ManifestError, match="text_encoder.parts"):
            load_manifest(bad, verify_files=False)
    desc = {**load_manifest(out).graphs["text_encoder"]}
    desc["parts"] = [desc["parts"][0], desc["parts"][2]]  # part 1's outputs never made
    with pytest.raises(TextEncodeError, match="no value for inputs"):
        TextEncoder(out, desc, streamed=True).encode(PROMPTS)


def test_parts_that_differ_from_the_whole_fail_the_compile(builtin_parts, tmp_path, monkeypatch):
    """The compile-time check: chained parts past the bound are a verification failure naming the fix."""
    from edgeblock.compile import text_parts as tp

    d = str(tmp_path / "te")
    shutil.copytree(builtin_parts[2], d)
    desc = json.loads(json.dumps(builtin_parts[3]))
    monkeypatch.setattr(tp, "PARTS_REL_BOUND", -1.0)  # any difference, even none, is past it
    with pytest.raises(RuntimeError, match="verification failed .* differ from the whole encoder .* --text-parts 1"):
        tp.make_parts(d, desc, 2, None)
