"""The text encoders and the latent codec of a model, loaded component by component (no pipeline class).

`load_text_stack` composes a family's encoders as its diffusers pipeline's encode_prompt does and finds
the subject/class-noun token spans; `load_codec` wraps its VAE with the pipeline's latent scaling.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import ModelError, builtin_dir
from .conditioning import Conditioning

# model_index.json's transformer class -> family
FAMILY_OF_TRANSFORMER: dict[str, str] = {
    "FluxTransformer2DModel": "flux",
    "SD3Transformer2DModel": "sd3",
    "PixArtTransformer2DModel": "pixart",
    "SanaTransformer2DModel": "sana",
}
# Default text length of the text stream (for SD3: the T5 part; the CLIP part is the tokenizer's 77).
DEFAULT_MAX_SEQUENCE_LENGTH: dict[str, int] = {"flux": 128, "sd3": 256, "pixart": 120, "sana": 300}
BUILTIN_MAX_LENGTH = 32


# ---- the pipeline directory ---------------------------------------------------------------------


@dataclass
class PipelineDir:
    """A local diffusers pipeline directory: its model_index.json and the family it holds."""

    root: str
    index: dict[str, Any]
    family: str

    @property
    def pipeline_class(self) -> str:
        return str(self.index.get("_class_name", "?"))

    def entry(self, name: str) -> tuple[str, str] | None:
        """(library, class) of a component, or None where the pipeline has none."""
        e = self.index.get(name)
        if not isinstance(e, (list, tuple)) or len(e) != 2 or e[0] is None or e[1] is None:
            return None
        return str(e[0]), str(e[1])

    def component(self, name: str, required: bool = True) -> str | None:
        """The folder of component `name`, None if model_index.json lists none (and it is optional)."""
        if self.entry(name) is None:
            if required:
                listed = sorted(k for k in self.index if not k.startswith("_") and self.entry(k) is not None)
                raise ModelError(
                    f"{self.pipeline_class} at {self.root}: model_index.json has no {name!r} "
                    f"(components: {listed}); a {self.family} pipeline needs it"
                )
            return None
        path = os.path.join(self.root, name)
        if not os.path.isdir(path):
            raise ModelError(
                f"{self.pipeline_class} at {self.root}: model_index.json lists {name!r} "
                f"({self.entry(name)[1]}) but there is no {name}/ folder (found: {sorted(os.listdir(self.root))})"
            )
        return path

    def transformer_config(self) -> dict[str, Any]:
        path = os.path.join(self.component("transformer"), "config.json")
        if not os.path.exists(path):
            found = sorted(os.listdir(os.path.dirname(path)))
            raise ModelError(f"{self.root}: transformer/ has no config.json (found: {found})")
        with open(path) as f:
            return json.load(f)


def is_builtin(spec: str) -> bool:
    """`builtin`, its directory, or a directory laid out like it (a pixel-space FLUX transformer/ with
    MiniLM text: edgeblock.json says pixel_space, and there is no model_index.json)."""
    if spec == "builtin":
        return True
    if not os.path.isdir(spec):
        return False
    if os.path.realpath(spec) == os.path.realpath(builtin_dir()):
        return True
    meta = os.path.join(spec, "edgeblock.json")
    if os.path.exists(os.path.join(spec, "model_index.json")) or not os.path.exists(meta):
        return False
    try:
        with open(meta) as f:
            return bool(json.load(f).get("pixel_space")) and os.path.isdir(os.path.join(spec, "transformer"))
    except (OSError, ValueError):
        return False


def read_pipeline(spec: str) -> PipelineDir:
    """Read model_index.json of a local pipeline directory and name its family."""
    if not os.path.isdir(spec):
        raise ModelError(
            f"model {spec!r}: no such directory. Give `builtin` or a local diffusers pipeline directory "
            "(as DiffusionPipeline.save_pretrained writes it: model_index.json, transformer/, text encoders ...)"
        )
    path = os.path.join(spec, "model_index.json")
    if not os.path.exists(path):
        raise ModelError(
            f"model {spec!r}: no model_index.json (found: {sorted(os.listdir(spec))}); the text encoders and VAE "
            "are read from a full diffusers pipeline directory as DiffusionPipeline.save_pretrained writes it"
        )
    with open(path) as f:
        try:
            index = json.load(f)
        except json.JSONDecodeError as e:
            raise ModelError(f"model {spec!r}: model_index.json is not valid JSON ({e})") from e
    tr = index.get("transformer")
    cls = tr[1] if isinstance(tr, (list, tuple)) and len(tr) == 2 else None
    if cls not in FAMILY_OF_TRANSFORMER:
        components = sorted(k for k in index if not k.startswith("_"))
        what = f"transformer class {cls!r}" if cls else f"no transformer (components: {components})"
        raise ModelError(
            f"model {spec!r} ({index.get('_class_name', '?')}): {what}; supported transformer classes: "
            f"{', '.join(sorted(FAMILY_OF_TRANSFORMER))}"
        )
    return PipelineDir(spec, index, FAMILY_OF_TRANSFORMER[cls])


def _load_transformers_model(pipe: PipelineDir, name: str, dtype: torch.dtype) -> nn.Module:
    import transformers

    path = pipe.component(name)
    lib, cls_name = pipe.entry(name)
    cls = getattr(transformers, cls_name, None) if lib == "transformers" else None
    if cls is None:
        raise ModelError(f"{pipe.root}/{name}: class {lib}.{cls_name} is not a transformers model class")
    model = cls.from_pretrained(path, local_files_only=True, dtype=dtype)
    return model.eval().requires_grad_(False)


def _load_tokenizer(pipe: PipelineDir, name: str):
    from transformers import AutoTokenizer

    path = pipe.component(name)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if not getattr(tok, "is_fast", False):
        raise ModelError(
            f"{pipe.root}/{name}: {type(tok).__name__} is not a fast tokenizer; token spans need offsets "
            "(return_offsets_mapping): supply tokenizer.json"
        )
    return tok


# ---- token spans ---------------------------------------------------------------------------------


def _word_spans(text: str, word: str) -> list[tuple[int, int]]:
    """Character spans of `word` in `text`: case-insensitive, whole words only."""
    pattern = r"(?<!\w)" + re.escape(word) + r"(?!\w)"
    return [(m.start(), m.end()) for m in re.finditer(pattern, text, flags=re.IGNORECASE)]


def _token_positions(tokenizer, text: str, words: list[str], max_length: int) -> dict[str, list[int]]:
    """Per word, the positions of tokens overlapping it, in the padded/truncated sequence encode() feeds."""
    enc = tokenizer(
        text, padding="max_length", max_length=max_length, truncation=True, return_offsets_mapping=True
    )
    offsets = enc["offset_mapping"]
    out: dict[str, list[int]] = {}
    for w in words:
        spans = _word_spans(text, w)
        out[w] = [i for i, (a, b) in enumerate(offsets) if b > a and any(a < e and b > s for s, e in spans)]
    return out


def _check_words(words: list[str]) -> list[str]:
    if isinstance(words, str):
        raise ValueError(f"words must be a list of words, got the string {words!r}")  # noqa: TRY004
    bad = [w for w in words if not isinstance(w, str) or not w.strip()]
    if bad or not words:
        raise ValueError(f"words must be non-empty strings, got {list(words)!r}")
    return [w.strip() for w in words]


def _merge(found: dict[str, list[int]], words: list[str], prompt: str, what: str) -> tuple[int, ...]:
    missing = [w for w in words if not found.get(w)]
    if missing:
        raise ValueError(
            f"word {missing[0]!r} not found in prompt {prompt!r}: no {what} token covers it "
            "(whole-word, case-insensitive match, within the encoded length)"
        )
    return tuple(sorted({i for w in words for i in found[w]}))


# ---- text stacks ---------------------------------------------------------------------------------


class TextStack:
    """A family's text encoders, composed as its diffusers pipeline composes them.

    encode(prompts) -> Conditioning with text (B, L, text_dim) float32, pooled (B, pooled_dim) or
    None, mask (B, L) float 1/0 or None. positions(prompt, words) -> indices into those L tokens.
    """

    family: str = ""

    @property
    def text_dim(self) -> int:
        raise NotImplementedError

    @property
    def pooled_dim(self) -> int | None:
        raise NotImplementedError

    @property
    def length(self) -> int:
        """L, the text sequence length the transformer receives."""
        raise NotImplementedError

    def encode(self, prompts: list[str]) -> Conditioning:
        raise NotImplementedError

    def positions(self, prompt: str, words: list[str]) -> tuple[int, ...]:
        raise NotImplementedError

    @staticmethod
    def _prompts(prompts: list[str]) -> list[str]:
        if isinstance(prompts, str):
            raise ValueError(f"prompts must be a list of strings, got the string {prompts!r}")  # noqa: TRY004
        prompts = list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
        return prompts


class BuiltinTextStack(TextStack):
    """The built-in model: MiniLM token states (the text stream) and its pooled embedding; no mask."""

    family = "builtin"

    def __init__(self, max_length: int = BUILTIN_MAX_LENGTH):
        from ..builtin.text import EMBED_DIM, MiniLMTextEncoder

        self.encoder = MiniLMTextEncoder()
        self.max_length = max_length
        self._dim = EMBED_DIM

    @property
    def text_dim(self) -> int:
        return self._dim

    @property
    def pooled_dim(self) -> int:
        return self._dim

    @property
    def length(self) -> int:
        return self.max_length

    def encode(self, prompts: list[str]) -> Conditioning:
        states, pooled = self.encoder.encode(self._prompts(prompts), max_length=self.max_length)
        return Conditioning(states.float(), pooled.float(), None)

    def positions(self, prompt: str, words: list[str]) -> tuple[int, ...]:
        words = _check_words(words)
        found = _token_positions(self.encoder.tokenizer, prompt, words, self.max_length)
        return _merge(found, words, prompt, "MiniLM")


def _clip_length(tokenizer, model: nn.Module) -> int:
    """The CLIP pad length: the tokenizer's model_max_length (77), bounded by the position table."""
    n = int(model.config.max_position_embeddings)
    m = getattr(tokenizer, "model_max_length", None)
    return min(int(m), n) if isinstance(m, int) and m > 0 else n


