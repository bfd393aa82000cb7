"""edgeblock.builtin: the project's built-in base text-to-image model.

Shapes-world data, frozen MiniLM text encoder, pixel-space FLUX DiT, its training script and sampler."""
