"""Calibration sets for block selection: subject images + prompts with the subject's token positions.

Images come from the user (--images) or, by default, from the procedural
shapes world (one shape, several placements), which any model can be probed with.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .method.selection import CalibrationItem
from .models import LoadedModel

DEFAULT_PROMPT = "a photo of {token} {noun}"


def _load_image(path: str, res: int) -> np.ndarray:
    try:
        img = Image.open(path).convert("RGB")
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}")
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    img = img.crop((left, top, left + side, top + side)).resize((res, res), Image.Resampling.LANCZOS)
    return np.asarray(img, dtype=np.uint8)


def _shape_images(count: int, res: int, seed: int) -> tuple[list[np.ndarray], str]:
    from .builtin import world

    rng = np.random.default_rng(seed)
    shape = "star"
    out = []
    for _ in range(count):
        spec = world.sample_spec(rng)
        spec = world.Spec(shape, spec.colour, spec.size, spec.position, spec.background, spec.texture)
        out.append(world.render(spec, res))
    return out, shape


def calibration_set(
    spec: str,
    loaded: LoadedModel,
    images: list[str] | None,
    token: str,
    class_noun: str | None,
    prompt: str | None,
    res: int | None,
    count: int,
    seed: int = 0,
) -> list[CalibrationItem]:
    from .models.pipeline_parts import load_codec, load_text_stack

    codec = load_codec(spec)
    res = res or (64 if spec == "builtin" else 512)
    if res % (codec.downsample * 2):
        raise ValueError(f"--res {res} must be divisible by {codec.downsample * 2} for this model")
    if images:
        pixels = [_load_image(p, res) for p in images]
        if class_noun is None:
            raise ValueError("--class-noun is required with --images (e.g. --class-noun dog)")
        noun = class_noun
    else:
        pixels, noun = _shape_images(count, res, seed)
        noun = class_noun or noun
    text = load_text_stack(spec)
    template = prompt or DEFAULT_PROMPT
    if "{token}" not in template:
        raise ValueError(f"the calibration prompt must contain {{token}}: {template!r}")
    sentence = template.format(token=token, noun=noun)
    words = [token] + ([noun] if "{noun}" in template else [])
    cond = text.encode([sentence])
    positions = tuple(text.positions(sentence, words))
    items = []
    with torch.no_grad():
        for px in pixels:
            x = torch.from_numpy(px.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]  # (1, 3, H, W)
            items.append(CalibrationItem(codec.encode(x), cond, positions))
    return items
