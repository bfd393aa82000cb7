"""ONNX Runtime training artifacts for the block-skip training graph, and their check against torch.

The training graph is the torch BlockSkipModel step at the fixed training shape:
trainable blocks (LoRA) + residual adds + epilogue + MSE loss against `target`,
exported with TrainingMode.TRAINING, constant folding off, opset 15 (LayerNorm
then exports as basic ops: ORT's gradient builder fails on a one-output
LayerNormalization; the tanh GELU is one com.microsoft FastGelu, train_graph.py).
`generate_artifacts` then adds the gradient graph with only
the LoRA parameters the loss can reach trainable, and an AdamW optimizer model
that is torch.optim.AdamW (ORT's AdamWOptimizer in adam_mode 0; the stock block
is the Hugging Face variant, adam_mode 1, eps 1e-6, no weight decay).

Graph inputs (by name, edge_runtime/graph_names.py): `state.<slot>` (the
state entering the first trainable block), the `ctx.*` tensors the graph reads,
`gap_<s>_<e>.<slot>` (summed residuals, segment order), `target`. Output: `loss`.
Trainable parameters carry the published LoRA names
(`transformer_blocks.3.attn.to_q.lora_A.weight`), as in trainable/infer.onnx.
training_spec.json is edge_runtime/training_spec.py's TrainingSpec; the artifacts run here through
the device's own trainer (edge_runtime.ort_trainer.OrtTrainer, re-exported as OrtTrainer).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from edge_runtime import graph_names as gn
from edge_runtime import training_spec as ts

# The host verifies its artifacts with the device's trainer (the ORT training C API, torch-free): one class.
from edge_runtime.ort_trainer import OrtTrainer  # noqa: F401 - part of this module's API
from edge_runtime.training_spec import ARTIFACTS, SPEC_FILE, TRAIN_OPSET  # noqa: F401 - part of this module's API

from ..method.blockskip import BlockSkipModel, Precomputed, SkipPlan
from ..method.lora import LoRASpec
from ..models.base import DiTAdapter
from . import train_graph
from .named_tensors import CtxLayout, flatten_state, gap_prefix
from .onnx_io import EXTERNAL_DATA_THRESHOLD, MAX_IR_VERSION, export_module, save_onnx
from .onnx_run import _np
from .trainable_infer import lora_name


@dataclass(frozen=True)
class AdamWConfig:
    """torch.optim.AdamW's defaults; the ORT optimizer model is built with the same numbers."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2

    def torch(self, params) -> torch.optim.AdamW:
        return torch.optim.AdamW(params, lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay)


