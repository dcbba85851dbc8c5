"""``hsnet-lite``: a smaller network in the spirit of HSNet, for 1x112x112 gray faces.

Not the HSNet paper's network (that one is ``hsnet``, fer_edge/models/hsnet.py):
this is the layout fer-edge shipped as "hsnet" before it followed the paper's
Table 1, kept under its own name so that its runs and checkpoints stay usable.
What differs from the paper: two stages instead of five (no RDIB-A, no RDIB-C),
384 and 512 channels instead of 896 and 1792, dilated 3x3 branches without the
1x1 before them, a stride-2 1x1 branch instead of max-pool + 1x1, dilations
1, 2, 3 in every block, a 1x1 projection in the residual block, FPN-style
laterals to ``fpn_dim`` channels on every level (the lowest level is the stem
output), and dropout before the heads.  Its layout:

* stem: the Inception-ResNet-v1 stem of FaceNet, with the parameter names
  of facenet-pytorch (``conv2d_1a`` ... ``conv2d_4b``, each conv + BN(eps 1e-3)
  + ReLU), so a face-recognition state dict loads directly
  (``load_stem(path)``) and is then frozen.  The 1-channel stem sums the RGB
  filters of ``conv2d_1a`` (the same as feeding the gray image three times).
* SDIB-like block: four parallel branches at stride 2 -
  1x1 (pad 0), 3x3 dilation 1 (pad 1), 3x3 dilation 2 (pad 2), 3x3 dilation 3
  (pad 3) - each conv + BN + ReLU with a quarter of the output channels,
  concatenated.
* RDIB-like block: the same four branches at stride
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

import torch
import torch.nn.functional as F
from torch import nn

from fer_edge.models.stem import FrozenStem, InceptionResnetV1Stem, nearest_resize, read_stem_state
from fer_edge.models.layers import ConvBNAct
from fer_edge.models.registry import register_model


def _dilated_branches(cin, cout, stride):
    if cout % 4:
        raise ValueError(f"dilated inception blocks need channels divisible by 4, got {cout}")
    c = cout // 4
    return nn.ModuleList(
        [ConvBNAct(cin, c, 1, stride=stride, padding=0)]
        + [ConvBNAct(cin, c, 3, stride=stride, padding=d, dilation=d) for d in (1, 2, 3)]
    )


class LiteSDIB(nn.Module):
    """Four branches at stride 2 (1x1, dilated 3x3 d = 1, 2, 3), concatenated."""

    def __init__(self, cin, cout):
        super().__init__()
        self.branches = _dilated_branches(cin, cout, stride=2)

    def forward(self, x):
        return torch.cat([b(x) for b in self.branches], dim=1)


class LiteRDIB(nn.Module):
    """Four same-size branches, 1x1 projection, + input, ReLU."""

    def __init__(self, c):
        super().__init__()
        self.branches = _dilated_branches(c, c, stride=1)
        self.project = ConvBNAct(c, c, 1, padding=0, act=False)

    def forward(self, x):
        return F.relu(x + self.project(torch.cat([b(x) for b in self.branches], dim=1)))


class HSNetLite(FrozenStem, nn.Module):
    has_aux_heads = True  # the three ungated heads Y_j (--aux-weight)

    def __init__(self, num_classes=7, in_chans=1, input_size=112, width=1.0, fpn_dim=128, dropout=0.3,
                 freeze_stem=False):
        super().__init__()
        c2, c3 = int(384 * width) // 4 * 4, int(512 * width) // 4 * 4
        if c2 < 4:   # four branches of at least one channel each
            raise ValueError(f"width {width} leaves hsnet-lite fewer than 4 channels per stage; use at least 0.011")
        self.config = dict(num_classes=num_classes, in_chans=in_chans, input_size=input_size, width=width,
                           fpn_dim=fpn_dim, dropout=dropout, freeze_stem=freeze_stem)
        self.stem = InceptionResnetV1Stem(in_chans)
        c1 = self.stem.out_channels
        self.sdib1, self.rdib1 = LiteSDIB(c1, c2), LiteRDIB(c2)
        self.sdib2, self.rdib2 = LiteSDIB(c2, c3), LiteRDIB(c3)
        self.lateral1 = nn.Conv2d(c1, fpn_dim, 1)
        self.lateral2 = nn.Conv2d(c2, fpn_dim, 1)
        self.lateral3 = nn.Conv2d(c3, fpn_dim, 1)
        self.dropout = nn.Dropout(dropout)
        self.gates = nn.ModuleList([nn.Linear(fpn_dim, 1) for _ in range(3)])
        self.heads = nn.ModuleList([nn.Linear(fpn_dim, num_classes) for _ in range(3)])
        if freeze_stem:
            self.freeze_stem()

    def load_stem(self, path, freeze: bool = True):
        """Load the Inception-ResNet-v1 stem from a face-recognition state dict
        (a safetensors file)."""
        stem_state = read_stem_state(path)
        first = "conv2d_1a.conv.weight"
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


@register_model("hsnet-lite")
def hsnet_lite(num_classes=7, in_chans=1, **config) -> HSNetLite:
    return HSNetLite(num_classes=num_classes, in_chans=in_chans, **config)
