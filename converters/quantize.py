"""ONNX int8: static Q/DQ quantization with ONNX Runtime's quantizer, for
TensorRT (explicit quantization) and for ONNX Runtime CPU.  The activation
ranges come from converters/calibration.py (--calib-method)."""
from __future__ import annotations

from pathlib import Path

from fer_edge.converters.calibration import CalibReader, entropy_overrides
from fer_edge.converters.exporters import InputSpec, export_onnx, quiet, stamp


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
        # Codes per side of zero: 128 for symmetric int8, 256 for uint8 over a ReLU output's [0, t].
        levels = 128 if scheme == "trt" else 256
        with quiet():
            overrides = entropy_overrides(fp32_path, inputs, kw.get("op_types_to_quantize"), levels,
                                          progress=spec.report())
        kw["extra_options"] = {**kw["extra_options"], "TensorQuantOverrides": overrides}
        method = CalibrationMethod.MinMax
    # (ORT's calibrator keeps its augmented model in its own temp folder.)
    with quiet():
        quantize_static(str(fp32_path), str(out_path),
                        CalibReader(inputs, spec.report(), "calibrating int8 ranges (faces)"),
                        quant_format=QuantFormat.QDQ, per_channel=True, calibrate_method=method,
                        calibration_providers=["CPUExecutionProvider"], nodes_to_exclude=exclude, **kw)


def _export_qdq(model, path, spec: InputSpec, scheme: str) -> None:
    import onnx

    fp32 = Path(str(path) + ".fp32.onnx")
    try:
        export_onnx(model, fp32, spec)
        quantize_qdq(fp32, path, spec, scheme)
        proto = onnx.load(str(path))
        stamp(proto)
        Path(path).write_bytes(proto.SerializeToString())
    finally:
        fp32.unlink(missing_ok=True)


def export_onnx_qdq_trt(model, path, spec: InputSpec) -> None:
    _export_qdq(model, path, spec, "trt")


def export_onnx_qdq_ort(model, path, spec: InputSpec) -> None:
    _export_qdq(model, path, spec, "ort")
