"""`edgeblock bench memory`: one training step of each variant, each in a fresh process.

Prints peak tensor bytes, peak process memory (RSS high-water above the
process's baseline after imports), step time, and the precompute time per
draw for the skip variants. A variant builds only the blocks it holds.

`--runtime ort` adds `ort_blockskip`: the same block-skip training step run by
ONNX Runtime from the compiled training artifacts (edge_runtime.ort_trainer, the
device's trainer) in a torch-free process. The artifacts and one precomputed
draw (the torch blockskip variant's shapes) are prepared once in a torch child
and cached; the ORT child loads them and is measured like the others (peak RSS
above its baseline after imports, mean time of two steps after a first one).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict

VARIANTS = ("standard_lora", "patch", "skip", "blockskip")  # method.train.VARIANTS (checked in tests); no torch import here

TIMED_STEPS = 2


def _cache_root() -> str:
    return os.environ.get("EDGEBLOCK_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "edgeblock"))


def bench_model_dir() -> str:
    """The random-initialised FLUX-shaped benchmark model, saved once as a diffusers folder."""
    from ..models.presets import BENCH_FLUX

    key = hashlib.sha256(json.dumps(asdict(BENCH_FLUX), sort_keys=True, default=str).encode()).hexdigest()[:12]
    path = os.path.join(_cache_root(), f"bench-flux-{key}")
    if not os.path.exists(os.path.join(path, "config.json")):
        model = BENCH_FLUX.build(seed=0)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(path))
        model.save_pretrained(tmp, safe_serialization=True)
        with open(os.path.join(tmp, "edgeblock.json"), "w") as f:
            json.dump({"latent_channels": BENCH_FLUX.latent_channels, "latent_size": BENCH_FLUX.latent_size}, f)
        del model
        os.replace(tmp, path)
    return path


def _trainer(variant: str, model: str, blocks: tuple[int, ...] | None, seed: int):
    """The variant's Trainer on one random image and random text of the model's benchmark shapes."""
    import numpy as np
    import torch

    from ..method.train import Conditioning, MethodConfig, Trainer, middle_blocks
    from ..models import load_model

    torch.manual_seed(seed)
    meta = _model_meta(model)
    loaded = load_model(model)
    a = loaded.adapter
    size, ch = meta["latent_size"], a.latent_channels
    g = torch.Generator().manual_seed(seed)
    text_dim = a.config.get("joint_attention_dim") or a.config["caption_channels"]
    pooled_dim = a.config.get("pooled_projection_dim")
    cond = Conditioning(torch.randn(1, meta["text_len"], text_dim, generator=g),
                        torch.randn(1, pooled_dim, generator=g) if pooled_dim else None)
    images = np.random.default_rng(seed).standard_normal((1, size, size, ch)).astype(np.float32)
    chosen = blocks or middle_blocks(a.num_blocks)
    return Trainer(loaded, MethodConfig(variant, blocks=chosen, seed=seed), cond, images)


def run_variant(variant: str, model: str, blocks: tuple[int, ...] | None, seed: int = 0) -> dict:
    """Inside the child process: build, (precompute,) train one step at batch 1; measure."""
    import numpy as np

    # the method's and the models' imports happen before the baseline, so they are not counted
    from ..method import train  # noqa: F401
    from ..models import load_model  # noqa: F401
    from .tracker import TensorMemoryTracker, reset_rss_peak, rss_bytes, rss_peak_bytes

    baseline = rss_bytes()
    reset_rss_peak()
    tracker = TensorMemoryTracker()
    with tracker:
        trainer = _trainer(variant, model, blocks, seed)
        first = trainer.step()
    timed = [trainer.step() for _ in range(TIMED_STEPS)]
    uses_skip = trainer.cfg.uses_skip
    return {
        "peak_bytes": int(tracker.peak),
        "peak_rss_bytes": int(rss_peak_bytes() - baseline),
        "peak_rss_total_bytes": int(rss_peak_bytes()),  # the whole process (imports included)
        "step_s": float(np.mean([t["step_s"] for t in timed])),
        "precompute_s": float(np.mean([t["precompute_s"] for t in timed])) if uses_skip else 0.0,
        "loss": float(first["loss"]),
        "trainable_blocks": list(trainer.plan.trainable),
        "tokens": int((trainer.chunk()[0].latents.shape[-1] // _pack(trainer.model.adapter)) ** 2),
    }


def _pack(adapter) -> int:
    return getattr(adapter, "pack", adapter.config.get("patch_size", 1))


def _model_meta(model: str) -> dict:
    """Benchmark shapes from the folder's edgeblock.json (default: a 64x64 latent, 64 text tokens)."""
    from ..models import builtin_dir

    root = builtin_dir() if model == "builtin" else model
    meta = {"latent_size": 64, "text_len": 64}
    for path in (os.path.join(root, "edgeblock.json"), os.path.join(root, "transformer", "edgeblock.json")):
        if os.path.exists(path):
            with open(path) as f:
                meta.update({k: v for k, v in json.load(f).items() if k in ("latent_size", "text_len")})
    return meta


