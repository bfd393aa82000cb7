"""`edgeblock plan`: the memory planner's inventory, JSON shape, errors, and its calibration against measurement."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest

from edgeblock.plan.calibration import HOST_CPU
from edgeblock.plan.inventory import load_inventory, shipped_configs
from edgeblock.plan.predict import PlanOptions, frozen_groups, plan

PHASES = ("precompute", "train", "generate")


@pytest.mark.parametrize("name,params", [("flux1-dev", 11.90e9), ("sd35-medium", 2.24e9),
                                         ("pixart-sigma-xl-2-1024", 0.61e9), ("sana-1600m-1024", 1.60e9),
                                         ("sana-600m-1024", 0.59e9)])
def test_shipped_configs_build_on_meta_with_published_sizes(name, params):
    inv = load_inventory(name)
    assert abs(inv.parameters / params - 1) < 0.01
    assert sum(b.params for b in inv.blocks) + inv.shell_params == inv.parameters


def test_tokens_follow_each_family_pipeline():
    assert load_inventory("flux1-dev").tokens(1024) == 4096  # VAE /8, packed 2x2
    assert load_inventory("sd35-medium").tokens(512) == 1024  # VAE /8, patch 2
    assert load_inventory("sana-600m-1024").tokens(1024) == 1024  # DC-AE /32, patch 1
    assert load_inventory("builtin").tokens(64) == 256  # pixels packed 4x4


@pytest.mark.parametrize("family", ["sana", "pixart"])
def test_a_pipelines_own_vae_replaces_the_familys(family, tmp_path):
    """A pipeline directory's vae/config.json (AutoencoderDC for Sana, AutoencoderKL for PixArt) gives the planner
    its scale, decoder widths and parameters, not the public checkpoint's (a held-out Sana pipeline's generation was
    predicted 54 % high with the public DC-AE's widths)."""
    import diffusers
    from pipelines import make_tiny_pipeline

    root = make_tiny_pipeline(family, tmp_path / family)
    inv = load_inventory(str(tmp_path / family / "transformer"))
    vae = getattr(diffusers, "AutoencoderDC" if family == "sana" else "AutoencoderKL").from_pretrained(
        f"{root}/vae")
    dec = sum(p.numel() for n, p in vae.named_parameters() if n.startswith(("decoder.", "post_quant_conv.")))
    assert inv.vae_decoder_params == dec
    if family == "sana":
        assert (inv.vae_scale, inv.vae_up_channels, inv.vae_attention) == (
            32, vae.config.decoder_block_out_channels[0], False)
    else:
        widths = vae.config.block_out_channels
        assert (inv.vae_scale, inv.vae_up_channels) == (2 ** (len(widths) - 1), max(widths[:2]))
    public = load_inventory("sana-600m-1024" if family == "sana" else "pixart-sigma-xl-2-1024")
    assert inv.vae_decoder_params < public.vae_decoder_params / 100


def test_a_pipelines_own_text_encoders_replace_the_familys(tmp_path):
    """The text encoders of a pipeline directory (model_index.json's text_encoder*, here SD3's CLIP-L, CLIP-G and
    T5) are what the planner prices, their token tables (>= 1 MiB) counted as lookups; named ones still win."""
    import transformers
    from pipelines import make_tiny_pipeline

    from edgeblock.compile.text_lookup import MIN_TABLE_BYTES

    root = make_tiny_pipeline("sd3", tmp_path / "sd3")
    inv = load_inventory(str(tmp_path / "sd3" / "transformer"))
    params = lookups = 0
    for key, cls in (("text_encoder", "CLIPTextModelWithProjection"), ("text_encoder_2", "CLIPTextModelWithProjection"),
                     ("text_encoder_3", "T5EncoderModel")):
        m = getattr(transformers, cls).from_pretrained(f"{root}/{key}")
        params += sum(p.numel() for p in m.parameters())
        table = m.get_input_embeddings().weight.numel()
        lookups += table if table * 4 >= MIN_TABLE_BYTES else 0
    assert inv.text_encoders == ("text_encoder (CLIPTextModelWithProjection)",
                                 "text_encoder_2 (CLIPTextModelWithProjection)", "text_encoder_3 (T5EncoderModel)")
    assert (inv.text_encoder_params, inv.text_lookup_params) == (params, lookups)
    assert load_inventory(str(tmp_path / "sd3" / "transformer"), ("t5-xxl",)).text_encoder_params > 4e9
    assert load_inventory("sd35-medium").text_encoders == ("clip-l", "clip-g", "t5-xxl")


