"""edge_runtime: the device side of edgeblock (numpy, ONNX Runtime, gRPC; never torch).

Code both sides need (patch sampling, samplers, manifest schema) lives here,
numpy-only, and the host imports it.
"""

__version__ = "0.8.1"
