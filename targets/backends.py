"""Inference backends behind one small interface, numpy in and out (no torch).

    backend = open_backend(artifact_path, runtime, threads=1)
    logits = backend.run(x)          # x: the array preprocess_faces() made, any batch

Each backend runs batch-1 artifacts image by image, so callers never care
whether an artifact was exported with a fixed batch of 1 (the default for
devices) or a dynamic one.  INT8 TFLite models get their inputs quantized and
outputs dequantized here with the scales stored in the model.
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import numpy as np


@contextlib.contextmanager
def native_output_silenced(fds=(2,)):
    """Send what C/C++ code writes straight to these file descriptors (1 = stdout,
    2 = stderr) to /dev/null meanwhile.  Native libraries log there unasked:
    LiteRT's "INFO: Created TensorFlow Lite XNNPACK delegate", absl/MLIR lines
    from the converters; the user's terminal is for real problems."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(fd) for fd in fds]
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in fds:
        os.dup2(devnull, fd)
    try:
        yield
    finally:
        for fd, s in zip(fds, saved):
            os.dup2(s, fd)
            os.close(s)
        os.close(devnull)


class BackendUnavailable(RuntimeError):
    """The runtime this artifact needs is not installed here."""


def import_onnxruntime():
    """onnxruntime with its telemetry off: ORT_DISABLE_TELEMETRY (set by
    fer_edge/__init__ before any import) stops its files under ~/.cache, and
    disable_telemetry_events() its event logging where the build has one."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendUnavailable("onnxruntime is not installed (pip install onnxruntime)") from None
    if hasattr(ort, "disable_telemetry_events"):
        ort.disable_telemetry_events()
    return ort


class Backend:
    name = "base"

    def run_batch(self, x: np.ndarray) -> np.ndarray:  # one call of the native runtime
        raise NotImplementedError

    @property
    def fixed_batch(self) -> int | None:
        return None

    def run(self, x: np.ndarray) -> np.ndarray:
        fb = self.fixed_batch
        if fb is None or len(x) == fb:
            return self.run_batch(x)
        if fb != 1:
            raise ValueError(f"artifact takes batches of exactly {fb}")
        return np.concatenate([self.run_batch(x[i:i + 1]) for i in range(len(x))])

    def latency_ms(self, sample: np.ndarray, runs: int = 100, warmup: int = 10) -> float:
        """Median wall time of one batch-1 call, in ms."""
        one = sample[:1]
        for _ in range(warmup):
            self.run_batch(one)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            self.run_batch(one)
            times.append(time.perf_counter() - t0)
        return float(np.median(times) * 1e3)


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, path, threads: int | None = None, providers=None):
        ort = import_onnxruntime()
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        # ORT's worker threads spin after each run by default, stealing the
        # cores the face detector needs right after (measured: detect 25 ->
        # 35 ms per 640x480 frame on 2 cores).  Per-frame inference is short.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self._batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        self.input_type = inp.type

    @property
    def fixed_batch(self):
        return self._batch

    def run_batch(self, x):
        return self.session.run(None, {self.input_name: x})[0].astype(np.float32)


def _tflite_interpreter_class():
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter
    except ImportError:
        pass
    try:  # the old standalone runtime (fails on numpy 2; kept as a fallback only)
        from tflite_runtime.interpreter import Interpreter

        return Interpreter
    except ImportError:
        raise BackendUnavailable("no TFLite runtime: pip install ai-edge-litert") from None


class TFLiteBackend(Backend):
    name = "tflite"

    def __init__(self, path, threads: int | None = None):
        Interpreter = _tflite_interpreter_class()
        with native_output_silenced():
            self.interp = Interpreter(model_path=str(path), num_threads=threads or None)
            self.interp.allocate_tensors()
        self.inp = self.interp.get_input_details()[0]
        self.out = self.interp.get_output_details()[0]

    @property
    def fixed_batch(self):
        return int(self.inp["shape"][0])

    def run_batch(self, x):
        dtype = self.inp["dtype"]
        scale, zero = self.inp["quantization"]
        if dtype in (np.int8, np.uint8, np.int16) and np.issubdtype(x.dtype, np.floating) and scale:
            info = np.iinfo(dtype)
            x = np.clip(np.round(x / scale) + zero, info.min, info.max).astype(dtype)
        self.interp.set_tensor(self.inp["index"], np.ascontiguousarray(x, dtype=dtype))
        self.interp.invoke()
        y = self.interp.get_tensor(self.out["index"])
        oscale, ozero = self.out["quantization"]
        if y.dtype != np.float32 and oscale:
            return (y.astype(np.float32) - ozero) * np.float32(oscale)
        return y.astype(np.float32)


def open_backend(path, runtime: str, threads: int | None = None) -> Backend:
    """The backend for an artifact; ``runtime`` as listed in the bundle manifest."""
    path = Path(path)
    if runtime == "onnxruntime":
        return OnnxRuntimeBackend(path, threads)
    if runtime == "tflite":
        return TFLiteBackend(path, threads)
    if runtime == "tensorrt":
        from fer_edge.targets.jetson import TensorRTBackend

        return TensorRTBackend(path)
    raise BackendUnavailable(f"unknown runtime {runtime!r}")
