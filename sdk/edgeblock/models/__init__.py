"""Family adapters: a diffusers DiT as prologue -> blocks -> epilogue, and how to load one.

`load_model` takes `builtin` or a local diffusers pipeline (or transformer)
directory; `adapter_from_module` wraps an in-memory model (tests, tiny configs).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from torch import nn

from .base import DiTAdapter, DiTInputs, State, WeightSource
from .flux import FluxAdapter
from .objectives import EpsilonDDPM, FlowMatching, Objective, objective_from_scheduler
from .pixart import PixArtAdapter
from .sana import SanaAdapter
from .sd3 import SD3Adapter

ADAPTERS: dict[str, type[DiTAdapter]] = {
    "FluxTransformer2DModel": FluxAdapter,
    "SD3Transformer2DModel": SD3Adapter,
    "PixArtTransformer2DModel": PixArtAdapter,
    "SanaTransformer2DModel": SanaAdapter,
}


class ModelError(ValueError):
    """A model that cannot be loaded: the message says what was found and what is supported."""


@dataclass
class LoadedModel:
    adapter: DiTAdapter
    objective: Objective
    root: str | None  # the pipeline directory, if any
    transformer_dir: str | None


def adapter_class(class_name: str | None) -> type[DiTAdapter]:
    if class_name not in ADAPTERS:
        raise ModelError(
            f"unsupported transformer class {class_name!r}; supported: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[class_name]


def adapter_from_module(model: nn.Module, latent_channels: int | None = None) -> DiTAdapter:
    """Wrap an in-memory diffusers transformer (its weights are shared, not copied twice at rest)."""
    cls = adapter_class(type(model).__name__)
    return cls(dict(model.config), WeightSource.from_module(model), latent_channels)


def model_from_config(config: dict | str, latent_channels: int | None = None, seed: int = 0) -> LoadedModel:
    """A random-initialised model of a diffusers transformer config (a dict or a config.json path)."""
    import diffusers
    import torch

    if isinstance(config, str):
        config = _read_json(config)
    cls = adapter_class(config.get("_class_name"))
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    torch.manual_seed(seed)
    model = getattr(diffusers, cls.model_class.__name__)(**kwargs)
    adapter = cls(dict(model.config), WeightSource.from_module(model), latent_channels)
    return LoadedModel(adapter, objective_from_scheduler(None, cls.family), None, None)


def builtin_dir() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(__file__)), "builtin", "model")


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def load_model(spec: str, latent_channels: int | None = None) -> LoadedModel:
    """`builtin`, a diffusers pipeline directory (model_index.json + transformer/), or a transformer folder."""
    path = builtin_dir() if spec == "builtin" else spec
    if not os.path.isdir(path):
        raise ModelError(
            f"model {spec!r}: no such directory. Give `builtin` or a local diffusers pipeline directory "
            "(as DiffusionPipeline.save_pretrained writes it: model_index.json, transformer/, scheduler/ ...)"
        )
    if os.path.exists(os.path.join(path, "transformer", "config.json")):
        root, tdir = path, os.path.join(path, "transformer")
    elif os.path.exists(os.path.join(path, "config.json")):
        root, tdir = None, path
    else:
        raise ModelError(
            f"model {spec!r}: {path} has no transformer (found: {sorted(os.listdir(path))}); expected "
            "transformer/config.json with its safetensors weights"
        )
    config = _read_json(os.path.join(tdir, "config.json"))
    cls = adapter_class(config.get("_class_name"))
    sched = None
    if root and os.path.exists(os.path.join(root, "scheduler", "scheduler_config.json")):
        sched = _read_json(os.path.join(root, "scheduler", "scheduler_config.json"))
    if latent_channels is None and root and os.path.exists(os.path.join(root, "vae", "config.json")):
        latent_channels = _read_json(os.path.join(root, "vae", "config.json")).get("latent_channels")
    if latent_channels is None and os.path.exists(os.path.join(root or tdir, "edgeblock.json")):
        latent_channels = _read_json(os.path.join(root or tdir, "edgeblock.json")).get("latent_channels")
    adapter = cls(config, WeightSource.from_dir(tdir), latent_channels)
    return LoadedModel(adapter, objective_from_scheduler(sched, cls.family), root, tdir)


__all__ = [
    "ADAPTERS",
    "DiTAdapter",
    "DiTInputs",
    "EpsilonDDPM",
    "FlowMatching",
    "LoadedModel",
    "ModelError",
    "Objective",
    "State",
    "WeightSource",
    "adapter_from_module",
    "load_model",
    "model_from_config",
]
