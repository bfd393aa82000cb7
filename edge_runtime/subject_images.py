"""A personalization job's subject images: checked against the limits, decoded (PNG or JPEG), centre-cropped and
resized to the generation side, kept as PNGs so that a resumed job reads the same pixels; and the error bad input
for a job raises (edge_runtime.personalize re-exports both)."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np


class PersonalizeError(ValueError):
    """Bad input for a personalization job (the message names the limit or the problem)."""


@dataclass
class ImageLimits:
    max_images: int = 16
    max_image_bytes: int = 16 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    min_side: int = 16


def decode_images(blobs: list[bytes], limits: ImageLimits, side: int) -> tuple[list[np.ndarray], list[bytes]]:
    """PNG/JPEG bytes -> (square images (side, side, 3) float32 in [-1, 1], the same as PNG bytes).

    Each image is centre-cropped to a square and resized to `side` (the generation resolution: the
    whole image is what f = 1 crops). Errors name the limit broken.
    """
    from PIL import Image, UnidentifiedImageError

    if not blobs:
        raise PersonalizeError("no images: give 1 to max_images images")
    if len(blobs) > limits.max_images:
        raise PersonalizeError(f"{len(blobs)} images, more than max_images={limits.max_images}")
    out, pngs = [], []
    for i, data in enumerate(blobs):
        if len(data) > limits.max_image_bytes:
            raise PersonalizeError(f"image {i}: {len(data)} bytes, more than max_image_bytes={limits.max_image_bytes}")
        try:
            with Image.open(io.BytesIO(data)) as im:
                if im.format not in ("PNG", "JPEG"):
                    raise PersonalizeError(f"image {i}: format {im.format}, only PNG and JPEG are accepted")
                w, h = im.size
                if w * h > limits.max_image_pixels:
                    raise PersonalizeError(f"image {i}: {w}x{h} pixels, more than max_image_pixels={limits.max_image_pixels}")
                if min(w, h) < limits.min_side:
                    raise PersonalizeError(f"image {i}: {w}x{h}, smaller than min_side={limits.min_side}")
                rgb = im.convert("RGB")
                rgb.load()
        except PersonalizeError:
            raise
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
            raise PersonalizeError(f"image {i}: not a decodable PNG/JPEG ({type(e).__name__})") from e
        s = min(w, h)
        box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
        sq = rgb.crop(box).resize((side, side), Image.Resampling.BICUBIC) if (s != side or w != h) else rgb
        buf = io.BytesIO()
        sq.save(buf, format="PNG")
        pngs.append(buf.getvalue())
        out.append(np.asarray(sq, dtype=np.float32) / 127.5 - 1.0)
    return out, pngs


def images_from_pngs(pngs: list[bytes]) -> list[np.ndarray]:
    from PIL import Image

    return [np.asarray(Image.open(io.BytesIO(p)).convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for p in pngs]
