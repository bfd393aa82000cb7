"""The text encoders and the latent codec of a model, loaded component by component (no pipeline class).

`load_text_stack` composes a family's encoders as its diffusers pipeline's encode_prompt does and finds
the subject/class-noun token spans (text_stacks.py); `load_codec` wraps its VAE with the pipeline's latent scaling
(codec.py); the pipeline directory itself is read by pipeline_dir.py. This module gathers their names.
"""

from __future__ import annotations

from . import builtin_dir  # noqa: F401 - kept for callers (and tests) that look it up here
from .codec import LatentCodec, load_codec
from .pipeline_dir import FAMILY_OF_TRANSFORMER, PipelineDir, is_builtin, read_pipeline
from .text_stacks import (
    BUILTIN_MAX_LENGTH,
    DEFAULT_MAX_SEQUENCE_LENGTH,
    BuiltinTextStack,
    FluxTextStack,
    MaskedTextStack,
    SD3TextStack,
    TextStack,
    load_text_stack,
)

__all__ = [
    "BUILTIN_MAX_LENGTH",
    "DEFAULT_MAX_SEQUENCE_LENGTH",
    "FAMILY_OF_TRANSFORMER",
    "BuiltinTextStack",
    "FluxTextStack",
    "LatentCodec",
    "MaskedTextStack",
    "PipelineDir",
    "SD3TextStack",
    "TextStack",
    "is_builtin",
    "load_codec",
    "load_text_stack",
    "read_pipeline",
]
