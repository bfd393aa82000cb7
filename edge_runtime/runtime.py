"""A compiled bundle at run time: graph sessions, the inference chain, prompt encoding, VAE, generation.

Torch-free. Graphs are named as in manifest.graphs ("prologue", "frozen/group_00",
"trainable/infer", "epilogue", ...). Frozen groups run on TensorRT engines when they are built
for this machine and TensorRT is present, else on ONNX Runtime (the best available execution
provider). Sessions are opened on first use and may be released (`release`) so a bank
precompute holds one group's weights at a time.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from . import graph_names as gn
from .manifest import MANIFEST, CorruptBundle, Manifest, load_manifest, sha256_file, verify_file
from .memory_plan import text_encoder_streamed
from .patch_sampling import with_grid_crop
from .sampler import initial_noise, sample
from .weights import apply_session_settings


class RuntimeError_(RuntimeError):
    """A bundle that cannot run here, or a request it cannot serve."""


def ort_providers() -> list[str]:
    import onnxruntime as ort

    have = ort.get_available_providers()
    order = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return [p for p in order if p in have] or have


class Bundle:
    """Sessions over one bundle's graphs (thread-safe opening; ORT sessions run concurrently)."""

    def __init__(self, root: str, providers: list[str] | None = None, threads: int | None = None,
                 use_tensorrt: bool | None = None, verify_files: bool = True):
        self.root = os.path.abspath(root)
        self.manifest: Manifest = load_manifest(self.root, verify_files=verify_files)
        self.manifest_sha256 = sha256_file(os.path.join(self.root, MANIFEST))  # the bundle's identity (adapter files)
        m = self.manifest
        # each verified file's (size, mtime) when its sha256 matched: check_files hashes again only a file that moved
        self._verified: dict[str, tuple[int, int]] = (
            {rel: _stamp(self.root, rel) for rel in m.files} if verify_files else {})
        self.graphs = m.graphs
        self.model = m.model
        self.providers = providers or ort_providers()
        self.threads = threads
        self._sessions: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.prompt_cache: Any = None  # a PromptCache once use_prompt_cache is called
        self.chain = self._chain()
        self.lora_shapes: dict[str, tuple[int, ...]] = {}
        dynamic = []
        for name in self.chain_names:
            for n, d in self.graphs[name].get("lora", {}).items():
                self.lora_shapes[n] = tuple(d["shape"])
                dynamic.append(bool(d.get("dynamic_rank")))
        # several adapters at once (edge_runtime.lora_mix) need graphs whose LoRA rank axis is symbolic
        self.lora_rank_dynamic = bool(dynamic) and all(dynamic)
        self.latent_channels = int(self.model["latent_channels"])
        self.downsample = int(self.model.get("vae_downsample", 1))
        self.multiple = int(self.model.get("resolution_multiple", 1))
        # FLUX: pixels per image token, the VAE's downsampling x the packing of latents into tokens
        # (sqrt(in_channels / latent channels)); what places a training crop's position ids
        in_ch = int(self.model.get("config", {}).get("in_channels", self.latent_channels))
        self.token_pixels = self.downsample * math.isqrt(in_ch // self.latent_channels) if m.family == "flux" else None
        self.executor = "onnxruntime"
        self._trt: dict[str, Any] = {}
        if use_tensorrt is not False:
            try:
                from .engines import engines_status

                st = engines_status(self.root)
                if st.get("backend") == "tensorrt":
                    self.executor = "tensorrt"
            except Exception:  # noqa: BLE001 - no engines / no TensorRT: ONNX Runtime runs the groups
                if use_tensorrt:
                    raise

    # ------------------------------------------------------------------ graphs
    def _chain(self) -> list[str]:
        """Graph names in generation order: prologue, each run (frozen group / infer graph), epilogue."""
        by_block = {b["index"]: b["group"] for b in self.manifest.blocks}
        runs = []
        for run in self.model["generation_chain"]:
            g = by_block[run["blocks"][0]]
            if g not in self.graphs:
                raise RuntimeError_(f"manifest: graph {g!r} of blocks {run['blocks']} is not described")
            runs.append(g)
        names = gn.chain_graphs(runs)
        self.chain_names = names
        return names

    def check_files(self, *prefixes: str) -> None:
        """Raise CorruptBundle (naming the file) if a manifest file under one of these paths (a graph's path covers
        its external data) is missing or changed since the bundle was verified: a stat per file, a sha256 only of a
        file whose size or mtime moved. Nothing is checked for a bundle opened with verify_files=False."""
        for rel, digest in self.manifest.files.items() if self._verified else ():
            if not rel.startswith(prefixes):
                continue
            try:
                stamp = _stamp(self.root, rel)
            except FileNotFoundError:
                raise CorruptBundle(f"bundle file {rel} listed in the manifest is missing") from None
            if self._verified.get(rel) != stamp:
                verify_file(self.root, rel, digest)
                self._verified[rel] = stamp

    def graph_path(self, name: str) -> str:
        return os.path.join(self.root, *self.graphs[name]["path"].split("/"))

    def session(self, name: str):
        s = self._sessions.get(name)
        if s is not None:
            return s
        with self._lock:
            s = self._sessions.get(name)
            if s is None:
                s = self._open(name)
                self._sessions[name] = s
        return s

    def _open(self, name: str):
        g = self.graphs.get(name, {})
        if self.executor == "tensorrt" and g.get("kind") == gn.GROUP:
            from .engines import TrtGroup

            return _TrtSession(TrtGroup.from_bundle(self.root, g["path"]))
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        # No CPU memory arena: measured on a 213 MB group, 306 MiB resident instead of 425 MiB (the arena
        # keeps its high-water mark); boards share this memory with the GPU.
        opts.enable_cpu_mem_arena = False
        # No weight pre-packing: MLAS keeps a packed copy of every MatMul weight (measured on the 120M
        # bench bundle: a 213 MB group ran at 703 MiB resident with it, 430 MiB without, and much of the
        # packed memory stayed mapped after the session was released); step time unchanged (docs/bench.md).
        opts.add_session_config_entry("session.disable_prepacking", "1")
        if self.threads:
            opts.intra_op_num_threads = int(self.threads)
        path = self.graph_path(name) if name in self.graphs else os.path.join(self.root, name)
        self.check_files(os.path.relpath(path, self.root).replace(os.sep, "/"))  # a file damaged since the start
        # fp16/int8 weights stay small only with their settings (edge_runtime/weights.py); the graphs compile
        # left fp32 (the trainable blocks') get none
        key = gn.graph_key(name) if name not in self.graphs and name.endswith(".onnx") else name
        apply_session_settings(opts, self.manifest.graph_weights(key), ort)
        return ort.InferenceSession(path, opts, providers=self.providers)

    def open_chain(self) -> None:
        """Open every chain graph's session now, before the text encoder or any graph runs. Measured on the 120M
        `bench scale` bundle (fp32), one generation in a fresh daemon: 1920 MiB peak RSS when each graph was opened
        at its first run, after the text encoder had run; 1445 MiB with the sessions opened first (docs/bench.md).
        (Most of that difference was the text encoder's session, then opened with ONNX Runtime's CPU arena: with it
        open, each chain graph kept ~165 MiB after its first run; edge_runtime/text.py opens it without one.)"""
        for name in self.chain_names:
            self.session(name)

    def release(self, name: str) -> None:
        from .memstat import trim_heap

        with self._lock:
            s = self._sessions.pop(name, None)
        if s is not None and hasattr(s, "close"):
            s.close()
        del s
        trim_heap()

    def release_all(self) -> None:
        for n in list(self._sessions):
            self.release(n)

    def run(self, name: str, acc: Mapping[str, np.ndarray], lora: Mapping[str, np.ndarray] | None = None,
            streamed: bool = False) -> dict[str, np.ndarray]:
        """Run one chain graph on the accumulated tensors; returns its outputs by name.

        streamed: a graph not already open is opened for this run only and released after it (its weights are
        resident for one graph's run, not kept), as generation does when memory is short.
        """
        return self._on_graph(name, streamed, lambda sess: self._run_session(name, sess, acc, lora))

    def _on_graph(self, name: str, streamed: bool, use: Callable[[Any], Any]) -> Any:
        """use(session) on a chain graph's session: the open one (opened and kept unless streamed), or for
        streamed, when none is open, one opened for this use and released after it (before the heap is trimmed:
        nothing else holds it)."""
        sess = self._sessions.get(name) if streamed else self.session(name)
        private = sess is None
        if private:
            sess = self._open(name)
        try:
            return use(sess)
        finally:
            if private:
                from .memstat import trim_heap

                del sess
                trim_heap()

    def _run_session(self, name: str, sess, acc: Mapping[str, np.ndarray], lora) -> dict[str, np.ndarray]:
        feeds = {}
        acc = with_grid_crop([i.name for i in sess.get_inputs()], acc)  # FLUX prologue: the latent's own grid
        for i in sess.get_inputs():
            n = i.name
            if n in acc:
                feeds[n] = acc[n]
            elif n in self.lora_shapes:
                feeds[n] = lora[n] if lora is not None and n in lora else np.zeros(self.lora_shapes[n], np.float32)
            else:
                raise RuntimeError_(f"{name}: no value for input {n!r}")
        outs = sess.run(None, feeds)
        # copies: ONNX Runtime's output arrays are views that keep the memory block of the run they came from
        # alive, which would outlast a released (streamed) session for as long as the chain carries them
        # (measured on the 120M bench scale bundle: 330 -> 25 MiB held after a streamed step's sessions are released)
        return {o.name: np.array(v, copy=True) for o, v in zip(sess.get_outputs(), outs)}

    def advance(self, name: str, acc: dict[str, np.ndarray], out: Mapping[str, np.ndarray]) -> None:
        """Fold a graph's outputs into the accumulated tensors (out.<slot> -> state.<slot>)."""
        g = self.graphs[name]
        gn.fold_outputs(acc, out, g.get("state_in") or [], g.get("state_out") or [])

    def predict(self, feeds: Mapping[str, np.ndarray], lora: Mapping[str, np.ndarray] | None = None,
                names: Iterable[str] | None = None, streamed: bool = False, rows: bool = False) -> np.ndarray:
        """The model's prediction (B, C, h, w) for prologue feeds (latents, timestep, text, ...).

        streamed: each graph not already open is opened once, runs the batch's rows one after the other (a
        guidance pair's activations are one row's), and is released before the next graph.
        rows (resident): each row of the batch runs the whole chain of open graphs before the next row starts
        (edge_runtime.memory_plan.RESIDENT_ROWS): one row's activations and carried tensors at a time."""
        names = list(names or self.chain_names)
        batch = len(feeds["latents"]) if "latents" in feeds else 1
        if batch < 2 or not (streamed or rows):
            acc = dict(feeds)
            for name in names:
                self.advance(name, acc, self.run(name, acc, lora, streamed))
            return acc[gn.PREDICTION]
        split = [{k: v[r : r + 1] if np.ndim(v) and len(v) == batch else v for k, v in feeds.items()}
                 for r in range(batch)]
        if not streamed:
            return np.concatenate([self.predict(row, lora, names) for row in split])

        def each_row(name: str, sess) -> None:
            for acc in split:
                self.advance(name, acc, self._run_session(name, sess, acc, lora))

        for name in names:
            self._on_graph(name, True, lambda sess, name=name: each_row(name, sess))
        return np.concatenate([acc[gn.PREDICTION] for acc in split])

    # ------------------------------------------------------------------ text, VAE
    def text_encoder(self):
        te = getattr(self, "_text", None)
        if te is None:
            te = self._text = self._new_text_encoder(streamed=False)
        return te

    def _new_text_encoder(self, streamed: bool):
        if "text_encoder" not in self.graphs:
            raise RuntimeError_("this bundle has no text encoder (recompile it with a current edgeblock)")
        from .text import TextEncoder

        g = self.graphs["text_encoder"]
        self.check_files(*(p["path"] for p in [g, *g.get("parts", [])] if "path" in p),
                         *(t["file"] for t in g.get("tokenizers", []) if "file" in t))
        # each graph (the whole encoder, or each part) gets its own precision's session settings
        return TextEncoder(self.root, self.graphs["text_encoder"], self.providers, weights=self.manifest.graph_weights,
                           streamed=streamed)

    def release_text_encoder(self) -> None:
        """Drop the text encoder's session (reloaded on next use; a caller holding it keeps it alive)."""
        self._text = None

    @property
    def text_streamed(self) -> bool:
        """The text encoder is loaded part by part for each encoding and never kept (compiled in parts:
        edge_runtime.memory_plan.text_encoder_streamed), in every generation mode."""
        return text_encoder_streamed(self.graphs.get("text_encoder"))

    def use_prompt_cache(self, root: str, max_bytes: int) -> None:
        """Keep prompt encodings in a bounded folder (edge_runtime.prompt_cache): a prompt encoded once, by this
        process or an earlier one on the same bundle, skips the text encoder (which then is not even loaded)."""
        from .prompt_cache import PromptCache

        self.prompt_cache = PromptCache(root, max_bytes, self.manifest_sha256)

    def encode_prompts(self, prompts: list[str], streamed: bool = False) -> dict[str, np.ndarray]:
        """prompts -> the prologue's text feeds: text, pooled (if any), text_mask (if any).

        streamed: a text encoder not already open is opened for these prompts only and dropped after them."""
        out = self._encode_cached(list(prompts), streamed)
        feeds = {"text": out["text"]}
        if "pooled" in out:
            feeds["pooled"] = out["pooled"]
        if "mask" in out:
            feeds["text_mask"] = out["mask"]
        return feeds

    def _encoder(self, streamed: bool):
        """The resident text encoder (opened and kept), or for streamed, when none is open, one of its own that
        opens each graph for its run and releases it after: part by part for a bundle compiled in parts (the
        peak is near the largest part), the whole encoder for one compiled before them."""
        if not streamed or getattr(self, "_text", None) is not None:
            return self.text_encoder()
        return self._new_text_encoder(streamed=True)

    def _encode_cached(self, prompts: list[str], streamed: bool = False) -> dict[str, np.ndarray]:
        """The text encoder's outputs for prompts, one row each; through the prompt cache when one is set."""
        cache = self.prompt_cache
        if cache is None or not prompts:
            return self._encoder_run(prompts, streamed)
        # entries are keyed by this bundle's manifest, so every one holds this text encoder's outputs
        rows = {p: cache.get(p) for p in dict.fromkeys(prompts)}
        missing = [p for p, r in rows.items() if r is None]
        if missing:
            fresh = self._encoder_run(missing, streamed)
            for i, p in enumerate(missing):
                rows[p] = {k: v[i : i + 1] for k, v in fresh.items()}
                cache.put(p, rows[p])
        return {k: np.concatenate([rows[p][k] for p in prompts], axis=0) for k in rows[prompts[0]]}

    def _encoder_run(self, prompts: list[str], streamed: bool) -> dict[str, np.ndarray]:
        te = self._encoder(streamed)
        out = te.encode(prompts)
        if te is not getattr(self, "_text", None):  # a streamed encoder of its own: gone before sampling starts
            from .memstat import trim_heap

            del te
            trim_heap()
        return out

    def vae_encode(self, images: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) in [-1, 1] -> model-space latents (identity for pixel-space models)."""
        if self.downsample == 1 and "vae" not in self.graphs:
            return images.astype(np.float32)
        sess = self.session(self.graphs["vae"]["vae_encoder"]["path"])
        return np.array(sess.run(None, {"images": images.astype(np.float32)})[0], copy=True)  # not a view: see run

    def vae_decode(self, latents: np.ndarray, streamed: bool = False) -> np.ndarray:
        if self.downsample == 1 and "vae" not in self.graphs:
            return np.clip(latents, -1.0, 1.0)
        name = self.graphs["vae"]["vae_decoder"]["path"]
        sess = self._sessions.get(name) if streamed else self.session(name)
        if sess is None:
            sess = self._open(name)
        return np.array(sess.run(None, {"latents": latents.astype(np.float32)})[0], copy=True)  # not a view: see run

    # ------------------------------------------------------------------ generation
    @property
    def guidance_embedded(self) -> bool:
        """The model takes its guidance scale as an input (FLUX-dev) instead of classifier-free guidance."""
        return bool(self.model.get("guidance_embeds"))

    def sizes(self) -> list[int]:
        """Square generation sides (pixels) the bundle serves: the training and the generation resolution, and
        any square among its extra sizes."""
        return sorted({w for w, h in self.gen_sizes() if w == h})

    def gen_sizes(self) -> list[tuple[int, int]]:
        """Every (width, height) the bundle serves (edge_runtime.manifest.Manifest.served_sizes)."""
        return self.manifest.served_sizes()

    def generate(self, prompt: str, *, seed: int = 0, steps: int = 30, guidance: float = 3.0,
                 size: int | None = None, lora: Mapping[str, np.ndarray] | None = None,
                 noise: np.ndarray | None = None, on_step: Callable[[int, int], None] | None = None,
                 streamed: bool = False, negative_prompt: str = "", width: int | None = None,
                 height: int | None = None, rows: bool = False) -> np.ndarray:
        """One image (H, W, 3) uint8 for `prompt`.

        Models with a guidance embedding (FLUX-dev) take `guidance` as an input; the others use
        classifier-free guidance against `negative_prompt` (default: the empty prompt; batch 2) when
        guidance != 1. A negative prompt without classifier-free guidance is an error.

        streamed (edge_runtime.memory_plan.STREAMED): every graph not already open is loaded for its own run
        and released after it, at each sampling step, the text encoder before sampling and the VAE decoder
        after it: the peak is one graph's weights and activations instead of all of them; slower by the
        sessions' load time per step. Resident (the default): the sessions stay open for the next request. A text
        encoder compiled in parts (text_streamed) is loaded part by part and released before sampling in either
        mode.
        rows (resident, edge_runtime.memory_plan.RESIDENT_ROWS): the classifier-free guidance pair's rows run one
        after the other through the open graphs at each step (one row's activations; each graph runs twice).
        """
        size = int(size or self.manifest.gen_res)
        width, height = int(width or size), int(height or size)  # width x height, or a square of `size`
        if width % self.multiple or height % self.multiple:
            raise RuntimeError_(f"size {width}x{height} is not a multiple of {self.multiple}")
        w_side, h_side = width // self.downsample, height // self.downsample
        if noise is None:
            noise = initial_noise(seed, (1, self.latent_channels, h_side, w_side))
        embedded = self.guidance_embedded
        cfg_on = (not embedded) and guidance != 1.0
        if negative_prompt and not cfg_on:
            raise RuntimeError_("a negative prompt needs classifier-free guidance: guidance != 1 on a model without "
                                "a guidance embedding")
        if not streamed:
            self.open_chain()
        text = self.encode_prompts([prompt, negative_prompt] if cfg_on else [prompt], streamed or self.text_streamed)

        def predict(x: np.ndarray, t: np.ndarray) -> np.ndarray:
            b = 2 if cfg_on else 1
            feeds = {"latents": np.concatenate([x] * b) if b > 1 else x, "timestep": np.concatenate([t] * b) if b > 1 else t,
                     **text}
            if embedded:
                feeds["guidance"] = np.full((x.shape[0],), guidance, np.float32)
            pred = self.predict(feeds, lora, streamed=streamed, rows=rows)
            if cfg_on:
                c, u = pred[:1], pred[1:]
                return u + guidance * (c - u)
            return pred

        pack = max(1, self.multiple // self.downsample)
        tokens = (h_side // pack) * (w_side // pack)
        x = sample(predict, noise, steps, self.model.get("sampler", {"kind": "flow_euler"}), tokens, on_step)
        img = self.vae_decode(x, streamed)[0]
        return to_uint8(img)


def _stamp(root: str, rel: str) -> tuple[int, int]:
    st = os.stat(os.path.join(root, *rel.split("/")))
    return st.st_size, st.st_mtime_ns


def to_uint8(img: np.ndarray) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    return np.round((np.clip(img, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8).transpose(1, 2, 0)


class _TrtSession:
    """ORT-session-like wrapper over a TensorRT group (get_inputs/get_outputs/run)."""

    class _Name:
        def __init__(self, name: str):
            self.name = name

    def __init__(self, group):
        self.group = group

    def get_inputs(self):
        return [self._Name(n) for n in self.group.inputs]

    def get_outputs(self):
        return [self._Name(n) for n in self.group.outputs]

    def run(self, _names, feeds):
        out = self.group.run(feeds)
        return [out[n] for n in self.group.outputs]

    def close(self):
        self.group.close()


__all__ = ["Bundle", "RuntimeError_", "to_uint8"]
