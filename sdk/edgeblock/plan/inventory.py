"""What the memory planner knows about a model, from its transformer config alone (no weights).

The diffusers class is built on the meta device, so parameter counts per block are exact; the
pipeline around the transformer (text encoders, VAE, token counts per resolution) comes from the
family's published defaults below, from the pipeline directory's own text encoders and VAE when the
config is a pipeline's transformer/, or from the folder's edgeblock.json for builtin-layout models.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

# Text encoders the compiled bundle holds in one text_encoder.onnx (all loaded together), parameters.
# Counts: CLIP ViT-L/14 text 123.06M, OpenCLIP ViT-bigG/14 text 694.66M, T5-XXL encoder 4.762B,
# Gemma-2-2B 2.614B, all-MiniLM-L6-v2 22.7M (as published with the checkpoints).
TEXT_ENCODERS = {
    "clip-l": 123_060_480,
    "clip-g": 694_659_840,
    "t5-xxl": 4_762_310_656,
    "gemma-2-2b": 2_614_341_888,
    "minilm-l6": 22_713_216,
}
# Of those, the token-embedding table (vocabulary x width), which a bundle keeps out of its text graphs and reads
# row by row (edge_runtime/text_lookup.py): never resident on the device.
TEXT_ENCODER_LOOKUPS = {
    "clip-l": 49_408 * 768,
    "clip-g": 49_408 * 1280,
    "t5-xxl": 32_128 * 4096,
    "gemma-2-2b": 256_000 * 2304,
    "minilm-l6": 30_522 * 384,
}


@dataclass(frozen=True)
class PipelineDefaults:
    """The pipeline around a family's transformer, as the public checkpoints ship it."""

    text_encoders: tuple[str, ...]
    text_tokens: int  # context length the transformer sees
    vae_scale: int  # pixels per latent side
    pack: int  # latent pixels per token side (FLUX packs 2x2 in the pipeline; others patchify in-model)
    gen_res: int
    vae_encoder_params: int
    vae_decoder_params: int
    vae_channels: int  # decoder feature-map width at full resolution
    # the widest feature map of the decoder's full-resolution stage (what its activations follow): AutoencoderKL's
    # first two widths' larger (the second is upsampled into its last block, the first is that block's own),
    # AutoencoderDC's first (its last stage upsamples into its own width)
    vae_up_channels: int = 256
    vae_attention: bool = True  # the decoder's mid block runs softmax attention over the latent pixels


# VAE sizes: the 16/4-channel KL autoencoders of FLUX/SD3/PixArt ~34.2M encoder + ~49.5M decoder;
# Sana's DC-AE f32c32 ~312M in all (split ~ 1:1.5). Approximate: they only matter for latent models.
FAMILY_DEFAULTS = {
    "flux": PipelineDefaults(("clip-l", "t5-xxl"), 512, 8, 2, 1024, 34_163_592, 49_490_179, 128),
    "sd3": PipelineDefaults(("clip-l", "clip-g", "t5-xxl"), 333, 8, 1, 1024, 34_163_592, 49_490_179, 128),
    "pixart": PipelineDefaults(("t5-xxl",), 300, 8, 1, 1024, 34_163_592, 49_490_179, 128),
    "sana": PipelineDefaults(("gemma-2-2b",), 300, 32, 1, 1024, 124_800_000, 187_200_000, 128, 128, False),
}


@dataclass
class BlockInfo:
    index: int
    name: str
    kind: str  # the block list: transformer_blocks / single_transformer_blocks
    params: int
    # activation "units" at one token layout: sum of output features x tokens over the block's
    # linear/conv layers, and heads x queries x keys over its softmax attentions
    linear_units: int = 0
    attn_units: int = 0


