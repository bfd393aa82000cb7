"""What one `edgeblock compile` run knows: its options, the bundle fingerprint and the CompileContext
the stages (compile/stages.py) fill in turn and pass whole to each other.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from edge_runtime.fileio import sha256_file
from edge_runtime.manifest import Manifest
from edge_runtime.recipe import Recipe
from edge_runtime.targets import CPU
from edge_runtime.weights import FP32, GRAPH_ROLES, INT4, default_weights, graph_precision

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


@dataclass
class CompileOptions:
    model: str
    out: str
    blocks: tuple[int, ...] | None = None
    selection: str | None = None
    target: str = CPU
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
    top_k: int | None = None  # blocks selection picks when no --blocks/--selection is given (None: the recipe's)
    weights: str | None = None  # frozen graphs' weight precision (edge_runtime.weights); None: the target's default
    # text encoder parts (compile/text_parts.py): 0 auto (none above the largest frozen group), 1 whole, N parts;
    # None: what the target needs (text_part_count)
    text_parts: int | None = None
    # generation sizes beyond the squares of gen_res and train_res, (width, height) pixels (manifest.gen_sizes)
    gen_sizes: tuple[tuple[int, int], ...] = ()

    def weight_precision(self) -> str:
        """--weights, or what the target needs (edge_runtime.weights.default_weights)."""
        return self.weights if self.weights is not None else default_weights(self.target)

    def __post_init__(self) -> None:
        t = self.text_parts
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 0):
            raise ValueError(f"--text-parts must be an integer >= 0 (0: auto, 1: whole encoder, N: N parts), got {t!r}")

    def text_part_count(self) -> int:
        """--text-parts, or what the target needs: auto (0) on a Jetson, whose memory the encoder shares with the
        DiT, the whole encoder (1) on `cpu`, the reference (as its weights stay fp32)."""
        if self.text_parts is not None:
            return self.text_parts
        return 1 if self.target == CPU else 0

    def recipe(self) -> Recipe:
        """The model's recommended recipe (edge_runtime.recipe) with this compile's overrides."""
        from ..method import model_recipe

        base = model_recipe(self.model)
        rank = self.lora_rank
        alpha = None if rank is None else rank * base.alpha / base.lora_rank  # keep the recipe's alpha / rank
        return base.with_(lora_rank=rank, lora_alpha=alpha, crop_ids=self.crop_ids, trainable_blocks=self.top_k)

    def fingerprint_args(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("model", "out", "verify", "selection", "weights", "text_parts", "gen_sizes"):
            d.pop(k)
        if self.gen_sizes:  # bundles without --gen-sizes keep the fingerprint they had before it
            d["gen_sizes"] = [list(s) for s in self.gen_sizes]
        if self.text_parts is not None:  # bundles without --text-parts keep the fingerprint they had before it
            d["text_parts"] = self.text_parts
        if self.weight_precision() != FP32:  # fp32 bundles keep the fingerprint they had before --weights existed
            d["weights"] = self.weight_precision()
            mixed = {r: graph_precision(d["weights"], r) for r in GRAPH_ROLES}
            if set(mixed.values()) != {d["weights"]}:  # fp32 VAE; int4: int8 text encoder, prologue, epilogue
                d["graph_weights"] = mixed
            if INT4 in mixed.values():  # int4 codes rounded with calibration Hessians (compile/gptq.py)
                d["int4_rounding"] = "gptq"
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


@dataclass
class CompileContext:
    """One compile run, filled stage by stage (each field notes the stage that sets it)."""

    opts: CompileOptions
    progress: Callable[[str], None] | None = print
    t0: float = 0.0
    # check: the model and the normalised arguments
    is_bundle: bool = False  # --out holds a bundle (to reuse or replace)
    loaded: Any = None  # edgeblock.models.LoadedModel
    root: str = ""  # the model directory the fingerprint hashes
    builtin: bool = False
    codec: Any = None  # the VAE (or the identity of pixel models)
    multiple: int = 1  # pixel sides are multiples of this
    train_res: int = 0
    gen_res: int = 0
    blocks: tuple[int, ...] | None = None  # None until selection runs
    selection_report: dict | None = None
    fingerprint: str = ""
    params: int = 0
    verify: bool = False
    result: CompileResult | None = None  # set when the bundle at --out is up to date
    # export: the block-skip plan and the example inputs
    plan: Any = None  # method.blockskip.SkipPlan
    lora: Any = None  # method.lora.LoRASpec
    text: Any = None  # the model's text stack (encoders + tokenizers)
    cond: Any = None  # the prompt's text conditioning
    generator: Any = None  # torch.Generator: every example latent, in stage order
    x_gen: Any = None  # DiTInputs at the generation shape (gen_batch)
    group_limit: int | None = None
    specs: list = field(default_factory=list)  # GraphSpec per inference graph, chain order
    tmp: str = ""  # the bundle being built, renamed onto --out at the end
    # train
    pre: Any = None  # one precomputed training draw
    tspec: Any = None  # ort_training.TrainingSpec
    # shapes
    x_tr: Any = None  # DiTInputs at the training shape, batch 1
    sessions: dict[str, Any] | None = None  # ORT sessions kept for the verification
    rel: dict[str, str] = field(default_factory=dict)  # graph path -> bundle-relative POSIX path
    # verify, encoders
    verification: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, dict] = field(default_factory=dict)  # text_encoder / vae graph descriptions
    weights: dict[str, Any] = field(default_factory=dict)  # manifest.weights (compile/bundle_weights.py; {} for fp32)
    memory: dict[str, Any] = field(default_factory=dict)  # manifest.memory (compile/memory.py)
    manifest: Manifest | None = None

    @property
    def adapter(self):
        return self.loaded.adapter

    @property
    def objective(self):
        return self.loaded.objective

    @property
    def downsample(self) -> int:
        return int(self.codec.downsample)

    @property
    def recipe(self) -> Recipe:
        return self.opts.recipe()

    def say(self, msg: str) -> None:
        if self.progress:
            self.progress(msg)


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
