"""Compile's verification of a bundle against torch: each inference graph, the whole ORT chain at both
shapes, one ORT training step and ten AdamW steps (through the device's own trainer), and the chain with
the ORT-trained LoRA. Any failure raises, so no bundle is written.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .context import CURVE_BOUND, REL_BOUND, CompileContext


def _torch_graph_io(adapter, specs, x):
    """Per graph: torch's input feeds and expected outputs (zero LoRA == the frozen blocks)."""
    import torch

    from . import onnx_export as ox

    out = []
    with torch.no_grad():
        state, ctx = adapter.prologue(x)
        layout = ox.CtxLayout.of(ctx)
        ctx_named = layout.tensors(ctx)
        pro_expected = {**ox.flatten_state(state), **ctx_named}
        out.append((ox.prologue_inputs(x), {k: v for k, v in pro_expected.items() if k != ox.HW}))
        for spec in specs[1:-1]:
            feeds = {**ox.flatten_state(state), **ctx_named}
            feeds.update({n: np.zeros(d["shape"], np.float32) for n, d in spec.lora.items()})
            for i in spec.blocks:
                state = adapter.run_block(adapter.build_block(i), i, state, ctx)
            out.append((feeds, ox.flatten_state(state, "out")))
        pred = adapter.epilogue(state, ctx)
        out.append(({**ox.flatten_state(state), **ctx_named}, {"prediction": pred}))
    return out, pred


def verify_bundle(ctx: CompileContext) -> dict:
    """Run every check; the results by check (`ok` true), or RuntimeError naming each failure."""
    bound = REL_BOUND.get(ctx.opts.precision, REL_BOUND["fp32"])  # the ONNX graphs are fp32 whatever the engine precision
    failures: list[str] = []
    result: dict[str, Any] = {"bound_rel": bound, "graphs": {}, "chain": {}}
    pred_gen = _verify_graphs(ctx, bound, result, failures)
    _verify_chain(ctx, pred_gen, bound, result, failures)
    trained = _verify_training(ctx, bound, result, failures)
    _verify_lora_chain(ctx, trained, pred_gen, bound, result, failures)
    result["ok"] = not failures
    if failures:
        raise RuntimeError("verification failed (no bundle written): " + "; ".join(failures))
    return result


def _verify_graphs(ctx: CompileContext, bound: float, result: dict, failures: list[str]):
    """Each graph on torch's inputs (generation shape); returns torch's prediction."""
    from . import onnx_export as ox

    io, pred_gen = _torch_graph_io(ctx.adapter, ctx.specs, ctx.x_gen)
    for spec, (feeds, expected) in zip(ctx.specs, io):
        sess = ctx.sessions.get(spec.path) or ctx.sessions.setdefault(spec.path, ox.session(spec.path))
        got = ox.run_onnx(sess, feeds)
        r = ox.compare(got, {k: v for k, v in expected.items() if k in got})
        name = ctx.rel[spec.path]
        result["graphs"][name] = {"max_abs": r.max_abs, "max_rel": r.max_rel}
        ctx.say(f"[compile]   {name:<28} max abs {r.max_abs:.2e}  rel {r.max_rel:.2e}")
        if not r.ok(bound):
            failures.append(f"{name}: rel {r.max_rel:.2e} > {bound:.0e}")
    return pred_gen


def _verify_chain(ctx: CompileContext, pred_gen, bound: float, result: dict, failures: list[str]) -> None:
    """The whole chain vs the torch prediction at both shapes."""
    import torch

    from . import onnx_export as ox

    for name, x, ref in (("generation", ctx.x_gen, pred_gen), ("training", ctx.x_tr, None)):
        if ref is None:
            with torch.no_grad():
                _, ref = _torch_graph_io(ctx.adapter, ctx.specs, x)
        zero = {n: np.zeros(d["shape"], np.float32) for s in ctx.specs for n, d in s.lora.items()}
        acc = ox.run_chain(ctx.specs, {**ox.prologue_inputs(x), **zero}, ctx.sessions)
        r = ox.compare({"prediction": acc["prediction"]}, {"prediction": ref})
        result["chain"][name] = {"shape": list(ref.shape), "max_abs": r.max_abs, "max_rel": r.max_rel}
        ctx.say(f"[compile]   chain at {name} shape {tuple(ref.shape)}: max abs {r.max_abs:.2e}  rel {r.max_rel:.2e}")
        if not r.ok(bound):
            failures.append(f"chain at {name} shape: rel {r.max_rel:.2e} > {bound:.0e}")