def _blocks():
    from onnxruntime.training import onnxblock
    from onnxruntime.training.onnxblock.optim.optim import AdamWOptimizer

    class _TorchAdamWOptimizer(AdamWOptimizer):
        """AdamWOptimizer node in adam_mode 0: PyTorch's AdamW (decay before the update, bias
        correction on m and v), where the stock block writes adam_mode 1 (Hugging Face)."""

        def build(self, learning_rate_name, step_name, parameter_sequence_name, gradient_sequence_name,
                  first_order_moment_sequence_name, second_order_moment_sequence_name):
            from onnxruntime.training.onnxblock import _graph_utils

            return self._build_optimizer_node(
                [learning_rate_name, step_name, parameter_sequence_name, gradient_sequence_name,
                 first_order_moment_sequence_name, second_order_moment_sequence_name],
                _graph_utils.generate_graph_name("adamw.updated_flag"),
                "AdamWOptimizer",
                {
                    "alpha": self._betas[0], "beta": self._betas[1], "epsilon": self._eps,
                    "weight_decay": self._weight_decay, "correct_bias": 1 if self._bias_correction else 0,
                    "adam_mode": 0,
                },
            )

    class TorchAdamW(onnxblock.optim.AdamW):
        def __init__(self, cfg: AdamWConfig):
            super().__init__(betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
            self._adamw = _TorchAdamWOptimizer(betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)

    class OutputLoss(onnxblock.Block):
        """The loss is already an output of the exported graph: pick it by name (the stock
        MSELoss block would take the first graph output, whatever it is)."""

        def __init__(self, name: str = "loss"):
            super().__init__()
            self._name = name

        def build(self, *outputs: str) -> str:
            if self._name not in outputs:
                raise ValueError(f"the training graph has no output {self._name!r} (outputs: {outputs})")
            return self._name

    return TorchAdamW, OutputLoss


class TrainingSpec(ts.TrainingSpec):
    """edge_runtime.training_spec.TrainingSpec (training_spec.json, read by the device) and, on the host,
    the training graph's feeds from a precomputed chunk."""

    def feeds(self, pre: Precomputed) -> dict[str, np.ndarray]:
        """The training graph's inputs from one precomputed chunk."""
        named = training_inputs(pre, self.gaps)
        missing = [n for n in self.inputs if n not in named]
        if missing:
            raise KeyError(f"precomputed chunk lacks {missing}")
        return {n: _np(named[n]).astype(np.float32, copy=False) for n in self.inputs}


def training_inputs(pre: Precomputed, gaps: Sequence[str]) -> dict[str, Tensor]:
    named = flatten_state(pre.entry)
    named.update(CtxLayout.of(pre.ctx).tensors(pre.ctx, with_hw=False))
    for key, r in zip(gaps, pre.residuals):
        named.update(flatten_state(r, key))
    named[gn.TARGET] = pre.target
    return named


def reachable_lora(net: BlockSkipModel, pre: Precomputed, seed: int = 0) -> tuple[list[str], list[str]]:
    """LoRA parameters (BlockSkipModel names) that do / do not influence the loss.

    One autograd step with every LoRA tensor temporarily random (with B = 0 every
    A would get a zero gradient): a parameter is unreachable when its gradient
    is None (no path: e.g. the text-stream output LoRA of a block whose text
    output the loss never reads) or exactly zero everywhere (a path that carries
    nothing: e.g. the text-query LoRA of SD3's context-pre-only last block, whose
    text outputs are dropped after the joint attention). Values are restored.
    """
    params = dict(net.lora_parameters())
    saved = {n: p.detach().clone() for n, p in params.items()}
    g = torch.Generator().manual_seed(seed)
    try:
        with torch.no_grad():
            for n in sorted(params):
                params[n].copy_(torch.randn(params[n].shape, generator=g) * 0.05)
        with torch.enable_grad():
            loss = torch.nn.functional.mse_loss(net(pre), pre.target)
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])
    reach = [n for n, gr in zip(params, grads) if gr is not None and bool(gr.abs().max() > 0)]
    return reach, [n for n in params if n not in reach]


@contextlib.contextmanager
def _quiet_ort(severity: int = 3):
    """generate_artifacts and Module loading log at INFO/WARNING through ORT's default logger."""
    import onnxruntime as ort

    ort.set_default_logger_severity(severity)
    try:
        yield
    finally:
        ort.set_default_logger_severity(2)  # ORT's default (WARNING); there is no getter


def _published(adapter: DiTAdapter, module_name: str) -> str:
    """`3.attn.to_q.lora_A.default.weight` (BlockSkipModel.lora_parameters) -> published LoRA name."""
    i, rest = module_name.split(".", 1)
    return lora_name(adapter, int(i), rest)


def export_training_artifacts(
    adapter: DiTAdapter,
    plan: SkipPlan,
    lora: LoRASpec,
    pre: Precomputed,
    out_dir: str,
    *,
    net: BlockSkipModel | None = None,
    optimizer: AdamWConfig = AdamWConfig(),
    external_threshold: int = EXTERNAL_DATA_THRESHOLD,
    keep_base: bool = False,
) -> TrainingSpec:
    """Export the training graph at the shapes of `pre` and generate the ORT training artifacts in out_dir.

    `net` carries the LoRA initialisation (default: a fresh BlockSkipModel, B = 0);
    its current LoRA values go into the checkpoint. Writes training_model.onnx,
    eval_model.onnx, optimizer_model.onnx, checkpoint, params.safetensors (the
    checkpoint's parameters by graph input name, float32: what the torch trainer
    backend reads) and training_spec.json (plus base_model.onnx, the exported
    forward + loss, with keep_base).
    """
    import shutil
    import tempfile

    base_dir = out_dir if keep_base else tempfile.mkdtemp(prefix="edgeblock-train-")
    try:
        return _export_training(adapter, plan, lora, pre, out_dir, net, optimizer, external_threshold, base_dir)
    finally:
        if not keep_base:
            shutil.rmtree(base_dir, ignore_errors=True)


