"""Text conditioning of a DiT: a prompt encoder's output (text embeddings, pooled embedding, attention mask),
one row per prompt, and how it becomes the model's inputs for a batch of draws.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import DiTInputs


@dataclass
class Conditioning:
    """Text conditioning: one prompt (batch 1), broadcast over a batch of draws, or one row per prompt."""

    text: Tensor  # (K, Lt, Dt)
    pooled: Tensor | None = None  # (K, Dp)
    mask: Tensor | None = None  # (K, Lt)

    @property
    def rows(self) -> int:
        return int(self.text.shape[0])

    @classmethod
    def cat(cls, parts: Sequence[Conditioning]) -> Conditioning:
        """The rows of several conditionings, in order (same text length and the same optional parts)."""
        def join(ts):
            if all(t is None for t in ts):
                return None
            if any(t is None for t in ts):
                raise ValueError("cannot join conditionings where only some have pooled embeddings or masks")
            return torch.cat(ts)
        return cls(torch.cat([c.text for c in parts]), join([c.pooled for c in parts]), join([c.mask for c in parts]))

    def take(self, index: Tensor | Sequence[int]) -> Conditioning:
        """The rows at index (one per draw), e.g. each draw's own image caption."""
        idx = torch.as_tensor(index, dtype=torch.long)
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return Conditioning(pick(self.text), pick(self.pooled), pick(self.mask))

    def inputs(self, latents: Tensor, timestep: Tensor, guidance: float | None = None,
               img_ids: Tensor | None = None) -> DiTInputs:
        n = latents.shape[0]
        if self.rows not in (1, n):
            raise ValueError(f"conditioning has {self.rows} rows for a batch of {n}")
        rep = lambda t: None if t is None else t.expand(n, *t.shape[1:])  # noqa: E731
        g = None if guidance is None else torch.full((n,), float(guidance))
        return DiTInputs(latents, timestep, rep(self.text), rep(self.pooled), rep(self.mask), g, img_ids)
