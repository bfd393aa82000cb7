"""The host compiler: a diffusers DiT -> ONNX graphs (onnx_export) and ONNX Runtime training artifacts
(ort_training), verified against the torch block-skip method; the bundle and manifest are written on top."""
