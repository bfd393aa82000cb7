"""The bundle graphs' contract (numpy-free): tensor names, graph kinds and files, and the chain order.

The host compiler (sdk/edgeblock/compile) names every ONNX input and output by these rules and the
device (runtime.py, personalize.py) reads them back by the same rules: written here once, for both.
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from typing import Any

# ---------------------------------------------------------------------------------------------
# Tensor names
# ---------------------------------------------------------------------------------------------
SLOTS = ("image", "text")  # the state's streams, in State order (SD3's last block ends the text stream)
STATE = "state"  # state.<slot>: a graph's state input
OUT = "out"  # out.<slot>: a graph's state output, fed to the next graph as state.<slot>
CTX = "ctx"  # ctx.<key> / ctx.<key>.<j>: the prologue's context tensors
HW = "ctx.hw"  # zeros (H, W): its SHAPE carries the latent size (ctx["shape"], Sana's ctx["grid"])
GAP = "gap"  # gap_<start>_<end>.<slot>: the summed residual of skipped blocks start..end
PREDICTION = "prediction"  # the epilogue's output (B, C, H, W)
TARGET = "target"  # the training graph's regression target
LOSS = "loss"  # the training graph's output

# ---------------------------------------------------------------------------------------------
# Graph kinds and files (manifest.graphs is keyed by the file's path without ".onnx")
# ---------------------------------------------------------------------------------------------
PROLOGUE = "prologue"
GROUP = "group"  # frozen/group_NN.onnx: a run of skipped blocks
TRAINABLE_INFER = "trainable_infer"  # trainable/infer*.onnx: a trainable block, its LoRA weights as inputs
EPILOGUE = "epilogue"
TRAINING = "training"  # trainable/: the ORT training artifacts
GRAPH_KINDS = (PROLOGUE, GROUP, TRAINABLE_INFER, EPILOGUE, TRAINING)
PROLOGUE_FILE = "prologue.onnx"
EPILOGUE_FILE = "epilogue.onnx"
FROZEN_DIR = "frozen"
TRAINABLE_DIR = "trainable"
TEXT_ENCODER = "text_encoder"  # manifest.graphs key of the text encoder (text_encoder.onnx, or its parts)
TEXT_PARTS_DIR = "text_encoder"  # text_encoder/part_NN.onnx: the text encoder cut into consecutive parts
# chain run kinds (manifest.model.generation_chain[*].kind)
FROZEN_RUN, TRAINABLE_RUN = "frozen", "trainable"


def state_name(slot: str, prefix: str = STATE) -> str:
    """`state.<slot>` (or `<prefix>.<slot>`: `out.image`, `gap_2_4.text`)."""
    return f"{prefix}.{slot}"


def ctx_name(key: str, index: int | None = None) -> str:
    """`ctx.<key>`, or `ctx.<key>.<index>` for an item of a tuple in ctx (FLUX rotary: cos, sin)."""
    return f"{CTX}.{key}" if index is None else f"{CTX}.{key}.{index}"


def is_state(name: str) -> bool:
    return name.startswith(STATE + ".")


def is_ctx(name: str) -> bool:
    return name.startswith(CTX + ".")


def is_gap(name: str) -> bool:
    return name.startswith(GAP + "_")


def slot_of(name: str) -> str:
    """The slot a `<prefix>.<slot>` name names."""
    return name.rsplit(".", 1)[-1]


def slots(names: Sequence[str], prefix: str = STATE) -> dict[str, str]:
    """slot -> name of the `<prefix>.<slot>` names among `names` (a GraphSpec's state_in / state_out)."""
    return {n[len(prefix) + 1 :]: n for n in names if n.startswith(prefix + ".")}


def gap_prefix(start: int, end: int) -> str:
    """`gap_<start>_<end>`: the residual input prefix of the skipped blocks start..end (inclusive)."""
    return f"{GAP}_{int(start)}_{int(end)}"


def parse_gap(name: str) -> tuple[int, int, str]:
    """`gap_<s>_<e>` or `gap_<s>_<e>.<slot>` -> (s, e, `gap_<s>_<e>`); ValueError for anything else."""
    prefix = name.split(".", 1)[0]
    parts = prefix.split("_")
    if len(parts) != 3 or parts[0] != GAP or not (parts[1].isdigit() and parts[2].isdigit()):
        raise ValueError(f"{name!r} is not a gap residual name (gap_<start>_<end>[.<slot>])")
    return int(parts[1]), int(parts[2]), prefix


def gap_spans(names: Sequence[str]) -> list[tuple[int, int, str]]:
    """The gaps the `gap_*` names among `names` cover: sorted (start, end, prefix)."""
    return sorted({parse_gap(n) for n in names if is_gap(n)})


def group_file(k: int) -> str:
    """frozen/group_NN.onnx: the k-th frozen group in block order."""
    return f"{FROZEN_DIR}/group_{k:02d}.onnx"


def infer_file(k: int, runs: int) -> str:
    """trainable/infer.onnx for one trainable block; trainable/infer_NN.onnx, one per block, otherwise."""
    return f"{TRAINABLE_DIR}/infer.onnx" if runs == 1 else f"{TRAINABLE_DIR}/infer_{k:02d}.onnx"


def text_part_file(k: int) -> str:
    """text_encoder/part_NN.onnx: the k-th part of a text encoder compiled in parts (its graph key drops .onnx)."""
    return f"{TEXT_PARTS_DIR}/part_{k:02d}.onnx"


def graph_key(rel_path: str) -> str:
    """manifest.graphs key of a graph file: its bundle-relative POSIX path without `.onnx`."""
    if not rel_path.endswith(".onnx"):
        raise ValueError(f"{rel_path!r} is not an .onnx graph path")
    return rel_path[: -len(".onnx")]


# ---------------------------------------------------------------------------------------------
# The chain
# ---------------------------------------------------------------------------------------------
def chain_runs(num_blocks: int, trainable: Sequence[int]) -> list[tuple[str, list[int]]]:
    """The generation order over all blocks: maximal ("frozen", run) items and one ("trainable", [block]) item per
    trainable block.

    Each frozen run is one or more frozen groups (the compiler may cut it by size), each trainable block one infer
    graph: the trainable blocks' generation weights stay fp32 whatever the bundle's precision (edge_runtime.weights),
    so a streamed generation, which holds one graph at a time, holds one fp32 block instead of a run of them. The
    chain is the prologue, these items in block order, the epilogue.
    """
    chosen = set(int(b) for b in trainable)
    out: list[tuple[str, list[int]]] = []
    for i in range(num_blocks):
        if i in chosen:
            out.append((TRAINABLE_RUN, [i]))
        elif out and out[-1][0] == FROZEN_RUN:
            out[-1][1].append(i)
        else:
            out.append((FROZEN_RUN, [i]))
    return out


def chain_graphs(run_graphs: Sequence[str]) -> list[str]:
    """Graph names in generation order: the prologue, each run's graph, the epilogue."""
    return [PROLOGUE, *run_graphs, EPILOGUE]


def fold_outputs(acc: MutableMapping[str, Any], outputs: dict[str, Any], state_in: Sequence[str],
                 state_out: Sequence[str]) -> None:
    """Fold a graph's outputs into the tensors accumulated along the chain: `out.<slot>` becomes
    `state.<slot>` for the next graph, and a stream the graph ended (SD3: a state input with no
    state output while others have one) is dropped."""
    for slot in state_in:
        if state_out and slot not in state_out:
            acc.pop(state_name(slot), None)
    for n, v in outputs.items():
        acc[state_name(n[len(OUT) + 1 :]) if n.startswith(OUT + ".") else n] = v