class FluxTextStack(TextStack):
    """FluxPipeline: pooled = CLIP pooler_output (77 tokens); text = T5 last_hidden_state, no mask."""

    family = "flux"

    def __init__(self, pipe: PipelineDir, max_sequence_length: int, dtype: torch.dtype = torch.float32):
        self.clip_tokenizer = _load_tokenizer(pipe, "tokenizer")
        self.t5_tokenizer = _load_tokenizer(pipe, "tokenizer_2")
        self.clip = _load_transformers_model(pipe, "text_encoder", dtype)
        self.t5 = _load_transformers_model(pipe, "text_encoder_2", dtype)
        self.clip_length = _clip_length(self.clip_tokenizer, self.clip)
        self.max_sequence_length = max_sequence_length

    @property
    def text_dim(self) -> int:
        return int(self.t5.config.d_model)

    @property
    def pooled_dim(self) -> int:
        return int(self.clip.config.hidden_size)

    @property
    def length(self) -> int:
        return self.max_sequence_length

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        prompts = self._prompts(prompts)
        ids = self.clip_tokenizer(
            prompts, padding="max_length", max_length=self.clip_length, truncation=True, return_tensors="pt"
        ).input_ids
        pooled = self.clip(ids, output_hidden_states=False).pooler_output
        ids2 = self.t5_tokenizer(
            prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True, return_tensors="pt"
        ).input_ids
        text = self.t5(ids2, output_hidden_states=False)[0]
        return Conditioning(text.float(), pooled.float(), None)

    def positions(self, prompt: str, words: list[str]) -> tuple[int, ...]:
        words = _check_words(words)
        found = _token_positions(self.t5_tokenizer, prompt, words, self.max_sequence_length)
        return _merge(found, words, prompt, "T5")


