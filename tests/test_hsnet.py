"""HSNet against its paper (Fan et al., "Hierarchical scale convolutional
neural network for facial expression recognition"): Table 1's stages, the
block equations (Eq. 4-10), FGAL (Eq. 11-17), KTL and He initialization
(Eq. 18-19), the loss (Eq. 21), the training details, the ablation switches;
and that the network still merges exactly and exports.

The expected numbers below are typed from the paper (and, for the stem, from
Inception-ResNet-v1, which the paper says the stem is), not read from the code.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
import torch.nn.functional as F
from torch import nn

from fer_edge import UserError, models
from fer_edge.checkpoint import load_checkpoint, max_relative_logit_error, save_checkpoint
from fer_edge.reparam import merge
from fer_edge.training.rundir import read_resume_state

_spec = importlib.util.spec_from_file_location("fer_test_helpers", Path(__file__).with_name("helpers.py"))
H = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(H)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_training import TINY, assert_same_weights, load_state, needs_data, run, tiny  # noqa: E402,F401

# Table 1, "Output Size" column, for a 3 x 224 x 224 input.
TABLE1 = {
    "stem": (256, 25, 25),
    "rdib_a": (256, 25, 25),
    "sdib_a": (896, 12, 12),
    "rdib_b": (896, 12, 12),
    "sdib_b": (1792, 5, 5),
    "rdib_c": (1792, 5, 5),
}
# The Inception-ResNet-v1 stem (Szegedy et al. 2017, its Fig. 14) at 224 x 224:
# layer -> (kernel, stride, padding, output shape).
STEM_224 = {
    "conv2d_1a": (3, 2, 0, (32, 111, 111)),
    "conv2d_2a": (3, 1, 0, (32, 109, 109)),
    "conv2d_2b": (3, 1, 1, (64, 109, 109)),
    "maxpool_3a": (3, 2, 0, (64, 54, 54)),
    "conv2d_3b": (1, 1, 0, (80, 54, 54)),
    "conv2d_4a": (3, 1, 0, (192, 52, 52)),
    "conv2d_4b": (3, 2, 0, (256, 25, 25)),
}
# Table 1: the dilation rate of each 1x1 -> dilated 3x3 branch a block keeps
# (branches 1-3); every block also has branch 4.
DILATIONS = {"rdib_a": [1, 2], "sdib_a": [1, 2], "rdib_b": [1, 2, 3], "sdib_b": [1, 2, 3], "rdib_c": [1]}
SMALL = 75  # the smallest input whose SDIB-B still has a 3 x 3 map to work on: fast tests


def small_model(seed=0, **config):
    torch.manual_seed(seed)
    model = models.create("hsnet", input_size=SMALL, **config)
    return H.randomize_bn(model, (2, 1, SMALL, SMALL), seed=seed, batches=1)


@pytest.fixture(scope="module")
def at224():
    """One 224 x 224 forward of the default hsnet: the stage outputs and every stem layer's output."""
    torch.manual_seed(0)
    model = models.create("hsnet").eval()
    seen = {}
    hooks = [getattr(model.stem, name).register_forward_hook(
        lambda m, i, o, name=name: seen.__setitem__(name, tuple(o.shape[1:]))) for name in STEM_224]
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 1, 224, 224, generator=torch.Generator().manual_seed(0)))
    for h in hooks:
        h.remove()
    return model, feats, seen


# ------------------------------------------------------------------ Table 1
def test_every_stage_has_table1_channels_and_size_at_224(at224):
    model, feats, _ = at224
    assert model.config["input_size"] == 224 and model.config["in_chans"] == 1
    assert {k: tuple(v.shape[1:]) for k, v in feats.items()} == TABLE1
    assert list(feats) == list(TABLE1)  # and in Table 1's order


def test_stem_is_inception_resnet_v1(at224):
    model, _, seen = at224
    assert seen == {name: spec[3] for name, spec in STEM_224.items()}
    for name, (k, s, p, _) in STEM_224.items():
        layer = getattr(model.stem, name)
        op = layer if isinstance(layer, nn.MaxPool2d) else layer.conv
        assert (op.kernel_size, op.stride, op.padding) in (((k, k), (s, s), (p, p)), (k, s, p)), name
    assert model.stem.conv2d_1a.conv.in_channels == 3  # the face-recognition stem reads RGB


