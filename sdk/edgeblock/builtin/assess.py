"""Does the built-in model draw what its captions ask? A deterministic read-back of its generations.

For a fixed set of captions (every shape, large, on plain backgrounds, colours and positions
cycled), generate one image each and read back from the pixels, with the benchmark's segmentation
(`edgeblock.eval.metrics`): the background colour (the frame's median, nearest palette colour),
the foreground colour (the subject's dominant palette colour), the position (the subject's
centroid cell on the 3x3 grid) and the shape (the subject's silhouette against a template of each
world shape: the largest weighted-Jaccard overlap of their square-cropped occupancy grids).
Accuracy per attribute = the share of images whose read-back equals the caption's; chance for the
shape is 1/7. `check_world()` runs the same reader on the world's own renders: how far the
reader itself can be trusted. `--partial` asks the same scenes with the size and colour words left
out ("a star on a blue background, top left"), as the benchmark's prompts leave them out; the
foreground colour is then not asked and not scored.

    python -m edgeblock.builtin.assess [--model DIR] [--steps 30] [--partial] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from . import world

OCC = 16  # the silhouette's square crop is resampled to OCC x OCC occupancy fractions
_SUB = 4  # supersampling of the crop (each occupancy cell averages _SUB x _SUB samples)


def _metrics():
    from ..eval import metrics

    return metrics


def silhouette(mask: np.ndarray) -> np.ndarray | None:
    """(OCC, OCC) occupancy of the mask's square bounding box (centred on it), or None if empty."""
    if not mask.any():
        return None
    crop = _metrics().square_crop(mask.astype(np.float32), mask, OCC * _SUB)
    return crop.reshape(OCC, _SUB, OCC, _SUB).mean((1, 3)).astype(np.float32)


@lru_cache(maxsize=1)
def templates() -> dict[str, list[np.ndarray]]:
    """Per world shape, the silhouettes of its renders (both sizes, centred, plain background)."""
    m = _metrics()
    out: dict[str, list[np.ndarray]] = {}
    for shape in world.SHAPES:
        for size in world.SIZES:
            img = world.render(world.Spec(shape, "white", size, "center", "black"))
            out.setdefault(shape, []).append(silhouette(m.foreground_mask(img)))
    return out


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    den = np.maximum(a, b).sum()
    return float(np.minimum(a, b).sum() / den) if den > 0 else 0.0


def shape_scores(mask: np.ndarray) -> dict[str, float]:
    """Per world shape, the best overlap of the mask's silhouette with its templates (0 without a subject)."""
    s = silhouette(mask)
    if s is None:
        return {k: 0.0 for k in world.SHAPES}
    return {k: max(_jaccard(s, t) for t in ts) for k, ts in templates().items()}


@dataclass(frozen=True)
class Reading:
    background: str
    colour: str | None  # None: no subject found
    position: str | None
    shape: str | None


def read(img: np.ndarray) -> Reading:
    """What an image shows, by the benchmark's segmentation (see the module docstring)."""
    m = _metrics()
    background = m.nearest_colour(m.background_colour(img))
    mask = m.foreground_mask(img)
    if int(mask.sum()) < m.MIN_PIXELS:
        return Reading(background, None, None, None)
    hist = (m._palette_weights(img.astype(np.float32)) * mask[..., None]).sum((0, 1))
    colour = m.PALETTE_NAMES[int(np.argmax(hist))]
    ys, xs = np.nonzero(mask)
    position = m.cell_of(float(xs.mean()) + 0.5, float(ys.mean()) + 0.5, size=img.shape[1])
    scores = shape_scores(mask)
    shape = max(world.SHAPES, key=lambda k: scores[k])
    return Reading(background, colour, position, shape)


def caption_set(per_shape: int = 6, size: str = "large", seed: int = 0) -> list[world.Spec]:
    """Every shape per_shape times: colours, backgrounds (a different colour) and positions cycled."""
    rng = np.random.default_rng(seed)
    specs = []
    for k in range(per_shape):
        for j, shape in enumerate(world.SHAPES):
            i = k * len(world.SHAPES) + j
            colour = world.COLOUR_NAMES[i % len(world.COLOUR_NAMES)]
            others = [c for c in world.COLOUR_NAMES if c != colour]
            bg = others[int(rng.integers(len(others)))]
            position = world.POSITIONS[(i * 4) % len(world.POSITIONS)]
            specs.append(world.Spec(shape, colour, size, position, bg))
    return specs


