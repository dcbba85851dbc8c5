"""Exporters: a merged PyTorch model in, one artifact file out.

Each ``export_<kind>(model, path, spec)`` writes exactly one file (through a
temp name by the caller) and is deterministic: the same checkpoint converted
twice gives the same bytes.  ``spec`` says what the input looks like
(``InputSpec``) and carries the calibration images for int8.
"""
from __future__ import annotations

import contextlib
import copy
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fer_edge.converters.formats import CALIB_METHODS

OPSET = 17


@dataclass
class InputSpec:
    """What the artifact takes: NCHW float normalized (default), or NHWC raw
    uint8 gray pixels with the normalization inside the model (``--nhwc``,
    what a camera pipeline has in hand)."""
    size: tuple[int, int]
    in_chans: int = 1
    nhwc: bool = False
    dynamic_batch: bool = False
    preprocess: dict | None = None
    calib: np.ndarray | None = None      # (N, H, W) uint8 faces for int8 calibration
    calib_method: str = CALIB_METHODS[0]  # ONNX int8 only (see converters/calibration.py)
    int8_all_layers: bool = False        # ONNX int8: also quantize the image-reading convs and the classifier
    progress: object = None              # converters.progress.Progress (None: silent)

    def shape(self, batch: int = 1) -> tuple:
        h, w = self.size
        return (batch, h, w, self.in_chans) if self.nhwc else (batch, self.in_chans, h, w)

    def sample(self, batch: int = 1) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        if self.nhwc:
            return torch.randint(0, 256, self.shape(batch), generator=g, dtype=torch.uint8)
        return torch.randn(self.shape(batch), generator=g)

    def calib_inputs(self) -> np.ndarray:
        """Calibration images in the artifact's input format, (N, ...) with N batches of 1."""
        from fer_edge.targets.bundle import artifact_preprocess, preprocess_faces

        return preprocess_faces(self.calib, artifact_preprocess(self.preprocess, self.nhwc))

    def report(self):
        from fer_edge.converters.progress import NO_PROGRESS

        return self.progress or NO_PROGRESS


class CameraInput(nn.Module):
    """NHWC uint8 gray pixels -> the normalized NCHW float the network was trained on.
    Built into --nhwc artifacts so the device feeds camera crops as they are."""

    def __init__(self, model: nn.Module, preprocess: dict):
        super().__init__()
        self.model = model
        self.scale = float(preprocess["scale"]) / float(preprocess["std"])
        self.shift = float(preprocess["mean"]) / float(preprocess["std"])

    def forward(self, x):
        x = x.permute(0, 3, 1, 2).to(torch.float32)
        return self.model(x * self.scale - self.shift)


def deploy_module(model: nn.Module, spec: InputSpec) -> nn.Module:
    """The module the exporters trace: merged, plain convolutions, fp32, eval."""
    from fer_edge.reparam import is_merged, merge

    m = copy.deepcopy(model) if is_merged(model) else merge(model, use_kernel=False)  # never edit the caller's
    for mod in m.modules():  # the fused kernel is a custom op no exporter knows: use plain convs
        if hasattr(mod, "use_kernel"):
            mod.use_kernel = False
    # Dropout is the identity at inference, but torch.export keeps it as a node;
    # between the pooling and the classifier it breaks litert-torch's int8
    # chain (measured: 20x the simulated quantization error).  Remove it.
    for name, mod in list(m.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, nn.Dropout):
                setattr(mod, child_name, nn.Identity())
    m = m.float().eval()
    return CameraInput(m, spec.preprocess).eval() if spec.nhwc else m


@contextlib.contextmanager
def _quiet():
    """Exporters print pages of progress, deprecation and native (absl/MLIR) log
    lines, some straight to file descriptors 1 and 2; keep the CLI readable.
    FER_EDGE_DEBUG=1 lets everything through."""
    if os.environ.get("FER_EDGE_DEBUG") == "1":
        yield
        return
    from fer_edge.targets.backends import native_output_silenced

    with native_output_silenced((1, 2)), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield


# ------------------------------------------------------------------ ONNX
def export_onnx(model: nn.Module, path, spec: InputSpec) -> None:
    """Float32 ONNX (opset 17) through the TorchScript exporter: mature for
    CNNs, no onnxscript dependency, byte-identical output for identical weights."""
    import onnx

    module = deploy_module(model, spec)
    dynamic = {"input": {0: "batch"}, "logits": {0: "batch"}} if spec.dynamic_batch else None
    buf = io.BytesIO()
    with spec.report().step("exporting ONNX"), _quiet(), torch.no_grad():
        torch.onnx.export(module, (spec.sample(),), buf, input_names=["input"], output_names=["logits"],
                          opset_version=OPSET, dynamo=False, dynamic_axes=dynamic, do_constant_folding=True)
    proto = onnx.load_from_string(buf.getvalue())
    inline_shared_initializers(proto)
    proto.producer_name, proto.producer_version = "fer-edge", _version()
    onnx.checker.check_model(proto, full_check=True)
    Path(path).write_bytes(proto.SerializeToString())


def _version() -> str:
    from fer_edge import __version__

    return __version__


def inline_shared_initializers(proto) -> None:
    """The exporter de-duplicates initializers with equal values (e.g. two zero
    biases) behind Identity nodes; quantizers then miss those weights.  Give
    each consumer its own initializer and drop the Identity nodes."""
    from onnx import numpy_helper

    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    keep = []
    for node in g.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            arr = numpy_helper.to_array(inits[node.input[0]])
            g.initializer.append(numpy_helper.from_array(arr, node.output[0]))
        else:
            keep.append(node)
    if len(keep) != len(g.node):
        del g.node[:]
        g.node.extend(keep)


def to_fp16(proto):
    """float32 ONNX -> float16 weights and compute with float32 input/output
    (one Cast at each end), what TensorRT's FP16 mode and ORT both run."""
    from onnx import TensorProto, helper, numpy_helper

    g = proto.graph
    for init in g.initializer:
        if init.data_type == TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    for node in g.node:  # Constant nodes carrying float tensors
        for attr in node.attribute:
            if attr.type == attr.TENSOR and attr.t.data_type == TensorProto.FLOAT:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float16)))
    float_in = [i for i in g.input if i.type.tensor_type.elem_type == TensorProto.FLOAT]
    new_nodes = []
    for i in float_in:
        new_nodes.append(helper.make_node("Cast", [i.name], [i.name + "_fp16"], to=TensorProto.FLOAT16,
                                          name=f"cast_{i.name}_fp16"))
        for node in g.node:
            for k, s in enumerate(node.input):
                if s == i.name:
                    node.input[k] = i.name + "_fp16"
    for node in g.node:
        if node.op_type == "Cast":  # uint8 camera input is cast to float: cast to half instead
            for attr in node.attribute:
                if attr.name == "to" and attr.i == TensorProto.FLOAT:
                    attr.i = TensorProto.FLOAT16
    tail = []
    for o in g.output:
        for node in g.node:
            for k, s in enumerate(node.output):
                if s == o.name:
                    node.output[k] = o.name + "_fp16"
        tail.append(helper.make_node("Cast", [o.name + "_fp16"], [o.name], to=TensorProto.FLOAT,
                                     name=f"cast_{o.name}_fp32"))
    nodes = new_nodes + list(g.node) + tail
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    return proto


def export_onnx_fp16(model, path, spec: InputSpec) -> None:
    import onnx

    buf = Path(str(path) + ".fp32")
    try:
        export_onnx(model, buf, spec)
        proto = to_fp16(onnx.load(str(buf)))
        onnx.checker.check_model(proto, full_check=True)
        Path(path).write_bytes(proto.SerializeToString())
    finally:
        buf.unlink(missing_ok=True)


class _CalibReader:
    """onnxruntime CalibrationDataReader over a fixed array, one image per call,
    counting them on ``progress`` (a Progress) under ``what``."""

    def __init__(self, inputs: np.ndarray, progress=None, what: str = "calibrating"):
        self.inputs = inputs
        self.i = 0
        self.progress, self.what = progress, what

    def get_next(self):
        if self.i >= len(self.inputs):
            return None
        x = self.inputs[self.i:self.i + 1]
        self.i += 1
        if self.progress is not None:
            self.progress.count(self.what, self.i, len(self.inputs))
        return {"input": x}

    def rewind(self):
        self.i = 0


