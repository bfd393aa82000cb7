"""`edgeblock compile`: a diffusers DiT (or `builtin`) -> a verified device bundle.

Stages (each printed as a `[compile] ...` line):

1. check    arguments, model, resolutions, output directory (before anything is written);
2. select   cross-attention-masking selection when neither --blocks nor --selection is given;
3. export   prologue.onnx, frozen/group_NN.onnx, trainable/infer*.onnx, epilogue.onnx at the
            generation shape (dynamic batch/token/latent axes: one graph per piece serves the
            training and the generation shapes);
4. train    trainable/ ONNX Runtime training artifacts at the fixed training shape (batch 1);
5. shapes   every graph run in ONNX Runtime at the training and the generation shape; the input
            shapes become the TensorRT build plan engines/plan.json (data only: TensorRT is not
            installable on this host, engines are built on the device);
6. verify   (default for models under 1B parameters) each inference graph against torch on
            torch's inputs, the whole ORT chain against the torch prediction at both shapes, one
            ORT training step (loss and LoRA gradients) and ten AdamW steps against torch;
7. write    manifest.json via edge_runtime.manifest (sha256 of every file), then the temporary
            directory beside --out is renamed onto --out.

A bundle is rebuilt only when its fingerprint (sha256 of the model files compile reads, the
normalised arguments, the edgeblock version and the manifest schema) changes; otherwise compile
reports it up to date and returns.

Text and VAE (compile/encoders.py): text_encoder.onnx composes the family's text encoders as its
diffusers pipeline does (builtin: MiniLM states + pooled; FLUX: CLIP pooled + T5; SD3: two CLIPs
+ T5; PixArt: T5 + mask; Sana: Gemma-2 + mask), with each tokenizer as a `tokenizers` JSON file
and its padding spec; latent models also get vae_encoder.onnx / vae_decoder.onnx. Both are
verified through the device's own code path (edge_runtime/text.py) against torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from edge_runtime.fileio import sha256_file
from edge_runtime.patch_sampling import CROP_IDS, with_grid_crop
from edge_runtime.recipe import Recipe
from edge_runtime.manifest import (
    MANIFEST,
    TARGETS,
    Manifest,
    ManifestError,
    load_manifest,
    write_manifest,
)

PRECISIONS = ("fp32", "fp16")
VERIFY_PARAM_LIMIT = 1_000_000_000
REL_BOUND = {"fp32": 1e-4}
CURVE_BOUND = 0.01  # ten AdamW steps: relative loss-curve difference
PROMPT = "a photo of sks dog"
# What compile reads from a model directory (the fingerprint hashes these, nothing else: the
# built-in directory also holds training checkpoints and logs).
MODEL_PARTS = (
    "model_index.json", "edgeblock.json", "config.json", "transformer", "scheduler", "vae",
    "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3",
)
TENSORRT_NOTE = (
    "TensorRT is not installable on the compiling host: this plan is data only. Engines are specific to the "
    "TensorRT version and GPU; build them where both are (the device at first start, or a host of the same "
    "platform) and cache them by TensorRT version + GPU name + ONNX sha256."
)


@dataclass
class CompileOptions:
    model: str
    out: str
    blocks: tuple[int, ...] | None = None
    selection: str | None = None
    target: str = "cpu"
    train_res: int | None = None  # pixels (training crop side R; None: the model's recipe)
    gen_res: int | None = None  # pixels (generation side S)
    lora_rank: int | None = None  # None: the model's recipe (edge_runtime.recipe)
    precision: str = "fp32"
    verify: bool | None = None  # None: on for models under 1B parameters
    seed: int = 0
    select_count: int = 2  # calibration images when selection runs
    gen_batch: int = 2  # generation batch (classifier-free guidance doubles it)
    max_group_mb: float | None = None  # frozen-group size cap (fp32 MiB); None: auto (the trainable blocks' size); 0: no cap
    crop_ids: str | None = None  # FLUX: a training crop's position ids, "image" or "grid" (None: the recipe's)

    def recipe(self) -> Recipe:
        """The model's recommended recipe (edge_runtime.recipe) with this compile's overrides."""
        from ..method import model_recipe

        base = model_recipe(self.model)
        rank = self.lora_rank
        alpha = None if rank is None else rank * base.alpha / base.lora_rank  # keep the recipe's alpha / rank
        return base.with_(lora_rank=rank, lora_alpha=alpha, crop_ids=self.crop_ids)

    def fingerprint_args(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("model", "out", "verify", "selection"):
            d.pop(k)
        d["recipe"] = self.recipe().to_dict()
        d["blocks"] = list(self.blocks) if self.blocks is not None else None
        if self.selection:
            d["selection_sha256"] = sha256_file(self.selection)
        return d


@dataclass
class CompileResult:
    out: str
    up_to_date: bool
    manifest: Manifest
    verification: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0


def model_files(root: str) -> list[str]:
    """The files compile reads from a model directory (relative POSIX paths, sorted)."""
    out = []
    for part in MODEL_PARTS:
        p = os.path.join(root, part)
        if os.path.isfile(p):
            out.append(part)
        elif os.path.isdir(p):
            for dirpath, _, names in os.walk(p):
                for n in names:
                    out.append(os.path.relpath(os.path.join(dirpath, n), root).replace(os.sep, "/"))
    return sorted(out)


def fingerprint(root: str, opts: CompileOptions) -> str:
    from edge_runtime.manifest import SCHEMA_VERSION
    from edgeblock import __version__

    h = hashlib.sha256()
    h.update(json.dumps({"args": opts.fingerprint_args(), "version": __version__, "schema": SCHEMA_VERSION}, sort_keys=True).encode())
    for rel in model_files(root):
        h.update(rel.encode() + b"\0" + sha256_file(os.path.join(root, *rel.split("/"))).encode() + b"\n")
    return h.hexdigest()


def _say(progress: Callable[[str], None] | None, msg: str) -> None:
    if progress:
        progress(msg)


# ---------------------------------------------------------------------------------------------
# Checks (nothing is written before they pass)
# ---------------------------------------------------------------------------------------------
def check_out_dir(out: str) -> bool:
    """True when --out is an existing bundle (to be reused or replaced); False when absent or empty.

    Anything else (a file, a non-empty directory without manifest.json) is refused.
    """
    if not os.path.exists(out):
        parent = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(parent):
            raise ValueError(f"--out {out}: the parent directory {parent} does not exist")
        return False
    if not os.path.isdir(out):
        raise ValueError(f"--out {out} exists and is not a directory; give a new path or an existing bundle")
    if os.path.exists(os.path.join(out, MANIFEST)):
        return True
    if os.listdir(out):
        raise ValueError(
            f"--out {out} exists and is not a bundle (no {MANIFEST}); refusing to overwrite it. "
            "Give a new path, an empty directory or an existing bundle"
        )
    return False


def resolution_multiple(adapter, downsample: int) -> int:
    """Pixel sides must be divisible by this: the VAE downsampling x the patch (FLUX: packing) size."""
    patch = adapter.pack if adapter.family == "flux" else int(adapter.config.get("patch_size") or 1)
    return downsample * patch


def default_gen_res(root: str, adapter, downsample: int) -> int:
    side = adapter.config.get("sample_size")
    if isinstance(side, int) and side > 0:
        return side * downsample
    for name in ("vae/config.json", "edgeblock.json"):
        p = os.path.join(root, name)
        if os.path.exists(p):
            with open(p) as f:
                cfg = json.load(f)
            if name.startswith("vae") and isinstance(cfg.get("sample_size"), int):
                return cfg["sample_size"]
            if isinstance(cfg.get("latent_size"), int):
                return cfg["latent_size"] * downsample
    return 512


def check_resolutions(opts: CompileOptions, multiple: int, default_gen: int) -> tuple[int, int]:
    gen = opts.gen_res if opts.gen_res is not None else default_gen
    train = opts.train_res if opts.train_res is not None else opts.recipe().train_res(gen, multiple)
    for name, v in (("--gen-res", gen), ("--train-res", train)):
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive number of pixels, got {v!r}")
        if v % multiple:
            raise ValueError(
                f"{name} {v} is not divisible by {multiple} (the VAE downsampling x the patch size this model needs); "
                f"try {max(multiple, v // multiple * multiple)}"
            )
    if train > gen:
        raise ValueError(f"--train-res {train} is larger than --gen-res {gen}: the training crop is a part of the image")
    return train, gen


def check_blocks(blocks: Sequence[int], num_blocks: int, what: str = "--blocks") -> tuple[int, ...]:
    chosen = sorted({int(b) for b in blocks})
    if not chosen:
        raise ValueError(f"{what} is empty: choose at least one trainable block (all blocks skipped trains nothing)")
    bad = [b for b in chosen if not 0 <= b < num_blocks]
    if bad:
        raise ValueError(f"{what}: blocks {bad} out of range; this model has blocks 0..{num_blocks - 1}")
    return tuple(chosen)


def read_selection(path: str, num_blocks: int) -> tuple[tuple[int, ...], dict]:
    try:
        with open(path) as f:
            report = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"--selection {path}: no such file")
    except json.JSONDecodeError as e:
        raise ValueError(f"--selection {path} is not JSON: {e}")
    if not isinstance(report, dict) or not isinstance(report.get("selected"), list):
        raise ValueError(f"--selection {path}: no `selected` block list (write it with `edgeblock select`)")  # noqa: TRY004
    if report.get("num_blocks") not in (None, num_blocks):
        raise ValueError(f"--selection {path} is for a model with {report['num_blocks']} blocks; this one has {num_blocks}")
    return check_blocks(report["selected"], num_blocks, f"--selection {path}"), report


# ---------------------------------------------------------------------------------------------
# Compile
# ---------------------------------------------------------------------------------------------
def compile_bundle(opts: CompileOptions, progress: Callable[[str], None] | None = print) -> CompileResult:
    """Compile `opts.model` into the bundle `opts.out` (see the module docstring)."""
    import torch

    from ..models import load_model
    from ..models.pipeline_parts import is_builtin, load_codec

    t0 = time.time()
    _say(progress, "[compile] 1/7 check: model, arguments, output directory")
    if opts.target not in TARGETS:
        raise ValueError(f"--target {opts.target!r} is not one of {', '.join(TARGETS)}")
    if opts.precision not in PRECISIONS:
        raise ValueError(f"--precision {opts.precision!r} is not one of {', '.join(PRECISIONS)}")
    if opts.lora_rank is not None and opts.lora_rank < 1:
        raise ValueError(f"--lora-rank must be >= 1, got {opts.lora_rank}")
    if opts.blocks is not None and opts.selection:
        raise ValueError("give --blocks or --selection, not both")
    if opts.crop_ids not in (None, *CROP_IDS):
        raise ValueError(f"--crop-ids {opts.crop_ids!r} is not one of {', '.join(CROP_IDS)}")
    is_bundle = check_out_dir(opts.out)
    loaded = load_model(opts.model)  # ModelError (a ValueError) for unsupported models
    adapter = loaded.adapter
    if opts.crop_ids == "image" and adapter.family != "flux":
        raise ValueError(f"--crop-ids image places FLUX's rotary position ids; a {adapter.family} model has none")
    root = loaded.root or loaded.transformer_dir
    builtin = is_builtin(opts.model)
    if not builtin and loaded.root is None:
        raise ValueError(
            f"model {opts.model!r} is a bare transformer folder; compile needs `builtin` or a full diffusers pipeline "
            "directory (text encoders, scheduler and VAE are read from it)"
        )
    codec = load_codec(opts.model)
    multiple = resolution_multiple(adapter, codec.downsample)
    train_res, gen_res = check_resolutions(opts, multiple, default_gen_res(root, adapter, codec.downsample))
    selection_report = None
    if opts.blocks is not None:
        blocks = check_blocks(opts.blocks, adapter.num_blocks)
    elif opts.selection:
        blocks, selection_report = read_selection(opts.selection, adapter.num_blocks)
    else:
        blocks = None

    fp = fingerprint(root, opts)
    if is_bundle:
        try:
            old = load_manifest(opts.out)
            if old.model.get("fingerprint") == fp:
                _say(progress, f"[compile] {opts.out} is up to date (same model files and arguments): nothing to do")
                return CompileResult(opts.out, True, old, old.model.get("verification", {}), time.time() - t0)
            _say(progress, f"[compile] {opts.out} is a bundle of another model or arguments: rebuilding it")
        except ManifestError as e:
            _say(progress, f"[compile] {opts.out} is a broken bundle ({e}): rebuilding it")

    params = adapter.param_count()
    verify = opts.verify if opts.verify is not None else params < VERIFY_PARAM_LIMIT
    torch.manual_seed(opts.seed)

    # 2. selection
    if blocks is None:
        _say(progress, "[compile] 2/7 select: scoring blocks by cross-attention masking")
        k = opts.recipe().blocks_of(adapter.num_blocks)
        selection_report = run_selection(opts.model, loaded, train_res, opts.select_count, opts.seed, k)
        blocks = tuple(selection_report["selected"])
    else:
        _say(progress, f"[compile] 2/7 select: trainable blocks {list(blocks)} from "
                       f"{'--selection ' + opts.selection if opts.selection else '--blocks'}")
    _say(progress, f"[compile]   trainable blocks {list(blocks)} of {adapter.num_blocks}")

    parent = os.path.dirname(os.path.abspath(opts.out))
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(opts.out))}.tmp-", dir=parent)
    try:
        manifest, verification = _build(opts, loaded, builtin, blocks, selection_report, train_res, gen_res, multiple,
                                         codec.downsample, params, verify, fp, tmp, progress)
        _say(progress, "[compile] 7/7 write: manifest.json")
        write_manifest(tmp, manifest)
        _install(tmp, opts.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    wall = time.time() - t0
    _say(progress, f"[compile] done in {wall:.1f} s: {opts.out}")
    return CompileResult(opts.out, False, load_manifest(opts.out), verification, wall)


def _install(tmp: str, out: str) -> None:
    """Move the finished bundle onto `out` (replacing an old bundle there)."""
    if os.path.exists(out):
        trash = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.old-", dir=os.path.dirname(os.path.abspath(out)))
        os.rmdir(trash)
        os.replace(out, trash)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)


def run_selection(spec: str, loaded, res: int, count: int, seed: int, k: int) -> dict:
    """Score the blocks on `count` calibration images and pick the top k."""
    from ..method.selection import score_blocks, selection_report
    from ..selection_data import calibration_set

    items = calibration_set(spec, loaded, None, "sks", None, None, res, count, seed=seed)
    scores = score_blocks(loaded.adapter, loaded.objective, items, noise_levels=(0.25, 0.5, 0.75), noises=1, seed=seed)
    report = selection_report(loaded.adapter, scores, k, False)
    report["calibration"] = {"items": len(items), "res": res, "noise_levels": [0.25, 0.5, 0.75], "noises": 1, "seed": seed,
                             "images": "procedural shapes (edgeblock.builtin.world)"}
    return report


def _inputs(cond, objective, latents, t, guidance):
    import torch

    eps = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    tt = torch.full((latents.shape[0],), float(t))
    return cond.inputs(objective.noisy(latents, eps, tt), objective.timestep(tt), guidance), eps, tt


def _group_limit(opts: CompileOptions, adapter, plan) -> int | None:
    """Frozen-group cap in parameters (None: one group per skipped run)."""
    from ..method.blockskip import auto_group_limit

    if opts.max_group_mb is not None and opts.max_group_mb < 0:
        raise ValueError(f"--max-group-mb must be >= 0 (0: no cap), got {opts.max_group_mb}")
    if opts.max_group_mb == 0:
        return None
    if opts.max_group_mb:
        return max(1, int(opts.max_group_mb * 2**20 / 4))
    return auto_group_limit([adapter.block_param_count(i) for i in range(adapter.num_blocks)], plan.trainable)


def _build(opts, loaded, builtin, blocks, selection_report, train_res, gen_res, multiple, downsample, params, verify, fp,
           tmp, progress) -> tuple[Manifest, dict]:
    import torch

    from edge_runtime.patch_sampling import PatchSchedule

    from ..method.blockskip import SkipPlan, precompute
    from ..method.lora import LoRASpec
    from ..models.pipeline_parts import load_text_stack
    from . import onnx_export as ox
    from . import ort_training as ot

    adapter, objective = loaded.adapter, loaded.objective
    plan = SkipPlan.make(adapter.num_blocks, blocks)
    recipe = opts.recipe()
    lora = LoRASpec(rank=recipe.lora_rank, alpha=recipe.alpha)
    text = load_text_stack(opts.model)
    cond = text.encode([PROMPT])
    guidance = 1.0 if adapter.config.get("guidance_embeds") else None
    c = adapter.latent_channels
    gen_side, train_side = gen_res // downsample, train_res // downsample
    g = torch.Generator().manual_seed(opts.seed)

    # 3. inference graphs at the generation shape
    _say(progress, f"[compile] 3/7 export: inference graphs ({gen_res}px generation, latent {gen_side}x{gen_side})")
    x_gen, _, _ = _inputs(cond, objective, torch.randn(opts.gen_batch, c, gen_side, gen_side, generator=g), 0.6, guidance)
    group_limit = _group_limit(opts, adapter, plan)
    specs = ox.export_inference_graphs(adapter, plan, lora, x_gen, tmp, max_group_params=group_limit,
                                       on_graph=lambda s: _say(progress, f"[compile]   {os.path.relpath(s.path, tmp)}"))

    # 4. training artifacts at the fixed training shape (one precomputed draw, batch 1)
    _say(progress, f"[compile] 4/7 train: ORT training artifacts ({train_res}px crops, latent {train_side}x{train_side})")
    x0 = torch.randn(1, c, train_side, train_side, generator=g)
    x_tr, eps, tt = _inputs(cond, objective, x0, 0.5, guidance)
    (pre,) = precompute(adapter, plan, [(x_tr, objective.target(x0, eps, tt))])
    tspec = ot.export_training_artifacts(adapter, plan, lora, pre, os.path.join(tmp, "trainable"))
    tdict = tspec.to_dict()
    tdict["artifact_dir"] = "trainable"
    with open(os.path.join(tmp, "trainable", ot.SPEC_FILE), "w") as f:
        json.dump({**tdict, "artifact_dir": "."}, f, indent=1)

    # 5. shapes at both profiles (ORT chain, zero LoRA) -> TensorRT build plan
    _say(progress, "[compile] 5/7 shapes: ORT chain at the training and generation shapes -> engines/plan.json")
    zero = {n: np.zeros(d["shape"], np.float32) for s in specs for n, d in s.lora.items()}
    # ORT sessions are kept for the verification (small models); without it each graph's session is
    # dropped after its run, so the shape pass never holds the whole model in ONNX Runtime at once.
    sessions: dict[str, Any] | None = {} if verify else None
    x_tr1, _, _ = _inputs(cond, objective, torch.randn(1, c, train_side, train_side, generator=g), 0.5, guidance)
    x_gen1, _, _ = _inputs(cond, objective, torch.randn(1, c, gen_side, gen_side, generator=g), 0.5, guidance)
    shapes_tr, _ = chain_shapes(specs, {**ox.prologue_inputs(x_tr1), **zero}, sessions)
    shapes_gen, _ = chain_shapes(specs, {**ox.prologue_inputs(x_gen1), **zero}, sessions)
    rel = {s.path: os.path.relpath(s.path, tmp).replace(os.sep, "/") for s in specs}
    engine_plan = tensorrt_plan(specs, rel, shapes_tr, shapes_gen, opts.precision, opts.gen_batch, tmp)
    os.makedirs(os.path.join(tmp, "engines"), exist_ok=True)
    with open(os.path.join(tmp, "engines", "plan.json"), "w") as f:
        json.dump(engine_plan, f, indent=2)

    # 6. verification
    verification: dict[str, Any] = {"run": bool(verify)}
    if verify:
        _say(progress, "[compile] 6/7 verify: ONNX Runtime against torch")
        verification = verify_bundle(adapter, plan, lora, specs, rel, tspec, pre, x_gen, x_tr1, sessions, opts.precision, progress)
        verification["run"] = True
    else:
        why = "--no-verify" if opts.verify is False else f"{params / 1e9:.2f} B parameters >= 1 B"
        _say(progress, f"[compile] 6/7 verify: skipped ({why})")
        verification["skipped"] = why

    # text encoder(s) + tokenizers; VAE of latent models
    from ..models.pipeline_parts import load_codec
    from .encoders import export_text_encoder, export_vae

    extra: dict[str, dict] = {}
    _say(progress, "[compile]   text_encoder.onnx + tokenizer files")
    extra["text_encoder"] = export_text_encoder(text, tmp, verify)
    if downsample > 1:
        _say(progress, "[compile]   vae_encoder.onnx + vae_decoder.onnx")
        extra["vae"] = export_vae(load_codec(opts.model), tmp, train_res, gen_res, verify, seed=opts.seed)
    if verify:
        for name, d in extra.items():
            r = d["verification"]
            verification[name] = r
            _say(progress, f"[compile]   {name:<28s} max abs {r['max_abs']:.2e}  rel {r['max_rel']:.2e}")
            if r["max_rel"] > REL_BOUND["fp32"]:
                raise RuntimeError(f"verification failed (no bundle written): {name} rel {r['max_rel']:.2e}")

    # 7. manifest
    chain = [("trainable" if s.blocks[0] in plan.trainable else "frozen", list(s.blocks)) for s in specs[1:-1]]
    group_of: dict[int, str] = {}
    for spec in specs[1:-1]:
        for i in spec.blocks:
            group_of.setdefault(i, rel[spec.path][: -len(".onnx")])
    block_list = [
        {"index": i, "name": adapter.block_names[i], "kind": adapter.block_kind(i),
         "role": "trainable" if i in plan.trainable else "frozen", "group": group_of[i]}
        for i in range(adapter.num_blocks)
    ]
    graphs = {}
    for s in specs:
        d = s.to_dict()
        d["path"] = rel[s.path]
        graphs[rel[s.path][: -len(".onnx")]] = d
    graphs["training"] = tdict
    for name, d in extra.items():
        graphs[name] = {k: v for k, v in d.items() if k != "verification"}
    model = {
        "source": "builtin" if opts.model == "builtin" else os.path.abspath(opts.model),
        "family": adapter.family,
        "parameters": int(params),
        "num_blocks": adapter.num_blocks,
        "latent_channels": c,
        "vae_downsample": downsample,
        "resolution_multiple": multiple,
        "text": {"length": int(cond.text.shape[1]), "dim": int(cond.text.shape[2]),
                 "pooled_dim": None if cond.pooled is None else int(cond.pooled.shape[1]), "mask": cond.mask is not None},
        "guidance_embeds": bool(adapter.config.get("guidance_embeds")),
        "config": {k: v for k, v in adapter.config.items() if isinstance(v, (int, float, str, bool, list, type(None)))},
        "fingerprint": fp,
        "compile_args": opts.fingerprint_args(),
        "precision": opts.precision,
        "generation_chain": [{"kind": k, "blocks": run} for k, run in chain],
        "max_group_params": group_limit,
        "sampler": sampler_config(loaded.root, objective, adapter.family),
        "selection": selection_report if selection_report is not None else {"given": list(blocks)},
        "verification": verification,
        "engines": "engines/plan.json",
    }
    manifest = Manifest(
        family=adapter.family, blocks=block_list, trainable=list(plan.trainable), train_res=train_res, gen_res=gen_res,
        scheduler=objective.to_dict(),
        patch_schedule={**asdict(PatchSchedule(f_min=recipe.schedule_f_min(train_res, gen_res))), "train_res": train_res,
                        "gen_res": gen_res, "crop_ids": crop_ids_of(recipe, adapter.family)},
        lora={**asdict(lora), "targets": list(lora.targets), "init": "B = 0 (the adapter starts at the base model)",
              "names": "diffusers/PEFT saved names (see graphs.*.lora)"},
        target=opts.target, graphs=graphs, model=model,
        recipe=recipe.with_(train_res_fraction=train_res / gen_res, trainable_blocks=len(plan.trainable),
                            crop_ids=crop_ids_of(recipe, adapter.family)).to_dict(),
    )
    return manifest, verification


def crop_ids_of(recipe: Recipe, family: str) -> str:
    """The manifest's patch_schedule.crop_ids: FLUX places a training crop's tokens as the recipe says (the
    image coordinates of the place it was cut from, or its own grid); the other families have no position ids."""
    if family != "flux":
        return "grid"
    return recipe.crop_ids


def sampler_config(root: str | None, objective, family: str = "flux") -> dict[str, Any]:
    """How the device samples (edge_runtime/sampler.py), from the pipeline's scheduler_config.json.

    Flow models: Euler over sigmas 1 -> 0 with the scheduler's shift, or FLUX's resolution-dependent
    (dynamic) shift; epsilon models: DDIM (eta 0) over the DDPM betas.
    """
    cfg: dict[str, Any] = {}
    path = os.path.join(root, "scheduler", "scheduler_config.json") if root else None
    if path and os.path.exists(path):
        with open(path) as f:
            cfg = json.load(f)
    if objective.kind == "flow":
        out: dict[str, Any] = {"kind": "flow_euler", "shift": float(cfg.get("shift", 1.0)),
                               "dynamic_shift": bool(cfg.get("use_dynamic_shifting", False)),
                               # FluxPipeline passes sigmas linspace(1, 1/n, n); SD3's pipeline lets the
                               # scheduler space them (edge_runtime/sampler.flow_sigmas)
                               "spacing": "scheduler" if family == "sd3" else "pipeline_sigmas",
                               "num_train_timesteps": int(cfg.get("num_train_timesteps", 1000))}
        if out["dynamic_shift"]:
            out.update(base_shift=float(cfg.get("base_shift", 0.5)), max_shift=float(cfg.get("max_shift", 1.15)),
                       base_seq_len=int(cfg.get("base_image_seq_len", 256)),
                       max_seq_len=int(cfg.get("max_image_seq_len", 4096)))
        return out
    return {"kind": "ddim", **{k: v for k, v in objective.to_dict().items() if k != "kind"},
            "steps_offset": int(cfg.get("steps_offset", 0)), "set_alpha_to_one": bool(cfg.get("set_alpha_to_one", True))}


def chain_shapes(specs, feeds, sessions) -> tuple[dict[str, dict[str, list[int]]], dict[str, np.ndarray]]:
    """Run the chain in ONNX Runtime and record each graph's input shapes (by graph path)."""
    from . import onnx_export as ox

    acc: dict[str, Any] = dict(feeds)
    shapes = {}
    for spec in specs:
        acc = with_grid_crop(spec.inputs, acc)
        shapes[spec.path] = {n: list(np.shape(acc[n])) for n in spec.inputs}
        acc = ox.run_chain([spec], acc, sessions)
    return shapes, acc


