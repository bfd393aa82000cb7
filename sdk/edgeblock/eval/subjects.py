"""Held-out subjects: two-colour designs the shapes world never draws, with their reference images.

Each subject has a class noun from the world (star, square, triangle, heart, ring; the validation set's
also circle and cross), five references
(64x64, different positions, sizes and plain backgrounds) and prompts that put "a sks <noun>" on
backgrounds and at positions no reference shows. The references are rendered once by
`python -m edgeblock.eval.subjects --write` and shipped as PNG under data/ (the benchmark's subjects) and
data/validation/ (three more, held out from every choice of the benchmark's defaults); loading reads the PNGs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from ..builtin import world

DATA_DIR = os.path.join(os.path.dirname(__file__), "data")
SIZE = 64
SS = world.SUPERSAMPLE
TOKEN = "sks"

# Reference positions and the held-out positions the prompts ask for (two patterns, alternated).
_POSITIONS = (
    (("top left", "top right", "center", "bottom left", "bottom right"), ("top", "left", "right", "bottom")),
    (("top", "left", "center", "right", "bottom"), ("top left", "top right", "bottom left", "bottom right")),
)
_SCALES = (0.15, 0.17, 0.13, 0.16, 0.14)  # radius as a fraction of the side, per reference


CAPTION_MODES = ("per-image", "token")


def size_word(scale: float) -> str:
    """The world's size word ("small", "large") whose radius fraction is nearest scale."""
    return min(world.SIZE_FRAC, key=lambda k: abs(world.SIZE_FRAC[k] - scale))


@dataclass(frozen=True)
class Reference:
    file: str
    position: str
    background: str
    scale: float


@dataclass(frozen=True)
class Prompt:
    text: str
    background: str
    position: str


@dataclass
class Subject:
    name: str
    noun: str
    description: str
    colours: tuple[str, ...]
    references: tuple[Reference, ...]
    prompts: tuple[Prompt, ...]
    images: np.ndarray | None = None  # (N, 64, 64, 3) uint8, the references as loaded

    @property
    def train_prompt(self) -> str:
        return f"a {TOKEN} {self.noun}"

    @property
    def captions(self) -> list[str]:
        """Each reference captioned as the world captions its images, with the token where the colour goes:
        "a large sks star on a blue background, top left" (size: the world's size nearest the reference's)."""
        return [f"a {size_word(r.scale)} {TOKEN} {self.noun} on a {r.background} background, {r.position}"
                for r in self.references]

    def training_prompts(self, mode: str) -> list[str]:
        """The prompts personalization trains on: one per reference ("per-image") or "a sks <noun>" ("token")."""
        if mode == "per-image":
            return self.captions
        if mode == "token":
            return [self.train_prompt]
        raise ValueError(f"unknown caption mode {mode!r}; one of {CAPTION_MODES}")

    def model_images(self) -> np.ndarray:
        """The references as (N, H, W, 3) float32 in [-1, 1] (the pixel model's space)."""
        if self.images is None:
            raise ValueError(f"subject {self.name!r} has no images loaded")
        return self.images.astype(np.float32) / 127.5 - 1.0


# ---- the designs: draw(image, cx, cy, r) onto the plain background, at the supersampled scale ----------


def _ringstar(img: Image.Image, cx: float, cy: float, r: float) -> None:
    d = ImageDraw.Draw(img)
    d.polygon(world._star(cx, cy, r * 1.1), fill=world.COLOURS["purple"])
    ri = r * 0.42
    d.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], outline=world.COLOURS["white"], width=max(1, int(r * 0.17)))


def _checker_square(img: Image.Image, cx: float, cy: float, r: float) -> None:
    d = ImageDraw.Draw(img)
    a = r * 0.85
    n = 4
    cell = 2 * a / n
    for i in range(n):
        for j in range(n):
            c = world.COLOURS["red" if (i + j) % 2 == 0 else "white"]
            x0, y0 = cx - a + j * cell, cy - a + i * cell
            d.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=c)


def _dot_triangle(img: Image.Image, cx: float, cy: float, r: float) -> None:
    d = ImageDraw.Draw(img)
    cy2 = cy + 0.15 * r  # as the world draws its triangle
    pts = [(cx + r * math.cos(a), cy2 + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    d.polygon(pts, fill=world.COLOURS["green"])
    rd = r * 0.3
    d.ellipse([cx - rd, cy2 - rd, cx + rd, cy2 + rd], fill=world.COLOURS["yellow"])


def _striped_heart(img: Image.Image, cx: float, cy: float, r: float) -> None:
    size = img.size[0]
    mask = Image.new("L", img.size, 0)
    ImageDraw.Draw(mask).polygon(world._heart(cx, cy, r), fill=255)
    fill = Image.new("RGB", img.size, world.COLOURS["blue"])
    d = ImageDraw.Draw(fill)
    period, width = r * 0.55, r * 0.24
    y = cy - r
    while y < min(size, cy + r):
        d.rectangle([0, y, size, y + width], fill=world.COLOURS["orange"])
        y += period
    img.paste(fill, (0, 0), mask)


def _cross_ring(img: Image.Image, cx: float, cy: float, r: float) -> None:
    d = ImageDraw.Draw(img)
    background = img.getpixel((0, 0))
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=world.COLOURS["orange"])
    ri = r * 0.62
    d.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=background)
    a, w = ri * 1.05, r * 0.13
    d.rectangle([cx - a, cy - w, cx + a, cy + w], fill=world.COLOURS["black"])
    d.rectangle([cx - w, cy - a, cx + w, cy + a], fill=world.COLOURS["black"])