def test_plan_json_has_a_bytes_peak_per_method_and_phase():
    r = plan(PlanOptions("sana-600m-1024", "orin-nano-8gb"))
    for method in ("standard_lora", "blockskip"):
        for ph in PHASES:
            p = r["methods"][method][ph]
            assert isinstance(p["peak_bytes"], int) and p["peak_bytes"] > 0
            assert p["peak_bytes"] == sum(p["parts"].values())
            assert all(k.endswith("_bytes") for k in p["parts"])
            assert p["fits"] == (p["peak_bytes"] <= r["target"]["usable_bytes"])
    assert r["target"]["usable_bytes"] == r["target"]["total_bytes"] - r["target"]["os_reserved_bytes"]
    assert r["advice"]


def test_blockskip_trains_in_a_fraction_of_standard_lora_and_shrinks_with_the_crop():
    for name in shipped_configs():
        r = plan(PlanOptions(name, "agx-orin-64gb"))
        bs, sl = r["methods"]["blockskip"]["train"], r["methods"]["standard_lora"]["train"]
        assert bs["peak_bytes"] < 0.5 * sl["peak_bytes"], name
    small = plan(PlanOptions("pixart-sigma-xl-2-1024", "agx-orin-64gb", train_res=256))
    big = plan(PlanOptions("pixart-sigma-xl-2-1024", "agx-orin-64gb", train_res=512))
    assert small["methods"]["blockskip"]["train"]["parts"]["activations_bytes"] < \
        big["methods"]["blockskip"]["train"]["parts"]["activations_bytes"] / 3


def test_more_memory_fits_more():
    a = plan(PlanOptions("sd35-medium", "orin-nano-8gb"))["methods"]["blockskip"]
    b = plan(PlanOptions("sd35-medium", "agx-orin-64gb"))["methods"]["blockskip"]
    assert not a["fits"] and b["fits"]
    assert a["train"]["peak_bytes"] == b["train"]["peak_bytes"]  # same device precision and runtime estimate


def test_streaming_and_quantized_weights_lower_generation():
    by = {(w, g): plan(PlanOptions("flux1-dev", "orin-nx-16gb", weights=w, generation=g))
          for w in ("fp16", "int8", "int4") for g in ("resident", "streamed")}
    gen = {k: r["methods"]["blockskip"]["generate"]["peak_bytes"] for k, r in by.items()}
    from edge_runtime.weights import bytes_per_weight
    from edgeblock.plan.predict import session_factor

    dit = load_inventory("flux1-dev")
    for w in ("fp16", "int8", "int4"):
        # streaming holds none of the blocks' weights that a resident generation keeps open (the T5 encoder, in
        # parts on a Jetson, is held by neither while sampling)
        blocks = (dit.parameters - dit.shell_params) * bytes_per_weight(w) * session_factor(HOST_CPU, w)
        assert gen[(w, "resident")] - gen[(w, "streamed")] >= blocks, w
    assert gen[("int4", "resident")] < gen[("int8", "resident")] < gen[("fp16", "resident")]
    # streamed, the largest stage at 1024 px is the VAE decoder (fp32 whatever --weights: its weights and its
    # full-resolution maps, _vae_decode_act) once the T5 encoder streams in parts (the Jetson default): quantizing
    # cannot lower it below that
    from edgeblock.plan.predict import _vae_decode_act
    from edgeblock.plan.targets import get_target

    vae_stage = (get_target("orin-nx-16gb").daemon_runtime_bytes + HOST_CPU.graph_session_bytes
                 + dit.vae_decoder_params * 4 * HOST_CPU.session_weight_factor
                 + _vae_decode_act(dit, HOST_CPU, 1024) * 4)
    for w in ("fp16", "int8", "int4"):
        assert abs(gen[(w, "streamed")] - vae_stage) <= 2, w
    whole_text = plan(PlanOptions("flux1-dev", "orin-nx-16gb", weights="fp16", generation="streamed",
                                  text_encoder="resident"))
    assert whole_text["text_encoder"] == "resident" and by[("fp16", "streamed")]["text_encoder"] == "streamed"
    assert whole_text["methods"]["blockskip"]["generate"]["peak_bytes"] > gen[("fp16", "streamed")]
    assert whole_text["methods"]["blockskip"]["precompute"]["peak_bytes"] > \
        by[("fp16", "streamed")]["methods"]["blockskip"]["precompute"]["peak_bytes"]
    r = by[("int4", "resident")]
    # FLUX.1-dev embeds its guidance (one row): running the rows one after the other changes nothing
    assert r["generation"]["resident"]["rows_peak_bytes"] == r["generation"]["resident"]["peak_bytes"]
    # SD3.5 guides by classifier-free guidance (two rows), but at 1024 px its VAE decoder's maps, after sampling,
    # outweigh a DiT run's activations at either batch: the rows cannot lower that peak either (the pixel-space
    # bench models' can: tests/host/test_compile_memory.py)
    sd = plan(PlanOptions("sd35-medium", "orin-nx-16gb", weights="int4"))["generation"]["resident"]
    assert sd["rows_peak_bytes"] == sd["peak_bytes"]
    assert r["precision"]["weights"] == "int4" and r["generation"]["mode"] == "resident"
    assert r["generation"]["streamed"]["peak_bytes"] == gen[("int4", "streamed")]
    # the training step's trainable blocks stay fp32 whatever the frozen weights
    assert by[("int4", "resident")]["methods"]["blockskip"]["train"] == by[("fp16", "resident")]["methods"]["blockskip"]["train"]


