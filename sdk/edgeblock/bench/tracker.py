"""Measure memory: live tensor bytes (a dispatch mode over every aten op) and process RSS high-water.

PyTorch keeps no allocator statistics on the CPU, so the tensor tracker
watches every storage an op creates until it is freed, plus any tensors
registered up front.
"""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from edge_runtime.memstat import reset_rss_peak, rss_bytes, rss_peak_bytes  # noqa: F401 - re-exported


class TensorMemoryTracker(TorchDispatchMode):
    """Peak bytes of live tensor storages while active (weights, activations, gradients, optimizer state)."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def register(self, *tensors: torch.Tensor) -> None:
        for t in tensors:
            self._add(t)
        self._update_peak()

    def _add(self, t: torch.Tensor) -> bool:
        if t.device.type == "meta":
            return False
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return False
        key = st._cdata
        if key in self._live and not self._live[key][0].expired():
            return False
        n = st.nbytes()
        self._live[key] = (StorageWeakRef(st), n)
        self.current += n
        return True

    def _sweep(self) -> None:
        dead = [k for k, (ref, _) in self._live.items() if ref.expired()]
        for k in dead:
            self.current -= self._live.pop(k)[1]

    def _update_peak(self) -> None:
        if self.current > self.peak:
            self._sweep()  # only count what is really alive
            self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        added = False
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                added |= self._add(t)
        if added:
            self._update_peak()
        return out


