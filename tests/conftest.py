"""Shared fixtures: tiny random-initialised diffusers DiTs of every supported family.

Here at tests/ so they reach every subfolder (device/, host/, shared/); the helper modules in tests/helpers/
are put on sys.path so tests import them by bare name (`from pipelines import make_tiny_pipeline`)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers"))
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


@pytest.fixture(scope="session")
def builtin_bundle(tmp_path_factory):
    """The real built-in model compiled once per test session (verified), at a structural setting rather than its
    recipe: blocks 0 and 2 trainable (a frozen gap between them), rank 4, 32 px crops, and a 64x48 generation size. The recipe's own compile is
    host/test_compile.py::test_compile_writes_the_models_recipe and `make demo`."""
    pytest.importorskip("onnxruntime.training")
    from edgeblock.compile import bundle as bd

    out = str(tmp_path_factory.mktemp("builtin-bundle") / "bundle")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = bd.compile_bundle(bd.CompileOptions("builtin", out, blocks=(0, 2), lora_rank=4, train_res=32,
                                                     gen_sizes=((64, 48),)), progress=None)
    finally:
        torch.set_num_threads(n)
    return out, result
