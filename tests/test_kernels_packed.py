"""The packed CPU weights of a merged layer (CpuPackedMsConv): the direct and
Winograd F(4x4, 5x5) paths against the float64 reference, the automatic choice
between them, and the cache of packed weights kept in step with in-place
updates, fused optimizer steps and reloads under inference mode."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fer_edge.kernels import fused_ms_conv_reference

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_kernels import FP32_TOL, assert_same_layout, make_inputs  # noqa: E402


# ------------------------------------------------------- packed CPU weights
def test_packed_cpu_weights_match_reference_and_track_changes():
    import copy

    from fer_edge.kernels import CpuPackedMsConv
    from fer_edge.models.layers import FusedMultiScaleConv

    args = make_inputs(2, 64, 12, 10, 16, 24, 24, seed=11)
    x, ws = args[0], args[1:]
    packed = CpuPackedMsConv(*ws)
    torch.testing.assert_close(packed(x), fused_ms_conv_reference(*args), **FP32_TOL)
    xl = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(packed(xl, relu=False), fused_ms_conv_reference(xl, *ws, relu=False), **FP32_TOL)
    with pytest.raises(ValueError, match="64 channels"):
        packed(torch.randn(1, 3, 5, 5))

    layer = FusedMultiScaleConv(*[t.clone() for t in ws])
    with torch.no_grad():
        y1 = layer(x)
        first = layer._cpu_pack
        assert first is not None, "eager CPU inference packs the weights once"
        assert layer(x) is not None and layer._cpu_pack is first, "and reuses them"
        layer.w5.mul_(2.0)  # in-place change: the pack must be rebuilt
        y2 = layer(x)
    assert layer._cpu_pack is not first
    ref2 = fused_ms_conv_reference(x, layer.w1, layer.b1, layer.w3, layer.b3, layer.w5, layer.b5)
    torch.testing.assert_close(y2, ref2, **FP32_TOL)
    assert not torch.allclose(y1, y2)
    clone = copy.deepcopy(layer)  # merge() deep-copies models: the cache must not break that
    assert clone._cpu_pack is None
    with torch.no_grad():
        torch.testing.assert_close(clone(x), y2, atol=0, rtol=0)
    # with gradients wanted, the autograd-aware custom op runs instead
    y3 = layer(x)
    assert y3.requires_grad
    torch.testing.assert_close(y3.detach(), y2, **FP32_TOL)


# ------------------------------------------------------- Winograd F(4x4, 5x5)
# Winograd rounds differently from direct summation: with inputs and outputs
# O(1) (He-scaled weights), its float32 error measured ~2e-5 at cin 128-512
# (direct: ~1e-6).  The reference is computed in float64 so that only the
# kernel's own error is measured.
WINOGRAD_TOL = dict(atol=1e-4, rtol=1e-4)
WINOGRAD_CASES = [
    # n, cin, h, w, c1, c3, c5: whole tiles, ragged edges (h, w not multiples
    # of 4), channel tails (cin and ctot not multiples of 16), tiny inputs,
    # and 4 x 24 x 24 = 144 tiles, more than one tile group.
    (1, 64, 24, 24, 32, 48, 48),
    (1, 128, 12, 12, 64, 96, 96),
    (2, 16, 7, 5, 5, 3, 9),
    (1, 37, 3, 1, 1, 2, 3),
    (3, 1, 9, 10, 4, 4, 4),
    (4, 64, 24, 24, 16, 24, 24),
    # transformed weights over 16 MB: groups of 64 tiles, here 80 tiles in two groups
    (20, 256, 6, 6, 16, 128, 128),
]


@pytest.mark.parametrize("case", WINOGRAD_CASES, ids=lambda c: "n{}-cin{}-{}x{}-{}.{}.{}".format(*c))
@pytest.mark.parametrize("nhwc", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "lin"])
def test_winograd_matches_float64_reference(case, nhwc, relu):
    from fer_edge.kernels import CpuPackedMsConv

    args = make_inputs(*case, nhwc=nhwc, seed=sum(case))
    y = CpuPackedMsConv(*args[1:], algo="winograd")(args[0], relu=relu)
    ref = fused_ms_conv_reference(*[t.double() for t in args], relu=relu)
    torch.testing.assert_close(y.double(), ref, **WINOGRAD_TOL)
    assert_same_layout(y, fused_ms_conv_reference(*args))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 3), cin=st.integers(1, 40), h=st.integers(1, 14), w=st.integers(1, 14),
    c1=st.integers(1, 20), c3=st.integers(1, 24), c5=st.integers(1, 24), nhwc=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_winograd_fuzz_shapes(n, cin, h, w, c1, c3, c5, nhwc, seed):
    from fer_edge.kernels import CpuPackedMsConv

    args = make_inputs(n, cin, h, w, c1, c3, c5, nhwc=nhwc, seed=seed)
    y = CpuPackedMsConv(*args[1:], algo="winograd")(args[0])
    torch.testing.assert_close(y.double(), fused_ms_conv_reference(*[t.double() for t in args]), **WINOGRAD_TOL)


def test_winograd_is_deterministic_across_thread_counts():
    from fer_edge.kernels import CpuPackedMsConv

    args = make_inputs(2, 64, 12, 12, 16, 24, 24, seed=5)
    packed = CpuPackedMsConv(*args[1:], algo="winograd")
    a = packed(args[0])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        packed1 = CpuPackedMsConv(*args[1:], algo="winograd")
        b = packed1(args[0])
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_auto_picks_winograd_only_where_it_pays():
    from fer_edge.kernels import CpuPackedMsConv

    def layer(cin, c1, c3, c5, algo="auto"):
        return CpuPackedMsConv(*make_inputs(1, cin, 1, 1, c1, c3, c5)[1:], algo=algo)

    l1, l2, l5 = layer(1, 16, 24, 24), layer(64, 32, 48, 48), layer(512, 128, 192, 192)
    assert l1.algorithm_for(1, 48, 48) == "direct"      # one input channel: nothing to share a transform
    assert l2.algorithm_for(1, 24, 24) == "winograd"    # MACNN L2 at batch 1
    assert l5.algorithm_for(1, 3, 3) == "direct"        # one tile would stream 67 MB of weights
    assert l5.algorithm_for(64, 3, 3) == "winograd"     # enough tiles to reuse them
    assert layer(64, 32, 48, 48, "direct").algorithm_for(1, 24, 24) == "direct"
    assert layer(2, 1, 1, 1, "winograd").algorithm_for(1, 1, 1) == "winograd"
    # Auto runs exactly the chosen algorithm.
    args = make_inputs(1, 64, 24, 24, 32, 48, 48, seed=3)
    auto = CpuPackedMsConv(*args[1:])(args[0])
    torch.testing.assert_close(auto, CpuPackedMsConv(*args[1:], algo="winograd")(args[0]), atol=0, rtol=0)
    with pytest.raises(ValueError, match="unknown CPU algorithm"):
        CpuPackedMsConv(*args[1:], algo="fft")


def test_cpu_pack_notices_fused_optimizer_steps():
    """Fused optimizers update weights in place without bumping their version
    counters: the packed CPU weights must still be rebuilt after a step."""
    from fer_edge.models.layers import FusedMultiScaleConv

    x, *ws = make_inputs(2, 8, 6, 6, 4, 6, 6)
    m = FusedMultiScaleConv(*ws).eval()
    with torch.no_grad():
        m(x)
    pack = m._cpu_pack
    m.train()
    m(x).square().sum().backward()  # grad mode: the custom op path, the pack stays as it was
    versions = [p._version for p in m.parameters()]
    torch.optim.SGD(m.parameters(), lr=0.1, fused=True).step()
    assert [p._version for p in m.parameters()] == versions  # the case this guards against
    m.eval()
    with torch.no_grad():
        y = m(x)
    assert m._cpu_pack is not pack
    torch.testing.assert_close(y, fused_ms_conv_reference(x, m.w1, m.b1, m.w3, m.b3, m.w5, m.b5), **FP32_TOL)
    m.double()  # moving / casting the module drops the pack (it holds the old weights)
    assert m._cpu_pack is None


def test_model_made_under_inference_mode_runs_the_kernel_and_reloads():
    """Weights created under torch.inference_mode are inference tensors, which
    carry no version counter: the packs must still work, and load_state_dict
    (inside inference mode, the one way such weights change) must refresh them."""
    from fer_edge import models
    from fer_edge.reparam import merge

    torch.manual_seed(0)
    train_a = models.create("macnn", width=0.125).eval()
    train_b = models.create("macnn", width=0.125).eval()
    x = torch.randn(2, 1, 48, 48)
    with torch.inference_mode():
        fused = merge(train_a)
        assert fused.features[0].w3.is_inference()
        y = fused(x)
        torch.testing.assert_close(y, merge(train_a, use_kernel=False)(x), **FP32_TOL)
        fused.load_state_dict(merge(train_b).state_dict())
        torch.testing.assert_close(fused(x), merge(train_b, use_kernel=False)(x), **FP32_TOL)
    with torch.no_grad():  # (outside inference mode, as torch's own layers, only without autograd)
        assert not torch.allclose(y, fused(x))


def test_importing_the_kernels_leaves_torch_optim_alone(tmp_path):
    """The optimizer-step counter (fused optimizers bump no version counter) is a
    process-wide torch.optim hook: registered by the first packed-weight cache,
    once, never by importing the module."""
    import subprocess
    import sys

    code = """
import torch
import torch.optim.optimizer as o
import fer_edge.kernels as k
from fer_edge.models.layers import FusedMultiScaleConv
print(len(o._global_optimizer_post_hooks))
k.watch_optimizer_steps(); k.watch_optimizer_steps()
m = FusedMultiScaleConv(*(torch.randn(*s) for s in ((2, 3, 1, 1), (2,), (2, 3, 3, 3), (2,), (2, 3, 5, 5), (2,))))
with torch.no_grad():
    m(torch.randn(1, 3, 8, 8))
print(len(o._global_optimizer_post_hooks))
torch.optim.SGD(m.parameters(), lr=0.1).step()
print(k.optimizer_steps())
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0", "1", "1"]
