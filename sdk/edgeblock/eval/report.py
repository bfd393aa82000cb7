"""The benchmark's report: the targets judged on a run's rows, results.md and the sample grid (grid.png)."""

from __future__ import annotations

import numpy as np

from ..method.train import VARIANTS
from .ablations import ABLATION_ROWS, ABLATIONS
from .subjects import Subject

ROWS = ("base", *VARIANTS)
DEVICE_ROWS = ("blockskip_device",)  # --runtime device: DiT-BlockSkip through compile, the daemon's trainer and generation
# --weights int8 / int4: the same through a bundle compiled with those frozen weights (`edgeblock compile --weights`)
QUANTIZED_ROWS = {"int8": "blockskip_device_int8", "int4": "blockskip_device_int4"}


def targets(rows: dict) -> dict:
    """Issue 3's targets: DiT-BlockSkip subject fidelity >= 0.95 x standard LoRA's, prompt fidelity >= its - 0.02.
    Without the base, standard_lora and blockskip rows every value is None and "missing" names the rows. With the
    device row, "device" holds issue 22's: blockskip_device within 0.03 of the torch blockskip row's subject fidelity
    and >= 0.95 x standard LoRA's."""
    missing = [r for r in ("base", "standard_lora", "blockskip") if r not in rows]
    if missing:
        return {"subject_fidelity_ratio": None, "prompt_fidelity_diff": None, "subject_fidelity_over_base": None,
                "met": None, "missing": missing}
    s, b, base = rows["standard_lora"], rows["blockskip"], rows["base"]
    ratio = b["subject_fidelity"] / s["subject_fidelity"] if s["subject_fidelity"] > 0 else None
    diff = b["prompt_fidelity"] - s["prompt_fidelity"]
    out = {
        "subject_fidelity_ratio": ratio,
        "prompt_fidelity_diff": diff,
        "subject_fidelity_over_base": b["subject_fidelity"] - base["subject_fidelity"],
        "met": bool(ratio is not None and ratio >= 0.95 and diff >= -0.02),
    }
    d = rows.get(DEVICE_ROWS[0])
    if d is not None:
        d_ratio = d["subject_fidelity"] / s["subject_fidelity"] if s["subject_fidelity"] > 0 else None
        gap = d["subject_fidelity"] - b["subject_fidelity"]
        out["device"] = {"subject_fidelity_vs_torch": gap, "subject_fidelity_ratio": d_ratio,
                         "prompt_fidelity_diff": d["prompt_fidelity"] - s["prompt_fidelity"],
                         "met": bool(d_ratio is not None and abs(gap) <= 0.03 and d_ratio >= 0.95)}
    return out


def quantized_targets(rows: dict) -> dict:
    """Issue 23's, per quantized device row: subject fidelity within 0.02 of the fp32 device row's, prompt fidelity
    equal (within 0.01); {} without the fp32 device row or a quantized one."""
    d = rows.get(DEVICE_ROWS[0])
    out = {}
    for w, name in QUANTIZED_ROWS.items():
        q = rows.get(name)
        if d is None or q is None:
            continue
        gap, pgap = q["subject_fidelity"] - d["subject_fidelity"], q["prompt_fidelity"] - d["prompt_fidelity"]
        out[name] = {"weights": w, "subject_fidelity_vs_fp32": gap, "prompt_fidelity_vs_fp32": pgap,
                     "met": bool(abs(gap) <= 0.02 and abs(pgap) <= 0.01)}
    return out


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


def _prior_text(cfg: dict) -> str:
    if not cfg.get("prior"):
        return "no prior preservation; "
    return (f"prior preservation with {cfg['prior']} class images per subject ({cfg['prior_share']:.0%} of the "
            "draws); ")


def _set_text(cfg: dict) -> str:
    name = cfg.get("subject_set", "benchmark")
    names = ", ".join(cfg["training_prompts"])
    return f"{names} (the benchmark's)" if name == "benchmark" else f"{names} (validation set, held out)"


def _patch_text(cfg: dict) -> str:
    ps = cfg["patch_schedule"]
    kind = ps.get("kind", "linear")
    shape = f"{ps.get('levels', 3)} sizes" if kind == "step" else kind
    return f"patch rows: {cfg['patch_train_res']} px crops, f_min {ps['f_min']:g}, {shape} in the noise level; "


