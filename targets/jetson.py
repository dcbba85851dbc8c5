"""Jetson: build a TensorRT engine from a bundle's ONNX and run it.

Needs the ``tensorrt`` Python package (JetPack ships it) and, to run an
engine, ``cuda-python`` for device buffers.  Nothing here imports torch.
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np

from fer_edge.fileio import sha256_file, write_bytes_atomic, write_json_atomic
from fer_edge.targets.runtime import Backend, BackendUnavailable

PRECISIONS = ("fp32", "fp16", "int8")


def _tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendUnavailable("TensorRT is not installed (on a Jetson it comes with JetPack: "
                                 "python3 -c 'import tensorrt')") from None
    return trt


def build_engine(onnx_path, precision: str, out_path, workspace_mb: int = 1024,
                 onnx_bytes: bytes | None = None) -> Path:
    """Parse the ONNX (onnx_bytes: its verified bytes, else the file), build a
    serialized engine and write it (atomically).

    int8 bundles are explicitly quantized (Q/DQ nodes carry the scales), so the
    INT8 flag is enough: no calibrator, no images on the device.  FP16 is also
    enabled for int8 so layers outside Q/DQ pairs do not fall back to fp32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}")
    trt = _tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # TensorRT < 10 needs it, 10 ignores it
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes if onnx_bytes is not None else Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    inp = network.get_input(0)
    if inp.shape[0] == -1:  # dynamic batch: optimize for 1, allow up to 32 faces per frame
        profile = builder.create_optimization_profile()
        rest = tuple(inp.shape[1:])
        profile.set_shape(inp.name, (1, *rest), (1, *rest), (32, *rest))
        config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise RuntimeError(f"TensorRT failed to build a {precision} engine from {onnx_path}")
    out_path = Path(out_path)
    write_bytes_atomic(out_path, bytes(engine), force=True)
    return out_path


class TensorRTBackend(Backend):
    """Runs a serialized engine (batch 1) with cuda-python buffers."""

    name = "tensorrt"

    def __init__(self, engine_path, content: bytes | None = None):
        trt = _tensorrt()
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            try:
                from cuda import cudart
            except ImportError:
                raise BackendUnavailable("cuda-python is needed to run TensorRT engines (pip install cuda-python)") \
                    from None
        self.cudart = cudart
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(content if content is not None
                                                      else Path(engine_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{engine_path}: not an engine for this GPU / TensorRT version (rebuild it)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inp = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.out = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        shape = tuple(self.engine.get_tensor_shape(self.inp))
        self.in_shape = (1, *shape[1:])
        self.context.set_input_shape(self.inp, self.in_shape)
        self.out_shape = tuple(self.context.get_tensor_shape(self.out))
        self.in_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.inp)))
        self.host_out = np.empty(self.out_shape, dtype=np.float32)
        _, self.d_in = cudart.cudaMalloc(int(np.prod(self.in_shape)) * self.in_dtype.itemsize)
        _, self.d_out = cudart.cudaMalloc(self.host_out.nbytes)
        _, self.stream = cudart.cudaStreamCreate()
        self.context.set_tensor_address(self.inp, int(self.d_in))
        self.context.set_tensor_address(self.out, int(self.d_out))

    @property
    def fixed_batch(self):
        return 1

    def run_batch(self, x):
        cudart = self.cudart
        x = np.ascontiguousarray(x, dtype=self.in_dtype)
        cudart.cudaMemcpyAsync(self.d_in, x.ctypes.data, x.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice,
                               self.stream)
        self.context.execute_async_v3(self.stream)
        cudart.cudaMemcpyAsync(self.host_out.ctypes.data, self.d_out, self.host_out.nbytes,
                               cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream)
        cudart.cudaStreamSynchronize(self.stream)
        return self.host_out.copy()


def _gpu_name() -> str:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            return "gpu"
    err, props = cudart.cudaGetDeviceProperties(0)
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return "".join(c if c.isalnum() else "-" for c in name.strip("\x00")).strip("-") or "gpu"


def engine_key(onnx_sha256: str, tensorrt_version: str, gpu: str, precision: str) -> dict:
    """What an engine depends on: the exact ONNX, the TensorRT that built it and the GPU
    (an engine only deserializes where it was built), and the precision flags."""
    return {"onnx_sha256": onnx_sha256, "tensorrt": tensorrt_version, "gpu": gpu, "precision": precision}


