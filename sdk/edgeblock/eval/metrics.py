"""Deterministic image metrics for the benchmark (numpy only; docs/eval.md defines them).

Subject fidelity: segment the subject (the largest connected region of pixels far from the
background colour, if it is object-sized), cut its square bounding box, and compare a colour histogram and a colour
layout over the world's eight-colour palette with the references'. Prompt fidelity: is the
background the requested colour and plain, and does the subject sit in the requested cell of the 3x3 grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..builtin import world

PALETTE_NAMES: tuple[str, ...] = world.COLOUR_NAMES
PALETTE = np.array([world.COLOURS[c] for c in PALETTE_NAMES], dtype=np.float32)  # (8, 3)
BORDER = 2  # pixels of frame the background colour is read from
FG_THRESHOLD = 60.0  # RGB distance from the background above which a pixel is foreground
PALETTE_SIGMA = 40.0  # soft palette assignment: weight exp(-d^2 / 2 sigma^2) of the nearest colour
GRID = 6  # layout cells per side of the subject's crop
CROP = 24  # the crop is resampled to CROP x CROP before pooling into GRID x GRID cells
MIN_PIXELS = 6  # a foreground region smaller than this is no subject
# A region whose bounding box is longer than this fraction of the image side is no object (the world's
# largest shapes span 0.32 of the side, the references at most 0.34): a design's pattern spread over the
# image, not the subject.
OBJECT_MAX_SIDE = 0.5
# The background is the requested one only if it is plain: at most this fraction of the image's pixels
# lies far from the background colour outside the subject (0 for every reference).
CLUTTER_MAX = 0.05
COLOUR_WEIGHT = 0.5  # subject fidelity = w * colour + (1 - w) * layout


def _check(img: np.ndarray) -> np.ndarray:
    if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3:
        shape = getattr(img, "shape", type(img).__name__)
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {shape}")
    return img.astype(np.float32)


def background_colour(img: np.ndarray) -> np.ndarray:
    """Per-channel median of the BORDER-pixel frame: (3,) float32 RGB."""
    x = _check(img)
    b = BORDER
    frame = np.concatenate([x[:b].reshape(-1, 3), x[-b:].reshape(-1, 3), x[b:-b, :b].reshape(-1, 3), x[b:-b, -b:].reshape(-1, 3)])
    return np.median(frame, axis=0)


def nearest_colour(rgb: np.ndarray) -> str:
    """The palette colour nearest to an RGB value."""
    d = np.linalg.norm(PALETTE - np.asarray(rgb, dtype=np.float32)[None], axis=1)
    return PALETTE_NAMES[int(np.argmin(d))]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected region of a boolean mask (ties: the first in raster order).

    Union-find over the horizontal runs of each row: runs in adjacent rows that overlap or touch
    diagonally belong to one region.
    """
    runs: list[tuple[int, int, int]] = []  # (row, start, end exclusive)
    row_runs: list[list[int]] = []
    for y, row in enumerate(mask):
        edges = np.flatnonzero(np.diff(np.concatenate(([0], row.view(np.int8), [0]))))
        ids = []
        for a, b in zip(edges[::2], edges[1::2]):
            ids.append(len(runs))
            runs.append((y, int(a), int(b)))
        row_runs.append(ids)
    parent = list(range(len(runs)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for y in range(1, len(row_runs)):
        for i in row_runs[y]:
            _, a, b = runs[i]
            for j in row_runs[y - 1]:
                _, c, d = runs[j]
                if c <= b and a <= d:  # [a, b) and [c, d) touch within one pixel (8-connectivity)
                    ri, rj = find(i), find(j)
                    if ri != rj:
                        parent[max(ri, rj)] = min(ri, rj)
    if not runs:
        return np.zeros_like(mask)
    sizes: dict[int, int] = {}
    for i, (_, a, b) in enumerate(runs):
        r = find(i)
        sizes[r] = sizes.get(r, 0) + b - a
    best = max(sizes, key=lambda r: (sizes[r], -r))
    out = np.zeros_like(mask)
    for i, (y, a, b) in enumerate(runs):
        if find(i) == best:
            out[y, a:b] = True
    return out


def _segment(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(float image, pixels farther than FG_THRESHOLD from the background colour, the largest connected
    region of them): what every metric of one image reads, computed once."""
    x = _check(img)
    far = np.linalg.norm(x - background_colour(img)[None, None], axis=2) > FG_THRESHOLD
    return x, far, _largest_component(far)


def foreground_mask(img: np.ndarray) -> np.ndarray:
    """The subject: the largest connected region of pixels farther than FG_THRESHOLD from the background."""
    return _segment(img)[2]


def _clutter(far: np.ndarray, mask: np.ndarray) -> float:
    return float((far & ~mask).mean())


def clutter(img: np.ndarray) -> float:
    """Fraction of the image's pixels far from the background outside the subject's region."""
    _, far, mask = _segment(img)
    return _clutter(far, mask)


@dataclass(frozen=True)
class SubjectDescriptor:
    colour: np.ndarray  # (8,) palette histogram of the subject's pixels, sums to 1
    layout: np.ndarray  # (GRID, GRID, 8) palette mass per cell of the square crop, fractions of a cell
    centre: tuple[float, float]  # (x, y) centroid of the subject in pixels
    pixels: int


def _palette_weights(x: np.ndarray) -> np.ndarray:
    """Soft one-hot over the palette per pixel: (..., 8), the nearest colour weighted by closeness."""
    d = np.linalg.norm(x[..., None, :] - PALETTE, axis=-1)  # (..., 8)
    k = np.argmin(d, axis=-1)
    w = np.exp(-np.take_along_axis(d, k[..., None], -1) ** 2 / (2 * PALETTE_SIGMA**2))  # (..., 1)
    out = np.zeros(d.shape, dtype=np.float32)
    np.put_along_axis(out, k[..., None], w, -1)
    return out


def square_crop(values: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
    """values (H, W, ...) on the square box centred on the mask's bounding box, resampled (nearest) to n x n;
    zero where the box leaves the image."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    side = max(y1 - y0, x1 - x0)
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    coords = (np.arange(n) + 0.5) / n * side - side / 2
    yy = np.floor(cy + coords).astype(int)
    xx = np.floor(cx + coords).astype(int)
    h, w = mask.shape
    inside = ((yy >= 0) & (yy < h))[:, None] & ((xx >= 0) & (xx < w))[None, :]
    crop = values[np.clip(yy, 0, h - 1)][:, np.clip(xx, 0, w - 1)]
    return crop * inside.reshape(inside.shape + (1,) * (crop.ndim - 2))


def describe(img: np.ndarray) -> SubjectDescriptor | None:
    """The subject's colour and layout descriptor, or None when no subject is found (no foreground region of
    MIN_PIXELS, or the largest one too big to be an object: OBJECT_MAX_SIDE)."""
    x, _, mask = _segment(img)
    return _describe(x, mask)


def _describe(x: np.ndarray, mask: np.ndarray) -> SubjectDescriptor | None:
    n = int(mask.sum())
    if n < MIN_PIXELS:
        return None
    ys, xs = np.nonzero(mask)
    if max(ys.max() - ys.min(), xs.max() - xs.min()) + 1 > OBJECT_MAX_SIDE * max(mask.shape):
        return None
    onehot = _palette_weights(x) * mask[..., None]  # (H, W, 8), zero off the subject
    hist = onehot.sum((0, 1))
    colour = hist / max(float(hist.sum()), 1e-8)
    crop = square_crop(onehot, mask, CROP)  # (CROP, CROP, 8)
    c = CROP // GRID
    layout = crop.reshape(GRID, c, GRID, c, len(PALETTE_NAMES)).mean((1, 3))
    return SubjectDescriptor(colour, layout, (float(xs.mean()) + 0.5, float(ys.mean()) + 0.5), n)


def colour_similarity(a: SubjectDescriptor, b: SubjectDescriptor) -> float:
    """Histogram intersection of the palette histograms, in [0, 1]."""
    return float(np.minimum(a.colour, b.colour).sum())


def layout_similarity(a: SubjectDescriptor, b: SubjectDescriptor) -> float:
    """Weighted Jaccard of the per-cell palette masses (shape and where each colour sits), in [0, 1]."""
    num = np.minimum(a.layout, b.layout).sum()
    den = np.maximum(a.layout, b.layout).sum()
    return float(num / den) if den > 0 else 0.0


def similarity(a: SubjectDescriptor | None, b: SubjectDescriptor | None) -> float:
    """Subject similarity in [0, 1]: COLOUR_WEIGHT * colour + (1 - COLOUR_WEIGHT) * layout; 0 if either has none."""
    if a is None or b is None:
        return 0.0
    return COLOUR_WEIGHT * colour_similarity(a, b) + (1 - COLOUR_WEIGHT) * layout_similarity(a, b)


def subject_fidelity(img: np.ndarray, references: Sequence[SubjectDescriptor | None]) -> float:
    """Mean similarity of the image's subject to each reference's subject, in [0, 1]."""
    if not references:
        raise ValueError("subject fidelity needs at least one reference")
    d = describe(img)
    return float(np.mean([similarity(d, r) for r in references]))


def cell_of(x: float, y: float, size: int = 64) -> str:
    """The 3x3 grid position (world.POSITIONS) containing pixel (x, y)."""
    col = min(2, max(0, int(x * 3 // size)))
    row = min(2, max(0, int(y * 3 // size)))
    return world.POSITIONS[row * 3 + col]


def background_accuracy(img: np.ndarray, requested: str) -> float:
    """1.0 if the border's median colour is nearest to the requested palette colour and the background is
    plain (clutter at most CLUTTER_MAX), else 0.0."""
    return _background_accuracy(img, requested, clutter(img))


def _background_accuracy(img: np.ndarray, requested: str, clutter_value: float) -> float:
    if requested not in world.COLOURS:
        raise ValueError(f"unknown colour {requested!r}; one of {PALETTE_NAMES}")
    return float(nearest_colour(background_colour(img)) == requested and clutter_value <= CLUTTER_MAX)


def position_accuracy(img: np.ndarray, requested: str) -> float:
    """1.0 if the subject's centroid lies in the requested cell of the 3x3 grid, else 0.0 (0.0: no subject)."""
    if requested not in world.POSITIONS:
        raise ValueError(f"unknown position {requested!r}; one of {world.POSITIONS}")
    d = describe(img)
    if d is None:
        return 0.0
    return float(cell_of(*d.centre, size=img.shape[1]) == requested)


def prompt_fidelity(img: np.ndarray, background: str, position: str) -> dict[str, float]:
    """{'background_acc', 'position_acc', 'prompt_fidelity' (their mean)}."""
    bg, pos = background_accuracy(img, background), position_accuracy(img, position)
    return {"background_acc": bg, "position_acc": pos, "prompt_fidelity": (bg + pos) / 2}


def score(img: np.ndarray, references: Sequence[SubjectDescriptor | None], background: str, position: str) -> dict[str, float]:
    """Subject and prompt fidelity of one generated image (the subject segmented once), and its clutter."""
    if not references:
        raise ValueError("subject fidelity needs at least one reference")
    if position not in world.POSITIONS:
        raise ValueError(f"unknown position {position!r}; one of {world.POSITIONS}")
    x, far, mask = _segment(img)
    d, cl = _describe(x, mask), _clutter(far, mask)
    bg = _background_accuracy(img, background, cl)
    pos = 0.0 if d is None else float(cell_of(*d.centre, size=img.shape[1]) == position)
    return {"subject_fidelity": float(np.mean([similarity(d, r) for r in references])),
            "prompt_fidelity": (bg + pos) / 2, "background_acc": bg, "position_acc": pos, "clutter": cl}


def reference_check(subjects, other_images: np.ndarray | None = None) -> dict[str, float]:
    """How the subject-fidelity metric scores known images: the metric's own calibration.

    same_subject: each reference against its subject's other references (leave one out);
    cross_subject: each reference against every other subject's references;
    plain_shapes: world images of the same class noun, every colour (other_images: override).
    Returns the means, and the fraction of references whose own-subject score beats every other subject's.
    """
    descs = {s.name: [describe(im) for im in s.images] for s in subjects}
    same, cross, wins = [], [], []
    for s in subjects:
        for k, im in enumerate(s.images):
            own = [d for j, d in enumerate(descs[s.name]) if j != k]
            mine = subject_fidelity(im, own)
            others = [subject_fidelity(im, descs[o.name]) for o in subjects if o.name != s.name]
            same.append(mine)
            cross.extend(others)
            wins.append(float(all(mine > o for o in others)))
    plain = []
    for s in subjects:
        imgs = other_images if other_images is not None else plain_shapes(s.noun)
        plain.extend(subject_fidelity(im, descs[s.name]) for im in imgs)
    return {"same_subject": float(np.mean(same)), "cross_subject": float(np.mean(cross)),
            "plain_shapes": float(np.mean(plain)), "plain_shapes_max": float(np.max(plain)),
            "own_subject_best": float(np.mean(wins))}


def plain_shapes(noun: str | None = None, positions: Sequence[str] = ("center", "top left", "bottom right")) -> np.ndarray:
    """World renders (plain single-colour shapes, every colour, large, on a contrasting plain background)."""
    shapes = [noun] if noun else list(world.SHAPES)
    out = []
    for shape in shapes:
        for i, colour in enumerate(world.COLOUR_NAMES):
            bg = world.COLOUR_NAMES[(i + 3) % len(world.COLOUR_NAMES)]
            out.append(world.render(world.Spec(shape, colour, "large", positions[i % len(positions)], bg)))
    return np.stack(out)
