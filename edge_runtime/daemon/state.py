"""What the daemon holds: its bundle (and the recipe it was compiled for), the adapter store and
the lock on its state directory, the trainer it picked, the job queue and the generator."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import replace

from .admission import Admission, default_budget
from .config import ConfigError, ServerConfig
from .generation import Generator
from .jobs import JobQueue, JobRecord
from .paging import Pager

log = logging.getLogger("edgeblock.daemon")


def lock_state_dir(state_dir: str) -> int:
    """Hold STATE/daemon.lock (flock) for the process's life: two daemons on one state directory
    would resume the same jobs and race on the adapter index. Returns the open descriptor."""
    import fcntl

    os.makedirs(state_dir, exist_ok=True)
    path = os.path.join(state_dir, "daemon.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ConfigError(f"state directory {state_dir} is in use by another daemon (pid {other}); "
                          "give each daemon its own --state") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def pick_train_device(trainer: str, want: str) -> str:
    """auto: cuda when the trainer's runtime can train there (ORT's CUDA provider, torch.cuda), else cpu."""
    if want != "auto":
        return want
    if trainer == "ort":
        try:
            from ..ort_trainer import _capi

            return "cuda" if "CUDAExecutionProvider" in _capi().get_available_providers() else "cpu"
        except Exception:  # noqa: BLE001 - no training API: the job reports it
            return "cpu"
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def pick_trainer(want: str) -> str:
    """ort when ONNX Runtime's training API is importable (auto, ort), else torch (auto, torch)."""
    if want in ("auto", "ort"):
        try:
            from ..ort_trainer import _capi

            _capi()
            return "ort"
        except Exception as e:  # noqa: BLE001
            if want == "ort":
                raise ConfigError(str(e)) from e
            log.warning("ONNX Runtime training is not available (%s): the torch trainer backend trains", e)
    return "torch"


def make_admission(bundle, budget: int | None) -> Admission:
    """The daemon's admission control over `bundle`'s predicted peaks (manifest.memory) and `budget` bytes
    (None: daemon.admission.default_budget)."""
    from ..memory_plan import format_size
    from ..personalize import choose_precompute

    m = bundle.manifest
    plan = m.memory_plan()  # validated when the manifest was loaded
    budget = budget if budget is not None else default_budget()

    def evict() -> None:
        bundle.release_all()
        bundle.release_text_encoder()

    hints = {"job": f", {len(m.trainable)} trainable blocks, {m.train_res}px training crops",
             "sizes": f" (sizes {bundle.sizes()})"}
    adm = Admission(plan, budget, evict=evict, hints=hints)
    if plan is None:
        log.warning("the bundle has no memory predictions (compiled before them): admission control is off; "
                    "recompile it to have it")
    else:
        p = adm.summary(choose_precompute(bundle), int(m.gen_res))
        log.info("memory budget %s; predicted on %s: job %s, generation at %dpx %s resident / %s resident_rows / "
                 "%s streamed", format_size(budget) if budget else "unknown", p["planner_target"],
                 format_size(p["job_peak_bytes"]), m.gen_res, format_size(p["generate_resident_bytes"]),
                 format_size(p["generate_resident_rows_bytes"]), format_size(p["generate_streamed_bytes"]))
    return adm


class Daemon:
    """The service state: bundle, store, job queue and worker, generation slots."""

    def __init__(self, cfg: ServerConfig):
        from ..runtime import Bundle
        from ..store import Store

        self.cfg = cfg
        self.bundle = Bundle(cfg.bundle, threads=cfg.threads)
        # personalization defaults: what the bundle was compiled for (its recipe), unless configured
        self.recipe = self.bundle.manifest.training_recipe()
        self.limits = cfg.limits
        self.defaults = replace(cfg.defaults, steps=cfg.defaults.steps or self.recipe.steps,
                                learning_rate=cfg.defaults.learning_rate or self.recipe.learning_rate)
        self._state_lock = lock_state_dir(cfg.state_dir)
        self.store = Store(cfg.state_dir)
        if cfg.prompt_cache_mb > 0:
            self.bundle.use_prompt_cache(os.path.join(cfg.state_dir, "prompt-cache"), int(cfg.prompt_cache_mb * 2**20))
        self.trainer = pick_trainer(cfg.trainer)
        self.train_device = pick_train_device(self.trainer, cfg.train_device)
        self.shutting_down = threading.Event()
        self.pager = Pager(self.limits.max_page_size)
        self.admission = make_admission(self.bundle, cfg.memory_budget)
        self.generator = Generator(self.bundle, self.store, limits=self.limits, defaults=self.defaults,
                                   shutting_down=self.shutting_down, admission=self.admission)
        self.jobs = JobQueue(self.bundle, self.store, trainer=self.trainer, train_device=self.train_device,
                             limits=self.limits, defaults=self.defaults, batch=self.recipe.batch,
                             shutting_down=self.shutting_down, admission=self.admission)

    def submit(self, request) -> JobRecord:
        return self.jobs.submit(request)

    def generate(self, request, deadline: float | None, progress=None) -> tuple[list[tuple[bytes, int]], dict]:
        return self.generator.generate(request, deadline, progress)

    def shutdown(self, wait: float = 60.0) -> None:
        """Stop the worker: the running job checkpoints at its current step and stays resumable."""
        self.jobs.shutdown(wait)
