"""`edgeblock eval`: personalize every held-out subject with each variant, generate, score, tabulate.

Rows: base (no fine-tune), standard_lora, patch, skip, blockskip; the fine-tuned rows share steps,
seeds, LoRA spec, batch and learning rate. The skip rows train the blocks given (--blocks) or the
top-k blocks that selection by cross-attention masking ranks on each subject's references.
Outputs: DIR/results.json ({"rows": {row: {metric: value}}, ...}), DIR/results.md, DIR/grid.png.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..method.train import CROP_IDS, VARIANTS, MethodConfig, Trainer
from . import metrics
from .subjects import CAPTION_MODES, Subject, load_subjects

log = logging.getLogger("edgeblock.eval")

ROWS = ("base", *VARIANTS)
TRACKED_STEPS = 1  # steps of the first subject run under the tensor-memory tracker (slow: not timed)


@dataclass(frozen=True)
class EvalConfig:
    """Everything a run depends on, written into results.json."""

    model: str = "builtin"
    steps: int = 300  # training steps per subject and variant
    batch: int = 4
    lr: float = 3e-3
    lora_rank: int = 8
    lora_alpha: float = 8.0
    captions: str = "per-image"  # training prompts: each reference's caption, or "a sks <noun>" for all ("token")
    crop_ids: str = "image"  # patch rows: a crop's position ids, the image's (as FLUX bundles on the daemon) or its own grid
    blocks: tuple[int, ...] | None = None  # trainable blocks of the skip rows (None: selection per subject)
    top_k: int = 2  # blocks selection picks
    contiguous: bool = False  # selection picks the best window of top_k consecutive blocks instead
    selection_noise_levels: tuple[float, ...] = (0.25, 0.5, 0.75)
    seed: int = 0
    gen_steps: int = 20
    guidance: float = 3.0
    subjects: tuple[str, ...] | None = None  # None: all shipped subjects
    prompts_per_subject: int | None = None  # None: all of a subject's prompts
    samples: int = 1  # images generated per prompt, each from its own noise
    dino: str | None = None
    clip: str | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "lora_rank", "top_k", "gen_steps", "samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.crop_ids not in CROP_IDS:
            raise ValueError(f"crop_ids must be one of {CROP_IDS}, got {self.crop_ids!r}")
        if self.captions not in CAPTION_MODES:
            raise ValueError(f"captions must be one of {CAPTION_MODES}, got {self.captions!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.prompts_per_subject is not None and self.prompts_per_subject < 1:
            raise ValueError(f"prompts_per_subject must be >= 1, got {self.prompts_per_subject}")

    @classmethod
    def make(cls, model: str = "builtin", quick: bool = False, **overrides) -> EvalConfig:
        """The full benchmark, or with quick=True one subject, two prompts and a few steps (for tests)."""
        base = cls(model=model)
        if quick:
            base = replace(base, steps=3, gen_steps=3, subjects=("ringstar",), prompts_per_subject=2,
                           selection_noise_levels=(0.5,))
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})


# ---- pieces ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def swapped_blocks(transformer: nn.Module, names: list[str], blocks: dict[int, nn.Module]) -> Iterator[None]:
    """Trained blocks are drop-in replacements: put them into the diffusers transformer, then restore."""
    saved = {}
    for i, block in blocks.items():
        lst, j = names[i].split(".")
        saved[i] = getattr(transformer, lst)[int(j)]
        getattr(transformer, lst)[int(j)] = block
    try:
        yield
    finally:
        for i, block in saved.items():
            lst, j = names[i].split(".")
            getattr(transformer, lst)[int(j)] = block


def select_blocks(loaded, text, subject: Subject, cfg: EvalConfig) -> tuple[list[int], list[float]]:
    """Top-k blocks (or the best window of k, cfg.contiguous) by cross-attention masking of "sks" and the
    class noun, on the subject's references (each with the prompt it trains on)."""
    from ..method.selection import CalibrationItem, choose_blocks, score_blocks

    sentences = subject.training_prompts(cfg.captions)
    x = torch.from_numpy(subject.model_images().transpose(0, 3, 1, 2).copy())  # (N, 3, H, W)
    items = []
    for i in range(min(3, len(x))):
        sentence = sentences[i % len(sentences)]
        positions = tuple(text.positions(sentence, ["sks", subject.noun]))
        items.append(CalibrationItem(x[i : i + 1], text.encode([sentence]), positions))
    scores = score_blocks(loaded.adapter, loaded.objective, items, noise_levels=cfg.selection_noise_levels,
                          noises=1, seed=cfg.seed)
    return choose_blocks(scores, min(cfg.top_k, len(scores)), cfg.contiguous), [float(s) for s in scores]


