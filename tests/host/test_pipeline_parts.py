"""Text stacks, latent codecs and the full chain on tiny saved diffusers pipelines of every family."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from edgeblock.models import ModelError, load_model
from edgeblock.models.base import DiTInputs
from edgeblock.models.pipeline_parts import LatentCodec, load_codec, load_text_stack
from pipelines import FAMILIES, make_tiny_pipeline

PROMPT = "a photo of sks dog"
PROMPTS = [PROMPT, "a dog"]
IMAGE_SIDE = {"flux": 32, "sd3": 32, "pixart": 32, "sana": 64}
SCALING = {"flux": (0.3611, 0.1159), "sd3": (1.5305, 0.0609), "pixart": (0.13025, 0.0), "sana": (0.41407, 0.0)}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """family (+ dropped components) -> a tiny pipeline directory, built once per module."""
    built: dict[tuple, str] = {}

    def get(family: str, drop: tuple[str, ...] = ()) -> str:
        key = (family, drop)
        if key not in built:
            path = tmp_path_factory.mktemp(f"{family}{'-no-' + '-'.join(drop) if drop else ''}")
            built[key] = make_tiny_pipeline(family, path, drop=drop)
        return built[key]

    return get


@pytest.fixture(scope="module")
def stacks(pipeline):
    """family -> its loaded text stack (loaded once per module)."""
    cache: dict[str, object] = {}

    def get(family: str):
        if family not in cache:
            cache[family] = load_text_stack(pipeline(family))
        return cache[family]

    return get


def _transformer_config(path: str) -> dict:
    with open(os.path.join(path, "transformer", "config.json")) as f:
        return json.load(f)


# ---- loading -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_load_model_reads_the_saved_pipeline(pipeline, family):
    m = load_model(pipeline(family))
    assert m.adapter.family == family
    assert m.objective.kind == ("epsilon" if family == "pixart" else "flow")
    assert m.adapter.latent_channels == load_codec(pipeline(family)).channels


# ---- text ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_shapes_match_the_transformer_and_are_deterministic(pipeline, stacks, family):
    path = pipeline(family)
    cfg = _transformer_config(path)
    stack = stacks(family)
    c = stack.encode(PROMPTS)
    if family == "flux":
        assert c.text.shape == (2, 128, cfg["joint_attention_dim"])
        assert c.pooled.shape == (2, cfg["pooled_projection_dim"]) and c.mask is None
    elif family == "sd3":
        assert c.text.shape == (2, 77 + 256, cfg["joint_attention_dim"])
        assert c.pooled.shape == (2, cfg["pooled_projection_dim"]) and c.mask is None
    else:
        assert c.text.shape == (2, stack.length, cfg["caption_channels"]) and c.pooled is None
        assert c.mask.shape == (2, stack.length) and c.mask.dtype == torch.float32
        n = [len(stack.tokenizer(stack.preprocess(p)).input_ids) for p in PROMPTS]
        assert c.mask.sum(1).tolist() == n and n[0] > n[1]
        assert c.mask[0, : n[0]].eq(1).all() and c.mask[0, n[0] :].eq(0).all()  # right padding
    assert c.text.dtype == torch.float32
    assert (stack.text_dim, stack.pooled_dim) == (c.text.shape[-1], None if c.pooled is None else c.pooled.shape[-1])
    assert stack.length == c.text.shape[1]
    assert not torch.equal(c.text[0], c.text[1])
    again = load_text_stack(path).encode(PROMPTS)  # a fresh load gives the same numbers
    assert torch.equal(c.text, again.text)
    for a, b in ((c.pooled, again.pooled), (c.mask, again.mask)):
        assert (a is None and b is None) or torch.equal(a, b)
    one = stack.encode([PROMPTS[1]])  # batching does not change a prompt's encoding
    assert torch.allclose(one.text[0], c.text[1], atol=1e-5)


def _pipeline_encode(family: str, path: str):
    """What the diffusers pipeline class itself computes (the reference for the composition)."""
    import diffusers

    if family == "flux":
        pipe = diffusers.FluxPipeline.from_pretrained(path, local_files_only=True)
        text, pooled, _ = pipe.encode_prompt(PROMPTS, None, max_sequence_length=128)
        return text, pooled, None
    if family == "sd3":
        pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(path, local_files_only=True)
        text, _, pooled, _ = pipe.encode_prompt(
            PROMPTS, None, None, do_classifier_free_guidance=False, max_sequence_length=256
        )
        return text, pooled, None
    if family == "pixart":
        pipe = diffusers.PixArtSigmaPipeline.from_pretrained(path, local_files_only=True)
        text, mask, _, _ = pipe.encode_prompt(
            PROMPTS, do_classifier_free_guidance=False, clean_caption=False, max_sequence_length=120
        )
        return text, None, mask
    pipe = diffusers.SanaPipeline.from_pretrained(path, local_files_only=True)
    text, mask, _, _ = pipe.encode_prompt(
        PROMPTS, do_classifier_free_guidance=False, clean_caption=False, max_sequence_length=300,
        complex_human_instruction=None,
    )
    return text, None, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_equals_the_diffusers_pipeline(pipeline, stacks, family):
    c = stacks(family).encode(PROMPTS)
    with torch.no_grad():  # as the pipelines' __call__ runs it (grad mode picks other attention kernels)
        text, pooled, mask = _pipeline_encode(family, pipeline(family))
    torch.testing.assert_close(c.text, text.float(), atol=1e-6, rtol=0)
    if pooled is None:
        assert c.pooled is None
    else:
        torch.testing.assert_close(c.pooled, pooled.float(), atol=1e-6, rtol=0)
    if mask is None:
        assert c.mask is None
    else:
        assert torch.equal(c.mask, mask.float())


def _decode_positions(stack, family: str, prompt: str, positions) -> str:
    """The text of the tokens at `positions` of the sequence encode() builds for `prompt`."""
    def ids(tok, text, n):
        return tok(text, padding="max_length", max_length=n, truncation=True).input_ids

    if family == "flux":
        seq = ids(stack.t5_tokenizer, prompt, stack.max_sequence_length)
        return stack.t5_tokenizer.decode([seq[i] for i in positions]).strip()
    if family == "sd3":
        clip = ids(stack.tokenizers[0], prompt, stack.clip_length)
        t5 = ids(stack.t5_tokenizer, prompt, stack.max_sequence_length)
        a = stack.tokenizers[0].decode([clip[i] for i in positions if i < stack.clip_length]).strip()
        b = stack.t5_tokenizer.decode([t5[i - stack.clip_length] for i in positions if i >= stack.clip_length]).strip()
        assert a == b, (a, b)  # the same word in both parts
        return a
    seq = ids(stack.tokenizer, stack.preprocess(prompt), stack.length)
    return stack.tokenizer.decode([seq[i] for i in positions]).strip()


@pytest.mark.parametrize("family", FAMILIES)
def test_positions_index_the_word_tokens(stacks, family):
    stack = stacks(family)
    both = stack.positions(PROMPT, ["sks", "dog"])
    sks, dog = stack.positions(PROMPT, ["sks"]), stack.positions(PROMPT, ["dog"])
    assert both == tuple(sorted(set(sks) | set(dog))) and sks and dog
    assert _decode_positions(stack, family, PROMPT, sks) == "sks"
    assert _decode_positions(stack, family, PROMPT, dog) == "dog"
    per_part = 2 if family == "sd3" else 1
    assert len(sks) == 2 * per_part  # the tokenizers split "sks" into two tokens: a span
    assert all(0 <= i < stack.length for i in both)
    if family == "sd3":
        assert sum(i < stack.clip_length for i in both) == sum(i >= stack.clip_length for i in both)
    # Words match case-insensitively, whole words only.
    assert stack.positions(PROMPT, ["SKS", "Dog"]) == both
    upper = "A photo of SKS Dog"
    assert stack.positions(upper, ["sks", "DOG"]) == stack.positions(upper, ["SKS", "dog"])
    with pytest.raises(ValueError, match=r"'cat'.*a photo of sks dog"):
        stack.positions(PROMPT, ["cat"])
    with pytest.raises(ValueError, match="'sk'"):
        stack.positions(PROMPT, ["sk"])


def test_sd3_without_t5_uses_zeros_like_the_pipeline(pipeline):
    path = pipeline("sd3", ("text_encoder_3",))
    assert not os.path.exists(os.path.join(path, "text_encoder_3"))
    stack = load_text_stack(path, max_sequence_length=16)
    c = stack.encode(PROMPTS)
    cfg = _transformer_config(path)
    assert c.text.shape == (2, 77 + 16, cfg["joint_attention_dim"])
    assert c.text[:, 77:].eq(0).all() and c.text[:, :77, 16 + 24 :].eq(0).all()  # T5 zeros, CLIP zero-padded
    assert all(i < 77 for i in stack.positions(PROMPT, ["sks", "dog"]))
    import diffusers

    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(
        path, local_files_only=True, text_encoder_3=None, tokenizer_3=None
    )
    with torch.no_grad():
        text, _, pooled, _ = pipe.encode_prompt(
            PROMPTS, None, None, do_classifier_free_guidance=False, max_sequence_length=16
        )
    torch.testing.assert_close(c.text, text, atol=1e-6, rtol=0)
    torch.testing.assert_close(c.pooled, pooled, atol=1e-6, rtol=0)


def test_max_sequence_length_sets_the_text_length(pipeline):
    stack = load_text_stack(pipeline("pixart"), max_sequence_length=12)
    c = stack.encode(PROMPTS)
    assert c.text.shape[1] == c.mask.shape[1] == 12 == stack.length
    with pytest.raises(ValueError, match="max_sequence_length"):
        load_text_stack(pipeline("pixart"), max_sequence_length=0)


def test_builtin_text_stack_and_codec():
    stack = load_text_stack("builtin")
    c = stack.encode(PROMPTS)
    assert c.text.shape == (2, 32, 384) and c.pooled.shape == (2, 384) and c.mask is None
    assert (stack.text_dim, stack.pooled_dim) == (384, 384)
    pos = stack.positions(PROMPT, ["sks", "dog"])
    seq = stack.encoder.tokenizer(PROMPT, padding="max_length", max_length=32).input_ids
    assert stack.encoder.tokenizer.decode([seq[i] for i in stack.positions(PROMPT, ["dog"])]) == "dog"
    assert stack.encoder.tokenizer.decode([seq[i] for i in stack.positions(PROMPT, ["sks"])]).replace(" ", "") == "sks"
    assert set(pos) == set(stack.encoder.token_spans(PROMPT, "sks")) | set(stack.encoder.token_spans(PROMPT, "dog"))
    codec = load_codec("builtin")
    assert (codec.downsample, codec.channels) == (1, 3)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.equal(codec.encode(x), x) and torch.equal(codec.decode(x), x)


# ---- latents -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_codec_shapes_and_scaling(pipeline, family):
    codec = load_codec(pipeline(family))
    down = 32 if family == "sana" else 8
    assert codec.downsample == down and codec.channels == load_model(pipeline(family)).adapter.latent_channels
    assert (codec.scaling, codec.shift) == pytest.approx(SCALING[family])
    s = IMAGE_SIDE[family]
    x = torch.rand(1, 3, s, s, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = codec.encode(x)
    assert z.shape == (1, codec.channels, s // down, s // down) and z.dtype == torch.float32
    assert torch.equal(z, codec.encode(x))  # deterministic (posterior mean)
    raw = codec.vae.encode(x)
    raw = raw.latent_dist.mean if family != "sana" else raw.latent
    torch.testing.assert_close(z, (raw - SCALING[family][1]) * SCALING[family][0])
    y = codec.decode(z)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    with pytest.raises(ValueError, match="divisible"):
        codec.encode(torch.zeros(1, 3, down + 1, down + 1))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        codec.encode(torch.zeros(1, 4, s, s))


# ---- the whole chain -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_text_and_latents_through_the_block_graph_equal_the_saved_transformer(pipeline, stacks, family):
    import diffusers

    path = pipeline(family)
    m = load_model(path)
    cond = stacks(family).encode(PROMPTS)
    codec = load_codec(path)
    s = IMAGE_SIDE[family]
    g = torch.Generator().manual_seed(1)
    x0 = codec.encode(torch.rand(2, 3, s, s, generator=g) * 2 - 1)
    t = torch.tensor([0.3, 0.8])
    latents = m.objective.noisy(x0, torch.randn(x0.shape, generator=g), t)
    x = DiTInputs(latents, m.objective.timestep(t), cond.text, cond.pooled, cond.mask)

    a = m.adapter
    with torch.no_grad():
        state, ctx = a.prologue(x)
        for i in range(a.num_blocks):
            state = a.run_block(a.build_block(i), i, state, ctx)
        got = a.epilogue(state, ctx)
        model = getattr(diffusers, a.model_class.__name__).from_pretrained(
            os.path.join(path, "transformer"), local_files_only=True
        ).eval()
        want = a.reference_forward(model, x)
    assert got.shape == latents.shape
    assert (got - want).abs().max().item() <= 1e-5


# ---- errors --------------------------------------------------------------------------------------


def test_directory_without_model_index(pipeline, tmp_path):
    d = tmp_path / "no_index"
    shutil.copytree(os.path.join(pipeline("pixart"), "transformer"), d / "transformer")
    for load in (load_text_stack, load_codec):
        with pytest.raises(ValueError, match=r"no model_index\.json \(found: \['transformer'\]\)"):
            load(str(d))
    with pytest.raises(ValueError, match="no such directory"):
        load_text_stack(str(tmp_path / "nowhere"))


def test_missing_text_encoder_folder(pipeline, tmp_path):
    d = tmp_path / "flux"
    shutil.copytree(pipeline("flux"), d)
    shutil.rmtree(d / "text_encoder_2")
    with pytest.raises(ModelError, match=r"lists 'text_encoder_2' \(T5EncoderModel\) but there is no text_encoder_2/"):
        load_text_stack(str(d))
    assert load_codec(str(d)).channels == 16  # the VAE is still there


def test_unknown_family(pipeline, tmp_path):
    d = tmp_path / "unet"
    shutil.copytree(pipeline("pixart"), d)
    index = json.loads((d / "model_index.json").read_text())
    index["transformer"] = ["diffusers", "UNet2DConditionModel"]
    (d / "model_index.json").write_text(json.dumps(index))
    for load in (load_text_stack, load_codec):
        with pytest.raises(ValueError, match=r"'UNet2DConditionModel'.*FluxTransformer2DModel"):
            load(str(d))
    del index["transformer"]
    (d / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="no transformer"):
        load_text_stack(str(d))


def test_bad_arguments(stacks):
    stack = stacks("pixart")
    with pytest.raises(ValueError, match="list of strings"):
        stack.encode(PROMPT)
    with pytest.raises(ValueError, match="words"):
        stack.positions(PROMPT, "sks")
    assert isinstance(load_codec("builtin"), LatentCodec)