def test_gray_input_is_the_gray_image_in_r_g_and_b():
    torch.manual_seed(0)
    gray = models.create("hsnet", input_size=SMALL).eval()
    rgb = models.create("hsnet", input_size=SMALL, in_chans=3).eval()
    rgb.load_state_dict(gray.state_dict())
    x = torch.randn(2, 1, SMALL, SMALL)
    with torch.no_grad():
        torch.testing.assert_close(gray(x), rgb(x.repeat(1, 3, 1, 1)), rtol=0, atol=0)


# ------------------------------------------------------------------ DIBs (Eq. 4-10)
def _branch_kinds(block):
    """Per branch: ("dilated", d, stride, padding) for 1x1 -> 3x3, ("pool1x1",) or ("1x1",)."""
    kinds = []
    for b in block.branches:
        mods = [m for m in b.modules() if isinstance(m, (nn.Conv2d, nn.MaxPool2d))]
        if isinstance(mods[0], nn.MaxPool2d):
            pool, conv = mods
            assert (pool.kernel_size, pool.stride, pool.padding) == (3, 2, 0)
            assert conv.kernel_size == (1, 1)
            kinds.append(("pool1x1",))
        elif len(mods) == 1:
            assert mods[0].kernel_size == (1, 1) and mods[0].stride == (1, 1)
            kinds.append(("1x1",))
        else:
            first, second = mods
            assert first.kernel_size == (1, 1) and first.stride == (1, 1)
            assert second.kernel_size == (3, 3) and second.in_channels == first.out_channels
            assert first.out_channels < first.in_channels  # the 1x1 decreases the channels
            kinds.append(("dilated", second.dilation[0], second.stride[0], second.padding[0]))
    return kinds


@pytest.mark.parametrize("name", list(DILATIONS))
def test_block_branches_follow_table1(name):
    model = models.create("hsnet", input_size=SMALL)
    kinds = _branch_kinds(model.stages[name])
    sdib = name.startswith("sdib")
    # Table 1: SDIB branch i is 3x3 with stride 2, padding d - 1, dilation d; RDIB stride 1, padding d
    expect = [("dilated", d, 2, d - 1) if sdib else ("dilated", d, 1, d) for d in DILATIONS[name]]
    expect.append(("pool1x1",) if sdib else ("1x1",))  # Eq. 6 / Eq. 9
    assert kinds == expect


@pytest.mark.parametrize("name", ["rdib_a", "rdib_b", "rdib_c"])
def test_rdib_is_input_plus_concatenated_branches(name):
    """Eq. 9-10: F^l = F^(l-1) + (S_1 + S_2 + S_3 + S_4 concatenated), nothing else."""
    model = small_model()
    block = model.stages[name]
    c = dict(TABLE1)[name][0]
    x = torch.randn(2, c, 7, 7)
    with torch.no_grad():
        s = torch.cat([b(x) for b in block.branches], dim=1)
        torch.testing.assert_close(block(x), x + s, rtol=0, atol=0)
    # no projection: every parameter of the block belongs to a branch
    assert sum(p.numel() for p in block.parameters()) == sum(p.numel() for p in block.branches.parameters())


