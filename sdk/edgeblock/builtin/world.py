"""Procedural, seeded "shapes world": captioned 64x64 images generated on the fly.

One shape (circle, square, triangle, star, ring, cross, heart) in one of eight
colours, small or large, at one of nine grid positions, on a plain, striped or
checkered background in a different colour. Drawn anti-aliased at 4x and
downsampled with Lanczos.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross", "heart")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 180),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES = ("small", "large")
POSITIONS = ("top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right")
TEXTURES = ("plain", "striped", "checkered")
TEXTURE_P = (0.5, 0.25, 0.25)

# radius of the shape as a fraction of the image side
SIZE_FRAC = {"small": 0.11, "large": 0.16}
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Spec:
    shape: str
    colour: str
    size: str
    position: str
    background: str
    texture: str = "plain"


WORLDS = ("full", "shapes", "mix", "plain")


def sample_spec(rng: np.random.Generator, world: str = "full", shapes_share: float = 0.5) -> Spec:
    """One random scene. world "full": every attribute drawn; "shapes": a white shape on plain black, only
    shape, size and position drawn (a curriculum's first stage: shapes before colours and backgrounds);
    "mix": each draw from "shapes" with probability shapes_share, else "full" (a later stage that keeps
    rehearsing shapes); "plain": the full world's draws with every background plain (no stripes or checks;
    the same random draws as "full", so its scenes are the full world's with the texture removed)."""
    if world == "mix":
        if not 0.0 <= shapes_share <= 1.0:
            raise ValueError(f"shapes share must be in [0, 1], got {shapes_share}")
        world = "shapes" if rng.random() < shapes_share else "full"
    if world == "shapes":
        return Spec(shape=SHAPES[rng.integers(len(SHAPES))], colour="white", size=SIZES[rng.integers(len(SIZES))],
                    position=POSITIONS[rng.integers(len(POSITIONS))], background="black", texture="plain")
    if world not in ("full", "plain"):
        raise ValueError(f"unknown world {world!r}; one of {WORLDS}")
    colour = COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
    others = [c for c in COLOUR_NAMES if c != colour]
    spec = Spec(
        shape=SHAPES[rng.integers(len(SHAPES))],
        colour=colour,
        size=SIZES[rng.integers(len(SIZES))],
        position=POSITIONS[rng.integers(len(POSITIONS))],
        background=others[rng.integers(len(others))],
        texture=TEXTURES[rng.choice(len(TEXTURES), p=TEXTURE_P)],
    )
    return replace(spec, texture="plain") if world == "plain" else spec


def caption(spec: Spec) -> str:
    """The complete caption: "a large red star on a blue striped background, top left"."""
    return partial_caption(spec, None, 0.0)


ATTRIBUTES = ("size", "colour", "background", "position")


def partial_caption(spec: Spec, rng: np.random.Generator | None, p: float) -> str:
    """The caption with each attribute (size, colour, background, position) left out with probability p,
    as real captions leave details out: "a red star, top left", "a star on a blue background", "a star".
    The shape is always named. p = 0: caption(spec)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"attribute dropout must be in [0, 1], got {p}")
    return caption_with(spec, [a for a in ATTRIBUTES if not (p and rng.random() < p)])


def caption_with(spec: Spec, keep) -> str:
    """The caption naming the shape and only the attributes in keep (of ATTRIBUTES), in caption order."""
    keep = set(keep)
    if keep - set(ATTRIBUTES):
        raise ValueError(f"unknown caption attributes {sorted(keep - set(ATTRIBUTES))}; known {ATTRIBUTES}")
    words = ["a"] + [w for a, w in (("size", spec.size), ("colour", spec.colour)) if a in keep] + [spec.shape]
    text = " ".join(words)
    if "background" in keep:
        bg = spec.background if spec.texture == "plain" else f"{spec.background} {spec.texture}"
        text += f" on a {bg} background"
    if "position" in keep:
        text += f", {spec.position}"
    return text


def class_captions(shape: str, n: int, seed: int, size: str = "large") -> list[str]:
    """n seeded captions of one shape at one size, colour, place and background drawn as the world draws
    them: the class prompts of prior preservation ("a large green star on a orange background, left")."""
    if shape not in SHAPES:
        raise ValueError(f"{shape!r} is not a shape of the world {SHAPES}")
    if size not in SIZES:
        raise ValueError(f"{size!r} is not a size of the world {SIZES}")
    rng = np.random.default_rng(seed)
    return [caption(replace(sample_spec(rng), shape=shape, size=size)) for _ in range(n)]


def position_centre(position: str, size: int = 64) -> tuple[float, float]:
    """(x, y) centre in pixels of a grid position (3x3 cells)."""
    i = POSITIONS.index(position)
    row, col = divmod(i, 3)
    cell = size / 3.0
    return ((col + 0.5) * cell, (row + 0.5) * cell)


def _texture_colour(rgb):
    # a shade of the background colour, pulled halfway towards mid grey
    return tuple(int(round(0.55 * c + 0.45 * 128)) for c in rgb)


def _star(cx, cy, r, n=5, inner=0.45):
    pts = []
    for k in range(2 * n):
        a = -math.pi / 2 + k * math.pi / n
        rr = r if k % 2 == 0 else r * inner
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def _heart(cx, cy, r, n=120):
    pts = []
    for k in range(n):
        t = 2 * math.pi * k / n
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((cx + r * x / 16.5, cy - r * (y + 2.5) / 15.5))
    return pts


def _draw_shape(img: Image.Image, spec: Spec, S: int, fill, hole) -> None:
    """Draw spec's shape onto img (S x S, the supersampled canvas) in `fill`; a ring's hole is filled by
    `hole(mask)` (the background shows through it)."""
    d = ImageDraw.Draw(img)
    cx, cy = position_centre(spec.position, S // SUPERSAMPLE)
    cx, cy = cx * SUPERSAMPLE, cy * SUPERSAMPLE
    r = SIZE_FRAC[spec.size] * S
    sh = spec.shape
    if sh == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif sh == "square":
        a = r * 0.85
        d.rectangle([cx - a, cy - a, cx + a, cy + a], fill=fill)
    elif sh == "triangle":
        pts = [(cx + r * math.cos(a), cy + 0.15 * r + r * math.sin(a))
               for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        d.polygon(pts, fill=fill)
    elif sh == "star":
        d.polygon(_star(cx, cy, r * 1.1), fill=fill)
    elif sh == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        ri = r * 0.55
        mask = Image.new("L", (S, S), 0)
        ImageDraw.Draw(mask).ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=255)
        hole(mask)
    elif sh == "cross":
        a, w = r, r * 0.33
        d.rectangle([cx - a, cy - w, cx + a, cy + w], fill=fill)
        d.rectangle([cx - w, cy - a, cx + w, cy + a], fill=fill)
    elif sh == "heart":
        d.polygon(_heart(cx, cy, r), fill=fill)
    else:
        raise ValueError(f"unknown shape {sh!r}")


def render(spec: Spec, size: int = 64) -> np.ndarray:
    """Render a spec to a uint8 (size, size, 3) array (deterministic)."""
    S = size * SUPERSAMPLE
    img = render_background(spec, S)
    # the ring's hole shows the background (texture included)
    _draw_shape(img, spec, S, COLOURS[spec.colour], lambda m: img.paste(render_background(spec, S), (0, 0), m))
    img = img.resize((size, size), Image.LANCZOS)
    return np.asarray(img, dtype=np.uint8).copy()


def shape_mask(spec: Spec, size: int = 64) -> np.ndarray:
    """The shape's coverage of each pixel of render(spec, size): float32 (size, size) in [0, 1]."""
    S = size * SUPERSAMPLE
    img = Image.new("L", (S, S), 0)
    _draw_shape(img, spec, S, 255, lambda m: img.paste(0, (0, 0), m))
    return np.asarray(img.resize((size, size), Image.BOX), dtype=np.float32) / 255.0


def render_background(spec: Spec, S: int) -> Image.Image:
    """The background alone at S x S pixels (no supersampling applied)."""
    bg = COLOURS[spec.background]
    img = Image.new("RGB", (S, S), bg)
    d = ImageDraw.Draw(img)
    tc = _texture_colour(bg)
    period = S // 8
    if spec.texture == "striped":
        for x0 in range(0, S, period):
            d.rectangle([x0, 0, x0 + period // 2 - 1, S], fill=tc)
    elif spec.texture == "checkered":
        for i, y0 in enumerate(range(0, S, period)):
            for j, x0 in enumerate(range(0, S, period)):
                if (i + j) % 2:
                    d.rectangle([x0, y0, x0 + period - 1, y0 + period - 1], fill=tc)
    return img


def to_tensor_array(images: list[np.ndarray]) -> np.ndarray:
    """uint8 HxWx3 list -> float32 (B,3,H,W) in [-1, 1]."""
    x = np.stack(images).astype(np.float32) / 127.5 - 1.0
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def batches(seed: int, batch_size: int, size: int = 64, masks: bool = False,
            attr_dropout: float = 0.0, world: str = "full", shapes_share: float = 0.5) -> Iterator[tuple]:
    """Endless iterator of (images float32 (B,3,H,W) in [-1,1], captions), with masks=True also the
    shapes' coverage masks float32 (B,1,H,W) in [0, 1] (shape_mask). attr_dropout: each caption leaves
    each attribute out with this probability (partial_caption; drawn from a stream of its own, so the
    images of a seed do not depend on it). world, shapes_share: what sample_spec draws (one of WORLDS; it
    refuses others)."""
    rng = np.random.default_rng(seed)
    cap_rng = np.random.default_rng([seed, 1])
    while True:
        specs = [sample_spec(rng, world, shapes_share) for _ in range(batch_size)]
        imgs = [render(s, size) for s in specs]
        caps = [partial_caption(s, cap_rng, attr_dropout) for s in specs]
        if masks:
            yield to_tensor_array(imgs), caps, np.stack([shape_mask(s, size) for s in specs])[:, None]
        else:
            yield to_tensor_array(imgs), caps