def tensorrt_plan(specs, rel, shapes_tr, shapes_gen, precision, gen_batch, root) -> dict:
    """A TensorRT build plan per frozen group: optimisation profiles for training and generation."""
    def profile(shapes: dict[str, list[int]], axes: dict, batch: tuple[int, int, int]) -> dict:
        out = {}
        for name, shape in shapes.items():
            mn, opt, mx = list(shape), list(shape), list(shape)
            for a, label in axes.get(name, {}).items():
                if label == "batch":
                    mn[int(a)], opt[int(a)], mx[int(a)] = batch
            out[name] = {"min": mn, "opt": opt, "max": mx}
        return out

    groups = []
    for s in specs:
        if s.kind != "group":
            continue
        path = rel[s.path]
        groups.append({
            "onnx": path,
            "onnx_sha256": sha256_file(os.path.join(root, *path.split("/"))),
            "blocks": s.blocks,
            "engine": "engines/" + os.path.basename(path)[: -len(".onnx")] + ".engine",
            "profiles": {
                # training: the frozen precompute at the fixed training shape (one draw at a time)
                "training": profile(shapes_tr[s.path], s.dynamic_axes, (1, 1, 1)),
                # generation: batch 1 (no guidance) to gen_batch (classifier-free guidance)
                "generation": profile(shapes_gen[s.path], s.dynamic_axes, (1, gen_batch, gen_batch)),
            },
            "precision": precision,
            "refittable": True,
            "outputs": s.outputs,
        })
    return {
        "version": 1,
        "status": "not built",
        "note": TENSORRT_NOTE,
        "cache_key": ["tensorrt_version", "gpu_name", "onnx_sha256"],
        "timing_cache": "engines/timing.cache",
        "precision": precision,
        "groups": groups,
    }