def test_a_resident_generation_keeps_a_whole_text_encoder_open_but_not_one_in_parts():
    """edge_runtime.memory_plan.text_encoder_streamed: a text encoder in parts is loaded part by part in every
    operation, so a resident generation holds its graphs plus the largest part (while encoding, before sampling)
    instead of the whole encoder beside them; what it keeps open (weights_bytes, admission's cache) excludes it."""

    inv = load_inventory("sd35-medium")
    parts, whole = (plan(PlanOptions("sd35-medium", "orin-nx-16gb", text_encoder=m), inv=inv)["generation"]["resident"]
                    for m in ("streamed", "resident"))
    text_w = inv.text_session_params * 2 * HOST_CPU.text_session_factor  # fp16, the Jetson default
    assert text_w > 5 * 2**30  # T5-XXL + the two CLIPs, their token tables read from disk
    held = whole["parts"]["weights_bytes"] - parts["parts"]["weights_bytes"]
    assert abs(held - text_w) <= 1  # the whole encoder's session, now not kept
    assert parts["parts"]["sessions_bytes"] == whole["parts"]["sessions_bytes"] - HOST_CPU.graph_session_bytes
    # the largest part (no larger than the largest frozen group) is held before sampling; here the VAE decoder's
    # 1024 px maps are the larger transient, so the peak falls by the whole encoder and its session
    assert parts["parts"]["activations_bytes"] == whole["parts"]["activations_bytes"]
    assert abs(whole["peak_bytes"] - parts["peak_bytes"] - text_w - HOST_CPU.graph_session_bytes) <= 2
    assert parts["peak_bytes"] < 15.1 * 2**30 < whole["peak_bytes"]  # SD3.5-medium resident on the Orin NX 16GB


@pytest.mark.parametrize("config,target,kw,stage,lever", [
    ("flux1-dev", "orin-nano-8gb", dict(gen_res=1536), "VAE decoder", "--gen-res"),
    ("sd35-medium", "orin-nano-8gb", dict(weights="fp32", text_encoder="resident"), "text encoder", "--text-parts"),
    ("flux1-dev", "orin-nano-8gb", dict(weights="fp32", gen_res=512, max_group_mb=0), "frozen group 0", "--max-group-mb")])
def test_a_streamed_generation_that_does_not_fit_names_its_largest_stage(config, target, kw, stage, lever):
    """The advice for a streamed generation over the budget names the stage at its peak and that stage's lever
    (the VAE decoder is float32 under every --weights: quantizing cannot lower it)."""
    r = plan(PlanOptions(config, target, generation="streamed", **kw))
    assert r["generation"]["streamed"]["largest_stage"] == stage
    assert not r["methods"]["blockskip"]["generate"]["fits"]
    msg = next(m for m in r["advice"] if m.startswith("blockskip generate"))
    assert f"its largest stage is the {stage}" in msg and lever in msg
    assert ("--weights int8" in msg) == (stage != "VAE decoder")