def markdown(results: dict) -> str:
    rows, cfg = results["rows"], results["config"]
    cols = [c for c in _COLUMNS if any(c[0] in r for r in rows.values())]
    lines = [
        "# edgeblock eval",
        "",
        (
            f"Model `{cfg['model']}`; subjects: {_set_text(cfg)}; {cfg['images']} images per row ({cfg['samples']} per prompt); {cfg['steps']} training steps per subject and "
            f"variant at batch {cfg['batch']}, lr {cfg['lr']}, LoRA rank {cfg['lora_rank']} alpha "
            f"{cfg['lora_alpha']}; " + _patch_text(cfg) + _prior_text(cfg) + f"generation {cfg['gen_steps']} steps, guidance "
            f"{cfg['guidance']}, seed {cfg['seed']}."
        ),
        "",
        "| row | " + " | ".join(c[1] for c in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for name, r in rows.items():
        if name not in ABLATION_ROWS:
            lines.append(f"| {name} | " + " | ".join(_cells(r, cols)) + " |")
    t, ref = results["targets"], results["reference_check"]
    ratio = "n/a" if t["subject_fidelity_ratio"] is None else f"{t['subject_fidelity_ratio']:.3f}"
    blocks = "; ".join(f"{n} {v['blocks'] or 'none (no skip row run)'}" + (" (ablations: " + ", ".join(
        f"{a} {b}" for a, b in v["ablation_blocks"].items()) + ")" if v.get("ablation_blocks") else "")
        for n, v in results["per_subject"].items())
    if t["met"] is None:
        target_line = f"Targets (issue 3): not measured (rows not run: {', '.join(t['missing'])})."
    else:
        target_line = (f"Targets (issue 3): blockskip / standard_lora subject fidelity = {ratio} (>= 0.95), "
                       f"prompt fidelity difference = {t['prompt_fidelity_diff']:+.3f} (>= -0.02): "
                       f"{'met' if t['met'] else 'not met'}.")
    dev = t.get("device")
    if dev is not None:
        target_line += (f" Device (issue 22): blockskip_device - blockskip subject fidelity = "
                        f"{dev['subject_fidelity_vs_torch']:+.3f} (within 0.03), blockskip_device / standard_lora = "
                        f"{dev['subject_fidelity_ratio']:.3f} (>= 0.95): {'met' if dev['met'] else 'not met'}.")
    for name, q in results.get("quantized_targets", {}).items():
        target_line += (f" {q['weights']} weights (issue 23): {name} - blockskip_device subject fidelity = "
                        f"{q['subject_fidelity_vs_fp32']:+.3f} (within 0.02), prompt fidelity "
                        f"{q['prompt_fidelity_vs_fp32']:+.3f} (within 0.01): {'met' if q['met'] else 'not met'}.")
    lines += [
        "",
        target_line,
        "",
        (
            f"Metric check on the references: same subject {ref['same_subject']:.3f}, other subjects "
            f"{ref['cross_subject']:.3f}, plain world shapes of the same class {ref['plain_shapes']:.3f} "
            f"(max {ref['plain_shapes_max']:.3f})."
        ),
        "",
        "Trainable blocks of the skip rows: " + blocks + ".",
        "",
        *_ablation_lines(rows, cols),
        (
            "Peak training memory: live tensor bytes (weights held, activations, gradients, optimizer state) during "
            "the first subject's model load, trainer construction and first training step. Per-process RSS (one "
            "fresh process per variant) is what `edgeblock bench memory` measures."
        ),
        "",
    ]
    return "\n".join(lines)


def _cells(r: dict, cols) -> list[str]:
    return [c[2].format(r[c[0]]) if r.get(c[0]) is not None else "-" for c in cols]


def _ablation_lines(rows: dict, cols) -> list[str]:
    """The ablation rows' table (issue 26): each beside blockskip, with its difference from it in subject and
    prompt fidelity; [] without them."""
    names = [r for r in ABLATION_ROWS if r in rows]
    if not names:
        return []
    ref = rows.get("blockskip")
    lines = ["## Ablations", "",
             "Each row trains as blockskip (same steps, seeds, subjects, LoRA, crop side and blocks) but for one "
             "thing; d = row - blockskip.", "",
             "| row | changes | d subject fid. | d prompt fid. | " + " | ".join(c[1] for c in cols) + " |",
             "|---|---|---|---|" + "---|" * len(cols)]
    if ref is not None:
        lines.append("| blockskip | (the reference) | - | - | " + " | ".join(_cells(ref, cols)) + " |")
    for name in names:
        r = rows[name]
        d = [f"{r[k] - ref[k]:+.3f}" if ref is not None and r.get(k) is not None and ref.get(k) is not None else "-"
             for k in ("subject_fidelity", "prompt_fidelity")]
        lines.append(f"| {name} | {ABLATIONS[name]} | {d[0]} | {d[1]} | " + " | ".join(_cells(r, cols)) + " |")
    return lines + [""]


def save_grid(subjects: list[Subject], prompts: dict, generations: dict, path: str, rows: tuple[str, ...] = ROWS,
              scale: int = 2) -> None:
    """Per subject: its references, then each row's generations (rows: those run), labelled."""
    from PIL import Image, ImageDraw, ImageFont

    tile = 64 * scale
    pad, label_w, head_h = 4, 120, 18
    cols = max(max(len(s.images) for s in subjects), max(len(v) for v in prompts.values()))
    band_h = head_h + (1 + len(rows)) * (tile + pad) + head_h
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
        for row in rows:
            d.text((4, y + tile // 2), row, fill="black")
            for k, img in enumerate(generations[s.name].get(row, [])):
                put(img, label_w + k * (tile + pad), y)
            y += tile + pad
    grid.save(path)
