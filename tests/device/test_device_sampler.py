"""The device's numpy samplers against the diffusers schedulers they stand in for, and the two
precompute orders of a personalization job on the real built-in bundle."""

from __future__ import annotations


import numpy as np
import pytest

from edge_runtime import sampler


def test_flow_sigmas_match_flow_match_euler_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # sigmas linspace(1, 1/N, N), shifted, then 0: as FluxPipeline passes them (SD3's pipeline lets the
    # scheduler space timesteps itself, which differs slightly: a known gap, docs/daemon.md)
    s = FlowMatchEulerDiscreteScheduler(shift=3.0)
    s.set_timesteps(sigmas=np.linspace(1.0, 1 / 20, 20))
    ours = sampler.flow_sigmas(20, {"shift": 3.0}, image_tokens=256)
    assert np.allclose(ours, s.sigmas.numpy(), atol=1e-6)
    # FLUX: resolution-dependent shift (mu from the image token count), as FluxPipeline computes it
    cfg = {"dynamic_shift": True, "base_shift": 0.5, "max_shift": 1.15, "base_seq_len": 256, "max_seq_len": 4096}
    d = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                        base_image_seq_len=256, max_image_seq_len=4096)
    tokens = 1024
    mu = (1.15 - 0.5) / (4096 - 256) * tokens + (0.5 - (1.15 - 0.5) / (4096 - 256) * 256)
    d.set_timesteps(sigmas=np.linspace(1.0, 1 / 20, 20), mu=mu)
    assert np.allclose(sampler.flow_sigmas(20, cfg, tokens), d.sigmas.numpy(), atol=1e-5)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sd3_scheduler_spacing_matches_set_timesteps(shift):
    """SD3's pipeline calls set_timesteps(n) without sigmas: the scheduler's own spacing."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = FlowMatchEulerDiscreteScheduler(shift=shift)
    s.set_timesteps(28)
    ours = sampler.flow_sigmas(28, {"shift": shift, "spacing": "scheduler", "num_train_timesteps": 1000}, 1024)
    assert np.allclose(ours, s.sigmas.numpy(), atol=1e-6)
    assert not np.allclose(ours, sampler.flow_sigmas(28, {"shift": shift}, 1024), atol=1e-4)  # it differs


def test_ddim_matches_diffusers_ddim_scheduler():
    import torch
    from diffusers import DDIMScheduler

    cfg = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
           "steps_offset": 1, "set_alpha_to_one": False}
    ref = DDIMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                        steps_offset=1, set_alpha_to_one=False, clip_sample=False, timestep_spacing="leading")
    ref.set_timesteps(10)
    assert list(sampler.ddim_timesteps(10, cfg)) == [int(t) for t in ref.timesteps]
    rng = np.random.default_rng(0)
    w = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)

    def eps(x, t):  # a fixed, state-dependent "model"
        return np.tanh(x * w + t[:, None, None, None] / 1000.0).astype(np.float32)

    x0 = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    ours = sampler.sample_ddim(eps, x0, 10, cfg)
    x = torch.from_numpy(x0.copy())
    for t in ref.timesteps:
        e = torch.from_numpy(eps(x.numpy(), np.array([float(t)], np.float32)))
        x = ref.step(e, t, x, eta=0.0).prev_sample
    assert np.abs(ours - x.numpy()).max() <= 1e-5 * np.abs(x.numpy()).max()


@pytest.fixture(scope="module")
def builtin_runtime(builtin_bundle):
    pytest.importorskip("onnxruntime.training")
    from edge_runtime.runtime import Bundle

    return Bundle(builtin_bundle[0], threads=1)


def test_bank_and_online_precompute_train_the_same_adapter(builtin_runtime, tmp_path):
    from daemon_util import subject_pngs

    from edge_runtime.personalize import ImageLimits, JobOptions, decode_images, run_job

    imgs, _ = decode_images(subject_pngs(3), ImageLimits(), builtin_runtime.manifest.gen_res)
    out = {}
    for mode in ("online", "bank"):
        o = JobOptions("sks", "ring", steps=6, learning_rate=3e-3, seed=5, checkpoint_every=0, precompute=mode)
        out[mode] = run_job(builtin_runtime, o, imgs, str(tmp_path / mode))
    a, b = out["online"], out["bank"]
    assert a.losses == b.losses
    assert all(np.array_equal(a.weights[k], b.weights[k]) for k in a.weights)
    assert any(np.abs(v).max() > 0 for k, v in a.weights.items() if "lora_B" in k)  # it trained
    assert not any((tmp_path / "bank" / "bank").glob("*.acc.npz"))  # intermediate states cleaned up


def test_capped_frozen_groups_train_the_same_adapter(builtin_runtime, tmp_path):
    """--max-group-mb splits the gap 3..5 into one group per block: same chain, same training inputs, same adapter."""
    from daemon_util import subject_pngs

    from edge_runtime.personalize import ImageLimits, JobOptions, decode_images, run_job
    from edge_runtime.runtime import Bundle
    from edgeblock.compile import bundle as bd

    out = str(tmp_path / "split")
    bd.compile_bundle(bd.CompileOptions("builtin", out, blocks=(0, 2), lora_rank=4, train_res=32, max_group_mb=0.01),
                      progress=None)  # the builtin_bundle fixture's setting, groups capped
    split = Bundle(out, threads=1)
    chain = split.model["generation_chain"]
    assert [c["blocks"] for c in chain if c["kind"] == "frozen"] == [[1], [3], [4], [5]]
    assert [c["blocks"] for c in builtin_runtime.model["generation_chain"] if c["kind"] == "frozen"] == [[1], [3, 4, 5]]
    assert split.model["verification"]["run"]  # the split chain was verified against torch at compile time
    imgs, _ = decode_images(subject_pngs(3), ImageLimits(), split.manifest.gen_res)
    o = JobOptions("sks", "ring", steps=4, learning_rate=3e-3, seed=5, checkpoint_every=0, precompute="bank")
    a = run_job(builtin_runtime, o, imgs, str(tmp_path / "one"))
    b = run_job(split, o, imgs, str(tmp_path / "four"))
    assert np.allclose(a.losses, b.losses, rtol=1e-4)
    for k in a.weights:
        assert np.abs(a.weights[k] - b.weights[k]).max() <= 1e-4 * max(1e-3, np.abs(a.weights[k]).max()), k


def test_device_generation_equals_the_torch_reference_sampler(builtin_runtime):
    """Same noise: the ONNX chain + numpy sampler gives the torch pipeline's image."""
    import edgeblock.builtin.pipeline as P
    import torch

    from edgeblock.generate import model_meta
    from edgeblock.models import builtin_dir

    prompt = "a large red circle on a blue background, center"
    noise = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    ours = builtin_runtime.generate(prompt, steps=6, guidance=3.0, noise=noise)
    tr, te = P.load_builtin()
    real = torch.randn
    P.torch.randn = lambda *a, **k: torch.from_numpy(noise.copy())
    try:
        ref = P.generate(tr, te, [prompt], steps=6, guidance=3.0, shift=model_meta(builtin_dir())["shift"])[0]
    finally:
        P.torch.randn = real
    assert ours.shape == ref.shape == (64, 64, 3)
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1


