"""What a training run of the built-in model is: `TrainConfig`, every setting in one object passed whole,
with its curriculum as a tuple of `Stage`s, checked on construction; and the FLUX architecture it builds.
Named configs (the shipped model's among them) are in `presets`."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from . import world
from .text import EMBED_DIM

SIZE = 64  # image side (pixels)
PATCH = 4  # pixels packed into one token per side (no VAE)
CHANNELS = 3
MAX_LEN = 32  # text tokens

LOW_RES_IDS = ("scaled", "grid")
# settings a resumed run may change: the budget and the bookkeeping, not the recipe
RESUMABLE = ("steps", "max_minutes", "threads", "log_every", "ckpt_every")


@dataclass(frozen=True)
class Stage:
    """One stage of a curriculum: what the batches draw from the previous stage's end until step `until`
    (None: to the end of the run). world: one of world.WORLDS; shapes_share: with world "mix", the share
    of draws from the shapes world."""
    until: int | None = None
    world: str = "full"
    shapes_share: float = 0.5

    def __post_init__(self):
        if self.world not in world.WORLDS:
            raise ValueError(f"unknown world {self.world!r}; one of {', '.join(world.WORLDS)}")
        if not 0.0 <= self.shapes_share <= 1.0:
            raise ValueError(f"shapes_share must be in [0, 1], got {self.shapes_share}")
        if self.shapes_share != 0.5 and self.world != "mix":
            raise ValueError(f"shapes_share {self.shapes_share} only applies to world 'mix', not {self.world!r}")
        if self.until is not None and self.until < 1:
            raise ValueError(f"a stage's until must be a step >= 1 (or None for the last), got {self.until}")


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a run. The run ends at `steps` or after `max_minutes` of training (None: no wall-time
    budget), whichever comes first; the cosine learning-rate decay follows whichever is further along.
    low_res: also train on batches area-downsampled to this side (0: only at SIZE), low_res_prob of them,
    with positional ids at the full-resolution coordinates of the same places ("scaled") or of their own
    token grid ("grid"). t_shift: the SD3 time shift of the noise levels (the samplers use the same).
    fg_weight: loss weight of the shape's pixels against the background's 1. attr_dropout: the probability
    of leaving each attribute out of a caption. stages: the curriculum, in order, the last until None."""
    steps: int
    max_minutes: float | None
    batch: int
    seed: int
    dim: int
    head_dim: int
    double: int
    single: int
    lr: float
    warmup: int
    ema: float
    caption_dropout: float
    attr_dropout: float
    fg_weight: float
    t_shift: float
    low_res: int
    low_res_prob: float
    low_res_ids: str
    stages: tuple[Stage, ...]
    threads: int = 2
    log_every: int = 50
    ckpt_every: int = 250

    def __post_init__(self):
        for name in ("steps", "batch", "dim", "head_dim", "double", "threads", "log_every", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.single < 0 or self.warmup < 0:
            raise ValueError(f"single and warmup must be >= 0, got {self.single} and {self.warmup}")
        if self.dim % self.head_dim:
            raise ValueError(f"dim {self.dim} must be a multiple of head_dim {self.head_dim}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max_minutes must be > 0 (or None: no wall-time budget), got {self.max_minutes}")
        for name in ("lr", "t_shift", "fg_weight"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("ema", "caption_dropout", "attr_dropout", "low_res_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.low_res and (SIZE % self.low_res or self.low_res // PATCH < 2):
            raise ValueError(f"low_res {self.low_res} must divide {SIZE} and give at least 2x2 tokens (0: off)")
        if self.low_res_ids not in LOW_RES_IDS:
            raise ValueError(f"unknown low_res_ids {self.low_res_ids!r}; one of {', '.join(LOW_RES_IDS)}")
        if not self.stages or not all(isinstance(s, Stage) for s in self.stages):
            raise ValueError(f"stages must be a non-empty tuple of Stage, got {self.stages!r}")
        ends = [s.until for s in self.stages]
        if ends[-1] is not None or None in ends[:-1] or any(a >= b for a, b in zip(ends[:-2], ends[1:-1])):
            raise ValueError(f"stage ends must increase and only the last be None, got {ends}")

    def starts(self) -> list[int]:
        """The first step of each stage."""
        return [0] + [s.until for s in self.stages[:-1]]

    def stage_at(self, step: int) -> int:
        """The index of the stage that trains step `step` (0-based)."""
        return next(k for k, s in enumerate(self.stages) if s.until is None or step < s.until)

    def model_config(self) -> dict:
        return model_config(self.dim, self.head_dim, self.double, self.single)

    def to_dict(self) -> dict:
        """Plain data (stages as dicts), as checkpoints record it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig settings {unknown}; known: {sorted(known)}")
        return cls(**{**d, "stages": tuple(Stage(**s) for s in d["stages"])})

    def differences(self, other: TrainConfig, ignore: tuple[str, ...] = ()) -> list[str]:
        """The names of the settings on which the two configs differ (apart from `ignore`)."""
        return [f.name for f in fields(self)
                if f.name not in ignore and getattr(self, f.name) != getattr(other, f.name)]


def model_config(dim: int = 192, head_dim: int = 64, double: int = 2, single: int = 4) -> dict:
    """The diffusers FluxTransformer2DModel config of a pixel-space model of this width and depth."""
    heads = dim // head_dim
    if heads * head_dim != dim:
        raise ValueError(f"dim {dim} must be a multiple of head_dim {head_dim}")
    side = (head_dim - head_dim // 8) // 2
    side -= side % 2
    axes = [head_dim - 2 * side, side, side]
    return dict(
        patch_size=1,
        in_channels=CHANNELS * PATCH * PATCH,
        out_channels=CHANNELS * PATCH * PATCH,
        num_layers=double,
        num_single_layers=single,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=EMBED_DIM,
        pooled_projection_dim=EMBED_DIM,
        guidance_embeds=False,
        axes_dims_rope=axes,
    )


def build_model(cfg: dict):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(**cfg)