# ---------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------
def _torch_graph_io(adapter, plan, specs, x):
    """Per graph: torch's input feeds and expected outputs (zero LoRA == the frozen blocks)."""
    import torch

    from . import onnx_export as ox

    out = []
    with torch.no_grad():
        state, ctx = adapter.prologue(x)
        layout = ox.CtxLayout.of(ctx)
        ctx_named = layout.tensors(ctx)
        pro_expected = {**ox.flatten_state(state), **ctx_named}
        out.append((ox.prologue_inputs(x), {k: v for k, v in pro_expected.items() if k != ox.HW}))
        for spec in specs[1:-1]:
            feeds = {**ox.flatten_state(state), **ctx_named}
            feeds.update({n: np.zeros(d["shape"], np.float32) for n, d in spec.lora.items()})
            for i in spec.blocks:
                state = adapter.run_block(adapter.build_block(i), i, state, ctx)
            out.append((feeds, ox.flatten_state(state, "out")))
        pred = adapter.epilogue(state, ctx)
        out.append(({**ox.flatten_state(state), **ctx_named}, {"prediction": pred}))
    return out, pred


def verify_bundle(adapter, plan, lora, specs, rel, tspec, pre, x_gen, x_tr, sessions, precision, progress) -> dict:
    import torch

    from ..method.blockskip import BlockSkipModel
    from ..method.lora import randomize_lora
    from . import onnx_export as ox
    from . import ort_training as ot

    bound = REL_BOUND.get(precision, REL_BOUND["fp32"])  # the ONNX graphs are fp32 whatever the engine precision
    failures = []
    result: dict[str, Any] = {"bound_rel": bound, "graphs": {}, "chain": {}}

    # each graph on torch's inputs (generation shape)
    io, pred_gen = _torch_graph_io(adapter, plan, specs, x_gen)
    for spec, (feeds, expected) in zip(specs, io):
        sess = sessions.get(spec.path) or sessions.setdefault(spec.path, ox.session(spec.path))
        got = ox.run_onnx(sess, feeds)
        r = ox.compare(got, {k: v for k, v in expected.items() if k in got})
        result["graphs"][rel[spec.path]] = {"max_abs": r.max_abs, "max_rel": r.max_rel}
        _say(progress, f"[compile]   {rel[spec.path]:<28} max abs {r.max_abs:.2e}  rel {r.max_rel:.2e}")
        if not r.ok(bound):
            failures.append(f"{rel[spec.path]}: rel {r.max_rel:.2e} > {bound:.0e}")

    # the whole chain vs the torch prediction at both shapes
    for name, x, ref in (("generation", x_gen, pred_gen), ("training", x_tr, None)):
        if ref is None:
            with torch.no_grad():
                _, ref = _torch_graph_io(adapter, plan, specs, x)
        zero = {n: np.zeros(d["shape"], np.float32) for s in specs for n, d in s.lora.items()}
        acc = ox.run_chain(specs, {**ox.prologue_inputs(x), **zero}, sessions)
        r = ox.compare({"prediction": acc["prediction"]}, {"prediction": ref})
        result["chain"][name] = {"shape": list(ref.shape), "max_abs": r.max_abs, "max_rel": r.max_rel}
        _say(progress, f"[compile]   chain at {name} shape {tuple(ref.shape)}: max abs {r.max_abs:.2e}  rel {r.max_rel:.2e}")
        if not r.ok(bound):
            failures.append(f"chain at {name} shape: rel {r.max_rel:.2e} > {bound:.0e}")

    # one ORT training step vs torch, from the same (random, non-zero) LoRA initialisation
    net = BlockSkipModel(adapter, plan, lora)
    randomize_lora(net, seed=3, scale=0.1)
    trainer = ot.OrtTrainer(tspec.artifact_dir)
    params = {ot._published(adapter, n): p for n, p in net.lora_parameters().items()}
    trainer.set_lora_weights({n: p.detach() for n, p in params.items()})
    feeds = tspec.feeds(pre)
    loss_o, grads_o = trainer.loss_and_grads(feeds)
    net.zero_grad()
    loss_t = torch.nn.functional.mse_loss(net(pre), pre.target)
    loss_t.backward()
    loss_rel = abs(loss_o - loss_t.item()) / max(abs(loss_t.item()), 1e-30)
    grad_rel = 0.0
    for n in tspec.requires_grad:
        ref = params[n].grad.detach().numpy()
        grad_rel = max(grad_rel, float(np.abs(grads_o[n] - ref).max() / max(np.abs(ref).max(), 1e-30)))
    # ten AdamW steps of both
    cfg = ot.AdamWConfig(**{k: v for k, v in tspec.optimizer.items() if k in ("lr", "eps", "weight_decay")},
                         betas=tuple(tspec.optimizer.get("betas", (0.9, 0.999))))
    opt = cfg.torch([params[n] for n in tspec.requires_grad])
    curve_t, curve_o = ot.paired_curves(net, pre, trainer, feeds, opt)
    curve_rel = float(np.max(np.abs(np.array(curve_o) - np.array(curve_t)) / np.abs(np.array(curve_t))))
    result["training"] = {"loss_torch": loss_t.item(), "loss_ort": loss_o, "loss_rel": loss_rel, "grad_max_rel": grad_rel,
                          "curve_torch": curve_t, "curve_ort": curve_o, "curve_max_rel": curve_rel,
                          "trainable_tensors": len(tspec.requires_grad)}
    _say(progress, f"[compile]   training step: loss rel {loss_rel:.2e}  LoRA grad rel {grad_rel:.2e} "
                   f"({len(tspec.requires_grad)} tensors); 10 AdamW steps: curve rel {curve_rel:.2e}")
    if loss_rel > bound or grad_rel > bound:
        failures.append(f"training step: loss rel {loss_rel:.2e}, grad rel {grad_rel:.2e} > {bound:.0e}")
    if curve_rel > CURVE_BOUND:
        failures.append(f"ten training steps: loss curves differ by {curve_rel:.2%} > {CURVE_BOUND:.0%}")
    # the chain with a non-zero adapter (the ORT-trained LoRA) vs torch with the same LoRA, generation shape
    trained = trainer.lora_weights()
    ot.load_lora_into(net, adapter, trained)
    with torch.no_grad():
        state, ctx = adapter.prologue(x_gen)
        for i in range(adapter.num_blocks):
            block = net.blocks[str(i)] if i in plan.trainable else adapter.build_block(i)
            state = adapter.run_block(block, i, state, ctx)
        ref = adapter.epilogue(state, ctx)
    acc = ox.run_chain(specs, {**ox.prologue_inputs(x_gen), **trained}, sessions)
    r = ox.compare({"prediction": acc["prediction"]}, {"prediction": ref})
    change = ox.compare({"prediction": ref}, {"prediction": pred_gen}).max_rel
    result["chain"]["generation_lora"] = {"shape": list(ref.shape), "max_abs": r.max_abs, "max_rel": r.max_rel,
                                          "change_vs_base_rel": change}
    _say(progress, f"[compile]   chain with the ORT-trained LoRA: max abs {r.max_abs:.2e}  rel {r.max_rel:.2e} "
                   f"(the LoRA changes the prediction by {change:.2e} rel)")
    if not r.ok(bound):
        failures.append(f"chain with LoRA: rel {r.max_rel:.2e} > {bound:.0e}")
    result["ok"] = not failures
    if failures:
        raise RuntimeError("verification failed (no bundle written): " + "; ".join(failures))
    return result
