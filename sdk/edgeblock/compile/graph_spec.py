"""GraphSpec: what one exported graph is and how its named inputs/outputs map to the block graph.

JSON-able; the manifest's `graphs` entries are its to_dict() with a bundle-relative path.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .onnx_io import OPSET


@dataclass
class GraphSpec:
    """What one exported graph is and how its named inputs/outputs map to the block graph (JSON-able)."""

    kind: str  # prologue | group | epilogue | trainable_infer | training
    path: str
    inputs: list[str]
    outputs: list[str]
    blocks: list[int] = field(default_factory=list)
    opset: int = OPSET
    state_in: dict[str, str] = field(default_factory=dict)  # slot -> input name
    state_out: dict[str, str] = field(default_factory=dict)  # slot -> output name
    ctx: dict[str, Any] = field(default_factory=dict)  # ctx key -> name(s) / rule
    residuals: dict[str, dict[str, str]] = field(default_factory=dict)  # gap_s_e -> slot -> input name
    lora: dict[str, dict[str, Any]] = field(default_factory=dict)  # onnx name -> {block, param, shape}
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    external_data: bool = False
    attention_chunks: int = 0  # the softmax attentions' queries cut into this many slices (0: none cut)
    feedforward_chunks: int = 0  # the feed-forward parts' tokens cut into this many slices (0: none cut)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dynamic_axes"] = {k: {str(a): n for a, n in v.items()} for k, v in self.dynamic_axes.items()}
        return d
