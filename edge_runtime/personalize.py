"""DiT-BlockSkip personalization on the device, from a bundle alone (torch-free).

A job: subject images -> draws -> frozen precompute -> LoRA training steps -> adapter.

Draw i (deterministic in (seed, i), so a resumed job regenerates exactly the draws it had):
a noise level t from the training distribution (logit-normal for flow models, uniform DDPM step
for epsilon models), an image, a square crop of side f(t) x the image side (the bundle's patch
schedule: small crops at low noise, the whole image at high noise), resized to the training
resolution, VAE-encoded (latent models), and Gaussian noise.

The frozen model's pass over a draw (zero LoRA) gives the training graph its inputs: the state
entering the first trainable block, the prologue's context, and each frozen gap's residual
(out - in of the group). Two orders:
- online: per step, the whole chain for that step's draw (all graphs held);
- bank: every draw up front, then each graph over all draws with its weights loaded once and
  released, the states kept on disk (bank/); the peak is about the larger of one graph's
  inference and the training step. Both give the training step the same numbers.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from . import graph_names as gn
from .faults import crash_point
from .fileio import write_atomically
from .lr_schedule import check_schedule, lr_at
from .noise import EpsilonDDPM, schedule_from_dict
from .patch_sampling import PatchSampler, PatchSchedule, check_prior_from, pick_image
from .precompute import PRECOMPUTE_MODES, precompute_mode
from .runtime import Bundle
from .subject_images import ImageLimits, PersonalizeError, decode_images, images_from_pngs


# ---------------------------------------------------------------------------------------------
# Draws
# ---------------------------------------------------------------------------------------------
@dataclass
class Draw:
    index: int
    image: int
    t: float  # noise level in [0, 1], 1 = noise
    k: int | None  # DDPM step (epsilon models)
    box: tuple[int, int, int]  # top, left, size
    timestep: float  # what the prologue reads (0..1000 scale)


class DrawPlan:
    """Deterministic draws of a job: draw(i) depends only on (seed, i)."""

    def __init__(self, bundle: Bundle, images: list[np.ndarray], seed: int, prior_from: int | None = None,
                 prior_share: float = 0.0):
        """prior_from: images from this index on are class images (prior preservation), drawn with probability
        prior_share, the others with the rest; None: every image alike."""
        m = bundle.manifest
        check_prior_from(prior_from, len(images), PersonalizeError)
        self.bundle, self.images, self.seed = bundle, images, int(seed)
        self.prior_from, self.prior_share = prior_from, float(prior_share)
        self.schedule = schedule_from_dict(m.scheduler)  # edge_runtime.noise: levels, noising, targets
        self.sampler = PatchSampler(PatchSchedule.from_dict(m.patch_schedule), int(m.train_res))
        self.train_res = int(m.train_res)
        # "image": a crop's tokens at the full image's position ids of the place it was cut from (FLUX
        # bundles compiled with --crop-ids image); "grid" (older bundles): the crop's own token grid
        self.crop_ids = m.crop_ids
        if self.crop_ids == "image" and not bundle.token_pixels:
            raise PersonalizeError(f"the bundle asks for image crop ids, which a {m.family} model has no input for")

    def rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(i)])

    def draw(self, i: int) -> Draw:
        rng = self.rng(i)
        sched = self.schedule
        if isinstance(sched, EpsilonDDPM):  # a uniform DDPM step
            k = int(rng.integers(0, sched.num_train_timesteps))
            t = sched.level(k)
        else:  # a logit-normal level
            k, t = None, sched.level(float(rng.standard_normal()))
        ts = float(sched.timestep(t))
        img = pick_image(rng, len(self.images), self.prior_from, self.prior_share)
        h, w = self.images[img].shape[:2]
        box = self.sampler.crop_box(rng, h, w, t)
        return Draw(i, img, t, k, (box.top, box.left, box.size), ts)

    def prologue_feeds(self, d: Draw, text: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """(prologue inputs for draw d, its training target). `text` holds one prompt's encoding for every
        draw, or one row per image (per-image captions): the draw takes its image's row."""
        from .patch_sampling import CROP_INPUT, CropBox, crop, crop_position, resize

        img = self.images[d.image]
        x = resize(crop(img, CropBox(*d.box)), self.train_res).transpose(2, 0, 1)[None]
        x0 = self.bundle.vae_encode(np.ascontiguousarray(x, dtype=np.float32))
        eps = self.rng(d.index + 1_000_003).standard_normal(x0.shape).astype(np.float32)
        xt, target = self.schedule.noisy(x0, eps, d.t), self.schedule.target(x0, eps)
        rows = {v.shape[0] for v in text.values()}
        if rows != {1}:
            if rows != {len(self.images)}:
                raise PersonalizeError(f"text rows {sorted(rows)}: one prompt, or one per image ({len(self.images)})")
            text = {k: v[d.image : d.image + 1] for k, v in text.items()}
        feeds = {"latents": xt.astype(np.float32), "timestep": np.array([d.timestep], np.float32), **text}
        if self.crop_ids == "image":
            feeds[CROP_INPUT] = crop_position(CropBox(*d.box), self.train_res, self.bundle.token_pixels)
        if self.bundle.model.get("guidance_embeds"):
            feeds["guidance"] = np.array([1.0], np.float32)
        return feeds, target.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The frozen pass: one graph at a time over a draw's accumulated tensors