class SD3TextStack(TextStack):
    """StableDiffusion3Pipeline: [CLIP-L | CLIP-G penultimate states, zero-padded to T5 width ; T5 states].

    pooled = [CLIP-L text_embeds | CLIP-G text_embeds]. Without text_encoder_3, the T5 part is zeros
    of width joint_attention_dim, as the pipeline does.
    """

    family = "sd3"

    def __init__(self, pipe: PipelineDir, max_sequence_length: int, dtype: torch.dtype = torch.float32):
        self.tokenizers = [_load_tokenizer(pipe, "tokenizer"), _load_tokenizer(pipe, "tokenizer_2")]
        self.clips = [_load_transformers_model(pipe, name, dtype) for name in ("text_encoder", "text_encoder_2")]
        self.clip_length = _clip_length(self.tokenizers[0], self.clips[0])  # the pipeline uses tokenizer's for both
        self.max_sequence_length = max_sequence_length
        self.dtype = dtype
        if pipe.entry("text_encoder_3") is not None:
            self.t5 = _load_transformers_model(pipe, "text_encoder_3", dtype)
            self.t5_tokenizer = _load_tokenizer(pipe, "tokenizer_3")
            self._t5_dim = int(self.t5.config.d_model)
        else:
            self.t5, self.t5_tokenizer = None, None
            self._t5_dim = int(pipe.transformer_config().get("joint_attention_dim", 4096))
        clip_dim = sum(int(m.config.hidden_size) for m in self.clips)
        if clip_dim > self._t5_dim:
            raise ModelError(
                f"{pipe.root}: CLIP widths sum to {clip_dim}, more than the T5 width {self._t5_dim}; "
                "SD3 pads the CLIP states up to the T5 width"
            )

    @property
    def text_dim(self) -> int:
        return self._t5_dim

    @property
    def pooled_dim(self) -> int:
        return sum(int(m.config.projection_dim) for m in self.clips)

    @property
    def length(self) -> int:
        return self.clip_length + self.max_sequence_length

    def _clip(self, k: int, prompts: list[str]) -> tuple[Tensor, Tensor]:
        ids = self.tokenizers[k](
            prompts, padding="max_length", max_length=self.clip_length, truncation=True, return_tensors="pt"
        ).input_ids
        out = self.clips[k](ids, output_hidden_states=True)
        return out.hidden_states[-2], out[0]  # penultimate layer, projected text_embeds

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        prompts = self._prompts(prompts)
        (h1, p1), (h2, p2) = self._clip(0, prompts), self._clip(1, prompts)
        clip = torch.cat([h1, h2], dim=-1)
        if self.t5 is None:
            t5 = torch.zeros(len(prompts), self.max_sequence_length, self._t5_dim, dtype=clip.dtype)
        else:
            ids = self.t5_tokenizer(
                prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                add_special_tokens=True, return_tensors="pt",
            ).input_ids
            t5 = self.t5(ids)[0]
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        text = torch.cat([clip, t5.to(clip.dtype)], dim=-2)
        return Conditioning(text.float(), torch.cat([p1, p2], dim=-1).float(), None)

    def positions(self, prompt: str, words: list[str]) -> tuple[int, ...]:
        words = _check_words(words)
        found: dict[str, list[int]] = {w: [] for w in words}
        for tok in self.tokenizers:  # both CLIPs sit at the same positions (channel concat)
            for w, pos in _token_positions(tok, prompt, words, self.clip_length).items():
                found[w] += pos
        if self.t5_tokenizer is not None:
            for w, pos in _token_positions(self.t5_tokenizer, prompt, words, self.max_sequence_length).items():
                found[w] += [self.clip_length + i for i in pos]
        return _merge(found, words, prompt, "CLIP or T5")


