"""Deployment targets, named once for the device and the host (numpy-free): the names a bundle's manifest
records (`edgeblock compile --target`), the names the planner predicts for (`edgeblock plan --target`), and
what is known of each Jetson board. The planner's runtime-cost estimates stay with it (sdk/edgeblock/plan).
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 2**30


@dataclass(frozen=True)
class Board:
    """A Jetson module: one LPDDR pool shared by its CPU and GPU."""

    name: str
    description: str
    memory_bytes: int
    gpu: bool = True


JETSONS: dict[str, Board] = {b.name: b for b in (
    Board("orin-nano-8gb", "Jetson Orin Nano 8GB (JetPack 6): 8 GB LPDDR5 shared by CPU and GPU", 8 * GiB),
    Board("orin-nx-16gb", "Jetson Orin NX 16GB (JetPack 6): 16 GB LPDDR5 shared", 16 * GiB),
    Board("agx-orin-32gb", "Jetson AGX Orin 32GB (JetPack 6): 32 GB LPDDR5 shared", 32 * GiB),
    Board("agx-orin-64gb", "Jetson AGX Orin 64GB (JetPack 6): 64 GB LPDDR5 shared", 64 * GiB),
)}

CPU = "cpu"  # a bundle for any CPU (ONNX Runtime's CPU provider)
HOST_CPU = "host-cpu"  # the planner's: this machine's CPU, where its calibration was measured

# what `edgeblock compile --target` accepts and a manifest may record (the manifest's default: CPU)
BUNDLE_TARGETS: tuple[str, ...] = (CPU, *JETSONS)
# what `edgeblock plan --target` predicts for (and "all" of them)
PLAN_TARGETS: tuple[str, ...] = (HOST_CPU, *JETSONS)