# ---------------------------------------------------------------------------------------------
class FrozenPass:
    """Walks the chain for a draw and collects the training graph's inputs."""

    def __init__(self, bundle: Bundle, training_inputs: list[str]):
        self.bundle = bundle
        self.inputs = list(training_inputs)
        names = bundle.chain_names[:-1]  # the epilogue is part of the training graph
        kinds = [bundle.graphs[n]["kind"] for n in names]
        first = kinds.index(gn.TRAINABLE_INFER)
        self.names = names
        self.first_trainable = first
        # a gap (maximal skipped run after the first trainable block) may span several groups when the
        # compiler capped group size: its residual is s_end - s_start, taken once at the gap's last group
        # (the same subtraction, and so the same numbers, as an uncapped bundle's one group)
        self.gap_of: dict[str, str] = {}
        self.opens_gap: set[str] = set()
        self.closes_gap: set[str] = set()
        spans = gn.gap_spans(self.inputs)
        for n in names[first + 1:]:
            g = bundle.graphs[n]
            if g["kind"] != gn.GROUP:
                continue
            a, e = g["blocks"][0], g["blocks"][-1]
            hit = [(s0, e0, p) for s0, e0, p in spans if s0 <= a and e <= e0]
            s0, e0, self.gap_of[n] = hit[0] if hit else (a, e, gn.gap_prefix(a, e))
            if s0 == a:
                self.opens_gap.add(n)
            if e0 == e:
                self.closes_gap.add(n)

    def step(self, pos: int, acc: dict[str, np.ndarray], rec: dict[str, np.ndarray]) -> None:
        """Run graph `pos` of the chain on acc (advancing it) and record what training reads."""
        b = self.bundle
        name = self.names[pos]
        g = b.graphs[name]
        if pos == self.first_trainable:
            rec.update({k: v for k, v in acc.items() if gn.is_state(k)})
        out = b.run(name, acc)
        if pos > self.first_trainable and g["kind"] == gn.GROUP:
            prefix = self.gap_of[name]
            for slot, oname in (g.get("state_out") or {}).items():
                key = gn.state_name(slot, prefix)
                if key not in self.inputs:
                    continue
                start = f"{key}.start"  # kept in rec only while a gap runs over several groups
                if name in self.opens_gap:
                    rec[start] = acc[gn.state_name(slot)]
                if name in self.closes_gap:
                    rec[key] = out[oname] - rec.pop(start)
        b.advance(name, acc, out)
        if pos == 0:
            rec.update({k: v for k, v in acc.items() if gn.is_ctx(k) and k in self.inputs})

    def feeds(self, rec: dict[str, np.ndarray], target: np.ndarray) -> dict[str, np.ndarray]:
        rec = {**rec, gn.TARGET: target}
        missing = [n for n in self.inputs if n not in rec]
        if missing:
            raise RuntimeError(f"the frozen pass did not produce training inputs {missing}")
        return {n: np.ascontiguousarray(rec[n], dtype=np.float32) for n in self.inputs}


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------
@dataclass
class JobOptions:
    token: str
    class_noun: str
    steps: int
    learning_rate: float
    seed: int
    checkpoint_every: int
    precompute: str = "online"
    prompt: str = ""
    # one training caption per image (each naming the token), e.g. "a large sks star on a blue background,
    # top left": each draw is conditioned on its own image's caption; empty: `prompt` for every image
    captions: list[str] = field(default_factory=list)
    # prior preservation: one caption per class image (none naming the token); empty: "a {class_noun}" each
    class_captions: list[str] = field(default_factory=list)
    prior_share: float = 0.5  # share of the draws taken from the class images, when the job has some
    # draws per optimizer step (the bundle's recipe): their gradients are accumulated, one draw in memory at a time
    batch: int = 1
    # the learning rate of each step (edge_runtime.lr_schedule): warmup steps, then constant, cosine or linear
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    # validation: every validation_every steps (and after the last) the caller generates these prompts with the
    # adapter so far (run_job's `validate`); empty: none
    validation_prompts: list[str] = field(default_factory=list)
    validation_every: int = 0

    def __post_init__(self) -> None:
        if int(self.batch) < 1:
            raise PersonalizeError(f"batch must be >= 1, got {self.batch}")
        if self.precompute not in PRECOMPUTE_MODES:
            raise PersonalizeError(f"precompute must be one of {PRECOMPUTE_MODES}, got {self.precompute!r}")
        if not self.prompt:
            self.prompt = f"a {self.token} {self.class_noun}"
        self.captions = [str(c) for c in self.captions]
        for i, c in enumerate(self.captions):
            if not self._names_token(c):
                raise PersonalizeError(f"caption {i} {c!r} does not name the token {self.token!r}")
        self.class_captions = [str(c) for c in self.class_captions]
        for i, c in enumerate(self.class_captions):
            if self._names_token(c):
                raise PersonalizeError(f"class caption {i} {c!r} names the token {self.token!r}: class images show "
                                       "the class, not the subject")
        if not 0.0 < self.prior_share < 1.0:
            raise PersonalizeError(f"prior_share must be in (0, 1), got {self.prior_share}")
        try:
            check_schedule(self.lr_schedule, self.warmup_steps, self.steps)
        except ValueError as e:
            raise PersonalizeError(str(e)) from None
        self.validation_prompts = [str(p) for p in self.validation_prompts]
        if self.validation_prompts and not 1 <= int(self.validation_every) <= int(self.steps):
            raise PersonalizeError(f"validation_every must be in [1, steps={self.steps}] with validation prompts, "
                                   f"got {self.validation_every}")

    def validation_steps(self) -> list[int]:
        """The steps (1-based) after which the validation prompts are generated: every validation_every, and the
        last step."""
        if not self.validation_prompts:
            return []
        every = int(self.validation_every)
        return sorted(set(range(every, self.steps + 1, every)) | {self.steps})

    def _names_token(self, caption: str) -> bool:
        return self.token in caption.replace(",", " ").split()

    def training_prompts(self, n_images: int) -> list[str]:
        """The prompt of each image: its caption, or the one prompt for all."""
        if not self.captions:
            return [self.prompt]
        if len(self.captions) != n_images:
            raise PersonalizeError(f"{len(self.captions)} captions for {n_images} images: give one per image or none")
        return list(self.captions)

    def class_prompts(self, n_class: int) -> list[str]:
        """The prompt of each class image: its class caption, or "a {class_noun}"."""
        if not self.class_captions:
            return [f"a {self.class_noun}"] * n_class
        if len(self.class_captions) != n_class:
            raise PersonalizeError(f"{len(self.class_captions)} class captions for {n_class} class images: give one "
                                   "per class image or none")
        return list(self.class_captions)


