"""edge_runtime.text_lookup: token-embedding rows read from a bundle's table file, and compile's Gathers taken out
of the text graph (every family's text stack: the device's encoding with lookups equals the graph with its tables)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from edge_runtime.text_lookup import LookupError_, check_lookups, lookup, table_layout, write_table


def test_lookup_reads_the_rows_of_the_ids(tmp_path):
    rng = np.random.default_rng(0)
    table = rng.standard_normal((1000, 48)).astype(np.float32)
    path = str(tmp_path / "t" / "lookup_00.npy")
    write_table(path, table)
    assert table_layout(path)[:2] == (1000, 48)
    ids = np.array([[5, 999, 5, 0], [17, 17, 17, 3]], np.int64)  # repeats, both ends of the table
    got = lookup(path, ids)
    assert got.dtype == np.float32 and got.shape == (2, 4, 48)
    np.testing.assert_array_equal(got, table[ids])
    assert lookup(path, np.zeros((2, 0), np.int64)).shape == (2, 0, 48)


def test_bad_ids_and_tables_are_refused(tmp_path):
    path = str(tmp_path / "t.npy")
    write_table(path, np.ones((10, 4), np.float32))
    with pytest.raises(LookupError_, match="token id 10 is outside the embedding table's 10 rows"):
        lookup(path, np.array([[1, 10]]))
    with pytest.raises(LookupError_, match="token id -1"):
        lookup(path, np.array([-1]))
    with pytest.raises(LookupError_, match="integers"):
        lookup(path, np.array([1.0]))
    with open(path, "r+b") as f:  # truncated: the last row's bytes are gone
        f.truncate(os.path.getsize(path) - 8)
    with pytest.raises(LookupError_, match="truncated at row 9"):
        lookup(path, np.array([9]))
    other = str(tmp_path / "f64.npy")
    np.save(other, np.ones((10, 4)))
    with pytest.raises(LookupError_, match="float32"):
        lookup(other, np.array([1]))
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    with pytest.raises(LookupError_, match="junk.npy"):
        lookup(str(tmp_path / "junk.npy"), np.array([1]))
    with pytest.raises(LookupError_, match="2-D"):
        write_table(str(tmp_path / "x.npy"), np.ones(3, np.float32))
    with pytest.raises(LookupError_, match="bad text encoder lookup"):
        check_lookups([{"ids": "input_ids", "table": "t.npy", "output": "e", "rows": 0, "dim": 4}])
    with pytest.raises(LookupError_, match="must be a list"):
        check_lookups({"ids": "input_ids"})


@pytest.mark.parametrize("family", ["builtin", "flux", "sd3", "pixart", "sana"])
def test_every_text_stack_encodes_the_same_with_its_tables_as_lookups(family, tmp_path):
    """compile.text_lookup on each family's exported text encoder (every token table taken out: min_bytes=0): the
    graph keeps no Gather over a tokenizer's ids, the device encodes as the graph with its tables did (resident and
    streamed), and the table files are the modules' embedding weights."""
    pytest.importorskip("onnxruntime")
    import onnx
    from edgeblock.compile.encoders import export_text_encoder
    from edgeblock.compile.text_lookup import externalize_lookups
    from edgeblock.models.pipeline_parts import load_text_stack

    from edge_runtime.text import TextEncodeError, TextEncoder

    if family == "builtin":
        spec = "builtin"
    else:
        from pipelines import make_tiny_pipeline

        spec = make_tiny_pipeline(family, tmp_path / "pipe")
    d = str(tmp_path / "te")
    desc = export_text_encoder(load_text_stack(spec), d)  # compile's own lookups (MIN_TABLE_BYTES), against torch
    assert desc["verification"]["max_rel"] <= 1e-4, desc["verification"]
    ids = {t["ids"] for t in desc["tokenizers"]}
    prompts = ["a photo of sks dog on a beach", "", "a red cat in the snow"]
    model = onnx.load(os.path.join(d, "text_encoder.onnx"))
    if not desc.get("lookups"):  # the tiny stacks' tables are under compile's threshold: take them out here
        ref = TextEncoder(d, desc).encode(prompts)
        got = externalize_lookups(d, desc, min_bytes=0)
        assert got and desc["lookups"] == got
        model = onnx.load(os.path.join(d, "text_encoder.onnx"))
        for k, v in TextEncoder(d, desc).encode(prompts).items():
            np.testing.assert_allclose(v, ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert len(desc["lookups"]) == len(ids)  # one token table per tokenizer
    gone = {x["weight"] for x in desc["lookups"]}  # the tables' initializers, out of the graph
    assert not gone & ({t.name for t in model.graph.initializer} | {i for n in model.graph.node for i in n.input})
    names = {i.name for i in model.graph.input}
    assert {x["output"] for x in desc["lookups"]} <= names and set(desc["inputs"]) == names
    resident = TextEncoder(d, desc).encode(prompts)
    streamed = TextEncoder(d, desc, streamed=True).encode(prompts)
    for k in resident:
        np.testing.assert_allclose(streamed[k], resident[k], rtol=1e-5, atol=1e-6)
    os.remove(os.path.join(d, *desc["lookups"][0]["table"].split("/")))
    with pytest.raises(TextEncodeError, match="missing from the bundle"):
        TextEncoder(d, desc)