@pytest.mark.parametrize("h", [7, 8, 12, 13, 25])
@pytest.mark.parametrize("name", ["sdib_a", "sdib_b"])
def test_sdib_concatenates_and_halves_minus_one(name, h):
    """Eq. 6 and the text: output floor((H - 1) / 2) x floor((W - 1) / 2)."""
    model = small_model()
    block = model.stages[name]
    cin = {"sdib_a": 256, "sdib_b": 896}[name]
    x = torch.randn(1, cin, h, h + 1)
    with torch.no_grad():
        out = block(x)
        torch.testing.assert_close(out, torch.cat([b(x) for b in block.branches], dim=1), rtol=0, atol=0)
    assert out.shape[-2:] == ((h - 1) // 2, h // 2)


# ------------------------------------------------------------------ FGAL (Eq. 11-17)
def test_fgal_fuses_top_down_and_sums_gated_heads(at224):
    model, feats, _ = at224
    model = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.fgal.parameters():  # FC and conv biases are 0 at He init: give them values
            p.add_(torch.randn_like(p) * 0.05)
        fa, fb, fc = feats["rdib_a"], feats["rdib_b"], feats["rdib_c"]  # after each RDIB
        g = model.fgal
        tc = g.k_c(fc)                                                              # Eq. 11
        tb = fb + F.interpolate(g.k_b(tc), size=fb.shape[-2:], mode="nearest")      # Eq. 12
        ta = fa + F.interpolate(g.k_a(tb), size=fa.shape[-2:], mode="nearest")      # Eq. 13
        expect = 0
        for fmap, gate, head in zip((ta, tb, tc), g.gates, g.heads):
            psi = fmap.mean(dim=(2, 3))
            expect = expect + torch.sigmoid(gate(psi)) * head(psi)                  # Eq. 14-17
        logits, ys, lams = g(fa, fb, fc)
    torch.testing.assert_close(logits, expect, rtol=1e-5, atol=1e-5)
    assert [h.in_features for h in g.heads] == [256, 896, 1792]  # each head sees its own level's width
    assert [gt.out_features for gt in g.gates] == [1, 1, 1] and len(ys) == len(lams) == 3
    # 1x1 convolutions only; K_B and K_A bring the deeper map to the width it is added to
    assert all(k.kernel_size == (1, 1) for k in (g.k_a, g.k_b, g.k_c))
    assert (g.k_b.out_channels, g.k_a.out_channels) == (896, 256)


def test_output_is_the_gated_sum():
    model = small_model()
    with torch.no_grad():
        x = torch.randn(2, 1, SMALL, SMALL)
        logits, ys, lams = model.forward_all(x)
        torch.testing.assert_close(model(x), logits, rtol=0, atol=0)
    assert all(((lam > 0) & (lam < 1)).all() for lam in lams)
    torch.testing.assert_close(logits, sum(lam * y for lam, y in zip(lams, ys)))


# ------------------------------------------------------------------ KTL, He initialization (Eq. 18-20)
def _he_ratio(w):
    fan_in = w[0].numel()
    return float(w.detach().std()) / math.sqrt(2.0 / fan_in)


def test_he_initialization_outside_the_transferred_stem():
    torch.manual_seed(0)
    model = models.create("hsnet")
    big = [(n, m.weight) for n, m in model.named_modules()
           if isinstance(m, (nn.Conv2d, nn.Linear)) and not n.startswith("stem.") and m.weight.numel() >= 20_000]
    assert len(big) > 20
    for name, w in big:
        assert abs(_he_ratio(w) - 1) < 0.05, name
        assert abs(float(w.detach().mean())) < 0.05 * math.sqrt(2.0 / w[0].numel()), name
    # without KTL the stem starts from He initialization too
    torch.manual_seed(0)
    scratch = models.create("hsnet", ktl=False)
    for name in ("conv2d_2b", "conv2d_4a", "conv2d_4b"):
        assert abs(_he_ratio(getattr(scratch.stem, name).conv.weight) - 1) < 0.05, name


def test_ktl_loads_and_freezes_the_face_recognition_stem(tmp_path):
    torch.manual_seed(0)
    face = models.create("hsnet", input_size=SMALL)
    H.randomize_bn(face.stem, (2, 3, SMALL, SMALL), batches=1)
    # a facenet-pytorch-style state dict: stem keys with their `relu` names, plus others
    state = {k.replace(".act.", ".relu."): v for k, v in face.stem.state_dict().items()}
    state["logits.weight"] = torch.randn(8, 512)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "facenet.safetensors"))
    model = models.create("hsnet", input_size=SMALL)
    total = sum(p.numel() for p in model.parameters())
    stem = sum(p.numel() for p in model.stem.parameters())
    torch.save(state, tmp_path / "facenet.pt")   # facenet-pytorch's own format, a pickle: never read
    with pytest.raises(ValueError, match=r"never unpickles a file\); convert a \.pt once"):
        model.load_stem(tmp_path / "facenet.pt")
    model.load_stem(tmp_path / "facenet.safetensors")
    assert_same_weights(model.stem.state_dict(), face.stem.state_dict())
    # Eq. 19-20: theta_s fixed, theta_h trained
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == total - stem
    mean = model.stem.conv2d_1a.bn.running_mean.clone()
    model.train()
    model(torch.randn(2, 1, SMALL, SMALL)).sum().backward()
    torch.testing.assert_close(model.stem.conv2d_1a.bn.running_mean, mean, rtol=0, atol=0)
    assert model.fgal.heads[0].weight.grad is not None
    # the KTL ablation has no stem to transfer
    with pytest.raises(ValueError, match="ktl=False"):
        models.create("hsnet", input_size=SMALL, ktl=False).load_stem(tmp_path / "facenet.safetensors")


# ------------------------------------------------------------------ ablations (Table 6)
def _params(m):
    return sum(p.numel() for p in m.parameters())


