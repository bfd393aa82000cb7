"""Tiny random-initialised diffusers pipelines (FLUX, SD3, PixArt-Sigma, Sana) saved to disk for tests.

Every component is the real class its pipeline ships with, at a tiny size; the
tokenizers are the real tokenizer classes over a small fixed vocabulary in which
"sks" splits into two tokens. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import torch

FAMILIES = ("flux", "sd3", "pixart", "sana")

# Words the tokenizers know as whole tokens; "sks" is deliberately split (s + ks).
WORDS = ("a", "photo", "of", "dog", "in", "the", "snow", "on", "beach", "cat", "red", "sks")
SPLIT = {"sks": ("s", "ks")}
LETTERS = "abcdefghijklmnopqrstuvwxyz"

# Real latent channel counts: FLUX/SD3 16-channel VAE, PixArt 4 (SDXL VAE), Sana 32 (DC-AE f32c32).
LATENT_CHANNELS = {"flux": 16, "sd3": 16, "pixart": 4, "sana": 32}


# ---- tokenizers ---------------------------------------------------------------


def _chain_merges(pieces: list[str], merges: list[tuple[str, str]], vocab: dict[str, int]) -> None:
    """Left-to-right merges that build the concatenation of `pieces` (one BPE word)."""
    cur = pieces[0]
    vocab.setdefault(cur, len(vocab))
    for p in pieces[1:]:
        vocab.setdefault(p, len(vocab))
        if (cur, p) not in merges:
            merges.append((cur, p))
        cur += p
        vocab.setdefault(cur, len(vocab))


def clip_tokenizer():
    """CLIPTokenizer (byte-level BPE, `</w>` word ends, lower-casing), model_max_length 77."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    merges: list[tuple[str, str]] = []
    for c in LETTERS:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    for w in WORDS:
        if w in SPLIT:
            head, tail = SPLIT[w]
            vocab.setdefault(head, len(vocab))
            _chain_merges(list(tail[:-1]) + [tail[-1] + "</w>"], merges, vocab)
        else:
            _chain_merges(list(w[:-1]) + [w[-1] + "</w>"], merges, vocab)
    # As in the real vocabulary, the special tokens come last (eos has the largest id).
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def t5_tokenizer():
    """T5Tokenizer (Unigram, metaspace), no extra ids."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    for w in WORDS:
        if w in SPLIT:
            head, tail = SPLIT[w]
            pieces += [("▁" + head, -3.0), (tail, -3.0)]
        else:
            pieces.append(("▁" + w, -3.0))
    have = {p for p, _ in pieces}
    pieces += [(c, -10.0) for c in LETTERS if c not in have]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def gemma_tokenizer():
    """GemmaTokenizer (BPE over "▁"-joined text, adds <bos>), as Sana's Gemma-2 uses."""
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "▁": 5}
    merges: list[tuple[str, str]] = []
    for c in LETTERS:
        vocab.setdefault(c, len(vocab))
    for w in WORDS:
        if w in SPLIT:
            head, tail = SPLIT[w]
            _chain_merges(["▁"] + list(head), merges, vocab)
            _chain_merges(list(tail), merges, vocab)
            continue
        _chain_merges(["▁"] + list(w), merges, vocab)  # mid-prompt form first (higher rank)
        _chain_merges(list(w), merges, vocab)  # prompt-initial form
    return GemmaTokenizer(
        vocab=vocab, merges=merges, model_max_length=300, add_bos_token=True, add_eos_token=False, padding_side="right"
    )


# ---- text encoders ------------------------------------------------------------


