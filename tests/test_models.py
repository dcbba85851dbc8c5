"""Models and the merge to deploy form: exact, asserted equivalence."""
from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from fer_edge import models
from fer_edge.checkpoint import load_checkpoint, max_relative_logit_error, save_checkpoint
from fer_edge.models.layers import ACBlock, FusedMultiScaleConv, MAConv
from fer_edge.reparam import add_to_center, fuse_bn, merge, pad_kernel_to

_spec = importlib.util.spec_from_file_location("fer_test_helpers", Path(__file__).with_name("helpers.py"))
H = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(H)

# fp32 merge tolerance: max |logit difference| <= 1e-5 * max |logit| (the
# merged kernels sum the same products in another order; float32 rounding
# through 13-16 layers stays ~1e-6).  In float64 the merge must be exact to 1e-12.
TOL32, TOL64 = 1e-5, 1e-12

CONFIGS = [
    ("macnn", dict(maconv_stages=[1]), 48),
    ("macnn", dict(), 48),
    ("macnn", dict(width=0.25), 48),
    ("macnn", dict(width=0.25, maconv_stages=[1, 3, 5]), 53),  # odd input size
    ("vgg16", dict(), 48),
    ("vgg16", dict(width=0.5), 61),
    ("hsnet-lite", dict(input_size=112), 112),
    ("hsnet-lite", dict(input_size=99, width=0.5), 99),
]


def _ids(c):
    return f"{c[0]}-{'-'.join(f'{k}{v}' for k, v in c[1].items()) or 'default'}-{c[2]}px"


def build(name, cfg, size, seed=0):
    torch.manual_seed(seed)
    m = models.create(name, **cfg)
    return H.randomize_bn(m, (4, 1, size, size), seed=seed)


@pytest.mark.parametrize("case", CONFIGS, ids=[_ids(c) for c in CONFIGS])
def test_merge_is_exact(case):
    name, cfg, size = case
    model = build(name, cfg, size)
    x = torch.randn(3, 1, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
        plain = merge(model, use_kernel=False)
        fused = merge(model, use_kernel=True)
        assert max_relative_logit_error(plain(x), ref) <= TOL32
        assert max_relative_logit_error(fused(x), ref) <= TOL32
        m64 = copy.deepcopy(model).double()  # merge in float64: the algebra itself must be exact
        assert max_relative_logit_error(merge(m64, use_kernel=False)(x.double()), m64(x.double())) <= TOL64
    for m in (plain, fused):
        assert not any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in m.modules())


def test_merge_leaves_original_trainable():
    model = build("macnn", dict(width=0.25), 48)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = merge(model)
    assert any(isinstance(m, MAConv) for m in model.modules())
    assert not any(isinstance(m, MAConv) for m in merged.modules())
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)
    model.train()
    loss = model(torch.randn(2, 1, 48, 48)).sum()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def maconv_deploy_params(cin, c1, c3, c5):
    """Paper's deploy form of one MAConv: square 1x1, 3x3, 5x5 kernels + biases."""
    return cin * (c1 + 9 * c3 + 25 * c5) + c1 + c3 + c5


@pytest.mark.parametrize("width", [1.0, 0.25])
def test_merged_macnn_has_three_square_kernels_and_deploy_parameter_count(width):
    model = models.create("macnn", width=width)
    merged = merge(model)
    fused = [m for m in merged.modules() if isinstance(m, FusedMultiScaleConv)]
    assert len(fused) == 5  # one per stage
    expected = 0
    cin = 1
    for stage_widths, f in zip(models.macnn.VGG16_STAGES, fused):
        assert f.w1.shape[-2:] == (1, 1) and f.w3.shape[-2:] == (3, 3) and f.w5.shape[-2:] == (5, 5)
        assert {n for n, _ in f.named_parameters()} == {"w1", "b1", "w3", "b3", "w5", "b5"}
        cout = models.macnn.scaled(stage_widths[0], width)
        c1, c3, c5 = f.channels
        assert (c1, c3, c5) == models.layers.split_channels(cout)
        assert c1 + c3 + c5 == cout
        cin = f.w1.shape[1]
        expected += maconv_deploy_params(cin, c1, c3, c5)
    # the rest: 8 folded 3x3 convs (with bias) and the classifier
    for m in merged.modules():
        if isinstance(m, nn.Conv2d):
            assert m.kernel_size == (3, 3) and m.bias is not None
            expected += m.weight.numel() + m.bias.numel()
        elif isinstance(m, nn.Linear):
            expected += m.weight.numel() + m.bias.numel()
    assert sum(p.numel() for p in merged.parameters()) == expected
    if width == 1.0:
        # 1*(16+216+600) + 64*(32+432+1200) + 128*(64+864+2400) + 256*(128+1728+4800) + 512*(128+1728+4800) + biases
        assert sum(maconv_deploy_params(*a) for a in [(1, 16, 24, 24), (64, 32, 48, 48), (128, 64, 96, 96),
                                                      (256, 128, 192, 192), (512, 128, 192, 192)]) == \
            sum(sum(p.numel() for p in f.parameters()) for f in fused)


