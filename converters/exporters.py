"""Exporters: a PyTorch model in, one artifact file out.

Each ``export_<kind>(model, path, spec)`` writes exactly one file and is
deterministic: the same checkpoint converted twice gives the same bytes.
``spec`` says what the input looks like (``InputSpec``) and carries the
calibration images for int8.  The formats table (converters/formats.py) names
the exporter of each row; ``export`` runs one and turns its failure into one line.
Nothing here imports torch until an export runs (the command line's parsers
read the formats table on devices without torch).
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fer_edge import UserError
from fer_edge.converters.calibration import CALIB_METHODS

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

    def calib_inputs(self) -> np.ndarray:
        """Calibration images in the artifact's input format, (N, ...) with N batches of 1."""
        from fer_edge.contract import artifact_preprocess, preprocess_faces

        if self.calib is None or len(self.calib) == 0:
            raise ValueError("int8 needs calibration images")
        return preprocess_faces(self.calib, artifact_preprocess(self.preprocess, self.nhwc))

    def report(self):
        from fer_edge.converters.progress import NO_PROGRESS

        return self.progress or NO_PROGRESS


def debug() -> bool:
    return os.environ.get("FER_EDGE_DEBUG") == "1"


@contextlib.contextmanager
def quiet():
    """Exporters print pages of progress, deprecation and native (absl/MLIR) log
    lines, some straight to file descriptors 1 and 2; keep the CLI readable.
    FER_EDGE_DEBUG=1 lets everything through."""
    if debug():
        yield
        return
    from fer_edge.targets.backends import native_output_silenced

    with native_output_silenced((1, 2)), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield


def export(fmt, model, path: Path, spec: InputSpec) -> None:
    """Run the format's exporter; anything it raises becomes one line."""
    from fer_edge.fileio import os_error_line

    try:
        fmt.exporter(model, path, spec)
    except (UserError, KeyboardInterrupt):
        raise
    except OSError as exc:  # a full disk or a folder gone during the export
        if debug():
            raise
        raise UserError(os_error_line(exc, path)) from None
    except Exception as exc:  # noqa: BLE001  (exporters raise anything; the user gets one line)
        if debug():
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"export to {fmt.target} {fmt.precision} failed: {type(exc).__name__}: {msg} "
                        "(FER_EDGE_DEBUG=1 shows the traceback)") from None


def stamp(proto) -> None:
    """Name fer-edge as the producer and check the model."""
    import onnx

    from fer_edge import __version__

    proto.producer_name, proto.producer_version = "fer-edge", __version__
    onnx.checker.check_model(proto, full_check=True)


# ------------------------------------------------------------------ ONNX
def export_onnx(model, path, spec: InputSpec) -> None:
    """Float32 ONNX (opset 17) through the TorchScript exporter: mature for
    CNNs, no onnxscript dependency, byte-identical output for identical weights."""
    import onnx
    import torch

    from fer_edge.converters.deploy import deploy_module, sample_input

    module = deploy_module(model, spec)
    dynamic = {"input": {0: "batch"}, "logits": {0: "batch"}} if spec.dynamic_batch else None
    buf = io.BytesIO()
    with spec.report().step("exporting ONNX"), quiet(), torch.no_grad():
        torch.onnx.export(module, (sample_input(spec),), buf, input_names=["input"], output_names=["logits"],
                          opset_version=OPSET, dynamo=False, dynamic_axes=dynamic, do_constant_folding=True)
    proto = onnx.load_from_string(buf.getvalue())
    inline_shared_initializers(proto)
    stamp(proto)
    Path(path).write_bytes(proto.SerializeToString())


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


def _rename_inputs(g, old: str, new: str) -> None:
    for node in g.node:
        for k, s in enumerate(node.input):
            if s == old:
                node.input[k] = new


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
    head = []
    for i in [i for i in g.input if i.type.tensor_type.elem_type == TensorProto.FLOAT]:
        head.append(helper.make_node("Cast", [i.name], [i.name + "_fp16"], to=TensorProto.FLOAT16,
                                     name=f"cast_{i.name}_fp16"))
        _rename_inputs(g, i.name, i.name + "_fp16")
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
    nodes = head + list(g.node) + tail
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
