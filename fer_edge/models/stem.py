"""The Inception-ResNet-v1 stem (Szegedy et al. 2017) that HSNet and
hsnet-lite take from a face-recognition model: its layer table, the module,
reading its weights from a facenet-pytorch-style state dict, freezing it, and
the nearest resize both networks' feature pyramids use."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fer_edge.models.layers import ConvBNAct

# The Inception-ResNet-v1 stem (Szegedy et al. 2017), which HSNet takes as it is:
# (name, output channels or None for the max-pool, kernel, stride, padding).
# The names are facenet-pytorch's, so a face-recognition state dict loads as it is.
STEM = (
    ("conv2d_1a", 32, 3, 2, 0),
    ("conv2d_2a", 32, 3, 1, 0),
    ("conv2d_2b", 64, 3, 1, 1),
    ("maxpool_3a", None, 3, 2, 0),
    ("conv2d_3b", 80, 1, 1, 0),
    ("conv2d_4a", 192, 3, 1, 0),
    ("conv2d_4b", 256, 3, 2, 0),
)
STEM_LAYERS = tuple(name for name, cout, *_ in STEM if cout is not None)
STEM_CHANNELS = 3  # the face-recognition stem reads RGB


# facenet-pytorch ships its weights as pickles (.pt); fer-edge never unpickles a file,
# so a user converts one once, where they trust it.
CONVERT_PT = ("python -c \"import torch; from safetensors.torch import save_file; "
              "save_file(torch.load('FILE.pt', weights_only=True), 'FILE.safetensors')\"")


def read_stem_state(path) -> dict:
    """The Inception-ResNet-v1 stem tensors of a face-recognition state dict
    (a safetensors file), with fer-edge's names (``relu`` -> ``act``)."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: give the weights as .safetensors (fer-edge never unpickles a file); "
                         f"convert a .pt once: {CONVERT_PT}")
    state = load_file(str(path))
    stem_state = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.split(".")[0] in STEM_LAYERS:
            stem_state[key.replace(".relu.", ".act.")] = value
    if "conv2d_1a.conv.weight" not in stem_state:
        raise ValueError(f"{path} holds no Inception-ResNet-v1 stem (no conv2d_1a.conv.weight)")
    for key, value in stem_state.items():   # what load_checkpoint asks of any weights
        if key.endswith("num_batches_tracked"):
            continue
        if not value.is_floating_point():
            raise ValueError(f"{path}: {key} is {value.dtype}, not floating point weights")
        if not bool(value.isfinite().all()):
            raise ValueError(f"{path}: {key} holds NaN or infinite values")
    return stem_state


def nearest_resize(x: torch.Tensor, size) -> torch.Tensor:
    """``F.interpolate(x, size, mode="nearest")`` (source index floor(i * in / out))
    written as two index gathers.  Same numbers, but exact in every exporter:
    litert-torch lowers a non-integer nearest resize (e.g. 6 -> 11) to the
    wrong rows (max error 4.5 on unit-variance maps, measured).  The indices
    are constants computed from the static shapes: integer arithmetic in the
    graph would get an int8 quantizer's observer, which cannot observe integers."""
    h, w = int(x.shape[-2]), int(x.shape[-1])
    oh, ow = int(size[0]), int(size[1])
    rows = torch.tensor([i * h // oh for i in range(oh)], dtype=torch.long, device=x.device)
    cols = torch.tensor([j * w // ow for j in range(ow)], dtype=torch.long, device=x.device)
    return x.index_select(-2, rows).index_select(-1, cols)


class InceptionResnetV1Stem(nn.Module):
    """``STEM``: conv + BN (eps 1e-3, facenet-pytorch's) + ReLU, one max-pool."""

    def __init__(self, in_chans=STEM_CHANNELS):
        super().__init__()
        cin = in_chans
        for name, cout, k, s, p in STEM:
            if cout is None:
                setattr(self, name, nn.MaxPool2d(k, stride=s, padding=p))
            else:
                setattr(self, name, ConvBNAct(cin, cout, k, stride=s, padding=p, bn_eps=1e-3))
                cin = cout
        self.out_channels = cin

    def forward(self, x):
        for name, *_ in STEM:
            x = getattr(self, name)(x)
        return x


class FrozenStem:
    """A model with a transferred ``self.stem`` that can be frozen (HSNet's
    KTL, Eq. 19, and hsnet-lite's): no gradients, and its BatchNorm statistics
    kept as loaded, also in train mode."""

    stem_frozen = False

    def freeze_stem(self):
        for p in self.stem.parameters():
            p.requires_grad_(False)
        self.stem_frozen = True
        self.stem.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.stem_frozen:
            self.stem.eval()
        return self
