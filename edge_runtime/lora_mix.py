"""Several LoRA adapters applied at once, each with its own scale, exactly: LoRA deltas add up, and
sum_i s_i B_i A_i = [s_1 B_1 | s_2 B_2 | ...] [A_1; A_2; ...], so the adapters' A matrices stacked along the
rank and their scaled B matrices side by side feed a graph whose LoRA rank axis is symbolic (compile makes
it so: edgeblock.compile.trainable_infer.dynamic_lora_rank). One adapter needs no such graph: s B."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def is_lora_b(name: str) -> bool:
    """lora_B (out x rank) carries the scale and is joined along its columns; lora_A (rank x in) along its rows."""
    return ".lora_B." in name


def mix(adapters: Sequence[tuple[Mapping[str, np.ndarray], float]],
        shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The LoRA inputs of `adapters` ((weights by input name, scale) pairs) applied together. `shapes`: the
    graph's LoRA inputs at the bundle's rank; an adapter without one of them contributes nothing to it."""
    if not adapters:
        raise ValueError("mix needs at least one adapter")
    if len(adapters) == 1:
        w, s = adapters[0]
        return {n: (np.asarray(a, np.float32) * np.float32(s) if is_lora_b(n) else np.asarray(a, np.float32))
                for n, a in w.items() if n in shapes}
    out = {}
    for n, shape in shapes.items():
        parts = []
        for w, s in adapters:
            a = np.asarray(w[n], np.float32) if n in w else np.zeros(shape, np.float32)
            parts.append(a * np.float32(s) if is_lora_b(n) else a)
        out[n] = np.concatenate(parts, axis=1 if is_lora_b(n) else 0)
    return out