def score_images(images: np.ndarray, subject: Subject, prompts, ref_descs, dreambench=None) -> dict[str, list[float]]:
    """Per-image metric values for one subject's generations."""
    out: dict[str, list[float]] = {}
    for img, p in zip(images, prompts):
        for k, v in metrics.score(img, ref_descs, p.background, p.position).items():
            out.setdefault(k, []).append(v)
    if dreambench is not None and dreambench.enabled:
        for k, v in dreambench.score(images, subject.images, [p.text for p in prompts]).items():
            out[k] = [float(x) for x in v]
    return out


# ---- the run --------------------------------------------------------------------------------------


def run_eval(
    out_dir: str,
    model: str = "builtin",
    quick: bool = False,
    steps: int | None = None,
    seed: int = 0,
    blocks: tuple[int, ...] | None = None,
    dino: str | None = None,
    clip: str | None = None,
    progress: bool = True,
    **overrides,
) -> dict:
    """Run the benchmark and write results.json, results.md and grid.png into out_dir; returns the results."""
    cfg = EvalConfig.make(model, quick, steps=steps, seed=seed, blocks=blocks, dino=dino, clip=clip, **overrides)
    return Runner(cfg, progress).run(out_dir)


@dataclass
class _SubjectRun:
    """What one subject's generations need: the prompt of each image (Runner.image_prompts: one generation
    batch draws a different noise for every image), seed, reference descriptors and record."""

    subject: Subject
    prompts: list
    seed: int
    ref_descs: list
    record: dict


