"""`edgeblock compile` on tiny saved pipelines: bundle layout, manifest, verification numbers, reuse,
and bad input (clear error, exit 2, nothing left behind)."""

from __future__ import annotations

import json
import os

import pytest
from edgeblock.cli import main
from edgeblock.compile import bundle as bd
from pipelines import make_tiny_pipeline

from edge_runtime.manifest import ManifestError, load_manifest
from edge_runtime.runtime import Bundle

pytest.importorskip("onnxruntime.training")

REL = 1e-4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    return {f: make_tiny_pipeline(f, root / f) for f in ("flux", "pixart", "sd3", "sana")}


def _leftovers(parent, name):
    return [n for n in os.listdir(parent) if n.startswith(f".{name}.")]


def _plan(out):
    with open(os.path.join(out, "engines", "plan.json")) as f:
        return json.load(f)


def _check_bundle(out, m, verification):
    assert m.files and all(os.path.exists(os.path.join(out, *p.split("/"))) for p in m.files)
    for name, g in m.graphs.items():
        if name == "vae":
            assert g["vae_encoder"]["path"] in m.files and g["vae_decoder"]["path"] in m.files
        elif name != "training":
            assert g["path"] in m.files, name
    assert "engines/plan.json" in m.files and "trainable/checkpoint" in m.files
    assert {"trainable/training_model.onnx", "trainable/eval_model.onnx", "trainable/optimizer_model.onnx"} <= set(m.files)
    assert all(b["role"] == ("trainable" if b["index"] in m.trainable else "frozen") for b in m.blocks)
    # text encoders + tokenizers (all families) and the VAE (latent models), verified on the device path
    assert all(t["file"] in m.files for t in m.graphs["text_encoder"]["tokenizers"])
    latent = m.model["vae_downsample"] > 1
    assert ("vae" in m.graphs) == latent and ({"vae_encoder.onnx", "vae_decoder.onnx"} <= set(m.files)) == latent
    v = verification
    assert v["text_encoder"]["max_rel"] <= REL and set(v["text_encoder"]["per"]) >= {"text"}
    if latent:
        assert v["vae"]["max_rel"] <= REL
        assert {f"{g}@{r}" for g in ("vae_encoder", "vae_decoder") for r in (m.train_res, m.gen_res)} == set(v["vae"]["per"])
    assert v["ok"] and all(g["max_rel"] <= REL for g in v["graphs"].values())
    assert set(v["graphs"]) == {g["path"] for n, g in m.graphs.items() if n not in ("training", "text_encoder", "vae")}
    assert all(c["max_rel"] <= REL for c in v["chain"].values())
    lo = v["chain"]["generation_lora"]  # the ORT-trained adapter in the infer graphs acts as in torch
    assert lo["change_vs_base_rel"] > 100 * max(lo["max_rel"], 1e-7)
    assert v["training"]["loss_rel"] <= REL and v["training"]["grad_max_rel"] <= REL
    assert v["training"]["curve_max_rel"] <= 0.01
    assert m.model["verification"] == json.loads(json.dumps(v))