class Cancelled(Exception):
    pass


@dataclass
class Progress:
    """Callbacks of a running job (all optional)."""

    event: Callable[..., None] = lambda kind, **kw: None
    should_stop: Callable[[], bool] = lambda: False


def _npz_save(path: str, arrays: dict[str, np.ndarray]) -> None:
    write_atomically(path, lambda tmp: np.savez(tmp, **arrays), ".npz")


def _npz_load(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


@dataclass
class JobResult:
    weights: dict[str, np.ndarray]
    losses: list[float] = field(default_factory=list)
    final_loss: float = float("nan")
    seconds: float = 0.0
    precompute_s: float = 0.0
    steps_s: float = 0.0


def make_trainer(bundle: Bundle, backend: str, lr: float, checkpoint: str | None, device: str = "cpu"):
    art = os.path.join(bundle.root, gn.TRAINABLE_DIR)
    bundle.check_files(f"{gn.TRAINABLE_DIR}/")  # the training artifacts as verified (CorruptBundle names a damaged one)
    if backend == "torch":
        from .torch_trainer import TorchTrainer

        return TorchTrainer(art, lr=lr, checkpoint=checkpoint, device=device)
    from .ort_trainer import OrtTrainer

    return OrtTrainer(art, lr=lr, checkpoint=checkpoint, device=device)


def run_job(bundle: Bundle, opts: JobOptions, images: list[np.ndarray], work_dir: str, *,
            trainer_backend: str = "ort", train_device: str = "cpu", progress: Progress | None = None,
            start_step: int = 0,
            on_checkpoint: Callable[[int], None] | None = None,
            checkpoint_on_stop: Callable[[], bool] | None = None,
            class_images: list[np.ndarray] | None = None,
            validate: Callable[[int, dict[str, np.ndarray]], None] | None = None) -> JobResult:
    """Train an adapter; checkpoints to work_dir/checkpoint every opts.checkpoint_every steps.

    start_step > 0 resumes from work_dir/checkpoint (written at that step). Raises Cancelled when
    progress.should_stop() turns true (checked before each step; the checkpoint stays consistent);
    if checkpoint_on_stop() is then true (a shutdown, not a cancel), the steps done so far are
    checkpointed first, so the job resumes exactly there. class_images (prior preservation) are drawn with
    probability opts.prior_share, each with its class prompt (opts.class_prompts). validate(step, lora weights)
    runs after each of opts.validation_steps() (it does not touch the training: the adapter is the same with
    or without it).
    """
    progress = progress or Progress()
    t_start = time.perf_counter()
    os.makedirs(work_dir, exist_ok=True)
    ckpt = os.path.join(work_dir, "checkpoint")
    progress.event("encoding")
    prompts = opts.training_prompts(len(images))  # one, or one per image
    prior_from = None
    if class_images:
        prompts = (prompts if len(prompts) > 1 else prompts * len(images)) + opts.class_prompts(len(class_images))
        prior_from, images = len(images), list(images) + list(class_images)
    # a text encoder compiled in parts and not already open is streamed, part by part: the job's encode phase then
    # peaks near its largest part, not the whole encoder
    text = bundle.encode_prompts(prompts, streamed=bundle.text_streamed)
    bundle.release_text_encoder()  # not needed again by this job
    plan = DrawPlan(bundle, images, opts.seed, prior_from, opts.prior_share)
    from .training_spec import load_spec

    frozen = FrozenPass(bundle, list(load_spec(os.path.join(bundle.root, gn.TRAINABLE_DIR)).inputs))
    n, batch = opts.steps, int(opts.batch)
    result = JobResult(weights={})
    pre_s = 0.0
    if opts.precompute == "bank":
        # the bank runs before the trainer exists: the job's peak is the larger of the two, not their sum
        t0 = time.perf_counter()
        bank = os.path.join(work_dir, "bank")
        _bank(bundle, plan, frozen, text, range(start_step * batch, n * batch), bank, progress)
        pre_s = time.perf_counter() - t0
    from .memstat import trim_heap

    trim_heap()
    trainer = make_trainer(bundle, trainer_backend, opts.learning_rate, ckpt if start_step > 0 else None, train_device)
    if list(trainer.inputs) != frozen.inputs:
        raise RuntimeError(f"training inputs {trainer.inputs} differ from the spec's {frozen.inputs}")
    if start_step > 0 and trainer.resumed_step is not None and trainer.resumed_step != start_step:
        # the checkpoint is the truth: a crash after it was renamed into place, before the caller recorded its step,
        # leaves the caller one checkpoint behind (the bank holds every draw from start_step on, so these too)
        if trainer.resumed_step < start_step:
            raise RuntimeError(f"the checkpoint was saved at step {trainer.resumed_step}, before step {start_step} "
                               "its job resumes from")
        start_step = trainer.resumed_step
        if on_checkpoint:
            on_checkpoint(start_step)
    step_s = 0.0
    validation_at = set(opts.validation_steps())
    for i in range(start_step, n):
        if progress.should_stop():
            if checkpoint_on_stop is not None and checkpoint_on_stop() and i > start_step:
                trainer.save_checkpoint(ckpt, step=i)
                if on_checkpoint:
                    on_checkpoint(i)
            raise Cancelled(f"stopped before step {i + 1}")
        # step i trains on draws i * batch .. (i + 1) * batch - 1, each loaded (or precomputed) when its turn comes
        def draws(i=i):
            for j in range(i * batch, (i + 1) * batch):
                t0 = time.perf_counter()
                if opts.precompute == "bank":
                    feeds = _npz_load(os.path.join(work_dir, "bank", f"{j:06d}.feeds.npz"))
                else:
                    feeds = _online_feeds(plan, frozen, text, j)
                timing["pre"] += time.perf_counter() - t0
                crash_point("job.draw")  # a draw's training inputs ready (online: its frozen pass done)
                yield feeds

        timing = {"pre": 0.0}
        crash_point("job.step")  # test hook (edge_runtime.faults): before step i + 1
        t1 = time.perf_counter()
        trainer.set_learning_rate(lr_at(i, n, opts.learning_rate, opts.lr_schedule, opts.warmup_steps))
        loss = trainer.step_draws(draws())
        pre_s += timing["pre"]
        step_s += time.perf_counter() - t1 - timing["pre"]
        result.losses.append(loss)
        progress.event("step", step=i + 1, total=n, loss=loss)
        if validate is not None and i + 1 in validation_at:
            validate(i + 1, trainer.lora_weights())
        if opts.checkpoint_every and (i + 1) % opts.checkpoint_every == 0 and i + 1 < n:
            trainer.save_checkpoint(ckpt, step=i + 1)
            crash_point("job.checkpointed")  # the checkpoint in place, its step not yet recorded by the caller
            if on_checkpoint:
                on_checkpoint(i + 1)
            progress.event("checkpoint", step=i + 1, total=n)
    result.weights = trainer.lora_weights()
    # the job's memory goes back before generation needs it: the training session, and the frozen graphs' sessions
    # whose arenas grew at the training shape (generation reloads what it uses; measured on the built-in model's
    # recipe: a generation after a job peaked at 343 MiB with them held, 268 MiB in a fresh daemon)
    del trainer
    bundle.release_all()
    trim_heap()
    result.final_loss = float(np.mean(result.losses[-10:])) if result.losses else float("nan")
    result.seconds = time.perf_counter() - t_start
    result.precompute_s, result.steps_s = pre_s, step_s
    return result


def _online_feeds(plan: DrawPlan, frozen: FrozenPass, text, i: int) -> dict[str, np.ndarray]:
    feeds, target = plan.prologue_feeds(plan.draw(i), text)
    acc, rec = dict(feeds), {}
    for pos in range(len(frozen.names)):
        frozen.step(pos, acc, rec)
    return frozen.feeds(rec, target)


def _bank(bundle: Bundle, plan: DrawPlan, frozen: FrozenPass, text, steps, bank: str, progress: Progress) -> None:
    """Each graph over every draw, weights loaded once and released; states on disk between graphs."""
    steps = list(steps)
    os.makedirs(bank, exist_ok=True)
    todo = [i for i in steps if not os.path.exists(os.path.join(bank, f"{i:06d}.feeds.npz"))]
    if not todo:
        return
    total = len(frozen.names) + 1
    for i in todo:  # draws: crop, encode, noise (VAE encoder only)
        feeds, target = plan.prologue_feeds(plan.draw(i), text)
        _npz_save(os.path.join(bank, f"{i:06d}.acc.npz"), {**feeds, "target": target})
        crash_point("bank.draw")  # test hook (edge_runtime.faults): a draw's prologue inputs banked
    bundle.release_all()
    progress.event("precomputing", progress=1 / total)
    for pos, name in enumerate(frozen.names):
        for i in todo:
            if progress.should_stop():
                raise Cancelled("cancelled during the precompute")
            a = _npz_load(os.path.join(bank, f"{i:06d}.acc.npz"))
            rp = os.path.join(bank, f"{i:06d}.rec.npz")
            rec = _npz_load(rp) if pos > 0 else {}
            target = a.pop("target")
            frozen.step(pos, a, rec)
            _npz_save(os.path.join(bank, f"{i:06d}.acc.npz"), {**a, "target": target})
            _npz_save(rp, rec)
            crash_point("bank.graph")  # one graph's pass over one draw banked
        bundle.release(name)
        progress.event("precomputing", progress=(pos + 2) / total)
    for i in todo:
        a = _npz_load(os.path.join(bank, f"{i:06d}.acc.npz"))
        rec = _npz_load(os.path.join(bank, f"{i:06d}.rec.npz"))
        _npz_save(os.path.join(bank, f"{i:06d}.feeds.npz"), frozen.feeds(rec, a["target"]))
        crash_point("bank.feeds")  # a draw's training inputs banked, its intermediate states not yet removed
        for suffix in ("acc", "rec"):
            os.remove(os.path.join(bank, f"{i:06d}.{suffix}.npz"))


def choose_precompute(bundle: Bundle, requested: str = "") -> str:
    """The requested mode, else the rule the planner predicts with (edge_runtime.precompute): bank when the
    transformer's float32 weights exceed 256 MiB, else online."""
    if requested:
        if requested not in PRECOMPUTE_MODES:
            raise PersonalizeError(f"precompute must be one of {PRECOMPUTE_MODES} or empty, got {requested!r}")
        return requested
    return precompute_mode(int(bundle.model.get("parameters", 0)))


__all__ = ["Cancelled", "DrawPlan", "FrozenPass", "ImageLimits", "JobOptions", "JobResult", "PersonalizeError",
           "Progress", "choose_precompute", "decode_images", "images_from_pngs", "run_job"]
