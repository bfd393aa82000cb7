"""The personalization benchmark (`edgeblock eval`): held-out subjects, metrics, the run.

subjects: novel designs the base model never saw, with reference PNGs shipped in data/.
metrics: deterministic subject and prompt fidelity; dreambench: DINO / CLIP-I / CLIP-T from local weights.
run: base, standard LoRA, patch, skip and DiT-BlockSkip rows -> results.json, results.md, grid.png.
"""