def test_device_draws_place_crops_at_their_image_coordinates(builtin_runtime):
    """A FLUX bundle (crop_ids image, the default) feeds each draw's crop_position to the prologue: its rotary
    tables are the torch path's for crop_token_ids of the same box; a grid bundle's are the crop's own grid."""
    import torch
    from daemon_util import subject_pngs

    from edge_runtime.patch_sampling import CropBox, crop_token_ids
    from edge_runtime.personalize import DrawPlan, ImageLimits, decode_images
    from edgeblock.generate import pixel_model_dir
    from edgeblock.models import load_model
    from edgeblock.models.base import DiTInputs

    b = builtin_runtime
    assert b.manifest.patch_schedule["crop_ids"] == "image" and b.token_pixels == 4
    imgs, _ = decode_images(subject_pngs(2), ImageLimits(), b.manifest.gen_res)
    plan = DrawPlan(b, imgs, seed=3)
    d = next(plan.draw(i) for i in range(100) if plan.draw(i).box[2] < b.manifest.gen_res and plan.draw(i).box[0] > 0)
    text = b.encode_prompts(["a sks ring"])
    feeds, _ = plan.prologue_feeds(d, text)
    got = b.run("prologue", feeds)
    adapter = load_model(pixel_model_dir("builtin")).adapter
    ids = crop_token_ids(CropBox(*d.box), plan.train_res, b.token_pixels)
    x = DiTInputs(latents=torch.from_numpy(feeds["latents"]), timestep=torch.from_numpy(feeds["timestep"]),
                  text=torch.from_numpy(feeds["text"]), pooled=torch.from_numpy(feeds["pooled"]))
    with torch.no_grad():
        _, ctx = adapter.prologue(DiTInputs(**{**x.__dict__, "img_ids": torch.from_numpy(ids)}))
        _, grid = adapter.prologue(x)
    for j in (0, 1):
        want = ctx["rotary"][j].numpy()
        assert np.abs(got[f"ctx.rotary.{j}"] - want).max() <= 1e-5 * np.abs(want).max()
    plan.crop_ids = "grid"  # what a bundle compiled with --crop-ids grid (or before it existed) does
    feeds_grid, _ = plan.prologue_feeds(d, text)
    assert "crop" not in feeds_grid
    got_grid = b.run("prologue", feeds_grid)
    assert np.abs(got_grid["ctx.rotary.0"] - grid["rotary"][0].numpy()).max() <= 1e-5
    assert np.abs(got_grid["ctx.rotary.0"] - got["ctx.rotary.0"]).max() > 1e-2


