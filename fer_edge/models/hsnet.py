"""HSNet: the network of Fan et al., "Hierarchical scale convolutional neural
network for facial expression recognition" (2022), Table 1.

    input 3x224x224 -> Inception-ResNet-v1 stem               256 x 25 x 25
      -> RDIB-A  256 x 25 x 25    -> SDIB-A  896 x 12 x 12
      -> RDIB-B  896 x 12 x 12    -> SDIB-B 1792 x  5 x  5
      -> RDIB-C 1792 x  5 x  5
    FGAL on the outputs of the three RDIBs (F^A, F^B, F^C), one gated
    classifier per fused map, output = the sum of the gated class outputs.

The paper's equations, as built here (``STAGES`` is Table 1 as data):

* SDIB, the standard dilated inception block (Eq. 4-6): branches 1-3 are a
  1x1 convolution then a 3x3 convolution of stride 2 and dilation d
  (padding d - 1, Table 1); branch 4 is a 3x3 max-pool of stride 2 then a
  1x1 convolution; concatenated.  Output floor((H - 1) / 2).
* RDIB, the residual dilated inception block (Eq. 7-10): branches 1-3 are a
  1x1 convolution then a 3x3 convolution of stride 1 and dilation d
  (padding d); branch 4 a 1x1 convolution; concatenated into S; the output
  is F + S (no projection).
* "There are variations for each SDIB and RDIB ... via setting different
  dilation rates, and excluding some branches": each stage of ``STAGES``
  lists the dilations of the 1x1 -> 3x3 branches it keeps; branch 4 is in
  every block.
* The paper leaves BatchNorm and ReLU out of its expressions "for
  simplicity"; where we put them is one of our choices below.
* FGAL (Eq. 11-17): F~C = K_C(F^C); F~B = F^B + UP(K_B(F~C));
  F~A = F^A + UP(K_A(F~B)), with nearest upsampling.  Each fused map is
  average-pooled to Psi, one FC maps Psi to a scalar whose sigmoid is the
  weight lambda, one FC maps it to the class output Y; the model's output is
  sum_j lambda_j * Y_j (``forward_all`` also returns the Y_j and lambda_j).
* KTL (Eq. 18-20): the stem is Inception-ResNet-v1's, loaded from a
  face-recognition model (``load_stem``) and frozen; every other parameter
  starts from He initialization.

Ablation switches (the paper's Table 6, whose baseline is Inception-ResNet-v1):
``dib=False`` puts Inception-ResNet-v1's own modules where the DIBs are,
``fgal=False`` classifies F^C alone (average pool, one FC), ``ktl=False``
He-initialises the stem and trains it with the rest.

Where the paper is silent, our choices are named in the section "Our
choices" below, and nowhere else (docs/models.md lists them too).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fer_edge.models.layers import ConvBNAct
from fer_edge.models.registry import register_model
# The Inception-ResNet-v1 stem, its frozen state and the exact nearest resize
# live in stem.py (hsnet-lite shares them); imported here under their old names.
from fer_edge.models.stem import (  # noqa: F401
    STEM,
    STEM_CHANNELS,
    STEM_LAYERS,
    FrozenStem,
    InceptionResnetV1Stem,
    nearest_resize,
    read_stem_state,
)


# ------------------------------------------------------------------ Table 1
@dataclass(frozen=True)
class Stage:
    name: str              # Table 1's module
    block: str             # "rdib" (Eq. 7-10, same size) or "sdib" (Eq. 4-6, floor((H - 1) / 2))
    width: int             # output channels
    dilations: tuple       # dilation of each 1x1 -> 3x3 branch the block keeps (branch 4 always there)
    size_224: int          # output height and width for a 224 x 224 input


STAGES = (
    Stage("rdib_a", "rdib", 256, (1, 2), 25),
    Stage("sdib_a", "sdib", 896, (1, 2), 12),
    Stage("rdib_b", "rdib", 896, (1, 2, 3), 12),
    Stage("sdib_b", "sdib", 1792, (1, 2, 3), 5),
    Stage("rdib_c", "rdib", 1792, (1,), 5),
)
# FGAL reads the output of each RDIB: F^A, F^B, F^C.
FGAL_LEVELS = tuple(s.name for s in STAGES if s.block == "rdib")
# The stem before Table 1's stages is Inception-ResNet-v1's, as it is: ``STEM`` in stem.py.


# ------------------------------------------------------------------ Our choices
# Everything below is ours, not the paper's: the paper leaves it open.

def branch_widths(channels: int, branches: int) -> list[int]:
    """Channels of each branch of a DIB: ``channels`` split evenly, the
    remainder to the first branches.  Used twice: a block's output channels
    over its branches, and (the 1x1 that "decreases the number of channels"
    before each dilated 3x3) the block's input channels over its branches."""
    q, r = divmod(channels, branches)
    return [q + (i < r) for i in range(branches)]


