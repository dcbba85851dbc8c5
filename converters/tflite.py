"""TFLite exporters (litert-torch): float32, float16 weights, full-integer int8."""
from __future__ import annotations

import numpy as np

from fer_edge.converters.exporters import InputSpec, quiet


def _litert():
    try:
        import litert_torch
    except ImportError:
        raise RuntimeError("litert-torch is not installed: pip install 'fer-edge[convert]'") from None
    return litert_torch


def export_tflite(model, path, spec: InputSpec) -> None:
    """Float32 TFLite (litert-torch), run by XNNPACK."""
    from fer_edge.converters.deploy import deploy_module, sample_input

    module = deploy_module(model, spec)
    with spec.report().step("converting to TFLite (litert-torch)"), quiet():
        litert_torch = _litert()
        edge = litert_torch.convert(module, (sample_input(spec),))
        edge.export(str(path))


def export_tflite_fp16(model, path, spec: InputSpec) -> None:
    """Float16 weights (ai-edge-quantizer's fp16 recipe through litert-torch)."""
    from fer_edge.converters.deploy import deploy_module, sample_input

    module = deploy_module(model, spec)
    with spec.report().step("converting to TFLite fp16 (litert-torch)"), quiet():
        litert_torch = _litert()
        from litert_torch.generative.quantize import quant_recipes

        edge = litert_torch.convert(module, (sample_input(spec),), quant_config=quant_recipes.full_fp16_recipe())
        edge.export(str(path))


def export_tflite_int8(model, path, spec: InputSpec) -> None:
    """Full-integer int8: litert-torch's PT2E quantizer (per-channel symmetric
    weights, per-tensor activations) calibrated on the --calib faces."""
    import torch

    from fer_edge.converters.deploy import deploy_module, sample_input

    inputs = spec.calib_inputs()
    with quiet():
        litert_torch = _litert()
        from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
        from litert_torch.quantize.quant_config import QuantConfig
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    module = deploy_module(model, spec)
    sample = sample_input(spec)
    quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
    progress = spec.report()
    with quiet(), torch.no_grad():
        graph = torch.export.export(module, (sample,)).module()
        graph = prepare_pt2e(graph, quantizer)
        for i, x in enumerate(inputs, 1):  # batch 1, the exported shape
            graph(torch.from_numpy(np.ascontiguousarray(x[None])))
            progress.count("calibrating int8 ranges (faces)", i, len(inputs))
        graph = convert_pt2e(graph, fold_quantize=False)
        with progress.step("converting to TFLite int8 (litert-torch)"):
            edge = litert_torch.convert(graph, (sample,), quant_config=QuantConfig(pt2e_quantizer=quantizer))
            edge.export(str(path))