def engine_paths(onnx_path, key: dict, folder=None) -> tuple[Path, Path]:
    """(engine, sidecar JSON) in ``folder`` (default: next to the ONNX), named by the
    key: a new ONNX, TensorRT or GPU gets a new file instead of reusing a stale one."""
    onnx_path = Path(onnx_path)
    stem = f"{onnx_path.stem}.{key['onnx_sha256'][:12]}.trt{key['tensorrt']}.{key['gpu']}.{key['precision']}"
    where = Path(folder) if folder is not None else onnx_path.parent
    return where / (stem + ".engine"), where / (stem + ".engine.json")


def private_engine_cache(folder=None) -> Path:
    """The engine cache of signed bundles: a folder only this user can write
    (FER_EDGE_ENGINE_CACHE, else $XDG_CACHE_HOME/fer-edge/engines, else
    ~/.cache/fer-edge/engines), made 0700.  An engine in the bundle folder could
    have been put there by anyone who can write to the bundle, and the signature
    does not cover it; so a signed bundle's engine is built from its verified
    ONNX and cached here.  RuntimeError (one line) when the folder is not private."""
    if folder is None:
        folder = os.environ.get("FER_EDGE_ENGINE_CACHE") or \
            Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fer-edge" / "engines"
    folder = Path(folder)
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.stat(folder, follow_symlinks=False)
    except OSError as exc:
        raise RuntimeError(f"engine cache {folder}: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise RuntimeError(f"engine cache {folder}: not a folder (a link or a file)")
    if os.name == "posix" and (st.st_uid != os.getuid() or st.st_mode & 0o022):
        raise RuntimeError(f"engine cache {folder}: other users can write to it (owner uid {st.st_uid}, mode "
                           f"{stat.S_IMODE(st.st_mode):o}); make it yours with mode 700, or set "
                           "FER_EDGE_ENGINE_CACHE")
    return folder


def stale_reason(engine: Path, sidecar: Path, key: dict) -> str | None:
    """Why a cached engine may not be used (None: it may): it must exist with a
    sidecar recording exactly this key and the engine's own sha256."""
    if not engine.is_file() or not sidecar.is_file():
        return "no cached engine"
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return "its sidecar is unreadable"
    if not isinstance(meta, dict) or any(meta.get(k) != v for k, v in key.items()):
        return "it was built for another ONNX, TensorRT version, GPU or precision"
    if meta.get("engine_sha256") != sha256_file(engine):
        return "the engine file does not match its recorded sha256"
    return None


def write_sidecar(sidecar: Path, key: dict, engine: Path) -> None:
    write_json_atomic(sidecar, dict(key, engine_sha256=sha256_file(engine)), force=True)


def cached_engine(onnx_path, precision: str, log=print, onnx_sha256: str | None = None,
                  onnx_bytes: bytes | None = None, cache_dir=None) -> Path:
    """The engine for this ONNX, built on first use and cached (next to it, or in
    cache_dir) with a JSON sidecar (ONNX sha256, TensorRT version, GPU,
    precision, engine sha256); the sidecar is checked before every use and the
    engine rebuilt when anything differs.  onnx_sha256 / onnx_bytes: the bundle
    manifest's (already verified) hash and the bytes that were hashed.
    Next to the ONNX this guards against stale or corrupt engines, not against
    someone who can write to the bundle folder: signed bundles pass
    cache_dir=private_engine_cache() (docs/trust.md)."""
    trt = _tensorrt()
    onnx_path = Path(onnx_path)
    key = engine_key(onnx_sha256 or sha256_file(onnx_path), trt.__version__, _gpu_name(), precision)
    engine, sidecar = engine_paths(onnx_path, key, cache_dir)
    reason = stale_reason(engine, sidecar, key)
    if reason is not None:
        log(f"building the TensorRT {precision} engine {engine.name} ({reason}; takes a minute)")
        sidecar.unlink(missing_ok=True)  # the old record must never vouch for the new engine
        build_engine(onnx_path, precision, engine, onnx_bytes=onnx_bytes)
        write_sidecar(sidecar, key, engine)
    return engine