def _conv_strided(node) -> bool:
    return any(a.name == "strides" and any(v > 1 for v in a.ints) for a in node.attribute)


POOLS = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool")


def boundary_layers(proto, first_stage: bool = False) -> list[str]:
    """Names of the nodes kept in float in int8 ONNX: the convolutions that read
    the image (reached from the graph input without passing another Conv) and
    the classifier (Gemm/MatMul producing an output).  Together about 1% of the
    MACs of MACNN, but quantizing them costs the most agreement: the image has
    one channel (per-channel scales cannot help) and int8 logits move near-tied
    predictions (measured on a briefly trained MACNN-0.25: top-1 agreement 95.3%
    -> 98.4%, mean |Δlogit| 0.020 -> 0.014).

    first_stage: for TensorRT's symmetric int8, also keep the weights of every
    convolution of the full-resolution stage (up to the first pooling or
    strided convolution) in float; their input activations stay int8 Q/DQ.
    Putting one layer at a time back in float found the conv after MACNN's
    first multi-scale concat the costliest by far.  Measured on PublicTest
    (3,589 faces, 2026-11-23): MACNN-0.25 (the default model) top-1 agreement
    96.74% -> 97.60%, mean |Δlogit| 0.047 -> 0.036; full-width MACNN 97.10% ->
    97.85%, 0.061 -> 0.040; the stage is 12% of MACNN's MACs (the conv this
    adds 11%), run in fp16 on the Jetson.  (Asymmetric activations, which TensorRT lacks, would give 97.46%
    on the default model; ONNX Runtime's uint8 format does not need this.)"""
    consumers: dict[str, list] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    first, frontier, seen = [], [i.name for i in proto.graph.input], set()
    while frontier:
        tensor = frontier.pop()
        for node in consumers.get(tensor, []):
            if node.name in seen:
                continue
            seen.add(node.name)
            if node.op_type == "Conv":
                first.append(node.name)
                if first_stage and not _conv_strided(node):
                    frontier.extend(node.output)
            elif not (first_stage and node.op_type in POOLS):
                frontier.extend(node.output)
    outputs = {o.name for o in proto.graph.output}
    producers = {o: n for n in proto.graph.node for o in n.output}
    last = []
    for name in outputs:  # walk back through Flatten/Reshape/Cast to the classifier
        node = producers.get(name)
        while node is not None and node.op_type not in ("Gemm", "MatMul", "Conv"):
            node = producers.get(node.input[0])
        if node is not None and node.name not in first:
            last.append(node.name)
    return first + last