class MaskedTextStack(TextStack):
    """One encoder with an attention mask: PixArt (T5) and Sana (Gemma-2), prompts lower-cased and stripped.

    Sana: the complex human instruction that SanaPipeline.__call__ prepends by default is not
    applied (it is an inference-time prompt rewrite; encode_prompt without it is what is composed here).
    """

    def __init__(self, pipe: PipelineDir, max_sequence_length: int, dtype: torch.dtype = torch.float32):
        self.family = pipe.family
        self.tokenizer = _load_tokenizer(pipe, "tokenizer")
        if self.family == "sana":
            self.tokenizer.padding_side = "right"  # as SanaPipeline sets it
        self.encoder = _load_transformers_model(pipe, "text_encoder", dtype)
        self.max_sequence_length = max_sequence_length

    @staticmethod
    def preprocess(prompt: str) -> str:
        """The pipelines' _text_preprocessing with clean_caption=False."""
        return prompt.lower().strip()

    @property
    def text_dim(self) -> int:
        cfg = self.encoder.config
        return int(getattr(cfg, "d_model", None) or cfg.hidden_size)

    @property
    def pooled_dim(self) -> None:
        return None

    @property
    def length(self) -> int:
        return self.max_sequence_length

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        prompts = [self.preprocess(p) for p in self._prompts(prompts)]
        tok = self.tokenizer(
            prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
            add_special_tokens=True, return_tensors="pt",
        )
        text = self.encoder(tok.input_ids, attention_mask=tok.attention_mask)[0]
        return Conditioning(text.float(), None, tok.attention_mask.float())

    def positions(self, prompt: str, words: list[str]) -> tuple[int, ...]:
        words = _check_words(words)
        found = _token_positions(self.tokenizer, self.preprocess(prompt), words, self.max_sequence_length)
        return _merge(found, words, prompt, type(self.tokenizer).__name__)