def _ort_key(model: str, blocks: tuple[int, ...] | None, seed: int) -> str:
    from .. import __version__

    h = hashlib.sha256(json.dumps([os.path.abspath(model) if model != "builtin" else model, list(blocks or ()),
                                   seed, __version__, _model_meta(model)]).encode())
    if model != "builtin":
        for name in sorted(os.listdir(model)):
            p = os.path.join(model, name)
            if os.path.isfile(p):
                h.update(f"{name}:{os.path.getsize(p)}:{os.path.getmtime(p)}".encode())
    return h.hexdigest()[:12]


def prepare_ort(model: str, blocks: tuple[int, ...] | None, out_dir: str, seed: int = 0) -> dict:
    """Inside a torch child: the blockskip variant's first draw, precomputed; its training artifacts + feeds."""
    import numpy as np

    from ..compile.ort_training import export_training_artifacts

    trainer = _trainer("blockskip", model, blocks, seed)
    a = trainer.model.adapter
    (pre,) = trainer.precompute([trainer.chunk()])
    tmp = tempfile.mkdtemp(dir=os.path.dirname(out_dir))
    spec = export_training_artifacts(a, trainer.plan, trainer.cfg.lora, pre, tmp, net=trainer.net)
    spec.artifact_dir = "."
    with open(os.path.join(tmp, "training_spec.json"), "w") as f:
        json.dump(spec.to_dict(), f, indent=1)
    np.savez(os.path.join(tmp, "feeds.npz"), **spec.feeds(pre))
    os.replace(tmp, out_dir)
    return {"dir": out_dir, "trainable_blocks": list(trainer.plan.trainable)}


def run_ort(artifact_dir: str) -> dict:
    """Inside a torch-free child: the ORT training step on the prepared artifacts; measured."""
    from edge_runtime.isolation import block_host_frameworks, host_frameworks_loaded

    block_host_frameworks()
    import numpy as np

    from edge_runtime.memstat import reset_rss_peak, rss_bytes, rss_peak_bytes
    from edge_runtime.ort_trainer import OrtTrainer

    with np.load(os.path.join(artifact_dir, "feeds.npz")) as z:
        feeds = {k: z[k] for k in z.files}
    baseline = rss_bytes()
    reset_rss_peak()
    import time

    trainer = OrtTrainer(artifact_dir)
    first = trainer.step(feeds)
    times = []
    for _ in range(TIMED_STEPS):
        t0 = time.perf_counter()
        trainer.step(feeds)
        times.append(time.perf_counter() - t0)
    with open(os.path.join(artifact_dir, "training_spec.json")) as f:
        spec = json.load(f)
    return {
        "peak_bytes": None,  # ORT allocations are not torch tensors: peak RSS is the figure
        "peak_rss_bytes": int(rss_peak_bytes() - baseline),
        "step_s": float(np.mean(times)),
        "precompute_s": None,  # the same torch/ORT frozen pass as blockskip's; not re-measured here
        "loss": float(first),
        "trainable_lora_tensors": len(spec["requires_grad"]),
        "host_frameworks_loaded": host_frameworks_loaded(),
        "tokens": int(spec["input_shapes"]["state.image"][1]) if "state.image" in spec["input_shapes"] else None,
    }