def test_default_split_is_quarter_three_eighths():
    assert models.layers.split_channels(64) == (16, 24, 24)
    assert models.layers.split_channels(512) == (128, 192, 192)
    m = MAConv(8, 40, split=(1, 1, 2))
    assert (m.c1, m.c3, m.c5) == (10, 10, 20)


def test_fuse_bn_and_center_add_are_exact():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    conv = nn.Conv2d(3, 4, (3, 1), padding=(1, 0), bias=False).double()
    bn = nn.BatchNorm2d(4).double()
    H.randomize_bn(nn.Sequential(conv, bn), (2, 3, 9, 9))
    k, b = fuse_bn(conv.weight, bn)
    square = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    got = torch.nn.functional.conv2d(x, add_to_center(square, k), b, padding=1)
    want = torch.nn.functional.conv2d(x, square, padding=1) + bn(conv(x))
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    assert pad_kernel_to(torch.ones(1, 1, 1, 5), 5)[0, 0].sum(1).tolist() == [0, 0, 5, 0, 0]
    with pytest.raises(ValueError):
        pad_kernel_to(torch.ones(1, 1, 2, 2), 5)


def test_acblock_outputs_align_with_the_square_kernel():
    blk = ACBlock(2, 3, 5).eval()
    H.randomize_bn(blk, (2, 2, 7, 6))
    x = torch.randn(1, 2, 7, 6)
    k, b = blk.merged_kernel()
    with torch.no_grad():
        torch.testing.assert_close(torch.nn.functional.conv2d(x, k, b, padding=2), blk(x), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not H.FER_PUBLICTEST.is_dir(), reason=f"FER2013 images not found at {H.FER_PUBLICTEST}")
@pytest.mark.parametrize("name, cfg", [("macnn", dict(width=0.25)), ("macnn", dict()), ("vgg16", dict(width=0.25))])
def test_top1_agreement_on_500_real_fer2013_images(name, cfg):
    x, _ = H.load_fer_images(500)
    model = build(name, cfg, 48)
    merged = merge(model, use_kernel=True)
    with torch.no_grad():
        a = torch.cat([model(b) for b in x.split(100)])
        b = torch.cat([merged(b) for b in x.split(100)])
    assert (a.argmax(1) == b.argmax(1)).all(), "merged model must agree on every image"
    assert max_relative_logit_error(b, a) <= TOL32


def test_kernel_path_matches_plain_path():
    model = build("macnn", dict(width=0.5), 48)
    x = torch.randn(4, 1, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(merge(model, use_kernel=True)(x), merge(model, use_kernel=False)(x),
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible on this machine")
@pytest.mark.parametrize("kernel", ["simt", "wmma", "splitk"])
def test_kernel_path_matches_plain_path_cuda(kernel):
    from fer_edge.models.layers import FusedMultiScaleConv

    def forced(m):  # every multi-scale layer runs `kernel`, whatever the dispatch table says
        for layer in m.modules():
            if isinstance(layer, FusedMultiScaleConv):
                layer.cuda_kernel = kernel
        return m

    model = build("macnn", dict(), 48)
    x = torch.randn(8, 1, 48, 48)
    with torch.no_grad():
        plain = merge(model, use_kernel=False).cuda()(x.cuda())
        if kernel != "wmma":  # wmma runs fp16 only
            fused = forced(merge(model, use_kernel=True).cuda())(x.cuda())
            torch.testing.assert_close(fused, plain, atol=1e-4, rtol=1e-4)
        half = forced(merge(model, use_kernel=True).cuda().half())(x.cuda().half())
    # fp16 through 13 layers: bench_model.py measured 6e-4 to 8e-4 relative logit error on the H100
    assert max_relative_logit_error(half.float(), plain) <= 5e-3


def test_hsnet_lite_loads_and_freezes_a_face_recognition_stem(tmp_path):
    rgb = models.create("hsnet-lite", in_chans=3)
    H.randomize_bn(rgb.stem, (2, 3, 112, 112))
    # A facenet-pytorch-style state dict: stem keys with their `relu` names, plus others.
    state = {k.replace(".act.", ".relu."): v for k, v in rgb.stem.state_dict().items()}
    state["logits.weight"] = torch.randn(8, 512)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "facenet.safetensors"))
    gray = models.create("hsnet-lite", in_chans=1)
    gray.load_stem(tmp_path / "facenet.safetensors")
    x = torch.randn(2, 1, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(gray.stem(x), rgb.stem.eval()(x.repeat(1, 3, 1, 1)), atol=1e-4, rtol=1e-4)
    assert not any(p.requires_grad for p in gray.stem.parameters())
    mean = gray.stem.conv2d_1a.bn.running_mean.clone()
    gray.train()
    gray(torch.randn(2, 1, 112, 112)).sum().backward()
    torch.testing.assert_close(gray.stem.conv2d_1a.bn.running_mean, mean, atol=0, rtol=0)
    assert gray.heads[0].weight.grad is not None


def test_hsnet_lite_output_is_gated_sum_of_heads():
    model = build("hsnet-lite", dict(input_size=112), 112)
    x = torch.randn(2, 1, 112, 112)
    with torch.no_grad():
        logits, ys, lams = model.forward_all(x)
    assert len(ys) == len(lams) == 3
    assert all(((lam > 0) & (lam < 1)).all() for lam in lams)
    torch.testing.assert_close(logits, sum(lam * y for lam, y in zip(lams, ys)))


def test_registry():
    assert {"macnn", "vgg16", "hsnet", "hsnet-lite"} <= set(models.list_models())
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        models.create("resnet")
    with pytest.raises(ValueError, match="maconv_stages"):
        models.create("macnn", maconv_stages=[6])


# ------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_train_and_merged(tmp_path):
    model = build("macnn", dict(width=0.25), 48)
    x = torch.randn(2, 1, 48, 48)
    save_checkpoint(tmp_path / "t.safetensors", model)
    save_checkpoint(tmp_path / "m.safetensors", merge(model))
    with pytest.raises(Exception, match="exists"):
        save_checkpoint(tmp_path / "t.safetensors", model)
    t, tmeta = load_checkpoint(tmp_path / "t.safetensors")
    m, mmeta = load_checkpoint(tmp_path / "m.safetensors")
    assert tmeta["form"] == "train" and mmeta["form"] == "merged"
    assert tmeta["classes"] == ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]
    assert mmeta["preprocess"]["input_size"] == [48, 48]
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(t(x), ref, atol=0, rtol=0)
        torch.testing.assert_close(m(x), ref, atol=1e-4, rtol=1e-4)


