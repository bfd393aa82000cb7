"""`edgeblock plan`: predicted peak memory of each device phase, from a transformer config alone.

Phases (each the peak resident bytes of one process):
- precompute: everything before the first training step. DiT-BlockSkip: text encoding, then the
  frozen groups over every draw (bank: one group resident at a time; online: see train). Standard
  LoRA: text encoding (and VAE encoding) of the training data.
- train: the training step (or building its session, where that peaks higher). DiT-BlockSkip: the ORT
  training session of the trainable blocks and the epilogue at the training resolution (+ the chain's sessions
  and the VAE encoder, which the per-step frozen pass holds open, when the precompute is online).
  Standard LoRA: a torch process holding the whole transformer, LoRA on every block, at the
  generation resolution (the reference the method is measured against).
- generate: the daemon sampling one image at the generation resolution, the same for both methods.
  Resident (--generation resident): every graph and the VAE decoder held at once, and the text encoder whole
  beside them, or (--text-encoder streamed) one part at a time before sampling (edge_runtime.memory_plan.
  text_encoder_streamed). Streamed: one of them at a time (each graph loaded for its own run at every sampling
  step).

Each phase = the process's fixed runtime cost (targets.py) + weights x a resident factor +
activation elements (inventory units x measured factors) x bytes, with the factors fitted on this
host (calibration.py) and reused for every target; the Jetson runtime costs are estimates.
"""

from __future__ import annotations

from dataclasses import dataclass

from edge_runtime import graph_names as gn
from edge_runtime.memory_plan import GENERATION_MODES, RESIDENT, STREAMED
from edge_runtime.precompute import PRECOMPUTE_MODES, precompute_mode
from edge_runtime.weights import (COPY_BLOCK_BYTES, FP16, FP32, GROUP, INT8, SHELL, TEXT, TRAINED, VAE, WEIGHTS,
                                  bytes_per_weight, graph_precision)

from ..method.lora import ATTENTION_TARGETS, DEFAULT_TARGETS
from ..compile.attention_chunks import query_chunks
from .calibration import HOST_CPU, Calibration
from .inventory import Inventory, block_units, load_inventory, stream_tokens, widest_linear
from .targets import GiB, Target, get_target

LORA_TARGETS = DEFAULT_TARGETS  # what add_lora injects


@dataclass(frozen=True)
class PlanOptions:
    config: str
    target: str = "orin-nx-16gb"
    train_res: int | None = None  # None: the model's recipe (edge_runtime.recipe)
    gen_res: int | None = None
    blocks: tuple[int, ...] | None = None  # None: the recipe's number of blocks, the middle window
    weights: str | None = None  # frozen / generation weights (edge_runtime.weights); default: the target's
    generation: str = RESIDENT  # resident | streamed (edge_runtime.memory_plan)
    # resident: loaded whole (and kept open by a resident generation); streamed: in parts, each loaded for its own
    # run in every operation (`compile --text-parts`); None: what compile does for the target (parts on Jetson,
    # whole on the CPU)
    text_encoder: str | None = None
    lora_rank: int | None = None  # None: the recipe's
    precompute: str | None = None  # bank | online; default: the daemon's rule (edge_runtime.precompute)
    guidance_batch: int | None = None  # generation batch: 2 with classifier-free guidance, 1 with a guidance embed
    text_encoders: tuple[str, ...] | None = None
    max_group_mb: float | None = None  # as `edgeblock compile --max-group-mb` (None: auto, 0: no cap)


def _lora_linears(inv: Inventory, indices):
    """(block, module name, nn.Linear) of every LoRA'd linear in the blocks `indices`."""
    from torch import nn

    for i in indices:
        b = inv.blocks[i]
        lst, j = b.name.split(".")
        for name, m in getattr(inv._model, lst)[int(j)].named_modules():
            if isinstance(m, nn.Linear) and any(name.endswith(t) for t in LORA_TARGETS):
                yield b, name, m


def _lora_params(inv: Inventory, indices, rank: int) -> int:
    return sum(rank * (m.in_features + m.out_features) for _, _, m in _lora_linears(inv, indices))


