"""Inference backends behind one small interface, numpy in and out (no torch).

    backend = open_backend(artifact_path, runtime, threads=1)
    logits = backend.run(x)          # x: the array preprocess_faces() made, any batch
    backend = open_artifact(bundle.artifact())   # a verified bundle's artifact: from its checked bytes

``BACKENDS`` is the one table of runtimes: a bundle's artifact names its
runtime, and ``open_backend`` looks the class up here (``register_backend``
adds one).  Each backend runs batch-1 artifacts image by image, so callers
never care whether an artifact was exported with a fixed batch of 1 (the
default for devices) or a dynamic one.  INT8 TFLite models get their inputs
quantized and outputs dequantized here with the scales stored in the model.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from fer_edge.targets.jetson import TensorRTBackend
from fer_edge.targets.runtime import (Backend, BackendUnavailable, BundleError, first_line,  # noqa: F401
                                      native_output_silenced)


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


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, path, threads: int | None = None, providers=None, content: bytes | None = None):
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
        self.session = ort.InferenceSession(str(path) if content is None else content, opts,
                                            providers=providers or ["CPUExecutionProvider"])
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
    """LiteRT's interpreter (ai-edge-litert: the TFLite runtime that works with numpy 2)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise BackendUnavailable("no TFLite runtime: pip install ai-edge-litert") from None
    return Interpreter


class TFLiteBackend(Backend):
    name = "tflite"

    def __init__(self, path, threads: int | None = None, content: bytes | None = None):
        Interpreter = _tflite_interpreter_class()
        source = {"model_path": str(path)} if content is None else {"model_content": content}
        with native_output_silenced():
            self.interp = Interpreter(**source, num_threads=threads or None)
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


def _tensorrt_backend(path, threads: int | None = None, content: bytes | None = None) -> Backend:
    """TensorRT runs a serialized engine (threads do not apply)."""
    return TensorRTBackend(path, content=content)


@dataclass(frozen=True)
class Runtime:
    opens: Callable[..., Backend]     # a Backend class (or factory) called as (path, threads[, content=])
    modules: tuple[str, ...]          # the Python modules it needs (what `fer-edge info` reports)
    from_bytes: bool = False          # opens(..., content=bytes) loads the model from those bytes


# The one table of runtimes: name (as a bundle manifest writes it) -> how to open an artifact.
BACKENDS: dict[str, Runtime] = {
    "onnxruntime": Runtime(OnnxRuntimeBackend, ("onnxruntime",), from_bytes=True),
    "tflite": Runtime(TFLiteBackend, ("ai_edge_litert",), from_bytes=True),
    "tensorrt": Runtime(_tensorrt_backend, ("tensorrt",), from_bytes=True),
}


def register_backend(name: str, backend: Callable[..., Backend], modules: tuple[str, ...] = (),
                     from_bytes: bool = False) -> None:
    """Add (or replace) a runtime: ``backend(path, threads)`` opens an artifact;
    with from_bytes, ``backend(path, threads, content=bytes)`` loads it from the
    bundle's verified bytes (otherwise it reads the file again, after the check)."""
    BACKENDS[name] = Runtime(backend, tuple(modules), from_bytes)


def unregister_backend(name: str) -> None:
    BACKENDS.pop(name, None)


def runtime_names() -> tuple[str, ...]:
    return tuple(BACKENDS)


def runtime_modules() -> tuple[str, ...]:
    """Every Python module a registered runtime needs, in table order."""
    return tuple(dict.fromkeys(m for r in BACKENDS.values() for m in r.modules))


def open_artifact(artifact, threads: int | None = None, runtime: str | None = None) -> Backend:
    """The backend for a bundle's Artifact (load_bundle's): from the bytes the
    bundle check verified when it has them, else from its file."""
    return open_backend(artifact.path, runtime or artifact.runtime, threads, content=artifact.content)


def open_backend(path, runtime: str, threads: int | None = None, content: bytes | None = None) -> Backend:
    """The backend for an artifact; ``runtime`` as listed in the bundle manifest.
    content: the artifact's bytes, already verified (then the file is not read
    again where the runtime can load bytes).  BackendUnavailable: the runtime
    is not installed here; BundleError: the artifact is not something the
    runtime can load (corrupt, truncated, another format)."""
    entry = BACKENDS.get(runtime) if isinstance(runtime, str) else None
    if entry is None:
        raise BundleError(f"unknown runtime {runtime!r} (known: {', '.join(BACKENDS)})")
    path = Path(path)
    if content is None or not entry.from_bytes:
        try:
            found = path.is_file()
        except OSError as exc:  # a path the OS refuses (too long, a loop of links)
            raise BundleError(f"{str(path)[:200]}: {exc.strerror or exc}") from None
        if not found:
            raise BundleError(f"{path}: no such artifact file")
    try:
        if content is not None and entry.from_bytes:
            return entry.opens(path, threads, content=content)
        return entry.opens(path, threads)
    except (BackendUnavailable, BundleError, KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001  (each runtime raises its own types for a bad file)
        raise BundleError(f"{path}: {runtime} cannot load it (corrupt or not a {runtime} model): "
                          f"{first_line(exc)}") from None
