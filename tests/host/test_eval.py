"""The benchmark: shipped subjects, the metrics' behaviour on known images, DreamBench metrics, a quick run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from edgeblock.builtin import world
from edgeblock.eval import metrics
from edgeblock.eval.subjects import SUBJECT_SETS, TOKEN, design, load_subjects, render_subject, subject_set_dir
from PIL import Image


@pytest.fixture(scope="module")
def subjects():
    """Every shipped subject: the benchmark's, then the validation set's."""
    return [s for name in SUBJECT_SETS for s in load_subjects(subject_set_dir(name))]


# ---- subjects ---------------------------------------------------------------------------------------


def test_shipped_subjects_are_novel_designs_with_five_references(subjects):
    assert len(subjects) >= 4
    assert len({s.name for s in subjects}) == len(subjects)
    for s in subjects:
        assert s.noun in world.SHAPES and len(s.colours) == 2  # a world class, never a plain one-colour shape
        assert s.images.shape == (5, 64, 64, 3) and s.images.dtype == np.uint8
        assert len({(r.position, r.background, r.scale) for r in s.references}) == 5


def test_subject_sets_are_disjoint_and_the_benchmark_is_the_default(subjects):
    bench, val = (load_subjects(subject_set_dir(n)) for n in ("benchmark", "validation"))
    assert [s.name for s in load_subjects()] == [s.name for s in bench] and len(bench) >= 4 and len(val) >= 3
    assert not {s.name for s in bench} & {s.name for s in val}
    assert {s.noun for s in val} - {s.noun for s in bench}  # the held-out set has classes the benchmark lacks
    with pytest.raises(ValueError, match="unknown subject set"):
        subject_set_dir("test")


def test_reference_pngs_match_their_renders(subjects):
    for s in subjects:
        for ref, img in zip(s.references, s.images):
            fresh = render_subject(design(s.name), ref.position, ref.background, ref.scale)
            assert np.abs(fresh.astype(int) - img.astype(int)).mean() < 1.0, (s.name, ref.file)


def test_prompts_ask_for_contexts_no_reference_shows(subjects):
    for s in subjects:
        ref_bgs = {r.background for r in s.references}
        ref_pos = {r.position for r in s.references}
        assert len(s.prompts) >= 4
        for p in s.prompts:
            assert p.text.startswith(f"a {TOKEN} {s.noun} on a {p.background} background, ")
            assert p.text.endswith(p.position)
            assert p.background not in ref_bgs and p.background not in s.colours
            assert p.position not in ref_pos


# ---- metrics ----------------------------------------------------------------------------------------


def test_background_and_position_are_read_from_the_references(subjects):
    for s in subjects:
        for ref, img in zip(s.references, s.images):
            assert metrics.background_accuracy(img, ref.background) == 1.0
            assert metrics.position_accuracy(img, ref.position) == 1.0
            wrong = next(p for p in world.POSITIONS if p != ref.position)
            assert metrics.prompt_fidelity(img, ref.background, wrong) == {
                "background_acc": 1.0, "position_acc": 0.0, "prompt_fidelity": 0.5}


def test_metrics_on_world_images_and_blank_images():
    spec = world.Spec("circle", "red", "large", "bottom left", "green")
    img = world.render(spec)
    assert metrics.prompt_fidelity(img, "green", "bottom left")["prompt_fidelity"] == 1.0
    assert metrics.background_accuracy(img, "blue") == 0.0
    d = metrics.describe(img)
    assert metrics.similarity(d, d) == pytest.approx(1.0)
    assert d.colour.argmax() == world.COLOUR_NAMES.index("red")
    blank = np.full((64, 64, 3), 128, np.uint8)
    assert metrics.describe(blank) is None
    assert metrics.subject_fidelity(blank, [d]) == 0.0 and metrics.position_accuracy(blank, "center") == 0.0
    with pytest.raises(ValueError, match="unknown colour"):
        metrics.background_accuracy(img, "teal")
    with pytest.raises(ValueError, match="expected an"):
        metrics.describe(img[..., 0])


def test_a_pattern_spread_over_the_image_is_neither_a_plain_background_nor_an_object(subjects):
    s = next(x for x in subjects if x.name == "striped_heart")
    ref = s.references[0]
    img = s.images[0].copy()
    assert metrics.clutter(img) == 0.0 and metrics.background_accuracy(img, ref.background) == 1.0
    # the design's stripes scattered over the background: the border still reads as the requested colour,
    # but the background is not plain
    stripes = np.zeros(img.shape[:2], bool)
    stripes[8:56:6, 4:60] = True  # thin lines, 8 of them, far from any object
    stripes[:, 28:36] = False
    cluttered = img.copy()
    cluttered[stripes] = world.COLOURS["orange"]
    assert metrics.background_colour(cluttered).tolist() == metrics.background_colour(img).tolist()
    assert metrics.clutter(cluttered) > metrics.CLUTTER_MAX
    assert metrics.background_accuracy(cluttered, ref.background) == 0.0
    # a region far larger than any shape of the world is no subject, whatever its colours
    big = np.full((64, 64, 3), world.COLOURS["red"], np.uint8)
    big[4:60, 4:60] = world.COLOURS["blue"]
    assert metrics.describe(big) is None and metrics.position_accuracy(big, "center") == 0.0
    big[4:60, 4:32] = world.COLOURS["red"]  # 56 x 28: still longer than half the side
    assert metrics.describe(big) is None
    small = np.full((64, 64, 3), world.COLOURS["red"], np.uint8)
    small[20:52, 20:52] = world.COLOURS["blue"]  # exactly half the side: an object
    assert metrics.describe(small) is not None
    # no reference is touched by either rule
    for x in subjects:
        for im in x.images:
            assert metrics.clutter(im) == 0.0 and metrics.describe(im) is not None


def test_subject_fidelity_scores_references_high_and_other_shapes_low(subjects):
    """The metric's calibration, stated: with the shipped subjects, a reference scores about 0.83 against its
    own subject's other references, about 0.05 against other subjects and about 0.10 against plain world
    shapes of the same class in every colour; every reference scores its own subject highest."""
    r = metrics.reference_check(subjects)
    assert r["same_subject"] > 0.75, r
    assert r["cross_subject"] < 0.15, r
    assert r["plain_shapes"] < 0.2, r
    assert r["same_subject"] - max(r["cross_subject"], r["plain_shapes"]) > 0.5, r
    assert r["own_subject_best"] == 1.0, r
    # every subject: same > cross for each pair, and plain shapes of any class stay below the subject itself
    descs = {s.name: [metrics.describe(im) for im in s.images] for s in subjects}
    for s in subjects:
        own = np.mean([metrics.subject_fidelity(im, descs[s.name][:k] + descs[s.name][k + 1:]) for k, im in enumerate(s.images)])
        plain = [metrics.subject_fidelity(im, descs[s.name]) for im in metrics.plain_shapes()]
        assert max(plain) < own, (s.name, own, max(plain))
        for o in subjects:
            if o.name != s.name:
                assert np.mean([metrics.subject_fidelity(im, descs[o.name]) for im in s.images]) < own - 0.4


def test_metrics_are_deterministic(subjects):
    s = subjects[0]
    a = metrics.reference_check(subjects[:2])
    b = metrics.reference_check(subjects[:2])
    assert a == b
    descs = [metrics.describe(im) for im in s.images]
    assert metrics.subject_fidelity(s.images[0], descs) == metrics.subject_fidelity(s.images[0].copy(), descs)


# ---- DreamBench metrics from tiny random local weights ---------------------------------------------


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    path = tmp_path_factory.mktemp("dino")
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                    image_size=32, patch_size=8)
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from pipelines import clip_tokenizer
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    path = tmp_path_factory.mktemp("clip")
    tok = clip_tokenizer()
    cfg = CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 24, "eos_token_id": len(tok) - 1},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return str(path)


def test_dreambench_metrics_from_local_folders(subjects, dino_dir, clip_dir):
    from edgeblock.eval.dreambench import DreamBench, strip_token

    bench = DreamBench(dino_dir, clip_dir)
    refs = subjects[0].images
    out = bench.score(refs[:2], refs[:1], ["a sks star on a green background, top", "a sks star"])
    assert set(out) == {"dino", "clip_i", "clip_t"}
    assert all(v.shape == (2,) and np.all(np.abs(v) <= 1.0 + 1e-5) for v in out.values())
    assert out["dino"][0] == pytest.approx(1.0, abs=1e-5)  # an image against itself
    assert out["clip_i"][0] == pytest.approx(1.0, abs=1e-5)
    again = bench.score(refs[:2], refs[:1], ["a sks star on a green background, top", "a sks star"])
    assert all(np.array_equal(out[k], again[k]) for k in out)
    assert strip_token("a sks star on a green background, top") == "a star on a green background, top"
    assert set(DreamBench(dino_dir, None).score(refs[:1], refs, ["a sks star"])) == {"dino"}


def test_dreambench_refuses_a_folder_without_weights(tmp_path):
    from edgeblock.eval.dreambench import DreamBench

    with pytest.raises(ValueError, match="local transformers model folder"):
        DreamBench(dino=str(tmp_path))


# ---- the run ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eval_model(tmp_path_factory):
    """`builtin` where its weights are committed, else a random model laid out like it (behaviour only)."""
    from pixel_models import builtin_present, tiny_pixel_model

    if builtin_present():
        return "builtin"
    return tiny_pixel_model(tmp_path_factory.mktemp("pixel-model"))


@pytest.mark.slow
def test_quick_eval_writes_the_table_and_grid(tmp_path, eval_model, dino_dir, clip_dir, capsys):
    from edgeblock.cli import main
    from edgeblock.eval.run import ROWS

    out = tmp_path / "eval"
    rc = main(["eval", "--out", str(out), "--model", eval_model, "--quick", "--quiet", "--prior", "5",
               "--dino", dino_dir, "--clip", clip_dir])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert list(res["rows"]) == list(ROWS)
    for name, row in res["rows"].items():
        for k in ("subject_fidelity", "prompt_fidelity", "background_acc", "position_acc", "clutter"):
            assert 0.0 <= row[k] <= 1.0, (name, k, row[k])
        for k in ("dino", "clip_i", "clip_t"):
            assert -1.0 <= row[k] <= 1.0, (name, k, row[k])
        assert row["total_s"] > 0
        if name == "base":
            assert row["peak_train_mib"] is None and row["step_s"] is None
        else:
            assert row["peak_train_mib"] > 0 and row["step_s"] > 0 and np.isfinite(row["final_loss"]) and np.isfinite(row["first_loss"])
    # the method's memory claim holds even here: skipping blocks and training on patches holds less
    rows = res["rows"]
    assert rows["blockskip"]["peak_train_mib"] < rows["skip"]["peak_train_mib"] < rows["standard_lora"]["peak_train_mib"]
    assert rows["patch"]["peak_train_mib"] < rows["standard_lora"]["peak_train_mib"]
    assert set(res["targets"]) >= {"subject_fidelity_ratio", "prompt_fidelity_diff", "met"}
    assert res["reference_check"]["same_subject"] > res["reference_check"]["cross_subject"]
    ((name, subj),) = res["per_subject"].items()
    assert len(subj["prompts"]) == 2 and len(subj["blocks"]) == 5 and len(subj["block_scores"]) > 2
    caps = res["config"]["training_prompts"][name]  # per-image captions by default
    assert len(caps) == 5 and all(c.startswith("a ") and " sks star on a " in c for c in caps)
    # prior preservation (--prior 5): five class prompts of the subject's noun, without the token
    assert res["config"]["prior"] == 5 and res["config"]["prior_share"] == 0.5
    prior = subj["prior_prompts"]
    assert len(prior) == 5 and all(" star on a " in c and "sks" not in c for c in prior) and len(set(prior)) > 1
    md = (out / "results.md").read_text()
    assert "| row |" in md and all(f"| {r} |" in md for r in ROWS)
    with Image.open(out / "grid.png") as g:
        assert g.width >= 120 + 5 * 128 and g.height >= 6 * 128
    assert "results.json" in capsys.readouterr().out


@pytest.mark.slow
def test_eval_generates_samples_per_prompt_from_their_own_noises(tmp_path, eval_model):
    from edgeblock.eval.run import EvalConfig, Runner

    cfg = EvalConfig.make(eval_model, quick=True, samples=2, blocks=(1, 2))
    runner = Runner(cfg, progress=False)
    res = runner.run(str(tmp_path / "eval"))
    assert res["config"]["images"] == 4 and res["config"]["samples"] == 2
    ((name, subj),) = res["per_subject"].items()
    assert len(subj["prompts"]) == 2 and subj["samples"] == 2
    for row, imgs in runner.generations[name].items():
        assert imgs.shape == (4, 64, 64, 3), row
        # sample-major: image k + 2 is prompt k again, drawn from another noise
        assert not np.array_equal(imgs[0], imgs[2]) and not np.array_equal(imgs[1], imgs[3]), row
    with Image.open(tmp_path / "eval" / "grid.png") as g:
        assert g.width >= 120 + 5 * 128  # references and the four generations of a row fit
    assert "4 images per row (2 per prompt)" in (tmp_path / "eval" / "results.md").read_text()


@pytest.mark.slow
def test_eval_without_prior_preservation_trains_on_the_references_alone(tmp_path, eval_model):
    from edgeblock.eval.run import EvalConfig, Runner

    seen = []
    runner = Runner(EvalConfig.make(eval_model, quick=True, blocks=(1, 2)), progress=False)  # the default: none
    train = runner._train
    runner._train = lambda variant, mcfg, cond, images, prior, track: (
        seen.append((variant, prior)), train(variant, mcfg, cond, images, prior, track))[1]
    res = runner.run(str(tmp_path / "eval"))
    assert [v for v, _ in seen] == ["standard_lora", "patch", "skip", "blockskip"]
    assert all(p is None for _, p in seen)
    ((_, subj),) = res["per_subject"].items()
    assert "prior_prompts" not in subj and res["config"]["prior"] == 0
    assert "no prior preservation" in (tmp_path / "eval" / "results.md").read_text()


@pytest.mark.slow
def test_eval_runs_only_the_rows_asked_for(tmp_path, eval_model, monkeypatch):
    from edgeblock.cli import main
    from edgeblock.eval import run as run_mod

    seen, train = [], run_mod.Runner._train
    monkeypatch.setattr(run_mod.Runner, "_train",
                        lambda self, variant, *a, **k: (seen.append(variant), train(self, variant, *a, **k))[1])
    out = tmp_path / "eval"
    rc = main(["eval", "--out", str(out), "--model", eval_model, "--quick", "--quiet", "--rows", "blockskip,skip"])
    assert rc == 0 and seen == ["skip", "blockskip"]  # table order, whatever order they were asked in
    res = json.loads((out / "results.json").read_text())
    assert list(res["rows"]) == ["skip", "blockskip"] and res["config"]["rows"] == ["skip", "blockskip"]
    assert res["targets"]["met"] is None and res["targets"]["missing"] == ["base", "standard_lora"]
    ((_, subj),) = res["per_subject"].items()
    assert set(subj["rows"]) == {"skip", "blockskip"} and len(subj["blocks"]) == 5  # selection ran for the skip rows (top 5)
    md = (out / "results.md").read_text()
    assert "| skip |" in md and "| standard_lora |" not in md and "not measured (rows not run: base, standard_lora)" in md
    with Image.open(out / "grid.png") as g:
        assert g.height < 6 * 128  # references and two rows per subject, not six
    # no skip row: no selection, and the blocks line says so
    res = run_mod.run_eval(str(tmp_path / "e2"), model=eval_model, quick=True, progress=False, rows=("base",))
    ((_, subj),) = res["per_subject"].items()
    assert list(res["rows"]) == ["base"] and subj["blocks"] is None and subj["block_scores"] is None
    assert "none (no skip row run)" in (tmp_path / "e2" / "results.md").read_text()


def test_eval_patch_rows_take_the_training_resolution_and_schedule_asked_for(tmp_path, eval_model, monkeypatch):
    from edge_runtime import patch_sampling as ps
    from edgeblock.eval import run as run_mod
    from edgeblock.method import model_recipe

    boxes, crops = [], []  # the crops the patch rows drew, and the arrays they trained on
    sample = ps.PatchSampler.sample

    def spy(self, rng, image, t):
        img, box = sample(self, rng, image, t)
        boxes.append((box.size, image.shape[0], float(t)))
        crops.append(img.shape)
        return img, box

    monkeypatch.setattr(ps.PatchSampler, "sample", spy)
    res = run_mod.run_eval(str(tmp_path / "e"), model=eval_model, quick=True, progress=False, rows=("patch",),
                           train_res=32, steps=6)
    full = boxes[0][1]
    assert res["config"]["patch_train_res"] == 32 and res["config"]["patch_schedule"]["f_min"] == 32 / full
    assert crops and all(c[:2] == (32, 32) for c in crops)
    # the model's recipe gives the schedule's shape, f_min = R / S: no crop smaller than R, the whole image at t = 1
    recipe = model_recipe(eval_model)
    sched = res["config"]["patch_schedule"]
    assert (sched["kind"], sched["levels"]) == (recipe.schedule_kind, recipe.schedule_levels)
    f = ps.PatchSchedule.from_dict(sched)
    assert all(size == round(float(f.scale(t)) * full) for size, _, t in boxes)
    assert all(size >= 32 for size, _, _ in boxes) and max(size for size, _, t in boxes if t >= 0.5) <= full
    assert "patch rows: 32 px crops, f_min 0.5, " in (tmp_path / "e" / "results.md").read_text()
    if recipe.name == "builtin":  # its two-size step: a crop of exactly R below t = 0.5, the whole image from there
        assert all(size == (32 if t < 0.5 else full) for size, _, t in boxes)
    boxes.clear()
    res = run_mod.run_eval(str(tmp_path / "e2"), model=eval_model, quick=True, progress=False, rows=("patch",),
                           steps=6, patch_min=0.25)
    assert res["config"]["patch_train_res"] == 3 * full // 4 and res["config"]["patch_schedule"]["f_min"] == 0.25
    f = ps.PatchSchedule.from_dict(res["config"]["patch_schedule"])
    assert f.f_min == 0.25 and all(size == round(float(f.scale(t)) * full) for size, _, t in boxes)


def test_eval_refuses_models_it_cannot_generate_with(tmp_path, capsys):
    from edgeblock.cli import main

    rc = main(["eval", "--out", str(tmp_path / "o"), "--model", str(tmp_path / "missing"), "--quick", "--quiet"])
    assert rc == 2 and "no such directory" in capsys.readouterr().err
    (tmp_path / "pipe" / "transformer").mkdir(parents=True)
    (tmp_path / "pipe" / "transformer" / "config.json").write_text("{}")
    rc = main(["eval", "--out", str(tmp_path / "o"), "--model", str(tmp_path / "pipe"), "--quick", "--quiet"])
    assert rc == 2 and "built-in model family" in capsys.readouterr().err
    assert not (tmp_path / "o" / "results.json").exists()


def test_eval_refuses_blocks_the_model_does_not_have(tmp_path, eval_model, capsys):
    from edgeblock.cli import main

    rc = main(["eval", "--out", str(tmp_path / "o"), "--model", eval_model, "--quick", "--quiet", "--blocks", "0,99"])
    assert rc == 2 and "--blocks [0, 99]" in capsys.readouterr().err
    with pytest.raises(ValueError, match="steps must be >= 1"):
        from edgeblock.eval.run import EvalConfig

        EvalConfig.make("builtin", quick=True, steps=0)
    for flag, value, message in (("--lr", "0", "lr must be > 0"), ("--top-k", "0", "top_k must be >= 1"),
                                 ("--rank", "0", "lora_rank must be >= 1"), ("--samples", "0", "samples must be >= 1"),
                                 ("--prior", "-1", "prior must be >= 0"), ("--prior-share", "1", "prior_share must be in"),
                                 ("--rows", "skip,lora", "rows must be a non-empty subset of base, standard_lora"),
                                 ("--rows", ",", "got none"), ("--train-res", "0", "train_res must be >= 1"),
                                 ("--train-res", "46", "--train-res 46: needs a multiple of the packing factor"),
                                 ("--train-res", "128", "in 1..64 (the generation side)"),
                                 ("--patch-min", "0", "patch_min must be in (0, 1]"),
                                 ("--patch-min", "1.5", "patch_min must be in (0, 1]")):
        rc = main(["eval", "--out", str(tmp_path / "o"), "--model", eval_model, "--quick", "--quiet", flag, value])
        assert rc == 2 and message in capsys.readouterr().err, flag
    assert not (tmp_path / "o" / "results.json").exists()
    with pytest.raises(ValueError, match="subject_set must be one of"):
        EvalConfig.make("builtin", subject_set="test")
    cfg = EvalConfig.make("builtin", lr=0.01, lora_rank=4, top_k=3)
    assert cfg.subject_set == "benchmark"
    assert (cfg.lr, cfg.lora_rank, cfg.top_k, cfg.steps, cfg.samples, cfg.prior) == (0.01, 4, 3, 300, 1, 0)


def test_score_agrees_with_the_separate_metrics(subjects):
    s = subjects[1]
    refs = [metrics.describe(im) for im in s.images[1:]]
    img, ref = s.images[0], s.references[0]
    got = metrics.score(img, refs, ref.background, "center")
    assert got["subject_fidelity"] == metrics.subject_fidelity(img, refs)
    assert {k: got[k] for k in ("background_acc", "position_acc", "prompt_fidelity")} == metrics.prompt_fidelity(
        img, ref.background, "center")
    assert got["clutter"] == metrics.clutter(img) == 0.0


def test_largest_component_is_eight_connected():
    m = np.zeros((8, 8), bool)
    m[1, 1] = m[2, 2] = m[3, 3] = True  # a diagonal: one region of 3
    m[6, 0:2] = True  # a separate region of 2
    out = metrics._largest_component(m)
    assert out.sum() == 3 and out[1, 1] and out[3, 3] and not out[6, 0]
    assert not metrics._largest_component(np.zeros((4, 4), bool)).any()


def test_per_image_captions_describe_each_reference_in_the_worlds_words(subjects):
    from edgeblock.builtin import world
    from edgeblock.eval.subjects import size_word

    assert (size_word(0.11), size_word(0.13), size_word(0.14), size_word(0.17)) == ("small", "small", "large", "large")
    for s in subjects:
        caps = s.training_prompts("per-image")
        assert len(caps) == len(s.references) == len(s.images)
        for cap, ref in zip(caps, s.references):
            assert cap == f"a {size_word(ref.scale)} sks {s.noun} on a {ref.background} background, {ref.position}"
            assert ref.position in world.POSITIONS and ref.background in world.COLOURS
        assert s.training_prompts("token") == [f"a sks {s.noun}"]
    with pytest.raises(ValueError, match="unknown caption mode"):
        subjects[0].training_prompts("both")
    from edgeblock.eval.run import EvalConfig

    assert EvalConfig().captions == "per-image"
    with pytest.raises(ValueError, match="captions must be one of"):
        EvalConfig.make("builtin", captions="both")


def test_contiguous_selection_picks_the_best_window(eval_model, subjects):
    """--contiguous: the window of --top-k consecutive blocks with the largest total masking score."""
    import dataclasses

    from edgeblock.eval.run import EvalConfig, select_blocks
    from edgeblock.generate import model_meta, pixel_model_dir
    from edgeblock.models import load_model
    from edgeblock.models.pipeline_parts import BuiltinTextStack

    path = pixel_model_dir(eval_model)
    loaded, text = load_model(path), BuiltinTextStack(model_meta(path)["text_len"])
    cfg = EvalConfig.make(eval_model, quick=True, top_k=2)  # windows of two of the six blocks
    top, scores = select_blocks(loaded, text, subjects[0], cfg)
    win, again = select_blocks(loaded, text, subjects[0], dataclasses.replace(cfg, contiguous=True))
    assert again == scores and len(scores) == loaded.adapter.num_blocks
    assert top == sorted(int(i) for i in np.argsort(-np.asarray(scores), kind="stable")[:2])
    windows = [scores[i] + scores[i + 1] for i in range(len(scores) - 1)]
    assert win == [int(np.argmax(windows)), int(np.argmax(windows)) + 1]


@pytest.mark.slow
def test_device_runtime_adds_the_product_path_row(tmp_path, eval_model, monkeypatch):
    """--runtime device: the blockskip_device row is compiled by `edgeblock compile` at the run's settings into
    OUT/bundle, trained by the daemon's job code (run_job, the ONNX Runtime trainer, the run's steps and draws per step)
    and generated by the device runtime; its figures and targets sit beside the torch rows'."""
    import edge_runtime.personalize as pers
    from edgeblock.eval import run as run_mod

    from edge_runtime.manifest import load_manifest

    jobs, real = [], pers.run_job
    monkeypatch.setattr(pers, "run_job", lambda b, opts, *a, **k: (jobs.append((opts, k.get("trainer_backend", "ort"))),
                                                                   real(b, opts, *a, **k))[1])
    res = run_mod.run_eval(str(tmp_path / "e"), model=eval_model, quick=True, progress=False, runtime="device",
                           rows=("base", "standard_lora", "blockskip", "blockskip_device"), steps=4)
    assert list(res["rows"]) == ["base", "standard_lora", "blockskip", "blockskip_device"]
    cfg = res["config"]
    assert len(jobs) == 1 and jobs[0][1] == "ort"  # one subject, the daemon's trainer
    opts = jobs[0][0]
    assert (opts.steps, opts.batch, opts.learning_rate) == (4, cfg["batch"], cfg["lr"]) and opts.captions
    m = load_manifest(cfg["device"]["bundle"])
    (subj,) = res["per_subject"].values()
    assert m.train_res == cfg["patch_train_res"] and m.lora["rank"] == cfg["lora_rank"]
    assert m.patch_schedule["f_min"] == cfg["patch_schedule"]["f_min"]
    assert len(m.trainable) == len(subj["blocks"]) == cfg["top_k"]
    d = res["rows"]["blockskip_device"]
    assert 0.0 <= d["subject_fidelity"] <= 1.0 and d["step_s"] > 0 and d["final_loss"] > 0
    dev = res["targets"]["device"]
    assert dev["subject_fidelity_vs_torch"] == pytest.approx(d["subject_fidelity"] - res["rows"]["blockskip"]["subject_fidelity"])
    assert "blockskip_device" in open(tmp_path / "e" / "results.md").read()


