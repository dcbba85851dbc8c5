"""On-device runtimes (installed as ``fer_edge.targets``).  Nothing here imports torch:
numpy, OpenCV and one inference backend (TensorRT, ONNX Runtime or LiteRT/TFLite)."""
from fer_edge.contract import preprocess_faces, softmax
from fer_edge.targets.backends import Backend, BackendUnavailable, open_artifact, open_backend
from fer_edge.targets.bundle import Bundle, BundleError, load_bundle

__all__ = ["Backend", "BackendUnavailable", "open_artifact", "open_backend", "Bundle", "BundleError", "load_bundle",
           "preprocess_faces", "softmax"]
