"""Text to image for the daemon: a Generate request checked against the limits, its adapter's
weights (a small LRU cache), up to `max_concurrent_generations` at once, the deadline and a
shutdown checked at every sampling step."""

from __future__ import annotations

import io
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from ..memory_plan import RESIDENT_ROWS, STREAMED, equivalent_side
from .admission import Admission
from .config import Defaults, Limits
from .errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable

log = logging.getLogger("edgeblock.daemon")
SLOT_RETRY_S = 2.0  # RetryInfo when every generation slot is busy: a generation takes seconds

ADAPTER_CACHE = 8  # adapters whose weights stay loaded
MAX_SCALE = 4.0  # |AdapterWeight.scale|: beyond it an adapter's delta swamps the base model


class Generator:
    """Generations on a bundle, with the adapters of a store."""

    def __init__(self, bundle, store, *, limits: Limits, defaults: Defaults, shutting_down: threading.Event,
                 admission: Admission | None = None):
        self.bundle, self.store = bundle, store
        self.admission = admission or Admission(None, None, evict=lambda: None)
        self.limits, self.defaults = limits, defaults
        self.shutting_down = shutting_down
        self.slots = threading.BoundedSemaphore(limits.max_concurrent_generations)
        self.lock = threading.Lock()
        self.adapter_cache: OrderedDict[str, dict] = OrderedDict()

    def adapter_weights(self, adapter_id: str) -> dict:
        """The adapter's LoRA weights (cached). Raises NotFound / StoreError, InvalidArgument when
        they do not fit this bundle."""
        with self.lock:
            w = self.adapter_cache.get(adapter_id)
            if w is not None:
                self.adapter_cache.move_to_end(adapter_id)
                return w
        weights, _info = self.store.load_adapter(adapter_id)
        for n, a in weights.items():
            want = self.bundle.lora_shapes.get(n)
            if want is not None and tuple(a.shape) != want:
                raise InvalidArgument(f"adapter {adapter_id}: {n} has shape {a.shape}, this bundle needs {want}")
        with self.lock:
            self.adapter_cache[adapter_id] = weights
            while len(self.adapter_cache) > ADAPTER_CACHE:
                self.adapter_cache.popitem(last=False)
        return weights

    def forget(self, adapter_id: str) -> None:
        """Drop a deleted adapter's cached weights."""
        with self.lock:
            self.adapter_cache.pop(adapter_id, None)

    def adapters_of(self, request) -> list[tuple[str, float]]:
        """The (adapter id, scale) pairs a GenerateRequest applies: `adapters`, or `adapter_id` at scale 1."""
        from ..store import check_id

        L = self.limits
        if request.adapters and request.adapter_id:
            raise InvalidArgument("give adapters or adapter_id, not both", field="adapters")
        if len(request.adapters) > L.max_adapters_per_generation:
            raise InvalidArgument(f"{len(request.adapters)} adapters, more than max_adapters_per_generation="
                                  f"{L.max_adapters_per_generation}", field="adapters")
        pairs = [(a.adapter_id, float(a.scale) if a.HasField("scale") else 1.0) for a in request.adapters]
        if request.adapter_id:
            pairs = [(request.adapter_id, 1.0)]
        for i, (aid, scale) in enumerate(pairs):
            check_id(aid, f"adapters[{i}].adapter_id" if request.adapters else "adapter_id")
            if not math.isfinite(scale) or abs(scale) > MAX_SCALE:
                raise InvalidArgument(f"adapter {aid}: scale must be in [-{MAX_SCALE:g}, {MAX_SCALE:g}], got {scale}",
                                      field=f"adapters[{i}].scale")
        if len({aid for aid, _ in pairs}) != len(pairs):
            raise InvalidArgument("an adapter is named twice: give it once with the sum of its scales",
                                  field="adapters")
        if len(pairs) > 1 and not self.bundle.lora_rank_dynamic:
            raise FailedPrecondition("this bundle applies one adapter at a time (its LoRA rank is fixed: compiled "
                                     "before several adapters were supported): recompile it with edgeblock compile")
        return pairs

    def generate(self, request, deadline: float | None,
                 progress: Callable[[int, int, int], None] | None = None) -> tuple[list[tuple[bytes, int]], dict]:
        """A GenerateRequest's images as (PNG, seed) pairs and what they were made with (steps, guidance, size,
        time_s, mode, adapters). progress(image, step, total_steps) after every sampling step (it may raise to
        stop). Raises InvalidArgument, FailedPrecondition, ResourceExhausted, DeadlineExceeded, Unavailable,
        NotFound / StoreError (an adapter)."""
        from ..lora_mix import mix

        L, D = self.limits, self.defaults
        for field, text in (("prompt", request.prompt), ("negative_prompt", request.negative_prompt)):
            if len(text) > L.max_prompt_chars:
                raise InvalidArgument(f"{field} of {len(text)} characters, more than "
                                      f"max_prompt_chars={L.max_prompt_chars}", field=field)
        steps = int(request.steps) or D.generate_steps
        if steps > L.max_generate_steps:
            raise InvalidArgument(f"steps {steps} more than max_generate_steps={L.max_generate_steps}", field="steps")
        g = float(request.guidance) or D.guidance
        if not math.isfinite(g) or not 0 < g <= 100:
            raise InvalidArgument(f"guidance must be in (0, 100], got {request.guidance}", field="guidance")
        count = int(request.num_images) or 1
        if count > L.max_num_images:
            raise InvalidArgument(f"num_images {count} more than max_num_images={L.max_num_images}",
                                  field="num_images")
        width, height = self.image_size(request)
        if request.negative_prompt and (self.bundle.guidance_embedded or g == 1.0):
            raise FailedPrecondition("a negative prompt needs classifier-free guidance: "
                                     + ("this model takes its guidance as an input (Info.guidance_embedded)"
                                        if self.bundle.guidance_embedded else "guidance 1 turns it off"))
        seed = int(request.seed) if request.HasField("seed") else D.seed
        if seed + count - 1 >= 2**64:
            raise InvalidArgument(f"seed {seed} + num_images {count} passes 2**64", field="seed")
        pairs = self.adapters_of(request)
        lora = mix([(self.adapter_weights(aid), s) for aid, s in pairs], self.bundle.lora_shapes) if pairs else None
        size = equivalent_side(width, height, self.bundle.multiple)  # what the memory predictions are keyed by
        self.admission.check_generation(size)  # one that could never fit the memory budget is refused now
        timeout = None if deadline is None else max(0.0, deadline - time.time())
        if not self.slots.acquire(timeout=timeout if timeout is not None else 600):
            raise ResourceExhausted(
                f"all {L.max_concurrent_generations} generation slots are busy (max_concurrent_generations)",
                retry_after_s=SLOT_RETRY_S)
        images = []
        try:
            with self.admission.generation(size, deadline) as mode:  # resident, resident_rows or streamed
                if mode == RESIDENT_ROWS:
                    log.info("generate: resident, the guidance rows one after the other (the memory budget admits "
                             "one row's activations, not the pair's)")
                t0 = time.perf_counter()
                for k in range(count):
                    def on_step(i: int, n: int, k: int = k) -> None:
                        if deadline is not None and time.time() > deadline:
                            log.info("generate stopped: deadline passed after %d of %d sampling steps", i, n)
                            raise DeadlineExceeded(f"deadline passed after {i} of {n} sampling steps")
                        if self.shutting_down.is_set():
                            raise Unavailable("the daemon is shutting down")
                        if progress is not None:
                            progress(k, i, n)

                    img = self.bundle.generate(request.prompt, seed=seed + k, steps=steps, guidance=g, width=width,
                                               height=height, lora=lora, on_step=on_step, streamed=mode == STREAMED,
                                               negative_prompt=request.negative_prompt, rows=mode == RESIDENT_ROWS)
                    images.append((png_bytes(img), seed + k))
                dt = time.perf_counter() - t0
        finally:
            self.slots.release()
        return images, {"steps": steps, "guidance": g, "width": width, "height": height, "time_s": dt, "mode": mode,
                        "adapters": pairs}

    def image_size(self, request) -> tuple[int, int]:
        """(width, height) of a GenerateRequest: width and height, or the square of size (0: gen_res); one the
        bundle serves, else FailedPrecondition (valid in itself, not for this bundle)."""
        if bool(request.width) != bool(request.height):
            raise InvalidArgument("give width and height together", field="width" if not request.width else "height")
        if request.width and request.size:
            raise InvalidArgument("give size or width and height, not both", field="size")
        if request.width:
            want = (int(request.width), int(request.height))
        else:
            side = int(request.size) or int(self.bundle.manifest.gen_res)
            want = (side, side)
        served = self.bundle.gen_sizes()
        if want not in served:
            listed = ", ".join(f"{w}x{h}" for w, h in served)
            raise FailedPrecondition(f"size {want[0]}x{want[1]} is not one this bundle was compiled for (sizes: "
                                     f"{listed}; edgeblock compile --gen-res and --gen-sizes set them)")
        return want


def png_bytes(img) -> bytes:
    """An (H, W, 3) uint8 image as PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()
