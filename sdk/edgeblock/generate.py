"""Serverless generation with the built-in model family, and the LoRA adapter file it can apply.

`edgeblock generate --model builtin` runs builtin/pipeline.generate in this process. A model is
`builtin` or a directory laid out like it (transformer/ + edgeblock.json with "pixel_space": true).
An adapter file is edge_runtime.adapter_file's: diffusers/PEFT LoRA safetensors, as the daemon stores and exports
it (LoRA tensors keyed by module path with rank, alpha and target modules in diffusers' metadata).
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
    """Write LoRA tensors (Trainer.lora_state, keyed by module path) as an adapter file (edge_runtime.adapter_file:
    the daemon's format, which diffusers' load_lora_weights reads too)."""
    from edge_runtime import adapter_file

    weights = {k: v.detach().float().cpu().numpy() for k, v in state.items()}
    adapter_file.save(path, weights, spec.alpha, {**(info or {}), "lora_targets": list(spec.targets)})


def load_adapter(path: str) -> tuple[dict[str, Tensor], LoRASpec]:
    """An adapter file (edge_runtime.adapter_file; from the daemon, `save_adapter` or diffusers) -> its tensors and the
    LoRA spec that injects them: its rank and alpha, the modules it names (relative to their block)."""
    from edge_runtime import adapter_file

    try:
        f = adapter_file.load(path)
    except adapter_file.AdapterFileError as e:
        if not os.path.exists(path):
            raise FileNotFoundError(str(e)) from e
        raise ValueError(str(e)) from e
    try:
        targets = tuple(sorted({_block_of(m)[2] for m in f.modules}))
    except ValueError as e:
        raise ValueError(f"{path}: LoRA modules must be keyed <block list>.<index>.<module>; got {f.modules[:3]}") from e
    return {k: torch.from_numpy(v) for k, v in f.weights.items()}, LoRASpec(f.rank, f.alpha, targets)


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
    side = meta["size"]
    return generate(transformer, encoder, prompts, seed=seed, steps=steps, guidance=guidance,
                    size=side, patch=meta["patch"], shift=meta["shift"], noise=seeded_noise(seed, len(prompts), side))


def seeded_noise(seed: int, n: int, side: int) -> Tensor:
    """The starting noise of n images by the daemon's rule (edge_runtime.sampler.initial_noise): image k from
    seed + k, so a prompt and seed give the image the daemon gives for them."""
    from edge_runtime.sampler import initial_noise

    return torch.from_numpy(np.concatenate([initial_noise(seed + k, (1, CHANNELS, side, side)) for k in range(n)]))