# Table 1's RDIB-A branch 2 reads "2, 2, 1" (stride, padding, dilation) in the
# text we have; a stride of 2 cannot keep RDIB-A's 25 x 25 output nor its
# residual sum, so we read it as RDIB-B's branch 2: stride 1, padding 2, dilation 2
# (``STAGES`` above).
# BatchNorm + ReLU after every convolution of the stem and of the DIBs; none
# after the residual sum of an RDIB (both terms are already >= 0).
# F~C = K_C(F^C) (Eq. 11) keeps F^C's channels; K_B and K_A bring the map to
# the width of the map it is added to (Eq. 12-13).
# The FGAL 1x1 convolutions are plain convolutions with bias (no BatchNorm,
# no ReLU), as FPN's, which FGAL follows.
# No dropout by default (the paper names none); ``dropout`` applies to Psi.
# in_chans=1: the gray face is replicated into the stem's three channels inside
# the network (the merged form folds that into the first convolution), so
# every pre-processing, export and bundle keeps one gray input channel.
# dib=False: Inception-ResNet-v1's modules at the DIBs' places, one each, with
# the widths and residual scales of facenet-pytorch's Inception-ResNet-v1
# (``IR_MODULES``): RDIB-A -> Inception-ResNet-A, SDIB-A -> Reduction-A,
# RDIB-B -> Inception-ResNet-B, SDIB-B -> Reduction-B, RDIB-C -> Inception-ResNet-C.
# They have Table 1's widths and sizes, so FGAL reads the same shapes.
# fgal=False: F^C, average-pooled, into one FC (Inception-ResNet-v1's classifier).

