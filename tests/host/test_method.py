"""The block-skip method against the full model, on tiny random configs of every family."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from dit_inputs import make_inputs
from edge_runtime.patch_sampling import PatchSchedule
from edgeblock.method.blockskip import BlockSkipModel, SkipPlan, precompute
from edgeblock.method.lora import LoRASpec, randomize_lora
from edgeblock.method.train import Conditioning, MethodConfig, Prior, Trainer
from edgeblock.models import LoadedModel, adapter_from_module, objective_from_scheduler
from edgeblock.models.presets import TINY


def _setup(family):
    preset = TINY[family]
    model = preset.build(seed=1)
    return preset, model, adapter_from_module(model, preset.latent_channels)


def _plans(n):
    return [(0,), (n - 1,), (1, 3), (1, 2), tuple(range(n))]


def test_skip_plan_segments_cover_the_blocks():
    plan = SkipPlan.make(7, [2, 5])
    segs = [(s.kind, s.start, s.end) for s in plan.segments()]
    assert segs == [("block", 2, 2), ("gap", 3, 4), ("block", 5, 5), ("gap", 6, 6)]
    assert plan.skipped == (0, 1, 3, 4, 6)
    assert plan.record_points() == {1, 2, 4, 5, 6}


@pytest.mark.parametrize("blocks,msg", [([], "no trainable block"), ([0, 9], "out of range"), ([-1], "out of range")])
def test_skip_plan_rejects_bad_blocks(blocks, msg):
    with pytest.raises(ValueError, match=msg):
        SkipPlan.make(5, blocks)


def test_zero_lora_skip_graph_equals_full_model(family):
    preset, model, adapter = _setup(family)
    x = make_inputs(preset, batch=2)
    with torch.no_grad():
        ref = adapter.reference_forward(model, x)
    assert ref.abs().mean() > 1e-3  # a non-trivial prediction
    for blocks in _plans(adapter.num_blocks):
        plan = SkipPlan.make(adapter.num_blocks, blocks)
        net = BlockSkipModel(adapter, plan, LoRASpec(rank=2))
        (pre,) = precompute(adapter, plan, [(x, torch.zeros_like(ref))])
        with torch.no_grad():
            out = net(pre)
        err = (out - ref).abs().max().item()
        assert err <= 1e-5, f"{family} blocks {blocks}: max abs error {err}"


def test_nonzero_lora_changes_the_prediction(family):
    preset, model, adapter = _setup(family)
    x = make_inputs(preset, batch=1)
    plan = SkipPlan.make(adapter.num_blocks, (1, 2))
    net = BlockSkipModel(adapter, plan, LoRASpec(rank=2))
    randomize_lora(net, seed=3, scale=0.2)
    (pre,) = precompute(adapter, plan, [(x, torch.zeros(1))])
    with torch.no_grad():
        ref = adapter.reference_forward(model, x)
        out = net(pre)
    assert (out - ref).abs().max().item() > 1e-4


def _loaded(adapter, family):
    return LoadedModel(adapter, objective_from_scheduler(None, family), None, None)


def _images(preset, n=1, seed=0):
    rng = np.random.default_rng(seed)
    s = preset.latent_size
    return rng.standard_normal((n, s, s, preset.latent_channels)).astype(np.float32)


def _cond(preset):
    x = make_inputs(preset, batch=1, seed=7)
    return Conditioning(x.text, x.pooled, x.text_mask)


def test_all_blocks_trainable_at_full_resolution_gives_standard_gradients(family):
    preset, model, adapter = _setup(family)
    loaded, images, cond = _loaded(adapter, family), _images(preset), _cond(preset)
    full = preset.latent_size
    std = Trainer(loaded, MethodConfig("standard_lora", lora=LoRASpec(rank=2), seed=5), cond, images)
    bs = Trainer(
        loaded,
        MethodConfig(
            "blockskip",
            blocks=tuple(range(adapter.num_blocks)),
            lora=LoRASpec(rank=2),
            schedule=PatchSchedule(f_min=1.0, f_max=1.0),
            train_res=full,
            seed=5,
        ),
        cond,
        images,
    )
    randomize_lora(std.net, seed=11)
    randomize_lora(bs.net, seed=11)
    chunk_std, chunk_bs = std.chunk(), bs.chunk()
    assert torch.equal(chunk_std[0].latents, chunk_bs[0].latents)  # f = 1 at full resolution: the same draw
    loss_std = std.train_on(chunk_std)
    loss_bs = bs.train_on(bs.precompute([chunk_bs])[0])
    assert abs(loss_std - loss_bs) <= 1e-6 * max(1.0, abs(loss_std))
    g_std, g_bs = std.net.lora_parameters(), bs.net.lora_parameters()
    assert g_std.keys() == g_bs.keys() and len(g_std) > 0
    nonzero = 0
    for k in g_std:
        a, b = g_std[k].grad, g_bs[k].grad
        assert a is not None and b is not None, k
        scale = a.abs().max()
        if scale == 0:  # unreachable from the loss (e.g. the text query of SD3's last block)
            assert b.abs().max() == 0, k
            continue
        nonzero += 1
        rel = ((a - b).abs().max() / scale).item()
        assert rel <= 1e-5, f"{family} {k}: relative gradient difference {rel}"
    assert nonzero >= 0.8 * len(g_std)  # the comparison is not empty


def test_skipped_blocks_get_no_gradient_and_can_be_deleted(family, monkeypatch):
    preset, model, adapter = _setup(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loaded, images, cond = _loaded(adapter, family), _images(preset, n=2), _cond(preset)
    cfg = MethodConfig("blockskip", blocks=(1, 3), lora=LoRASpec(rank=2), seed=2)
    tr = Trainer(loaded, cfg, cond, images)
    pre = tr.precompute([tr.chunk(), tr.chunk()])
    # After the precompute, no block may be built again and the prologue is released.
    def refuse(i):
        raise AssertionError(f"block {i} built during the training step")

    monkeypatch.setattr(adapter, "build_block", refuse)
    adapter.drop_prologue()
    assert set(tr.net.blocks.keys()) == {"1", "3"}
    losses = [tr.train_on(p) for p in pre]
    assert all(np.isfinite(losses))
    for name, p in tr.net.named_parameters():
        if "lora_" in name:
            assert p.requires_grad
        else:
            assert not p.requires_grad and p.grad is None, name
    # The training step moved LoRA tensors and nothing of the base model.
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in tr.net.lora_parameters().values())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    for i in (1, 3):
        prefix = adapter.block_names[i] + "."
        block_sd = {k: v for k, v in tr.net.blocks[str(i)].state_dict().items() if "lora_" not in k}
        for k, v in block_sd.items():
            assert torch.equal(v, before[prefix + k.replace(".base_layer", "")]), k


def test_patch_variant_trains_on_the_low_resolution():
    preset, model, adapter = _setup("flux")
    loaded, images, cond = _loaded(adapter, "flux"), _images(preset), _cond(preset)
    tr = Trainer(loaded, MethodConfig("blockskip", blocks=(2,), lora=LoRASpec(rank=2), seed=1), cond, images)
    x, target = tr.chunk()
    assert x.latents.shape[-1] == preset.latent_size // 2 and target.shape == x.latents.shape
    first = tr.step()
    assert first["precompute_s"] > 0 and first["step_s"] > 0 and np.isfinite(first["loss"])
    state = tr.lora_state()
    assert all(k.startswith("single_transformer_blocks.0.") for k in state)
    assert any("lora_B.weight" in k for k in state) and not any(".default" in k for k in state)


def test_model_from_config_and_from_saved_directory_agree(tmp_path):
    from edgeblock.models import load_model, model_from_config

    preset = TINY["sd3"]
    model = preset.build(seed=2)
    model.save_pretrained(tmp_path / "transformer", safe_serialization=True)
    loaded = load_model(str(tmp_path))
    assert loaded.adapter.family == "sd3" and loaded.objective.kind == "flow"
    x = make_inputs(preset, batch=1)
    with torch.no_grad():
        ref = loaded.adapter.reference_forward(model, x)
        s, ctx = loaded.adapter.prologue(x)
        for i in range(loaded.adapter.num_blocks):
            s = loaded.adapter.run_block(loaded.adapter.build_block(i), i, s, ctx)
        assert (loaded.adapter.epilogue(s, ctx) - ref).abs().max() <= 1e-5
    fresh = model_from_config(str(tmp_path / "transformer" / "config.json"), preset.latent_channels)
    assert fresh.adapter.num_blocks == loaded.adapter.num_blocks
    assert fresh.adapter.param_count() == sum(p.numel() for p in model.parameters())


def test_half_precision_checkpoint_is_cast_on_load(tmp_path):
    from edgeblock.models import load_model

    preset = TINY["flux"]
    model = preset.build(seed=0)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "transformer", safe_serialization=True)
    loaded = load_model(str(tmp_path), latent_channels=preset.latent_channels)
    block = loaded.adapter.build_block(0)
    assert all(p.dtype == torch.float32 for p in block.parameters())
    x = make_inputs(preset, batch=1)
    with torch.no_grad():
        s, ctx = loaded.adapter.prologue(x)
        s = loaded.adapter.run_block(block, 0, s, ctx)
    assert s[0].dtype == torch.float32 and torch.isfinite(s[0]).all()


def test_per_image_conditioning_gives_each_draw_its_own_images_prompt():
    preset, model, adapter = _setup("flux")
    loaded, images = _loaded(adapter, "flux"), _images(preset, n=3)
    rows = [make_inputs(preset, batch=1, seed=20 + k) for k in range(3)]
    cond = Conditioning(torch.cat([r.text for r in rows]), torch.cat([r.pooled for r in rows]), None)
    tr = Trainer(loaded, MethodConfig("standard_lora", lora=LoRASpec(rank=2), batch=6, seed=2), cond, images)
    seen = []
    draw = tr.draws.draw
    tr.draws.draw = lambda n: (lambda out: (seen.append(out[3]), out)[1])(draw(n))
    x, _ = tr.chunk()
    (index,) = seen
    assert len(set(index)) > 1  # the batch mixes images
    for k, i in enumerate(index):
        assert torch.equal(x.text[k], cond.text[i]) and torch.equal(x.pooled[k], cond.pooled[i])
    assert tr.train_on((x, _)) > 0
    with pytest.raises(ValueError, match="2 rows for 3 images"):
        Trainer(loaded, MethodConfig("standard_lora", lora=LoRASpec(rank=2)), cond.take([0, 1]), images)
    with pytest.raises(ValueError, match="3 rows for a batch of 2"):
        cond.inputs(torch.zeros(2, *images.shape[1:]).permute(0, 3, 1, 2), torch.zeros(2))


def test_prior_preservation_draws_class_images_at_their_share_with_their_own_prompts():
    preset, model, adapter = _setup("flux")
    loaded, images = _loaded(adapter, "flux"), _images(preset, n=3)
    rows = [make_inputs(preset, batch=1, seed=40 + k) for k in range(3)]
    one = Conditioning(rows[0].text, rows[0].pooled, None)  # one prompt for every subject image
    prior = Prior(_images(preset, n=2, seed=9), Conditioning(torch.cat([r.text for r in rows[1:]]),
                                                              torch.cat([r.pooled for r in rows[1:]]), None))
    cfg = MethodConfig("blockskip", blocks=(1,), lora=LoRASpec(rank=2), batch=400, seed=3, prior_share=0.25)
    tr = Trainer(loaded, cfg, one, images, prior=prior)
    seen = []
    draw = tr.draws.draw
    tr.draws.draw = lambda n: (lambda out: (seen.append(out[3]), out)[1])(draw(n))
    x, _ = tr.chunk()
    (index,) = seen
    share = np.mean([i >= 3 for i in index])
    assert 0.18 < share < 0.32  # 400 draws at 0.25: sd 0.022
    assert set(index) == {0, 1, 2, 3, 4}  # every subject and every class image drawn
    for k, i in enumerate(index):  # subject draws take the one prompt, class draws their own image's
        want = one.text[0] if i < 3 else prior.cond.text[i - 3]
        assert torch.equal(x.text[k], want)
    # the crops come from the class images for class draws: a class image's pixels, not a subject's
    tr.draws.sampler = None
    x0, _, _, index, _ = tr.draws.draw(8)
    for k, i in enumerate(index):
        src = images[i] if i < 3 else prior.images[i - 3]
        assert np.allclose(x0[k].numpy(), src.transpose(2, 0, 1))
    bad = Prior(prior.images, Conditioning(rows[1].text, rows[1].pooled, None))
    with pytest.raises(ValueError, match="1 class prompts for 2 class images"):
        Trainer(loaded, cfg, one, images, prior=bad)
    with pytest.raises(ValueError, match="class images of shape"):
        Trainer(loaded, cfg, one, images, prior=Prior(prior.images[:, :-1], prior.cond))
    with pytest.raises(ValueError, match="prior_share must be in"):
        MethodConfig(prior_share=1.0)


def test_crop_token_ids_place_a_crop_at_the_coordinates_it_was_cut_from():
    from edge_runtime import flow
    from edge_runtime.patch_sampling import CropBox, crop_token_ids
    from edgeblock.builtin.train_base import low_res_ids

    assert np.array_equal(crop_token_ids(CropBox(0, 0, 64), 64, 4), flow.image_ids(16, 16))  # no resize: the grid
    assert np.allclose(crop_token_ids(CropBox(0, 0, 64), 32, 4), low_res_ids(32, "scaled"))  # whole image, half res
    ids = crop_token_ids(CropBox(16, 8, 32), 32, 4).reshape(8, 8, 3)  # a native-scale crop: shifted grid
    assert np.array_equal(ids[:, 0, 1], np.arange(4, 12)) and np.array_equal(ids[0, :, 2], np.arange(2, 10))
    ids = crop_token_ids(CropBox(0, 16, 48), 32, 4).reshape(8, 8, 3)  # 48 px -> 32: spacing 1.5
    assert np.allclose(np.diff(ids[0, :, 2]), 1.5) and ids[0, 0, 2] == pytest.approx(16 / 4 + 0.75 - 0.5)
    with pytest.raises(ValueError, match="not divisible"):
        crop_token_ids(CropBox(0, 0, 64), 30, 4)


def test_per_sample_position_ids_equal_running_each_sample_alone():
    from edge_runtime import flow

    preset, model, adapter = _setup("flux")
    x = make_inputs(preset, batch=2, seed=4)
    side = preset.latent_size // adapter.pack
    grid = torch.from_numpy(flow.image_ids(side, side))
    ids = torch.stack([grid * 1.5 + 2.0, grid + 3.0])  # two different placements

    def run(inp):
        state, ctx = adapter.prologue(inp)
        for i in range(adapter.num_blocks):
            state = adapter.run_block(adapter.build_block(i), i, state, ctx)
        return adapter.epilogue(state, ctx)

    with torch.no_grad():
        both = run(replace(x, img_ids=ids))
        for k in range(2):
            one = replace(x, latents=x.latents[k : k + 1], timestep=x.timestep[k : k + 1], text=x.text[k : k + 1],
                          pooled=x.pooled[k : k + 1], img_ids=ids[k])
            assert (run(one)[0] - both[k]).abs().max().item() <= 1e-5
        plain = run(x)
        assert (run(replace(x, img_ids=torch.stack([grid, grid]))) - plain).abs().max().item() <= 1e-5
        assert (both - plain).abs().max().item() > 1e-4  # positions matter
    with pytest.raises(ValueError, match="one set of img_ids"):
        adapter.reference_forward(model, replace(x, img_ids=ids))


def test_trainer_gives_crops_their_image_coordinates():
    from edge_runtime.patch_sampling import crop_token_ids

    preset, model, adapter = _setup("flux")
    loaded, images = _loaded(adapter, "flux"), _images(preset, n=2)
    cfg = MethodConfig("blockskip", blocks=(1,), lora=LoRASpec(rank=2), batch=3, seed=1, crop_ids="image")
    tr = Trainer(loaded, cfg, _cond(preset), images)
    seen = []
    draw = tr.draws.draw
    tr.draws.draw = lambda n: (lambda out: (seen.append(out[4]), out)[1])(draw(n))
    x, target = tr.chunk()
    (boxes,) = seen
    res = preset.latent_size // 2
    want = np.stack([crop_token_ids(b, res, adapter.pack) for b in boxes])
    assert x.img_ids.shape == want.shape and np.array_equal(x.img_ids.numpy(), want)
    assert np.isfinite(tr.train_on(tr.precompute([(x, target)])[0]))
    assert Trainer(loaded, replace(cfg, variant="skip"), _cond(preset), images).chunk()[0].img_ids is None
    sd3 = _setup("sd3")
    with pytest.raises(ValueError, match="needs FLUX's position ids"):
        Trainer(_loaded(sd3[2], "sd3"), cfg, _cond(sd3[0]), _images(sd3[0]))
    with pytest.raises(ValueError, match="crop_ids"):
        MethodConfig("patch", crop_ids="box")


# ---- without residuals (the paper's ablation, `edgeblock eval --ablations` no_residuals) ------------


def _dropped_model(model, adapter, trainable):
    """A copy of the diffusers model holding only the trainable blocks: the skipped ones dropped outright."""
    import copy

    out = copy.deepcopy(model)
    keep: dict[str, list[int]] = {}
    for i in trainable:
        lst, j = adapter.block_names[i].split(".")
        keep.setdefault(lst, []).append(int(j))
    for lst in {n.split(".")[0] for n in adapter.block_names}:
        blocks = getattr(out, lst)
        setattr(out, lst, torch.nn.ModuleList([blocks[j] for j in keep.get(lst, [])]))
    return out


def test_without_residuals_the_forward_runs_only_the_trainable_blocks(family):
    preset, model, adapter = _setup(family)
    x = make_inputs(preset, batch=2)
    n = adapter.num_blocks
    for blocks in [(1, 3), (n - 1,), (0, n - 1)]:
        plan = SkipPlan.make(n, blocks)
        net = BlockSkipModel(adapter, plan, LoRASpec(rank=2))
        with torch.no_grad():
            out = net.forward_dropped(x)
            ref = adapter.reference_forward(_dropped_model(model, adapter, plan.trainable), x)
            (pre,) = precompute(adapter, plan, [(x, torch.zeros_like(ref))])
            with_residuals = net(pre)
        err = (out - ref).abs().max().item()
        assert err <= 1e-5, f"{family} blocks {blocks}: max abs error {err}"
        assert (out - with_residuals).abs().max().item() > 1e-4  # the gaps' residuals are really missing


def test_a_trainer_without_residuals_never_precomputes(monkeypatch):
    from edgeblock.method import train as train_mod

    preset, model, adapter = _setup("flux")
    loaded, images, cond = _loaded(adapter, "flux"), _images(preset), _cond(preset)
    calls = []
    real = train_mod.precompute
    monkeypatch.setattr(train_mod, "precompute", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    cfg = MethodConfig("blockskip", blocks=(1, 3), lora=LoRASpec(rank=2), seed=1, lr=1e-2)
    dropped = Trainer(loaded, replace(cfg, residuals=False), cond, images)
    before = {k: v.detach().clone() for k, v in dropped.net.lora_parameters().items()}
    steps = [dropped.step() for _ in range(2)]
    assert not calls and all(np.isfinite(s["loss"]) and s["precompute_s"] == 0.0 for s in steps)
    assert any(not torch.equal(before[k], p) for k, p in dropped.net.lora_parameters().items())  # it trained
    assert set(dropped.net.blocks) == {"1", "3"}
    Trainer(loaded, cfg, cond, images).step()  # the method (residuals: the default) precomputes every step
    assert len(calls) == 1


def test_residuals_off_needs_a_skip_variant():
    with pytest.raises(ValueError, match="residuals=False"):
        MethodConfig("patch", residuals=False)
    assert MethodConfig("skip", residuals=False).uses_precompute is False and MethodConfig().uses_precompute