def test_the_trainable_runs_generate_at_their_roles_precision():
    """The trainable runs' inference graphs take int8 under int4, fp16 under int8 and fp16, fp32 under fp32
    (edge_runtime.weights.TRAINED): each block that trains moves its bytes from the frozen groups' precision to
    that one in a resident generation."""
    from edgeblock.plan.calibration import HOST_CPU
    from edgeblock.plan.predict import session_factor

    from edge_runtime.weights import TRAINED, bytes_per_weight, graph_precision

    inv = load_inventory("flux1-dev")
    for w, trained in (("fp32", "fp32"), ("fp16", "fp16"), ("int8", "fp16"), ("int4", "int8")):
        assert graph_precision(w, TRAINED) == trained
        few, many = (plan(PlanOptions("flux1-dev", "orin-nx-16gb", weights=w, blocks=b), inv=inv)
                     for b in ((9, 10), tuple(range(4, 16))))
        added = sum(inv.blocks[i].params for i in range(4, 16)) - sum(inv.blocks[i].params for i in (9, 10))
        wf, wm = (r["generation"]["resident"]["parts"]["weights_bytes"] for r in (few, many))
        # ten more blocks leave the frozen groups (at the bundle's precision) for the trainable runs
        frozen_b, trained_b = (bytes_per_weight(p) * session_factor(HOST_CPU, p) for p in (w, trained))
        assert wm - wf == pytest.approx(added * (trained_b - frozen_b), rel=1e-6, abs=1.0)


def test_vae_weights_stay_fp32_and_an_online_job_holds_the_vae_encoder():
    """compile leaves the VAE fp32 (edge_runtime.weights.graph_precision): its bytes do not follow --weights. An online
    job's frozen pass encodes each draw's crop, so its training phase holds the VAE encoder; a bank job does not."""
    import copy

    from edgeblock.plan.calibration import HOST_CPU

    inv = load_inventory("flux1-dev")
    no_vae = copy.copy(inv)  # the same model on the meta device, without a VAE's weights
    no_vae.vae_encoder_params = no_vae.vae_decoder_params = 0
    enc = inv.vae_encoder_params * 4 * HOST_CPU.session_weight_factor
    dec = inv.vae_decoder_params * 4 * HOST_CPU.session_weight_factor
    assert enc > 100e6 and dec > 150e6  # FLUX's AutoencoderKL: 34M + 50M float32 weights
    for w in ("fp32", "int8"):
        for pre in ("online", "bank"):
            o = PlanOptions("flux1-dev", "host-cpu", weights=w, precompute=pre)
            a, b = plan(o, inv=inv), plan(o, inv=no_vae)
            train = a["methods"]["blockskip"]["train"]["peak_bytes"] - b["methods"]["blockskip"]["train"]["peak_bytes"]
            assert train == pytest.approx(enc if pre == "online" else 0, abs=1), (w, pre)
            enc_phase = (a["methods"]["blockskip"]["precompute"]["parts"]["weights_bytes"]
                         - b["methods"]["blockskip"]["precompute"]["parts"]["weights_bytes"])
            if pre == "online":  # the precompute phase is the encoding: the text encoder and the VAE encoder
                assert enc_phase == pytest.approx(enc, abs=1), w
        gen = (a["generation"]["resident"]["parts"]["weights_bytes"]
               - b["generation"]["resident"]["parts"]["weights_bytes"])
        assert gen == pytest.approx(dec, abs=1), w


@pytest.mark.parametrize("model,target,generates,at_defaults", [
    ("flux1-dev", "orin-nx-16gb", True, False),
    # met again since the session-21 refit on the fused-GELU training graph: 6.08 GiB against 7.1 usable (docs/plan.md)
    ("flux1-dev", "orin-nano-8gb", False, False),
    ("sd35-medium", "orin-nano-8gb", True, False),
    # at the defaults too since the text encoder in parts is not kept open by a resident generation (Gemma-2-2B):
    # 6.4 GiB of 7.1
    ("sana-1600m-1024", "orin-nano-8gb", True, True)])
def test_big_models_fit_the_small_boards_with_int8_streamed(model, target, generates, at_defaults):
    """Issue 23's targets on paper: 1024 px generation, 512 px training, the recipe's blocks; and whether they
    need the levers (int8, streamed) or also fit at the defaults (fp16, resident)."""
    r = plan(PlanOptions(model, target, weights="int8", generation="streamed"))
    bs = r["methods"]["blockskip"]
    assert bs["precompute"]["fits"] and bs["train"]["fits"], (model, target)
    if generates:
        assert bs["generate"]["fits"], (model, target)
    default = plan(PlanOptions(model, target))["methods"]["blockskip"]
    assert default["fits"] == at_defaults


