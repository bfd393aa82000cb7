"""The method's recommended training settings, one recipe per model (numpy-free): the single source.

`edgeblock compile` writes a model's recipe into the bundle's manifest, the daemon's personalization
defaults come from there, and `edgeblock eval`, `edgeblock plan` and the PyTorch method start from the
same recipe, so the setting the benchmark measured is the setting the product ships.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

# the crop position ids a FLUX training crop can take (patch_sampling.CROP_IDS re-exports them)
CROP_IDS = ("grid", "image")
# how the crop side follows the noise level (patch_sampling.PatchSchedule implements them): the method's three,
# growing with it, then the paper's ablations, a crop shrinking with it and one of a random size
SCHEDULE_KINDS = ("linear", "cosine", "step", "shrinking", "random")


@dataclass(frozen=True)
class Recipe:
    """How to personalize a model with DiT-BlockSkip.

    train_res_fraction: the training crop side R as a fraction of the generation side S (rounded down to
        the model's resolution multiple); f_min: the smallest crop's side as a fraction of the image at
        t = 0 (None: R / S, the crop at the image's own scale); schedule_kind / schedule_levels: how the crop
        side grows from f_min to the whole image with the noise level (patch_sampling.PatchSchedule: linear,
        cosine, or `step` through schedule_levels sizes; `shrinking` and `random` are the paper's ablations,
        for `edgeblock eval --ablations`, not recommendations); crop_ids: a FLUX crop's position ids ("image":
        the coordinates of the place it was cut from; other families have none); trainable_blocks: how many
        blocks selection picks (the rest are skipped with precomputed residuals); lora_rank / lora_alpha
        (None: alpha = rank); learning_rate, steps (optimizer steps) and batch (draws per step: the device
        accumulates the gradients of `batch` draws, so its memory is that of one draw).
    """

    name: str
    train_res_fraction: float = 0.5
    f_min: float | None = None
    schedule_kind: str = "linear"
    schedule_levels: int = 3
    crop_ids: str = "image"
    trainable_blocks: int = 2
    lora_rank: int = 4
    lora_alpha: float | None = None
    learning_rate: float = 5e-4
    steps: int = 200
    batch: int = 1
    source: str = ""  # where its figures were measured

    def __post_init__(self) -> None:
        if not 0.0 < self.train_res_fraction <= 1.0:
            raise ValueError(f"recipe {self.name}: train_res_fraction must be in (0, 1], got {self.train_res_fraction}")
        if self.f_min is not None and not 0.0 < self.f_min <= 1.0:
            raise ValueError(f"recipe {self.name}: f_min must be in (0, 1], got {self.f_min}")
        if self.schedule_kind not in SCHEDULE_KINDS:
            raise ValueError(f"recipe {self.name}: schedule_kind must be one of {SCHEDULE_KINDS}, got {self.schedule_kind!r}")
        if self.schedule_kind == "step" and int(self.schedule_levels) < 2:
            raise ValueError(f"recipe {self.name}: a step schedule needs schedule_levels >= 2, got {self.schedule_levels}")
        if self.crop_ids not in CROP_IDS:
            raise ValueError(f"recipe {self.name}: crop_ids must be one of {CROP_IDS}, got {self.crop_ids!r}")
        for k in ("trainable_blocks", "lora_rank", "steps", "batch"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"recipe {self.name}: {k} must be >= 1, got {getattr(self, k)}")
        if not self.learning_rate > 0:
            raise ValueError(f"recipe {self.name}: learning_rate must be > 0, got {self.learning_rate}")

    @property
    def alpha(self) -> float:
        return float(self.lora_rank if self.lora_alpha is None else self.lora_alpha)

    def train_res(self, side: int, multiple: int = 1) -> int:
        """R in pixels for a generation side S: the fraction of S, rounded down to `multiple` (at least one)."""
        return max(multiple, int(side * self.train_res_fraction) // multiple * multiple)

    def schedule_f_min(self, train_res: int, side: int) -> float:
        return float(self.f_min) if self.f_min is not None else train_res / side

    def patch_schedule(self, train_res: int, side: int, f_min: float | None = None) -> dict[str, Any]:
        """The crop schedule for crops of train_res pixels from images of `side` (f_min overrides the
        recipe's): the fields of patch_sampling.PatchSchedule, which the manifest records."""
        return {"kind": self.schedule_kind, "f_min": float(f_min) if f_min is not None else self.schedule_f_min(train_res, side),
                "f_max": 1.0, "levels": int(self.schedule_levels)}

    def blocks_of(self, num_blocks: int) -> int:
        """How many blocks selection picks for a model of num_blocks."""
        return max(1, min(self.trainable_blocks, num_blocks))

    def middle(self, num_blocks: int) -> tuple[int, ...]:
        """The trainable blocks where no selection runs (the planner): the middle window of blocks_of."""
        return middle_blocks(num_blocks, self.blocks_of(num_blocks))

    def with_(self, **changes: Any) -> Recipe:
        """This recipe with some settings changed (None values leave a setting as it is)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lora_alpha"] = self.alpha
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in known})


def middle_blocks(num_blocks: int, k: int = 2) -> tuple[int, ...]:
    """The k middle blocks; an odd remainder leaves one more block before the window than after it (the
    paper's selections skip the first blocks rather than the last)."""
    start = max(0, (num_blocks - k + 1) // 2)
    return tuple(range(start, min(num_blocks, start + k)))


# Models without a measured recipe: the paper's crop (R = S / 2, f_min = R / S) and a few middle blocks
# (DESIGN.md). Its learning rate, rank and steps are the daemon's long-standing defaults, not a measurement.
PAPER = Recipe("paper")

# The built-in model (v10), measured by `edgeblock eval` (docs/results.md): crops at 3/4 of the side and five
# of six blocks trained, at 55 % of standard LoRA's training tensors; the paper's R = S / 2 with two blocks gives
# 0.53 x standard LoRA's subject fidelity on this 64 px, six-block model. The crop schedule takes two sizes: the
# crop at the image's own scale (48 px of 64, nothing resampled) below t = 0.5, the whole image resized to 48
# from there on: 0.480 / 0.447 subject fidelity (seeds 0 / 1, 0.98 x standard LoRA) against 0.432 / 0.401 with
# the crop growing linearly in t.
BUILTIN = Recipe("builtin", train_res_fraction=0.75, schedule_kind="step", schedule_levels=2, crop_ids="image",
                 trainable_blocks=5, lora_rank=8, lora_alpha=8.0, learning_rate=3e-3, steps=300, batch=4,
                 source="docs/results.md")

RECIPES = {r.name: r for r in (PAPER, BUILTIN)}


def recipe_named(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"recipe {name!r} is not one of {', '.join(RECIPES)}")
    return RECIPES[name]
