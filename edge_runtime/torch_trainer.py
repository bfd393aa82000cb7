"""On-device LoRA training on PyTorch, for devices without ONNX Runtime training (same interface as OrtTrainer).

JetPack ships PyTorch wheels but no onnxruntime-training build. This backend trains from the same
bundle artifacts (trainable/, see the compiler's ort_training.py) without ONNX Runtime:

- the forward + loss graph is `eval_model.onnx` (the training graph without its gradient nodes),
  read with the `onnx` package and run by an ONNX -> torch interpreter (onnx_interp.Interpreter,
  with torch_ops.ops(): op type -> torch function, per the ONNX spec at the graph's opset);
- the parameter values are `params.safetensors` (every parameter the graph takes as an input, by
  that name, float32; ORT's checkpoint format is not readable without ONNX Runtime);
- the spec's `requires_grad` tensors are torch leaves; autograd gives their gradients and
  `torch.optim.AdamW` with the spec's optimizer settings updates them (the ORT optimizer model is
  torch's AdamW, adam_mode 0).

Checkpoints are `torch.save` files (LoRA tensors, AdamW state, step count), not ORT checkpoints;
one backend cannot resume the other's. torch and onnx are imported lazily: importing edge_runtime
never pulls them in. Never imports onnxruntime, transformers or diffusers.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import safetensors.numpy

from .faults import crash_point
from .fileio import write_atomically
from .onnx_interp import Interpreter, OnnxFormatError, OnnxGraph, UnsupportedOp
from .training_spec import TrainingError, TrainingSpec, load_spec
from .torch_layout_ops import load_torch
from .torch_ops import ops

CHECKPOINT_FORMAT = "edgeblock-torch-trainer/1"
DEFAULT_FILES = {"eval": "eval_model.onnx", "training": "training_model.onnx", "params": "params.safetensors"}


class TorchTrainer:
    """One LoRA training session over the artifacts on PyTorch: the interface of OrtTrainer.

    checkpoint: a checkpoint written by save_checkpoint to start from (default: the artifacts'
    initial parameters); one saved with include_optimizer_state=True resumes AdamW's moments and
    step count as well. threads: torch intra-op threads during this trainer's calls (restored
    after each). device: a torch device ("cpu" by default; "cuda" on a Jetson's GPU).
    """

    def __init__(self, artifact_dir: str, lr: float | None = None, checkpoint: str | None = None,
                 threads: int | None = None, *, device: str = "cpu"):
        torch = load_torch()
        self.dir = artifact_dir
        self.spec: TrainingSpec = load_spec(artifact_dir)
        files = {**DEFAULT_FILES, **self.spec.files}
        self.threads = int(threads) if threads else None
        self.device = torch.device(device)
        eval_path = os.path.join(artifact_dir, files["eval"])
        params_path = os.path.join(artifact_dir, files["params"])
        if not os.path.exists(eval_path):
            raise TrainingError(f"training artifact {files['eval']} is missing from {artifact_dir}")
        if not os.path.exists(params_path):
            raise TrainingError(
                f"{files['params']} is missing from {artifact_dir}: the torch trainer needs the parameter values "
                "(bundles compiled before it existed lack it: recompile the bundle)")
        self.inputs: list[str] = list(self.spec.inputs)
        self.shapes = {k: tuple(v) for k, v in self.spec.input_shapes.items()}
        self.lr = float(self.spec.learning_rate if lr is None else lr)

        with self._threads():
            self.graph = OnnxGraph.load(eval_path)
            self._interp = Interpreter(self.graph, self.device)
            self._loss_name = "loss" if "loss" in self.graph.outputs else self.graph.outputs[0]
            try:
                values = safetensors.numpy.load_file(params_path)
            except Exception as e:  # safetensors raises its own error type for a corrupt file
                raise TrainingError(f"{params_path} is not a readable safetensors file ({e}): recompile the bundle") from e
            user = set(self.inputs)
            needed = [n for n in self.graph.inputs if n not in user and n not in self.graph.initializers]
            missing = [n for n in needed if n not in values]
            if missing:
                raise TrainingError(f"{files['params']} lacks parameters the eval graph takes: {missing[:5]}")
            trainable = list(self.spec.requires_grad)
            absent = [n for n in trainable if n not in values]
            if absent:
                raise TrainingError(f"{files['params']} lacks trainable parameters {absent[:5]}")
            self._params = {n: torch.from_numpy(np.array(v, dtype=np.float32 if v.dtype.kind == "f" else v.dtype))
                            .to(self.device) for n, v in values.items()}
            del values
            for n in trainable:
                self._params[n].requires_grad_(True)
            self._trainable = trainable
            opt = self.spec.optimizer or {}
            kind = str(opt.get("type", "AdamW"))
            if kind != "AdamW" or int(opt.get("adam_mode", 0)) != 0:
                raise TrainingError(f"optimizer {kind} (adam_mode {opt.get('adam_mode')}) is not torch's AdamW")
            betas = tuple(float(b) for b in opt.get("betas", (0.9, 0.999)))
            self._optimizer = torch.optim.AdamW(
                [self._params[n] for n in trainable], lr=self.lr, betas=betas, eps=float(opt.get("eps", 1e-8)),
                weight_decay=float(opt.get("weight_decay", 1e-2)))
            self.step_count = 0
            self.resumed_step: int | None = None  # the job step the checkpoint was saved at (as OrtTrainer's)
            if checkpoint:
                self._load_checkpoint(os.fspath(checkpoint))
            self.set_learning_rate(self.lr)

    # ------------------------------------------------------------------ helpers
    @contextlib.contextmanager
    def _threads(self):
        if not self.threads:
            yield
            return
        torch = load_torch()
        old = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(old)

    def _feeds(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        torch = load_torch()
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise TrainingError(f"training feeds lack {missing}")
        out = {}
        for n in self.inputs:
            a = np.ascontiguousarray(feeds[n], dtype=np.float32)
            if a.shape != self.shapes[n]:
                raise TrainingError(f"training input {n}: shape {a.shape}, the artifacts take {self.shapes[n]}")
            out[n] = torch.from_numpy(a).to(self.device)
        return out

    def _loss(self, feeds: Mapping[str, Any]):
        env = dict(self._params)
        env.update(self._feeds(feeds))
        return self._interp.run(env, [self._loss_name])[self._loss_name].reshape(())

    def _backward(self, feeds: Mapping[str, Any]) -> float:
        torch = load_torch()
        self._optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = self._loss(feeds)
            loss.backward()
        return float(loss.detach().cpu())

    # ------------------------------------------------------------------ steps
    def step(self, feeds: Mapping[str, Any]) -> float:
        """Forward, backward, AdamW update; the loss before the update."""
        with self._threads():
            loss = self._backward(feeds)
            self._optimizer.step()
            self._optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        return loss

    def step_draws(self, draws: Iterable[Mapping[str, Any]]) -> float:
        """One AdamW update from the summed gradients of several draws, fed one at a time (as OrtTrainer's:
        autograd accumulates into .grad until it is zeroed); the mean loss before the update."""
        torch = load_torch()
        losses = []
        with self._threads():
            self._optimizer.zero_grad(set_to_none=True)
            for feeds in draws:
                with torch.enable_grad():
                    loss = self._loss(feeds)
                    loss.backward()
                losses.append(float(loss.detach().cpu()))
            if not losses:
                raise TrainingError("a training step needs at least one draw")
            crash_point("train.backward")  # test hook (edge_runtime.faults): gradients summed, weights not yet updated
            self._optimizer.step()
            self._optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        return float(np.mean(losses))

    def loss_and_grads(self, feeds: Mapping[str, Any]) -> tuple[float, dict[str, np.ndarray]]:
        """Forward + backward without an update: the loss and each trainable LoRA tensor's gradient."""
        with self._threads():
            loss = self._backward(feeds)
            grads = {}
            for n in self._trainable:
                g = self._params[n].grad
                grads[n] = None if g is None else g.detach().cpu().numpy().copy()
            self._optimizer.zero_grad(set_to_none=True)
        return loss, grads

    def eval_loss(self, feeds: Mapping[str, Any]) -> float:
        torch = load_torch()
        with self._threads(), torch.no_grad():
            return float(self._loss(feeds).cpu())

    def set_learning_rate(self, lr: float) -> None:
        self.lr = float(lr)
        for g in self._optimizer.param_groups:
            g["lr"] = self.lr

    # ------------------------------------------------------------------ weights
    def lora_weights(self) -> dict[str, np.ndarray]:
        """Every LoRA tensor by published name (unreachable ones as initialised)."""
        return {n: self._params[n].detach().cpu().numpy().copy() for n in self.spec.lora if n in self._params}

    def set_lora_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        torch = load_torch()
        for n, v in weights.items():
            if n not in self._params:
                raise TrainingError(f"{n} is not a parameter of these training artifacts")
            p = self._params[n]
            a = np.ascontiguousarray(v, np.float32)
            if tuple(a.shape) != tuple(p.shape):
                raise TrainingError(f"{n}: shape {a.shape}, the parameter has {tuple(p.shape)}")
            with torch.no_grad():
                p.copy_(torch.from_numpy(a))

    def _saved_names(self) -> list[str]:
        """What a checkpoint holds: the trainable tensors and every LoRA tensor (the frozen base
        weights are the artifacts' own, in params.safetensors)."""
        return list(dict.fromkeys([*self._trainable, *(n for n in self.spec.lora if n in self._params)]))

    def save_checkpoint(self, path: str, include_optimizer_state: bool = True, step: int | None = None) -> None:
        """Write the training state to `path` atomically (tmp file + rename); step: the job step it is saved at,
        recorded in the checkpoint (resumed_step when it is loaded)."""
        torch = load_torch()
        state = {
            "format": CHECKPOINT_FORMAT,
            "requires_grad": list(self._trainable),
            "params": {n: self._params[n].detach().cpu().clone() for n in self._saved_names()},
            "step": int(self.step_count),
            "lr": float(self.lr),
            "optimizer": self._optimizer.state_dict() if include_optimizer_state else None,
            "job_step": None if step is None else int(step),
        }

        def write(tmp: str) -> None:
            torch.save(state, tmp)
            crash_point("checkpoint.written")  # test hook: the temporary checkpoint written, not yet committed

        write_atomically(path, write)

    def _load_checkpoint(self, path: str) -> None:
        torch = load_torch()
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError as e:
            raise TrainingError(f"checkpoint {path} does not exist") from e
        except Exception as e:
            raise TrainingError(f"{path} is not a torch trainer checkpoint ({type(e).__name__}: {e}); an ONNX Runtime "
                                "checkpoint resumes only with the ort backend") from e
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise TrainingError(f"{path} is not a torch trainer checkpoint ({CHECKPOINT_FORMAT})")
        if list(state.get("requires_grad", [])) != self._trainable:
            raise TrainingError(f"checkpoint {path} was written for other training artifacts (trainable tensors differ)")
        self.set_lora_weights({n: t.numpy() for n, t in state["params"].items()})
        if state.get("optimizer") is not None:
            self._optimizer.load_state_dict(state["optimizer"])
            for st in self._optimizer.state.values():  # state tensors follow their parameters' device
                for k, v in list(st.items()):
                    if torch.is_tensor(v) and k != "step":
                        st[k] = v.to(self.device)
        self.step_count = int(state.get("step", 0))
        self.resumed_step = None if state.get("job_step") is None else int(state["job_step"])


# The interpreter's names are re-exported: callers (and tests) reach the backend through this module.
__all__ = ["Interpreter", "OnnxFormatError", "OnnxGraph", "TorchTrainer", "TrainingError", "UnsupportedOp", "ops"]