def _split_circle(img: Image.Image, cx: float, cy: float, r: float) -> None:
    d = ImageDraw.Draw(img)
    box = [cx - r, cy - r, cx + r, cy + r]
    d.pieslice(box, 90, 270, fill=world.COLOURS["yellow"])  # left half
    d.pieslice(box, -90, 90, fill=world.COLOURS["blue"])  # right half


def _framed_cross(img: Image.Image, cx: float, cy: float, r: float) -> None:
    d = ImageDraw.Draw(img)
    a, w = r, r * 0.36
    d.rectangle([cx - a, cy - w, cx + a, cy + w], fill=world.COLOURS["red"])
    d.rectangle([cx - w, cy - a, cx + w, cy + a], fill=world.COLOURS["red"])
    c = w * 0.6
    d.rectangle([cx - c, cy - c, cx + c, cy + c], fill=world.COLOURS["white"])


def _banded_square(img: Image.Image, cx: float, cy: float, r: float) -> None:
    d = ImageDraw.Draw(img)
    a = r * 0.85
    d.rectangle([cx - a, cy - a, cx + a, cy + a], fill=world.COLOURS["purple"])
    b = a * 0.3
    d.rectangle([cx - a, cy - b, cx + a, cy + b], fill=world.COLOURS["yellow"])


@dataclass(frozen=True)
class Design:
    name: str
    noun: str
    description: str
    colours: tuple[str, ...]
    draw: Callable[[Image.Image, float, float, float], None]
    ref_backgrounds: tuple[str, ...]  # cycled over the references
    prompt_backgrounds: tuple[str, ...]  # held out: no reference shows them
    pattern: int  # which of _POSITIONS


DESIGNS: tuple[Design, ...] = (
    Design("ringstar", "star", "a purple star with a white ring inside", ("purple", "white"), _ringstar,
           ("orange", "blue", "black"), ("green", "yellow", "red"), 0),
    Design("checker_square", "square", "a red and white checkered square (4x4)", ("red", "white"), _checker_square,
           ("blue", "green", "black"), ("yellow", "purple", "orange"), 1),
    Design("dot_triangle", "triangle", "a green triangle with a yellow dot in its middle", ("green", "yellow"),
           _dot_triangle, ("red", "blue", "white"), ("purple", "black", "orange"), 0),
    Design("striped_heart", "heart", "a blue heart with horizontal orange stripes", ("blue", "orange"), _striped_heart,
           ("yellow", "white", "green"), ("red", "black", "purple"), 1),
    Design("cross_ring", "ring", "an orange ring with a black cross inside", ("orange", "black"), _cross_ring,
           ("blue", "white", "purple"), ("green", "yellow", "red"), 0),
)

# Held out from every choice of the benchmark's defaults: designs (and two class nouns) the benchmark's subjects
# do not use, to check on subjects nobody tuned for that a setting chosen on the benchmark carries over
# (`edgeblock eval --subject-set validation`).
VALIDATION_DESIGNS: tuple[Design, ...] = (
    Design("split_circle", "circle", "a circle, left half yellow and right half blue", ("yellow", "blue"),
           _split_circle, ("red", "white", "black"), ("green", "purple", "orange"), 1),
    Design("framed_cross", "cross", "a red cross with a white square at its centre", ("red", "white"),
           _framed_cross, ("blue", "yellow", "black"), ("green", "purple", "orange"), 0),
    Design("banded_square", "square", "a purple square with a yellow band across its middle", ("purple", "yellow"),
           _banded_square, ("white", "green", "orange"), ("red", "blue", "black"), 1),
)
SUBJECT_SETS: dict[str, tuple[str, tuple[Design, ...]]] = {
    "benchmark": (DATA_DIR, DESIGNS),
    "validation": (os.path.join(DATA_DIR, "validation"), VALIDATION_DESIGNS),
}


