"""Keep host frameworks out of a device process.

The device image has no torch, transformers or diffusers. On a development machine they are
installed beside the runtime, and onnxruntime's optional `onnxruntime.tools` helper imports torch
whenever `importlib.util.find_spec("torch")` finds it. A device process (the daemon, the ORT
benchmark child) calls `block_host_frameworks()` first: each name maps to None in sys.modules, so
find_spec reports it absent and any `import torch` raises ImportError at once, which makes a
hidden dependency of the runtime fail loudly here instead of on the board.
"""

from __future__ import annotations

import sys

HOST_FRAMEWORKS = ("torch", "transformers", "diffusers", "peft")


def block_host_frameworks(names: tuple[str, ...] = HOST_FRAMEWORKS, strict: bool = True) -> list[str]:
    """Block `names`; returns those already imported (strict: raise instead, as a device process must)."""
    loaded = [n for n in names if sys.modules.get(n) is not None]
    if loaded and strict:
        raise RuntimeError(f"{', '.join(loaded)} already imported in this process; block before importing them")
    for n in names:
        if n not in loaded:
            sys.modules[n] = None  # type: ignore[assignment]
    return loaded


def host_frameworks_loaded(names: tuple[str, ...] = HOST_FRAMEWORKS) -> list[str]:
    """Names in `names` actually imported in this process (a blocked name is not)."""
    return [n for n in names if sys.modules.get(n) is not None]
