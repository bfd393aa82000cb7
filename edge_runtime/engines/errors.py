"""The one error of the TensorRT engines package: a plan, engine or build that cannot be used.

A ValueError, so the CLI reports it as a user error (exit 2) with the message as it is.
"""

from __future__ import annotations


class EngineError(ValueError):
    """A plan, engine or build that cannot be used: the message says which file and why."""
