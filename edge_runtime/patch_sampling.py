"""Timestep-aware dynamic patch sampling (DiT-BlockSkip), numpy-only.

A draw at noise level t in [0, 1] (1 = pure noise) takes a square crop of side
f(t) * S from an S x S image at a random position and resizes it, antialiased,
to the fixed training resolution R. The host and the device share this code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .flow import image_ids
from .recipe import CROP_IDS  # noqa: F401 - a training crop's position ids (FLUX): its own grid or the image's
from .recipe import SCHEDULE_KINDS


@dataclass(frozen=True)
class PatchSchedule:
    """f(t): the crop side as a fraction of the image side, between f_min and f_max.

    kind:     "linear"    f = f_min + (f_max - f_min) * t
              "cosine"    f = f_min + (f_max - f_min) * (1 - cos(pi t)) / 2
              "step"      f takes `levels` equally spaced values from f_min to
                          f_max, switching at equally spaced t thresholds
              "shrinking" f = f_max - (f_max - f_min) * t (the paper's ablation:
                          large crops at low noise)
              "random"    f uniform in [f_min, f_max], drawn per crop from the
                          sampler's rng, independent of t (the paper's ablation)

    The first three (the method's) are non-decreasing in t: large crops at high
    noise. f_min = f_max = 1 is plain resizing of the whole image.
    """

    kind: str = "linear"
    f_min: float = 0.5
    f_max: float = 1.0
    levels: int = 3

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"patch schedule kind {self.kind!r} is not one of {SCHEDULE_KINDS}")
        if not (0.0 < self.f_min <= self.f_max <= 1.0):
            raise ValueError(
                f"patch schedule needs 0 < f_min <= f_max <= 1, got f_min={self.f_min}, f_max={self.f_max}"
            )
        if self.kind == "step" and self.levels < 2:
            raise ValueError(f"a step schedule needs levels >= 2, got {self.levels}")

    @property
    def is_random(self) -> bool:
        """f is drawn per crop (fraction), not a function of t (scale)."""
        return self.kind == "random"

    def scale(self, t: float | np.ndarray) -> np.ndarray:
        """f(t) for t in [0, 1] (values outside are clipped); a random schedule has none (use fraction)."""
        if self.is_random:
            raise ValueError("a random patch schedule has no f(t): draw a crop's fraction with fraction(rng, t)")
        t = np.clip(np.asarray(t, dtype=np.float64), 0.0, 1.0)
        span = self.f_max - self.f_min
        if self.kind == "shrinking":
            return self.f_max - span * t
        if self.kind == "linear":
            return self.f_min + span * t
        if self.kind == "cosine":
            return self.f_min + span * (1.0 - np.cos(math.pi * t)) / 2.0
        # step: level k for t in [k/levels, (k+1)/levels), the last level includes t = 1
        k = np.minimum(np.floor(t * self.levels), self.levels - 1)
        return self.f_min + span * k / (self.levels - 1)

    def fraction(self, rng: np.random.Generator, t: float) -> float:
        """One crop's side fraction at noise level t: f(t), drawing nothing from rng (so every t-driven kind
        leaves the random stream as it was), or for "random" one uniform draw in [f_min, f_max]."""
        if self.is_random:
            return float(rng.uniform(self.f_min, self.f_max))
        return float(self.scale(t))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "f_min": self.f_min, "f_max": self.f_max, "levels": self.levels}

    @classmethod
    def from_dict(cls, d: dict) -> "PatchSchedule":
        return cls(**{k: d[k] for k in ("kind", "f_min", "f_max", "levels") if k in d})


@dataclass(frozen=True)
class CropBox:
    top: int
    left: int
    size: int


@dataclass
class PatchSampler:
    """Draws crops for training at resolution `train_res` from images of any size >= it."""

    schedule: PatchSchedule = field(default_factory=PatchSchedule)
    train_res: int = 32

    def __post_init__(self) -> None:
        if self.train_res < 1:
            raise ValueError(f"train_res must be positive, got {self.train_res}")

    def crop_box(self, rng: np.random.Generator, height: int, width: int, t: float) -> CropBox:
        """A square crop of side round(f * min(H, W)), f = the schedule's fraction at t (drawn before the
        position for a random schedule), uniformly placed inside the image."""
        side = min(height, width)
        size = int(round(self.schedule.fraction(rng, t) * side))
        size = max(1, min(size, side))
        top = int(rng.integers(0, height - size + 1))
        left = int(rng.integers(0, width - size + 1))
        return CropBox(top, left, size)

    def sample(self, rng: np.random.Generator, image: np.ndarray, t: float) -> tuple[np.ndarray, CropBox]:
        """Crop `image` (H, W, C) for noise level t and resize it to (R, R, C) float32."""
        if image.ndim != 3:
            raise ValueError(f"expected an (H, W, C) image, got shape {image.shape}")
        box = self.crop_box(rng, image.shape[0], image.shape[1], t)
        return resize(crop(image, box), self.train_res), box


def check_prior_from(prior_from: int | None, n: int, error: type[Exception] = ValueError) -> None:
    """Class images (prior preservation) from index prior_from on need subject images before them and at
    least one class image among the n."""
    if prior_from is not None and not 0 < prior_from < n:
        raise error(f"prior_from={prior_from}: needs subject images before it and class images from it ({n} images)")


def pick_image(rng: np.random.Generator, n: int, prior_from: int | None = None, prior_share: float = 0.0) -> int:
    """The image of a training draw among n: uniform; or, with class images for prior preservation from index
    prior_from on, a class image with probability prior_share, else a subject image (both uniform)."""
    if prior_from is None:
        return int(rng.integers(0, n))
    if rng.random() < prior_share:
        return int(rng.integers(prior_from, n))
    return int(rng.integers(0, prior_from))


GRID_POSITION = (0.0, 0.0, 1.0)  # crop_position of a crop that is the whole image at its own size
CROP_INPUT = "crop"  # the FLUX prologue graph's input taking a crop_position


def with_grid_crop(inputs, feeds):
    """`feeds` plus the grid placement (GRID_POSITION) for a graph that takes CROP_INPUT and was not given
    one: generation, and every caller that runs the prologue on a whole latent."""
    if CROP_INPUT in inputs and CROP_INPUT not in feeds:
        return {**feeds, CROP_INPUT: np.asarray(GRID_POSITION, np.float32)}
    return feeds


def crop_position(box: CropBox, res: int, patch: int) -> np.ndarray:
    """Where a crop resized to res x res and packed patch x patch sits in the full image, as FLUX position
    ids: (row0, col0, step) float32, token (i, j) of the crop at the full image's token coordinates
    (row0 + i * step, col0 + j * step) of its centre. `patch` is the pixels per token (the packing factor
    times the VAE's downsampling). (0, 0, 1) is the plain token grid; the on-device prologue graph takes
    this vector as its `crop` input."""
    if res % patch:
        raise ValueError(f"training resolution {res} is not divisible by the packing factor {patch}")
    step = box.size / res  # full-image tokens per crop token
    return np.array([box.top / patch + 0.5 * step - 0.5, box.left / patch + 0.5 * step - 0.5, step], np.float32)


def position_ids(position: np.ndarray, n: int) -> np.ndarray:
    """The (n * n, 3) position ids of an n x n token grid placed by crop_position's (row0, col0, step)."""
    p = np.asarray(position, np.float32)
    ids = image_ids(n, n)
    ids[:, 1] = p[0] + ids[:, 1] * p[2]
    ids[:, 2] = p[1] + ids[:, 2] * p[2]
    return ids


def crop_token_ids(box: CropBox, res: int, patch: int) -> np.ndarray:
    """FLUX position ids (0, row, col) of a crop resized to res x res and packed patch x patch: each token
    at the full image's token coordinates of its centre, (N, 3) float32. A crop of the image's own size
    gets the plain token grid (0 .. n-1); the whole image at half resolution gets 2i + 0.5, the
    coordinates the built-in model trains its low-resolution batches at (`--low-res-ids scaled`)."""
    return position_ids(crop_position(box, res, patch), res // patch)


def crop(image: np.ndarray, box: CropBox) -> np.ndarray:
    return image[box.top : box.top + box.size, box.left : box.left + box.size]


def resize(image: np.ndarray, res: int) -> np.ndarray:
    """Antialiased resize of an (H, W, C) array to (res, res, C), float32, per channel.

    Pillow's resampling widens its filter by the reduction factor, so downscaling
    is antialiased; each channel goes through a 32-bit float image, losslessly.
    """
    img = np.asarray(image, dtype=np.float32)
    if img.shape[0] == res and img.shape[1] == res:
        return img.copy()
    out = np.empty((res, res, img.shape[2]), dtype=np.float32)
    for c in range(img.shape[2]):
        ch = Image.fromarray(np.ascontiguousarray(img[:, :, c]))
        out[:, :, c] = np.asarray(ch.resize((res, res), Image.Resampling.BICUBIC), dtype=np.float32)
    return out
