"""Weight precisions of a bundle's frozen graphs, written once for the host and the device (numpy-free):
the names `edgeblock compile --weights` takes and a manifest records, the ONNX Runtime session settings each
needs so its weights stay small in memory, and the precision a bundle target gets by default.
"""

from __future__ import annotations

from typing import Any

from .targets import BUNDLE_TARGETS, CPU, JETSONS

FP32, FP16, INT8, INT4 = "fp32", "fp16", "int8", "int4"
WEIGHTS: tuple[str, ...] = (FP32, FP16, INT8, INT4)
INT4_BLOCK_SIZE = 32  # MatMulNBits block along K (docs/quantization.md: 0.081 rel error at 32, 0.100 at 128)

# What an ORT session must set so the weights stay small in memory (measured, docs/quantization.md): the fp32 copy
# of an int8 weight (DequantizeLinear) or an fp16 one (Cast) must be made just before its MatMul and freed after it.
# Without PRIORITY_BASED order ORT runs every DequantizeLinear/Cast first (their inputs are all initializers) and
# holds all the copies at once; with it but ORT's graph optimizations on, the fused graph of a DiT block still
# does (120M bench config, an int8 group of 85 MB fp32: run peak +160 MiB over the process, +93 MiB with the
# optimizations off, +139 MiB at fp32; same step time, 343 / 336-342 ms). Optimizations off also keeps ConstantFolding
# from folding Cast(fp16 initializer) back into an fp32 initializer, and DequantizeLinear of an initializer is not
# folded. int4 (com.microsoft MatMulNBits) runs from the packed weights with the defaults.
# ... and compile stores an int8 / fp16 weight in column blocks whose fp32 copies are at most this many bytes, each
# made just before its own MatMul (the blocks' products concatenated): whole, the copy of a block's widest weight
# stood above the run's activations (120M bench config, the fp32 trainable block's graph requantized, one guidance
# row, second run: run peak +41.8 MiB at int8 and fp16 against +29.9 at fp32; in blocks of 2 MiB +29.2 / +29.3, the
# results bit-identical, run time +6-12 %). The planner counts one block's copy per run. The column blocks do not
# make the optimizations safe again: the 120M bench config's int8 bundle, every graph open, one resident step (batch
# 2) peaks at 332 MiB with them off, 502 at ORT_ENABLE_BASIC and 562 at ORT_ENABLE_ALL (ConstantFolding disabled in
# both), for 5.4-5.6 s against 5.8-5.9 s; its int4 bundle (fp16 trainable-block graphs) 285 / 309 / 367 MiB.
COPY_BLOCK_BYTES = 2 * 2**20

SESSION_SETTINGS: dict[str, dict[str, Any]] = {
    FP32: {},
    INT4: {},
    INT8: {"execution_order": "PRIORITY_BASED", "optimization_level": "ORT_DISABLE_ALL"},
    FP16: {"execution_order": "PRIORITY_BASED", "optimization_level": "ORT_DISABLE_ALL"},
}


# The graphs of a bundle by what their weights do (compile's weights step and the planner use these names).
GROUP, TRAINED, TEXT, SHELL, VAE = "group", "trained", "text_encoder", "shell", "vae"  # frozen DiT groups; the
# trainable runs' inference graphs (trainable/infer*.onnx: generation and the job's frozen pass, LoRA as inputs);
# text encoders; prologue and epilogue; VAE encoder and decoder. What trains (the training artifacts: the trainable
# blocks' base weights in training precision, LoRA in fp32) is none of these; under int4 its base is put on the
# int8 grid of the TRAINED graphs (below).
GRAPH_ROLES: tuple[str, ...] = (GROUP, TRAINED, TEXT, SHELL, VAE)

