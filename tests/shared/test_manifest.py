"""The bundle manifest: written with hashes, refused when its version, fields or files are wrong."""

from __future__ import annotations

import json

import pytest

from edge_runtime.manifest import SCHEMA_VERSION, Manifest, ManifestError, load_manifest, write_manifest


def _bundle(tmp_path):
    (tmp_path / "frozen").mkdir()
    (tmp_path / "frozen" / "group_00.onnx").write_bytes(b"graph-bytes")
    (tmp_path / "prologue.onnx").write_bytes(b"prologue")
    m = Manifest(
        family="flux",
        blocks=[{"index": i, "name": f"b{i}", "role": "trainable" if i in (1, 2) else "frozen"} for i in range(4)],
        trainable=[1, 2],
        train_res=32,
        gen_res=64,
        scheduler={"kind": "flow"},
        patch_schedule={"kind": "linear", "f_min": 0.5, "f_max": 1.0, "levels": 3},
        lora={"rank": 4, "alpha": 4.0},
    )
    write_manifest(str(tmp_path), m)
    return tmp_path


def test_round_trip_with_hashes(tmp_path):
    b = _bundle(tmp_path)
    m = load_manifest(str(b))
    assert m.schema_version == SCHEMA_VERSION and m.trainable == [1, 2]
    assert set(m.files) == {"frozen/group_00.onnx", "prologue.onnx"}
    assert all(len(h) == 64 for h in m.files.values())


def test_corrupt_file_is_named(tmp_path):
    b = _bundle(tmp_path)
    (b / "frozen" / "group_00.onnx").write_bytes(b"graph-bytez")
    with pytest.raises(ManifestError, match="frozen/group_00.onnx is corrupt"):
        load_manifest(str(b))
    load_manifest(str(b), verify_files=False)  # the fields alone still validate


def test_missing_file_and_unknown_version(tmp_path):
    b = _bundle(tmp_path)
    (b / "prologue.onnx").unlink()
    with pytest.raises(ManifestError, match="prologue.onnx listed in the manifest is missing"):
        load_manifest(str(b))
    d = json.loads((b / "manifest.json").read_text())
    d["schema_version"] = 99
    (b / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ManifestError, match="schema_version 99 is not supported"):
        load_manifest(str(b), verify_files=False)


@pytest.mark.parametrize("field,value,msg", [("trainable", [], "non-empty"), ("trainable", [7], "non-empty subset"),
                                              ("target", "xavier", "not one of"), ("gen_res", 0, "positive"),
                                              ("lora", {"alpha": 4.0}, "lora.rank"), ("lora", {"rank": 0}, "lora.rank"),
                                              ("patch_schedule", "linear", "must be an object")])
def test_bad_fields_are_refused(tmp_path, field, value, msg):
    b = _bundle(tmp_path)
    d = json.loads((b / "manifest.json").read_text())
    d[field] = value
    (b / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ManifestError, match=msg):
        load_manifest(str(b), verify_files=False)


def test_typed_parts(tmp_path):
    """lora_rank / lora_alpha / crop_ids read the manifest's parts; older bundles (no alpha, no crop ids) get
    alpha = rank and the crop's own grid."""
    m = load_manifest(str(_bundle(tmp_path)))
    assert (m.lora_rank, m.lora_alpha, m.crop_ids) == (4, 4.0, "grid")
    m.lora, m.patch_schedule = {"rank": 8, "alpha": 16}, {**m.patch_schedule, "crop_ids": "image"}
    assert (m.lora_rank, m.lora_alpha, m.crop_ids) == (8, 16.0, "image")
    r = m.training_recipe()
    assert (r.lora_rank, r.lora_alpha, r.crop_ids, r.trainable_blocks) == (8, 16.0, "image", 2)


def test_not_a_bundle(tmp_path):
    with pytest.raises(ManifestError, match="is not a bundle"):
        load_manifest(str(tmp_path))


def test_gen_sizes_are_the_squares_then_the_listed_sizes_and_are_checked(tmp_path):
    import argparse

    from edgeblock.cli.argtypes import sizes

    from edge_runtime.memory_plan import equivalent_side

    b = _bundle(tmp_path)
    m = load_manifest(str(b))
    assert m.served_sizes() == [(32, 32), (64, 64)] and "gen_sizes" not in m.to_dict()  # written as before
    m.gen_sizes = [[64, 48], [48, 64], [64, 64]]
    write_manifest(str(b), m)
    assert load_manifest(str(b)).served_sizes() == [(32, 32), (64, 64), (64, 48), (48, 64)]
    d = json.loads((b / "manifest.json").read_text())
    for bad in ([[64]], [[64, 0]], "64x48", [[64, True]]):
        (b / "manifest.json").write_text(json.dumps({**d, "gen_sizes": bad}))
        with pytest.raises(ManifestError, match="gen_sizes"):
            load_manifest(str(b), verify_files=False)
    assert sizes("768x512, 512X768,96") == ((768, 512), (512, 768), (96, 96))
    for text in ("64x", "axb", "0x64", ","):
        with pytest.raises(argparse.ArgumentTypeError, match="--gen-sizes"):
            sizes(text)
    assert equivalent_side(64, 48, 4) == 56 and equivalent_side(64, 64, 4) == 64 and equivalent_side(768, 512, 16) == 640