@dataclass
class Inventory:
    config_path: str
    class_name: str
    family: str
    parameters: int
    shell_params: int  # prologue + epilogue (everything outside the blocks)
    epilogue_params: int
    blocks: list[BlockInfo]
    text_encoders: tuple[str, ...]
    text_encoder_params: int
    text_tokens: int
    pixel_space: bool
    latent_channels: int
    vae_scale: int
    pack: int
    default_gen_res: int
    vae_encoder_params: int
    vae_decoder_params: int
    vae_channels: int
    hidden: int
    guidance_embeds: bool
    notes: list[str] = field(default_factory=list)
    vae_up_channels: int = 0
    vae_attention: bool = False
    text_lookup_params: int = 0  # of text_encoder_params: token-embedding tables read row by row, never resident

    @property
    def text_session_params(self) -> int:
        """The text encoders' parameters their ONNX Runtime sessions hold (the lookup tables stay on disk)."""
        return self.text_encoder_params - self.text_lookup_params

    def tokens(self, res: int) -> int:
        """Image tokens at a square resolution in pixels."""
        per = self.vae_scale * self.pack
        if res % per:
            raise ValueError(f"resolution {res} is not a multiple of {per} (VAE scale {self.vae_scale} x "
                             f"patch {self.pack}) for this {self.family} model")
        return (res // per) ** 2


def _read(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _builtin_meta(config_path: str) -> dict | None:
    d = os.path.dirname(os.path.abspath(config_path))
    for p in (os.path.join(d, "edgeblock.json"), os.path.join(os.path.dirname(d), "edgeblock.json")):
        if os.path.exists(p):
            return _read(p)
    return None


def stream_tokens(name: str, family: str, kind: str, n_img: int, n_txt: int) -> int:
    """The tokens a layer `name` of a block runs over: image, text or both (FLUX single-stream blocks).
    (AdaLN modulation linears run on the timestep embedding alone; callers handle them.)"""
    if kind == "single_transformer_blocks":
        return n_img + n_txt
    if "context" in name or ".add_" in f".{name}" or name.startswith("add_") or "attn.to_add_out" in name:
        return n_txt
    if "attn2.to_k" in name or "attn2.to_v" in name:
        return n_txt if family in ("pixart", "sana") else n_img
    return n_img


def _walk_units(block, family: str, kind: str, n_img: int, n_txt: int) -> tuple[int, int]:
    """(linear units, attention units) of one block skeleton for n_img image and n_txt text tokens."""
    from torch import nn

    lin = attn = 0
    for name, m in block.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            out = m.out_features if isinstance(m, nn.Linear) else m.out_channels
            tokens = 1 if "norm" in name and isinstance(m, nn.Linear) else stream_tokens(name, family, kind, n_img, n_txt)
            lin += out * tokens
        heads = getattr(m, "heads", None)
        if heads and hasattr(m, "processor"):
            proc = type(m.processor).__name__
            if "Linear" in proc:  # Sana's linear attention: no queries x keys matrix
                continue
            if family in ("flux", "sd3") and name == "attn":
                n = n_img + n_txt
                attn += heads * n * n
            elif name == "attn2" and family in ("pixart", "sana"):
                attn += heads * n_img * n_txt
            else:
                attn += heads * n_img * n_img
    return lin, attn


def load_inventory(config: str, text_encoders: tuple[str, ...] | None = None,
                   pipeline_text: bool = True) -> Inventory:
    """Build the model on the meta device from config.json and collect what the planner needs.

    pipeline_text: price a pipeline directory's own text encoders (False: the family's, for a caller that sets the
    text parameters itself, as compile does from the loaded encoders)."""
    import torch

    from ..models import adapter_class

    path = shipped_config(config)
    cfg = _read(path)
    cls = adapter_class(cfg.get("_class_name"))
    family = cls.family
    import diffusers

    model = _on_meta(getattr(diffusers, cls.model_class.__name__), cfg)
    blocks, i = [], 0
    for lst in cls.block_lists:
        for j, b in enumerate(getattr(model, lst)):
            blocks.append(BlockInfo(i, f"{lst}.{j}", lst, sum(p.numel() for p in b.parameters())))
            i += 1
    total = sum(p.numel() for p in model.parameters())
    epi = sum(p.numel() for n in cls.epilogue_names for p in (
        [getattr(model, n)] if isinstance(getattr(model, n), torch.nn.Parameter) else getattr(model, n).parameters()))
    meta = _builtin_meta(path) if family == "flux" else None
    d = FAMILY_DEFAULTS[family]
    notes = []
    if meta and meta.get("pixel_space"):
        ch = int(meta.get("latent_channels", 3))
        pack = int(round((cfg["in_channels"] / ch) ** 0.5))
        te = text_encoders or ("minilm-l6",)
        inv = Inventory(path, cfg["_class_name"], family, total, total - sum(b.params for b in blocks), epi, blocks,
                        te, 0, int(meta.get("text_len", 32)), True, ch, 1, pack, int(meta["latent_size"]), 0, 0, 0,
                        model.inner_dim if hasattr(model, "inner_dim") else 0, bool(cfg.get("guidance_embeds")), notes)
        notes.append("builtin layout (edgeblock.json): pixel space, no VAE, MiniLM text encoder")
    else:
        te = text_encoders or d.text_encoders
        ch = cfg.get("in_channels", 16) // (d.pack * d.pack) if family == "flux" else cfg.get("in_channels", 4)
        inv = Inventory(path, cfg["_class_name"], family, total, total - sum(b.params for b in blocks), epi, blocks,
                        te, 0, d.text_tokens, False, ch, d.vae_scale, d.pack, d.gen_res, d.vae_encoder_params,
                        d.vae_decoder_params, d.vae_channels, 0, bool(cfg.get("guidance_embeds")), notes)
        if family != "flux" and "patch_size" in cfg:
            inv.pack = int(cfg.get("patch_size") or 1)
        inv.vae_up_channels, inv.vae_attention = d.vae_up_channels, d.vae_attention
        _pipeline_vae(inv, path)
    if text_encoders or not (pipeline_text and _pipeline_text(inv, path)):
        unknown = [t for t in inv.text_encoders if t not in TEXT_ENCODERS]
        if unknown:
            raise ValueError(f"unknown text encoder(s) {unknown}; known: {', '.join(sorted(TEXT_ENCODERS))}")
        inv.text_encoder_params = sum(TEXT_ENCODERS[t] for t in inv.text_encoders)
        inv.text_lookup_params = sum(TEXT_ENCODER_LOOKUPS[t] for t in inv.text_encoders)
    inv._model = model  # the meta skeleton, for activation units at any token count
    return inv


def _on_meta(model_cls, cfg: dict):
    """A diffusers model class built on the meta device from a config.json's entries its __init__ takes."""
    import inspect

    import torch

    keys = set(inspect.signature(model_cls.__init__).parameters) - {"self"}
    with torch.device("meta"):
        return model_cls(**{k: v for k, v in cfg.items() if k in keys})


def _pipeline_root(config_path: str) -> str | None:
    """The diffusers pipeline directory whose transformer/ holds config_path, or None (a config on its own)."""
    d = os.path.dirname(os.path.abspath(config_path))
    return os.path.dirname(d) if os.path.basename(d) == "transformer" else None


def _pipeline_vae(inv: Inventory, config_path: str) -> None:
    """A diffusers pipeline's own VAE (vae/config.json beside transformer/: AutoencoderKL or AutoencoderDC) instead of
    the family's: its encoder / decoder parameters (built on the meta device), scale and decoder widths."""
    root = _pipeline_root(config_path)
    if root is None or not os.path.exists(p := os.path.join(root, "vae", "config.json")):
        return
    cfg = _read(p)
    kind = cfg.get("_class_name")
    if kind not in ("AutoencoderKL", "AutoencoderDC"):
        return
    import diffusers

    vae = _on_meta(getattr(diffusers, kind), cfg)
    count = lambda pre: sum(p.numel() for n, p in vae.named_parameters() if n.startswith(pre))  # noqa: E731
    inv.vae_encoder_params = count(("encoder.", "quant_conv."))
    inv.vae_decoder_params = count(("decoder.", "post_quant_conv."))
    if kind == "AutoencoderKL":
        widths = list(vae.config.block_out_channels)
        inv.vae_scale = 2 ** (len(widths) - 1)
        inv.vae_channels, inv.vae_up_channels = widths[0], max(widths[: 2])
        inv.vae_attention = bool(cfg.get("mid_block_add_attention", True))
    else:  # DC-AE: each encoder stage but the last halves the side; the decoder's first width is its full-resolution
        # stage's (listed from full resolution down, built in reverse); no softmax attention over the latent pixels
        widths = list(vae.config.decoder_block_out_channels)
        inv.vae_scale = 2 ** (len(vae.config.encoder_block_out_channels) - 1)
        inv.vae_channels = inv.vae_up_channels = widths[0]
        inv.vae_attention = False
    inv.notes.append(f"VAE from {p} ({kind}, decoder widths {widths})")


def _pipeline_text(inv: Inventory, config_path: str) -> bool:
    """A diffusers pipeline's own text encoders (model_index.json's text_encoder* beside transformer/, each built
    on the meta device from its config) instead of the family's public ones: their parameters, and of those the
    token-embedding tables a bundle reads row by row (compile/text_lookup.py's rule: a table of >= 1 MiB in fp32).
    False when the folder is not such a pipeline (the family's encoders stay)."""
    root = _pipeline_root(config_path)
    if root is None or not os.path.exists(index := os.path.join(root, "model_index.json")):
        return False
    import torch
    import transformers

    from ..compile.text_lookup import MIN_TABLE_BYTES

    parts = [(k, v) for k, v in sorted(_read(index).items())
             if k.startswith("text_encoder") and isinstance(v, list) and v[0] == "transformers" and v[1]]
    names, params, lookups = [], 0, 0
    for key, (_lib, cls_name) in parts:
        folder = os.path.join(root, key)
        if not os.path.exists(os.path.join(folder, "config.json")):
            return False
        cls = getattr(transformers, cls_name)
        cfg = cls.config_class.from_pretrained(folder)
        with torch.device("meta"):
            model = cls(cfg)
        params += sum(p.numel() for p in model.parameters())
        table = model.get_input_embeddings().weight
        lookups += table.numel() if table.numel() * 4 >= MIN_TABLE_BYTES else 0
        names.append(f"{key} ({cls_name})")
    if not names:
        return False
    inv.text_encoders, inv.text_encoder_params, inv.text_lookup_params = tuple(names), params, lookups
    inv.notes.append(f"text encoders from {root}: {', '.join(names)}, {params / 1e6:.1f}M parameters")
    return True


def block_units(inv: Inventory, index: int, n_img: int, batch: int = 1) -> tuple[int, int]:
    """(linear units, attention units) of block `index` at n_img image tokens, times the batch."""
    b = inv.blocks[index]
    lst, j = b.name.split(".")
    lin, att = _walk_units(getattr(inv._model, lst)[int(j)], inv.family, b.kind, n_img, inv.text_tokens)
    return lin * batch, att * batch


def widest_linear(inv: Inventory, index: int) -> int:
    """Weights of block `index`'s largest linear (an adaptive norm's excepted: it reads the timestep embedding)."""
    from torch import nn

    lst, j = inv.blocks[index].name.split(".")
    return max((m.in_features * m.out_features for name, m in getattr(inv._model, lst)[int(j)].named_modules()
                if isinstance(m, nn.Linear) and "norm" not in name), default=0)


def shipped_configs() -> dict[str, str]:
    """Name -> path of the transformer configs shipped with the planner (config.json only, no weights)."""
    d = os.path.join(os.path.dirname(__file__), "configs")
    return {f[:-5]: os.path.join(d, f) for f in sorted(os.listdir(d)) if f.endswith(".json")}


def shipped_config(config: str) -> str:
    """A config.json path, a folder holding one (transformer/ or itself), or a shipped config's name."""
    ship = shipped_configs()
    if config == "builtin":
        from ..models import builtin_dir

        return os.path.join(builtin_dir(), "transformer", "config.json")
    if config in ship:
        return ship[config]
    if os.path.isdir(config):
        for p in (os.path.join(config, "transformer", "config.json"), os.path.join(config, "config.json")):
            if os.path.exists(p):
                return p
        raise ValueError(f"{config}: no config.json or transformer/config.json in this folder")
    if not os.path.exists(config):
        raise ValueError(f"config {config!r}: no such file; give a diffusers transformer config.json or one of the "
                         f"shipped names: {', '.join(ship)}")
    return config