def test_flux_bundle_verify_reuse_and_rebuild(pipes, tmp_path, capsys):
    out = str(tmp_path / "bundle")
    opts = bd.CompileOptions(pipes["flux"], out, blocks=(1,), gen_res=64, train_res=32, lora_rank=2)
    r = bd.compile_bundle(opts)
    assert not r.up_to_date and not _leftovers(tmp_path, "bundle")
    m = load_manifest(out)
    assert m.family == "flux" and m.trainable == [1] and (m.train_res, m.gen_res) == (32, 64)
    assert [b["group"] for b in m.blocks] == ["frozen/group_00", "trainable/infer", "frozen/group_01"]
    assert m.scheduler and m.patch_schedule["f_min"] == 0.5
    # training crops' tokens at their image coordinates (the prologue's crop input), 16 px per token
    assert m.patch_schedule["crop_ids"] == "image" and "crop" in m.graphs["prologue"]["inputs"]
    assert Bundle(out).token_pixels == 16  # VAE 8 x packing 2
    assert m.lora["rank"] == 2 and m.target == "cpu"
    _check_bundle(out, m, r.verification)
    plan = _plan(out)
    assert [g["onnx"] for g in plan["groups"]] == ["frozen/group_00.onnx", "frozen/group_01.onnx"]
    g0 = plan["groups"][0]
    assert g0["refittable"] and g0["precision"] == "fp32" and "TensorRT" in plan["note"]
    assert g0["onnx_sha256"] == m.files["frozen/group_00.onnx"]
    tr, gen = g0["profiles"]["training"]["state.image"], g0["profiles"]["generation"]["state.image"]
    assert tr["min"] == tr["max"] == [1, 4, 32]  # 32 px -> latent 4 -> 2x2 tokens of width 32
    assert gen["min"][0] == 1 and gen["max"][0] == 2 and gen["opt"][1] == 16

    # unchanged model and arguments: a no-op, through the CLI too
    before = os.stat(os.path.join(out, "manifest.json")).st_mtime_ns
    assert bd.compile_bundle(opts).up_to_date
    capsys.readouterr()
    assert main(["compile", "--model", pipes["flux"], "--out", out, "--blocks", "1", "--gen-res", "64",
                 "--train-res", "32", "--lora-rank", "2"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert os.stat(os.path.join(out, "manifest.json")).st_mtime_ns == before

    # a corrupted file and other arguments: rebuilt in place
    with open(os.path.join(out, "epilogue.onnx"), "ab") as f:
        f.write(b"x")
    with pytest.raises(ManifestError, match="corrupt"):
        load_manifest(out)
    msgs = []
    r2 = bd.compile_bundle(bd.CompileOptions(pipes["flux"], out, blocks=(1,), gen_res=64, train_res=48, lora_rank=2,
                                             target="orin-nx-16gb", precision="fp16", verify=False), progress=msgs.append)
    assert not r2.up_to_date and any("broken bundle" in s for s in msgs)
    m2 = load_manifest(out)
    assert m2.target == "orin-nx-16gb" and m2.model["verification"]["run"] is False
    # the smallest crop at the image's own scale: f_min = R / S
    assert m2.train_res == 48 and m2.patch_schedule["f_min"] == 0.75 and m2.patch_schedule["train_res"] == 48
    assert _plan(out)["precision"] == "fp16"
    assert not _leftovers(tmp_path, "bundle")


def test_pixart_bundle_with_selection(pipes, tmp_path):
    out = str(tmp_path / "b")
    r = bd.compile_bundle(bd.CompileOptions(pipes["pixart"], out, lora_rank=2, select_count=1))  # 64 px / 32 px
    m = load_manifest(out)
    sel = m.model["selection"]
    assert sel["method"] == "cross-attention masking" and sel["selected"] == m.trainable and len(m.trainable) == 2
    assert (m.train_res, m.gen_res) == (32, 64)
    assert m.patch_schedule["crop_ids"] == "grid" and "crop" not in m.graphs["prologue"]["inputs"]  # no position ids
    _check_bundle(out, m, r.verification)
    with pytest.raises(ValueError, match="pixart model has none"):
        bd.compile_bundle(bd.CompileOptions(pipes["pixart"], str(tmp_path / "c"), blocks=(1,), crop_ids="image"))


@pytest.mark.parametrize("family", ["sd3", "sana"])
def test_sd3_sana_bundles(pipes, family, tmp_path):
    out = str(tmp_path / "b")
    r = bd.compile_bundle(bd.CompileOptions(pipes[family], out, blocks=(1,), lora_rank=2), progress=None)
    m = load_manifest(out)
    assert m.family == family and m.trainable == [1]
    _check_bundle(out, m, r.verification)


def _bad(argv, capsys, match):
    assert main(["compile", *argv]) == 2
    err = capsys.readouterr().err
    assert match in err, err


def test_bad_input_is_refused_and_leaves_nothing(pipes, tmp_path, capsys):
    out = tmp_path / "out"
    flux = pipes["flux"]
    unsupported = tmp_path / "unet"
    (unsupported / "transformer").mkdir(parents=True)
    (unsupported / "transformer" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    _bad(["--model", str(unsupported), "--out", str(out)], capsys, "unsupported transformer class")
    _bad(["--model", str(tmp_path / "nothing"), "--out", str(out)], capsys, "no such directory")
    _bad(["--model", flux, "--out", str(out), "--blocks", "1,7"], capsys, "out of range")
    _bad(["--model", flux, "--out", str(out), "--blocks", ","], capsys, "empty")
    _bad(["--model", flux, "--out", str(out), "--blocks", "1", "--gen-res", "60"], capsys, "not divisible by 16")
    _bad(["--model", flux, "--out", str(out), "--blocks", "1", "--gen-res", "64", "--train-res", "40"], capsys,
         "--train-res 40 is not divisible")
    _bad(["--model", flux, "--out", str(out), "--blocks", "1", "--lora-rank", "0"], capsys, "--lora-rank")
    with pytest.raises(SystemExit):
        main(["compile", "--model", flux, "--out", str(out), "--blocks", "1", "--crop-ids", "box"])
    sel = tmp_path / "sel.json"
    sel.write_text(json.dumps({"selected": [5], "num_blocks": 3}))
    _bad(["--model", flux, "--out", str(out), "--selection", str(sel)], capsys, "out of range")
    assert not out.exists() and not _leftovers(tmp_path, "out")

    other = tmp_path / "notabundle"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    _bad(["--model", flux, "--out", str(other), "--blocks", "1"], capsys, "is not a bundle")
    assert os.listdir(other) == ["keep.txt"]


def test_failure_midway_leaves_no_partial_bundle(pipes, tmp_path, monkeypatch):
    from edgeblock.compile import ort_training

    def boom(*a, **k):
        raise RuntimeError("simulated failure in the training export")

    monkeypatch.setattr(ort_training, "export_training_artifacts", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        bd.compile_bundle(bd.CompileOptions(pipes["flux"], str(tmp_path / "b"), blocks=(1,), gen_res=32, train_res=16,
                                            lora_rank=2), progress=None)
    assert os.listdir(tmp_path) == []


def test_compile_writes_the_models_recipe(tmp_path, monkeypatch):
    """With no settings given, compile takes the model's recipe (edge_runtime.recipe) and writes it into the
    manifest: a model naming the built-in recipe in its edgeblock.json gets 3/4-side crops, rank 8 and as many
    trainable blocks as the recipe selects; a model naming none gets the paper's R = S / 2."""
    import json

    import edgeblock.models.pipeline_parts as parts
    from edgeblock import models
    from edge_runtime.recipe import BUILTIN, PAPER
    from pixel_models import tiny_pixel_model

    root = tiny_pixel_model(tmp_path / "builtin")
    meta = json.load(open(f"{root}/edgeblock.json"))
    json.dump({**meta, "recipe": "builtin"}, open(f"{root}/edgeblock.json", "w"))
    monkeypatch.setattr(models, "builtin_dir", lambda: root)
    monkeypatch.setattr(parts, "builtin_dir", lambda: root)
    m = bd.compile_bundle(bd.CompileOptions("builtin", str(tmp_path / "b"), verify=False), progress=None).manifest
    assert (m.train_res, m.gen_res) == (48, 64) and m.patch_schedule["f_min"] == 0.75
    assert (m.patch_schedule["kind"], m.patch_schedule["levels"]) == ("step", 2)  # the recipe's crop schedule
    assert len(m.trainable) == min(BUILTIN.trainable_blocks, len(m.blocks)) == 3  # 1 double + 2 single blocks
    assert m.lora["rank"] == 8 and m.lora["alpha"] == 8.0
    r = m.training_recipe()
    assert (r.name, r.learning_rate, r.steps, r.batch, r.crop_ids) == ("builtin", 3e-3, 300, 4, "image")
    # an override is recorded as such; alpha keeps the recipe's alpha / rank
    m = bd.compile_bundle(bd.CompileOptions("builtin", str(tmp_path / "c"), blocks=(1,), lora_rank=2, train_res=32,
                                            verify=False), progress=None).manifest
    assert m.lora["rank"] == 2 and m.lora["alpha"] == 2.0 and m.training_recipe().train_res_fraction == 0.5
    assert m.training_recipe().trainable_blocks == 1 and m.training_recipe().learning_rate == 3e-3
    json.dump(meta, open(f"{root}/edgeblock.json", "w"))  # no recipe named: the paper's; --top-k sets selection's k
    assert main(["compile", "--model", "builtin", "--out", str(tmp_path / "d"), "--top-k", "1", "--no-verify"]) == 0
    m = load_manifest(str(tmp_path / "d"))
    assert m.train_res == 32 and m.lora["rank"] == PAPER.lora_rank and m.training_recipe().name == "paper"
    assert len(m.trainable) == 1 and m.model["selection"]["selected"] == m.trainable
    assert m.training_recipe().trainable_blocks == 1


def test_builtin_layout_exports_text_encoder(tmp_path, monkeypatch, capsys):
    """`builtin` (here a tiny pixel-space model laid out like it): MiniLM text_encoder.onnx + tokenizer.json."""
    import edgeblock.models.pipeline_parts as parts
    from edgeblock import models
    from pixel_models import tiny_pixel_model

    root = tiny_pixel_model(tmp_path / "builtin")
    monkeypatch.setattr(models, "builtin_dir", lambda: root)
    monkeypatch.setattr(parts, "builtin_dir", lambda: root)
    out = tmp_path / "b"
    assert main(["compile", "--model", "builtin", "--out", str(out), "--blocks", "1", "--lora-rank", "2"]) == 0
    assert "text_encoder.onnx" in capsys.readouterr().out
    m = load_manifest(str(out))
    assert (m.train_res, m.gen_res) == (32, 64) and m.model["source"] == "builtin"
    assert {"text_encoder.onnx", "tokenizer.json"} <= set(m.files) and "vae" not in m.graphs
    assert m.graphs["text_encoder"]["tokenizers"][0]["max_length"] == 32
    v = m.model["verification"]
    assert v["text_encoder"]["max_rel"] <= REL and all(c["max_rel"] <= REL for c in v["chain"].values())
    # the device path: tokenizers + ORT give the states the DiT was verified with
    from edgeblock.compile import onnx_export as ox
    from edgeblock.models.pipeline_parts import BuiltinTextStack
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    tok.enable_padding(length=32)
    tok.enable_truncation(32)
    e = tok.encode("a photo of sks dog")
    import numpy as np

    from edge_runtime.text_lookup import lookup

    # the word embeddings are a lookup (edge_runtime/text_lookup.py): the graph takes their rows as an input
    (emb,) = m.graphs["text_encoder"]["lookups"]
    assert emb["ids"] == "input_ids" and emb["table"] in m.files
    ids = np.array([e.ids], np.int64)
    feeds = {"input_ids": ids, emb["output"]: lookup(str(out / emb["table"]), ids),
             "attention_mask": np.array([e.attention_mask], np.int64)}
    got = ox.run_onnx(str(out / "text_encoder.onnx"), feeds)
    ref = BuiltinTextStack(32).encode(["a photo of sks dog"])
    assert ox.compare(got, {"text": ref.text, "pooled": ref.pooled}).max_rel <= REL


def test_real_builtin_model_compiles_and_verifies(builtin_bundle):
    """The committed built-in model end to end: every graph, the chain, the training step, the text encoder."""
    out, r = builtin_bundle
    m = load_manifest(out)
    assert m.family == "flux" and m.model["source"] == "builtin" and m.trainable == [0, 2]
    assert (m.train_res, m.gen_res) == (32, 64) and m.model["vae_downsample"] == 1
    # the built-in model's recipe (edge_runtime.recipe.BUILTIN) with the fixture's overrides recorded
    assert m.patch_schedule["f_min"] == 0.5 and m.patch_schedule["crop_ids"] == "image"
    assert (m.recipe["name"], m.recipe["learning_rate"], m.recipe["batch"], m.recipe["train_res_fraction"]) == (
        "builtin", 3e-3, 4, 0.5)
    _check_bundle(out, m, r.verification)
    plan = _plan(out)
    assert [g["blocks"] for g in plan["groups"]] == [[1], [3, 4, 5]]
    # the blocks' joint attention over 256 image + 32 text tokens at 64 px, in two query slices
    # (compile/attention_chunks.py), verified against torch with the rest of the chain
    cut = {k: g.get("attention_chunks") for k, g in m.graphs.items() if g.get("kind") in ("group", "trainable_infer")}
    assert len(cut) == 4 and set(cut.values()) == {2}, cut  # groups [1], [3-5]; runs [0], [2]
