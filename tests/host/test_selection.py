"""Selection by cross-attention masking ranks a block whose text attention was planted first."""

from __future__ import annotations


import pytest
import torch

from dit_inputs import make_inputs
from edgeblock.method.selection import (
    CalibrationItem,
    TextKeyMask,
    bar_chart,
    choose_blocks,
    score_blocks,
    selection_report,
)
from edgeblock.method.train import Conditioning
from edgeblock.models import adapter_from_module, objective_from_scheduler
from edgeblock.models.presets import TINY

# Where the text values enter the image stream, per family.
PLANT = {"flux": "attn.add_v_proj", "sd3": "attn.add_v_proj", "pixart": "attn2.to_v", "sana": "attn2.to_v"}


def _plant(model, adapter, block, family):
    """Make image queries in `block` read mostly (and strongly) from the text values."""
    lst, j = adapter.block_names[block].split(".")
    mod = getattr(model, lst)[int(j)]
    for part in PLANT[family].split("."):
        mod = getattr(mod, part)
    with torch.no_grad():
        mod.weight.mul_(40.0)


# Blocks to plant in: FLUX's text values have their own projection in the double-stream blocks (0, 1).
PLANT_AT = {"flux": (0, 1), "sd3": (1, 2), "pixart": (1, 2), "sana": (1, 2)}


@pytest.mark.parametrize("which", [0, 1])
def test_planted_text_block_ranks_first(family, which):
    planted = PLANT_AT[family][which]
    preset = TINY[family]
    model = preset.build(seed=4)
    base = adapter_from_module(model, preset.latent_channels)
    _plant(model, base, planted, family)
    adapter = adapter_from_module(model, preset.latent_channels)
    x = make_inputs(preset, batch=1, seed=3)
    item = CalibrationItem(x.latents, Conditioning(x.text, x.pooled, x.text_mask), positions=(1, 2))
    scores = score_blocks(adapter, objective_from_scheduler(None, family), [item], noise_levels=(0.3, 0.7), noises=1)
    assert len(scores) == adapter.num_blocks and all(s >= 0 for s in scores)
    assert max(range(len(scores)), key=scores.__getitem__) == planted, scores
    report = selection_report(adapter, scores, k=2, contiguous=False)
    assert report["ranking"][0]["block"] == planted and planted in report["selected"]


def test_masking_changes_only_the_masked_block_output():
    preset = TINY["flux"]
    model = preset.build(seed=0)
    adapter = adapter_from_module(model, preset.latent_channels)
    x = make_inputs(preset, batch=1)
    item = CalibrationItem(x.latents, Conditioning(x.text, x.pooled, None), positions=(0,))
    scores = score_blocks(adapter, objective_from_scheduler(None, "flux"), [item], noise_levels=(0.5,), noises=1)
    assert all(s > 0 for s in scores)  # every block reads the text in a FLUX model


def test_text_key_mask_layouts():
    m = TextKeyMask("txt_first", text_len=3, positions=(1,)).bias(7, 7, torch.float32)
    assert torch.isinf(m[3:, 1]).all() and not torch.isinf(m[:3]).any() and torch.isinf(m).sum() == 4
    m = TextKeyMask("img_first", text_len=3, positions=(0, 2)).bias(7, 7, torch.float32)
    assert torch.isinf(m[:4, 4]).all() and torch.isinf(m[:4, 6]).all() and torch.isinf(m).sum() == 8
    m = TextKeyMask("cross", text_len=5, positions=(4,)).bias(6, 5, torch.float32)
    assert torch.isinf(m[:, 4]).all() and torch.isinf(m).sum() == 6


def test_choose_blocks_top_k_and_window():
    s = [0.1, 0.9, 0.2, 0.8, 0.7]
    assert choose_blocks(s, 2) == [1, 3]
    assert choose_blocks(s, 2, contiguous=True) == [3, 4]
    with pytest.raises(ValueError, match="k must be"):
        choose_blocks(s, 0)


def test_bar_chart_is_written(tmp_path):
    path = tmp_path / "scores.png"
    bar_chart([0.1, 0.5, 0.3], ["transformer_blocks.0", "single_transformer_blocks.0", "x.1"], [1], str(path))
    from PIL import Image

    img = Image.open(path)
    assert img.size[0] > 100 and img.getpixel((0, 0)) == (255, 255, 255)
    px = {c for _, c in img.convert("RGB").getcolors(maxcolors=1 << 20)}
    assert (214, 96, 39) in px and (70, 110, 170) in px
