"""Shared fixtures: tiny random-initialised diffusers DiTs of every supported family."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

FAMILIES = ("flux", "sd3", "pixart", "sana")


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny models: a second intra-op thread only adds sync cost (3-10x slower on a busy
    2-core machine, measured). Opt in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def make_inputs(preset, batch=2, size=None, seed=0, t=None):
    """Random DiTInputs for a preset at latent side `size`."""
    from edgeblock.models import DiTInputs

    g = torch.Generator().manual_seed(seed)
    size = size or preset.latent_size
    ts = t if t is not None else torch.linspace(200.0, 800.0, batch)
    mask = None
    if preset.class_name in ("PixArtTransformer2DModel", "SanaTransformer2DModel"):
        mask = torch.ones(batch, preset.text_len)
        mask[:, -2:] = 0  # padding at the end, as a tokenizer leaves it
    return DiTInputs(
        latents=torch.randn(batch, preset.latent_channels, size, size, generator=g),
        timestep=ts,
        text=torch.randn(batch, preset.text_len, preset.text_dim, generator=g),
        pooled=torch.randn(batch, preset.pooled_dim, generator=g) if preset.pooled_dim else None,
        text_mask=mask,
    )


@pytest.fixture(scope="session")
def builtin_bundle(tmp_path_factory):
    """The real built-in model compiled once per test session (verified), at a structural setting rather than its
    recipe: blocks 0 and 2 trainable (a frozen gap between them), rank 4, 32 px crops. The recipe's own compile is
    test_compile.py::test_compile_writes_the_models_recipe and `make demo`."""
    pytest.importorskip("onnxruntime.training")
    from edgeblock.compile import bundle as bd

    out = str(tmp_path_factory.mktemp("builtin-bundle") / "bundle")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = bd.compile_bundle(bd.CompileOptions("builtin", out, blocks=(0, 2), lora_rank=4, train_res=32), progress=None)
    finally:
        torch.set_num_threads(n)
    return out, result
