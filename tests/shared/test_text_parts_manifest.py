"""manifest.graphs.text_encoder.parts (a text encoder compiled in parts): read back as written, refused when
malformed, and each part's graph key (graph_names.text_part_file) looked up for its weight precision."""

from __future__ import annotations

import pytest

from edge_runtime import graph_names as gn
from edge_runtime.manifest import Manifest, ManifestError, load_manifest, validate_fields, write_manifest

PARTS = [{"path": gn.text_part_file(0), "inputs": ["input_ids"], "outputs": ["h"], "bytes": 8},
         {"path": gn.text_part_file(1), "inputs": ["h", "attention_mask"], "outputs": ["text", "pooled"], "bytes": 9}]


def _manifest(parts, weights=None) -> Manifest:
    return Manifest(family="builtin", blocks=[{"index": i, "name": f"b{i}", "role": "frozen"} for i in range(2)],
                    trainable=[1], train_res=32, gen_res=64, scheduler={"kind": "flow"}, patch_schedule={},
                    lora={"rank": 4}, graphs={"text_encoder": {"tokenizers": [], "outputs": ["text"], "parts": parts}},
                    weights=weights or {})


def test_parts_round_trip_and_their_graph_keys(tmp_path):
    (tmp_path / "text_encoder").mkdir()
    for p in PARTS:
        (tmp_path / p["path"]).write_bytes(b"x" * p["bytes"])
    weights = {"precision": "int8", "graphs": {gn.graph_key(p["path"]): {} for p in PARTS}}
    write_manifest(str(tmp_path), _manifest(PARTS, weights))
    m = load_manifest(str(tmp_path))
    assert m.graphs["text_encoder"]["parts"] == PARTS and set(m.files) == {p["path"] for p in PARTS}
    assert [gn.graph_key(p["path"]) for p in PARTS] == ["text_encoder/part_00", "text_encoder/part_01"]
    assert all(m.graph_weights(gn.graph_key(p["path"])) == "int8" for p in PARTS)
    assert m.graph_weights("text_encoder") == "fp32"  # no whole encoder was quantized


@pytest.mark.parametrize("parts", [
    [], "text_encoder/part_00.onnx", [{"path": "text_encoder/part_00.bin", "inputs": [], "outputs": ["text"]}],
    [{**PARTS[0], "outputs": []}], [{**PARTS[0], "inputs": "input_ids"}], [{**PARTS[0], "bytes": -1}],
    [{**PARTS[0], "bytes": True}], [{"inputs": [], "outputs": ["text"]}],
])
def test_malformed_parts_are_refused(parts):
    with pytest.raises(ManifestError, match="text_encoder.parts"):
        validate_fields(_manifest(parts).to_dict())


def test_a_text_encoder_without_parts_validates_as_before():
    d = _manifest(PARTS).to_dict()
    del d["graphs"]["text_encoder"]["parts"]
    d["graphs"]["text_encoder"]["path"] = "text_encoder.onnx"
    validate_fields(d)