def quantize_qdq(fp32_path, out_path, spec: InputSpec, scheme: str) -> None:
    """Static Q/DQ quantization with ONNX Runtime's quantizer.

    scheme "trt": TensorRT's explicit quantization: int8 symmetric activations
    (zero point 0) per tensor, int8 symmetric weights per output channel, bias
    left in float (TensorRT fuses it itself), Q/DQ on the inputs of Conv/Gemm and
    the layers TensorRT runs in int8 around them.
    scheme "ort": ONNX Runtime CPU's fast path: uint8 asymmetric activations,
    int8 per-channel weights, int32 bias, so Conv becomes QLinearConv.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if spec.calib is None or len(spec.calib) == 0:
        raise ValueError("int8 needs calibration images")
    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[spec.calib_method]
    if scheme == "trt":
        kw = dict(activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                  op_types_to_quantize=["Conv", "Gemm", "MatMul", "MaxPool", "Concat", "GlobalAveragePool"],
                  extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                                 "CalibPercentile": 99.999})
    elif scheme == "ort":
        kw = dict(activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                  extra_options={"WeightSymmetric": True, "CalibPercentile": 99.999})
    else:
        raise ValueError(scheme)
    import onnx

    exclude = [] if spec.int8_all_layers else boundary_layers(onnx.load(str(fp32_path)), first_stage=scheme == "trt")
    inputs = spec.calib_inputs()
    if spec.calib_method == "entropy":
        # ORT's own entropy calibrator cannot be given its bin counts (see
        # calibration.py); our ranges go in as overrides of a minmax pass.
        from .calibration import entropy_overrides

        # Codes per side of zero: 128 for symmetric int8, 256 for uint8 over a ReLU output's [0, t].
        levels = 128 if scheme == "trt" else 256
        with _quiet():
            overrides = entropy_overrides(fp32_path, inputs, kw.get("op_types_to_quantize"), levels,
                                          progress=spec.report())
        kw["extra_options"] = {**kw["extra_options"], "TensorQuantOverrides": overrides}
        method = CalibrationMethod.MinMax
    # (ORT's calibrator keeps its augmented model in its own temp folder.)
    with _quiet():
        quantize_static(str(fp32_path), str(out_path),
                        _CalibReader(inputs, spec.report(), "calibrating int8 ranges (faces)"),
                        quant_format=QuantFormat.QDQ, per_channel=True, calibrate_method=method,
                        calibration_providers=["CPUExecutionProvider"], nodes_to_exclude=exclude, **kw)


def _export_qdq(model, path, spec: InputSpec, scheme: str) -> None:
    import onnx

    fp32 = Path(str(path) + ".fp32.onnx")
    try:
        export_onnx(model, fp32, spec)
        quantize_qdq(fp32, path, spec, scheme)
        proto = onnx.load(str(path))
        proto.producer_name, proto.producer_version = "fer-edge", _version()
        onnx.checker.check_model(proto, full_check=True)
        Path(path).write_bytes(proto.SerializeToString())
    finally:
        fp32.unlink(missing_ok=True)


def export_onnx_qdq_trt(model, path, spec: InputSpec) -> None:
    _export_qdq(model, path, spec, "trt")


def export_onnx_qdq_ort(model, path, spec: InputSpec) -> None:
    _export_qdq(model, path, spec, "ort")


# ------------------------------------------------------------------ TFLite
def _litert():
    try:
        import litert_torch
    except ImportError:
        raise RuntimeError("litert-torch is not installed: pip install 'fer-edge[convert]'") from None
    return litert_torch


def export_tflite(model, path, spec: InputSpec) -> None:
    module = deploy_module(model, spec)
    with spec.report().step("converting to TFLite (litert-torch)"), _quiet():
        litert_torch = _litert()
        edge = litert_torch.convert(module, (spec.sample(),))
        edge.export(str(path))


def export_tflite_fp16(model, path, spec: InputSpec) -> None:
    """Float16 weights (ai-edge-quantizer's fp16 recipe through litert-torch)."""
    module = deploy_module(model, spec)
    with spec.report().step("converting to TFLite fp16 (litert-torch)"), _quiet():
        litert_torch = _litert()
        from litert_torch.generative.quantize import quant_recipes

        edge = litert_torch.convert(module, (spec.sample(),), quant_config=quant_recipes.full_fp16_recipe())
        edge.export(str(path))


def export_tflite_int8(model, path, spec: InputSpec) -> None:
    """Full-integer int8: litert-torch's PT2E quantizer (per-channel symmetric
    weights, per-tensor activations) calibrated on the --calib faces."""
    with _quiet():
        litert_torch = _litert()
        from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
        from litert_torch.quantize.quant_config import QuantConfig
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if spec.calib is None or len(spec.calib) == 0:
        raise ValueError("int8 needs calibration images")
    module = deploy_module(model, spec)
    sample = spec.sample()
    quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
    progress = spec.report()
    with _quiet(), torch.no_grad():
        graph = torch.export.export(module, (sample,)).module()
        graph = prepare_pt2e(graph, quantizer)
        inputs = spec.calib_inputs()
        for i, x in enumerate(inputs, 1):  # batch 1, the exported shape
            graph(torch.from_numpy(np.ascontiguousarray(x[None])))
            progress.count("calibrating int8 ranges (faces)", i, len(inputs))
        graph = convert_pt2e(graph, fold_quantize=False)
        with progress.step("converting to TFLite int8 (litert-torch)"):
            edge = litert_torch.convert(graph, (sample,), quant_config=QuantConfig(pt2e_quantizer=quantizer))
            edge.export(str(path))


EXPORTERS = {
    "onnx": export_onnx,
    "onnx-fp16": export_onnx_fp16,
    "onnx-qdq-trt": export_onnx_qdq_trt,
    "onnx-qdq-ort": export_onnx_qdq_ort,
    "tflite": export_tflite,
    "tflite-fp16": export_tflite_fp16,
    "tflite-int8": export_tflite_int8,
}