def test_frozen_groups_are_maximal_skipped_runs():
    assert frozen_groups(6, (2, 3)) == [[0, 1], [4, 5]]
    assert frozen_groups(4, (0, 2)) == [[1], [3]]
    assert frozen_groups(3, (0, 1, 2)) == []


@pytest.mark.parametrize("opts,msg", [
    (dict(target="jetson-tx9"), "unknown target"),
    (dict(blocks=(99,)), "out of range"),
    (dict(train_res=2048, gen_res=1024), "above --gen-res"),
    (dict(gen_res=1000), "not a multiple"),
    (dict(weights="int3"), "--weights"),
    (dict(generation="paged"), "--generation"),
    (dict(text_encoder="paged"), "--text-encoder"),
])
def test_bad_input_is_a_clear_error(opts, msg):
    with pytest.raises(ValueError, match=msg):
        plan(PlanOptions("pixart-sigma-xl-2-1024", **{"target": "orin-nx-16gb", **opts}))


def test_cli_json_and_errors(tmp_path):
    out = subprocess.run([sys.executable, "-m", "edgeblock.cli", "plan", "--config", "sana-600m-1024", "--target",
                          "orin-nx-16gb", "--blocks", "3,4", "--json"], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout)
    assert r["model"]["trainable_blocks"] == [3, 4] and r["target"]["name"] == "orin-nx-16gb"
    bad = subprocess.run([sys.executable, "-m", "edgeblock.cli", "plan", "--config", str(tmp_path / "nope.json")],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "no such file" in bad.stderr


@pytest.mark.slow
@pytest.mark.parametrize("model", ["builtin", "cal-b", "bench"])
def test_prediction_within_15_percent_of_measurement(model):
    """The planner (config + trainable blocks only) against `bench daemon`'s measured peaks on this host."""
    pytest.importorskip("onnxruntime.training")
    from edgeblock.bench import daemon
    from edgeblock.plan.calibration import CALIBRATION_MODELS, measured_vs_predicted

    m = model if model in ("builtin", "bench") else daemon.pixel_model_dir(*CALIBRATION_MODELS[model], model)
    result = daemon.run(m, steps=4, gen_steps=1, reference_variants=("standard_lora",))
    figures = measured_vs_predicted(result)
    assert "generate" in figures and "standard_lora_train" in figures
    errors = {k: p / meas - 1 for k, (p, meas) in figures.items()}
    print(model, {k: round(v, 3) for k, v in errors.items()})
    assert all(abs(e) <= 0.15 for e in errors.values()), errors


@pytest.mark.slow
def test_bench_daemon_streams_in_a_second_daemon_when_no_budget_admits_the_job(monkeypatch):
    """`bench daemon --generation streamed` on a model whose job is predicted above its resident generation (here:
    made so): the job runs under the default budget, then a second daemon on the same state, under a budget below
    the resident prediction, streams with the job's adapter; its measured peak against the bundle's streamed
    prediction, within 15 %."""
    pytest.importorskip("onnxruntime.training")
    from edgeblock.bench import daemon

    monkeypatch.setattr(daemon, "job_prediction", lambda plan, man, precompute="": 1 << 40)
    said: list[str] = []
    r = daemon.run("builtin", steps=2, gen_steps=1, torch_reference=False, generation="streamed", progress=said.append)
    d = r["daemon"]
    assert d["generate_mode"] == "streamed" and d["generate_after_job"] is False
    assert any("second daemon" in m for m in said)
    assert d["peak_rss_generate_bytes"] > 0 and d["peak_rss_personalize_bytes"] > 0
    assert abs(r["prediction_errors"]["generate"]) <= 0.15, r["prediction_errors"]


_DECODE_PROBE = r"""
import json, sys
import numpy as np, onnxruntime as ort
from edge_runtime.memstat import pin_mmap_threshold, reset_rss_peak, rss_bytes, rss_peak_bytes, trim_heap
pin_mmap_threshold()
o = ort.SessionOptions(); o.enable_cpu_mem_arena = False; o.add_session_config_entry("session.disable_prepacking", "1")
s = ort.InferenceSession(sys.argv[1], o, providers=["CPUExecutionProvider"])
z = np.random.default_rng(0).standard_normal(json.loads(sys.argv[2])).astype(np.float32)
trim_heap(); base = rss_bytes(); reset_rss_peak()
s.run(None, {"latents": z})
print(rss_peak_bytes() - base)
"""


@pytest.mark.parametrize("kind, widths", [("kl", (32, 64, 64, 64)), ("kl", (64, 32, 64, 64)),
                                          ("dc", (64, 32, 64, 64, 64, 64))])
def test_the_vae_decode_term_follows_the_decoders_measured_peak(kind, widths, tmp_path):
    """One decode of the product's exported VAE decoder, opened as the device opens graphs, in a process of its own:
    its RSS rise against the planner's term (predict._vae_decode_act: the widest feature map of the full-resolution
    stage, AutoencoderKL's first two widths' larger, AutoencoderDC's first, x pixels x vae_decode_factor), within
    15 %."""
    import diffusers
    import torch
    from edgeblock.compile.encoders import export_vae
    from edgeblock.plan.calibration import HOST_CPU
    from edgeblock.models.codec import LatentCodec
    from edgeblock.plan.predict import _vae_decode_act

    torch.manual_seed(0)
    if kind == "kl":
        vae = diffusers.AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=16, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=widths, layers_per_block=1,
            norm_num_groups=16, scaling_factor=0.36, shift_factor=0.12, use_quant_conv=False,
            use_post_quant_conv=False).eval()
        scale, channels, entering, family = 8, 16, max(widths[:2]), "flux"
    else:
        vae = diffusers.AutoencoderDC(
            in_channels=3, latent_channels=32, attention_head_dim=8, encoder_block_types="ResBlock",
            decoder_block_types="ResBlock", encoder_block_out_channels=widths, decoder_block_out_channels=widths,
            encoder_layers_per_block=(1,) * 6, decoder_layers_per_block=(1,) * 6, encoder_qkv_multiscales=((),) * 6,
            decoder_qkv_multiscales=((),) * 6, scaling_factor=0.41).eval()
        scale, channels, entering, family = 32, 32, widths[0], "sana"
    export_vae(LatentCodec(vae, family), str(tmp_path), 64, 256, verify=False)
    res = 384
    out = subprocess.run([sys.executable, "-c", _DECODE_PROBE, str(tmp_path / "vae_decoder.onnx"),
                          json.dumps([1, channels, res // scale, res // scale])],
                         capture_output=True, text=True, check=True, timeout=300)
    measured = int(out.stdout.strip().splitlines()[-1])
    inv = copy.copy(load_inventory("flux1-dev"))
    inv.pixel_space, inv.vae_scale, inv.vae_up_channels, inv.vae_attention = False, scale, entering, False
    predicted = _vae_decode_act(inv, HOST_CPU, res) * 4
    print(kind, widths, measured / 2**20, predicted / 2**20)
    assert abs(predicted / measured - 1) <= 0.15, (measured, predicted)


def test_int8_and_fp16_groups_hold_one_column_blocks_fp32_copy_on_the_cpu():
    """An int8 / fp16 frozen group on ONNX Runtime makes fp32 copies of its weights while it runs, one stored column
    block at a time (compile/quantize.py, edge_runtime.weights.COPY_BLOCK_BYTES): the planner counts one block's copy,
    or the group's widest weight where that is smaller. None at fp32 / int4 or on TensorRT."""
    from edge_runtime.weights import COPY_BLOCK_BYTES
    from edgeblock.plan.inventory import widest_linear
    from edgeblock.plan.predict import _dequant_copies

    inv = load_inventory("flux1-dev")
    single = next(b.index for b in inv.blocks if b.kind == "single_transformer_blocks")
    double = next(b.index for b in inv.blocks if b.kind == "transformer_blocks")
    # FLUX.1-dev, width 3072: single-stream proj_out 15360 -> 3072; double-stream feed-forward 3072 <-> 12288
    assert widest_linear(inv, single) == 15360 * 3072
    assert widest_linear(inv, double) == 3072 * 12288
    groups = [[double], [double, single], []]
    small = load_inventory("builtin")  # every weight's copy below one block
    widest = max(widest_linear(small, b.index) for b in small.blocks)
    assert widest * 4 < COPY_BLOCK_BYTES
    for w in ("int8", "fp16"):
        assert _dequant_copies(inv, groups, w, gpu=False) == [COPY_BLOCK_BYTES, COPY_BLOCK_BYTES, 0.0]
        assert _dequant_copies(inv, groups, w, gpu=True) == [0.0, 0.0, 0.0]
        assert _dequant_copies(small, [[b.index for b in small.blocks]], w, gpu=False) == [widest * 4.0]
    for w in ("int4", "fp32"):
        assert _dequant_copies(inv, groups, w, gpu=False) == [0.0, 0.0, 0.0]
