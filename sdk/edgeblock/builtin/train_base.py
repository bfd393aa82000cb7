"""Train the built-in base text-to-image model (pixel-space FLUX DiT on the shapes world).

    python -m edgeblock.builtin.train_base --preset v10 --out sdk/edgeblock/builtin/model
    python -m edgeblock.builtin.train_base --preset NAME --out DIR [--steps N] [--max-minutes M] [--seed S]
        [--threads T] [--stop-at STEP] [--resume]
    python -m edgeblock.builtin.train_base --out DIR --finalize [--ckpt CKPT_DIR]

Every setting is in a TrainConfig (`train_config`); `--preset` names one (`presets`: v10 is the shipped
model) and the flags above override its budget, seed and threads. Flow matching (x_t = (1-t) x0 + t noise,
target noise - x0) at logit-normal noise levels, AdamW, warmup + cosine decay, caption dropout, fp32, EMA
of the weights (the exported model is the EMA). A curriculum is the config's stages; each stage, as each
resume, starts the data, noise and dropout streams afresh from (seed, step). Checkpoints (with optimizer
state) go to OUT/ckpt/ and stay out of git; `--stop-at STEP` ends the run there with a checkpoint and no
artifacts (the learning-rate schedule stays the budget's), `--resume` continues it. The final artifacts
(`artifacts.finalize`) are OUT/transformer/ (diffusers layout), loss.csv, loss_curve.png, samples.png and
README.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch

from edge_runtime import flow
from edge_runtime.noise import FlowMatching
from edge_runtime.patch_sampling import CropBox, crop_token_ids

from . import presets, world
from .artifacts import finalize, write_csv
from .checkpoint import ckpt_path, load_ckpt, recorded_config, save_ckpt
from .text import MiniLMTextEncoder
from .train_config import MAX_LEN, PATCH, RESUMABLE, SIZE, Stage, TrainConfig, build_model


def progress(step: int, total: int, wall_s: float, max_minutes: float | None) -> float:
    """Fraction of the run done: by steps, or by wall time when a budget is set (whichever is further)."""
    p = step / max(1, total)
    if max_minutes:
        p = max(p, wall_s / (60.0 * max_minutes))
    return min(1.0, p)


def lr_at(step: int, total: int, base: float, warmup: int, final_frac: float = 0.1,
          p: float | None = None) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to final_frac * base over progress p."""
    if step < warmup:
        return base * (step + 1) / warmup
    if p is None:
        p = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def low_res_ids(low: int, mode: str) -> np.ndarray:
    """Positional ids of a low-resolution batch. "grid": its own token grid (0 .. low/PATCH - 1);
    "scaled": the full-resolution coordinates of the same places (token centres), so that a caption's
    position ("bottom right") sits at the same rotary coordinates at both resolutions: FLUX's text
    tokens sit at the origin, so an image token's offset from them is its absolute position."""
    if mode == "scaled":
        return crop_token_ids(CropBox(0, 0, SIZE), low, PATCH)
    if mode != "grid":
        raise ValueError(f"unknown low-res ids mode {mode!r}; one of grid, scaled")
    return flow.image_ids(low // PATCH, low // PATCH)


def flow_loss(model, x0, states, pooled, txt_ids, img_ids, gen=None, t_shift: float = 1.0, weights=None):
    """Flow-matching loss at logit-normal noise levels, shifted by t_shift towards noise:
    t' = s t / (1 + (s - 1) t), i.e. sigmoid(z + ln s) (the time shift of SD3's schedulers).
    weights: optional per-pixel weights (B, 1, H, W); the loss is then the weighted mean of the squared error."""
    B = x0.shape[0]
    objective = FlowMatching(logit_mean=math.log(t_shift))
    t = objective.level(torch.randn(B, generator=gen))
    noise = torch.randn(x0.shape, generator=gen)
    xt, target = objective.noisy(x0, noise, t), objective.target(x0, noise)
    pred = model(hidden_states=flow.pack(xt, PATCH), encoder_hidden_states=states,
                 pooled_projections=pooled, timestep=t, img_ids=img_ids, txt_ids=txt_ids,
                 return_dict=False)[0]
    if weights is None:
        return torch.nn.functional.mse_loss(pred, flow.pack(target, PATCH))
    w = flow.pack(weights.expand(-1, x0.shape[1], -1, -1), PATCH)
    return ((pred - flow.pack(target, PATCH)) ** 2 * w).sum() / w.sum()


def pixel_weights(masks: np.ndarray, fg_weight: float) -> np.ndarray:
    """Per-pixel loss weights from shape coverage masks: 1 on the background, fg_weight on the shape."""
    return 1.0 + (fg_weight - 1.0) * masks


# ----------------------------------------------------------------- training
@dataclass
class Streams:
    """The random streams of a stretch of training, all seeded from (seed, step)."""
    data: Iterator[tuple]  # world.batches: images, captions (and shape masks)
    noise: torch.Generator  # noise levels and noise
    drop: np.random.Generator  # caption dropout
    res: np.random.Generator  # which batches are low-res


def streams(cfg: TrainConfig, stage: Stage, step: int) -> Streams:
    """The streams from step `step` on: a run's start, each stage's first step and each resume start them
    afresh (so a stage boundary draws as a --stop-at/--resume at that step did)."""
    return Streams(
        data=world.batches(cfg.seed * 1_000_003 + step, cfg.batch, SIZE, masks=cfg.fg_weight != 1.0,
                           attr_dropout=cfg.attr_dropout, world=stage.world, shapes_share=stage.shapes_share),
        noise=torch.Generator().manual_seed(cfg.seed * 7_919 + step),
        drop=np.random.default_rng(cfg.seed * 31 + step),
        res=np.random.default_rng(cfg.seed * 131 + step))


def train(cfg: TrainConfig, out: str, *, preset: str | None = None, ckpt: str | None = None,
          resume: bool = False, stop_at: int | None = None, finalize_after: bool = True) -> None:
    """Train `cfg` (preset: its name, for the card's reproduce command), checkpointing to ckpt (default
    OUT/ckpt); resume: continue the checkpoint there, whose settings must be cfg's apart from RESUMABLE;
    stop_at: end after that step with a checkpoint and no artifacts; finalize_after: write the artifacts
    when the budget is spent."""
    torch.set_num_threads(cfg.threads)
    ckpt_dir = ckpt or os.path.join(out, "ckpt")
    os.makedirs(out, exist_ok=True)
    mcfg = cfg.model_config()
    model = build_model(mcfg)
    params = [p for p in model.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.01)
    ema = [p.detach().clone() for p in params]
    step, history, wall, resumed_at = 0, [], 0.0, []
    if resume and os.path.exists(ckpt_path(ckpt_dir)):
        st = load_ckpt(ckpt_dir)
        was = recorded_config(st)  # None: a checkpoint from before presets, its settings unrecorded
        changed = was.differences(cfg, ignore=RESUMABLE) if was is not None else []
        if changed:
            raise ValueError(f"--resume with settings other than the checkpoint's ({', '.join(changed)}); the run "
                             f"began with preset {st.get('preset')!r}: resume with it (and its --seed)")
        mcfg = st["config"]
        model = build_model(mcfg)
        model.load_state_dict(st["model"])
        params = [p for p in model.parameters()]
        opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.01)
        opt.load_state_dict(st["optimizer"])
        ema = [e.clone() for e in st["ema"]]
        step, history, wall = st["step"], st["history"], st["wall_s"]
        resumed_at = list(st.get("resumed_at", [])) + [step]
        print(f"resumed from step {step} ({wall:.0f} s)", flush=True)
    nparams = sum(p.numel() for p in params)
    print(f"model: {nparams / 1e6:.2f}M params, config {json.dumps(mcfg)}", flush=True)
    model.train()

    enc = MiniLMTextEncoder()
    txt_ids = torch.zeros(MAX_LEN, 3)
    img_ids = torch.from_numpy(flow.image_ids(SIZE // PATCH, SIZE // PATCH))
    # multi-resolution: some batches are the same images area-downsampled to low_res (as real DiTs are
    # trained at several resolutions; patch-sampled personalization trains on resized crops at R = S/2)
    low = cfg.low_res
    low_ids = torch.from_numpy(low_res_ids(low, cfg.low_res_ids)) if low else None
    stage = cfg.stage_at(step)
    rs = streams(cfg, cfg.stages[stage], step)

    def checkpoint():
        save_ckpt(ckpt_dir, dict(config=mcfg, model=model.state_dict(), optimizer=opt.state_dict(),
                                 ema=ema, step=step, history=history, wall_s=wall, params=nparams,
                                 train_config=cfg.to_dict(), preset=preset, resumed_at=resumed_at))

    t0 = time.time()
    wall0 = wall
    if stop_at is not None and stop_at <= step:
        raise ValueError(f"--stop-at {stop_at} is not after the checkpoint's step {step}")
    stopped = False  # ended at --stop-at, before the budget: no final artifacts
    while progress(step, cfg.steps, wall, cfg.max_minutes) < 1.0 and not stopped:
        if cfg.stage_at(step) != stage:  # a new stage of the curriculum
            stage = cfg.stage_at(step)
            rs = streams(cfg, cfg.stages[stage], step)
            print(f"stage {stage + 1}/{len(cfg.stages)} from step {step}: {cfg.stages[stage]}", flush=True)
        lr = lr_at(step, cfg.steps, cfg.lr, cfg.warmup,
                   p=progress(step, cfg.steps, wall, cfg.max_minutes) if cfg.max_minutes else None)
        for g in opt.param_groups:
            g["lr"] = lr
        x0, caps, *m = next(rs.data)
        w = pixel_weights(m[0], cfg.fg_weight) if m else None
        caps = ["" if rs.drop.random() < cfg.caption_dropout else c for c in caps]
        states, pooled = enc.encode(caps, MAX_LEN)
        ids = img_ids
        if low and rs.res.random() < cfg.low_res_prob:
            k = SIZE // low
            x0 = x0.reshape(x0.shape[0], x0.shape[1], low, k, low, k).mean(axis=(3, 5))  # area downsample
            if w is not None:
                w = w.reshape(w.shape[0], 1, low, k, low, k).mean(axis=(3, 5))
            ids = low_ids
        loss = flow_loss(model, torch.from_numpy(np.ascontiguousarray(x0)), states, pooled, txt_ids, ids, rs.noise,
                         cfg.t_shift, None if w is None else torch.from_numpy(np.ascontiguousarray(w)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        d = min(cfg.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_mul_(ema, d)
            torch._foreach_add_(ema, [p.detach() for p in params], alpha=1 - d)
        step += 1
        wall = wall0 + time.time() - t0
        history.append((loss.item(), lr, wall))
        stopped = stop_at is not None and step >= stop_at
        done = stopped or progress(step, cfg.steps, wall, cfg.max_minutes) >= 1.0
        if step % cfg.log_every == 0 or done:
            recent = np.mean([h[0] for h in history[-cfg.log_every:]])
            print(f"step {step}/{cfg.steps} loss {recent:.4f} lr {lr:.2e} "
                  f"wall {wall:.0f}s ({wall / step:.3f} s/step)", flush=True)
            write_csv(out, history, cfg.log_every)
        if step % cfg.ckpt_every == 0 or done:
            checkpoint()
    if stopped:
        print(f"stopped at step {step} (--stop-at); continue with --resume", flush=True)
    elif finalize_after:
        finalize(out, ckpt_dir)


# ----------------------------------------------------------------- command line
def config_from_args(args) -> TrainConfig:
    """The preset named by --preset with the flags' overrides (ValueError for a bad name or value)."""
    over = {k: getattr(args, k) for k in ("steps", "seed", "threads") if getattr(args, k) is not None}
    if args.max_minutes is not None:
        over["max_minutes"] = args.max_minutes or None  # 0: no wall-time budget
    return replace(presets.preset(args.preset), **over)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default=presets.DEFAULT,
                    help=f"the TrainConfig to train (one of {', '.join(presets.PRESETS)}; default "
                         f"{presets.DEFAULT}, the shipped model)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=None, help="step budget (default: the preset's)")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="wall-time budget across resumes: stop (and finish the cosine decay) by then even if "
                         "--steps is not reached (default: the preset's; 0: none)")
    ap.add_argument("--seed", type=int, default=None, help="default: the preset's")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the preset's)")
    ap.add_argument("--resume", action="store_true", help="continue the checkpoint (same preset and seed)")
    ap.add_argument("--stop-at", type=int, default=None,
                    help="end the run after step N with a checkpoint and no final artifacts, keeping the "
                         "learning-rate schedule of the budget (continue with --resume)")
    ap.add_argument("--finalize", action="store_true",
                    help="only write the final artifacts from the latest checkpoint")
    ap.add_argument("--ckpt", default=None, help="checkpoint dir (default OUT/ckpt)")
    ap.add_argument("--no-finalize", action="store_true", help="skip artifacts after training")
    return ap


def main(argv=None) -> None:
    ap = parser()
    args = ap.parse_args(argv)
    if args.stop_at is not None and args.stop_at < 1:
        ap.error(f"--stop-at must be >= 1, got {args.stop_at}")
    if args.finalize:
        finalize(args.out, args.ckpt)
        return
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        ap.error(str(e))
    train(cfg, args.out, preset=args.preset, ckpt=args.ckpt, resume=args.resume, stop_at=args.stop_at,
          finalize_after=not args.no_finalize)


if __name__ == "__main__":
    main()
