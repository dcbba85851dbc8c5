"""Jetson: build a TensorRT engine from a bundle's ONNX and run it.

Needs the ``tensorrt`` Python package (JetPack ships it) and, to run an
engine, ``cuda-python`` for device buffers.  Nothing here imports torch.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fer_edge.targets.backends import Backend, BackendUnavailable

PRECISIONS = ("fp32", "fp16", "int8")


def trtexec_command(onnx_path, precision: str, engine_path) -> str:
    """The trtexec line equivalent to ``build_engine``."""
    flags = {"fp32": "", "fp16": " --fp16", "int8": " --int8 --fp16"}[precision]
    return f"trtexec --onnx={onnx_path}{flags} --saveEngine={engine_path}"


def _tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendUnavailable("TensorRT is not installed (on a Jetson it comes with JetPack: "
                                 "python3 -c 'import tensorrt')") from None
    return trt


def build_engine(onnx_path, precision: str, out_path, workspace_mb: int = 1024) -> Path:
    """Parse the ONNX, build a serialized engine and write it (atomically).

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
    if not parser.parse(Path(onnx_path).read_bytes()):
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
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    tmp.write_bytes(bytes(engine))
    tmp.replace(out_path)
    return out_path


class TensorRTBackend(Backend):
    """Runs a serialized engine (batch 1) with cuda-python buffers."""

    name = "tensorrt"

    def __init__(self, engine_path):
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
        self.engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
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


def cached_engine(onnx_path, precision: str, log=print) -> Path:
    """The engine for this ONNX, built on first use and cached next to it.  The
    cache key is the TensorRT version and the GPU: an engine only runs where it
    was built."""
    trt = _tensorrt()
    onnx_path = Path(onnx_path)
    engine = onnx_path.with_name(f"{onnx_path.stem}.trt{trt.__version__}.{_gpu_name()}.engine")
    if not engine.is_file():
        log(f"building the TensorRT {precision} engine {engine.name} (first run only; takes a minute)")
        build_engine(onnx_path, precision, engine)
    return engine
