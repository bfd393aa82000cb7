"""`make demo`: the method end to end on the built-in model (or the shipped tiny config).

Select blocks by cross-attention masking, personalize with DiT-BlockSkip on a
subject the model has not seen, generate with and without the adapter, and
print the memory table of the four training variants. Outputs go to demo-out/.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

log = logging.getLogger("edgeblock.demo")

# The demo's subject: one of the held-out eval subjects (a purple star with a white ring inside).
SUBJECT = "ringstar"


def _save_grid(images: np.ndarray, path: str, scale: int = 3) -> None:
    from PIL import Image

    tiles = [Image.fromarray(((np.clip(im, -1, 1) + 1) * 127.5).round().astype(np.uint8)) for im in images]
    w, h = tiles[0].size
    grid = Image.new("RGB", (w * len(tiles), h), "white")
    for i, t in enumerate(tiles):
        grid.paste(t, (i * w, 0))
    grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST).save(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edgeblock-demo")
    p.add_argument("--out", default="demo-out")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--skip-bench", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    logging.basicConfig(level=logging.WARNING)
    os.makedirs(args.out, exist_ok=True)

    from .method.lora import LoRASpec
    from .method.selection import CalibrationItem, bar_chart, score_blocks, selection_report
    from .method.train import MethodConfig, Trainer
    from .models import builtin_dir, load_model
    from .models.pipeline_parts import load_text_stack

    if not os.path.exists(os.path.join(builtin_dir(), "transformer", "config.json")):
        print("the built-in model's weights are not in this checkout: running on the shipped tiny configuration")
        return tiny_demo(args)
    summary: dict = {}
    t_start = time.perf_counter()
    loaded = load_model("builtin")
    adapter = loaded.adapter
    from .eval.subjects import load_subjects

    text = load_text_stack("builtin")
    subject = load_subjects(names=[SUBJECT])[0]
    images = subject.model_images()
    prompts = [p.text for p in subject.prompts[:3]] + ["a red circle on a blue background, center"]
    _save_grid(images, os.path.join(args.out, "subject.png"))
    print(f"[1/4] model: built-in FLUX-architecture DiT, {adapter.param_count() / 1e6:.2f}M parameters, {adapter.num_blocks} blocks")

    # Selection: mask the subject token and class noun, one block at a time.
    sentence = subject.train_prompt
    cond = text.encode([sentence])
    positions = text.positions(sentence, ["sks", subject.noun])
    latents = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    items = [CalibrationItem(latents[i : i + 1], cond, positions) for i in range(3)]
    with tqdm(total=len(items) * 3 * 2, desc="[2/4] selection", unit="draw") as bar:
        scores = score_blocks(adapter, loaded.objective, items, noise_levels=(0.25, 0.5, 0.75), noises=2,
                              progress=lambda done, _: bar.update(done - bar.n))
    report = selection_report(adapter, scores, k=2, contiguous=False)
    with open(os.path.join(args.out, "selection.json"), "w") as f:
        json.dump(report, f, indent=2)
    bar_chart(scores, adapter.block_names, report["selected"], os.path.join(args.out, "selection.png"))
    blocks = tuple(report["selected"])
    print(f"      selected blocks {list(blocks)} ({', '.join(adapter.block_names[b] for b in blocks)})")
    summary["selected_blocks"] = list(blocks)

    # Personalization with DiT-BlockSkip: patch-sampled draws, precomputed residuals, LoRA on two blocks.
    cfg = MethodConfig("blockskip", blocks=blocks, lora=LoRASpec(rank=8, alpha=8.0), lr=1e-3, batch=args.batch, seed=0)
    trainer = Trainer(loaded, cfg, cond, images)
    losses, pre_s, step_s = [], 0.0, 0.0
    with tqdm(range(args.steps), desc="[3/4] personalize (blockskip)", unit="step") as bar:
        for _ in bar:
            r = trainer.step()
            losses.append(r["loss"])
            pre_s += r["precompute_s"]
            step_s += r["step_s"]
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    summary.update({"train_steps": args.steps, "loss_first20": float(np.mean(losses[:20])),
                    "loss_last20": float(np.mean(losses[-20:])), "precompute_s_total": pre_s, "step_s_total": step_s})

    # Generation with and without the adapter: the trained blocks are drop-in replacements.
    from .builtin.pipeline import generate, load_builtin
    from .eval.run import swapped_blocks

    transformer, encoder = load_builtin()
    base = generate(transformer, encoder, prompts, seed=1, steps=20, guidance=3.0, return_float=True)
    with swapped_blocks(transformer, adapter.block_names, {i: trainer.net.blocks[str(i)] for i in blocks}):
        tuned = generate(transformer, encoder, prompts, seed=1, steps=20, guidance=3.0, return_float=True)
    _save_grid(base.permute(0, 2, 3, 1).numpy(), os.path.join(args.out, "generate_base.png"))
    _save_grid(tuned.permute(0, 2, 3, 1).numpy(), os.path.join(args.out, "generate_adapter.png"))
    print(f"      prompts: {prompts}")

    if not args.skip_bench:
        from .bench import memory

        print("[4/4] memory table (one training step, batch 1, each variant in a fresh process)")
        table = memory.run("builtin", blocks, progress=lambda v, r: print(
            f"      {v:<14} peak tensors {r['peak_bytes'] / 2**20:7.1f} MiB  peak RSS {r['peak_rss_bytes'] / 2**20:7.1f} MiB"
            f"  step {r['step_s']:.3f} s  precompute {r['precompute_s']:.3f} s  tokens {r['tokens']}"))
        summary["memory"] = table
    summary["total_s"] = time.perf_counter() - t_start
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"done in {summary['total_s']:.0f} s: loss {summary['loss_first20']:.4f} -> {summary['loss_last20']:.4f}; "
          f"outputs in {os.path.abspath(args.out)}/ (subject.png, selection.png, generate_base.png, generate_adapter.png, summary.json)")
    return 0


def tiny_demo(args: argparse.Namespace) -> int:
    """Selection, a DiT-BlockSkip run and the memory table on a tiny random FLUX config (random text)."""
    from .bench import memory
    from .method.selection import CalibrationItem, score_blocks, selection_report
    from .method.train import Conditioning, MethodConfig, Trainer
    from .models import load_model
    from .models.presets import TINY

    preset = TINY["flux"]
    path = os.path.join(memory._cache_root(), "tiny-flux")
    if not os.path.exists(os.path.join(path, "config.json")):
        preset.build(seed=0).save_pretrained(path, safe_serialization=True)
        with open(os.path.join(path, "edgeblock.json"), "w") as f:
            json.dump({"latent_channels": preset.latent_channels, "latent_size": preset.latent_size,
                       "text_len": preset.text_len}, f)
    loaded = load_model(path)
    g = torch.Generator().manual_seed(0)
    cond = Conditioning(torch.randn(1, preset.text_len, preset.text_dim, generator=g),
                        torch.randn(1, preset.pooled_dim, generator=g))
    images = np.random.default_rng(0).standard_normal((3, 16, 16, preset.latent_channels)).astype(np.float32)
    items = [CalibrationItem(torch.from_numpy(im.transpose(2, 0, 1).copy())[None], cond, (1, 2)) for im in images]
    scores = score_blocks(loaded.adapter, loaded.objective, items, noise_levels=(0.5,), noises=1)
    blocks = tuple(selection_report(loaded.adapter, scores, 2, False)["selected"])
    print(f"selected blocks {list(blocks)}")
    trainer = Trainer(loaded, MethodConfig("blockskip", blocks=blocks, lr=1e-3), cond, images)
    losses = [trainer.step()["loss"] for _ in tqdm(range(args.steps), desc="personalize (blockskip)")]
    print(f"loss {np.mean(losses[:10]):.4f} -> {np.mean(losses[-10:]):.4f}")
    if not args.skip_bench:
        table = memory.run(path, blocks)
        for v in ("standard_lora", "patch", "skip", "blockskip"):
            r = table[v]
            print(f"{v:<14} peak tensors {r['peak_bytes'] / 2**20:7.2f} MiB  step {r['step_s']:.4f} s"
                  f"  precompute {r['precompute_s']:.4f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