class Runner:
    """One benchmark run: the model, text encoder and generation transformer loaded once, then per subject
    the base generations, block selection, and for each variant training, generation and scoring."""

    def __init__(self, cfg: EvalConfig, progress: bool = True):
        from ..generate import load_transformer, model_meta, pixel_model_dir
        from ..method.lora import LoRASpec
        from ..models import load_model
        from ..models.pipeline_parts import BuiltinTextStack
        from .dreambench import DreamBench

        self.cfg, self.progress = cfg, progress
        self.path = pixel_model_dir(cfg.model)
        self.meta = model_meta(self.path)
        self.subjects = load_subjects(names=list(cfg.subjects) if cfg.subjects else None)
        self.prompts = {s.name: list(s.prompts[: cfg.prompts_per_subject]) for s in self.subjects}
        # the prompt of every generated image: the prompts again for each further sample (sample-major)
        self.image_prompts = {n: v * cfg.samples for n, v in self.prompts.items()}
        self.loaded = load_model(self.path)
        n = self.loaded.adapter.num_blocks
        if cfg.blocks is not None and (not cfg.blocks or any(not 0 <= b < n for b in cfg.blocks)):
            raise ValueError(f"--blocks {list(cfg.blocks)}: the model has blocks 0..{n - 1}")
        self.dreambench = DreamBench(cfg.dino, cfg.clip)
        self.text = BuiltinTextStack(self.meta["text_len"])
        self.transformer = load_transformer(self.path)
        self.lora = LoRASpec(cfg.lora_rank, cfg.lora_alpha)
        self.values: dict[str, dict[str, list[float]]] = {r: {} for r in ROWS}  # row -> metric -> per image
        self.timing = {r: {"train_s": 0.0, "gen_s": 0.0, "step_times": [], "first_losses": [], "final_losses": []}
                       for r in ROWS}
        self.peak_mib: dict[str, float | None] = {r: None for r in ROWS}
        self.generations: dict[str, dict[str, np.ndarray]] = {s.name: {} for s in self.subjects}
        self.selection_s = 0.0
        self.bar = None

    def run(self, out_dir: str) -> dict:
        cfg, t_start = self.cfg, time.perf_counter()
        os.makedirs(out_dir, exist_ok=True)
        total = len(self.subjects) * (len(VARIANTS) * cfg.steps + len(ROWS) * cfg.gen_steps)
        per_subject = {}
        with tqdm(total=total, desc="eval", unit="step", disable=not self.progress) as self.bar:
            for si, subject in enumerate(self.subjects):
                per_subject[subject.name] = self._subject(si, subject)
        results = {
            "rows": self._rows(),
            "reference_check": metrics.reference_check(load_subjects()),  # every shipped subject
            "per_subject": per_subject,
            "config": {**asdict(cfg), "model_dir": self.path, "images": sum(len(v) for v in self.image_prompts.values()),
                       "training_prompts": {s.name: s.training_prompts(cfg.captions) for s in self.subjects},
                       "generation_seed": "seed + subject index",
                       "tracked_steps": TRACKED_STEPS},
            "selection_s": self.selection_s,
        }
        results["targets"] = targets(results["rows"])
        results["wall_s"] = time.perf_counter() - t_start
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        with open(os.path.join(out_dir, "results.md"), "w") as f:
            f.write(markdown(results))
        save_grid(self.subjects, self.image_prompts, self.generations, os.path.join(out_dir, "grid.png"))
        return results

    def _subject(self, si: int, subject: Subject) -> dict:
        cfg = self.cfg
        sp = self.prompts[subject.name]
        run = _SubjectRun(subject, self.image_prompts[subject.name], cfg.seed + si, [metrics.describe(im) for im in subject.images],
                          {"prompts": [p.text for p in sp], "samples": cfg.samples, "rows": {}})
        self._generate("base", run)
        if cfg.blocks is not None:
            chosen, block_scores = sorted(cfg.blocks), None
        else:
            self.bar.set_postfix_str(f"{subject.name}: select blocks")
            t0 = time.perf_counter()
            chosen, block_scores = select_blocks(self.loaded, self.text, subject, cfg)
            self.selection_s += time.perf_counter() - t0
        run.record.update(blocks=list(chosen), block_scores=block_scores)
        cond = self.text.encode(subject.training_prompts(cfg.captions))
        for variant in VARIANTS:
            self.bar.set_postfix_str(f"{subject.name}: train {variant}")
            mcfg = MethodConfig(variant, blocks=tuple(chosen), lora=self.lora, lr=cfg.lr, batch=cfg.batch, seed=cfg.seed,
                                crop_ids=cfg.crop_ids)
            trainer = self._train(variant, mcfg, cond, subject.model_images(), track=si == 0)
            trained = {int(i): b.eval() for i, b in trainer.net.blocks.items()}
            with swapped_blocks(self.transformer, self.loaded.adapter.block_names, trained):
                self._generate(variant, run)
        return run.record

    def _train(self, variant: str, mcfg: MethodConfig, cond, images: np.ndarray, track: bool) -> Trainer:
        """Train one variant; with track, the model load, construction and first step run under the tracker."""
        from ..bench.tracker import TensorMemoryTracker
        from ..models import load_model

        t0, losses, first = time.perf_counter(), [], 0
        if track:
            tracker = TensorMemoryTracker()
            with tracker:
                trainer = Trainer(load_model(self.path), mcfg, cond, images)  # the weights it holds are counted
                for _ in range(min(TRACKED_STEPS, self.cfg.steps)):
                    losses.append(trainer.step()["loss"])
                    first += 1
                    self.bar.update(1)
            self.peak_mib[variant] = tracker.peak / 2**20
        else:
            trainer = Trainer(self.loaded, mcfg, cond, images)
        timing = self.timing[variant]
        for _ in range(first, self.cfg.steps):
            s0 = time.perf_counter()
            losses.append(trainer.step()["loss"])
            timing["step_times"].append(time.perf_counter() - s0)
            self.bar.update(1)
        timing["train_s"] += time.perf_counter() - t0
        tenth = max(1, len(losses) // 10)  # how far a run moved: its first and last tenth (same draws per row)
        timing["first_losses"].append(float(np.mean(losses[:tenth])))
        timing["final_losses"].append(float(np.mean(losses[-tenth:])))
        return trainer

    def _generate(self, row: str, run: _SubjectRun) -> None:
        from ..builtin.pipeline import generate

        cfg = self.cfg
        self.bar.set_postfix_str(f"{run.subject.name}: generate {row}")
        t0 = time.perf_counter()
        imgs = generate(self.transformer, self.text.encoder, [p.text for p in run.prompts], seed=run.seed,
                        steps=cfg.gen_steps, guidance=cfg.guidance, size=self.meta["size"], patch=self.meta["patch"],
                        shift=self.meta["shift"])
        self.timing[row]["gen_s"] += time.perf_counter() - t0
        self.generations[run.subject.name][row] = imgs
        scores = score_images(imgs, run.subject, run.prompts, run.ref_descs, self.dreambench)
        for k, v in scores.items():
            self.values[row].setdefault(k, []).extend(v)
        run.record["rows"][row] = {k: float(np.mean(v)) for k, v in scores.items()}
        self.bar.update(cfg.gen_steps)

    def _rows(self) -> dict[str, dict]:
        rows = {}
        for r in ROWS:
            t = self.timing[r]
            row = {k: float(np.mean(v)) for k, v in self.values[r].items()}
            row.update({
                "peak_train_mib": self.peak_mib[r],
                "step_s": float(np.mean(t["step_times"])) if t["step_times"] else None,
                "train_s": t["train_s"] if r != "base" else None,
                "gen_s": t["gen_s"],
                "total_s": t["train_s"] + t["gen_s"],
                "first_loss": float(np.mean(t["first_losses"])) if t["first_losses"] else None,
                "final_loss": float(np.mean(t["final_losses"])) if t["final_losses"] else None,
            })
            rows[r] = row
        return rows


def targets(rows: dict) -> dict:
    """Issue 3's targets: DiT-BlockSkip subject fidelity >= 0.95 x standard LoRA's, prompt fidelity >= its - 0.02."""
    s, b, base = rows["standard_lora"], rows["blockskip"], rows["base"]
    ratio = b["subject_fidelity"] / s["subject_fidelity"] if s["subject_fidelity"] > 0 else None
    diff = b["prompt_fidelity"] - s["prompt_fidelity"]
    return {
        "subject_fidelity_ratio": ratio,
        "prompt_fidelity_diff": diff,
        "subject_fidelity_over_base": b["subject_fidelity"] - base["subject_fidelity"],
        "met": bool(ratio is not None and ratio >= 0.95 and diff >= -0.02),
    }


# ---- reports --------------------------------------------------------------------------------------

_COLUMNS = (
    ("subject_fidelity", "subject fid.", "{:.3f}"),
    ("prompt_fidelity", "prompt fid.", "{:.3f}"),
    ("background_acc", "bg acc", "{:.2f}"),
    ("position_acc", "pos acc", "{:.2f}"),
    ("clutter", "clutter", "{:.3f}"),
    ("dino", "DINO", "{:.3f}"),
    ("clip_i", "CLIP-I", "{:.3f}"),
    ("clip_t", "CLIP-T", "{:.3f}"),
    ("peak_train_mib", "peak train tensors (MiB)", "{:.1f}"),
    ("step_s", "s/step", "{:.3f}"),
    ("total_s", "total s", "{:.0f}"),
    ("first_loss", "loss first", "{:.3f}"),
    ("final_loss", "loss last", "{:.3f}"),
)


def markdown(results: dict) -> str:
    rows, cfg = results["rows"], results["config"]
    cols = [c for c in _COLUMNS if any(c[0] in r for r in rows.values())]
    lines = [
        "# edgeblock eval",
        "",
        (
            f"Model `{cfg['model']}`; {cfg['images']} images per row ({cfg['samples']} per prompt); {cfg['steps']} training steps per subject and "
            f"variant at batch {cfg['batch']}, lr {cfg['lr']}, LoRA rank {cfg['lora_rank']} alpha "
            f"{cfg['lora_alpha']}; generation {cfg['gen_steps']} steps, guidance {cfg['guidance']}, seed {cfg['seed']}."
        ),
        "",
        "| row | " + " | ".join(c[1] for c in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for name, r in rows.items():
        cells = [c[2].format(r[c[0]]) if r.get(c[0]) is not None else "-" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    t, ref = results["targets"], results["reference_check"]
    ratio = "n/a" if t["subject_fidelity_ratio"] is None else f"{t['subject_fidelity_ratio']:.3f}"
    blocks = "; ".join(f"{n} {v['blocks']}" for n, v in results["per_subject"].items())
    lines += [
        "",
        (
            f"Targets (issue 3): blockskip / standard_lora subject fidelity = {ratio} (>= 0.95), "
            f"prompt fidelity difference = {t['prompt_fidelity_diff']:+.3f} (>= -0.02): "
            f"{'met' if t['met'] else 'not met'}."
        ),
        "",
        (
            f"Metric check on the references: same subject {ref['same_subject']:.3f}, other subjects "
            f"{ref['cross_subject']:.3f}, plain world shapes of the same class {ref['plain_shapes']:.3f} "
            f"(max {ref['plain_shapes_max']:.3f})."
        ),
        "",
        "Trainable blocks of the skip rows: " + blocks + ".",
        "",
        (
            "Peak training memory: live tensor bytes (weights held, activations, gradients, optimizer state) during "
            "the first subject's model load, trainer construction and first training step. Per-process RSS (one "
            "fresh process per variant) is what `edgeblock bench memory` measures."
        ),
        "",
    ]
    return "\n".join(lines)


def save_grid(subjects: list[Subject], prompts: dict, generations: dict, path: str, scale: int = 2) -> None:
    """Per subject: its references, then each row's generations, labelled."""
    from PIL import Image, ImageDraw, ImageFont

    tile = 64 * scale
    pad, label_w, head_h = 4, 120, 18
    cols = max(max(len(s.images) for s in subjects), max(len(v) for v in prompts.values()))
    band_h = head_h + (1 + len(ROWS)) * (tile + pad) + head_h
    W = label_w + cols * (tile + pad)
    grid = Image.new("RGB", (W, band_h * len(subjects)), "white")
    d = ImageDraw.Draw(grid)
    try:
        d.font = ImageFont.load_default(size=12)  # a scalable font where FreeType is available
    except (TypeError, OSError, ImportError):
        pass

    def put(img: np.ndarray, x: int, y: int) -> None:
        grid.paste(Image.fromarray(img).resize((tile, tile), Image.Resampling.NEAREST), (x, y))

    for b, s in enumerate(subjects):
        y = b * band_h
        d.text((4, y + 3), f"{s.name}: a sks {s.noun} ({s.description})", fill="black")
        y += head_h
        d.text((4, y + tile // 2), "references", fill="black")
        for k, img in enumerate(s.images):
            put(img, label_w + k * (tile + pad), y)
        y += tile + pad
        for k, p in enumerate(prompts[s.name]):
            d.text((label_w + k * (tile + pad), y + 2), f"{p.background}, {p.position}", fill="black")
        y += head_h
        for row in ROWS:
            d.text((4, y + tile // 2), row, fill="black")
            for k, img in enumerate(generations[s.name].get(row, [])):
                put(img, label_w + k * (tile + pad), y)
            y += tile + pad
    grid.save(path)
