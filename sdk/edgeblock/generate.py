"""Serverless generation with the built-in model family, and the LoRA adapter file it can apply.

`edgeblock generate --model builtin` runs builtin/pipeline.generate in this process. A model is
`builtin` or a directory laid out like it (transformer/ + edgeblock.json with "pixel_space": true).
An adapter file is a safetensors file of LoRA tensors keyed by diffusers module path
(Trainer.lora_state) with its rank, alpha and targets in the metadata.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .method.lora import LoRASpec, add_lora

ADAPTER_FORMAT = "edgeblock-lora/1"
CHANNELS = 3


def pixel_model_dir(model: str) -> str:
    """The directory of `builtin` or of a model laid out like it; ValueError for anything else."""
    from .models import builtin_dir

    path = builtin_dir() if model == "builtin" else model
    if model == "builtin" and not os.path.exists(os.path.join(path, "transformer", "config.json")):
        raise ValueError(f"the built-in model's weights are not in this checkout ({path}/transformer/ is missing)")
    if not os.path.isdir(path):
        raise ValueError(f"model {model!r}: no such directory")
    meta = os.path.join(path, "edgeblock.json")
    pixel = False
    if os.path.exists(meta):
        with open(meta) as f:
            pixel = bool(json.load(f).get("pixel_space"))
    if not pixel or not os.path.exists(os.path.join(path, "transformer", "config.json")):
        raise ValueError(
            f"model {model!r}: serverless generation supports only the built-in model family for now: `builtin`, or "
            "a directory laid out like it (transformer/ and edgeblock.json with \"pixel_space\": true). Latent "
            "diffusers pipelines generate through the device daemon"
        )
    return path


def model_meta(path: str) -> dict:
    """Image side, packing factor, text length and sampling shift of a pixel-space model directory."""
    from .models.objectives import static_shift  # importing the models package imports diffusers: not at start-up

    with open(os.path.join(path, "edgeblock.json")) as f:
        meta = json.load(f)
    with open(os.path.join(path, "transformer", "config.json")) as f:
        cfg = json.load(f)
    patch = math.isqrt(int(cfg["in_channels"]) // CHANNELS)
    if patch * patch * CHANNELS != int(cfg["in_channels"]):
        raise ValueError(f"{path}: in_channels={cfg['in_channels']} is not 3 channels times a square packing factor")
    sched = os.path.join(path, "scheduler", "scheduler_config.json")  # the sampling shift, if the model has one
    shift = 1.0
    if os.path.exists(sched):
        with open(sched) as f:
            shift = static_shift(json.load(f))
    return {"size": int(meta.get("latent_size", 64)), "patch": patch, "text_len": int(meta.get("text_len", 32)),
            "shift": shift}


def load_transformer(path: str) -> nn.Module:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(os.path.join(path, "transformer")).eval().requires_grad_(False)


# ---- adapter files --------------------------------------------------------------------------------


def save_adapter(path: str, state: dict[str, Tensor], spec: LoRASpec, info: dict | None = None) -> None:
    """Write LoRA tensors (Trainer.lora_state) and their spec to a safetensors file."""
    from safetensors.torch import save_file

    meta = {"format": ADAPTER_FORMAT, "lora": json.dumps(spec.to_dict()), "info": json.dumps(info or {})}
    save_file({k: v.detach().contiguous().float() for k, v in state.items()}, path, metadata=meta)


def load_adapter(path: str) -> tuple[dict[str, Tensor], LoRASpec]:
    from safetensors import safe_open

    if not os.path.exists(path):
        raise FileNotFoundError(f"no adapter file {path}")
    try:
        with safe_open(path, framework="pt") as h:
            meta = h.metadata() or {}
            state = {k: h.get_tensor(k) for k in h.keys()}  # noqa: SIM118 (a safetensors handle, not a dict)
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise ValueError(f"{path} is not a safetensors file: {e}") from e
    if meta.get("format") != ADAPTER_FORMAT or "lora" not in meta:
        raise ValueError(f"{path}: not an edgeblock LoRA adapter (metadata format {meta.get('format')!r}, "
                         f"expected {ADAPTER_FORMAT!r})")
    lora = json.loads(meta["lora"])
    return state, LoRASpec(int(lora["rank"]), float(lora["alpha"]), tuple(lora["targets"]))


def _block_of(key: str) -> tuple[str, int, str]:
    lst, idx, rest = key.split(".", 2)
    return lst, int(idx), rest


def apply_adapter(transformer: nn.Module, state: dict[str, Tensor], spec: LoRASpec) -> list[str]:
    """Inject LoRA into the blocks the adapter names and load its tensors; returns those blocks' names."""
    by_block: dict[tuple[str, int], dict[str, Tensor]] = {}
    for k, v in state.items():
        try:
            lst, idx, rest = _block_of(k)
        except ValueError:
            raise ValueError(f"adapter tensor {k!r} is not keyed <block list>.<index>.<module>.lora_A/B.weight")
        by_block.setdefault((lst, idx), {})[rest.replace("lora_A.", "lora_A.default.").replace("lora_B.", "lora_B.default.")] = v
    names = []
    for (lst, idx), tensors in sorted(by_block.items()):
        blocks = getattr(transformer, lst, None)
        if not isinstance(blocks, nn.ModuleList) or not 0 <= idx < len(blocks):
            raise ValueError(f"adapter names block {lst}.{idx}, which this model does not have")
        block = add_lora(blocks[idx], spec)
        own = dict(block.named_parameters())
        unknown = sorted(set(tensors) - set(own))
        if unknown:
            raise ValueError(f"adapter tensors for {lst}.{idx} match no LoRA parameter: {unknown[:3]}")
        with torch.no_grad():
            for k, v in tensors.items():
                if own[k].shape != v.shape:
                    raise ValueError(f"adapter tensor {lst}.{idx}.{k} has shape {tuple(v.shape)}, "
                                     f"the model wants {tuple(own[k].shape)}")
                own[k].copy_(v)
        names.append(f"{lst}.{idx}")
    return names


# ---- generation -----------------------------------------------------------------------------------


def generate_images(
    model: str,
    prompts: Sequence[str],
    seed: int = 0,
    steps: int = 30,
    guidance: float = 3.0,
    adapter: str | None = None,
) -> np.ndarray:
    """(B, H, W, 3) uint8 images for prompts with a pixel-space model (optionally a LoRA adapter)."""
    from .builtin.pipeline import generate
    from .builtin.text import MiniLMTextEncoder

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    path = pixel_model_dir(model)
    meta = model_meta(path)
    transformer = load_transformer(path)
    if adapter:
        apply_adapter(transformer, *load_adapter(adapter))
    encoder = MiniLMTextEncoder()
    return generate(transformer, encoder, prompts, seed=seed, steps=steps, guidance=guidance,
                    size=meta["size"], patch=meta["patch"], shift=meta["shift"])