def test_ablation_switches_change_the_network_not_the_output_shape():
    x = torch.randn(2, 1, SMALL, SMALL)
    full = small_model()
    sizes = {k: tuple(v.shape[1:]) for k, v in full.forward_features(x).items()}
    # DIB off: Inception-ResNet-v1's modules (the paper's baseline) where the DIBs are, same stage shapes
    no_dib = small_model(dib=False)
    assert not any(type(m).__name__ == "DIB" for m in no_dib.modules())
    assert {k: tuple(v.shape[1:]) for k, v in no_dib.forward_features(x).items()} == sizes
    assert _params(no_dib) != _params(full)
    # FGAL off: one classifier on the last map, no fusion, no gates
    no_fgal = small_model(fgal=False)
    fgal_params = _params(full.fgal)
    assert not hasattr(no_fgal, "fgal")
    assert _params(no_fgal) == _params(full) - fgal_params + 1792 * 7 + 7
    logits, ys, lams = no_fgal.forward_all(x)
    assert ys == [] and lams == []
    # KTL off: the same network, its stem trained (nothing frozen)
    no_ktl = small_model(ktl=False)
    assert _params(no_ktl) == _params(full)
    assert all(p.requires_grad for p in no_ktl.parameters())
    for m in (full, no_dib, no_fgal, no_ktl):
        with torch.no_grad():
            assert m(x).shape == (2, 7)
    assert (no_dib.config["dib"], no_fgal.config["fgal"], no_ktl.config["ktl"]) == (False, False, False)


# ------------------------------------------------------------------ loss (Eq. 21)
def test_loss_is_the_cross_entropy_of_the_gated_sum_by_default():
    from fer_edge.training.trainer import TrainSettings, label_loss

    assert TrainSettings.__dataclass_fields__["aux_weight"].default == 0.0
    g = torch.Generator().manual_seed(0)
    logits, ys = torch.randn(8, 7, generator=g), [torch.randn(8, 7, generator=g) for _ in range(3)]
    y = torch.arange(8) % 7
    target = F.one_hot(y, 7).float()
    by_hand = -torch.log_softmax(logits, 1)[torch.arange(8), y].mean()  # Eq. 21
    torch.testing.assert_close(label_loss(logits, ys, target, None, 0.0, 0.0), by_hand)
    aux = sum(F.cross_entropy(yj, y) for yj in ys) / 3
    torch.testing.assert_close(label_loss(logits, ys, target, None, 0.0, 0.5), by_hand + 0.5 * aux)


# ------------------------------------------------------------------ training details
def test_hsnet_paper_recipe_is_the_papers():
    from fer_edge.training.recipes import get_recipe
    from fer_edge.training.trainer import build_optimizer, make_scheduler

    r = get_recipe("hsnet-paper")
    assert (r["optimizer"], r["lr"], tuple(r["betas"]), r["batch_size"], r["epochs"]) == \
        ("adam", 0.01, (0.9, 0.999), 32, 500)
    assert r["schedule"] == "plateau" and r["plateau"]["patience"] == 20 and r["plateau"]["mode"] == "min"
    aug = {k: v for k, v in r["augment"].items() if v}
    assert set(aug) == {"hflip", "degrees"} and aug["degrees"] == 5.0  # horizontal flips, 5 degree rotations
    assert r["label_smoothing"] == r["mixup"] == r["cutmix"] == r["ema"] == r["weight_decay"] == 0
    opt = build_optimizer(nn.Linear(4, 2), r)
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["betas"] == (0.9, 0.999)
    sched = make_scheduler(opt, r, {}, 0)
    assert isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau) and sched.patience == 20
    # stepped with a validation loss that stops improving, it lowers the learning rate once patience runs out
    for epoch in range(1 + 20):
        sched.step(1.0)
    assert opt.param_groups[0]["lr"] == 0.01
    for epoch in range(5):
        sched.step(1.0)
    assert opt.param_groups[0]["lr"] < 0.01


