"""The daemon on a latent-space bundle (tiny PixArt pipeline: T5 text, DDIM, AutoencoderKL).

Personalize goes through the VAE encoder, Generate through DDIM and the VAE decoder; the pieces are
checked against torch/diffusers elsewhere (compile verification, test_device_sampler); here the
daemon composes them end to end.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from daemon_util import DaemonProc, subject_pngs
from PIL import Image

pytest.importorskip("onnxruntime.training")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pixart_bundle(tmp_path_factory):
    from edgeblock.compile import bundle as bd
    from pipelines import make_tiny_pipeline

    root = tmp_path_factory.mktemp("latent")
    pipe = make_tiny_pipeline("pixart", root / "pipe")
    out = str(root / "bundle")
    bd.compile_bundle(bd.CompileOptions(pipe, out, blocks=(1,), lora_rank=2), progress=None)
    return out


def _img(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_latent_bundle_personalize_and_generate_over_grpc(pixart_bundle, tmp_path):
    from edgeblock.client import EdgeClient

    from edge_runtime.api import kind_name
    from edge_runtime.manifest import load_manifest
    from edge_runtime.runtime import Bundle

    m = load_manifest(pixart_bundle)
    assert m.model["sampler"]["kind"] == "ddim" and {"vae_encoder.onnx", "vae_decoder.onnx"} <= set(m.files)
    d = DaemonProc(pixart_bundle, str(tmp_path / "state"))
    try:
        with EdgeClient(d.address, timeout=120) as c:
            c.wait_ready(30)
            info = c.info()
            assert info.family == "pixart" and info.gen_res == m.gen_res
            events = list(c.personalize(subject_pngs(2), token="sks", class_noun="ring", steps=4, learning_rate=5e-3,
                                        seed=1))
            kinds = [kind_name(e.kind) for e in events]
            assert kinds[-1] == "DONE", events[-1]
            losses = [e.loss for e in events if kind_name(e.kind) == "STEP"]
            assert len(losses) == 4 and all(np.isfinite(losses))
            aid = events[-1].adapter_id
            base = c.generate("a sks ring on a blue background", steps=3, seed=2)
            tuned = c.generate("a sks ring on a blue background", steps=3, seed=2, adapter_id=aid)
            small = c.generate("a sks ring", steps=2, seed=2, size=m.train_res)
        a, b = _img(base.png), _img(tuned.png)
        assert a.shape == (m.gen_res, m.gen_res, 3) and _img(small.png).shape == (m.train_res, m.train_res, 3)
        assert a.std() > 0 and np.abs(a.astype(int) - b.astype(int)).max() > 0  # an image, and the adapter acts
        # the daemon's image is the runtime's: DDIM over the chain, decoded by the VAE graph, same seed
        rt = Bundle(pixart_bundle, threads=1)
        ref = rt.generate("a sks ring on a blue background", seed=2, steps=3, guidance=info.defaults.guidance)
        assert np.abs(ref.astype(int) - a.astype(int)).max() <= 1
    finally:
        assert d.terminate() == 0
