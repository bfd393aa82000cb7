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
   weights  (--weights fp16/int8/int4; default by --target) the frozen groups, text encoder and generation
            graphs quantized in place and measured against fp32 (compile/bundle_weights.py);
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

Modules: context.py (CompileOptions, CompileContext, fingerprint), checks.py (stage 1's checks),
stages.py (one function per stage over the CompileContext), tensorrt_plan.py, verify.py,
bundle_weights.py, manifest_build.py; this module runs the stages and installs the bundle.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable

from edge_runtime.manifest import load_manifest

from . import stages
from .checks import (  # noqa: F401 - part of this module's API
    check_blocks,
    check_options,
    check_out_dir,
    check_resolutions,
    default_gen_res,
    read_selection,
    resolution_multiple,
)
from .context import (  # noqa: F401 - part of this module's API
    CURVE_BOUND,
    MODEL_PARTS,
    PRECISIONS,
    PROMPT,
    REL_BOUND,
    VERIFY_PARAM_LIMIT,
    CompileContext,
    CompileOptions,
    CompileResult,
    fingerprint,
    model_files,
)
from .manifest_build import crop_ids_of, sampler_config  # noqa: F401 - part of this module's API
from .stages import run_selection  # noqa: F401 - part of this module's API
from .tensorrt_plan import TENSORRT_NOTE, chain_shapes, tensorrt_plan  # noqa: F401 - part of this module's API
from .verify import verify_bundle  # noqa: F401 - part of this module's API


def compile_bundle(opts: CompileOptions, progress: Callable[[str], None] | None = print) -> CompileResult:
    """Compile `opts.model` into the bundle `opts.out` (see the module docstring)."""
    ctx = CompileContext(opts, progress, t0=time.time())
    stages.check(ctx)
    if ctx.result is not None:
        return ctx.result
    stages.select(ctx)
    parent = os.path.dirname(os.path.abspath(opts.out))
    ctx.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(opts.out))}.tmp-", dir=parent)
    try:
        for stage in stages.BUILD:
            stage(ctx)
        _install(ctx.tmp, opts.out)
    except BaseException:
        shutil.rmtree(ctx.tmp, ignore_errors=True)
        raise
    wall = time.time() - ctx.t0
    ctx.say(f"[compile] done in {wall:.1f} s: {opts.out}")
    return CompileResult(opts.out, False, load_manifest(opts.out), ctx.verification, wall)


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
