"""TensorRT and CUDA, imported lazily: whether they are usable here, this machine's identity (TensorRT
version, GPU) for the cache key, cuda-python's error unwrapping and a TensorRT logger. Importing this
module needs neither TensorRT nor cuda-python.
"""

from __future__ import annotations

from .errors import EngineError

NO_TENSORRT = (
    "TensorRT is not available here ({why}). Build the engines on the device with TensorRT "
    "(JetPack 6 ships it with its Python bindings, plus `pip install cuda-python`), or on a host of the "
    "same platform. Without engines the bundle runs as it is: its frozen groups run on ONNX Runtime."
)


def _import_tensorrt():
    import tensorrt  # lazy on purpose: this module must import without TensorRT

    return tensorrt


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as e:
            raise ImportError(f"cuda-python is not installed ({e}); `pip install cuda-python`") from e
    return cudart


def _cuda(cudart, result):
    """Unwrap a cuda-python call's (error, *values) tuple; a CUDA error raises EngineError."""
    if not isinstance(result, tuple):
        result = (result,)
    err, rest = result[0], result[1:]
    if err != cudart.cudaError_t.cudaSuccess:
        try:
            msg = cudart.cudaGetErrorString(err)[1]
            msg = msg.decode() if isinstance(msg, bytes) else str(msg)
        except Exception:  # noqa: BLE001 - the error code alone still says what failed
            msg = ""
        raise EngineError(f"CUDA error {err}: {msg}".rstrip(": "))
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


def gpu_name(device: int = 0) -> str:
    """The GPU as the cache key names it: device name, compute capability and SM count (every Jetson
    Orin reports the name "Orin"; the SM count tells an Orin Nano from an AGX Orin)."""
    cudart = _cudart()
    props = _cuda(cudart, cudart.cudaGetDeviceProperties(device))
    name = props.name
    if isinstance(name, (bytes, bytearray)):
        name = bytes(name).split(b"\0", 1)[0].decode("utf-8", "replace")
    return f"{str(name).strip()} sm_{props.major}{props.minor} {props.multiProcessorCount}SM"


def _runtime_identity() -> tuple[str, str]:
    """(TensorRT version, GPU name) of this machine; raises when either is unavailable."""
    trt = _import_tensorrt()
    return str(trt.__version__), gpu_name()


def tensorrt_available() -> tuple[bool, str]:
    """Whether engines can be built and run here, and why not."""
    try:
        trt = _import_tensorrt()
    except Exception as e:  # noqa: BLE001 - ImportError, or OSError from a missing libnvinfer
        return False, f"the tensorrt Python package is not importable: {e}"
    try:
        gpu = gpu_name()
    except Exception as e:  # noqa: BLE001
        return False, f"tensorrt {trt.__version__} is installed but no CUDA GPU is usable: {e}"
    return True, f"tensorrt {trt.__version__} on {gpu}"


def _require_tensorrt():
    ok, why = tensorrt_available()
    if not ok:
        raise EngineError(NO_TENSORRT.format(why=why))
    return _import_tensorrt()


def _logger(trt, severity=None):
    """A TensorRT logger that prints warnings and keeps the errors for the exception message."""

    threshold = severity if severity is not None else trt.ILogger.Severity.WARNING

    class _Log(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, sev, msg):
            if sev in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(str(msg))
            if int(sev) <= int(threshold):  # INTERNAL_ERROR 0, ERROR 1, WARNING 2, INFO 3, VERBOSE 4
                print(f"[tensorrt] {msg}", flush=True)

    return _Log()