def partial_caption(spec: world.Spec) -> str:
    """The caption without its size and colour words: "a star on a blue background, top left"."""
    return world.caption_with(spec, ("background", "position"))


ATTRIBUTES = ("background", "colour", "position", "shape")


def score(images: np.ndarray, specs: list[world.Spec], colour_asked: bool = True) -> dict:
    """Accuracy per attribute, the share of images with a subject, and the shape confusion counts.
    colour_asked False (partial captions): no colour accuracy is reported."""
    hits = {a: 0 for a in ATTRIBUTES}
    found = 0
    confusion = {s: {t: 0 for t in (*world.SHAPES, "none")} for s in world.SHAPES}
    for img, spec in zip(images, specs):
        r = read(img)
        found += r.shape is not None
        hits["background"] += r.background == spec.background
        hits["colour"] += r.colour == spec.colour
        hits["position"] += r.position == spec.position
        hits["shape"] += r.shape == spec.shape
        confusion[spec.shape][r.shape or "none"] += 1
    n = len(specs)
    asked = ATTRIBUTES if colour_asked else tuple(a for a in ATTRIBUTES if a != "colour")
    return {**{f"{a}_acc": hits[a] / n for a in asked}, "subject_found": found / n, "images": n,
            "shape_chance": 1 / len(world.SHAPES), "shape_confusion": confusion}


def check_world(per_shape: int = 6) -> dict:
    """The reader on the world's own renders of the caption set (large and small): its ceiling."""
    out = {}
    for size in world.SIZES:
        specs = caption_set(per_shape, size)
        out[size] = score(np.stack([world.render(s) for s in specs]), specs)
    return out


def assess(transformer, text_encoder, shift: float = 1.0, steps: int = 30, guidance: float = 3.0, seed: int = 0,
           per_shape: int = 6, partial: bool = False) -> tuple[dict, np.ndarray]:
    """Generate the caption set (seed, steps, guidance as the model card's grid) and score it; partial: the
    captions without size and colour words (`partial_caption`)."""
    from .pipeline import generate

    specs = caption_set(per_shape)
    captions = [partial_caption(s) if partial else world.caption(s) for s in specs]
    images = generate(transformer, text_encoder, captions, seed=seed, steps=steps, guidance=guidance, shift=shift)
    return score(images, specs, colour_asked=not partial), images


def table(result: dict) -> str:
    """A markdown table of the accuracies."""
    rows = [("background colour", "background_acc"), ("foreground colour", "colour_acc"),
            ("position (3x3 cell)", "position_acc"), ("shape (chance 0.14)", "shape_acc"),
            ("a subject drawn at all", "subject_found")]
    lines = ["| read back from the pixels | accuracy |", "|---|---|"]
    lines += [f"| {name} | {result[key]:.2f} |" for name, key in rows if key in result]
    return "\n".join(lines)


def confusion_table(conf: dict) -> str:
    """A markdown table of the shape confusion counts (rows: asked, columns: read)."""
    cols = list(next(iter(conf.values())))
    lines = ["| asked | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    lines += [f"| {a} | " + " | ".join(str(row[c]) for c in cols) + " |" for a, row in conf.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgeblock.builtin.assess", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model directory (default: the shipped built-in model)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-shape", type=int, default=6)
    p.add_argument("--world", action="store_true", help="score the world's own renders instead (the reader's ceiling)")
    p.add_argument("--partial", action="store_true",
                   help="captions without size and colour words, as the benchmark's prompts (colour not scored)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.steps < 1 or args.per_shape < 1:
        p.error("--steps and --per-shape must be >= 1")
    if args.world and args.partial:
        p.error("--partial asks the model; --world reads the world's own renders (no captions): choose one")
    if args.world:
        res = check_world(args.per_shape)
    else:
        from ..generate import model_meta
        from .pipeline import MODEL_DIR, load_builtin

        model_dir = args.model or MODEL_DIR
        transformer, enc = load_builtin(model_dir=model_dir)
        res, _ = assess(transformer, enc, model_meta(model_dir)["shift"], args.steps, args.guidance, args.seed,
                        args.per_shape, args.partial)
    if args.json:
        print(json.dumps(res, indent=2))
    elif args.world:
        for size, r in res.items():
            print(f"world renders, {size}:\n{table(r)}\n")
    else:
        print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