def load_text_stack(
    spec: str, max_sequence_length: int | None = None, dtype: torch.dtype = torch.float32
) -> TextStack:
    """The text stack of `builtin` or a local diffusers pipeline directory (weights loaded as `dtype`).

    max_sequence_length: the text-stream length (FLUX/SD3 T5 part, PixArt, Sana); None: the family default.
    """
    if max_sequence_length is not None and (not isinstance(max_sequence_length, int) or max_sequence_length < 1):
        raise ValueError(f"max_sequence_length must be a positive int, got {max_sequence_length!r}")
    if is_builtin(spec):
        return BuiltinTextStack(max_sequence_length or BUILTIN_MAX_LENGTH)
    pipe = read_pipeline(spec)
    n = max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH[pipe.family]
    if pipe.family == "flux":
        return FluxTextStack(pipe, n, dtype)
    if pipe.family == "sd3":
        return SD3TextStack(pipe, n, dtype)
    return MaskedTextStack(pipe, n, dtype)


# ---- latent codec --------------------------------------------------------------------------------


class LatentCodec:
    """Images (B, 3, H, W) in [-1, 1] <-> the latents the transformer reads, with the pipeline's scaling.

    FLUX/SD3: z = (mean - shift_factor) * scaling_factor; PixArt, Sana: z = latent * scaling_factor.
    AutoencoderKL is used deterministically (the posterior mean). Pixel-space models: identity.
    """

    def __init__(self, vae: nn.Module | None = None, family: str = "builtin", dtype: torch.dtype = torch.float32):
        self.vae, self.family, self.dtype = vae, family, dtype
        if vae is None:
            self.kind, self.downsample, self.channels = "identity", 1, 3
            self.scaling, self.shift = 1.0, 0.0
            return
        from diffusers import AutoencoderDC, AutoencoderKL

        cfg = vae.config
        if isinstance(vae, AutoencoderKL):
            self.kind = "kl"
            self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        elif isinstance(vae, AutoencoderDC):
            self.kind = "dc"
            self.downsample = int(vae.spatial_compression_ratio)
        else:
            raise ModelError(f"VAE class {type(vae).__name__} is not supported (AutoencoderKL, AutoencoderDC)")
        self.channels = int(cfg.latent_channels)
        self.scaling = float(cfg.scaling_factor if cfg.get("scaling_factor") is not None else 1.0)
        shift = cfg.get("shift_factor") if family in ("flux", "sd3") else None
        self.shift = float(shift) if shift is not None else 0.0

    def _check(self, x: Tensor, channels: int, what: str, multiple: int) -> None:
        if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != channels:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{what} must be (B, {channels}, H, W), got {shape}")
        if x.shape[2] % multiple or x.shape[3] % multiple:
            raise ValueError(f"{what} side {tuple(x.shape[2:])} is not divisible by {multiple}")

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, channels, H/downsample, W/downsample) float32."""
        self._check(images, 3, "images", self.downsample)
        if self.vae is None:
            return images.float()
        x = images.to(self.dtype)
        if self.kind == "kl":
            z = self.vae.encode(x).latent_dist.mean
        else:
            z = self.vae.encode(x).latent
        return ((z - self.shift) * self.scaling).float()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images (B, 3, H, W) float32, clamped to [-1, 1]."""
        self._check(latents, self.channels, "latents", 1)
        if self.vae is None:
            return latents.float().clamp(-1, 1)
        z = latents.to(self.dtype) / self.scaling + self.shift
        return self.vae.decode(z).sample.float().clamp(-1, 1)


def load_codec(spec: str, dtype: torch.dtype = torch.float32) -> LatentCodec:
    """The latent codec of `builtin` (identity) or a local pipeline directory (its vae/, if it lists one)."""
    if is_builtin(spec):
        return LatentCodec(None)
    pipe = read_pipeline(spec)
    entry = pipe.entry("vae")
    if entry is None:
        return LatentCodec(None, pipe.family)
    import diffusers

    path = pipe.component("vae")
    lib, cls_name = entry
    cls = getattr(diffusers, cls_name, None) if lib == "diffusers" else None
    if cls_name not in ("AutoencoderKL", "AutoencoderDC") or cls is None:
        raise ModelError(f"{pipe.root}/vae: class {lib}.{cls_name} is not supported (AutoencoderKL, AutoencoderDC)")
    vae = cls.from_pretrained(path, local_files_only=True, torch_dtype=dtype).eval().requires_grad_(False)
    return LatentCodec(vae, pipe.family, dtype)


__all__ = [
    "DEFAULT_MAX_SEQUENCE_LENGTH",
    "FAMILY_OF_TRANSFORMER",
    "LatentCodec",
    "PipelineDir",
    "TextStack",
    "load_codec",
    "load_text_stack",
    "read_pipeline",
]
