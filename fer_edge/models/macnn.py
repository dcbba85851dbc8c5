"""MACNN (multi-scale asymmetric CNN) and its VGG16 baseline, for 1x48x48 faces.

VGG16 body: 13 convolutions in 5 stages (64,64 | 128,128 | 256x3 | 512x3 |
512x3), BN + ReLU after each, 2x2 max-pool after each stage, then global
average pooling, dropout and one linear layer.  MACNN replaces the first
convolution of the stages listed in ``maconv_stages`` (default: all five) by
an MAConv; VGG16 is the same body with none replaced.  Where the MAConvs sit
and their widths are our choice: the paper's text does not place them.
"""
from __future__ import annotations

from torch import nn

from fer_edge.models.layers import DEFAULT_SPLIT, ConvBNAct, MAConv
from fer_edge.models.registry import register_model

VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


def scaled(c: int, width: float) -> int:
    """Channels at a width multiplier, at least 8 and a multiple of 8 (SIMD and tensor-core friendly)."""
    return max(8, int(round(c * width / 8.0)) * 8)


class MACNN(nn.Module):
    def __init__(self, num_classes=7, in_chans=1, width=1.0, maconv_stages=(1, 2, 3, 4, 5),
                 split=DEFAULT_SPLIT, dropout=0.5):
        super().__init__()
        maconv_stages = tuple(int(s) for s in maconv_stages)
        bad = [s for s in maconv_stages if s not in range(1, 6)]
        if bad:
            raise ValueError(f"maconv_stages must be among 1..5, got {bad}")
        self.config = dict(num_classes=num_classes, in_chans=in_chans, width=width,
                           maconv_stages=list(maconv_stages), split=list(split), dropout=dropout)
        layers: list[nn.Module] = []
        cin = in_chans
        for stage, widths in enumerate(VGG16_STAGES, start=1):
            for i, c in enumerate(widths):
                cout = scaled(c, width)
                if i == 0 and stage in maconv_stages:
                    layers.append(MAConv(cin, cout, split))
                else:
                    layers.append(ConvBNAct(cin, cout, 3))
                cin = cout
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(cin, num_classes)
        self.num_features = cin
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.pool(self.features(x)).flatten(1)
        return self.fc(self.dropout(x))


@register_model("macnn", logit_layer="fc")
def macnn(num_classes=7, in_chans=1, **config) -> MACNN:
    return MACNN(num_classes=num_classes, in_chans=in_chans, **config)


@register_model("vgg16", logit_layer="fc")
def vgg16(num_classes=7, in_chans=1, **config) -> MACNN:
    config = {k: v for k, v in config.items() if k not in ("maconv_stages", "split")}
    return MACNN(num_classes=num_classes, in_chans=in_chans, maconv_stages=(), **config)
