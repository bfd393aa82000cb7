"""The device bundle's manifest.json: schema, writing and validation (numpy-free, torch-free).

The host compiler writes it, the daemon validates it on load: an unknown
schema version, a missing field or a file whose sha256 differs is refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from .fileio import atomic_json, sha256_file  # noqa: F401 - sha256_file is part of this module's API
from .memory_plan import MemoryPlan, MemoryPlanError
from .recipe import Recipe
from .targets import BUNDLE_TARGETS, CPU
from .weights import FP32, WEIGHTS

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
TARGETS = BUNDLE_TARGETS  # the `target` field takes these (edge_runtime.targets)
REQUIRED = (
    "schema_version",
    "family",
    "blocks",
    "trainable",
    "train_res",
    "gen_res",
    "scheduler",
    "patch_schedule",
    "lora",
    "target",
    "files",
)


class ManifestError(ValueError):
    """A bundle that cannot be used: the message says which field or file and why."""


class CorruptBundle(ManifestError):
    """A bundle file missing or no longer matching the manifest's sha256 (the daemon refuses to start on one, and
    answers DATA_LOSS to the calls that would read one damaged while it runs)."""


def verify_file(bundle: str, rel: str, digest: str) -> None:
    """Raise CorruptBundle, naming the file, unless bundle/rel exists and has this sha256."""
    full = os.path.join(bundle, *rel.split("/"))
    if not os.path.exists(full):
        raise CorruptBundle(f"bundle file {rel} listed in the manifest is missing")
    got = sha256_file(full)
    if got != digest:
        raise CorruptBundle(f"bundle file {rel} is corrupt: sha256 {got[:12]}... differs from the manifest's "
                            f"{digest[:12]}... (copy the bundle to the device again)")


@dataclass
class Manifest:
    family: str
    blocks: list[dict[str, Any]]  # [{"index", "name", "role": "trainable" | "frozen", "group"}]
    trainable: list[int]
    train_res: int
    gen_res: int
    scheduler: dict[str, Any]
    patch_schedule: dict[str, Any]
    lora: dict[str, Any]
    target: str = CPU
    graphs: dict[str, Any] = field(default_factory=dict)  # name -> graph description (inputs, outputs ...)
    model: dict[str, Any] = field(default_factory=dict)  # source, parameter count, config
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    # the training settings the bundle was compiled for and the daemon personalizes with by default
    # (edge_runtime.recipe.Recipe.to_dict(); bundles written before it carry none: see recipe_of)
    recipe: dict[str, Any] = field(default_factory=dict)
    # the frozen graphs' weight precision (edge_runtime.weights; `edgeblock compile --weights`):
    # {"precision", "block_size", "graphs": {graph key: {"precision", "rel_error", "max_abs", "bytes_fp32", "bytes"}},
    # "chain"} (a graph's own precision: edge_runtime.weights.graph_precision; older bundles record none);
    # empty (and not written) for fp32, as in bundles written before it existed
    weights: dict[str, Any] = field(default_factory=dict)
    # each operation's predicted peak memory on the bundle's target (edge_runtime.memory_plan; the planner's, written
    # by compile), read by the daemon's admission control; empty (and not written) in bundles compiled before it
    memory: dict[str, Any] = field(default_factory=dict)
    # generation sizes beyond the squares of gen_res and train_res, as [width, height] pixels (`edgeblock compile
    # --gen-sizes`); empty (and not written) in bundles that serve only those squares
    gen_sizes: list[list[int]] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    def served_sizes(self) -> list[tuple[int, int]]:
        """Every (width, height) the bundle generates at: the squares of gen_res and train_res, then gen_sizes."""
        out = [(s, s) for s in sorted({int(self.gen_res), int(self.train_res)})]
        return out + [(int(w), int(h)) for w, h in self.gen_sizes if (int(w), int(h)) not in out]

    @property
    def lora_rank(self) -> int:
        return int(self.lora["rank"])

    @property
    def lora_alpha(self) -> float:
        """LoRA alpha (the update is scaled by alpha / rank); bundles that record none were compiled with alpha = rank."""
        alpha = self.lora.get("alpha")
        return float(alpha if alpha is not None else self.lora["rank"])

    @property
    def crop_ids(self) -> str:
        """Position ids of the training crops: "image" (the place they were cut from) or "grid" (their own token
        grid; bundles that record none)."""
        return str(self.patch_schedule.get("crop_ids", "grid"))

    @property
    def weight_precision(self) -> str:
        """The frozen graphs' weight precision (edge_runtime.weights.WEIGHTS); bundles that record none: fp32."""
        return str(self.weights.get("precision", FP32)) if self.weights else FP32

    def graph_weights(self, key: str) -> str:
        """The weight precision of one graph (its graph key: "frozen/group_00", "text_encoder", "vae_decoder" ...):
        the one compile recorded for it (edge_runtime.weights.graph_precision; bundles that record none per graph:
        the bundle's) for the graphs compile quantized, fp32 for the others (the trainable blocks' graphs, the VAE's)."""
        g = self.weights.get("graphs", {}).get(key)
        if g is None:
            return FP32
        return str(g.get("precision", self.weight_precision)) if isinstance(g, dict) else self.weight_precision

    def memory_plan(self) -> MemoryPlan | None:
        """The predicted peaks (edge_runtime.memory_plan.MemoryPlan); None for bundles that record none."""
        return MemoryPlan.from_dict(self.memory) if self.memory else None

    def training_recipe(self) -> Recipe:
        """The bundle's recipe; for a bundle that records none, the settings it was compiled with and the
        daemon's defaults of that time (lr 5e-4, 200 steps of one draw)."""
        if self.recipe:
            return Recipe.from_dict(self.recipe)
        return Recipe("bundle", train_res_fraction=self.train_res / self.gen_res, f_min=self.patch_schedule.get("f_min"),
                      crop_ids=self.crop_ids, trainable_blocks=len(self.trainable), lora_rank=self.lora_rank,
                      lora_alpha=self.lora_alpha)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not d["weights"]:
            del d["weights"]  # fp32: the manifest reads as it did before the field existed
        if not d["memory"]:
            del d["memory"]
        if not d["gen_sizes"]:
            del d["gen_sizes"]
        return d


