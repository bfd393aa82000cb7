"""Admission control: the daemon starts a job or a generation only when its predicted peak (the bundle's
manifest.memory, the planner's figures written by compile) fits the memory budget beside what is running, and
refuses with RESOURCE_EXHAUSTED what could never fit, instead of letting the kernel's OOM killer (which can
freeze a Jetson) decide.

Accounting, in predicted bytes of the daemon process (every prediction includes the process's runtime once):
- a running job holds its predicted peak above the runtime;
- a resident generation holds its activations, plus the graphs' weights, which stay held after it ends
  (the sessions are kept open for the next request: the "cache") until an operation that needs the room
  evicts them while no generation uses them;
- a streamed generation holds its streamed peak above the runtime (one graph at a time).
A generation runs resident when that fits; else resident with its guidance rows one after the other
(memory_plan.RESIDENT_ROWS: one row's activations, slower) when that fits; else streamed. An operation that fits
the budget alone but not beside what runs waits (a generation until its deadline).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator

from ..memory_plan import RESIDENT, RESIDENT_ROWS, STREAMED, MemoryPlan, format_size
from .errors import ResourceExhausted

MEMORY_RETRY_S = 5.0  # RetryInfo when running operations hold the memory budget: they end in seconds to minutes

log = logging.getLogger("edgeblock.daemon")

WAIT_S = 600.0  # the longest a generation without a deadline waits for memory


def default_budget() -> int | None:
    """What the machine has free now plus what this process already holds, less a margin (5 % of the memory,
    at least 256 MiB) for the rest of the system; None where /proc/meminfo cannot be read."""
    from ..memstat import meminfo_bytes, rss_bytes

    avail, total = meminfo_bytes("MemAvailable"), meminfo_bytes("MemTotal")
    if avail is None or total is None:
        return None
    return max(1, rss_bytes() + avail - max(256 * 2**20, total // 20))


class Admission:
    """The budget and what holds it (thread-safe). `plan` None: no predictions (a bundle compiled before them),
    everything is admitted."""

    def __init__(self, plan: MemoryPlan | None, budget: int | None, *, evict: Callable[[], None],
                 hints: dict[str, str] | None = None):
        self.plan, self.budget = plan, budget
        self._evict = evict
        self.hints = hints or {}
        self._cond = threading.Condition()
        self._held: dict[int, int] = {}  # ticket -> predicted bytes above the runtime
        self._next = 0
        self.cache_bytes = 0  # graph weights resident generations left open
        self._resident_running = 0
        self._job_running = 0

    @property
    def enabled(self) -> bool:
        return self.plan is not None and self.budget is not None

    def in_use_bytes(self) -> int:
        """Predicted bytes held now: the runtime, the kept graphs and every running operation."""
        if self.plan is None:
            return 0
        with self._cond:
            return self._in_use()

    def _in_use(self) -> int:
        return self.plan.runtime_bytes + self.cache_bytes + sum(self._held.values())

    def _free(self) -> int:
        return self.budget - self._in_use()

    def _take(self, n: int) -> int:
        self._next += 1
        self._held[self._next] = max(0, n)
        return self._next

    def _give_back(self, ticket: int) -> None:
        with self._cond:
            self._held.pop(ticket, None)
            self._cond.notify_all()

    def _evict_cache(self) -> bool:
        """Close the graphs resident generations left open, when nothing uses them; True if room was made."""
        if not self.cache_bytes or self._resident_running or self._job_running:
            return False
        self._evict()
        log.info("admission: closed the generation graphs (%s) to make room", format_size(self.cache_bytes))
        self.cache_bytes = 0
        return True

    # ------------------------------------------------------------------ jobs
    def check_job(self, precompute: str) -> None:
        """Refuse (ResourceExhausted) a job whose predicted peak is above the budget even alone."""
        if not self.enabled:
            return
        peak = self.plan.job_peak(precompute)
        if peak > self.budget:
            raise ResourceExhausted(
                f"this personalization job's predicted peak is {format_size(peak)} (precompute {precompute}"
                f"{self.hints.get('job', '')}) but the daemon's memory budget is {format_size(self.budget)} "
                f"(--memory-budget): recompile the bundle with fewer trainable blocks (edgeblock compile --top-k / "
                f"--blocks), a lower --train-res or --weights int4"
                + (", or ask for precompute bank (one frozen graph resident at a time)" if precompute == "online"
                   and self.plan.job_peak_bytes.get("bank", peak) < peak else "")
                + ", or raise --memory-budget")

    @contextlib.contextmanager
    def job(self, precompute: str, should_stop: Callable[[], bool]) -> Iterator[None]:
        """Hold a job's predicted peak while it runs, waiting until it fits (should_stop ends the wait)."""
        if not self.enabled:
            yield
            return
        self.check_job(precompute)
        need = self.plan.job_peak(precompute) - self.plan.runtime_bytes
        with self._cond:
            while self._free() < need:
                if self._evict_cache():
                    continue
                if should_stop():
                    break  # the job itself sees should_stop and ends at once
                self._cond.wait(0.5)
            ticket = self._take(need)
            self._job_running += 1
        try:
            yield
        finally:
            with self._cond:
                self._job_running -= 1
                if not self._resident_running:
                    self.cache_bytes = 0  # a job releases every session when it ends (personalize.run_job)
            self._give_back(ticket)

    # ------------------------------------------------------------------ generations
    def check_generation(self, size: int) -> None:
        if not self.enabled:
            return
        st, res = self.plan.generation(STREAMED, size), self.plan.generation(RESIDENT, size)
        if st["peak_bytes"] > self.budget:
            raise ResourceExhausted(
                f"a {size}px generation's predicted peak is {format_size(st['peak_bytes'])} streamed "
                f"({format_size(res['peak_bytes'])} with every graph resident) but the daemon's memory budget is "
                f"{format_size(self.budget)} (--memory-budget): generate at a smaller size"
                f"{self.hints.get('sizes', '')}, recompile the bundle with --weights int4 (or int8) or a smaller "
                f"--max-group-mb, or raise --memory-budget")

    @contextlib.contextmanager
    def generation(self, size: int, deadline: float | None) -> Iterator[str]:
        """Hold a generation's predicted memory while it runs; yields the mode it runs in (resident when that
        fits beside what runs, else resident with its guidance rows one after the other (RESIDENT_ROWS) when that
        does, else streamed). Waits until one fits, up to the deadline."""
        if not self.enabled:
            yield RESIDENT
            return
        self.check_generation(size)
        res, st = self.plan.generation(RESIDENT, size), self.plan.generation(STREAMED, size)
        runtime = self.plan.runtime_bytes
        act = res["peak_bytes"] - runtime - res["weights_bytes"]
        act_rows = self.plan.resident_rows_peak(size) - runtime - res["weights_bytes"]
        until = deadline if deadline is not None else time.time() + WAIT_S
        with self._cond:
            while True:
                free = self._free()
                more_cache = max(0, res["weights_bytes"] - self.cache_bytes)
                if free >= min(act, act_rows) + more_cache:
                    mode, held = (RESIDENT, act) if free >= act + more_cache else (RESIDENT_ROWS, act_rows)
                    ticket = self._take(held)
                    self.cache_bytes += more_cache
                    self._resident_running += 1
                    break
                if free >= st["peak_bytes"] - runtime:
                    mode, ticket = STREAMED, self._take(st["peak_bytes"] - runtime)
                    break
                if self._evict_cache():
                    continue
                left = until - time.time()
                if left <= 0:
                    raise ResourceExhausted(
                        f"no memory for a {size}px generation now: {format_size(self.budget - free)} of the "
                        f"{format_size(self.budget)} budget is held by running operations (retry later)",
                        retry_after_s=MEMORY_RETRY_S)
                self._cond.wait(min(0.5, left))
        try:
            yield mode
        finally:
            with self._cond:
                if mode != STREAMED:
                    self._resident_running -= 1
            self._give_back(ticket)

    def summary(self, precompute: str, size: int) -> dict:
        """What GetInfo reports (and the daemon logs at start): the budget, what is held, and the predicted job (of
        `precompute`) and resident / resident_rows / streamed generation (at `size`) peaks; no predictions without a
        plan."""
        out = {"budget_bytes": self.budget or 0, "in_use_bytes": self.in_use_bytes(), "enabled": self.enabled}
        if self.plan is not None:
            out.update(planner_target=self.plan.planner_target, job_peak_bytes=self.plan.job_peak(precompute),
                       generate_resident_bytes=self.plan.generation(RESIDENT, size)["peak_bytes"],
                       generate_streamed_bytes=self.plan.generation(STREAMED, size)["peak_bytes"],
                       generate_resident_rows_bytes=self.plan.resident_rows_peak(size))
        return out
