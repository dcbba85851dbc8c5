"""HSNet: dilated inception blocks + feature-guided auxiliary learning (FGAL)
+ knowledge transfer (KTL) from a face-recognition stem.

Our reading of the HSNet paper's Table 1 (documented because the layer table
leaves room for interpretation):

* KTL stem: the Inception-ResNet-v1 stem of FaceNet, with the parameter names
  of facenet-pytorch (``conv2d_1a`` ... ``conv2d_4b``, each conv + BN(eps 1e-3)
  + ReLU), so a face-recognition state dict loads directly
  (``load_stem(path)``) and is then frozen.  A gray model sums the RGB
  filters of ``conv2d_1a`` (the same as feeding the gray image three times).
* SDIB (stride dilated inception block): four parallel branches at stride 2 -
  1x1 (pad 0), 3x3 dilation 1 (pad 1), 3x3 dilation 2 (pad 2), 3x3 dilation 3
  (pad 3) - each conv + BN + ReLU with a quarter of the output channels,
  concatenated.
* RDIB (residual dilated inception block): the same four branches at stride
  1, concatenated, a 1x1 conv + BN, added to the input, ReLU.
* FGAL: 1x1 lateral convolutions bring the stem output, RDIB1 and RDIB2 to
  ``fpn_dim`` channels; top-down with nearest upsampling gives fused maps
  A (deepest), B and C; each is average-pooled and feeds one FC to a sigmoid
  weight lambda_j and one FC to class logits Y_j; the output is sum_j lambda_j * Y_j.
  ``forward_all`` also returns the Y_j and lambda_j for auxiliary losses.

Input size: faces are resized up to ``input_size`` (default 112) by the
pre-processing (the checkpoint's ``preprocess.input_size``); any size >= 48 works.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fer_edge.models.layers import ConvBNAct
from fer_edge.models.registry import register_model

STEM_LAYERS = ("conv2d_1a", "conv2d_2a", "conv2d_2b", "conv2d_3b", "conv2d_4a", "conv2d_4b")


def nearest_resize(x: torch.Tensor, size) -> torch.Tensor:
    """``F.interpolate(x, size, mode="nearest")`` (source index floor(i * in / out))
    written as two index gathers.  Same numbers, but exact in every exporter:
    litert-torch lowers a non-integer nearest resize (e.g. 6 -> 11, which
    HSNet's top-down path needs at 112 px) to the wrong rows (max error 4.5 on
    unit-variance maps, measured)."""
    h, w = x.shape[-2:]
    oh, ow = int(size[0]), int(size[1])
    rows = torch.div(torch.arange(oh, device=x.device) * h, oh, rounding_mode="floor")
    cols = torch.div(torch.arange(ow, device=x.device) * w, ow, rounding_mode="floor")
    return x.index_select(-2, rows).index_select(-1, cols)


class InceptionResnetV1Stem(nn.Module):
    def __init__(self, in_chans=1):
        super().__init__()
        eps = 1e-3  # facenet-pytorch's BatchNorm eps
        self.conv2d_1a = ConvBNAct(in_chans, 32, 3, stride=2, padding=0, bn_eps=eps)
        self.conv2d_2a = ConvBNAct(32, 32, 3, padding=0, bn_eps=eps)
        self.conv2d_2b = ConvBNAct(32, 64, 3, padding=1, bn_eps=eps)
        self.maxpool_3a = nn.MaxPool2d(3, stride=2)
        self.conv2d_3b = ConvBNAct(64, 80, 1, padding=0, bn_eps=eps)
        self.conv2d_4a = ConvBNAct(80, 192, 3, padding=0, bn_eps=eps)
        self.conv2d_4b = ConvBNAct(192, 256, 3, stride=2, padding=0, bn_eps=eps)
        self.out_channels = 256

    def forward(self, x):
        x = self.conv2d_2b(self.conv2d_2a(self.conv2d_1a(x)))
        x = self.conv2d_4a(self.conv2d_3b(self.maxpool_3a(x)))
        return self.conv2d_4b(x)


def _dilated_branches(cin, cout, stride):
    if cout % 4:
        raise ValueError(f"dilated inception blocks need channels divisible by 4, got {cout}")
    c = cout // 4
    return nn.ModuleList(
        [ConvBNAct(cin, c, 1, stride=stride, padding=0)]
        + [ConvBNAct(cin, c, 3, stride=stride, padding=d, dilation=d) for d in (1, 2, 3)]
    )


class SDIB(nn.Module):
    """Stride dilated inception block: four branches at stride 2, concatenated."""

    def __init__(self, cin, cout):
        super().__init__()
        self.branches = _dilated_branches(cin, cout, stride=2)

    def forward(self, x):
        return torch.cat([b(x) for b in self.branches], dim=1)


class RDIB(nn.Module):
    """Residual dilated inception block: four same-size branches, 1x1 projection, + input, ReLU."""

    def __init__(self, c):
        super().__init__()
        self.branches = _dilated_branches(c, c, stride=1)
        self.project = ConvBNAct(c, c, 1, padding=0, act=False)

    def forward(self, x):
        return F.relu(x + self.project(torch.cat([b(x) for b in self.branches], dim=1)))


class HSNet(nn.Module):
    def __init__(self, num_classes=7, in_chans=1, input_size=112, width=1.0, fpn_dim=128, dropout=0.3,
                 freeze_stem=False):
        super().__init__()
        c2, c3 = int(384 * width) // 4 * 4, int(512 * width) // 4 * 4
        self.config = dict(num_classes=num_classes, in_chans=in_chans, input_size=input_size, width=width,
                           fpn_dim=fpn_dim, dropout=dropout, freeze_stem=freeze_stem)
        self.stem = InceptionResnetV1Stem(in_chans)
        c1 = self.stem.out_channels
        self.sdib1, self.rdib1 = SDIB(c1, c2), RDIB(c2)
        self.sdib2, self.rdib2 = SDIB(c2, c3), RDIB(c3)
        self.lateral1 = nn.Conv2d(c1, fpn_dim, 1)
        self.lateral2 = nn.Conv2d(c2, fpn_dim, 1)
        self.lateral3 = nn.Conv2d(c3, fpn_dim, 1)
        self.dropout = nn.Dropout(dropout)
        self.gates = nn.ModuleList([nn.Linear(fpn_dim, 1) for _ in range(3)])
        self.heads = nn.ModuleList([nn.Linear(fpn_dim, num_classes) for _ in range(3)])
        self.stem_frozen = False
        if freeze_stem:
            self.freeze_stem()

    def freeze_stem(self):
        """Freeze the transferred stem: no gradients, BatchNorm statistics kept."""
        for p in self.stem.parameters():
            p.requires_grad_(False)
        self.stem_frozen = True
        self.stem.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.stem_frozen:
            self.stem.eval()
        return self

    def load_stem(self, path, freeze: bool = True):
        """Load the Inception-ResNet-v1 stem from a face-recognition state dict
        (safetensors, or a torch file read with weights_only=True)."""
        path = Path(path)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
        stem_state = {}
        for key, value in state.items():
            key = key.removeprefix("module.")
            if key.split(".")[0] in STEM_LAYERS:
                stem_state[key.replace(".relu.", ".act.")] = value
        first = "conv2d_1a.conv.weight"
        if first not in stem_state:
            raise ValueError(f"{path} holds no Inception-ResNet-v1 stem (no {first})")
        w = stem_state[first]
        want = self.stem.conv2d_1a.conv.weight.shape[1]
        if w.shape[1] != want:
            if want == 1:
                stem_state[first] = w.sum(dim=1, keepdim=True)  # gray = the same image in R, G and B
            else:
                raise ValueError(f"stem expects {want} input channels, the file has {w.shape[1]}")
        self.stem.load_state_dict(stem_state, strict=True)
        if freeze:
            self.freeze_stem()

    def forward_all(self, x):
        """(logits, [Y_A, Y_B, Y_C], [lambda_A, lambda_B, lambda_C])."""
        f1 = self.stem(x)
        f2 = self.rdib1(self.sdib1(f1))
        f3 = self.rdib2(self.sdib2(f2))
        a = self.lateral3(f3)
        b = self.lateral2(f2) + nearest_resize(a, f2.shape[-2:])
        c = self.lateral1(f1) + nearest_resize(b, f1.shape[-2:])
        ys, lams = [], []
        for fmap, gate, head in zip((a, b, c), self.gates, self.heads):
            v = self.dropout(F.adaptive_avg_pool2d(fmap, 1).flatten(1))
            lams.append(torch.sigmoid(gate(v)))
            ys.append(head(v))
        logits = sum(lam * y for lam, y in zip(lams, ys))
        return logits, ys, lams

    def forward(self, x):
        return self.forward_all(x)[0]


@register_model("hsnet")
def hsnet(num_classes=7, in_chans=1, **config) -> HSNet:
    return HSNet(num_classes=num_classes, in_chans=in_chans, **config)