def test_device_rows_need_the_device_runtime():
    from edgeblock.eval.run import EvalConfig

    with pytest.raises(ValueError, match="--runtime device"):
        EvalConfig.make("builtin", True, rows=("blockskip_device",))
    with pytest.raises(ValueError, match="runtime must be one of"):
        EvalConfig.make("builtin", True, runtime="gpu")
    assert EvalConfig.make("builtin", True, runtime="device").rows[-1] == "blockskip_device"


def test_weights_add_quantized_device_rows_judged_against_the_fp32_one(tmp_path, eval_model):
    """--weights int8: the row blockskip_device_int8 runs through a bundle compiled with int8 frozen weights (in
    OUT/bundle-int8) beside the fp32 blockskip_device row; issue 23's target compares the two."""
    from edgeblock.eval import run as run_mod

    from edge_runtime.manifest import load_manifest

    res = run_mod.run_eval(str(tmp_path / "e"), model=eval_model, quick=True, progress=False, weights=("int8",),
                           rows=("base",), steps=2)
    assert list(res["rows"]) == ["base", "blockskip_device", "blockskip_device_int8"]
    rows = res["config"]["device"]["rows"]
    assert rows["blockskip_device"]["weights"] == "fp32" and rows["blockskip_device_int8"]["weights"] == "int8"
    assert load_manifest(rows["blockskip_device_int8"]["bundle"]).weight_precision == "int8"
    assert load_manifest(rows["blockskip_device"]["bundle"]).weight_precision == "fp32"
    q, d = res["rows"]["blockskip_device_int8"], res["rows"]["blockskip_device"]
    assert 0.0 <= q["subject_fidelity"] <= 1.0 and q["final_loss"] > 0
    t = res["quantized_targets"]["blockskip_device_int8"]
    assert t["subject_fidelity_vs_fp32"] == pytest.approx(q["subject_fidelity"] - d["subject_fidelity"])
    assert t["met"] == (abs(t["subject_fidelity_vs_fp32"]) <= 0.02 and abs(t["prompt_fidelity_vs_fp32"]) <= 0.01)
    assert "int8 weights (issue 23)" in open(tmp_path / "e" / "results.md").read()


def test_weights_are_checked():
    from edgeblock.eval.run import EvalConfig

    with pytest.raises(ValueError, match="weights must be among int8, int4"):
        EvalConfig.make("builtin", True, weights=("fp16",))
    cfg = EvalConfig.make("builtin", True, weights=("int4",))
    assert cfg.runtime == "device" and cfg.rows[-2:] == ("blockskip_device", "blockskip_device_int4")
