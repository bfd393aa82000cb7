"""A diffusers pipeline directory as compile and the method read it: model_index.json, its family, and the
transformers models and tokenizers of its components (no pipeline class is built)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import ModelError

# model_index.json's transformer class -> family
FAMILY_OF_TRANSFORMER: dict[str, str] = {
    "FluxTransformer2DModel": "flux",
    "SD3Transformer2DModel": "sd3",
    "PixArtTransformer2DModel": "pixart",
    "SanaTransformer2DModel": "sana",
}


@dataclass
class PipelineDir:
    """A local diffusers pipeline directory: its model_index.json and the family it holds."""

    root: str
    index: dict[str, Any]
    family: str

    @property
    def pipeline_class(self) -> str:
        return str(self.index.get("_class_name", "?"))

    def entry(self, name: str) -> tuple[str, str] | None:
        """(library, class) of a component, or None where the pipeline has none."""
        e = self.index.get(name)
        if not isinstance(e, (list, tuple)) or len(e) != 2 or e[0] is None or e[1] is None:
            return None
        return str(e[0]), str(e[1])

    def component(self, name: str, required: bool = True) -> str | None:
        """The folder of component `name`, None if model_index.json lists none (and it is optional)."""
        if self.entry(name) is None:
            if required:
                listed = sorted(k for k in self.index if not k.startswith("_") and self.entry(k) is not None)
                raise ModelError(
                    f"{self.pipeline_class} at {self.root}: model_index.json has no {name!r} "
                    f"(components: {listed}); a {self.family} pipeline needs it"
                )
            return None
        path = os.path.join(self.root, name)
        if not os.path.isdir(path):
            raise ModelError(
                f"{self.pipeline_class} at {self.root}: model_index.json lists {name!r} "
                f"({self.entry(name)[1]}) but there is no {name}/ folder (found: {sorted(os.listdir(self.root))})"
            )
        return path

    def transformer_config(self) -> dict[str, Any]:
        path = os.path.join(self.component("transformer"), "config.json")
        if not os.path.exists(path):
            found = sorted(os.listdir(os.path.dirname(path)))
            raise ModelError(f"{self.root}: transformer/ has no config.json (found: {found})")
        with open(path) as f:
            return json.load(f)


def is_builtin(spec: str) -> bool:
    """`builtin`, its directory, or a directory laid out like it (a pixel-space FLUX transformer/ with
    MiniLM text: edgeblock.json says pixel_space, and there is no model_index.json)."""
    if spec == "builtin":
        return True
    if not os.path.isdir(spec):
        return False
    from . import builtin_dir  # looked up at the call: the package's, as tests may replace it

    if os.path.realpath(spec) == os.path.realpath(builtin_dir()):
        return True
    meta = os.path.join(spec, "edgeblock.json")
    if os.path.exists(os.path.join(spec, "model_index.json")) or not os.path.exists(meta):
        return False
    try:
        with open(meta) as f:
            return bool(json.load(f).get("pixel_space")) and os.path.isdir(os.path.join(spec, "transformer"))
    except (OSError, ValueError):
        return False


def read_pipeline(spec: str) -> PipelineDir:
    """Read model_index.json of a local pipeline directory and name its family."""
    if not os.path.isdir(spec):
        raise ModelError(
            f"model {spec!r}: no such directory. Give `builtin` or a local diffusers pipeline directory "
            "(as DiffusionPipeline.save_pretrained writes it: model_index.json, transformer/, text encoders ...)"
        )
    path = os.path.join(spec, "model_index.json")
    if not os.path.exists(path):
        raise ModelError(
            f"model {spec!r}: no model_index.json (found: {sorted(os.listdir(spec))}); the text encoders and VAE "
            "are read from a full diffusers pipeline directory as DiffusionPipeline.save_pretrained writes it"
        )
    with open(path) as f:
        try:
            index = json.load(f)
        except json.JSONDecodeError as e:
            raise ModelError(f"model {spec!r}: model_index.json is not valid JSON ({e})") from e
    tr = index.get("transformer")
    cls = tr[1] if isinstance(tr, (list, tuple)) and len(tr) == 2 else None
    if cls not in FAMILY_OF_TRANSFORMER:
        components = sorted(k for k in index if not k.startswith("_"))
        what = f"transformer class {cls!r}" if cls else f"no transformer (components: {components})"
        raise ModelError(
            f"model {spec!r} ({index.get('_class_name', '?')}): {what}; supported transformer classes: "
            f"{', '.join(sorted(FAMILY_OF_TRANSFORMER))}"
        )
    return PipelineDir(spec, index, FAMILY_OF_TRANSFORMER[cls])


def _load_transformers_model(pipe: PipelineDir, name: str, dtype: torch.dtype) -> nn.Module:
    import transformers

    path = pipe.component(name)
    lib, cls_name = pipe.entry(name)
    cls = getattr(transformers, cls_name, None) if lib == "transformers" else None
    if cls is None:
        raise ModelError(f"{pipe.root}/{name}: class {lib}.{cls_name} is not a transformers model class")
    model = cls.from_pretrained(path, local_files_only=True, dtype=dtype)
    return model.eval().requires_grad_(False)


def _load_tokenizer(pipe: PipelineDir, name: str):
    from transformers import AutoTokenizer

    path = pipe.component(name)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if not getattr(tok, "is_fast", False):
        raise ModelError(
            f"{pipe.root}/{name}: {type(tok).__name__} is not a fast tokenizer; token spans need offsets "
            "(return_offsets_mapping): supply tokenizer.json"
        )
    return tok
