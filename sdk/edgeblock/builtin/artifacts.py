"""The built-in model's artifacts from a training checkpoint (`finalize`): the EMA weights as
transformer/ (diffusers layout), scheduler/scheduler_config.json, loss.csv, loss_curve.png, samples.png
and the model card README.md (written by `card`)."""
from __future__ import annotations

import csv
import json
import math
import os
import time

import numpy as np
import torch

from .assess import assess
from .card import model_card
from .checkpoint import ckpt_path, load_ckpt, recorded_config
from .pipeline import generate
from .text import MiniLMTextEncoder
from .train_config import PATCH, SIZE, build_model

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


def write_csv(out: str, history: list, log_every: int) -> None:
    """loss.csv: the mean loss of each log_every steps, with the last learning rate and wall time."""
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


def write_scheduler_config(out: str, shift: float) -> None:
    """scheduler/scheduler_config.json as diffusers' FlowMatchEulerDiscreteScheduler writes it: the
    static time shift the model was trained with, read by the samplers (torch pipeline, compile)."""
    os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
    cfg = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": shift,
           "use_dynamic_shifting": False}
    with open(os.path.join(out, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")



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


def finalize(out: str, ckpt_dir: str | None = None, seed: int = 0, guidance: float = 3.0,
             steps: int = 30) -> dict:
    """Write transformer/, scheduler/, loss.csv, loss_curve.png, samples.png, README.md from the last checkpoint."""
    ckpt_dir = ckpt_dir or os.path.join(out, "ckpt")
    st = load_ckpt(ckpt_dir)
    tc = recorded_config(st)
    if tc is None:
        raise ValueError(f"{ckpt_path(ckpt_dir)} records no TrainConfig (written before presets); resume it "
                         "once with --resume and the preset it was trained with, which records one")
    torch.set_num_threads(tc.threads)
    cfg, step, history, wall = st["config"], st["step"], st["history"], st["wall_s"]
    model = build_model(cfg)
    with torch.no_grad():
        for p, e in zip(model.parameters(), st["ema"]):
            p.copy_(e)
    model.eval()
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(os.path.join(out, "transformer"), safe_serialization=True)
    shift = float(tc.t_shift)
    write_scheduler_config(out, shift)
    write_csv(out, history, tc.log_every)
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
    info = dict(params=nparams, step=step, wall_s=wall, final_loss=final_loss, config=cfg, sample_seconds=gen_s,
                shift=shift, assess=reading, assess_partial=partial, prompts=SAMPLE_PROMPTS,
                resumed_at=st.get("resumed_at", []))
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(model_card(info, tc, st.get("preset"), guidance, steps, seed))
    print(f"finalized {out}: step {step}, final loss {final_loss:.4f}, {nparams / 1e6:.2f}M params",
          flush=True)
    return info
