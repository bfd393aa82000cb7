"""The one adapter file (edge_runtime.adapter_file): what the daemon stores and exports, what `edgeblock generate
--adapter` reads, and what a diffusers pipeline's load_lora_weights reads."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load, save

from edge_runtime import adapter_file as af

MODULES = ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.1.proj_mlp")


def _lora(rank: int = 3, modules=MODULES, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for m in modules:
        out[f"{m}.lora_A.weight"] = rng.standard_normal((rank, 16)).astype(np.float32)
        out[f"{m}.lora_B.weight"] = rng.standard_normal((24, rank)).astype(np.float32)
    return out


def test_round_trip_carries_diffusers_and_edgeblock_metadata():
    w = _lora()
    data = af.encode(w, alpha=6.0, info={"token": "sks", "class_noun": "star", "bundle_sha256": "ab" * 32})
    f = af.decode(data)
    assert (f.rank, f.alpha, f.scale) == (3, 6.0, 2.0) and f.modules == sorted(MODULES)
    assert set(f.weights) == set(w) and all(np.array_equal(f.weights[k], w[k]) for k in w)
    assert f.info["token"] == "sks" and f.info["format"] == af.FORMAT and f.info["dtype"] == "fp32"
    # what diffusers reads: transformer-prefixed PEFT names, format "pt", its LoraConfig in lora_adapter_metadata
    meta = af._header_metadata(data)
    assert meta["format"] == "pt"
    assert json.loads(meta["lora_adapter_metadata"]) == {
        "transformer.r": 3, "transformer.lora_alpha": 6.0, "transformer.target_modules": sorted(MODULES)}
    assert sorted(load(data)) == sorted(f"transformer.{k}" for k in w)


def test_fp16_files_hold_half_precision_and_read_back_as_float32():
    w = _lora()
    data = af.encode(w, alpha=3.0, dtype="fp16")
    assert {v.dtype for v in load(data).values()} == {np.dtype(np.float16)}
    f = af.decode(data)
    assert {v.dtype for v in f.weights.values()} == {np.dtype(np.float32)} and f.info["dtype"] == "fp16"
    err = max(float(np.abs(f.weights[k] - w[k]).max() / np.abs(w[k]).max()) for k in w)
    assert 0 < err < 1e-3  # rounded to fp16, nothing else
    assert sum(v.nbytes for v in load(data).values()) * 2 == sum(v.nbytes for v in w.values())


def test_earlier_adapter_files_still_read():
    w = _lora(rank=2)
    prefixed = {f"transformer.{k}": v for k, v in w.items()}
    store_v1 = save(w, metadata={"format": "edgeblock-lora", "adapter_id": "0" * 32})  # the store's, no alpha
    host_v1 = save(w, metadata={"format": "edgeblock-lora/1", "info": "{}",
                                "lora": json.dumps({"rank": 2, "alpha": 5.0, "targets": ["to_q", "proj_mlp"]})})
    export_v1 = save(prefixed, metadata={"format": "pt", "lora_rank": "2", "lora_alpha": "4.0"})
    assert af.decode(store_v1).alpha == 2.0 and af.decode(store_v1, default_alpha=7.0).alpha == 7.0
    assert af.decode(host_v1).alpha == 5.0 and af.decode(export_v1).alpha == 4.0
    for data in (store_v1, host_v1, export_v1):
        f = af.decode(data)
        assert f.rank == 2 and all(np.array_equal(f.weights[k], w[k]) for k in w)


@pytest.mark.parametrize("weights,msg", [
    ({"a.lora_A.weight": np.zeros((2, 4), np.float32)}, "needs both lora_A and lora_B"),
    ({"a.lora_A.weight": np.zeros((2, 4), np.float32), "a.lora_B.weight": np.zeros((4, 3), np.float32)},
     "do not share a rank"),
    ({"a.weight": np.zeros((2, 4), np.float32)}, "not a LoRA tensor"),
    ({**_lora(rank=2, modules=("a",)), **_lora(rank=3, modules=("b",))}, "different ranks"),
])
def test_bad_adapters_are_refused_with_the_reason(weights, msg):
    with pytest.raises(af.AdapterFileError, match=msg):
        af.encode(weights, alpha=1.0)
    with pytest.raises(af.AdapterFileError, match=msg):
        af.decode(save(weights))


def test_unreadable_files_are_clear_errors(tmp_path):
    with pytest.raises(af.AdapterFileError, match="not a safetensors file"):
        af.decode(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(af.AdapterFileError, match="no adapter file"):
        af.load(str(tmp_path / "missing.safetensors"))
    with pytest.raises(af.AdapterFileError, match="only transformer LoRA"):
        af.decode(save({f"text_encoder.{k}": v for k, v in _lora().items()}))
    with pytest.raises(af.AdapterFileError, match="dtype"):
        af.encode(_lora(), alpha=1.0, dtype="int8")


# ---------------------------------------------------------------------------------------------
# diffusers reads the file: load_lora_weights gives the prediction the bundle's graphs give
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def family_bundles(tmp_path_factory):
    pytest.importorskip("onnxruntime.training")
    from edgeblock.compile import bundle as bd
    from pipelines import make_tiny_pipeline

    root = tmp_path_factory.mktemp("adapter-file")
    out = {}
    for fam in ("flux", "sd3", "pixart", "sana"):
        pipe = make_tiny_pipeline(fam, root / f"{fam}-pipe")
        bd.compile_bundle(bd.CompileOptions(pipe, str(root / fam), blocks=(1,), lora_rank=2, verify=False), progress=None)
        out[fam] = (pipe, str(root / fam))
    return out


@pytest.mark.parametrize("family", ["flux", "sd3", "pixart", "sana"])
def test_diffusers_load_lora_weights_gives_the_bundles_prediction(family, family_bundles, tmp_path):
    import torch
    from diffusers import DiffusionPipeline

    from edge_runtime.runtime import Bundle
    from edgeblock.compile.bundle import PROMPT
    from edgeblock.models import load_model
    from edgeblock.models.pipeline_parts import load_text_stack

    pipe_dir, bundle_dir = family_bundles[family]
    b = Bundle(bundle_dir, threads=1)
    rng = np.random.default_rng(3)
    lora = {n: (0.2 * rng.standard_normal(d["shape"])).astype(np.float32)
            for g in b.graphs.values() if g.get("kind") == "trainable_infer" for n, d in g["lora"].items()}
    assert lora and b.manifest.lora["rank"] == 2
    path = str(tmp_path / "adapter.safetensors")
    af.save(path, lora, alpha=float(b.manifest.lora["alpha"]), info={"token": "sks"})

    pipe = DiffusionPipeline.from_pretrained(pipe_dir)
    if hasattr(pipe, "load_lora_weights"):
        pipe.load_lora_weights(path)
    else:  # diffusers 0.42 has no LoRA loader for PixArt-Sigma (neither pipeline nor transformer): PEFT itself, with the
        # LoraConfig diffusers would build from the file's lora_adapter_metadata
        from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

        meta = json.loads(af._header_metadata(open(path, "rb").read())["lora_adapter_metadata"])
        cfg = LoraConfig(**{k.removeprefix("transformer."): v for k, v in meta.items()})
        inject_adapter_in_model(cfg, pipe.transformer)
        sd = {k.removeprefix("transformer."): torch.from_numpy(v) for k, v in load(open(path, "rb").read()).items()}
        assert not set_peft_model_state_dict(pipe.transformer, sd).unexpected_keys
    loaded = load_model(pipe_dir)
    cond = load_text_stack(pipe_dir).encode([PROMPT])
    side = b.manifest.gen_res // b.downsample
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, b.latent_channels, side, side, generator=g)
    guidance = 1.0 if b.model.get("guidance_embeds") else None
    x = cond.inputs(latents, loaded.objective.timestep(torch.full((1,), 0.6)), guidance)
    with torch.no_grad():
        ref = loaded.adapter.reference_forward(pipe.transformer.eval(), x).numpy()
        base = loaded.adapter.reference_forward(DiffusionPipeline.from_pretrained(pipe_dir).transformer.eval(), x).numpy()
    feeds = {"latents": x.latents.numpy(), "timestep": x.timestep.numpy(), "text": x.text.numpy()}
    for k in ("pooled", "text_mask", "guidance"):
        if getattr(x, k) is not None:
            feeds[k] = getattr(x, k).numpy().astype(np.float32)
    ours = b.predict(feeds, lora)
    effect = float(np.abs(ref - base).max())
    rel = float(np.abs(ours - ref).max()) / float(np.abs(ref).max())
    print(f"{family}: LoRA effect {effect:.2e}, bundle vs diffusers rel {rel:.1e}")
    assert effect > 1e-2 * float(np.abs(base).max())  # the LoRA does change the prediction
    assert rel <= 1e-4


def test_torch_side_save_and_load_use_the_same_file(tmp_path):
    """The host's save_adapter/load_adapter (eval, `edgeblock generate --adapter`) write and read this format."""
    import torch

    from edgeblock.generate import load_adapter, save_adapter
    from edgeblock.method.lora import LoRASpec

    w = _lora(rank=2)
    path = str(tmp_path / "a.safetensors")
    save_adapter(path, {k: torch.from_numpy(v) for k, v in w.items()}, LoRASpec(2, 4.0), {"steps": 9})
    f = af.load(path)
    assert (f.rank, f.alpha, f.info["steps"]) == (2, 4.0, 9)
    state, spec = load_adapter(path)
    assert (spec.rank, spec.alpha) == (2, 4.0) and spec.targets == ("attn.to_q", "proj_mlp")
    assert all(torch.equal(state[k], torch.from_numpy(v)) for k, v in w.items())
    with pytest.raises(ValueError, match="not a readable safetensors|not a safetensors"):
        (tmp_path / "junk.safetensors").write_bytes(b"junk" * 10)
        load_adapter(str(tmp_path / "junk.safetensors"))
    with pytest.raises(FileNotFoundError):
        load_adapter(str(tmp_path / "nope.safetensors"))


def test_adapter_file_module_is_a_device_contract():
    """numpy + safetensors only: importing it pulls in no host framework."""
    import subprocess
    import sys

    code = ("import sys, edge_runtime.adapter_file as a\n"
            "bad = [m for m in ('torch', 'diffusers', 'transformers', 'onnxruntime') if m in sys.modules]\n"
            "assert not bad, bad\n")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/device/ -> the repository
    subprocess.run([sys.executable, "-c", code], check=True, cwd=repo)
