"""Bundle.encode_prompts through the on-disk prompt cache: the same feeds as the encoder's, and a later process
(a new Bundle on the same cache) answers repeated prompts without loading the text encoder."""

from __future__ import annotations

import numpy as np
import pytest


def test_cached_prompts_skip_the_text_encoder(builtin_bundle, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime.training")
    from edge_runtime import text as text_mod
    from edge_runtime.runtime import Bundle

    root = builtin_bundle[0]
    plain = Bundle(root, threads=1).encode_prompts(["a sks star", "", "a sks star on a red background"])
    first = Bundle(root, threads=1)
    first.use_prompt_cache(str(tmp_path / "cache"), 2**20)
    got = first.encode_prompts(["a sks star", "", "a sks star"])  # a repeat inside one call: encoded once
    assert first.prompt_cache.misses == 2 and first.prompt_cache.hits == 0
    assert got.keys() == plain.keys()
    for k in plain:
        np.testing.assert_allclose(got[k][:2], plain[k][:2], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(got[k][2], got[k][0])

    def no_encoder(*a, **kw):
        raise AssertionError("the text encoder was loaded for cached prompts")

    monkeypatch.setattr(text_mod, "TextEncoder", no_encoder)
    later = Bundle(root, threads=1)  # a restarted daemon on the same state folder
    later.use_prompt_cache(str(tmp_path / "cache"), 2**20)
    again = later.encode_prompts(["", "a sks star"])
    assert later.prompt_cache.hits == 2
    for k in plain:
        np.testing.assert_array_equal(again[k][0], got[k][1])
        np.testing.assert_array_equal(again[k][1], got[k][0])
    with pytest.raises(AssertionError, match="text encoder was loaded"):  # a new prompt does need it
        later.encode_prompts(["a sks star on a red background"])