# LoRA'd linears whose input is not already kept for backward: a frozen linear keeps no input, a LoRA's A
# matrix keeps its (tokens x in_features) input. The calibration (2026-11-22) was fitted with LoRA on the
# attention projections only, so their inputs are inside its linear factors; the feed-forward targets added
# since add their inputs as they are (fp32, one element each): physics, not a fitted constant. proj_mlp
# reads the normed tokens to_q already keeps.
_SHARED_INPUT = ("proj_mlp",)


def _lora_saved_inputs(inv: Inventory, indices, n_img: int, batch: int) -> int:
    """Elements of the inputs the non-attention LoRA targets keep for backward, over the blocks."""
    skip = ATTENTION_TARGETS + _SHARED_INPUT
    return batch * sum(m.in_features * stream_tokens(name, inv.family, b.kind, n_img, inv.text_tokens)
                       for b, name, m in _lora_linears(inv, indices) if not any(name.endswith(t) for t in skip))


def frozen_groups(num_blocks: int, trainable: tuple[int, ...]) -> list[list[int]]:
    """Maximal runs of skipped blocks (the bundle's frozen/group_NN.onnx before any size cap): the chain's."""
    return [run for kind, run in gn.chain_runs(num_blocks, trainable) if kind == gn.FROZEN_RUN]


def compiled_groups(block_params: list[int], trainable: tuple[int, ...], max_group_mb: float | None) -> list[list[int]]:
    """The frozen groups `edgeblock compile` writes for this trainable set (runs, capped in size)."""
    from ..method.blockskip import auto_group_limit, split_run

    if max_group_mb is not None and max_group_mb < 0:
        raise ValueError(f"--max-group-mb must be >= 0 (0: no cap), got {max_group_mb}")
    if max_group_mb == 0:
        limit = None
    elif max_group_mb:
        limit = max(1, int(max_group_mb * 2**20 / 4))
    else:
        limit = auto_group_limit(block_params, trainable)
    return [g for run in frozen_groups(len(block_params), trainable) for g in split_run(run, block_params, limit)]


def _split_units(inv: Inventory, indices, tokens: int, batch: int) -> tuple[int, int]:
    """(linear units, attention units) summed over the blocks."""
    lin = att = 0
    for i in indices:
        a, b = block_units(inv, i, tokens, batch)
        lin, att = lin + a, att + b
    return lin, att


