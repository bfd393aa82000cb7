"""A model's text encoders composed as its diffusers pipeline's encode_prompt does (one TextStack per family), and
the subject / class-noun token spans found through the tokenizers' offsets."""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from . import ModelError
from .conditioning import Conditioning
from .pipeline_dir import PipelineDir, _load_tokenizer, _load_transformers_model, is_builtin, read_pipeline

# Default text length of the text stream (for SD3: the T5 part; the CLIP part is the tokenizer's 77).
DEFAULT_MAX_SEQUENCE_LENGTH: dict[str, int] = {"flux": 128, "sd3": 256, "pixart": 120, "sana": 300}
BUILTIN_MAX_LENGTH = 32


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
