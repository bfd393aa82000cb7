"""`edgeblock eval`: personalize every held-out subject with each variant, generate, score, tabulate.

Rows: base (no fine-tune), standard_lora, patch, skip, blockskip (or a subset: rows), and with ablations the paper's
ablation rows (eval/ablations.py); the fine-tuned rows share steps, seeds, LoRA spec, batch and learning rate. The skip
rows train the blocks given (--blocks) or the top-k blocks that selection by cross-attention masking ranks on each
subject's references.
Outputs: DIR/results.json ({"rows": {row: {metric: value}}, ...}), DIR/results.md, DIR/grid.png.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from edge_runtime.fileio import atomic_write, write_atomically
from edge_runtime.patch_sampling import PatchSchedule

from ..method.train import SKIP_VARIANTS, VARIANTS, MethodConfig, Prior, Trainer
from . import metrics, units
from .ablations import ABLATION_ROWS, NEEDS_SCORES, ablation_config
from .config import ALL_ROWS, ON_DEVICE, EvalConfig
from .report import QUANTIZED_ROWS, ROWS, markdown, quantized_targets, save_grid, targets  # noqa: F401 - ROWS: re-exported
from .subjects import Subject, load_subjects, subject_set_dir
from .units import score_images, swapped_blocks  # noqa: F401 - swapped_blocks: imported from here too

log = logging.getLogger("edgeblock.eval")

TRACKED_STEPS = 1  # steps of the first subject run under the tensor-memory tracker (slow: not timed)


# ---- pieces ---------------------------------------------------------------------------------------


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


def patch_setting(cfg: EvalConfig, side: int, pack: int) -> tuple[int, PatchSchedule]:
    """The patch rows' training crop side R (pixels) and crop schedule for images of `side` pixels packed
    pack x pack: R and f_min default to the model's recipe (for the built-in model 3/4 of the side, a multiple of
    pack, and R / side: the smallest crop at the image's own scale)."""
    from ..method import model_recipe

    recipe = model_recipe(cfg.model)
    res = cfg.train_res if cfg.train_res is not None else recipe.train_res(side, pack)
    if res > side or res % pack:  # res >= 1: EvalConfig checks a given one, the default is >= pack
        raise ValueError(f"--train-res {res}: needs a multiple of the packing factor {pack} in 1..{side} "
                         f"(the generation side)")
    return res, PatchSchedule(**recipe.patch_schedule(res, side, f_min=cfg.patch_min))


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
        from ..generate import model_meta, pixel_model_dir
        from ..method.lora import LoRASpec
        from ..models import load_model

        self.cfg, self.progress = cfg, progress
        self.path = pixel_model_dir(cfg.model)
        self.meta = model_meta(self.path)
        self.data_dir = subject_set_dir(cfg.subject_set)
        self.subjects = load_subjects(self.data_dir, names=list(cfg.subjects) if cfg.subjects else None)
        self.prompts = {s.name: list(s.prompts[: cfg.prompts_per_subject]) for s in self.subjects}
        # the prompt of every generated image: the prompts again for each further sample (sample-major)
        self.image_prompts = {n: v * cfg.samples for n, v in self.prompts.items()}
        self.loaded = load_model(self.path)
        n = self.loaded.adapter.num_blocks
        if cfg.blocks is not None and (not cfg.blocks or any(not 0 <= b < n for b in cfg.blocks)):
            raise ValueError(f"--blocks {list(cfg.blocks)}: the model has blocks 0..{n - 1}")
        self.lora = LoRASpec(cfg.lora_rank, cfg.lora_alpha)
        self.train_res, self.schedule = patch_setting(cfg, self.meta["size"], self.meta["patch"])
        self.variants = [v for v in VARIANTS if v in cfg.rows]  # the fine-tuned rows run
        self.ablations = [r for r in ABLATION_ROWS if r in cfg.rows]
        self.values: dict[str, dict[str, list[float]]] = {r: {} for r in ALL_ROWS}  # row -> metric -> per image
        self.timing = {r: {"train_s": 0.0, "gen_s": 0.0, "step_times": [], "first_losses": [], "final_losses": []}
                       for r in ALL_ROWS}
        self.peak_mib: dict[str, float | None] = {r: None for r in ALL_ROWS}
        self.devices: dict[str, Any] = {}  # the device rows' compiled bundles (--runtime device), built when the run starts
        self.generations: dict[str, dict[str, np.ndarray]] = {s.name: {} for s in self.subjects}
        self.selection_s = 0.0
        self._shared_by_subject: dict[tuple[str, int], dict] = {}  # (subject, seed) -> what its rows share
        self.bar = tqdm(total=None, disable=True)  # the run's bar while run() runs; a unit run alone reports to none

    # loaded on first use (a Ray run's driver, cluster/evaluation.py, only merges and never needs them)
    @functools.cached_property
    def dreambench(self):
        from .dreambench import DreamBench

        return DreamBench(self.cfg.dino, self.cfg.clip)

    @functools.cached_property
    def text(self):
        from ..models.pipeline_parts import BuiltinTextStack

        return BuiltinTextStack(self.meta["text_len"])

    @functools.cached_property
    def transformer(self):
        from ..generate import load_transformer

        return load_transformer(self.path)

    def run(self, out_dir: str) -> dict:
        cfg, t_start = self.cfg, time.perf_counter()
        os.makedirs(out_dir, exist_ok=True)
        gens = len(cfg.rows) + (1 if cfg.prior else 0)  # generation passes per subject (the class images: one)
        trained = len(self.variants) + len(self.ablations) + len(set(cfg.rows) & set(ON_DEVICE))
        total = len(self.subjects) * (trained * cfg.steps + gens * cfg.gen_steps)
        per_subject = {}
        self.prepare_devices(out_dir)
        with tqdm(total=total, desc="eval", unit="step", disable=not self.progress) as self.bar:
            for si, subject in enumerate(self.subjects):
                per_subject[subject.name] = record = self.subject_record(subject)
                for row in self.unit_rows():
                    units.merge(self, record, self.run_unit(row, si, subject))
        return self.finish(out_dir, per_subject, t_start)

    def prepare_devices(self, out_dir: str) -> None:
        """The device rows' bundles in out_dir (compiled there, or reused when up to date: a Ray run's driver
        compiles them, its workers find them so)."""
        from .device_row import DeviceRow

        if getattr(self, "_devices_dir", None) != out_dir:
            self.devices, self._devices_dir = {}, out_dir
        cfg = self.cfg
        for row in (r for r in ON_DEVICE if r in cfg.rows and r not in self.devices):
            w = next((k for k, v in QUANTIZED_ROWS.items() if v == row), None)
            sub = "bundle" if w is None else f"bundle-{w}"
            if self.progress:
                print(f"[eval] {row}: edgeblock compile --model {cfg.model} --out {out_dir}/{sub}"
                      + (f" --weights {w}" if w else ""))
            self.devices[row] = DeviceRow(cfg, out_dir, self.train_res, progress=None, weights=w, subdir=sub)

    def unit_rows(self) -> list[str]:
        """The rows of each subject in the order they run: base, the fine-tuned rows, the device rows."""
        return (["base"] if "base" in self.cfg.rows else []) + self.variants + self.ablations + list(self.devices)

    def subject_record(self, subject: Subject) -> dict:
        return units.subject_record([p.text for p in self.prompts[subject.name]], self.cfg.samples,
                                    sorted(self.cfg.blocks) if self.cfg.blocks is not None else [])

    def finish(self, out_dir: str, per_subject: dict, t_start: float, wall_s: float | None = None) -> dict:
        """The results of the merged units: results.json, results.md and grid.png written into out_dir (each
        whole or not at all: fileio's atomic writes); wall_s: the run's wall time if not since t_start."""
        cfg = self.cfg
        results = {
            "rows": self._rows(),
            "reference_check": metrics.reference_check(load_subjects(self.data_dir)),  # every subject of the set
            "per_subject": per_subject,
            "config": {**asdict(cfg), "model_dir": self.path, "images": sum(len(v) for v in self.image_prompts.values()),
                       "training_prompts": {s.name: s.training_prompts(cfg.captions) for s in self.subjects},
                       "generation_seed": "seed + subject index",
                       "patch_train_res": self.train_res, "patch_schedule": self.schedule.to_dict(),
                       "tracked_steps": TRACKED_STEPS,
                       **({"device": {"bundle": d.dir, "trainable_blocks": d.trainable, "compile_s": d.compile_s,
                                      "trainer": "ort",
                                      "generation_seed": "seed + subject index + prompt index (initial_noise)",
                                      "rows": {r: {"bundle": v.dir, "weights": v.weights, "compile_s": v.compile_s}
                                               for r, v in self.devices.items()}}}
                          if (d := next(iter(self.devices.values()), None)) else {})},
            "selection_s": self.selection_s,
        }
        results["targets"] = targets(results["rows"])
        results["quantized_targets"] = quantized_targets(results["rows"])
        results["wall_s"] = time.perf_counter() - t_start if wall_s is None else wall_s
        os.makedirs(out_dir, exist_ok=True)
        atomic_write(os.path.join(out_dir, "results.json"), json.dumps(results, indent=2).encode())
        atomic_write(os.path.join(out_dir, "results.md"), markdown(results).encode())
        write_atomically(os.path.join(out_dir, "grid.png"), lambda tmp: save_grid(
            self.subjects, self.image_prompts, self.generations, tmp, cfg.rows), suffix=".png")
        return results

    def run_unit(self, row: str, si: int, subject: Subject) -> units.UnitResult:
        """One row of subject si (the cfg's seed): its training (but base), generations and scores, collected
        apart from the run's accumulators. What the subject's fine-tuned rows share (selection, the encoded
        training prompts, the class images) is computed by the first of them and kept for the others."""
        cfg = self.cfg
        kept = self.values, self.timing, self.peak_mib, self.generations, self.selection_s
        self.values, self.timing, self.peak_mib = {row: {}}, {row: units.fresh_timing()}, {row: None}
        self.generations, self.selection_s = {subject.name: {}}, 0.0
        try:
            run = _SubjectRun(subject, self.image_prompts[subject.name], cfg.seed + si,
                              [metrics.describe(im) for im in subject.images], {"rows": {}})
            if row == "base":
                self._generate("base", run)
            else:
                shared = self._shared(run)
                run.record.update({k: v for k, v in shared.items() if k in units.SHARED_KEYS})
                if row in self.devices:
                    self._device(row, run, shared["prior"])
                else:
                    self._train_row(row, si, run, shared)
            return units.UnitResult(row, subject.name, self.values[row], self.timing[row], self.peak_mib[row],
                                    self.generations[subject.name][row], run.record, self.selection_s)
        finally:
            self.values, self.timing, self.peak_mib, self.generations, self.selection_s = kept

    def _shared(self, run: _SubjectRun) -> dict:
        """The subject's selected blocks and their scores, encoded training prompts and class images (with
        --prior), computed once per subject and seed."""
        cfg, subject = self.cfg, run.subject
        key = (subject.name, cfg.seed)
        if key in self._shared_by_subject:
            return self._shared_by_subject[key]
        chosen, block_scores = (sorted(cfg.blocks) if cfg.blocks is not None else []), None
        selects = set(SKIP_VARIANTS + ABLATION_ROWS if cfg.blocks is None else NEEDS_SCORES) & set(cfg.rows)
        if selects:  # else no row trains selection's blocks nor needs its scores
            self.bar.set_postfix_str(f"{subject.name}: select blocks")
            t0 = time.perf_counter()
            picked, block_scores = select_blocks(self.loaded, self.text, subject, cfg)
            chosen = chosen or picked
            self.selection_s += time.perf_counter() - t0
        shared = {"chosen": chosen, "blocks": list(chosen) or None, "block_scores": block_scores,
                  "cond": self.text.encode(subject.training_prompts(cfg.captions))}
        shared["prior"] = self._prior(run) if cfg.prior else None
        if cfg.prior:
            shared["prior_prompts"] = run.record["prior_prompts"]
        self._shared_by_subject[key] = shared
        return shared

    def _train_row(self, variant: str, si: int, run: _SubjectRun, shared: dict) -> None:
        """A fine-tuned row for one subject: train, swap the trained blocks in, generate and score."""
        cfg, chosen = self.cfg, shared["chosen"]
        self.bar.set_postfix_str(f"{run.subject.name}: train {variant}")
        mcfg = MethodConfig(variant if variant in VARIANTS else "blockskip", blocks=tuple(chosen), lora=self.lora,
                            lr=cfg.lr, batch=cfg.batch, seed=cfg.seed, crop_ids=cfg.crop_ids,
                            prior_share=cfg.prior_share, train_res=self.train_res, schedule=self.schedule)
        if variant in ABLATION_ROWS:  # the blockskip row's config with the row's one change
            mcfg = ablation_config(variant, mcfg, shared["block_scores"], len(chosen), self.loaded.adapter.num_blocks)
            if list(mcfg.blocks) != list(chosen):
                run.record.setdefault("ablation_blocks", {})[variant] = list(mcfg.blocks)
        trainer = self._train(variant, mcfg, shared["cond"], run.subject.model_images(), shared["prior"],
                              track=si == 0)
        trained = {int(i): b.eval() for i, b in trainer.net.blocks.items()}
        with swapped_blocks(self.transformer, self.loaded.adapter.block_names, trained):
            self._generate(variant, run)

    def _device(self, row: str, run: _SubjectRun, prior: Prior | None) -> None:
        """A device row for one subject: the daemon's job code trains, the device runtime generates."""
        cfg, device = self.cfg, self.devices[row]
        self.bar.set_postfix_str(f"{run.subject.name}: train {row}")
        t0 = time.perf_counter()
        weights, job = device.personalize(
            run.subject, cfg.seed, prior_images=None if prior is None else prior.images,
            prior_prompts=run.record.get("prior_prompts"), on_step=lambda: self.bar.update(1))
        timing = self.timing[row]
        timing["train_s"] += time.perf_counter() - t0
        timing["step_times"].append(job["steps_s"] / max(1, cfg.steps))
        losses = job["losses"]
        tenth = max(1, len(losses) // 10)
        timing["first_losses"].append(float(np.mean(losses[:tenth])))
        timing["final_losses"].append(float(np.mean(losses[-tenth:])))
        self.bar.set_postfix_str(f"{run.subject.name}: generate {row}")
        t0 = time.perf_counter()
        imgs = device.generate([p.text for p in run.prompts], run.seed, weights)
        timing["gen_s"] += time.perf_counter() - t0
        self._score(row, run, imgs)

    def _prior(self, run: _SubjectRun) -> Prior:
        """The subject's class images: the base model's generations of world captions of its class noun
        (prior preservation), seeded by the subject's seed; their prompts go into the record."""
        from ..builtin import world

        cfg = self.cfg
        self.bar.set_postfix_str(f"{run.subject.name}: class images")
        prompts = world.class_captions(run.subject.noun, cfg.prior, seed=10_000 + run.seed)
        imgs = self._images(prompts, seed=20_000 + run.seed)
        self.bar.update(cfg.gen_steps)
        run.record["prior_prompts"] = prompts
        return Prior(imgs.astype(np.float32) / 127.5 - 1.0, self.text.encode(prompts))

    def _train(self, variant: str, mcfg: MethodConfig, cond, images: np.ndarray, prior: Prior | None,
               track: bool) -> Trainer:
        """Train one variant; with track, the model load, construction and first step run under the tracker."""
        from ..bench.tracker import TensorMemoryTracker
        from ..models import load_model

        t0, losses, first = time.perf_counter(), [], 0
        if track:
            tracker = TensorMemoryTracker()
            with tracker:
                trainer = Trainer(load_model(self.path), mcfg, cond, images, prior=prior)  # its weights are counted
                for _ in range(min(TRACKED_STEPS, self.cfg.steps)):
                    losses.append(trainer.step()["loss"])
                    first += 1
                    self.bar.update(1)
            self.peak_mib[variant] = tracker.peak / 2**20
        else:
            trainer = Trainer(self.loaded, mcfg, cond, images, prior=prior)
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

    def _images(self, prompts: list[str], seed: int) -> np.ndarray:
        """One generation batch with the transformer as it is now (base, or trained blocks swapped in); prompt k
        starts from the device's noise of seed + k (edge_runtime.sampler.initial_noise), as blockskip_device's."""
        from ..builtin.pipeline import generate
        from ..generate import seeded_noise

        cfg = self.cfg
        side = self.meta["size"]
        return generate(self.transformer, self.text.encoder, prompts, seed=seed, steps=cfg.gen_steps,
                        guidance=cfg.guidance, size=side, patch=self.meta["patch"], shift=self.meta["shift"],
                        noise=seeded_noise(seed, len(prompts), side))

    def _generate(self, row: str, run: _SubjectRun) -> None:
        self.bar.set_postfix_str(f"{run.subject.name}: generate {row}")
        t0 = time.perf_counter()
        imgs = self._images([p.text for p in run.prompts], seed=run.seed)
        self.timing[row]["gen_s"] += time.perf_counter() - t0
        self._score(row, run, imgs)

    def _score(self, row: str, run: _SubjectRun, imgs: np.ndarray) -> None:
        cfg = self.cfg
        self.generations[run.subject.name][row] = imgs
        scores = score_images(imgs, run.subject, run.prompts, run.ref_descs, self.dreambench)
        for k, v in scores.items():
            self.values[row].setdefault(k, []).extend(v)
        run.record["rows"][row] = {k: float(np.mean(v)) for k, v in scores.items()}
        self.bar.update(cfg.gen_steps)

    def _rows(self) -> dict[str, dict]:
        rows = {}
        for r in self.cfg.rows:
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