def _vae_decode_act(inv: Inventory, cal: Calibration, res: int) -> float:
    """Peak transient elements of decoding one image: the decoder's full-resolution stage (its widest feature map's
    channels x pixels, times a measured factor: a map, normalised and activated, is alive three times) or its mid
    block's softmax attention over the latent pixels (the inference attention factor; compile cuts its queries into
    slices, as on every target the decoder runs on ONNX Runtime), whichever is larger: they run at different times."""
    if inv.pixel_space:
        return 0.0
    lin = inv.vae_up_channels * res * res * cal.vae_decode_factor
    n = (res // inv.vae_scale) ** 2
    return max(lin, n * n * cal.inference_attention_factor / query_chunks(n) if inv.vae_attention else 0.0)


def _chunks(inv: Inventory, n_img: int) -> int:
    """The query slices compile cuts the blocks' attentions into at n_img image tokens (compile/attention_chunks.py:
    the queries of FLUX's and SD3's joint attention include the text tokens)."""
    return query_chunks(n_img + (inv.text_tokens if inv.family in ("flux", "sd3") else 0))


def _phase(runtime: int, weights: int, activations: int, **extra: int) -> dict:
    parts = {"runtime_bytes": int(runtime), "weights_bytes": int(weights), "activations_bytes": int(activations),
             **{k: int(v) for k, v in extra.items()}}
    return {"peak_bytes": int(sum(parts.values())), "parts": parts}


def plan(opts: PlanOptions, cal: Calibration = HOST_CPU, inv: Inventory | None = None) -> dict:
    t: Target = get_target(opts.target)
    if t.measured:  # the calibration host: its runtime costs are the calibration's own
        import dataclasses

        t = dataclasses.replace(t, daemon_runtime_bytes=cal.daemon_base_bytes, torch_runtime_bytes=cal.torch_base_bytes)
    inv = inv or load_inventory(opts.config, opts.text_encoders)
    gen_res = int(opts.gen_res or inv.default_gen_res)
    from ..method import model_recipe

    recipe = model_recipe(opts.config)
    train_res = int(opts.train_res or recipe.train_res(gen_res, inv.vae_scale * inv.pack))
    rank = int(opts.lora_rank or recipe.lora_rank)
    if train_res > gen_res:
        raise ValueError(f"--train-res {train_res} is above --gen-res {gen_res}: patch sampling trains on smaller crops")
    n_gen, n_train = inv.tokens(gen_res), inv.tokens(train_res)
    L = len(inv.blocks)
    if opts.blocks:
        for b in opts.blocks:
            if not 0 <= b < L:
                raise ValueError(f"block {b} out of range: this model has blocks 0..{L - 1}")
        trainable = tuple(sorted(set(opts.blocks)))
    else:
        trainable = recipe.middle(L)
    if opts.weights is not None and opts.weights not in WEIGHTS:
        raise ValueError(f"--weights must be one of {', '.join(WEIGHTS)}, got {opts.weights!r}")
    if opts.generation not in GENERATION_MODES:
        raise ValueError(f"--generation must be one of {', '.join(GENERATION_MODES)}, got {opts.generation!r}")
    text_mode = opts.text_encoder or (STREAMED if t.gpu else RESIDENT)
    if text_mode not in GENERATION_MODES:
        raise ValueError(f"--text-encoder must be one of {', '.join(GENERATION_MODES)}, got {opts.text_encoder!r}")
    native = t.weight_bytes  # the target's inference precision (fp16 engines on Jetson, fp32 on the CPU)
    weights = opts.weights or {2: FP16, 4: FP32}[native]
    # bytes per weight of the frozen groups, text encoders, prologue/epilogue (int4: these two int8) and VAE (fp32)
    wb, tb, sb, vb = (bytes_per_weight(graph_precision(weights, r)) for r in (GROUP, TEXT, SHELL, VAE))
    ab = min(native, 4) if t.gpu else 4  # activations at inference
    # the trainable blocks' inference graphs (generation; the online job's frozen pass): their role's precision
    trained_p = graph_precision(weights, TRAINED)
    tw = bytes_per_weight(trained_p) * session_factor(cal, trained_p)  # resident bytes per trained weight
    block_params = [b.params for b in inv.blocks]
    groups = compiled_groups(block_params, trainable, opts.max_group_mb)
    prologue = inv.shell_params - inv.epilogue_params
    total_params = inv.parameters
    precompute = opts.precompute or precompute_mode(total_params)  # the daemon's own rule
    if precompute not in PRECOMPUTE_MODES:
        raise ValueError(f"--precompute must be one of {', '.join(PRECOMPUTE_MODES)}, got {precompute!r}")
    gen_batch = opts.guidance_batch or (1 if inv.guidance_embeds else 2)

    gs, ss, vs = (session_factor(cal, graph_precision(weights, r)) for r in (GROUP, SHELL, VAE))
    # the text encoders' sessions: their weights less the token-embedding tables (read row by row from disk)
    text_w = inv.text_session_params * tb * cal.text_session_factor
    # streamed text encoder: compile's parts are no larger than the largest frozen group (--text-parts 0)
    largest_group = max((sum(block_params[i] for i in g) for g in groups), default=inv.text_session_params)
    text_held = (min(inv.text_session_params, largest_group) * tb * cal.text_session_factor
                 if text_mode == STREAMED else text_w)
    vae_enc_w = inv.vae_encoder_params * vb * vs
    vae_dec_w = inv.vae_decoder_params * vb * vs

    # --- DiT-BlockSkip on the daemon -------------------------------------------------------------
    group_w = [sum(block_params[i] for i in g) * wb * gs for g in groups]
    # the frozen groups run fused on TensorRT (the GPU targets) or cut into the generation's query slices on ONNX
    # Runtime; the trainable runs always on ONNX Runtime, in training precision (fp32 activations)
    chunks = _chunks(inv, n_gen)
    group_chunks = None if t.gpu else chunks
    copy = _dequant_copies(inv, groups, graph_precision(weights, GROUP), t.gpu)
    job_runtime = t.daemon_runtime_bytes + cal.job_runtime_bytes  # a job's phases: the daemon and what a job adds
    group_act = [_act(inv, cal, g, n_train, 1, group_chunks) * ab + c for g, c in zip(groups, copy)]
    if groups:
        k = max(range(len(groups)), key=lambda j: group_w[j] + group_act[j])
        bank_peak = _phase(job_runtime, group_w[k] + prologue * sb * ss, group_act[k])
    else:
        bank_peak = _phase(job_runtime, prologue * sb * ss, 0)
    encode = _phase(job_runtime, text_held + vae_enc_w, 0)
    bs_pre = max(encode, bank_peak, key=lambda p: p["peak_bytes"]) if precompute == "bank" else encode
    trained_params = sum(block_params[i] for i in trainable) + inv.epilogue_params
    lora = _lora_params(inv, trainable, rank)
    t_lin, t_att = _split_units(inv, trainable, n_train, 1)
    train_act = (t_lin * cal.ort_train_linear_factor + t_att * cal.ort_train_attention_factor
                 + _lora_saved_inputs(inv, trainable, n_train, 1)) * 4
    # building the training session holds a transient share of the trained weights (ort_load_factor): where the step's
    # activation is small beside the weights, the trainer's load peaks above its step; the phase holds the larger
    load_act = trained_params * 4 * cal.ort_load_factor
    # online: the frozen pass runs the whole chain at each draw (the trainable blocks' inference graphs too) and the VAE
    # encoder encodes each draw's crop, all of them held open beside the live trainer: each session at its generation
    # bytes (its precision's session factor), times online_session_factor
    online_w = ((sum(group_w) + prologue * sb * ss + sum(block_params[i] for i in trainable) * tw)
                * cal.online_session_factor + vae_enc_w) if precompute == "online" else 0
    bs_train = _phase(job_runtime, trained_params * 4 * cal.train_weight_factor + online_w,
                      max(train_act, load_act),
                      lora_state_bytes=lora * 4 * 4)  # LoRA weights, gradients, AdamW moments (fp32)
    trained_copy = _dequant_copies(inv, [[i] for i in trainable], trained_p, t.gpu)
    generation = _generation(inv, t, cal, groups, trainable, n_gen, gen_batch, gen_res, wb * gs, sb * ss, ab, tw,
                             text_w if text_mode == RESIDENT else None, vae_dec_w, text_held, (group_chunks, chunks),
                             (copy, trained_copy))
    generate = generation[opts.generation]

    # --- standard LoRA: a torch process with the whole model --------------------------------------
    lora_all = _lora_params(inv, range(L), rank)
    sl_pre = _phase(t.torch_runtime_bytes, (inv.text_encoder_params + inv.vae_encoder_params) * native
                    * cal.torch_weight_factor, 0)
    s_lin, s_att = _split_units(inv, range(L), n_gen, 1)
    # on the GPU targets torch's SDPA runs fused (flash / memory-efficient) kernels: no attention matrix
    sl_att = 0.0 if t.gpu else s_att * cal.torch_train_attention_factor
    sl_act = (s_lin * cal.torch_train_linear_factor + sl_att
              + _lora_saved_inputs(inv, range(L), n_gen, 1)) * (2 if t.gpu else 4)
    sl_train = _phase(t.torch_runtime_bytes, total_params * native * cal.torch_weight_factor, sl_act,
                      lora_state_bytes=lora_all * 4 * 4)

    methods = {
        "standard_lora": {"precompute": sl_pre, "train": sl_train, "generate": generate},
        "blockskip": {"precompute": bs_pre, "train": bs_train, "generate": generate},
    }
    usable = t.usable_bytes
    for m in methods.values():
        for ph in ("precompute", "train", "generate"):
            m[ph]["fits"] = m[ph]["peak_bytes"] <= usable
        m["job_peak_bytes"] = max(m["precompute"]["peak_bytes"], m["train"]["peak_bytes"])
        m["fits"] = all(m[ph]["fits"] for ph in ("precompute", "train", "generate"))
    result = {
        "model": {"config": inv.config_path, "class": inv.class_name, "family": inv.family,
                  "parameters": total_params, "num_blocks": L, "trainable_blocks": list(trainable),
                  "frozen_groups": [[g[0], g[-1]] for g in groups], "train_res": train_res, "gen_res": gen_res,
                  "train_tokens": n_train, "gen_tokens": n_gen, "text_tokens": inv.text_tokens,
                  "text_encoders": list(inv.text_encoders), "text_encoder_params": inv.text_encoder_params,
                  "text_lookup_params": inv.text_lookup_params,
                  "pixel_space": inv.pixel_space, "lora_rank": rank, "lora_params": lora,
                  "precompute": precompute, "generation_batch": gen_batch, "notes": inv.notes},
        "target": t.as_json(),
        "precision": {"weights": weights, "training": "fp32"},
        "generation": {"mode": opts.generation, **generation},
        "text_encoder": text_mode,
        "methods": methods,
        "blockskip_vs_standard_lora_job_peak": methods["blockskip"]["job_peak_bytes"] / methods["standard_lora"]["job_peak_bytes"],
        "calibration": {"host": "x86 CPU, 2 cores", "measured_on_target": t.measured},
    }
    result["advice"] = advice(result, inv, groups, group_w, text_w)
    return result


# the stages of a streamed generation, as `generation.streamed.largest_stage` names the one at its peak
STAGE_TEXT, STAGE_VAE, STAGE_PROLOGUE = "text encoder", "VAE decoder", "prologue"
STAGE_GROUP, STAGE_TRAINABLE = "frozen group", "trainable block"


def _generation(inv: Inventory, t: Target, cal: Calibration, groups, trainable, n_gen: int, batch: int, res: int,
                group_b: float, shell_b: float, ab: int, tw: float, text_w: float | None, vae_dec_w: float,
                text_held: float, chunks: tuple[int | None, int], copies: tuple[list[float], list[float]]
                ) -> dict[str, dict]:
    """The generate phase held resident (every graph open) and streamed (one graph at a time; the text encoder
    whole or, `text_held`, its largest part). text_w: the whole text encoder, which a resident generation keeps
    open beside its graphs; None when it is streamed (in parts), so that a resident generation holds `text_held`
    only while it encodes, before sampling. group_b / shell_b: resident bytes per frozen-group / prologue-epilogue
    weight (stored bytes x their precision's session factor); chunks: the query slices of the frozen groups' (None:
    fused) and the trainable blocks' attentions; tw: resident bytes per trainable-block weight (its graphs' precision);
    their activations are fp32 everywhere; copies: the dequantized weight copies each frozen group's and each trainable
    block's run holds (_dequant_copies)."""
    copy, trained_copy = copies
    by_block = dict(zip(trainable, trained_copy))
    L = len(inv.blocks)
    block_params = [b.params for b in inv.blocks]
    trained = sum(block_params[i] for i in trainable)
    frozen = inv.parameters - trained - inv.shell_params
    vae_act = _vae_decode_act(inv, cal, res) * 4  # the VAE graphs stay fp32 (weights.graph_precision)
    trained_graphs = [run for kind, run in gn.chain_runs(L, trainable) if kind == gn.TRAINABLE_RUN]  # one per block
    group_chunks, trained_chunks = chunks

    def chain(b: int) -> list[tuple[float, float]]:
        """Each chain graph's (held weight bytes, activation bytes of a run at batch b): the frozen groups, then the
        trainable blocks (one graph each)."""
        return ([(sum(block_params[i] for i in g) * group_b, _act(inv, cal, g, n_gen, b, group_chunks) * ab + c)
                 for g, c in zip(groups, copy)]
                + [(sum(block_params[i] for i in r) * tw,
                    _act(inv, cal, r, n_gen, b, trained_chunks) * 4 + sum(by_block.get(i, 0.0) for i in r))
                   for r in trained_graphs])

    runs = chain(batch)
    act = max((a for _, a in runs), default=0.0)
    # every graph's session: text encoder, prologue, frozen groups, one per trainable block, epilogue (and the VAE
    # decoder); the decoder runs after the sampling loop, when the transformer's transients are freed: the larger of
    # the two
    # (a streamed text encoder's part is held while it encodes, before sampling: the largest of the three)
    kept_text = text_w is not None
    sessions = 2 + kept_text + len(groups) + len(trained_graphs) + (0 if inv.pixel_space else 1)
    held = (text_w if kept_text else 0.0) + frozen * group_b + inv.shell_params * shell_b + trained * tw + vae_dec_w

    def resident_at(a: float) -> dict:
        return _phase(t.daemon_runtime_bytes, held, max(a, vae_act, 0.0 if kept_text else text_held),
                      sessions_bytes=sessions * cal.graph_session_bytes)

    resident = resident_at(act)
    # the same with the guidance rows one after the other through the open graphs (edge_runtime.memory_plan
    # RESIDENT_ROWS): one row's activations
    one_row = chain(1) if batch > 1 else runs
    resident["rows_peak_bytes"] = resident_at(max((a for _, a in one_row), default=0.0))["peak_bytes"]
    # streamed: the text encoder, then at each step every chain graph in turn, its guidance rows one after the other
    # (edge_runtime.runtime.Bundle.predict), then the VAE decoder
    shell = (inv.shell_params - inv.epilogue_params) * shell_b
    chain_names = [*(f"{STAGE_GROUP} {j}" for j in range(len(groups))),
                   *(f"{STAGE_TRAINABLE} {r[0]}" for r in trained_graphs)]  # chain()'s order
    stages = [(STAGE_TEXT, text_held, 0.0), (STAGE_VAE, vae_dec_w, vae_act), (STAGE_PROLOGUE, shell, 0.0),
              *((n, w, a) for n, (w, a) in zip(chain_names, one_row))]
    name, w, a = max(stages, key=lambda s: s[1] + s[2])
    streamed = _phase(t.daemon_runtime_bytes, w, a, sessions_bytes=cal.graph_session_bytes)
    streamed["largest_stage"] = name  # what streaming's peak holds (the advice names its lever)
    return {"resident": resident, "streamed": streamed}


def session_factor(cal: Calibration, weights: str) -> float:
    """Resident bytes of an inference session per stored weight byte at `weights` (fp16: as int8, one factor fit on
    int8 frozen groups and fp16 trainable-block graphs together)."""
    return {FP32: cal.session_weight_factor, FP16: cal.int8_session_factor, "int8": cal.int8_session_factor,
            "int4": cal.int4_session_factor}[weights]


def _act(inv: Inventory, cal: Calibration, indices, tokens: int, batch: int, chunks: int | None) -> float:
    """Peak transient activation elements of an inference pass over the blocks `indices`, the largest block's.

    Cut into slices (chunks > 1, on ONNX Runtime; compile cuts the attention and, but in Sana's convolutional one,
    the feed-forward part): what stays whole (linear units x the sliced factor of the block's layout) + one slice's
    queries x keys matrices (x the attention factor). Otherwise the larger of its feed-forward part (linear units x
    the MLP factor) and its attention part (linear units x the linear factor + the queries x keys matrices, in
    `chunks` slices), with chunks=None the attention fused (TensorRT: no queries x keys matrix)."""
    best = 0.0
    for i in indices:
        lin, att = block_units(inv, i, tokens, batch)
        if chunks and chunks > 1 and feedforward_sliced(inv):
            f = cal.sliced_parallel_factor if inv.blocks[i].kind == PARALLEL_BLOCKS else cal.sliced_linear_factor
            best = max(best, lin * f + att * cal.inference_attention_factor / chunks)
            continue
        attn = lin * cal.inference_linear_factor + (att * cal.inference_attention_factor / chunks if chunks else 0)
        best = max(best, lin * cal.inference_mlp_factor, attn)
    return best


PARALLEL_BLOCKS = "single_transformer_blocks"  # FLUX: attention and feed-forward side by side on one input


def _dequant_copies(inv: Inventory, groups, precision: str, gpu: bool) -> list[float]:
    """Bytes each frozen group's run holds in fp32 copies of its int8 / fp16 weights on ONNX Runtime (none at fp32 /
    int4, whose MatMulNBits reads the packed codes, or for TensorRT's fused groups): one stored column block's copy
    (edge_runtime.weights.COPY_BLOCK_BYTES), or its widest weight's where that is smaller. Whole copies were measured
    in session 28 at 0.8-1.4 x a block's widest weight per block of the group (`bench scale` int8 bundles, one
    streamed step, each group's rise over the process); stored in column blocks since 0.7.0."""
    if precision not in (INT8, FP16) or gpu:
        return [0.0] * len(groups)
    return [min(max(widest_linear(inv, i) for i in g) * 4.0, COPY_BLOCK_BYTES) if g else 0.0 for g in groups]


def feedforward_sliced(inv: Inventory) -> bool:
    """Does compile cut this model's blocks' feed-forward parts into token slices (feedforward_chunks.py)? Every
    family's linear feed-forward; not Sana's, a convolution over the image grid."""
    return inv.family != "sana"


def advice(r: dict, inv: Inventory, groups, group_w, text_w) -> list[str]:
    """What to change when a phase does not fit (largest lever first)."""
    usable = r["target"]["usable_bytes"]
    out = []
    bs = r["methods"]["blockskip"]
    gib = lambda b: f"{b / GiB:.1f} GiB"  # noqa: E731
    for ph in ("precompute", "train", "generate"):
        p = bs[ph]
        if p["fits"]:
            continue
        over = p["peak_bytes"] - usable
        msg = f"blockskip {ph}: {gib(p['peak_bytes'])} > usable {gib(usable)} (over by {gib(over)})"
        if ph == "precompute" and text_w >= p["parts"]["weights_bytes"] * 0.5:
            msg += (f"; the text encoders ({', '.join(inv.text_encoders)}: {gib(text_w)}) dominate: quantise them "
                    "(--weights int8 / int4), or encode prompts on the host")
        elif ph == "precompute" and groups:
            msg += (f"; the largest frozen group ({gib(max(group_w))}) dominates: pick trainable blocks that split the "
                    "model into smaller runs (--blocks), or a target with more memory")
        elif ph == "train":
            msg += "; lower --train-res, train fewer blocks (--blocks), or a lower LoRA rank"
        elif ph == "generate":
            msg += ("; stream the graphs (--generation streamed: one resident at a time, as the daemon does when its "
                    "budget is short), quantise the weights (--weights int8 / int4), a smaller --gen-res, or a target "
                    "with more memory" if r["generation"]["mode"] == "resident" else _streamed_advice(r, gib))
        out.append(msg)
    if not out:
        head = usable - max(bs[ph]["peak_bytes"] for ph in ("precompute", "train", "generate"))
        out.append(f"fits: {gib(head)} headroom on {r['target']['name']} for the largest blockskip phase")
    if not r["methods"]["standard_lora"]["fits"] and bs["fits"]:
        out.append("standard LoRA does not fit this target; DiT-BlockSkip does")
    return out


def _streamed_advice(r: dict, gib) -> str:
    """The lever for a streamed generation that does not fit: the one its largest stage answers to."""
    st = r["generation"]["streamed"]
    stage = st["largest_stage"]
    held = gib(st["parts"]["weights_bytes"] + st["parts"]["activations_bytes"])
    if stage == STAGE_VAE:
        return (f"; its largest stage is the VAE decoder ({held}: float32 under every --weights, its full-resolution "
                "maps the most of it): a smaller --gen-res, or a target with more memory")
    if stage == STAGE_TEXT:
        return (f"; its largest stage is the text encoder ({held}): compile it in parts (--text-encoder streamed, "
                "`edgeblock compile --text-parts`), quantise it (--weights int8 / int4), or a target with more memory")
    return (f"; its largest stage is the {stage} ({held}): quantise the weights (--weights int8 / int4), smaller "
            "frozen groups (--max-group-mb), a smaller --gen-res, or a target with more memory")


def format_plan(r: dict) -> str:
    m = r["model"]
    lines = [f"{m['class']} ({m['family']}), {m['parameters'] / 1e9:.3f}B parameters, {m['num_blocks']} blocks; "
             f"trainable {m['trainable_blocks']}; train {m['train_res']}px ({m['train_tokens']} tokens), generate "
             f"{m['gen_res']}px ({m['gen_tokens']} tokens); precompute {m['precompute']}",
             f"target {r['target']['name']}: usable {r['target']['usable_bytes'] / GiB:.1f} GiB of "
             f"{r['target']['total_bytes'] / GiB:.1f} GiB ({r['precision']['weights']} weights, "
             f"generation {r['generation']['mode']})",
             f"{'method':<14} {'precompute':>12} {'train':>12} {'generate':>12}  fits"]
    for name, meth in r["methods"].items():
        cells = [f"{meth[ph]['peak_bytes'] / GiB:>10.2f}{'' if meth[ph]['fits'] else ' !':<2}"
                 for ph in ("precompute", "train", "generate")]
        lines.append(f"{name:<14} {cells[0]} {cells[1]} {cells[2]}  {'yes' if meth['fits'] else 'no'}   (GiB)")
    lines += [f"- {a}" for a in r["advice"]]
    return "\n".join(lines)