def _export_training(adapter, plan, lora, pre, out_dir, net, optimizer, external_threshold, base_dir) -> TrainingSpec:
    from onnxruntime.training import artifacts

    net = net or BlockSkipModel(adapter, plan, lora)
    if net.plan != plan:
        raise ValueError(f"net is for plan {net.plan.trainable}, not {plan.trainable}")
    os.makedirs(out_dir, exist_ok=True)
    gaps = [gap_prefix(s.start, s.end) for s in plan.segments() if s.kind == "gap"]
    layout = CtxLayout.of(pre.ctx)
    example = training_inputs(pre, gaps)

    def fn(named: dict[str, Tensor]) -> dict[str, Tensor]:
        state = tuple(None if t is None else named[gn.state_name(slot)] for slot, t in zip(gn.SLOTS, pre.entry))
        rs = [tuple(None if t is None else named[gn.state_name(slot, key)] for slot, t in zip(gn.SLOTS, r))
              for key, r in zip(gaps, pre.residuals)]
        pred = net.run(state, layout.rebuild(named, dynamic=False), rs)
        return {gn.LOSS: torch.nn.functional.mse_loss(pred, named[gn.TARGET])}

    reach, unreach = reachable_lora(net, pre)
    module_names = list(net.lora_parameters())
    rename = {f"parts.net.blocks.{n}": _published(adapter, n) for n in module_names}
    base_path = os.path.join(base_dir, "base_model.onnx")
    was_training = net.training
    try:
        inputs, _, _, external, _ = export_module(
            fn, example, base_path, parts={"net": net, "epilogue": adapter.shell}, opset=TRAIN_OPSET, training=True,
            dynamic=False, rename=rename, external_threshold=external_threshold, adapter=adapter,
        )
    finally:
        net.train(was_training)

    model = onnx.load(base_path)
    published = {n: _published(adapter, n) for n in module_names}
    inits = {t.name for t in model.graph.initializer}
    # LoRA tensors the exporter dropped (no path to the loss) still belong to the adapter, and in
    # generation they may act (e.g. a text-stream LoRA before blocks that training skips): keep them
    # as frozen, unused initializers so that the checkpoint holds every LoRA tensor of the adapter.
    lora_values = net.lora_parameters()
    missing = [n for n in module_names if published[n] not in inits]
    for n in missing:
        model.graph.initializer.append(onnx.numpy_helper.from_array(lora_values[n].detach().numpy().copy(), published[n]))
        inits.add(published[n])
    if missing:
        external = save_onnx(model, base_path, external_threshold)
    requires_grad = [published[n] for n in reach if published[n] in inits]
    lost = [published[n] for n in reach if published[n] not in inits]
    if lost:
        raise RuntimeError(f"LoRA parameters {lost[:5]} reach the loss in torch but are not initializers of the exported graph")
    params = {f"parts.net.{n}" for n, _ in net.named_parameters()} | {f"parts.epilogue.{n}" for n, _ in adapter.shell.named_parameters()}
    params |= set(published.values())
    frozen = [n for n in (t.name for t in model.graph.initializer) if n in params and n not in requires_grad]
    if not requires_grad:
        raise ValueError("no LoRA parameter reaches the loss: nothing to train")

    TorchAdamW, OutputLoss = _blocks()
    with _quiet_ort(), _cwd(base_dir if external else None), _stderr_to_log():
        # With a path (graphs over 2 GB) onnxblock writes temp.onnx(.data) into the cwd: keep it out of out_dir.
        artifacts.generate_artifacts(
            base_path if external else model,
            requires_grad=requires_grad,
            frozen_params=frozen,
            loss=OutputLoss(gn.LOSS),
            optimizer=TorchAdamW(optimizer),
            artifact_directory=out_dir,
        )
    for what in ("training", "eval", "optimizer"):
        p = os.path.join(out_dir, ARTIFACTS[what])
        m = onnx.load(p, load_external_data=False)
        # the torch trainer backend interprets eval_model.onnx with default-domain ops: FastGelu in plain ops
        changed = what == "eval" and train_graph.decompose_fast_gelu(m) > 0
        if m.ir_version > MAX_IR_VERSION:  # ORT 1.19.2 refuses newer IR (FACTS)
            m.ir_version = MAX_IR_VERSION
            changed = True
        if changed:
            onnx.save_model(m, p)

    _write_params(model, os.path.dirname(base_path), [*requires_grad, *frozen], inputs,
                  os.path.join(out_dir, ARTIFACTS["params"]), os.path.join(out_dir, ARTIFACTS["eval"]))

    shapes = {n: list(example[n].shape) for n in inputs}
    lora_desc = {}
    for n, p in net.lora_parameters().items():
        i, rest = n.split(".", 1)
        lora_desc[published[n]] = {"block": int(i), "param": rest, "shape": list(p.shape)}
    spec = TrainingSpec(
        artifact_dir=out_dir, inputs=inputs, input_shapes=shapes, requires_grad=requires_grad, frozen=frozen,
        unreachable=[published[n] for n in unreach], lora=lora_desc, gaps=gaps,
        optimizer={"type": "AdamW", "adam_mode": 0, **asdict(optimizer)},
    )
    spec.save()
    return spec


