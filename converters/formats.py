"""The one table of what ``fer-edge convert`` can make.

Every (target, precision) pair a user may ask for is a row here: the artifact
file it writes, the exporter that makes it, the runtime that checks it in
``fer-edge parity`` and the parity thresholds it must meet.  Anything not in
the table is refused with one line listing what is.
"""
from __future__ import annotations

from dataclasses import dataclass

from fer_edge import UserError


@dataclass(frozen=True)
class Format:
    target: str          # onnx | jetson | android
    precision: str       # fp32 | fp16 | int8
    file: str            # artifact name inside the bundle
    exporter: str        # onnx | onnx-fp16 | onnx-qdq-ort | onnx-qdq-trt | tflite | tflite-fp16 | tflite-int8
    runtime: str         # what runs it here / on the device: onnxruntime | tflite | tensorrt
    needs_calib: bool
    description: str


# How the ONNX int8 formats (exporters "onnx-qdq-*") set activation ranges;
# the first is the default.  TFLite int8 calibrates with litert-torch's own observers.
CALIB_METHODS = ("entropy", "minmax", "percentile")


def uses_calib_method(fmt: Format) -> bool:
    return fmt.exporter.startswith("onnx-qdq")


FORMATS: tuple[Format, ...] = (
    Format("onnx", "fp32", "model.onnx", "onnx", "onnxruntime", False,
           "ONNX opset 17, float32"),
    Format("onnx", "int8", "model_int8.onnx", "onnx-qdq-ort", "onnxruntime", True,
           "ONNX Q/DQ for ONNX Runtime CPU: uint8 activations (asymmetric, per tensor), int8 weights per channel; "
           "first layer and classifier in float"),
    Format("jetson", "fp32", "model.onnx", "onnx", "onnxruntime", False,
           "ONNX float32 for TensorRT (trtexec / build_engine), checked in ONNX Runtime here"),
    Format("jetson", "fp16", "model_fp16.onnx", "onnx-fp16", "onnxruntime", False,
           "ONNX with float16 weights and compute, float32 input/output, for a TensorRT FP16 engine"),
    Format("jetson", "int8", "model_int8_qdq.onnx", "onnx-qdq-trt", "onnxruntime", True,
           "explicit-quantization ONNX for TensorRT: symmetric int8 Q/DQ (per-channel weights, "
           "per-tensor activations), no calibrator needed on the device; the full-resolution first stage and the "
           "classifier in fp16/fp32"),
    Format("android", "fp32", "model.tflite", "tflite", "tflite", False,
           "TFLite float32 (litert-torch), XNNPACK"),
    Format("android", "fp16", "model_fp16.tflite", "tflite-fp16", "tflite", False,
           "TFLite with float16 weights (half the size; computed in fp32 or fp16 by the delegate)"),
    Format("android", "int8", "model_int8.tflite", "tflite-int8", "tflite", True,
           "TFLite full-integer int8 (litert-torch PT2E quantizer, per-channel weights), int8 output"),
)

# Parity thresholds against the PyTorch model, per precision (fer-edge parity exits 1 beyond them),
# each compared with a tolerance of 1e-9 (parity.TOLERANCE).
# max_logit: largest |logit difference| allowed; agreement: top-1 agreement; accuracy_drop: points,
# failing only when the change is also significant (exact McNemar test on the flips, p < alpha).
THRESHOLDS: dict[str, dict] = {
    "fp32": {"max_logit": 1e-4, "agreement": 1.0, "accuracy_drop": None},
    "fp16": {"max_logit": None, "agreement": 0.995, "accuracy_drop": None},
    "int8": {"max_logit": None, "agreement": 0.97, "accuracy_drop": 1.0, "alpha": 0.05},
}

# Parity runs on faces disjoint from the calibration faces: this many by default
# (class-stratified), or all that remain when fewer do.
PARITY_SIZE = 1000

# Without labelled faces (convert without --calib) parity runs on seeded noise,
# where top-1 agreement means nothing; fp16 is then held to this largest
# |Δlogit| relative to the largest |logit| instead (fp16 rounding is ~1e-3).
NOISE_MAX_REL_LOGIT = {"fp16": 2e-2}

TARGETS = tuple(dict.fromkeys(f.target for f in FORMATS))
PRECISIONS = ("fp32", "fp16", "int8")


def export_formats() -> list[Format]:
    return list(FORMATS)


def lookup(target: str, precision: str) -> Format:
    for f in FORMATS:
        if f.target == target and f.precision == precision:
            return f
    known = ", ".join(f"{f.target}/{f.precision}" for f in FORMATS)
    raise UserError(f"--target {target} --precision {precision} is not supported; supported: {known}")


def format_table() -> str:
    """The table as text (``fer-edge convert --list``)."""
    rows = [("target", "precision", "artifact", "checked with", "calibration", "what")]
    rows += [(f.target, f.precision, f.file, f.runtime, "--calib" if f.needs_calib else "-", f.description)
             for f in FORMATS]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(r[i].ljust(widths[i]) for i in range(5)) + "  " + r[5] for r in rows)
