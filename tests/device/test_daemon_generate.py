"""Generation options on the real daemon: several images with one seed each, a negative prompt, adapters by id
with a scale each (scale 0 is the base model, two at once add up), and GenerateStream's progress."""

from __future__ import annotations

import numpy as np
import pytest
from daemon_util import DaemonProc, subject_pngs
from edgeblock.client import ClientError, EdgeClient

from edge_runtime.api import kind_name

pytest.importorskip("onnxruntime.training")


@pytest.fixture(scope="module")
def served(builtin_bundle, tmp_path_factory):
    d = DaemonProc(builtin_bundle[0], str(tmp_path_factory.mktemp("gen") / "state"))
    c = EdgeClient(d.address, timeout=120)
    c.wait_ready(20)
    ids = []
    for seed, lr in ((1, 3e-3), (2, 5e-3)):
        events = list(c.personalize(subject_pngs(2, seed=seed), token="sks", class_noun="ring", steps=4, seed=seed,
                                    learning_rate=lr))
        assert kind_name(events[-1].kind) == "DONE", events[-1]
        ids.append(events[-1].adapter_id)
    yield c, ids
    c.close()
    d.stop()


def _px(png: bytes) -> np.ndarray:
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def test_images_seeds_negative_prompt_and_stream(served):
    c, (a1, _a2) = served
    info = c.info()
    assert info.limits.max_num_images == 4 and info.multi_adapter and not info.guidance_embedded
    r = c.generate("a red ring on a blue background", seed=5, steps=3, num_images=2)
    assert [im.seed for im in r.images] == [5, 6] and r.png == r.images[0].png and r.seed == 5
    alone = c.generate("a red ring on a blue background", seed=6, steps=3)
    assert alone.png == r.images[1].png  # image i is the image of seed + i
    plain = c.generate("a red ring on a blue background", seed=5, steps=3)
    neg = c.generate("a red ring on a blue background", seed=5, steps=3, negative_prompt="a blue ring")
    assert np.abs(_px(neg.png) - _px(plain.png)).mean() > 0.5  # guided away from the negative, not the empty prompt
    with pytest.raises(ClientError) as e:
        c.generate("a ring", steps=2, guidance=1.0, negative_prompt="blue")
    assert e.value.code == "FAILED_PRECONDITION" and "classifier-free guidance" in e.value.details
    with pytest.raises(ClientError) as e:
        c.generate("a ring", steps=2, num_images=5)
    assert e.value.code == "INVALID_ARGUMENT" and e.value.violations[0][0] == "num_images"

    events = list(c.generate_stream("a red ring on a blue background", seed=5, steps=3, num_images=2,
                                    adapters=[(a1, 1.0)]))
    progress = [(ev.progress.image, ev.progress.step) for ev in events[:-1]]
    assert progress == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)] and events[-1].HasField("result")
    direct = c.generate("a red ring on a blue background", seed=5, steps=3, num_images=2, adapter_id=a1)
    assert [im.png for im in events[-1].result.images] == [im.png for im in direct.images]


def test_adapters_with_scales(served):
    c, (a1, a2) = served
    prompt = "a sks ring on a green background"
    base = c.generate(prompt, seed=3, steps=3)
    one = c.generate(prompt, seed=3, steps=3, adapter_id=a1)
    assert c.generate(prompt, seed=3, steps=3, adapters=[(a1, 0.0)]).png == base.png  # scale 0: the base model
    assert c.generate(prompt, seed=3, steps=3, adapters={a1: 1.0}).png == one.png  # scale 1: as adapter_id
    half = c.generate(prompt, seed=3, steps=3, adapters=[(a1, 0.5)])
    assert half.png not in (base.png, one.png)
    both = c.generate(prompt, seed=3, steps=3, adapters=[(a1, 1.0), (a2, 1.0)])
    assert [(a.adapter_id, a.scale) for a in both.adapters] == [(a1, 1.0), (a2, 1.0)] and both.adapter_id == a1
    two = c.generate(prompt, seed=3, steps=3, adapter_id=a2)
    assert both.png not in (base.png, one.png, two.png)
    # a1 at 1 beside a2 at 0 is a1 alone, up to float rounding through the wider rank
    assert np.abs(_px(c.generate(prompt, seed=3, steps=3, adapters=[(a1, 1.0), (a2, 0.0)]).png) - _px(one.png)).max() <= 2
    for bad, field in (([(a1, 1.0), (a1, 0.5)], "adapters"), ([(a1, 9.0)], "adapters[0].scale"),
                       ([(a1, 1.0)] * 5, "adapters")):
        with pytest.raises(ClientError) as e:
            c.generate(prompt, steps=2, adapters=bad)
        assert e.value.code == "INVALID_ARGUMENT" and e.value.violations[0][0] == field, e.value
    with pytest.raises(ClientError) as e:
        c.generate(prompt, steps=2, adapters=[(a1, 1.0)], adapter_id=a2)
    assert e.value.code == "INVALID_ARGUMENT"