def _verify_training(ctx: CompileContext, bound: float, result: dict, failures: list[str]):
    """One ORT training step vs torch from the same (random, non-zero) LoRA initialisation, then ten
    AdamW steps of both; returns (the torch model, the device trainer) for the LoRA chain check."""
    import torch

    from ..method.blockskip import BlockSkipModel
    from ..method.lora import randomize_lora
    from . import ort_training as ot

    tspec, pre = ctx.tspec, ctx.pre
    net = BlockSkipModel(ctx.adapter, ctx.plan, ctx.lora)
    randomize_lora(net, seed=3, scale=0.1)
    trainer = ot.OrtTrainer(tspec.artifact_dir)
    params = {ot._published(ctx.adapter, n): p for n, p in net.lora_parameters().items()}
    trainer.set_lora_weights({n: p.detach().numpy() for n, p in params.items()})
    feeds = tspec.feeds(pre)
    loss_o, grads_o = trainer.loss_and_grads(feeds)
    net.zero_grad()
    loss_t = torch.nn.functional.mse_loss(net(pre), pre.target)
    loss_t.backward()
    loss_rel = abs(loss_o - loss_t.item()) / max(abs(loss_t.item()), 1e-30)
    grad_rel = 0.0
    for n in tspec.requires_grad:
        ref = params[n].grad.detach().numpy()
        grad_rel = max(grad_rel, float(np.abs(grads_o[n] - ref).max() / max(np.abs(ref).max(), 1e-30)))
    cfg = ot.AdamWConfig(**{k: v for k, v in tspec.optimizer.items() if k in ("lr", "eps", "weight_decay")},
                         betas=tuple(tspec.optimizer.get("betas", (0.9, 0.999))))
    opt = cfg.torch([params[n] for n in tspec.requires_grad])
    curve_t, curve_o = ot.paired_curves(net, pre, trainer, feeds, opt)
    curve_rel = float(np.max(np.abs(np.array(curve_o) - np.array(curve_t)) / np.abs(np.array(curve_t))))
    result["training"] = {"loss_torch": loss_t.item(), "loss_ort": loss_o, "loss_rel": loss_rel, "grad_max_rel": grad_rel,
                          "curve_torch": curve_t, "curve_ort": curve_o, "curve_max_rel": curve_rel,
                          "trainable_tensors": len(tspec.requires_grad)}
    ctx.say(f"[compile]   training step: loss rel {loss_rel:.2e}  LoRA grad rel {grad_rel:.2e} "
            f"({len(tspec.requires_grad)} tensors); 10 AdamW steps: curve rel {curve_rel:.2e}")
    if loss_rel > bound or grad_rel > bound:
        failures.append(f"training step: loss rel {loss_rel:.2e}, grad rel {grad_rel:.2e} > {bound:.0e}")
    if curve_rel > CURVE_BOUND:
        failures.append(f"ten training steps: loss curves differ by {curve_rel:.2%} > {CURVE_BOUND:.0%}")
    return net, trainer


def _verify_lora_chain(ctx: CompileContext, trained, pred_gen, bound: float, result: dict, failures: list[str]) -> None:
    """The chain with a non-zero adapter (the ORT-trained LoRA) vs torch with the same LoRA, generation shape."""
    import torch

    from . import onnx_export as ox
    from . import ort_training as ot

    net, trainer = trained
    adapter, plan = ctx.adapter, ctx.plan
    weights = trainer.lora_weights()
    ot.load_lora_into(net, adapter, weights)
    with torch.no_grad():
        state, c = adapter.prologue(ctx.x_gen)
        for i in range(adapter.num_blocks):
            block = net.blocks[str(i)] if i in plan.trainable else adapter.build_block(i)
            state = adapter.run_block(block, i, state, c)
        ref = adapter.epilogue(state, c)
    acc = ox.run_chain(ctx.specs, {**ox.prologue_inputs(ctx.x_gen), **weights}, ctx.sessions)
    r = ox.compare({"prediction": acc["prediction"]}, {"prediction": ref})
    change = ox.compare({"prediction": ref}, {"prediction": pred_gen}).max_rel
    result["chain"]["generation_lora"] = {"shape": list(ref.shape), "max_abs": r.max_abs, "max_rel": r.max_rel,
                                          "change_vs_base_rel": change}
    ctx.say(f"[compile]   chain with the ORT-trained LoRA: max abs {r.max_abs:.2e}  rel {r.max_rel:.2e} "
            f"(the LoRA changes the prediction by {change:.2e} rel)")
    if not r.ok(bound):
        failures.append(f"chain with LoRA: rel {r.max_rel:.2e} > {bound:.0e}")