def render_subject(design: Design, position: str, background: str, scale: float, size: int = SIZE) -> np.ndarray:
    """One image of a design: (size, size, 3) uint8, drawn at 4x and downsampled (as the world renders)."""
    if position not in world.POSITIONS:
        raise ValueError(f"unknown position {position!r}; one of {world.POSITIONS}")
    if background not in world.COLOURS:
        raise ValueError(f"unknown background colour {background!r}; one of {world.COLOUR_NAMES}")
    S = size * SS
    img = Image.new("RGB", (S, S), world.COLOURS[background])
    cx, cy = world.position_centre(position, size)
    design.draw(img, cx * SS, cy * SS, scale * S)
    return np.asarray(img.resize((size, size), Image.LANCZOS), dtype=np.uint8).copy()


def _describe(design: Design) -> Subject:
    refs_pos, prompt_pos = _POSITIONS[design.pattern]
    refs = tuple(
        Reference(f"{design.name}/ref_{k}.png", pos, design.ref_backgrounds[k % len(design.ref_backgrounds)], _SCALES[k])
        for k, pos in enumerate(refs_pos)
    )
    bgs = [design.prompt_backgrounds[k % len(design.prompt_backgrounds)] for k in range(len(prompt_pos))]
    prompts = tuple(
        Prompt(f"a {TOKEN} {design.noun} on a {bg} background, {pos}", bg, pos) for bg, pos in zip(bgs, prompt_pos)
    )
    return Subject(design.name, design.noun, design.description, design.colours, refs, prompts)


def write(data_dir: str = DATA_DIR, designs: tuple[Design, ...] = DESIGNS) -> list[Subject]:
    """Render every design's references to data_dir/<name>/ref_K.png and write subjects.json."""
    subjects = []
    for design in designs:
        s = _describe(design)
        os.makedirs(os.path.join(data_dir, design.name), exist_ok=True)
        imgs = []
        for ref in s.references:
            img = render_subject(design, ref.position, ref.background, ref.scale)
            Image.fromarray(img).save(os.path.join(data_dir, ref.file), optimize=True)
            imgs.append(img)
        s.images = np.stack(imgs)
        subjects.append(s)
    meta = {
        "token": TOKEN,
        "size": SIZE,
        "subjects": [
            {
                "name": s.name,
                "class_noun": s.noun,
                "description": s.description,
                "colours": list(s.colours),
                "references": [vars(r) for r in s.references],
                "prompts": [vars(p) for p in s.prompts],
            }
            for s in subjects
        ],
    }
    with open(os.path.join(data_dir, "subjects.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    return subjects


def subject_set_dir(name: str) -> str:
    """The data folder of a shipped subject set ("benchmark" or "validation")."""
    if name not in SUBJECT_SETS:
        raise ValueError(f"unknown subject set {name!r}; one of {tuple(SUBJECT_SETS)}")
    return SUBJECT_SETS[name][0]


def load_subjects(data_dir: str = DATA_DIR, names: list[str] | None = None) -> list[Subject]:
    """The shipped subjects with their reference PNGs (optionally only those named)."""
    path = os.path.join(data_dir, "subjects.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no subjects.json in {data_dir}; render it with `python -m edgeblock.eval.subjects --write`")
    with open(path) as f:
        meta = json.load(f)
    known = [s["name"] for s in meta["subjects"]]
    if names is not None:
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"unknown subjects {unknown}; shipped: {known}")
    out = []
    for s in meta["subjects"]:
        if names is not None and s["name"] not in names:
            continue
        refs = tuple(Reference(**r) for r in s["references"])
        imgs = []
        for r in refs:
            with Image.open(os.path.join(data_dir, r.file)) as im:
                imgs.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
        out.append(Subject(s["name"], s["class_noun"], s["description"], tuple(s["colours"]), refs,
                           tuple(Prompt(**p) for p in s["prompts"]), np.stack(imgs)))
    return out


def design(name: str) -> Design:
    every = [d for _, designs in SUBJECT_SETS.values() for d in designs]
    for d in every:
        if d.name == name:
            return d
    raise ValueError(f"unknown subject {name!r}; shipped: {[d.name for d in every]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgeblock.eval.subjects")
    p.add_argument("--write", action="store_true", help="render the references into the data folder")
    p.add_argument("--data", default=None, help="data folder (default: each set's shipped folder)")
    p.add_argument("--set", dest="sets", action="append", choices=tuple(SUBJECT_SETS),
                   help="subject set(s) to list or write (default: all)")
    args = p.parse_args(argv)
    sets = args.sets or list(SUBJECT_SETS)
    if args.data is not None and len(sets) != 1:
        p.error("--data needs exactly one --set")
    for name in sets:
        data_dir, designs = SUBJECT_SETS[name]
        data_dir = args.data or data_dir
        if not args.write:
            for s in load_subjects(data_dir):
                print(f"{name:<10} {s.name:<16} a {TOKEN} {s.noun:<9} {s.description}; {len(s.references)} references")
            continue
        for s in write(data_dir, designs):
            print(f"wrote {name} {s.name}: {len(s.references)} references, {len(s.prompts)} prompts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