def _ort_row(path: str, blocks: tuple[int, ...] | None) -> dict:
    art = os.path.join(_cache_root(), f"bench-ort-{_ort_key(path, blocks, 0)}")
    if not os.path.exists(os.path.join(art, "feeds.npz")):
        os.makedirs(_cache_root(), exist_ok=True)
        cmd = [sys.executable, "-m", "edgeblock.bench.memory", "--child", "ort-prepare", "--model", path, "--out", art]
        if blocks:
            cmd += ["--blocks", ",".join(map(str, blocks))]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"preparing the ORT training artifacts failed:\n{proc.stderr[-3000:]}")
    proc = subprocess.run([sys.executable, "-m", "edgeblock.bench.memory", "--child", "ort", "--model", path,
                           "--out", art], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark variant ort_blockskip failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


RUNTIMES = ("torch", "ort")


def run(model: str | None, blocks: tuple[int, ...] | None, variants=VARIANTS, progress=None,
        runtime: str = "torch") -> dict:
    """The whole table: each variant in its own interpreter so high-water marks do not mix."""
    path = model if model and model != "bench-flux" else bench_model_dir()
    if model == "builtin":
        path = "builtin"
    from ..models import load_model

    adapter = load_model(path).adapter
    result: dict = {
        "model": {
            "path": path,
            "family": adapter.family,
            "params": adapter.param_count(),
            "num_blocks": adapter.num_blocks,
            "batch": 1,
        }
    }
    del adapter
    for v in variants:
        cmd = [sys.executable, "-m", "edgeblock.bench.memory", "--child", v, "--model", path]
        if blocks:
            cmd += ["--blocks", ",".join(map(str, blocks))]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"benchmark variant {v} failed:\n{proc.stderr[-3000:]}")
        result[v] = json.loads(proc.stdout.strip().splitlines()[-1])
        if progress:
            progress(v, result[v])
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
    if runtime == "ort":
        result["ort_blockskip"] = _ort_row(path, blocks)
        if progress:
            progress("ort_blockskip", result["ort_blockskip"])
    if "ort_blockskip" in result and "blockskip" in result:
        o, b = result["ort_blockskip"], result["blockskip"]
        result["ort_vs_torch_blockskip"] = {
            "peak_rss": o["peak_rss_bytes"] / max(b["peak_rss_bytes"], 1),
            "step_time": o["step_s"] / b["step_s"],
        }
    if "standard_lora" in result and "blockskip" in result:
        s, b = result["standard_lora"], result["blockskip"]
        result["ratios"] = {
            "blockskip_peak_bytes_vs_standard": b["peak_bytes"] / s["peak_bytes"],
            "blockskip_peak_rss_vs_standard": b["peak_rss_bytes"] / max(s["peak_rss_bytes"], 1),
            "blockskip_time_vs_standard": (b["step_s"] + b["precompute_s"]) / s["step_s"],
        }
    return result


def _child(argv: list[str]) -> None:
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--child", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--blocks", default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    blocks = tuple(int(b) for b in a.blocks.split(",")) if a.blocks else None
    if a.child == "ort":
        print(json.dumps(run_ort(a.out)))
        return
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    if a.child == "ort-prepare":
        print(json.dumps(prepare_ort(a.model, blocks, a.out)))
        return
    print(json.dumps(run_variant(a.child, a.model, blocks)))


if __name__ == "__main__":
    _child(sys.argv[1:])