def hash_files(bundle: str) -> dict[str, str]:
    """sha256 of every file under the bundle except the manifest, keyed by relative POSIX path."""
    out = {}
    for root, _, names in os.walk(bundle):
        for n in sorted(names):
            full = os.path.join(root, n)
            rel = os.path.relpath(full, bundle).replace(os.sep, "/")
            if rel != MANIFEST:
                out[rel] = sha256_file(full)
    return dict(sorted(out.items()))


def write_manifest(bundle: str, manifest: Manifest) -> str:
    """Hash the bundle's files into the manifest and write it atomically."""
    manifest.files = hash_files(bundle)
    validate_fields(manifest.to_dict())
    path = os.path.join(bundle, MANIFEST)
    atomic_json(path, manifest.to_dict())
    return path


def validate_fields(d: dict[str, Any]) -> None:
    version = d.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ManifestError(f"manifest schema_version {version!r} is not supported (this runtime reads {SCHEMA_VERSION})")
    missing = [k for k in REQUIRED if k not in d]
    if missing:
        raise ManifestError(f"manifest lacks fields {missing}")
    if d["target"] not in TARGETS:
        raise ManifestError(f"manifest target {d['target']!r} is not one of {TARGETS}")
    n = len(d["blocks"])
    bad = [b for b in d["trainable"] if not isinstance(b, int) or not 0 <= b < n]
    if not d["trainable"] or bad:
        raise ManifestError(f"manifest trainable blocks {d['trainable']} must be a non-empty subset of 0..{n - 1}")
    sizes = d.get("gen_sizes", [])
    if not isinstance(sizes, list) or not all(isinstance(s, list) and len(s) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in s) for s in sizes):
        raise ManifestError(f"manifest gen_sizes must be a list of [width, height] positive integers, got {sizes!r}")
    for k in ("train_res", "gen_res"):
        if not isinstance(d[k], int) or d[k] <= 0:
            raise ManifestError(f"manifest {k} must be a positive integer, got {d[k]!r}")
    for k in ("scheduler", "patch_schedule", "lora"):
        if not isinstance(d[k], dict):
            raise ManifestError(f"manifest {k} must be an object, got {d[k]!r}")
    rank = d["lora"].get("rank")
    if not isinstance(rank, int) or rank <= 0:
        raise ManifestError(f"manifest lora.rank must be a positive integer, got {rank!r}")
    w = d.get("weights", {})
    if not isinstance(w, dict) or (w and w.get("precision") not in WEIGHTS):
        raise ManifestError(f"manifest weights must be an object with a precision in {WEIGHTS}, got {w!r}")
    for key, g in (w.get("graphs") or {}).items():
        if isinstance(g, dict) and g.get("precision", WEIGHTS[0]) not in WEIGHTS:
            raise ManifestError(f"manifest weights.graphs[{key!r}].precision must be one of {WEIGHTS}, got {g['precision']!r}")
    text = d.get("graphs", {}).get("text_encoder") if isinstance(d.get("graphs"), dict) else None
    if isinstance(text, dict) and "parts" in text:
        validate_text_parts(text["parts"])
    if d.get("memory"):
        try:
            MemoryPlan.from_dict(d["memory"])
        except MemoryPlanError as e:
            raise ManifestError(str(e)) from e


def validate_text_parts(parts: Any) -> None:
    """graphs.text_encoder.parts (a text encoder compiled in parts): a non-empty list of {"path": "<...>.onnx",
    "inputs": [names], "outputs": [names] (non-empty), "bytes": int >= 0}, every input a tokenizer feed or an
    earlier part's output (checked by the device as it runs them)."""
    if not isinstance(parts, list) or not parts:
        raise ManifestError(f"manifest graphs.text_encoder.parts must be a non-empty list, got {parts!r}")
    def names(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(n, str) for n in v)

    for i, p in enumerate(parts):
        size = p.get("bytes", 0) if isinstance(p, dict) else None
        ok = (isinstance(p, dict) and isinstance(p.get("path"), str) and p["path"].endswith(".onnx")
              and names(p.get("inputs")) and names(p.get("outputs")) and bool(p["outputs"])
              and isinstance(size, int) and not isinstance(size, bool) and size >= 0)
        if not ok:
            raise ManifestError(f"manifest graphs.text_encoder.parts[{i}] must be {{path: <file>.onnx, inputs: [names], "
                                f"outputs: [names, ...], bytes: int >= 0}}, got {p!r}")


def load_manifest(bundle: str, verify_files: bool = True) -> Manifest:
    """Read and validate a bundle's manifest; with verify_files, every listed file must match its sha256."""
    path = os.path.join(bundle, MANIFEST)
    if not os.path.exists(path):
        raise ManifestError(f"{bundle} is not a bundle: no {MANIFEST}")
    try:
        with open(path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path} is not valid JSON: {e}")
    validate_fields(d)
    if verify_files:
        for rel, digest in d["files"].items():
            verify_file(bundle, rel, digest)
    known = {f for f in Manifest.__dataclass_fields__}
    return Manifest(**{k: v for k, v in d.items() if k in known})