@needs_data
def test_plateau_schedule_resumes_bit_exactly_after_sigkill(tiny, tmp_path):
    train, val = tiny
    common = [*TINY, "--recipe", "hsnet-paper", "--data", train, "--val", val, "--epochs", "2", "--lr", "1e-3"]
    full = run("train", *common, "--out", tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    killed = run("train", *common, "--out", tmp_path / "cut", hooks={"kill_after_epoch": 1})
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-2000:])
    resumed = run("train", *common, "--out", tmp_path / "cut", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(load_state(tmp_path / "full" / "last.safetensors"),
                        load_state(tmp_path / "cut" / "last.safetensors"))
    a = read_resume_state(tmp_path / "full" / "resume.safetensors")["scheduler"]
    b = read_resume_state(tmp_path / "cut" / "resume.safetensors")["scheduler"]
    assert a == b
    assert a["patience"] == 20 and a["last_epoch"] == 2  # a plateau schedule, stepped once per epoch
    rows = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all("val_loss" in r for r in rows)


@needs_data
def test_bad_hsnet_training_requests_are_one_line_errors(tiny, tmp_path):
    train, val = tiny
    base = ["train", "--data", train, "--no-progress", "--out", tmp_path / "x"]
    H.one_line_error(run(*base, "--val", val, "--model", "hsnet"), "--stem-weights")
    H.one_line_error(run(*base, "--folds", "3", "--model", "hsnet", "--no-ktl", "--recipe", "hsnet-paper"),
                     "--val")
    H.one_line_error(run(*base, "--val", val, *TINY, "--no-fgal"), "--model hsnet")
    H.one_line_error(run(*base, "--val", val, *TINY, "--aux-weight", "0.3"), "no auxiliary heads")


# ------------------------------------------------------------------ checkpoints, merge, export
def test_checkpoint_of_the_earlier_layout_does_not_load_as_hsnet(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    lite = models.create("hsnet-lite", width=0.25)
    save_checkpoint(tmp_path / "lite.safetensors", lite)
    with safe_open(str(tmp_path / "lite.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["fer_edge"])
        state = {k: f.get_tensor(k) for k in f.keys()}
    meta["arch"] = "hsnet"  # what the earlier layout was called
    save_file(state, str(tmp_path / "old.safetensors"), {"fer_edge": json.dumps(meta)})
    with pytest.raises(UserError) as err:
        load_checkpoint(tmp_path / "old.safetensors")
    assert "hsnet-lite" in str(err.value) and "\n" not in str(err.value)
    # the same weights load as what they are
    model, meta = load_checkpoint(tmp_path / "lite.safetensors")
    assert meta["arch"] == "hsnet-lite" and meta["preprocess"]["input_size"] == [112, 112]


def test_checkpoint_records_gray_preprocessing_at_the_input_size(tmp_path):
    model = models.create("hsnet", input_size=SMALL, ktl=False)
    meta = save_checkpoint(tmp_path / "h.safetensors", merge(model))
    assert meta["preprocess"]["input_size"] == [SMALL, SMALL] and meta["preprocess"]["gray"]
    loaded, _ = load_checkpoint(tmp_path / "h.safetensors")
    x = torch.randn(1, 1, SMALL, SMALL)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), merge(model)(x), rtol=0, atol=0)
    from fer_edge.checkpoint import default_preprocess

    assert default_preprocess("hsnet", models.create("hsnet").config)["input_size"] == [224, 224]


@pytest.mark.parametrize("config", [{}, {"dib": False, "fgal": False}])
def test_merge_is_exact(config):
    model = small_model(**config)
    x = torch.randn(2, 1, SMALL, SMALL, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
        merged = merge(model, use_kernel=False)
        assert max_relative_logit_error(merged(x), ref) <= 1e-5
        m64 = copy.deepcopy(model).double()
        assert max_relative_logit_error(merge(m64, use_kernel=False)(x.double()), m64(x.double())) <= 1e-12
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in merged.modules())
    assert merged.stem.conv2d_1a.conv.in_channels == 1  # the gray replication folded into the first conv


@needs_data
def test_exports_exactly_to_onnx_and_tflite(tmp_path):
    from fer_edge.converters.pipeline import convert

    calib = H.copy_subset(H.DATA / "fer2013" / "publictest", tmp_path / "calib", 2)
    model = small_model()
    weights = tmp_path / "hsnet.safetensors"
    save_checkpoint(weights, model)
    for target in ("onnx", "android"):
        report = convert(weights, target, "fp32", tmp_path / target, calib=calib, calib_size=8,
                         log=lambda *a: None)
        assert report["passed"], report["failures"]
        assert report["max_abs_logit_diff"] <= 1e-4


def test_runs_recorded_before_the_new_recipe_keys_still_resume():
    """A fingerprint stored before recipes had ``betas`` and ``plateau`` (and when
    every run recorded aux_weight 0.3) compares equal to today's for the same run."""
    from fer_edge.training.recipes import get_recipe
    from fer_edge.training.trainer import comparable_fingerprint

    new = {"model": "macnn", "recipe": get_recipe("best"), "aux_weight": 0.0}
    old = json.loads(json.dumps({**new, "aux_weight": 0.3,
                                 "recipe": {k: v for k, v in new["recipe"].items() if k not in ("betas", "plateau")}}))
    assert comparable_fingerprint(old, aux_heads=False) == comparable_fingerprint(new, aux_heads=False)
    # where the heads exist, the weight of their loss is part of the run
    assert comparable_fingerprint(old, aux_heads=True) != comparable_fingerprint(new, aux_heads=True)