def test_per_image_captions_condition_each_draw_on_its_own_image(builtin_runtime, tmp_path):
    """JobOptions.captions (PersonalizeRequest.captions): draw i is conditioned on the caption of the image it
    crops; the job trains; captions that are not one per image, or do not name the token, are refused."""
    from daemon_util import subject_pngs

    from edge_runtime.personalize import DrawPlan, ImageLimits, JobOptions, PersonalizeError, decode_images, run_job

    b = builtin_runtime
    imgs, _ = decode_images(subject_pngs(2), ImageLimits(), b.manifest.gen_res)
    caps = ["a large sks ring on a blue background, top left", "a small sks ring on a red background, center"]
    o = JobOptions("sks", "ring", steps=4, learning_rate=3e-3, seed=5, checkpoint_every=0, captions=caps)
    text = b.encode_prompts(o.training_prompts(2))
    assert text["text"].shape[0] == 2
    plan = DrawPlan(b, imgs, seed=5)
    seen = set()
    for i in range(12):
        d = plan.draw(i)
        feeds, _ = plan.prologue_feeds(d, text)
        own = b.encode_prompts([caps[d.image]])
        assert all(np.abs(feeds[k] - own[k]).max() <= 1e-5 * np.abs(own[k]).max() for k in own), [np.abs(feeds[k] - own[k]).max() for k in own]
        seen.add(d.image)
    assert seen == {0, 1}
    with_caps = run_job(b, o, imgs, str(tmp_path / "caps"))
    plain = run_job(b, JobOptions("sks", "ring", steps=4, learning_rate=3e-3, seed=5, checkpoint_every=0), imgs,
                    str(tmp_path / "plain"))
    assert np.all(np.isfinite(with_caps.losses)) and with_caps.losses != plain.losses  # other conditioning
    with pytest.raises(PersonalizeError, match="one per image"):
        run_job(b, JobOptions("sks", "ring", 2, 3e-3, 5, 0, captions=caps[:1]), imgs, str(tmp_path / "one"))
    with pytest.raises(PersonalizeError, match="does not name the token"):
        JobOptions("sks", "ring", 2, 3e-3, 5, 0, captions=["a ring", "a sks ring"])