def clip_text(tok, hidden: int, heads: int, projection_dim: int | None, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=heads, max_position_embeddings=77, projection_dim=projection_dim or hidden,
        hidden_act="quick_gelu", bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    cls = CLIPTextModel if projection_dim is None else CLIPTextModelWithProjection
    return cls(cfg).eval()


def t5_encoder(tok, d_model: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=len(tok), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=0,
        is_encoder_decoder=False, use_cache=False,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(cfg).eval()


def gemma2_encoder(tok, hidden: int, seed: int):
    from transformers import Gemma2Config, Gemma2Model

    cfg = Gemma2Config(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
        sliding_window=16, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, attention_dropout=0.0,
    )
    torch.manual_seed(seed)
    return Gemma2Model(cfg).eval()


# ---- VAEs, transformers, schedulers -------------------------------------------


def kl_vae(latent_channels: int, scaling: float, shift: float | None, seed: int):
    """AutoencoderKL with four blocks (8x down), eight channels each."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, sample_size=64,
        scaling_factor=scaling, shift_factor=shift, use_quant_conv=shift is None, use_post_quant_conv=shift is None,
    ).eval()


def dc_vae(latent_channels: int, scaling: float, seed: int):
    """AutoencoderDC with six stages (32x down), as Sana's DC-AE f32 (the last stage as wide as the latent)."""
    from diffusers import AutoencoderDC

    torch.manual_seed(seed)
    return AutoencoderDC(
        in_channels=3, latent_channels=latent_channels, attention_head_dim=8,
        encoder_block_types="ResBlock", decoder_block_types="ResBlock",
        encoder_block_out_channels=(8, 8, 8, 8, 16, 32), decoder_block_out_channels=(8, 8, 8, 8, 16, 32),
        encoder_layers_per_block=(1,) * 6, decoder_layers_per_block=(1,) * 6,
        encoder_qkv_multiscales=((),) * 6, decoder_qkv_multiscales=((),) * 6, scaling_factor=scaling,
    ).eval()


def tiny_transformer(class_name: str, config: dict, seed: int):
    """A real diffusers transformer, every tensor perturbed (diffusers zero-inits some layers)."""
    import diffusers

    torch.manual_seed(seed)
    model = getattr(diffusers, class_name)(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _build(family: str, seed: int, drop: Iterable[str]) -> object:
    import diffusers

    drop = set(drop)
    c = LATENT_CHANNELS[family]
    if family == "flux":
        tok, tok2 = clip_tokenizer(), t5_tokenizer()
        te = clip_text(tok, hidden=32, heads=4, projection_dim=None, seed=seed + 1)
        te2 = t5_encoder(tok2, d_model=32, seed=seed + 2)
        tr = tiny_transformer("FluxTransformer2DModel", dict(
            patch_size=1, in_channels=4 * c, num_layers=1, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=te2.config.d_model,
            pooled_projection_dim=te.config.hidden_size, axes_dims_rope=[4, 6, 6],
        ), seed + 3)
        parts = dict(
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
            vae=kl_vae(c, 0.3611, 0.1159, seed + 4), text_encoder=te, tokenizer=tok,
            text_encoder_2=te2, tokenizer_2=tok2, transformer=tr,
        )
        cls = diffusers.FluxPipeline
    elif family == "sd3":
        tok, tok2, tok3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
        te = clip_text(tok, hidden=16, heads=2, projection_dim=8, seed=seed + 1)  # "CLIP-L"
        te2 = clip_text(tok2, hidden=24, heads=2, projection_dim=16, seed=seed + 2)  # "CLIP-G"
        te3 = None if "text_encoder_3" in drop else t5_encoder(tok3, d_model=48, seed=seed + 3)
        tr = tiny_transformer("SD3Transformer2DModel", dict(
            sample_size=8, patch_size=2, in_channels=c, out_channels=c, num_layers=2, attention_head_dim=8,
            num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=48,
            pooled_projection_dim=te.config.projection_dim + te2.config.projection_dim, pos_embed_max_size=16,
            dual_attention_layers=(0,), qk_norm="rms_norm",
        ), seed + 4)
        parts = dict(
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=kl_vae(c, 1.5305, 0.0609, seed + 5),
            text_encoder=te, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok2,
            text_encoder_3=te3, tokenizer_3=None if te3 is None else tok3, transformer=tr,
        )
        cls = diffusers.StableDiffusion3Pipeline
    elif family == "pixart":
        tok = t5_tokenizer()
        te = t5_encoder(tok, d_model=32, seed=seed + 1)
        tr = tiny_transformer("PixArtTransformer2DModel", dict(
            sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
            caption_channels=te.config.d_model, in_channels=c, cross_attention_dim=24, out_channels=2 * c,
            attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
            norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=1,
        ), seed + 2)
        parts = dict(
            scheduler=diffusers.DPMSolverMultistepScheduler(
                beta_schedule="linear", beta_start=0.0001, beta_end=0.02, prediction_type="epsilon"
            ),
            vae=kl_vae(c, 0.13025, None, seed + 3), text_encoder=te, tokenizer=tok, transformer=tr,
        )
        cls = diffusers.PixArtSigmaPipeline
    elif family == "sana":
        tok = gemma_tokenizer()
        te = gemma2_encoder(tok, hidden=32, seed=seed + 1)
        tr = tiny_transformer("SanaTransformer2DModel", dict(
            patch_size=1, in_channels=c, out_channels=c, num_layers=2, attention_head_dim=4, num_attention_heads=4,
            num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
            caption_channels=te.config.hidden_size, sample_size=4,
        ), seed + 2)
        parts = dict(
            scheduler=diffusers.DPMSolverMultistepScheduler(
                prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
            ),
            vae=dc_vae(c, 0.41407, seed + 3), text_encoder=te, tokenizer=tok, transformer=tr,
        )
        cls = diffusers.SanaPipeline
    else:
        raise ValueError(f"unknown family {family!r}; tiny pipelines exist for {', '.join(FAMILIES)}")
    return cls(**parts)


def make_tiny_pipeline(family: str, path, seed: int = 0, drop: Iterable[str] = ()) -> str:
    """Write a tiny `family` pipeline into directory `path` (created) as save_pretrained lays it out.

    drop: optional components to leave out (None in model_index.json), e.g. ("text_encoder_3",) for SD3
    without T5. Returns the directory as a string.
    """
    path = os.fspath(path)
    pipe = _build(family, seed, drop)
    pipe.save_pretrained(path, safe_serialization=True)
    if drop:  # save_pretrained leaves None components out; record them as [null, null] as optional ones are
        index_path = os.path.join(path, "model_index.json")
        with open(index_path) as f:
            index = json.load(f)
        index.update({name: [None, None] for name in drop})
        with open(index_path, "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
    return path
