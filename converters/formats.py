"""The one table of what ``fer-edge convert`` can make.

Every (target, precision) pair a user may ask for is a row here: the
exporter function that makes its artifact, the artifact's file name, the
runtime that runs it (a name in fer_edge.targets.backends.BACKENDS), the parity
thresholds it must meet and the device instructions its bundle's README.md
gives.  The command line's choices, ``convert --list``, ``fer-edge info`` and
the bundle text all read this table; anything not in it is refused with one
line listing what is.  A new target is one row (``register_format``), one
exporter function and one backend class (``register_backend``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from fer_edge import UserError
from fer_edge.converters import guides
from fer_edge.converters.calibration import CALIB_METHODS
from fer_edge.converters.exporters import export_onnx, export_onnx_fp16
from fer_edge.converters.quantize import export_onnx_qdq_ort, export_onnx_qdq_trt
from fer_edge.converters.tflite import export_tflite, export_tflite_fp16, export_tflite_int8

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
# Fewer distinct labelled faces than this never pass: a model that agrees with
# PyTorch on only 75% of faces still shows no disagreement on 10 of them about one
# time in 18 (0.75 ** 10 = 0.056).
MIN_PARITY_FACES = 100

# Without labelled faces (convert without --calib) parity runs on seeded noise,
# where top-1 agreement means nothing; fp16 is then held to this largest
# |Δlogit| relative to the largest |logit| instead (fp16 rounding is ~1e-3).
NOISE_MAX_REL_LOGIT = {"fp16": 2e-2}


@dataclass(frozen=True)
class Format:
    target: str                  # the device family: onnx | jetson | android
    precision: str               # fp32 | fp16 | int8 (its parity thresholds: THRESHOLDS[precision])
    file: str                    # artifact name inside the bundle
    exporter: Callable           # (model, path, InputSpec) -> None: writes the artifact
    runtime: str                 # what runs it here and on the device (fer_edge.targets.backends.BACKENDS)
    description: str
    device: guides.DeviceGuide   # the install lines and run commands of the bundle's README.md
    needs_calib: bool = False    # int8: calibration faces (--calib)
    observers: str | None = None  # int8 calibrated by the exporter's own observers (--calib-method unused)
    tools: tuple[str, ...] = ()  # Python modules the exporter needs (fer-edge info)
    limits: dict | None = None   # parity thresholds of this row when not its precision's

    @property
    def key(self) -> str:
        return f"{self.target}/{self.precision}"

    @property
    def thresholds(self) -> dict:
        return self.limits if self.limits is not None else THRESHOLDS[self.precision]

    @property
    def uses_calib_method(self) -> bool:
        return self.needs_calib and self.observers is None


_ONNX, _QDQ, _LITERT = ("onnx",), ("onnx", "onnxruntime"), ("litert_torch",)
FORMATS: list[Format] = [
    Format("onnx", "fp32", "model.onnx", export_onnx, "onnxruntime", "ONNX opset 17, float32",
           guides.ONNX_DEVICE, tools=_ONNX),
    Format("onnx", "int8", "model_int8.onnx", export_onnx_qdq_ort, "onnxruntime",
           "ONNX Q/DQ for ONNX Runtime CPU: uint8 activations (asymmetric, per tensor), int8 weights per "
           "channel; first layer and classifier in float", guides.ONNX_DEVICE, needs_calib=True, tools=_QDQ),
    Format("jetson", "fp32", "model.onnx", export_onnx, "onnxruntime",
           "ONNX float32 for TensorRT (trtexec / build_engine), checked in ONNX Runtime here",
           guides.JETSON_DEVICE, tools=_ONNX),
    Format("jetson", "fp16", "model_fp16.onnx", export_onnx_fp16, "onnxruntime",
           "ONNX with float16 weights and compute, float32 input/output, for a TensorRT FP16 engine",
           guides.JETSON_DEVICE, tools=_ONNX),
    Format("jetson", "int8", "model_int8_qdq.onnx", export_onnx_qdq_trt, "onnxruntime",
           "explicit-quantization ONNX for TensorRT: symmetric int8 Q/DQ (per-channel weights, "
           "per-tensor activations), no calibrator needed on the device; the full-resolution first stage and "
           "the classifier in fp16/fp32", guides.JETSON_DEVICE, needs_calib=True, tools=_QDQ),
    Format("android", "fp32", "model.tflite", export_tflite, "tflite", "TFLite float32 (litert-torch), XNNPACK",
           guides.ANDROID_DEVICE, tools=_LITERT),
    Format("android", "fp16", "model_fp16.tflite", export_tflite_fp16, "tflite",
           "TFLite with float16 weights (half the size; computed in fp32 or fp16 by the delegate)",
           guides.ANDROID_DEVICE, tools=_LITERT),
    Format("android", "int8", "model_int8.tflite", export_tflite_int8, "tflite",
           "TFLite full-integer int8 (litert-torch PT2E quantizer, per-channel weights), int8 output",
           guides.ANDROID_DEVICE, needs_calib=True, observers="litert-torch PT2E observers", tools=_LITERT),
]


def register_format(fmt: Format) -> None:
    """Add a row (or replace the row of the same target and precision)."""
    unregister_format(fmt.target, fmt.precision)
    FORMATS.append(fmt)


def unregister_format(target: str, precision: str) -> None:
    FORMATS[:] = [f for f in FORMATS if (f.target, f.precision) != (target, precision)]


def targets() -> tuple[str, ...]:
    return tuple(dict.fromkeys(f.target for f in FORMATS))


def precisions() -> tuple[str, ...]:
    return tuple(dict.fromkeys(f.precision for f in FORMATS))


def keys() -> tuple[str, ...]:
    """target/precision of every row (benchmark --formats)."""
    return tuple(f.key for f in FORMATS)


def tools() -> tuple[str, ...]:
    """Every Python module an exporter needs, in table order."""
    return tuple(dict.fromkeys(t for f in FORMATS for t in f.tools))


def lookup(target: str, precision: str) -> Format:
    for f in FORMATS:
        if f.target == target and f.precision == precision:
            return f
    raise UserError(f"--target {target} --precision {precision} is not supported; supported: {', '.join(keys())}")


def format_table() -> str:
    """The table as text (``fer-edge convert --list``)."""
    rows = [("target", "precision", "artifact", "checked with", "calibration", "what")]
    rows += [(f.target, f.precision, f.file, f.runtime, "--calib" if f.needs_calib else "-", f.description)
             for f in FORMATS]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(r[i].ljust(widths[i]) for i in range(5)) + "  " + r[5] for r in rows)


__all__ = ["CALIB_METHODS", "Format", "FORMATS", "THRESHOLDS", "PARITY_SIZE", "MIN_PARITY_FACES",
           "NOISE_MAX_REL_LOGIT", "register_format", "unregister_format", "targets", "precisions", "keys", "tools",
           "lookup", "format_table"]
