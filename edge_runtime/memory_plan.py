"""What a bundle's operations are predicted to hold in memory, written once for the host and the device
(numpy-free): `edgeblock compile` fills it from the planner (sdk/edgeblock/plan) into manifest.memory, and the
daemon's admission control (`--memory-budget`) reads it to start only what fits.

manifest.memory = {
  "planner_target": "host-cpu" | a Jetson,    # whose runtime costs and factors the figures use
  "measured_on_target": bool,                 # False: the target's runtime costs are estimates
  "weights": "fp32" | "fp16" | "int8" | "int4",
  "runtime_bytes": int,                       # the daemon process before any model tensor
  "job_peak_bytes": {"bank": int, "online": int},          # a personalization job, by precompute mode
  "generate": {"resident": {"<size px>": {"peak_bytes", "weights_bytes", "rows_peak_bytes"}}, "streamed": {...}},
}
A resident figure's rows_peak_bytes (optional: bundles compiled before it have none) is the peak of the same
generation with its classifier-free guidance rows run one after the other through the open graphs (one row's
activations; equal to peak_bytes where generation has one row).
Every figure is the whole daemon process's peak resident bytes (runtime included) with that one operation running.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

RESIDENT, STREAMED = "resident", "streamed"
# how generation holds the graphs: every session open and kept (fast), or each graph loaded for its own run
# (one graph's weights at a time; slower by the loads); the daemon picks per request from its budget
GENERATION_MODES: tuple[str, ...] = (RESIDENT, STREAMED)
# a resident generation whose guidance rows run one after the other through the open graphs: one row's
# activations instead of the pair's, slower per step (each graph runs twice; on this host's CPU +7-19 % fp32,
# +10-49 % int4, docs/bench.md); the daemon picks it when the budget admits it but not the pair (admission.py)
RESIDENT_ROWS = "resident_rows"
ROWS_PEAK = "rows_peak_bytes"
DAEMON_MODES: tuple[str, ...] = (RESIDENT, RESIDENT_ROWS, STREAMED)  # what a daemon's generation runs in


def text_encoder_streamed(desc: Any) -> bool:
    """Whether a bundle's text encoder (its manifest's graphs["text_encoder"]) is streamed in every operation.

    Compiled in parts (`edgeblock compile --text-parts`, the Jetson default: an encoder larger than the largest
    frozen group), each part is loaded for its own run and released after it, in a job's encoding and in every
    generation, resident ones included: their DiT graphs stay open, the encoder's parts do not, so a resident
    generation peaks at its graphs plus the largest part instead of the whole encoder beside them (a new prompt
    reads the parts again; the daemon's prompt cache skips them for a repeated one). A whole encoder stays open
    in a resident generation. The planner (sdk/edgeblock/plan) predicts by the same rule."""
    parts = desc.get("parts") if isinstance(desc, dict) else None
    return isinstance(parts, list) and len(parts) > 1


_UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "m": 2**20, "mib": 2**20, "g": 2**30, "gib": 2**30,
          "t": 2**40, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


class MemoryPlanError(ValueError):
    pass


def parse_size(text: str | int) -> int:
    """Bytes from "6GiB", "800MiB", "1.5G" (K/M/G/T and KiB.. are binary, KB/MB/GB decimal) or a plain number."""
    if isinstance(text, int):
        n = text
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        unit = m.group(2).lower() if m else ""
        if not m or unit not in _UNITS:
            raise MemoryPlanError(f"size {text!r} is not a number with an optional unit (e.g. 6GiB, 800MiB, 1.5G)")
        n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise MemoryPlanError(f"size {text!r} must be positive")
    return n


def format_size(n: int | float) -> str:
    for unit, b in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= b:
            return f"{n / b:.2f} {unit}"
    return f"{int(n)} B"


def equivalent_side(width: int, height: int, multiple: int = 1) -> int:
    """The square side a width x height generation is predicted at: the smallest multiple of `multiple` whose
    square holds as many pixels (the planner prices generation by its token count)."""
    side = math.isqrt(int(width) * int(height) - 1) + 1
    return -(-side // multiple) * multiple


@dataclass(frozen=True)
class MemoryPlan:
    planner_target: str
    measured_on_target: bool
    weights: str
    runtime_bytes: int
    job_peak_bytes: dict[str, int]
    generate: dict[str, dict[int, dict[str, int]]] = field(default_factory=dict)  # mode -> size -> figures

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MemoryPlan:
        try:
            gen = {mode: {int(size): {k: int(v) for k, v in fig.items()} for size, fig in d["generate"][mode].items()}
                   for mode in GENERATION_MODES}
            plan = cls(str(d["planner_target"]), bool(d["measured_on_target"]), str(d["weights"]),
                       int(d["runtime_bytes"]), {k: int(v) for k, v in d["job_peak_bytes"].items()}, gen)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise MemoryPlanError(f"manifest memory: {type(e).__name__}: {e}") from e
        sizes = set(gen[RESIDENT])
        if not sizes or sizes != set(gen[STREAMED]) or not plan.job_peak_bytes:
            raise MemoryPlanError("manifest memory: every size needs a resident and a streamed figure, and jobs one")
        for mode in GENERATION_MODES:
            for size, fig in gen[mode].items():
                if not 0 < fig.get("weights_bytes", 0) <= fig.get("peak_bytes", 0):
                    raise MemoryPlanError(f"manifest memory: generate {mode} {size}: bad figures {fig}")
                if not fig.get("weights_bytes", 0) <= fig.get(ROWS_PEAK, fig["peak_bytes"]) <= fig["peak_bytes"]:
                    raise MemoryPlanError(f"manifest memory: generate {mode} {size}: {ROWS_PEAK} must lie between "
                                          f"weights_bytes and peak_bytes: {fig}")
        return plan

    def to_dict(self) -> dict[str, Any]:
        return {"planner_target": self.planner_target, "measured_on_target": self.measured_on_target,
                "weights": self.weights, "runtime_bytes": self.runtime_bytes,
                "job_peak_bytes": dict(self.job_peak_bytes),
                "generate": {m: {str(s): dict(f) for s, f in sorted(by.items())} for m, by in self.generate.items()}}

    def job_peak(self, precompute: str) -> int:
        if precompute not in self.job_peak_bytes:
            raise MemoryPlanError(f"no job prediction for precompute {precompute!r} ({', '.join(self.job_peak_bytes)})")
        return self.job_peak_bytes[precompute]

    def generation(self, mode: str, size: int) -> dict[str, int]:
        """{"peak_bytes", "weights_bytes"} of one generation at `size` px held `mode` (nearest larger size
        predicted when this one is not)."""
        by = self.generate[mode]
        if size in by:
            return by[size]
        larger = [s for s in by if s >= size]
        return by[min(larger)] if larger else by[max(by)]

    def resident_rows_peak(self, size: int) -> int:
        """The predicted peak of a resident generation at `size` px with its guidance rows one after the other
        (the resident peak itself where the manifest has no such figure)."""
        fig = self.generation(RESIDENT, size)
        return fig.get(ROWS_PEAK, fig["peak_bytes"])

    def mode_peak(self, mode: str, size: int) -> int:
        """The predicted peak of a generation at `size` px the daemon runs in `mode` (GENERATION_MODES or
        RESIDENT_ROWS)."""
        return self.resident_rows_peak(size) if mode == RESIDENT_ROWS else self.generation(mode, size)["peak_bytes"]
