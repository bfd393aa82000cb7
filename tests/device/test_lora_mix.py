"""edge_runtime.lora_mix: several adapters at once through a graph with a symbolic LoRA rank equal the sum of their
scaled deltas: checked on the built-in bundle's trainable inference graph."""

from __future__ import annotations

import numpy as np
import pytest

from edge_runtime.lora_mix import is_lora_b, mix

pytest.importorskip("onnxruntime.training")


def test_mix_math():
    shapes = {"m.lora_A.weight": (2, 3), "m.lora_B.weight": (4, 2)}
    rng = np.random.default_rng(0)
    a = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    b = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    m = mix([(a, 0.5), (b, -2.0)], shapes)
    assert m["m.lora_A.weight"].shape == (4, 3) and m["m.lora_B.weight"].shape == (4, 4)
    delta = m["m.lora_B.weight"] @ m["m.lora_A.weight"]
    want = 0.5 * a["m.lora_B.weight"] @ a["m.lora_A.weight"] - 2.0 * b["m.lora_B.weight"] @ b["m.lora_A.weight"]
    np.testing.assert_allclose(delta, want, rtol=1e-5, atol=1e-5)
    single = mix([(a, 0.0)], shapes)
    assert not single["m.lora_B.weight"].any() and single["m.lora_A.weight"].shape == (2, 3)
    assert is_lora_b("x.lora_B.weight") and not is_lora_b("x.lora_A.weight")
    with pytest.raises(ValueError):
        mix([], shapes)


def test_two_adapters_through_the_graph_equal_their_sum(builtin_bundle):
    from edge_runtime.runtime import Bundle

    b = Bundle(builtin_bundle[0], threads=1)
    assert b.lora_rank_dynamic
    rng = np.random.default_rng(1)
    one = {n: rng.standard_normal(s).astype(np.float32) * 0.2 for n, s in b.lora_shapes.items()}
    zero_b = {n: (np.zeros_like(a) if is_lora_b(n) else rng.standard_normal(a.shape).astype(np.float32))
              for n, a in one.items()}
    import onnxruntime as ort

    name = next(n for n in b.chain_names if b.graphs[n].get("lora"))
    sess = ort.InferenceSession(b.graph_path(name), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    feeds = {}
    for i in sess.get_inputs():
        if i.name not in b.lora_shapes:
            sizes = {"batch": 1, "tokens": 4, "text_tokens": 4, "rope_tokens": 8}  # rope: text + image tokens
            shape = [d if isinstance(d, int) else sizes.get(d, 4) for d in i.shape]
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)

    def run(lora):
        return sess.run(None, {**feeds, **{k: v for k, v in lora.items() if k in names}})[0]

    ref = run(one)
    np.testing.assert_allclose(run(mix([(one, 0.5), (one, 0.5)], b.lora_shapes)), ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(run(mix([(one, 1.0), (zero_b, 3.0)], b.lora_shapes)), ref, rtol=1e-4, atol=1e-4)
    assert np.abs(run(mix([(one, 1.0), (one, 1.0)], b.lora_shapes)) - ref).max() > 1e-3  # twice the delta differs