def _write_params(model: onnx.ModelProto, base_dir: str, names: Sequence[str], inputs: Sequence[str], path: str,
                  eval_path: str) -> None:
    """params.safetensors: the value of every checkpoint parameter (trainable LoRA at its initialisation,
    unreachable LoRA, frozen base weights) by the name the training and eval graphs take it as, float32.

    The eval graph's parameter inputs are checked against it: every graph input that is not a user
    input must be in the file (that is what the torch trainer feeds).
    """
    from safetensors.numpy import save_file

    want = set(names)
    values = {}
    for t in model.graph.initializer:
        if t.name in want:
            a = onnx.numpy_helper.to_array(t, base_dir)  # base_dir: external data of graphs over 2 GB
            values[t.name] = np.ascontiguousarray(a, dtype=np.float32 if a.dtype.kind == "f" else a.dtype)
    missing = [n for n in names if n not in values]
    if missing:
        raise RuntimeError(f"parameters {missing[:5]} are not initializers of the exported training graph")
    graph_params = [i.name for i in onnx.load(eval_path, load_external_data=False).graph.input if i.name not in set(inputs)]
    unknown = [n for n in graph_params if n not in values]
    if unknown:
        raise RuntimeError(f"the eval graph takes parameters {unknown[:5]} that params.safetensors would not hold")
    save_file(values, path)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # save_file creates 0600; the bundle's other files follow the umask


@contextlib.contextmanager
def _stderr_to_log():
    """The gradient-graph builder logs every graph transformer at INFO straight to fd 2, whatever
    the Python-side severity: send fd 2 to a temporary file for the duration; on failure the
    error carries the log's tail."""
    import sys
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        except Exception as e:
            sys.stderr.flush()
            os.dup2(saved, 2)
            log.seek(0)
            tail = log.read()[-4000:].decode(errors="replace")
            raise RuntimeError(f"generate_artifacts failed: {e}\n--- ORT log tail ---\n{tail}") from e
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


@contextlib.contextmanager
def _cwd(path: str | None):
    if path is None:
        yield
        return
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def load_lora_into(net: BlockSkipModel | nn.Module, adapter: DiTAdapter, weights: Mapping[str, Any]) -> None:
    """Copy published-name LoRA weights into a BlockSkipModel."""
    params = dict(net.lora_parameters()) if hasattr(net, "lora_parameters") else {}
    by_pub = {_published(adapter, n): p for n, p in params.items()}
    unknown = [n for n in weights if n not in by_pub]
    if unknown:
        raise KeyError(f"LoRA tensors {unknown[:5]} are not in the model")
    with torch.no_grad():
        for n, v in weights.items():
            by_pub[n].copy_(torch.as_tensor(np.asarray(_np(v))))


def paired_curves(net, pre, trainer: "OrtTrainer", feeds, opt, steps: int = 10) -> tuple[list[float], list[float]]:
    """`steps` optimizer steps of the torch graph and the ORT artifacts side by side: (torch losses, ORT losses)."""
    import torch

    curve_t, curve_o = [], []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(net(pre), pre.target)
        loss.backward()
        opt.step()
        curve_t.append(loss.item())
        curve_o.append(trainer.step(feeds))
    return curve_t, curve_o
