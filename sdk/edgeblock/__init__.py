"""edgeblock: host-side SDK for on-device DiT personalization (DiT-BlockSkip).

The host compiles diffusers DiTs into device bundles; the device package
`edge_runtime` runs them. This package also holds the method in PyTorch.
"""

__version__ = "0.8.1"
