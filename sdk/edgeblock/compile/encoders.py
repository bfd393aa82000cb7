"""Export of the text encoders (+ tokenizers) and the VAE of a model for the device bundle.

text_encoder.onnx composes the family's encoders as its diffusers pipeline does (the torch
reference is models/pipeline_parts.TextStack.encode):

    builtin  input_ids, attention_mask -> text (MiniLM states), pooled (mean-pooled, L2-normalised)
    flux     clip_ids -> pooled (CLIP pooler_output); t5_ids -> text (T5 states)
    sd3      clip_ids, clip2_ids[, t5_ids] -> text ([CLIP-L | CLIP-G penultimate, padded ; T5]),
             pooled ([CLIP-L | CLIP-G text_embeds])
    pixart   input_ids, attention_mask -> text (T5 states), mask (float attention mask)
    sana     input_ids, attention_mask -> text (Gemma-2 states), mask

Each tokenizer is saved as a `tokenizers` JSON file with its padding/truncation spec (see
edge_runtime/text.py, which the verification runs: the device's own tokenization feeds the graph
and the result is compared with the torch pipeline's encode_prompt composition).

vae_encoder.onnx: images (B, 3, H, W) in [-1, 1] -> latents as the transformer reads them
(KL: posterior mean, (z - shift) * scale; DC-AE: z * scale); vae_decoder.onnx: latents -> images in
[-1, 1]. Batch and spatial axes are dynamic; both are verified at the training and the generation
resolution.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from typing import Any

import numpy as np

from edge_runtime.text import TextEncoder

VERIFY_PROMPTS = ["a photo of sks dog on a beach", ""]  # a prompt and the guidance negative


def fix_negative_perms(model) -> int:
    """Transpose perms with negative axes (traced movedim(1, -1)) are invalid ONNX: make them positive."""
    n = 0
    for node in model.graph.node:
        if node.op_type != "Transpose":
            continue
        for a in node.attribute:
            if a.name == "perm" and any(v < 0 for v in a.ints):
                k = len(a.ints)
                fixed = [v + k if v < 0 else v for v in a.ints]
                del a.ints[:]
                a.ints.extend(fixed)
                n += 1
    return n


def _eager(model) -> Any:
    """Switch a transformers model to eager attention (the traced sdpa mask bakes in example shapes)."""
    prev = getattr(model.config, "_attn_implementation", None)
    if hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation("eager")
            return prev
        except Exception:  # noqa: BLE001 - fall back to the config attribute
            pass
    model.config._attn_implementation = "eager"
    return prev


def _restore(model, prev) -> None:
    if prev is None:
        return
    if hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation(prev)
            return
        except Exception:  # noqa: BLE001
            pass
    model.config._attn_implementation = prev


def _tokenizer_spec(tok, file: str, ids: str, mask: str | None, max_length: int, pre: str) -> dict[str, Any]:
    pad_id = tok.pad_token_id
    pad_token = tok.pad_token
    if pad_id is None or pad_token is None:
        raise ValueError(f"tokenizer for {ids} has no pad token; the pipeline pads to max_length")
    return {"file": file, "ids": ids, "mask": mask, "max_length": int(max_length), "pad_id": int(pad_id),
            "pad_token": str(pad_token), "preprocess": pre, "class": type(tok).__name__}


def _save_tokenizer(tok, out_dir: str, rel: str) -> None:
    path = os.path.join(out_dir, *rel.split("/"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tok.backend_tokenizer.save(path)


def _text_graph(stack):
    """(torch module, example-input builder, input names, output names, tokenizer specs + saver)."""
    import torch

    fam = stack.family
    if fam == "builtin":
        model = stack.encoder.model

        class G(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, input_ids, attention_mask):
                states = self.model(input_ids=input_ids, attention_mask=attention_mask,
                                    token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
                m = attention_mask.unsqueeze(-1).to(states.dtype)
                pooled = (states * m).sum(1) / m.sum(1).clamp(min=1e-9)
                return states, torch.nn.functional.normalize(pooled, p=2, dim=-1)

        toks = [(stack.encoder.tokenizer, _tokenizer_spec(stack.encoder.tokenizer, "tokenizer.json", "input_ids",
                                                          "attention_mask", stack.length, "none"))]
        return G(), toks, ["text", "pooled"], [model]
    if fam == "flux":
        clip, t5 = stack.clip, stack.t5

        class G(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.clip, self.t5 = clip, t5

            def forward(self, clip_ids, t5_ids):
                pooled = self.clip(clip_ids, output_hidden_states=False).pooler_output
                return self.t5(t5_ids, output_hidden_states=False)[0], pooled

        toks = [(stack.clip_tokenizer, _tokenizer_spec(stack.clip_tokenizer, "tokenizer/tokenizer.json", "clip_ids",
                                                      None, stack.clip_length, "none")),
                (stack.t5_tokenizer, _tokenizer_spec(stack.t5_tokenizer, "tokenizer_2/tokenizer.json", "t5_ids",
                                                    None, stack.max_sequence_length, "none"))]
        return G(), toks, ["text", "pooled"], [clip, t5]
    if fam == "sd3":
        clips, t5, t5_dim, n_t5 = stack.clips, stack.t5, stack.text_dim, stack.max_sequence_length

        class G(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.c1, self.c2, self.t5 = clips[0], clips[1], t5

            def forward(self, clip_ids, clip2_ids, *rest):
                o1 = self.c1(clip_ids, output_hidden_states=True)
                o2 = self.c2(clip2_ids, output_hidden_states=True)
                clip = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1)
                if self.t5 is None:
                    t5s = clip.new_zeros(clip.shape[0], n_t5, t5_dim)
                else:
                    t5s = self.t5(rest[0])[0].to(clip.dtype)
                clip = torch.nn.functional.pad(clip, (0, t5s.shape[-1] - clip.shape[-1]))
                return torch.cat([clip, t5s], dim=-2), torch.cat([o1[0], o2[0]], dim=-1)

        toks = [(stack.tokenizers[0], _tokenizer_spec(stack.tokenizers[0], "tokenizer/tokenizer.json", "clip_ids",
                                                      None, stack.clip_length, "none")),
                (stack.tokenizers[1], _tokenizer_spec(stack.tokenizers[1], "tokenizer_2/tokenizer.json", "clip2_ids",
                                                      None, stack.clip_length, "none"))]
        if t5 is not None:
            toks.append((stack.t5_tokenizer, _tokenizer_spec(stack.t5_tokenizer, "tokenizer_3/tokenizer.json",
                                                            "t5_ids", None, n_t5, "none")))
        return G(), toks, ["text", "pooled"], [m for m in (*clips, t5) if m is not None]
    if fam in ("pixart", "sana"):
        enc = stack.encoder

        class G(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.enc = enc

            def forward(self, input_ids, attention_mask):
                text = self.enc(input_ids, attention_mask=attention_mask)[0]
                return text, attention_mask.to(text.dtype)

        toks = [(stack.tokenizer, _tokenizer_spec(stack.tokenizer, "tokenizer/tokenizer.json", "input_ids",
                                                 "attention_mask", stack.max_sequence_length, "lower_strip"))]
        return G(), toks, ["text", "mask"], [enc]
    raise ValueError(f"no text export for family {fam!r}")


def export_text_encoder(stack, out_dir: str, verify: bool = True, opset: int = 17) -> dict[str, Any]:
    """The family's text encoders -> out_dir/text_encoder.onnx + tokenizer files; verified when asked.

    Returns the manifest description (graphs["text_encoder"]); with verify, a "verification" entry
    {max_abs, max_rel, per} compares the device path (tokenizers + ONNX Runtime) with stack.encode.
    """
    import onnx
    import torch

    from . import onnx_export as ox
    from .text_lookup import externalize_lookups

    graph, toks, outputs, models = _text_graph(stack)
    specs = [s for _, s in toks]
    for tok, spec in toks:
        _save_tokenizer(tok, out_dir, spec["file"])
    # example inputs from the device tokenization itself
    desc: dict[str, Any] = {"kind": "text_encoder", "path": "text_encoder.onnx", "family": stack.family,
                            "tokenizers": specs, "outputs": outputs, "opset": opset, "dtype": "int64",
                            "length": int(stack.length)}
    from edge_runtime.text import BundleTokenizer

    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        feeds.update(BundleTokenizer(out_dir, spec)(["a photo of sks dog", "a"]))
    inputs = list(feeds)
    axes = {n: {0: "batch"} for n in inputs}
    axes.update({n: {0: "batch"} for n in outputs})
    prev = [_eager(m) for m in models]
    path = os.path.join(out_dir, "text_encoder.onnx")
    try:
        with torch.no_grad(), warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp:
            warnings.simplefilter("ignore")
            tmp_path = os.path.join(tmp, "t.onnx")
            torch.onnx.export(graph.eval(), tuple(torch.from_numpy(feeds[n]) for n in inputs), tmp_path, dynamo=False,
                              opset_version=opset, input_names=inputs, output_names=outputs, dynamic_axes=axes,
                              do_constant_folding=True)
            model = onnx.load(tmp_path)
        desc["external_data"] = ox.save_onnx(model, path)
    finally:
        for m, p in zip(models, prev):
            _restore(m, p)
    desc["inputs"] = [i.name for i in model.graph.input]
    del model
    externalize_lookups(out_dir, desc)  # token-embedding tables: read row by row on the device
    if verify:
        cond = stack.encode(VERIFY_PROMPTS)
        got = TextEncoder(out_dir, desc).encode(VERIFY_PROMPTS)
        ref = {"text": cond.text}
        if "pooled" in outputs:
            ref["pooled"] = cond.pooled
        if "mask" in outputs:
            ref["mask"] = cond.mask
        r = ox.compare(got, ref)
        desc["verification"] = {"max_abs": r.max_abs, "max_rel": r.max_rel,
                                "per": {k: {"max_abs": a, "max_rel": b} for k, (a, b) in r.per_output.items()}}
    return desc


def check_text_parts(out_dir: str, desc: dict[str, Any], prompts: list[str], bound: float) -> dict[str, Any]:
    """The chained parts against the whole encoder on `prompts`, both in ONNX Runtime with the same (resident)
    session settings: {"max_abs", "max_rel", "parts"}; RuntimeError past `bound` (text_parts.PARTS_REL_BOUND)."""
    from .onnx_run import compare

    whole = {k: v for k, v in desc.items() if k != "parts"}
    ref = TextEncoder(out_dir, whole, streamed=True).encode(prompts)  # streamed whole: the resident settings
    got = TextEncoder(out_dir, desc).encode(prompts)
    if set(got) != set(ref):
        raise RuntimeError(f"verification failed (no bundle written): the text encoder's parts give outputs "
                           f"{sorted(got)}, the whole encoder {sorted(ref)}")
    r = compare(got, ref)
    out = {"max_abs": r.max_abs, "max_rel": r.max_rel, "parts": len(desc["parts"])}
    if not r.max_rel <= bound:
        raise RuntimeError(f"verification failed (no bundle written): the text encoder's {len(desc['parts'])} parts "
                           f"differ from the whole encoder by rel {r.max_rel:.2e} (max abs {r.max_abs:.2e}; bound "
                           f"{bound:.0e}); compile with --text-parts 1 to keep it whole")
    return out


def export_vae(codec, out_dir: str, train_res: int, gen_res: int, verify: bool = True, opset: int = 17,
               seed: int = 0) -> dict[str, Any]:
    """The VAE of a latent model -> vae_encoder.onnx + vae_decoder.onnx (dynamic batch/spatial axes)."""
    import onnx
    import torch

    from . import onnx_export as ox
    from .attention_chunks import chunk_attention, query_chunks

    if codec.vae is None:
        raise ValueError("pixel-space model: there is no VAE to export")
    vae, kind, scale, shift = codec.vae, codec.kind, codec.scaling, codec.shift

    class Enc(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vae = vae

        def forward(self, images):
            z = self.vae.encode(images).latent_dist.mean if kind == "kl" else self.vae.encode(images).latent
            return (z - shift) * scale

    class Dec(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vae = vae

        def forward(self, latents):
            return self.vae.decode(latents / scale + shift).sample.clamp(-1, 1)

    g = torch.Generator().manual_seed(seed)
    d = codec.downsample
    img = torch.rand(1, 3, gen_res, gen_res, generator=g) * 2 - 1
    lat = torch.randn(1, codec.channels, gen_res // d, gen_res // d, generator=g)
    desc: dict[str, Any] = {"kind": kind, "downsample": d, "latent_channels": codec.channels, "scaling": scale,
                            "shift": shift, "opset": opset, "range": [-1.0, 1.0]}
    for name, mod, x, xin, xout in (("vae_encoder", Enc(), img, "images", "latents"),
                                    ("vae_decoder", Dec(), lat, "latents", "images")):
        path = os.path.join(out_dir, name + ".onnx")
        axes = {xin: {0: "batch", 2: "height", 3: "width"}, xout: {0: "batch", 2: "height", 3: "width"}}
        with torch.no_grad(), warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp:
            warnings.simplefilter("ignore")
            tmp_path = os.path.join(tmp, "v.onnx")
            torch.onnx.export(mod.eval(), (x,), tmp_path, dynamo=False, opset_version=opset, input_names=[xin],
                              output_names=[xout], dynamic_axes=axes, do_constant_folding=True)
            model = onnx.load(tmp_path)
        fix_negative_perms(model)
        # the decoder's mid-block attention over the latent pixels, in slices of queries (attention_chunks.py)
        chunks = query_chunks((gen_res // d) ** 2) if name == "vae_decoder" else 1
        chunks = chunks if chunk_attention(model, chunks) else 0
        ext = ox.save_onnx(model, path)
        del model
        desc[name] = {"path": name + ".onnx", "inputs": [xin], "outputs": [xout], "external_data": ext}
        if chunks:
            desc[name]["attention_chunks"] = chunks
    if verify:
        per = {}
        sess_e, sess_d = ox.session(os.path.join(out_dir, "vae_encoder.onnx")), ox.session(os.path.join(out_dir, "vae_decoder.onnx"))
        for res in sorted({train_res, gen_res}):
            im = torch.rand(2, 3, res, res, generator=g) * 2 - 1
            z = torch.randn(2, codec.channels, res // d, res // d, generator=g)
            r = ox.compare(ox.run_onnx(sess_e, {"images": im}), {"latents": codec.encode(im)})
            per[f"vae_encoder@{res}"] = {"max_abs": r.max_abs, "max_rel": r.max_rel}
            r = ox.compare(ox.run_onnx(sess_d, {"latents": z}), {"images": codec.decode(z)})
            per[f"vae_decoder@{res}"] = {"max_abs": r.max_abs, "max_rel": r.max_rel}
        desc["verification"] = {"max_abs": max(v["max_abs"] for v in per.values()),
                                "max_rel": max(v["max_rel"] for v in per.values()), "per": per}
    return desc