def conv_out(h: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    """Output size of a convolution or pooling window along one axis."""
    return (h + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def stage_sizes(input_size: int) -> dict[str, int]:
    """Output size of the stem and of each stage for a square input, from the
    stem table and the paper's SDIB rule floor((H - 1) / 2)."""
    h = input_size
    for _, _, k, s, p in STEM:
        h = conv_out(h, k, s, p)
    sizes = {"stem": h}
    for st in STAGES:
        h = (h - 1) // 2 if st.block == "sdib" else h
        sizes[st.name] = h
    return sizes


def dilated_padding(block: str, d: int) -> int:
    """Table 1: an SDIB's dilated 3x3 pads d - 1 (every branch then gives
    floor((H - 1) / 2)); an RDIB's pads d (same size)."""
    return d - 1 if block == "sdib" else d


# ------------------------------------------------------------------ blocks
def _dilated_branch(cin: int, reduced: int, cout: int, block: str, d: int) -> nn.Sequential:
    """Eq. 4 / 7: F (x) K_1x1 (x) K_3x3,d."""
    stride = 2 if block == "sdib" else 1
    return nn.Sequential(ConvBNAct(cin, reduced, 1, padding=0),
                         ConvBNAct(reduced, cout, 3, stride=stride, padding=dilated_padding(block, d), dilation=d))


class DIB(nn.Module):
    """A dilated inception block: SDIB (Eq. 4-6) or RDIB (Eq. 7-10)."""

    def __init__(self, cin: int, stage: Stage):
        super().__init__()
        if stage.block == "rdib" and cin != stage.width:
            raise ValueError(f"{stage.name}: a residual block keeps its width ({cin} -> {stage.width})")
        n = len(stage.dilations) + 1
        outs, reduced = branch_widths(stage.width, n), branch_widths(cin, n)
        branches = [_dilated_branch(cin, r, c, stage.block, d)
                    for d, r, c in zip(stage.dilations, reduced, outs)]
        if stage.block == "sdib":  # Eq. 6: F (x) P_3x3 (x) K_1x1
            branches.append(nn.Sequential(nn.MaxPool2d(3, stride=2), ConvBNAct(cin, outs[-1], 1, padding=0)))
        else:  # Eq. 9: F (x) K_1x1
            branches.append(ConvBNAct(cin, outs[-1], 1, padding=0))
        self.branches = nn.ModuleList(branches)
        self.residual = stage.block == "rdib"

    def forward(self, x):
        s = torch.cat([b(x) for b in self.branches], dim=1)
        return x + s if self.residual else s  # Eq. 10: F^l = F^(l-1) + S^l


# Inception-ResNet-v1's modules (Szegedy et al. 2017, Fig. 7 and 10-13), for dib=False.
# Each branch is a list of (output channels, kernel (h, w), stride, padding (h, w));
# "pool" is a 3x3 max-pool of stride 2.  Residual modules end in a linear 1x1
# back to the input width, scaled, added to the input, then ReLU.
IR_MODULES = {
    "rdib_a": {"branches": [[(32, (1, 1), 1, (0, 0))],
                            [(32, (1, 1), 1, (0, 0)), (32, (3, 3), 1, (1, 1))],
                            [(32, (1, 1), 1, (0, 0)), (32, (3, 3), 1, (1, 1)), (32, (3, 3), 1, (1, 1))]],
               "scale": 0.17},
    "sdib_a": {"branches": [[(384, (3, 3), 2, (0, 0))],
                            [(192, (1, 1), 1, (0, 0)), (192, (3, 3), 1, (1, 1)), (256, (3, 3), 2, (0, 0))],
                            "pool"]},
    "rdib_b": {"branches": [[(128, (1, 1), 1, (0, 0))],
                            [(128, (1, 1), 1, (0, 0)), (128, (1, 7), 1, (0, 3)), (128, (7, 1), 1, (3, 0))]],
               "scale": 0.10},
    "sdib_b": {"branches": [[(256, (1, 1), 1, (0, 0)), (384, (3, 3), 2, (0, 0))],
                            [(256, (1, 1), 1, (0, 0)), (256, (3, 3), 2, (0, 0))],
                            [(256, (1, 1), 1, (0, 0)), (256, (3, 3), 1, (1, 1)), (256, (3, 3), 2, (0, 0))],
                            "pool"]},
    "rdib_c": {"branches": [[(192, (1, 1), 1, (0, 0))],
                            [(192, (1, 1), 1, (0, 0)), (192, (1, 3), 1, (0, 1)), (192, (3, 1), 1, (1, 0))]],
               "scale": 0.20},
}


class InceptionResnetModule(nn.Module):
    """One module of ``IR_MODULES`` (the DIB ablation's baseline)."""

    def __init__(self, cin: int, spec: dict, cout: int):
        super().__init__()
        branches, widths = [], []
        for branch in spec["branches"]:
            if branch == "pool":
                branches.append(nn.MaxPool2d(3, stride=2))
                widths.append(cin)
                continue
            layers, c = [], cin
            for co, k, s, p in branch:
                layers.append(ConvBNAct(c, co, k, stride=s, padding=p, bn_eps=1e-3))
                c = co
            branches.append(nn.Sequential(*layers))
            widths.append(c)
        self.branches = nn.ModuleList(branches)
        self.scale = spec.get("scale")
        if self.scale is not None:
            self.up = nn.Conv2d(sum(widths), cin, 1)
        elif sum(widths) != cout:
            raise ValueError(f"Inception-ResNet reduction gives {sum(widths)} channels, Table 1 {cout}")

    def forward(self, x):
        s = torch.cat([b(x) for b in self.branches], dim=1)
        return F.relu(x + self.scale * self.up(s)) if self.scale is not None else s


class FGAL(nn.Module):
    """Feature guided auxiliary learning (Eq. 11-17) on F^A, F^B, F^C."""

    def __init__(self, widths: tuple[int, int, int], num_classes: int, dropout: float):
        super().__init__()
        ca, cb, cc = widths
        self.k_c = nn.Conv2d(cc, cc, 1)  # Eq. 11
        self.k_b = nn.Conv2d(cc, cb, 1)  # Eq. 12
        self.k_a = nn.Conv2d(cb, ca, 1)  # Eq. 13
        self.dropout = nn.Dropout(dropout)
        self.gates = nn.ModuleList([nn.Linear(c, 1) for c in widths])            # W_1^j
        self.heads = nn.ModuleList([nn.Linear(c, num_classes) for c in widths])  # W_C^j

    def fuse(self, fa, fb, fc):
        tc = self.k_c(fc)
        tb = fb + nearest_resize(self.k_b(tc), fb.shape[-2:])
        ta = fa + nearest_resize(self.k_a(tb), fa.shape[-2:])
        return ta, tb, tc

    def forward(self, fa, fb, fc):
        """(Y^ = sum_j lambda_j Y_j, [Y_A, Y_B, Y_C], [lambda_A, lambda_B, lambda_C])."""
        ys, lams = [], []
        for fmap, gate, head in zip(self.fuse(fa, fb, fc), self.gates, self.heads):
            psi = self.dropout(F.adaptive_avg_pool2d(fmap, 1).flatten(1))
            lams.append(torch.sigmoid(gate(psi)))  # Eq. 14-15
            ys.append(head(psi))
        return sum(lam * y for lam, y in zip(lams, ys)), ys, lams  # Eq. 16-17


def he_init(module: nn.Module) -> None:
    """He initialization (He et al. 2015, Eq. 18's HeInit): weights ~ N(0, 2 / fan_in),
    biases 0, BatchNorm scale 1 and shift 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class HSNet(FrozenStem, nn.Module):
    def __init__(self, num_classes=7, in_chans=1, input_size=224, dropout=0.0, dib=True, fgal=True, ktl=True,
                 freeze_stem=False):
        super().__init__()
        if in_chans not in (1, STEM_CHANNELS):
            raise ValueError(f"hsnet takes 1 (gray) or 3 (RGB) input channels, not {in_chans}")
        sizes = stage_sizes(int(input_size))
        if min(sizes.values()) < 1 or sizes["sdib_a"] < 3:
            raise ValueError(f"hsnet needs an input of at least 75 x 75 pixels, not {input_size}")
        self.config = dict(num_classes=num_classes, in_chans=in_chans, input_size=int(input_size),
                           dropout=dropout, dib=bool(dib), fgal=bool(fgal), ktl=bool(ktl), freeze_stem=freeze_stem)
        self.gray_to_rgb = in_chans == 1
        self.stem = InceptionResnetV1Stem(STEM_CHANNELS)
        cin = self.stem.out_channels
        stages = {}
        for st in STAGES:
            stages[st.name] = DIB(cin, st) if dib else InceptionResnetModule(cin, IR_MODULES[st.name], st.width)
            cin = st.width
        self.stages = nn.ModuleDict(stages)
        widths = tuple(st.width for st in STAGES if st.name in FGAL_LEVELS)
        if fgal:
            self.fgal = FGAL(widths, num_classes, dropout)
        else:
            self.dropout = nn.Dropout(dropout)
            self.classifier = nn.Linear(widths[-1], num_classes)
        # Eq. 18: theta_h <- HeInit; the stem is the transferred knowledge (load_stem) unless KTL is off.
        for name, child in self.named_children():
            if name != "stem" or not ktl:
                he_init(child)
        if freeze_stem:
            self.freeze_stem()

    @property
    def has_aux_heads(self) -> bool:
        return self.config["fgal"]

    def load_stem(self, path, freeze: bool = True):
        """KTL: the stem from an Inception-ResNet-v1 face-recognition state dict
        (facenet-pytorch names; safetensors or a torch file), then frozen."""
        if not self.config["ktl"]:
            raise ValueError("this hsnet is built with ktl=False (its stem trains from scratch): "
                             "no stem to transfer")
        stem_state = read_stem_state(path)
        w = stem_state["conv2d_1a.conv.weight"]
        if w.shape[1] != STEM_CHANNELS:
            raise ValueError(f"the stem reads {STEM_CHANNELS} channels, the file's reads {w.shape[1]}")
        self.stem.load_state_dict(stem_state, strict=True)
        if freeze:
            self.freeze_stem()

    def on_merged(self):
        """Deploy form: replicating gray into R, G and B before a convolution equals
        one convolution of the gray image with the three filters summed."""
        conv = self.stem.conv2d_1a.conv
        if not self.gray_to_rgb or conv.in_channels != STEM_CHANNELS:
            return
        folded = nn.Conv2d(1, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                           bias=conv.bias is not None).to(device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            folded.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
            if conv.bias is not None:
                folded.bias.copy_(conv.bias)
        self.stem.conv2d_1a.conv = folded
        self.gray_to_rgb = False

    def forward_features(self, x) -> dict[str, torch.Tensor]:
        """The stem's output and every stage's, by Table 1's names."""
        if self.gray_to_rgb:
            x = x.expand(-1, STEM_CHANNELS, -1, -1)
        x = self.stem(x)
        feats = {"stem": x}
        for name, stage in self.stages.items():
            x = stage(x)
            feats[name] = x
        return feats

    def forward_all(self, x):
        """(logits, [Y_A, Y_B, Y_C], [lambda_A, lambda_B, lambda_C]); without FGAL
        (logits, [], [])."""
        feats = self.forward_features(x)
        if not self.config["fgal"]:
            psi = F.adaptive_avg_pool2d(feats[FGAL_LEVELS[-1]], 1).flatten(1)
            return self.classifier(self.dropout(psi)), [], []
        return self.fgal(*(feats[name] for name in FGAL_LEVELS))

    def forward(self, x):
        return self.forward_all(x)[0]


HSNET_CONFIG_KEYS = ("input_size", "dropout", "dib", "fgal", "ktl", "freeze_stem")


@register_model("hsnet")
def hsnet(num_classes=7, in_chans=1, **config) -> HSNet:
    unknown = sorted(set(config) - set(HSNET_CONFIG_KEYS))
    if "fpn_dim" in unknown:
        raise ValueError("its config (width, fpn_dim) is the earlier, smaller layout, now named 'hsnet-lite', "
                         "not the paper's hsnet")
    if unknown:
        raise ValueError(f"hsnet has no {', '.join(unknown)} (Table 1 fixes its widths; hsnet-lite takes a width)")
    return HSNet(num_classes=num_classes, in_chans=in_chans, **config)