def test_class_images_are_drawn_at_the_prior_share_with_their_class_captions(builtin_runtime, tmp_path):
    """Prior preservation on the device (PersonalizeRequest.class_images): draws come from the class images with
    probability prior_share, each conditioned on its class caption; a job without class images draws as before;
    class captions naming the token, or not one per class image, are refused."""
    from daemon_util import subject_pngs

    from edge_runtime.personalize import DrawPlan, ImageLimits, JobOptions, PersonalizeError, decode_images, run_job

    b = builtin_runtime
    imgs, _ = decode_images(subject_pngs(3), ImageLimits(), b.manifest.gen_res)
    subj, cls = imgs[:2], imgs[2:]
    class_caps = ["a large red ring on a green background, left"]
    o = JobOptions("sks", "ring", steps=4, learning_rate=3e-3, seed=5, checkpoint_every=0, class_captions=class_caps,
                   prior_share=0.3)
    prompts = o.training_prompts(2) * 2 + o.class_prompts(1)
    text = b.encode_prompts(prompts)
    plan = DrawPlan(b, subj + cls, seed=5, prior_from=2, prior_share=0.3)
    draws = [plan.draw(i) for i in range(400)]
    share = np.mean([d.image == 2 for d in draws])
    assert 0.23 < share < 0.37  # 400 draws at 0.3: sd 0.023
    assert {d.image for d in draws} == {0, 1, 2}
    assert [plan.draw(i).image for i in range(20)] == [d.image for d in draws[:20]]  # draw i: (seed, i) only
    d = next(d for d in draws if d.image == 2)
    feeds, _ = plan.prologue_feeds(d, text)
    own = b.encode_prompts(class_caps)
    assert all(np.abs(feeds[k] - own[k]).max() <= 1e-5 * np.abs(own[k]).max() for k in own)
    # without class images the draws are the ones a job always had
    old, new = DrawPlan(b, subj, seed=5), DrawPlan(b, subj, seed=5, prior_from=None, prior_share=0.3)
    assert [old.draw(i).image for i in range(30)] == [new.draw(i).image for i in range(30)]
    with_prior = run_job(b, o, subj, str(tmp_path / "prior"), class_images=cls)
    plain = run_job(b, JobOptions("sks", "ring", 4, 3e-3, 5, 0), subj, str(tmp_path / "plain"))
    assert np.all(np.isfinite(with_prior.losses)) and with_prior.losses != plain.losses
    with pytest.raises(PersonalizeError, match="1 class captions for 2 class images"):
        run_job(b, o, subj, str(tmp_path / "two"), class_images=cls * 2)
    with pytest.raises(PersonalizeError, match="names the token"):
        JobOptions("sks", "ring", 2, 3e-3, 5, 0, class_captions=["a sks ring"])
    with pytest.raises(PersonalizeError, match="prior_share must be in"):
        JobOptions("sks", "ring", 2, 3e-3, 5, 0, prior_share=1.0)


def test_streamed_generation_is_the_resident_image_and_keeps_no_session(builtin_bundle):
    """Streamed: each graph opened once per step for its guidance rows, run one after the other, and released;
    the image is the resident one's (which runs both rows as a batch of 2)."""
    pytest.importorskip("onnxruntime.training")
    from edge_runtime.runtime import Bundle

    streamed, resident = Bundle(builtin_bundle[0], threads=1), Bundle(builtin_bundle[0], threads=1)
    prompt = "a small green square on a white background, top left"
    runs, opened, run_session, open_ = [], [], streamed._run_session, streamed._open
    streamed._run_session = lambda name, sess, acc, lora: runs.append(
        (name, acc["state.image"].shape[0] if "state.image" in acc else None)) or run_session(name, sess, acc, lora)
    streamed._open = lambda name: opened.append(name) or open_(name)
    a = streamed.generate(prompt, seed=3, steps=3, streamed=True)
    assert streamed._sessions == {} and getattr(streamed, "_text", None) is None
    chain = [n for n in opened if n in streamed.chain_names]
    assert chain == streamed.chain_names * 3  # each graph once per sampling step
    assert len(runs) == 2 * len(chain) and all(b in (None, 1) for _, b in runs)  # guidance rows one at a time
    b = resident.generate(prompt, seed=3, steps=3)
    assert set(resident._sessions) == set(resident.chain_names) and resident._text is not None
    assert np.array_equal(a, b)
    # sessions a resident generation left open are used, not reopened or dropped, by a streamed one
    c = resident.generate(prompt, seed=3, steps=3, streamed=True)
    assert np.array_equal(c, b) and set(resident._sessions) == set(resident.chain_names)


def test_resident_rows_generation_is_the_resident_image_one_row_at_a_time(builtin_bundle):
    """rows: the sessions open and kept, each guidance row through the whole chain before the next one starts;
    the image is the batched one's."""
    pytest.importorskip("onnxruntime.training")
    from edge_runtime.runtime import Bundle

    b = Bundle(builtin_bundle[0], threads=1)
    prompt = "a small green square on a white background, top left"
    batched = b.generate(prompt, seed=3, steps=2)
    runs, opened, run_session, open_ = [], [], b._run_session, b._open
    b._run_session = lambda name, sess, acc, lora: runs.append(
        (name, len(acc["latents"]) if "latents" in acc else None)) or run_session(name, sess, acc, lora)
    b._open = lambda name: opened.append(name) or open_(name)
    rows = b.generate(prompt, seed=3, steps=2, rows=True)
    assert opened == [] and set(b._sessions) == set(b.chain_names)  # nothing reopened, nothing released
    chain = b.chain_names
    assert [n for n, _ in runs] == (chain + chain) * 2  # per step: row 0's whole chain, then row 1's
    assert all(n in (None, 1) for _, n in runs)
    assert np.abs(rows.astype(int) - batched).max() <= 1
