"""DreamBench metrics from local weights: DINO, CLIP-I, CLIP-T (Ruiz et al., DreamBooth).

DINO: cosine similarity of the ViT [CLS] embeddings of a generated image and each reference, averaged.
CLIP-I: the same with CLIP image embeddings. CLIP-T: cosine of the CLIP image embedding and the
CLIP text embedding of the prompt with the subject token removed ("a sks star" -> "a star").
Weights load from a local folder only (transformers, local_files_only=True); nothing is downloaded.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _check_dir(path: str, what: str) -> str:
    if not os.path.isdir(path) or not os.path.exists(os.path.join(path, "config.json")):
        raise ValueError(
            f"--{what} {path!r}: expected a local transformers model folder (config.json + weights, "
            "as save_pretrained writes it); nothing is downloaded"
        )
    return path


def _processor(path: str, image_size: int, mean, std):
    """The folder's image processor, or a plain resize + normalise at the model's input size."""
    try:
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        return lambda imgs: proc(images=list(imgs), return_tensors="pt")["pixel_values"]
    except (OSError, ValueError):
        pass

    def plain(imgs: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W)
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bicubic", align_corners=False)
        m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
        return (x.clamp(0, 1) - m) / s

    return plain


def _features(out) -> torch.Tensor:
    """transformers 5 returns a model output from get_*_features; older versions a tensor."""
    if isinstance(out, torch.Tensor):
        return out
    return out.pooler_output


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1)
    return a @ b.T


def strip_token(prompt: str, token: str = "sks") -> str:
    """The prompt as CLIP-T reads it: the rare token removed ("a sks star on ..." -> "a star on ...")."""
    return re.sub(r"\s+", " ", re.sub(rf"(?<!\w){re.escape(token)}(?!\w)", "", prompt)).strip()


class DinoScorer:
    """DINO: mean cosine similarity of [CLS] embeddings (a ViT folder: AutoModel)."""

    def __init__(self, path: str):
        from transformers import AutoModel

        self.model = AutoModel.from_pretrained(_check_dir(path, "dino"), local_files_only=True).eval()
        size = getattr(self.model.config, "image_size", 224)
        self.prep = _processor(path, size if isinstance(size, int) else size[0], IMAGENET_MEAN, IMAGENET_STD)

    @torch.no_grad()
    def embed(self, images: np.ndarray) -> torch.Tensor:
        return self.model(pixel_values=self.prep(images)).last_hidden_state[:, 0]

    def score(self, images: np.ndarray, references: np.ndarray) -> np.ndarray:
        """(B,) mean similarity of each image to the references."""
        return _cos(self.embed(images), self.embed(references)).mean(1).numpy()


class ClipScorer:
    """CLIP-I and CLIP-T (a CLIPModel folder with its tokenizer and, optionally, image processor)."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer, CLIPModel

        self.model = CLIPModel.from_pretrained(_check_dir(path, "clip"), local_files_only=True).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)
        size = int(self.model.config.vision_config.image_size)
        self.prep = _processor(path, size, CLIP_MEAN, CLIP_STD)

    @torch.no_grad()
    def embed_images(self, images: np.ndarray) -> torch.Tensor:
        return _features(self.model.get_image_features(pixel_values=self.prep(images)))

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        tok = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return _features(self.model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]))

    def clip_i(self, images: np.ndarray, references: np.ndarray) -> np.ndarray:
        return _cos(self.embed_images(images), self.embed_images(references)).mean(1).numpy()

    def clip_t(self, images: np.ndarray, prompts: Sequence[str], token: str = "sks") -> np.ndarray:
        t = self.embed_texts([strip_token(p, token) for p in prompts])
        return torch.diagonal(_cos(self.embed_images(images), t)).numpy()


class DreamBench:
    """The DreamBench metrics whose weights were given: score() returns only those."""

    def __init__(self, dino: str | None = None, clip: str | None = None):
        self.dino = DinoScorer(dino) if dino else None
        self.clip = ClipScorer(clip) if clip else None

    @property
    def enabled(self) -> bool:
        return self.dino is not None or self.clip is not None

    def score(self, images: np.ndarray, references: np.ndarray, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        if self.dino is not None:
            out["dino"] = self.dino.score(images, references)
        if self.clip is not None:
            out["clip_i"] = self.clip.clip_i(images, references)
            out["clip_t"] = self.clip.clip_t(images, prompts)
        return out