# int4 is for the frozen DiT groups, where nearly all the weights are and each block's error is added to a
# residual stream; the graphs whose error reaches every output take int8 instead (measured on the built-in
# model, docs/quantization.md: the MiniLM text encoder's prompt-token states move by 0.21 relative error at
# int4 and 0.03 at int8, prologue and epilogue by 0.064 / 0.062 at int4 and 0.005 at int8; the int4 row lost
# 0.063 subject fidelity with them at int4). They hold few weights beside the DiT's (FLUX.1-dev: T5-XXL's 4.8B
# are streamed part by part; prologue and epilogue ~0.04B).
_INT4_KEEPS_INT8 = (TEXT, SHELL, TRAINED)
# The trainable runs' inference graphs (generation, the job's frozen pass) hold the base that an adapter is applied
# to. Under int4 they take int8, and compile trains their blocks against that base: it puts each trainable block's
# base weights on the int8 grid before anything is exported (sdk compile/base_grid.py: quantized, then stored back
# as fp32 values), so the training artifacts hold, in training precision, exactly the base that generation
# computes. Under int8 and fp16 they take fp16 over the fp32 base (fp16 moves it by ~1e-4: 5e-5 - 9e-5 relative
# on the built-in model's trainable graphs). Measured with `edgeblock eval --runtime device --rows
# blockskip_device_int4[,blockskip_device_int8] --seed 0` (the built-in model, blocks 1-5 trained; fp32 row 0.491;
# docs/results.md), subject fidelity of the int4 / int8 rows: these graphs at int8 on their grid 0.485 / 0.457 (the
# int8 row's prompt fidelity 0.975: not met there); at int4 on the int4 grid 0.468 (int4 row); fp16 over the fp32
# base (shipped until 0.7.2 for both) 0.479 / 0.483; int4 / int8 over the fp32 base 0.460 / 0.457.
_ALWAYS_FP32 = (VAE,)
# A VAE stays fp32 under every --weights: it is convolutions (weight-only quantization rewrites MatMul/Gemm weights:
# in a VAE its mid blocks' few attention matrices, 2 % of latent-fit's int8 encoder bytes), and a quantized graph runs
# without ORT's graph optimizations (SESSION_SETTINGS), which its convolutions need: latent-fit's int8 decoder at
# 384 px peaked 62 MiB higher and ran 6 % slower without them.


def graph_precision(weights: str, role: str) -> str:
    """The precision compile gives a graph of `role` (GRAPH_ROLES) in a bundle compiled with `--weights weights`:
    `weights` itself, except: int8 for the text encoders, prologue, epilogue and trainable runs under int4; fp16 for
    the trainable runs under int8; fp32 for the VAE."""
    check_weights(weights)
    if role not in GRAPH_ROLES:
        raise ValueError(f"graph role {role!r} is not one of {', '.join(GRAPH_ROLES)}")
    if role in _ALWAYS_FP32 or weights == FP32:
        return FP32
    if weights == INT4:
        return INT8 if role in _INT4_KEEPS_INT8 else INT4
    return FP16 if role == TRAINED else weights


def check_weights(weights: str) -> str:
    """`weights` if it is a known precision, else ValueError naming the choices."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights {weights!r} is not one of {', '.join(WEIGHTS)}")
    return weights


def bytes_per_weight(weights: str) -> float:
    """Stored bytes per weight of a quantized MatMul weight: int8 one byte (per-channel fp32 scales: negligible),
    int4 half a byte plus an fp32 scale and a 4-bit zero point per block of INT4_BLOCK_SIZE."""
    return {FP32: 4.0, FP16: 2.0, INT8: 1.0, INT4: 0.5 + (4 + 0.5) / INT4_BLOCK_SIZE}[check_weights(weights)]


def session_settings(weights: str) -> dict[str, Any]:
    """A copy of SESSION_SETTINGS[weights]: {"execution_order"?: ExecutionOrder member name, "optimization_level"?:
    GraphOptimizationLevel member name}."""
    s = SESSION_SETTINGS[check_weights(weights)]
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in s.items()}


def apply_session_settings(opts: Any, weights: str, ort: Any) -> None:
    """Set what a session over `weights` graphs needs on an onnxruntime.SessionOptions.

    `ort` is the onnxruntime module (passed in: this module does not import onnxruntime); its ExecutionOrder and
    GraphOptimizationLevel enums name the values.
    """
    s = session_settings(weights)
    if "execution_order" in s:
        opts.execution_order = getattr(ort.ExecutionOrder, s["execution_order"])
    if "optimization_level" in s:
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, s["optimization_level"])


def default_weights(target: str) -> str:
    """The weight precision a bundle for `target` gets when `--weights` is not given.

    `cpu`: fp32 (the reference; memory is not the constraint there). Every Jetson Orin: fp16, half the fp32
    bytes and the precision TensorRT runs natively on Orin (Ampere, sm_87: FP16 and INT8, no FP8/FP4), with a
    text-encoder error of ~3.5e-3 on the built-in model. int8 and int4 are opt-in (`--weights`): on the built-in
    model the int8 MiniLM text encoder's states move by 0.31 relative error (mostly its padding positions',
    docs/compile.md), and int4's MatMulNBits is an ONNX Runtime contrib op that TensorRT's ONNX parser does not
    read.
    """
    if target == CPU:
        return FP32
    if target not in JETSONS:
        raise ValueError(f"target {target!r} is not one of {', '.join(BUNDLE_TARGETS)}")
    return FP16
