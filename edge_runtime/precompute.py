"""The bank-or-online precompute rule (numpy-free): which order a personalization job runs the frozen pass in.

The daemon applies it to a bundle when a request names no mode, and the planner (`edgeblock plan`) applies
the same rule to predict that job's memory: written here once, for both.
"""

from __future__ import annotations

PRECOMPUTE_MODES = ("bank", "online")
# above this many bytes of float32 transformer weights the frozen pass runs as a bank (one graph resident at a
# time over every draw); below it, online (every graph held, the chain run per step)
BANK_ABOVE_BYTES = 256 * 2**20


def precompute_mode(parameters: int) -> str:
    """The mode for a transformer of `parameters` weights: bank above 256 MiB of float32 weights, else online."""
    return "bank" if int(parameters) * 4 > BANK_ABOVE_BYTES else "online"

