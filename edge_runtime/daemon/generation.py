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

from ..memory_plan import STREAMED
from .admission import Admission
from .config import Defaults, Limits
from .errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable

log = logging.getLogger("edgeblock.daemon")
SLOT_RETRY_S = 2.0  # RetryInfo when every generation slot is busy: a generation takes seconds

ADAPTER_CACHE = 8  # adapters whose weights stay loaded


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

    def generate(self, request, deadline: float | None) -> tuple[bytes, dict]:
        """A GenerateRequest's PNG and what it was made with (seed, steps, guidance, size, time_s).
        Raises InvalidArgument, ResourceExhausted, DeadlineExceeded, Unavailable, NotFound / StoreError
        (the adapter)."""
        from ..store import check_id

        L, D = self.limits, self.defaults
        if len(request.prompt) > L.max_prompt_chars:
            raise InvalidArgument(f"prompt of {len(request.prompt)} characters, more than "
                                  f"max_prompt_chars={L.max_prompt_chars}", field="prompt")
        steps = int(request.steps) or D.generate_steps
        if steps > L.max_generate_steps:
            raise InvalidArgument(f"steps {steps} more than max_generate_steps={L.max_generate_steps}", field="steps")
        g = float(request.guidance) or D.guidance
        if not math.isfinite(g) or not 0 < g <= 100:
            raise InvalidArgument(f"guidance must be in (0, 100], got {request.guidance}", field="guidance")
        sizes = self.bundle.sizes()
        size = int(request.size) or int(self.bundle.manifest.gen_res)
        if size not in sizes:
            # valid in itself, not for this bundle: it was compiled for other sizes
            raise FailedPrecondition(f"size {size} is not one this bundle was compiled for (sizes: {sizes}; "
                                     "edgeblock compile --gen-res sets them)")
        seed = int(request.seed) if request.HasField("seed") else D.seed
        lora = None
        if request.adapter_id:
            check_id(request.adapter_id, "adapter_id")
            lora = self.adapter_weights(request.adapter_id)
        self.admission.check_generation(size)  # one that could never fit the memory budget is refused now
        timeout = None if deadline is None else max(0.0, deadline - time.time())
        if not self.slots.acquire(timeout=timeout if timeout is not None else 600):
            raise ResourceExhausted(
                f"all {L.max_concurrent_generations} generation slots are busy (max_concurrent_generations)",
                retry_after_s=SLOT_RETRY_S)
        try:
            def on_step(i: int, n: int) -> None:
                if deadline is not None and time.time() > deadline:
                    log.info("generate stopped: deadline passed after %d of %d sampling steps", i, n)
                    raise DeadlineExceeded(f"deadline passed after {i} of {n} sampling steps")
                if self.shutting_down.is_set():
                    raise Unavailable("the daemon is shutting down")

            with self.admission.generation(size, deadline) as mode:  # resident when it fits, else streamed
                t0 = time.perf_counter()
                img = self.bundle.generate(request.prompt, seed=seed, steps=steps, guidance=g, size=size, lora=lora,
                                           on_step=on_step, streamed=mode == STREAMED)
                dt = time.perf_counter() - t0
        finally:
            self.slots.release()
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        return buf.getvalue(), {"seed": seed, "steps": steps, "guidance": g, "size": size, "time_s": dt, "mode": mode}