def test_validation_prompts_send_images_and_leave_the_adapter_as_it_is(served):
    from safetensors.numpy import load

    c, _ = served
    job = dict(token="sks", class_noun="ring", steps=4, seed=4, learning_rate=4e-3)
    prompts = ["a sks ring on a green background", "a sks ring"]
    events = list(c.personalize(subject_pngs(2, seed=4), validation_prompts=prompts, validation_every=3, **job))
    assert kind_name(events[-1].kind) == "DONE", events[-1]
    shown = [(e.step, e.prompt) for e in events if kind_name(e.kind) == "VALIDATION"]
    assert shown == [(3, prompts[0]), (3, prompts[1]), (4, prompts[0]), (4, prompts[1])]  # every 3 steps and the last
    for e in events:
        if kind_name(e.kind) == "VALIDATION":
            assert _px(e.png).shape == (64, 64, 3)
    replay = [e for e in c.watch_job(events[-1].job_id) if kind_name(e.kind) == "VALIDATION"]
    assert [e.png for e in replay] == [e.png for e in events if kind_name(e.kind) == "VALIDATION"]
    plain = list(c.personalize(subject_pngs(2, seed=4), **job))
    a, b = (load(c.export_adapter(ev[-1].adapter_id)[0]) for ev in (events, plain))
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-6
    for kw, field in ((dict(validation_prompts=["a"] * 5, validation_every=1), "validation_prompts"),
                      (dict(validation_prompts=["a"], validation_every=0), "validation_every"),
                      (dict(validation_every=2), "validation_every"),
                      (dict(lr_schedule="step"), "lr_schedule"), (dict(warmup_steps=9), "warmup_steps")):
        with pytest.raises(ClientError) as e:
            next(iter(c.personalize(subject_pngs(1), **{**job, **kw})))
        assert e.value.code == "INVALID_ARGUMENT" and e.value.violations[0][0] == field, (kw, e.value)
    d = c.info().defaults
    assert d.lr_schedule == "constant" and d.warmup_steps == 0


def test_non_square_sizes_the_bundle_was_compiled_for(served):
    c, (a1, _a2) = served
    info = c.info()
    assert [(s.width, s.height) for s in info.gen_sizes] == [(32, 32), (64, 64), (64, 48)]
    assert list(info.sizes) == [32, 64]  # the squares, as before
    d = info.defaults
    assert d.prior_share == 0.5 and d.precompute in ("bank", "online") and d.num_images == 1
    assert d.adapter_scale == 1.0 and d.size == info.gen_res
    r = c.generate("a sks ring on a green background", seed=2, steps=3, width=64, height=48, adapter_id=a1)
    assert (r.width, r.height) == (64, 48) and _px(r.png).shape == (48, 64, 3)
    for kw, code in ((dict(width=48, height=64), "FAILED_PRECONDITION"), (dict(width=64), "INVALID_ARGUMENT"),
                     (dict(width=64, height=48, size=64), "INVALID_ARGUMENT")):
        with pytest.raises(ClientError) as e:
            c.generate("a ring", steps=2, **kw)
        assert e.value.code == code, (kw, e.value)
