"""training_spec.json, the contract of a bundle's trainable/ artifacts (numpy-free): one typed record.

The host compiler writes it (sdk/edgeblock/compile/ort_training.py); the device trainers (ort_trainer.py,
torch_trainer.py) and the frozen pass (personalize.py) read it: its fields and checks live here only.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

SPEC_FILE = "training_spec.json"
TRAIN_OPSET = 15
ARTIFACTS = {
    "training": "training_model.onnx",
    "eval": "eval_model.onnx",
    "optimizer": "optimizer_model.onnx",
    "checkpoint": "checkpoint",
    # Every parameter the training/eval graphs read, by their parameter-input names, float32: the
    # torch trainer backend (edge_runtime/torch_trainer.py) cannot read ORT's checkpoint format.
    "params": "params.safetensors",
}
# what a spec must hold to be used; the rest default (lists empty, files as ARTIFACTS)
REQUIRED = ("inputs", "input_shapes", "requires_grad", "lora", "files")


class TrainingError(RuntimeError):
    """The training artifacts cannot be used here (missing files, no ORT training build, bad feeds)."""


@dataclass
class TrainingSpec:
    """What the training artifacts are and how to feed them (saved as training_spec.json).

    inputs: the training graph's user inputs in order (`state.<slot>`, `ctx.*`, `gap_<s>_<e>.<slot>`,
    `target`); requires_grad: the trainable LoRA tensors (published names); frozen: every other
    checkpoint parameter; unreachable: LoRA tensors the loss cannot reach (not trainable); lora:
    published LoRA name -> {block, param, shape}; gaps: `gap_<s>_<e>` prefixes in segment order.
    """

    artifact_dir: str
    inputs: list[str]
    input_shapes: dict[str, list[int]]
    requires_grad: list[str]
    frozen: list[str]
    unreachable: list[str]
    lora: dict[str, dict[str, Any]]
    gaps: list[str]
    opset: int = TRAIN_OPSET
    optimizer: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=lambda: dict(ARTIFACTS))

    def __getitem__(self, key: str) -> Any:
        """A field by its JSON name (`spec["requires_grad"]`), as readers of the JSON dict wrote it."""
        if key not in {f.name for f in fields(self)}:
            raise KeyError(key)
        return getattr(self, key)

    def path(self, what: str) -> str:
        """The artifact file `what` (a key of ARTIFACTS) in artifact_dir."""
        return os.path.join(self.artifact_dir, self.files[what])

    @property
    def learning_rate(self) -> float:
        """The optimizer's learning rate the artifacts were built with (AdamW's default 1e-3 if none)."""
        return float(self.optimizer.get("lr", 1e-3))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, artifact_dir: str | None = None) -> str:
        """Write training_spec.json into `artifact_dir` (default: the spec's own), `artifact_dir` recorded
        as "." (the file is read relative to the directory it is in); returns its path."""
        where = self.artifact_dir if artifact_dir is None else artifact_dir
        p = os.path.join(where, SPEC_FILE)
        with open(p, "w") as f:
            json.dump({**self.to_dict(), "artifact_dir": "."}, f, indent=1)
        return p

    @classmethod
    def from_dict(cls, d: dict[str, Any], artifact_dir: str, where: str = SPEC_FILE) -> TrainingSpec:
        """A spec from its JSON form; TrainingError naming the first missing field."""
        if not isinstance(d, dict):
            raise TrainingError(f"{where}: not a JSON object")
        for key in REQUIRED:
            if key not in d:
                raise TrainingError(f"{where}: missing field {key!r}")
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw.update(artifact_dir=artifact_dir, files={**ARTIFACTS, **d["files"]})  # specs written before "params"
        for key in ("frozen", "unreachable", "gaps"):
            kw.setdefault(key, [])
        return cls(**kw)

    @classmethod
    def load(cls, artifact_dir: str) -> TrainingSpec:
        """Read artifact_dir/training_spec.json; TrainingError when it is missing, not JSON or incomplete."""
        path = os.path.join(artifact_dir, SPEC_FILE)
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError as e:
            raise TrainingError(f"{path} is missing: not a training artifact directory") from e
        except json.JSONDecodeError as e:
            raise TrainingError(f"{path} is not valid JSON: {e}") from e
        return cls.from_dict(d, artifact_dir, path)


def load_spec(artifact_dir: str) -> TrainingSpec:
    """TrainingSpec.load: the spec of the artifacts in artifact_dir."""
    return TrainingSpec.load(artifact_dir)
