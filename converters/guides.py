"""What a bundle's README.md tells the device: how to install the runtime and
run the artifact there.  One ``DeviceGuide`` per kind of device; each row of
the formats table (converters/formats.py) names its guide.  Plain text, no torch.

fer-edge is not on PyPI: the install is from the user's fer-edge source folder
(or a wheel built from it); FER_EDGE_KERNELS=0 skips the compiled kernels (no
compiler), and as an environment variable it works with any pip.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

# trtexec's flags per precision (int8 also enables fp16 for the layers outside Q/DQ pairs).
TRTEXEC_FLAGS = {"fp32": "", "fp16": " --fp16", "int8": " --int8 --fp16"}
NOT_ON_PYPI = "# ./fer-edge = your fer-edge source folder (fer-edge is not on PyPI); no compiler, no PyTorch"


@dataclass(frozen=True)
class DeviceGuide:
    install: tuple[str, ...]     # shell lines that install the runtime on the device
    run: Callable                # (fmt, preprocess, classes) -> README lines: how to run the artifact there


def pip_line(extra: str) -> str:
    return f'FER_EDGE_KERNELS=0 pip install "./fer-edge[{extra}]"'


def input_line(pre: dict) -> str:
    h, w = pre["input_size"]
    return f"1x{h}x{w}x1 uint8 (raw gray pixels)" if pre["layout"] == "NHWC" else \
        f"1x1x{h}x{w} float32, (pixel/255 - {pre['mean']}) / {pre['std']}"


def tensorrt_lines(fmt, pre: dict, classes: list[str], install: tuple[str, ...]) -> list[str]:
    """Build a TensorRT engine from the ONNX on the device, then run the camera pipeline."""
    flags = TRTEXEC_FLAGS.get(fmt.precision, "")
    lines = ["## On the Jetson", "", "Build the engine on the device (engines are specific to the GPU and "
             "the TensorRT version):", "", "```bash",
             f"trtexec --onnx={fmt.file}{flags} --saveEngine=model.engine",
             "# or, with the TensorRT Python API:",
             f"python3 -c \"from fer_edge.targets.jetson import build_engine; "
             f"build_engine('{fmt.file}', '{fmt.precision}', 'model.engine')\"",
             "```", ""]
    if fmt.precision == "int8":
        lines += ["The int8 model is explicitly quantized (Q/DQ nodes with the calibrated scales): TensorRT "
                  "needs no calibrator and no calibration images on the device.", ""]
    return lines + ["Run the camera pipeline on the device (JetPack provides TensorRT and OpenCV; no PyTorch):",
                    "", "```bash", *install,
                    "fer-edge predict 0 --bundle .            # camera 0; builds and caches the engine on first use",
                    "fer-edge predict clip.mp4 --bundle . --jsonl events.jsonl", "```", ""]


def android_feed(fmt, pre: dict) -> str:
    """What the app puts in the input buffer."""
    h, w = pre["input_size"]
    if pre["layout"] == "NHWC":
        return (f"a `ByteBuffer` of {h * w} bytes: the face crop's gray pixels, row by row "
                "(uint8; the normalization is inside the model)")
    if fmt.precision == "int8":
        return (f"a `ByteBuffer` of {h * w} int8 values: for each gray pixel p, "
                f"`q = round(((p / 255 - {pre['mean']}) / {pre['std']}) / scale) + zeroPoint` with "
                "`scale, zeroPoint` from `interpreter.getInputTensor(0).quantizationParams()`")
    return (f"a `FloatBuffer` of {h * w} floats (shape 1x1x{h}x{w}, NCHW): "
            f"`(p / 255f - {pre['mean']}f) / {pre['std']}f` for each gray pixel p")


def android_lines(fmt, pre: dict, classes: list[str], install: tuple[str, ...]) -> list[str]:
    h, w = pre["input_size"]
    int8 = fmt.precision == "int8"
    return ["## On Android (LiteRT / TFLite Interpreter)", "",
            f"1. Put `{fmt.file}` and `labels.json` in the app's `assets/`.",
            "2. Detect the face (ML Kit or OpenCV), crop a square around it with a 15% margin, convert to "
            f"gray and resize to {w}x{h} (area interpolation when shrinking).",
            f"3. Input: {android_feed(fmt, pre)}.",
            f"4. `interpreter.run(input, output)`; output: 1x{len(classes)} logits"
            + (" as int8: `(q - zeroPoint) * scale` with `getOutputTensor(0).quantizationParams()`"
               if int8 else " (float32)")
            + "; softmax, then the class names in `labels.json` order.", "",
            "```kotlin",
            f'val model = FileUtil.loadMappedFile(context, "{fmt.file}")',
            "val interpreter = Interpreter(model, Interpreter.Options().setNumThreads(2))  // XNNPACK by default",
            f"val output = Array(1) {{ {'ByteArray' if int8 else 'FloatArray'}({len(classes)}) }}",
            "interpreter.run(input, output)",
            "```", "",
            "To run it with fer-edge's Python pipeline instead (a Linux board or a desktop; no PyTorch):", "",
            "```bash", *install, "fer-edge predict photo.jpg --bundle .", "```", ""]


def _guide(install: tuple[str, ...], lines) -> DeviceGuide:
    return DeviceGuide(install, lambda fmt, pre, classes: lines(fmt, pre, classes, install))


ONNX_DEVICE = _guide((NOT_ON_PYPI, pip_line("runtime-onnx")), tensorrt_lines)
JETSON_DEVICE = _guide(("python3 -m venv --system-site-packages ~/fer-venv && . ~/fer-venv/bin/activate"
                        "   # sees JetPack's tensorrt", NOT_ON_PYPI, pip_line("runtime-onnx"),
                        'pip install "cuda-python>=12,<13"   # JetPack 6 (CUDA 12): TensorRT runs the engine '
                        "through it"), tensorrt_lines)
ANDROID_DEVICE = _guide((NOT_ON_PYPI, pip_line("runtime-tflite")), android_lines)


def readme(fmt, meta: dict, pre: dict) -> str:
    """The bundle's README.md: what the artifact takes and gives, the device's
    own instructions (its row's guide), and how to re-check it against PyTorch."""
    h, w = pre["input_size"]
    classes = meta["classes"]
    lines = [f"# fer-edge bundle: {meta['arch']} for {fmt.target} ({fmt.precision})", "",
             f"{fmt.description}.", "",
             f"- input `input`: {input_line(pre)}; a face crop, gray, resized to {h}x{w}",
             f"- output `logits`: 1x{len(classes)}, classes in `labels.json` order "
             f"({', '.join(classes)}); softmax for probabilities",
             "- `manifest.json` holds the sha256 of every file; `parity.json` how this artifact compares "
             "with the PyTorch model", ""]
    lines += fmt.device.run(fmt, pre, classes)
    lines += ["## Check it against PyTorch on a desktop (needs the source checkpoint)", "", "```bash",
              "fer-edge parity --bundle . --data FACES_DIR   # accuracy and agreement with the PyTorch model",
              "```", ""]
    return "\n".join(lines)