def fer_edge_cli(*args):
    exe = Path(sys.executable).with_name("fer-edge")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=600)


def assert_one_line_error(proc, *needles):
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(d / "macnn.safetensors", build("macnn", dict(width=0.25), 48))
    return d / "macnn.safetensors"


def test_cli_merge_writes_checks_and_refuses_overwrite(trained_ckpt, tmp_path):
    out = tmp_path / "merged.safetensors"
    proc = fer_edge_cli("merge", "--weights", str(trained_ckpt), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "max |logit difference|" in proc.stdout
    merged, meta = load_checkpoint(out)
    assert meta["form"] == "merged"
    assert_one_line_error(fer_edge_cli("merge", "--weights", str(trained_ckpt), "--out", str(out)), "exists", "--force")
    assert fer_edge_cli("merge", "--weights", str(trained_ckpt), "--out", str(out), "--force").returncode == 0
    assert_one_line_error(fer_edge_cli("merge", "--weights", str(out), "--out", str(tmp_path / "again.safetensors")),
                          "already merged")
    assert not list(tmp_path.glob(".*.tmp")), "no temp files left behind"


def test_cli_merge_bad_checkpoints(trained_ckpt, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = str(tmp_path / "o.safetensors")
    # missing file
    assert_one_line_error(fer_edge_cli("merge", "--weights", str(tmp_path / "nope.safetensors"), "--out", out),
                          "no such checkpoint")
    # corrupt (random bytes) and truncated files
    (tmp_path / "junk.safetensors").write_bytes(bytes(range(256)) * 10)
    assert_one_line_error(fer_edge_cli("merge", "--weights", str(tmp_path / "junk.safetensors"), "--out", out),
                          "corrupt or truncated")
    data = trained_ckpt.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    assert_one_line_error(fer_edge_cli("merge", "--weights", str(tmp_path / "cut.safetensors"), "--out", out),
                          "corrupt or truncated")
    # another architecture: VGG16 weights under MACNN metadata
    with safe_open(str(trained_ckpt), framework="pt") as f:
        meta = f.metadata()
    vgg = models.create("vgg16", width=0.25)
    save_file({k: v.contiguous() for k, v in vgg.state_dict().items()}, str(tmp_path / "other.safetensors"), meta)
    assert_one_line_error(fer_edge_cli("merge", "--weights", str(tmp_path / "other.safetensors"), "--out", out),
                          "do not match")
    # NaN weights
    model, _ = load_checkpoint(trained_ckpt)
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    state["fc.weight"][0, 0] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"), meta)
    assert_one_line_error(fer_edge_cli("merge", "--weights", str(tmp_path / "nan.safetensors"), "--out", out),
                          "NaN", "fc.weight")
    # a safetensors file that is not ours
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    assert_one_line_error(fer_edge_cli("merge", "--weights", str(tmp_path / "plain.safetensors"), "--out", out),
                          "not a fer-edge checkpoint")
    assert not Path(out).exists()


@pytest.mark.parametrize("h,w,oh,ow", [(6, 6, 11, 11), (3, 3, 6, 6), (5, 7, 13, 9), (11, 11, 6, 6)])
def test_hsnet_nearest_resize_is_pytorch_nearest(h, w, oh, ow):
    import torch.nn.functional as F

    from fer_edge.models.hsnet import nearest_resize

    x = torch.randn(2, 3, h, w)
    torch.testing.assert_close(nearest_resize(x, (oh, ow)), F.interpolate(x, size=(oh, ow), mode="nearest"),
                               rtol=0, atol=0)
