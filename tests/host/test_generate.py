"""`edgeblock generate` without a server: a PNG of the model's size, deterministic per seed, adapters applied."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from edgeblock.cli import main
from PIL import Image
from pixel_models import builtin_present, tiny_pixel_model

PROMPT = "a large red star on a blue background, center"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_pixel_model(tmp_path_factory.mktemp("pixel-model"))


def _gen(tmp_path, model, name, *extra):
    out = tmp_path / name
    rc = main(["generate", "--model", model, "--prompt", PROMPT, "-o", str(out), "--steps", "2", *extra])
    assert rc == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (64, 64) and im.mode == "RGB"
        return np.asarray(im)


def test_generate_writes_a_png_deterministic_per_seed(tmp_path, model_dir, capsys):
    a = _gen(tmp_path, model_dir, "a.png", "--seed", "3")
    b = _gen(tmp_path, model_dir, "b.png", "--seed", "3")
    c = _gen(tmp_path, model_dir, "c.png", "--seed", "4")
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert "64x64" in capsys.readouterr().out


def test_generate_applies_an_adapter_as_the_trained_blocks_would(tmp_path, model_dir):
    from edgeblock.builtin.pipeline import generate
    from edgeblock.builtin.text import MiniLMTextEncoder
    from edgeblock.eval.run import swapped_blocks
    from edgeblock.generate import load_transformer, save_adapter, seeded_noise
    from edgeblock.method.lora import LoRASpec, randomize_lora
    from edgeblock.method.train import Conditioning, MethodConfig, Trainer
    from edgeblock.models import load_model

    loaded = load_model(model_dir)
    spec = LoRASpec(rank=2, alpha=4.0)
    cond = Conditioning(torch.zeros(1, 32, 384), torch.zeros(1, 384))
    images = np.zeros((1, 64, 64, 3), np.float32)
    tr = Trainer(loaded, MethodConfig("blockskip", blocks=(1, 2), lora=spec), cond, images)
    randomize_lora(tr.net, seed=0, scale=0.2)
    path = tmp_path / "adapter.safetensors"
    save_adapter(str(path), tr.lora_state(), spec)

    plain = _gen(tmp_path, model_dir, "plain.png", "--seed", "1")
    tuned = _gen(tmp_path, model_dir, "tuned.png", "--seed", "1", "--adapter", str(path))
    assert not np.array_equal(plain, tuned)
    transformer = load_transformer(model_dir)
    blocks = {int(i): b for i, b in tr.net.blocks.items()}
    with swapped_blocks(transformer, loaded.adapter.block_names, blocks):
        # the daemon's seed rule (edge_runtime.sampler.initial_noise), as `edgeblock generate` draws
        direct = generate(transformer, MiniLMTextEncoder(), [PROMPT], seed=1, steps=2, guidance=3.0,
                          noise=seeded_noise(1, 1, 64))[0]
    assert np.abs(direct.astype(int) - tuned.astype(int)).max() <= 1


def test_generate_errors_are_clear(tmp_path, model_dir, capsys):
    rc = main(["generate", "--model", model_dir, "--prompt", PROMPT, "-o", str(tmp_path / "x.png"),
               "--adapter", str(tmp_path / "none.safetensors")])
    assert rc == 2 and "no adapter file" in capsys.readouterr().err
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    rc = main(["generate", "--model", model_dir, "--prompt", PROMPT, "-o", str(tmp_path / "x.png"),
               "--adapter", str(tmp_path / "bad.safetensors")])
    assert rc == 2 and "not a safetensors file" in capsys.readouterr().err
    (tmp_path / "pipe" / "transformer").mkdir(parents=True)
    rc = main(["generate", "--model", str(tmp_path / "pipe"), "--prompt", PROMPT, "-o", str(tmp_path / "x.png")])
    assert rc == 2 and "only the built-in model family" in capsys.readouterr().err
    rc = main(["generate", "--model", model_dir, "--prompt", PROMPT, "-o", str(tmp_path / "no" / "x.png")])
    assert rc == 2 and "no such directory" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.skipif(not builtin_present(), reason="the built-in model's weights are not in this checkout yet")
def test_generate_with_the_builtin_model(tmp_path):
    a = _gen(tmp_path, "builtin", "a.png", "--seed", "0")
    assert _gen(tmp_path, "builtin", "b.png", "--seed", "0").tolist() == a.tolist()
