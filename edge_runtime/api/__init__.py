"""The device API's gRPC stubs, generated from proto/edgeblock/v1/edgeblock.proto.

    from edge_runtime.api import edgeblock_pb2 as pb, edgeblock_pb2_grpc as pb_grpc, SERVICE_NAME

edgeblock_pb2*.py(i) are written by `make proto` (python -m edge_runtime.api.generate);
never edit them by hand. Only this file is hand-written.
"""

from . import edgeblock_pb2, edgeblock_pb2_grpc

# "edgeblock.v1.EdgeBlock": for server reflection and per-service health status.
SERVICE_NAME: str = edgeblock_pb2.DESCRIPTOR.services_by_name["EdgeBlock"].full_name


def kind_name(kind: int) -> str:
    """A JobEvent kind's short name: "DONE" for KIND_DONE (the value names carry their enum's prefix)."""
    return edgeblock_pb2.JobEvent.Kind.Name(kind).removeprefix("KIND_")


def state_name(state: int) -> str:
    """A Job state's short name: "DONE" for STATE_DONE, as job.json records it."""
    return edgeblock_pb2.Job.State.Name(state).removeprefix("STATE_")


__all__ = ["SERVICE_NAME", "edgeblock_pb2", "edgeblock_pb2_grpc", "kind_name", "state_name"]
