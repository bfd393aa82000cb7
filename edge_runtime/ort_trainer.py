"""On-device LoRA training with the bundle's ONNX Runtime training artifacts (torch-free).

`onnxruntime.training.api` would do this, but in onnxruntime-training 1.19.2 importing that
package pulls in torch (its amp/optim subpackages). The device never imports torch, so this
module drives the same C API (`onnxruntime.capi._pybind_state`: load_checkpoint, Module,
Optimizer, save_checkpoint) directly.

The artifacts (trainable/ in a bundle, see the compiler's ort_training.py): training_model.onnx,
eval_model.onnx, optimizer_model.onnx (AdamW as torch.optim.AdamW), checkpoint (the LoRA
initialisation) and training_spec.json (edge_runtime/training_spec.py: input order and shapes,
trainable LoRA names, ...). The host compiler verifies its artifacts with this same class.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from .faults import crash_point
from .fileio import write_atomically
from .training_spec import SPEC_FILE, TrainingError, TrainingSpec, load_spec

STEP_PROPERTY = "edgeblock.step"  # the checkpoint property save_checkpoint(step=) records

__all__ = ["OrtTrainer", "SPEC_FILE", "TrainingError", "TrainingSpec", "load_spec", "parse_device"]


def _capi():
    try:
        from onnxruntime.capi import _pybind_state as C

        C.load_checkpoint  # noqa: B018 - present only in onnxruntime-training builds
    except (ImportError, AttributeError) as e:
        raise TrainingError(
            "this onnxruntime has no on-device training API (install onnxruntime-training, or on Jetson "
            "build ONNX Runtime with --enable_training_apis); the torch trainer backend can be used instead"
        ) from e
    return C


def parse_device(device: str) -> tuple[str, int]:
    """"cpu" or "cuda[:N]" -> (kind, index); ValueError otherwise."""
    kind, _, idx = str(device).partition(":")
    if kind not in ("cpu", "cuda") or (idx and not idx.isdigit()) or (kind == "cpu" and idx):
        raise ValueError(f"training device must be cpu or cuda[:N], got {device!r}")
    return kind, int(idx or 0)


def _ort_device(C, device: str):
    """The training session's OrtDevice. CUDA needs an onnxruntime-training build with the CUDA provider
    (a Jetson source build, deploy/jetson); written against the 1.19 C API, not run here (no GPU)."""
    kind, index = parse_device(device)
    if kind == "cpu":
        return C.OrtDevice(C.OrtDevice.cpu(), C.OrtDevice.default_memory(), 0)
    if "CUDAExecutionProvider" not in C.get_available_providers():
        raise TrainingError("training device cuda: this onnxruntime has no CUDAExecutionProvider "
                            f"(providers: {', '.join(C.get_available_providers())}); use --train-device cpu")
    return C.OrtDevice(C.OrtDevice.cuda(), C.OrtDevice.default_memory(), index)


class OrtTrainer:
    """One LoRA training session over the artifacts: step(feeds) -> loss, weights in and out, checkpoints.

    checkpoint: a checkpoint to start from (default: the artifacts' initial one); a checkpoint saved
    with include_optimizer_state=True resumes AdamW's moments and step count as well.
    """

    def __init__(self, artifact_dir: str, lr: float | None = None, checkpoint: str | None = None,
                 threads: int | None = None, device: str = "cpu"):
        C = _capi()
        ort_device = _ort_device(C, device)
        self.dir = artifact_dir
        self.spec: TrainingSpec = load_spec(artifact_dir)
        files = self.spec.files

        def path(what: str) -> str:
            p = os.path.join(artifact_dir, files[what])
            if not os.path.exists(p):
                raise TrainingError(f"training artifact {files[what]} is missing from {artifact_dir}")
            return p

        self._state = C.load_checkpoint(os.fspath(checkpoint or path("checkpoint")))
        # the job step a checkpoint was saved at (save_checkpoint's step), None when it records none: what a resumed
        # job starts from, whatever its job.json says (a crash between the two writes leaves them apart)
        self.resumed_step: int | None = (int(self._state.get_property(STEP_PROPERTY))
                                         if checkpoint and self._state.has_property(STEP_PROPERTY) else None)
        opts = C.SessionOptions()
        opts.log_severity_level = 3  # "Removing initializer ... not used" notes of the gradient graph
        # The CPU memory arena and weight pre-packing stay on for training: without the arena the 120M
        # bench step took 1.18-1.23x torch's time (docs/bench.md); the job's peak is not in the steps.
        if threads:
            opts.intra_op_num_threads = int(threads)
        self._module = C.Module(path("training"), self._state, path("eval"), ort_device, opts)
        self._optimizer = C.Optimizer(path("optimizer"), self._state, ort_device, opts)
        self.device = device
        self.lr = float(self.spec.learning_rate if lr is None else lr)
        self._optimizer.set_learning_rate(self.lr)
        self.inputs: list[str] = list(self.spec.inputs)
        self.shapes = {k: tuple(v) for k, v in self.spec.input_shapes.items()}

    # ------------------------------------------------------------------ steps
    def _args(self, feeds: Mapping[str, Any]) -> list[np.ndarray]:
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise TrainingError(f"training feeds lack {missing}")
        out = []
        for n in self.inputs:
            a = np.ascontiguousarray(feeds[n], dtype=np.float32)
            if a.shape != self.shapes[n]:
                raise TrainingError(f"training input {n}: shape {a.shape}, the artifacts take {self.shapes[n]}")
            out.append(a)
        return out

    def _run(self, feeds: Mapping[str, Any], train: bool) -> float:
        C = _capi()
        fetches = C.OrtValueVector()
        if train:
            self._module.train_step(self._args(feeds), fetches)
        else:
            self._module.eval_step(self._args(feeds), fetches)
        return float(np.asarray(fetches[0].numpy()).reshape(()))

    def step(self, feeds: Mapping[str, Any]) -> float:
        """Forward, backward, AdamW update; the loss before the update."""
        loss = self._run(feeds, True)
        self._optimizer.optimizer_step()
        self._module.lazy_reset_grad()
        return loss

    def step_draws(self, draws: Iterable[Mapping[str, Any]]) -> float:
        """One AdamW update from the summed gradients of several draws, fed one at a time (the training
        graph accumulates gradients until they are reset), so memory holds one draw's activations; the
        mean loss before the update. AdamW is invariant to the gradient's scale up to eps, so the sum trains
        as the batch mean does."""
        losses = [self._run(feeds, True) for feeds in draws]
        if not losses:
            raise TrainingError("a training step needs at least one draw")
        crash_point("train.backward")  # test hook (edge_runtime.faults): gradients summed, weights not yet updated
        self._optimizer.optimizer_step()
        self._module.lazy_reset_grad()
        return float(np.mean(losses))

    def loss_and_grads(self, feeds: Mapping[str, Any]) -> tuple[float, dict[str, np.ndarray]]:
        """Forward + backward without an update: the loss and each trainable LoRA tensor's gradient."""
        self._module.lazy_reset_grad()
        loss = self._run(feeds, True)
        grads = {}
        for n in self.spec.requires_grad:
            g = self._state.get_parameter(n).grad
            grads[n] = np.array(g.numpy()) if g.has_value() else None
        self._module.lazy_reset_grad()
        return loss, grads

    def eval_loss(self, feeds: Mapping[str, Any]) -> float:
        return self._run(feeds, False)

    def set_learning_rate(self, lr: float) -> None:
        self.lr = float(lr)
        self._optimizer.set_learning_rate(self.lr)

    # ------------------------------------------------------------------ weights
    def lora_weights(self) -> dict[str, np.ndarray]:
        """Every LoRA tensor of the checkpoint by published name (unreachable ones as initialised)."""
        return {n: np.array(self._state.get_parameter(n).data.numpy()) for n in self.spec.lora
                if self._state.has_parameter(n)}

    def set_lora_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        from onnxruntime.capi.onnxruntime_inference_collection import OrtValue

        for n, v in weights.items():
            if not self._state.has_parameter(n):
                raise TrainingError(f"{n} is not a parameter of these training artifacts")
            self._state.copy_parameter_from(n, OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v, np.float32))._ortvalue)

    def save_checkpoint(self, path: str, include_optimizer_state: bool = True, step: int | None = None) -> None:
        """Write the training state to `path` atomically (tmp file + rename); step: the job step it is saved at,
        recorded in the checkpoint (resumed_step when it is loaded)."""
        C = _capi()
        if step is not None:
            self._state.add_property(STEP_PROPERTY, int(step))

        def write(tmp: str) -> None:
            C.save_checkpoint(self._state, os.fspath(tmp), include_optimizer_state)
            crash_point("checkpoint.written")  # test hook: the temporary checkpoint written, not yet committed

        write_atomically(path, write)
