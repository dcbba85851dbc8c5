"""The PyTorch module the exporters trace: the checkpoint's model merged, in
plain convolutions, fp32, eval, with the camera input built in for --nhwc."""
from __future__ import annotations

import copy

import torch
from torch import nn

from fer_edge.contract import affine


class CameraInput(nn.Module):
    """NHWC uint8 gray pixels -> the normalized NCHW float the network was trained on.
    Built into --nhwc artifacts so the device feeds camera crops as they are."""

    def __init__(self, model: nn.Module, preprocess: dict):
        super().__init__()
        self.model = model
        self.scale, self.shift = affine(preprocess)

    def forward(self, x):
        x = x.permute(0, 3, 1, 2).to(torch.float32)
        return self.model(x * self.scale - self.shift)


def deploy_module(model: nn.Module, spec) -> nn.Module:
    """The module the exporters trace: merged, plain convolutions, fp32, eval."""
    from fer_edge.reparam import is_merged, merge

    m = copy.deepcopy(model) if is_merged(model) else merge(model, use_kernel=False)  # never edit the caller's
    for mod in m.modules():  # the fused kernel is a custom op no exporter knows: use plain convs
        if hasattr(mod, "use_kernel"):
            mod.use_kernel = False
    # Dropout is the identity at inference, but torch.export keeps it as a node;
    # between the pooling and the classifier it breaks litert-torch's int8
    # chain (measured: 20x the simulated quantization error).  Remove it.
    for mod in list(m.modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, nn.Dropout):
                setattr(mod, child_name, nn.Identity())
    m = m.float().eval()
    return CameraInput(m, spec.preprocess).eval() if spec.nhwc else m


def sample_input(spec, batch: int = 1) -> torch.Tensor:
    """A seeded input of the artifact's shape (what the exporters trace with)."""
    g = torch.Generator().manual_seed(0)
    if spec.nhwc:
        return torch.randint(0, 256, spec.shape(batch), generator=g, dtype=torch.uint8)
    return torch.randn(spec.shape(batch), generator=g)
