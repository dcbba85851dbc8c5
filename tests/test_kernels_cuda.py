"""The CUDA kernels of fused_ms_conv (SIMT, tensor-core WMMA, small-batch
split-K) against the float64 reference, on the current stream and in a CUDA
graph; the packed weights they read; and the dispatch table that picks a
kernel for a merged layer.  Tests that need a GPU skip without one; the
host-side checks (weight packing, the split-K launch plan, dispatch on the
CPU) run everywhere."""
from __future__ import annotations

import functools
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fer_edge import _C
from fer_edge.kernels import fused_ms_conv, fused_ms_conv_reference

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_kernels import CASES, FP32_TOL, _id, assert_same_layout, make_inputs  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible on this machine")
requires_cuda_kernel = pytest.mark.skipif(
    not hasattr(_C, "msconv_cuda"), reason="fer_edge._C was built without CUDA"
)

# fp16 inputs, fp32 accumulation, fp16 output: compared with the fp32 reference
# on the same (fp16-representable) inputs, the error left is the final
# rounding to fp16 (relative 2^-11 per element; the cutlass kernel's split-K
# adds up to 3 roundings of partial sums) -> relative norm well under 2e-3.
FP16_REL_NORM = 2e-3


def rel_norm(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------- CUDA
CUDA_CASES = [c for i, c in enumerate(CASES) if i % 3 == 0]


@requires_cuda
@requires_cuda_kernel
@pytest.mark.parametrize("kernel", ["simt", "splitk"])
@pytest.mark.parametrize("case", CUDA_CASES, ids=[_id(c) for c in CUDA_CASES])
def test_cuda_fp32_matches_reference(case, kernel):
    n, cin, h, w, c1, c3, c5, nhwc, relu = case
    args = make_inputs(n, cin, h, w, c1, c3, c5, nhwc=nhwc, device="cuda", seed=hash(case) % 2**31)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the CUDA kernel must run, not the fallback
        y = fused_ms_conv(*args, relu=relu, kernel=kernel)
    # Reference on the CPU in float64: cuDNN's TF32 must not loosen the check.
    ref = fused_ms_conv_reference(*[t.cpu().double() for t in args], relu=relu)
    torch.testing.assert_close(y.cpu().double(), ref, **FP32_TOL)
    assert_same_layout(y, ref)


FP16_CASES = CUDA_CASES + [(2, 64, 24, 24, 32, 48, 48, True, True), (1, 256, 6, 6, 128, 192, 192, True, True)]


@requires_cuda
@requires_cuda_kernel
@pytest.mark.parametrize("kernel", ["simt", "wmma", "splitk"])
@pytest.mark.parametrize("case", FP16_CASES, ids=[_id(c) for c in FP16_CASES])
def test_cuda_fp16_close_to_fp32_reference(case, kernel):
    """Every fp16 kernel that takes any layer: SIMT, tensor-core (WMMA), small-batch split-K
    (the mma kernel's own tests are below, with the CUTLASS kernels': it takes their inputs)."""
    n, cin, h, w, c1, c3, c5, nhwc, relu = case
    args = make_inputs(n, cin, h, w, c1, c3, c5, nhwc=nhwc, device="cuda", dtype=torch.float16, seed=7)
    y = fused_ms_conv(*args, relu=relu, kernel=kernel)
    assert y.dtype == torch.float16
    ref = fused_ms_conv_reference(*[t.cpu().double() for t in args], relu=relu)
    assert rel_norm(y.cpu(), ref) <= FP16_REL_NORM
    assert_same_layout(y, fused_ms_conv_reference(*args, relu=relu))


@requires_cuda
@requires_cuda_kernel
def test_cuda_runs_on_the_current_stream_and_in_a_graph():
    args = make_inputs(3, 64, 24, 24, 32, 48, 48, nhwc=True, device="cuda", dtype=torch.float16)
    ref = fused_ms_conv(*args)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        y = fused_ms_conv(*args)
    stream.synchronize()
    torch.testing.assert_close(y, ref, atol=0, rtol=0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        yg = fused_ms_conv(*args)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(yg, ref, atol=0, rtol=0)


@requires_cuda
@requires_cuda_kernel
def test_cuda_cpp_rejects_host_pointers():
    with pytest.raises(ValueError, match="not (a CUDA pointer|CUDA device memory)"):
        _raw_cuda_call(wp_is_host_pointer=True)


@requires_cuda_kernel
def test_cuda_cpp_requires_packed_weights():
    """Checked before any pointer is dereferenced or any device is touched: runs without a GPU."""
    with pytest.raises(ValueError, match="need the packed weights"):
        _raw_cuda_call(wp_is_host_pointer=False)


def _raw_cuda_call(wp_is_host_pointer: bool):
    """_C.msconv_cuda straight on host (CPU) tensors' pointers; wp a host pointer or null."""
    x, w1, b1, w3, b3, w5, b5 = make_inputs(1, 2, 4, 4, 1, 1, 1)
    out = torch.empty(1, 3, 4, 4)
    ptrs = [t.data_ptr() for t in (x, out, w1, b1, w3, b3, w5, b5)]
    _C.msconv_cuda(*ptrs, 1, 2, 4, 4, 1, 1, 1, 0, True, 0, 0, w1.data_ptr() if wp_is_host_pointer else 0, 0)


@pytest.mark.parametrize("c", [1, 3, 64])
def test_pack_ms_weights_is_the_combined_5x5_kernel(c):
    """Unpacked, wp is one 5x5 convolution with channels [c5 | c3 | c1]: it
    reproduces the reference layer's channels in that order (float64)."""
    from fer_edge.kernels import pack_ms_weights

    x, w1, b1, w3, b3, w5, b5 = (t.double() for t in make_inputs(2, c, 7, 6, 5, 3, 17, seed=c))
    wp = pack_ms_weights(w1, w3, w5)
    ctot = 5 + 3 + 17
    assert wp.shape == (25, c, ctot) and wp.is_contiguous()
    k = wp.reshape(5, 5, c, ctot).permute(3, 2, 0, 1)  # back to OIHW
    y = torch.nn.functional.conv2d(x, k, torch.cat([b5, b3, b1]), padding=2).relu()
    ref = fused_ms_conv_reference(x, w1, b1, w3, b3, w5, b5)
    torch.testing.assert_close(y, torch.cat([ref[:, 8:], ref[:, 5:8], ref[:, :5]], dim=1), rtol=1e-12, atol=1e-12)


def test_bad_packed_weights_raise_value_error():
    from fer_edge.kernels import pack_ms_weights

    args = make_inputs(1, 4, 5, 5, 2, 3, 4)
    wp = pack_ms_weights(args[1], args[3], args[5])
    with pytest.raises(ValueError, match=r"wp must have shape \(25, 4, 9\)"):
        fused_ms_conv(*args, wp=wp[:, :, :8])
    with pytest.raises(ValueError, match="wp is torch.float64"):
        fused_ms_conv(*args, wp=wp.double())
    with pytest.raises(ValueError, match="wp must be contiguous"):
        fused_ms_conv(*args, wp=wp.transpose(0, 1).contiguous().transpose(0, 1))
    torch.testing.assert_close(fused_ms_conv(*args, wp=wp), fused_ms_conv_reference(*args), **FP32_TOL)


def test_merged_modules_follow_the_dispatch_table():
    """On the CPU the fused kernel always runs; on CUDA the dispatch table
    decides (the shipped one says cuDNN for every shape not measured faster),
    and a module's ``cuda_kernel`` names the choice for every call."""
    from fer_edge.models.layers import FusedMultiScaleConv

    m = FusedMultiScaleConv(*make_inputs(1, 4, 6, 6, 2, 3, 4)[1:])
    assert m._kernel_for(torch.empty(1, 4, 6, 6)) == "cpu", "the CPU kernel needs no table"
    assert m._kernel_for(torch.empty(1, 4, 6, 6, dtype=torch.bfloat16)) is None
    assert m._kernel_for(torch.empty(1, 4, 6, 6, device="meta")) is None
    if torch.cuda.is_available():
        x = torch.randn(2, 4, 6, 6, device="cuda")
        m = m.to("cuda")
        from fer_edge.dispatch import override

        assert m._kernel_for(x) == (None if override() in (None, "cudnn") else override())
        m.cuda_kernel = "splitk"
        assert m._kernel_for(x) == "splitk"
        m.cuda_kernel = "cudnn"
        assert m._kernel_for(x) is None


def test_unknown_cuda_kernel_is_refused():
    from fer_edge.kernels import cuda_kernel_code

    names = ("simt", "wmma", "splitk", "mma", "cutlass", "stem", "cutlass90", "cutlass_window", "cutlass90_window")
    assert [cuda_kernel_code(k) for k in names] == list(range(9))
    with pytest.raises(ValueError, match="unknown CUDA kernel 'fast'"):
        cuda_kernel_code("fast")


@pytest.mark.parametrize("n,c,hw,ctot,sms", [(1, 1, 48, 64, 132), (1, 64, 24, 128, 132), (1, 256, 6, 512, 132),
                                             (1, 512, 3, 512, 132), (8, 256, 6, 512, 132), (1, 512, 3, 512, 16),
                                             (256, 64, 24, 128, 132), (1, 6, 5, 9, 132)])
def test_splitk_plan_covers_every_input_channel_once(n, c, hw, ctot, sms):
    """The small-batch kernel's launch plan (its own host code, built in every
    variant of the extension): the slices tile the input channels exactly, in
    multiples of the staging width (4 channels); enough blocks to fill the GPU
    when the channels allow; a workspace exactly as large as the partial sums."""
    p = _C.splitk_plan(n, c, hw, hw, ctot, sms)
    assert p["kc"] == 4
    assert p["kslice"] % p["kc"] == 0 and p["kslice"] >= p["kc"]
    assert (p["splits"] - 1) * p["kslice"] < c <= p["splits"] * p["kslice"]   # no empty slice, none missing
    m = n * hw * hw
    assert p["m_tiles"] == -(-m // p["tile_m"]) and p["n_tiles"] == -(-ctot // p["tile_n"])
    tiles, most = p["m_tiles"] * p["n_tiles"], -(-c // p["kc"])
    assert p["splits"] <= min(most, max(1, -(-2 * sms // tiles)))   # about two blocks per SM, no more
    if tiles < sms and most > 1:
        assert p["splits"] > 1, "a GPU-starving shape is split"
    if p["splits"] > 1:
        assert p["workspace_floats"] == p["splits"] * m * ctot and p["counters"] == p["m_tiles"] * p["n_tiles"]
    else:
        assert p["workspace_floats"] == 0 and p["counters"] == 0
    with pytest.raises(ValueError, match=">= 1"):
        _C.splitk_plan(0, c, hw, hw, ctot, sms)


@requires_cuda
@requires_cuda_kernel
@pytest.mark.parametrize("seed", range(9))
def test_every_dispatch_choice_matches_the_reference(seed):
    """Random layers and batches, each run by every choice the dispatch table
    can make (through the merged module, as a model runs it, and twice, so the
    split-K counters are shown to reset), against fused_ms_conv_reference in float64."""
    from fer_edge.dispatch import CHOICES
    from fer_edge.models.layers import FusedMultiScaleConv

    from fer_edge.kernels import kernel_unsupported

    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    n, cin, hw = r(1, 9), r(1, 70), r(3, 30)
    c1, c3, c5 = r(1, 40), r(1, 70), r(1, 70)
    if seed in (6, 7):  # channels_last, channels in multiples of 8: what the mma and cutlass kernels take
        n, cin, c1, c3, c5 = r(1, 16), 8 * r(1, 9), 8 * r(1, 5), 8 * r(1, 9), 8 * r(1, 9)
    elif seed == 8:  # a first layer: what the stem kernel takes
        cin = r(1, 4)
    for dtype in (torch.float32, torch.float16):
        x, *ws = make_inputs(n, cin, hw, hw, c1, c3, c5, nhwc=bool(seed % 2) or seed == 6, device="cuda", dtype=dtype,
                             seed=seed)
        ref = fused_ms_conv_reference(*[t.cpu().double() for t in (x, *ws)])
        m = FusedMultiScaleConv(*ws).eval()
        for choice in CHOICES:
            if choice == "wmma" and dtype != torch.float16:
                continue
            if choice != "cudnn" and kernel_unsupported(x, *ws, kernel=choice):
                continue
            m.cuda_kernel = choice
            with torch.no_grad():
                for _ in range(2):
                    y = m(x)
            tol = FP16_REL_NORM if dtype == torch.float16 else 1e-5
            assert rel_norm(y.cpu(), ref) <= tol, (choice, dtype, n, cin, hw, c1, c3, c5)


@requires_cuda
@requires_cuda_kernel
def test_cuda_module_keeps_packed_weights_until_they_change(monkeypatch):
    from fer_edge.models.layers import FusedMultiScaleConv

    x, w1, b1, w3, b3, w5, b5 = make_inputs(2, 16, 12, 12, 8, 12, 12, nhwc=True, device="cuda")
    m = FusedMultiScaleConv(w1, b1, w3, b3, w5, b5).eval()
    m.cuda_kernel = "simt"  # the dispatch table would choose cuDNN for an unmeasured shape

    def ref():
        return fused_ms_conv_reference(x.to(m.w1.dtype), m.w1, m.b1, m.w3, m.b3, m.w5, m.b5)

    with torch.no_grad():
        torch.testing.assert_close(m(x), ref(), **FP32_TOL)
        packed = m._wp
        m(x)
        assert m._wp is packed  # reused, not re-packed
        m.w5.mul_(-1.0)  # an in-place update (load_state_dict, most optimizers) must refresh it
        torch.testing.assert_close(m(x), ref(), **FP32_TOL)
        assert m._wp.data_ptr() == packed.data_ptr()  # refreshed in place: graphs keep a valid address
    opt = torch.optim.SGD(m.parameters(), lr=0.1, fused=True)  # fused: no version bump
    m(x).square().sum().backward()
    opt.step()
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref(), **FP32_TOL)
        m.half()
        y = m(x.half())
        assert y.dtype == torch.float16 and m._wp.dtype == torch.float16
        assert "_wp" not in m.state_dict()


@requires_cuda
@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 3), cin=st.integers(1, 70), h=st.integers(1, 20), w=st.integers(1, 20),
    c1=st.integers(1, 40), c3=st.integers(1, 70), c5=st.integers(1, 70), nhwc=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_cuda_fuzz_shapes(n, cin, h, w, c1, c3, c5, nhwc, seed):
    args = make_inputs(n, cin, h, w, c1, c3, c5, nhwc=nhwc, device="cuda", seed=seed)
    ref = fused_ms_conv_reference(*[t.cpu().double() for t in args])
    torch.testing.assert_close(fused_ms_conv(*args).cpu().double(), ref, **FP32_TOL)


@requires_cuda
def test_a_merged_layer_looks_the_table_up_once_per_shape(monkeypatch):
    from fer_edge import dispatch
    from fer_edge.models.layers import FusedMultiScaleConv

    calls = []
    real = dispatch.choice_for
    monkeypatch.setattr(dispatch, "choice_for", lambda *a: calls.append(a) or real(*a))
    m = FusedMultiScaleConv(*make_inputs(1, 4, 6, 6, 2, 3, 4)[1:]).to("cuda")
    with torch.no_grad():
        for n in (1, 1, 1, 2, 2, 1):
            m(torch.randn(n, 4, 6, 6, device="cuda"))
    assert [a[5] for a in calls] == [1, 2]   # the batch of each new shape, looked up once


# ------------------------------------------------- single branch (plain 3x3)
def test_empty_branches_are_cuda_only():
    """A plain 3x3 convolution is the fused layer with c1 = c5 = 0: the CUDA
    kernels take it; the CPU kernel needs all three branches and says so."""
    x, w1, b1, w3, b3, w5, b5 = make_inputs(1, 8, 6, 6, 0, 4, 0)
    assert w1.shape == (0, 8, 1, 1) and w5.shape == (0, 8, 5, 5)
    with pytest.raises(ValueError, match="only the CUDA kernels take an empty 1x1 or 5x5 branch"):
        fused_ms_conv(x, w1, b1, w3, b3, w5, b5)
    ref = fused_ms_conv_reference(x, w1, b1, w3, b3, w5, b5)
    torch.testing.assert_close(ref, torch.relu(torch.nn.functional.conv2d(x, w3, b3, padding=1)))


def test_a_kernel_picked_by_shape_must_take_the_very_input():
    """The table keys shapes and the override names one kernel for every layer:
    a merged layer runs such a choice only where it can (the stem kernel on at
    most 4 input channels, the mma and CUTLASS kernels on what kernel_unsupported
    allows, e.g. nothing in a build without CUTLASS); everything else goes to cuDNN."""
    from fer_edge.kernels import IGEMM_KERNELS, kernel_unsupported
    from fer_edge.models.layers import FusedMultiScaleConv

    gray, *ws1 = make_inputs(1, 1, 6, 6, 8, 8, 8)
    wide, *ws8 = make_inputs(1, 8, 6, 6, 8, 8, 8, nhwc=True, dtype=torch.float16)
    assert FusedMultiScaleConv._takes("stem", gray, ws1)
    assert not FusedMultiScaleConv._takes("stem", wide, ws8)
    for kernel in IGEMM_KERNELS:
        assert FusedMultiScaleConv._takes(kernel, wide, ws8) == (not kernel_unsupported(wide, *ws8, kernel=kernel))
    assert not FusedMultiScaleConv._takes("mma", wide.bfloat16(), [w.bfloat16() for w in ws8])   # fp16, fp32 only
    assert FusedMultiScaleConv._takes("mma", wide.float(), [w.float() for w in ws8])
    assert FusedMultiScaleConv._takes("splitk", wide, ws8)


def test_a_single_branch_layer_runs_plain_when_no_kernel_takes_it():
    """A plain 3x3 convolution as a fused layer (c1 = c5 = 0) whose kernel is off,
    or falls back (a table choice the input cannot run), is the convolution +
    ReLU itself: the empty branches are left out, not handed to PyTorch."""
    from fer_edge.models.layers import FusedMultiScaleConv

    x, w1, b1, w3, b3, w5, b5 = make_inputs(2, 8, 6, 6, 0, 4, 0)
    m = FusedMultiScaleConv(w1, b1, w3, b3, w5, b5, use_kernel=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), torch.relu(torch.nn.functional.conv2d(x, w3, b3, padding=1)))


def test_merged_plain_convs_run_the_convolution_off_cuda():
    """ConvAct (a merged 3x3 conv + ReLU) only consults the kernels on CUDA; on
    the CPU, and for any other convolution, it is the convolution itself, and
    its cache over its own parameters is never saved or copied."""
    import copy

    from fer_edge import models
    from fer_edge.models.layers import ConvAct
    from fer_edge.reparam import merge

    model = models.create("macnn", width=0.25).eval()
    merged = merge(model)
    plain = [m for m in merged.modules() if isinstance(m, ConvAct)]
    assert len(plain) == 8 and all(m._single_branch() and m.use_kernel for m in plain)
    x = torch.randn(2, 1, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), model(x), atol=1e-4, rtol=1e-4)
    fused = plain[0]._fused_layer()
    assert fused.channels == (0, plain[0].conv.out_channels, 0)
    assert not any("_fused" in k for k in merged.state_dict())
    assert copy.deepcopy(plain[0])._fused is None
    assert all(not m.use_kernel for m in merge(model, use_kernel=False).modules() if isinstance(m, ConvAct))


@requires_cuda
@requires_cuda_kernel
@pytest.mark.parametrize("kernel", ["simt", "wmma", "splitk", "mma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,cin,hw,cout", [(1, 64, 48, 64), (1, 512, 3, 512), (3, 40, 7, 24)])
def test_cuda_single_branch_matches_the_convolution(kernel, dtype, n, cin, hw, cout):
    """Every CUDA kernel on a plain 3x3 convolution + ReLU (c1 = c5 = 0)."""
    from fer_edge.kernels import kernel_unsupported

    if kernel == "wmma" and dtype != torch.float16:
        pytest.skip("wmma is float16")
    args = make_inputs(n, cin, hw, hw, 0, cout, 0, nhwc=True, device="cuda", dtype=dtype, seed=cin)
    if why := kernel_unsupported(*args, kernel=kernel):
        pytest.skip(f"{kernel}: {why}")
    y = fused_ms_conv(*args, kernel=kernel)
    ref = fused_ms_conv_reference(*[t.cpu().double() for t in args])
    assert y.shape == (n, cout, hw, hw)
    assert rel_norm(y.cpu(), ref) <= (FP16_REL_NORM if dtype == torch.float16 else 1e-5)


@requires_cuda
@requires_cuda_kernel
@pytest.mark.parametrize("kernel", ["splitk", "mma"])
def test_cuda_merged_model_with_plain_convs_on_the_kernel(kernel):
    """The merged MACNN with every plain 3x3 convolution forced onto a kernel of
    ours gives the logits of the plain merged model (fp16, batch 1, channels_last)."""
    from fer_edge import models
    from fer_edge.models.layers import ConvAct
    from fer_edge.reparam import merge

    if kernel == "mma" and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("the mma kernel needs compute capability 8.0+")
    torch.manual_seed(0)
    model = models.create("macnn", width=0.5).eval()
    merged = merge(model).cuda().half().to(memory_format=torch.channels_last)
    plain = merge(model, use_kernel=False).cuda().half().to(memory_format=torch.channels_last)
    for m in merged.modules():
        if isinstance(m, ConvAct):
            m.cuda_kernel = kernel
    x = torch.randn(1, 1, 48, 48, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        a, b = merged(x).float(), plain(x).float()
    assert rel_norm(a.cpu(), b.cpu()) <= 1e-2


@requires_cuda
@requires_cuda_kernel
def test_cuda_refuses_buffers_made_for_another_input():
    """The split-K kernels write their workspace and counters unchecked: buffers
    kept by a caller must be splitk_buffers' for this very input."""
    from fer_edge.kernels import splitk_buffers

    args = make_inputs(1, 256, 6, 6, 128, 192, 192, nhwc=True, device="cuda", dtype=torch.float16)
    small = make_inputs(1, 256, 3, 3, 128, 192, 192, nhwc=True, device="cuda", dtype=torch.float16)[0]
    ws, counters = splitk_buffers(small, 512)
    with pytest.raises(ValueError, match="splitk_buffers"):
        fused_ms_conv(*args, kernel="splitk", buffers=(ws, counters))
    ws, counters = splitk_buffers(args[0], 512)
    with pytest.raises(ValueError, match="splitk_buffers"):
        fused_ms_conv(*args, kernel="splitk", buffers=(ws.half(), counters))
    if torch.cuda.get_device_capability() >= (8, 0):
        with pytest.raises(ValueError, match=r"mma_buffers\(x, c1, c3, c5\)"):
            fused_ms_conv(*args, kernel="mma", buffers=(ws[:1], counters))
    y = fused_ms_conv(*args, kernel="splitk", buffers=(ws, counters))
    assert rel_norm(y.cpu(), fused_ms_conv_reference(*[t.cpu().double() for t in args])) <= FP16_REL_NORM


# ------------------------------------------------- large batches: the cutlass kernel
requires_cutlass = pytest.mark.skipif(not _C.build_info().get("cutlass"),
                                      reason="fer_edge._C was built without CUTLASS's headers (no cutlass kernel)")

# The merged MACNN layers L2-L5 at full width (L1 has one input channel: not this kernel's),
# a narrow layer with an odd spatial size, and the single-branch case.
CUTLASS_CASES = [(n, cin, hw, c1, c3, c5) for n in (1, 3, 64) for cin, hw, c1, c3, c5 in
                 ((64, 24, 32, 48, 48), (128, 12, 64, 96, 96), (256, 6, 128, 192, 192), (512, 3, 128, 192, 192))]
CUTLASS_CASES += [(5, 8, 7, 8, 16, 8), (2, 64, 11, 0, 64, 0), (256, 64, 24, 32, 48, 48)]


def _needs_sm80(kernel="cutlass"):
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip(f"the {kernel} kernel needs compute capability 8.0+")
    if kernel.startswith("cutlass90") and (torch.cuda.get_device_capability() != (9, 0)
                                           or not _C.build_info().get("cutlass_sm90")):
        pytest.skip(f"the {kernel} kernel needs compute capability 9.0 and a build for sm_90")


def _needs_mma():
    if not hasattr(_C, "msconv_cuda"):
        pytest.skip("fer_edge._C was built without CUDA")
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("the mma kernel needs compute capability 8.0+")


ALL_CUTLASS = ["cutlass", "cutlass90", "cutlass_window", "cutlass90_window"]


def _cutlass_inputs(case):
    n, cin, hw, c1, c3, c5 = case
    return make_inputs(n, cin, hw, hw, c1, c3, c5, nhwc=True, device="cuda", dtype=torch.float16, seed=n + cin)


@functools.lru_cache(maxsize=None)
def _cutlass_reference(case, relu):
    """The float64 reference of one case, computed once for all four CUTLASS kernels."""
    return fused_ms_conv_reference(*[t.cpu().double() for t in _cutlass_inputs(case)], relu=relu)


@requires_cuda
@requires_cutlass
@pytest.mark.parametrize("kernel", ALL_CUTLASS)
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("case", CUTLASS_CASES, ids=[f"n{c[0]}-c{c[1]}-{c[2]}px-{c[3]}.{c[4]}.{c[5]}"
                                                     for c in CUTLASS_CASES])
def test_cutlass_matches_the_reference(case, relu, kernel):
    """One implicit GEMM per branch, each writing its slice of the output, or one
    over the zero-padded window (on mma.sync, or Hopper's wgmma and TMA); fp16
    against the float64 reference, bias and ReLU (or none) in the epilogue."""
    _needs_sm80(kernel)
    args = _cutlass_inputs(case)
    y = fused_ms_conv(*args, relu=relu, kernel=kernel)
    ref = _cutlass_reference(case, relu)
    assert y.shape == ref.shape and y.is_contiguous(memory_format=torch.channels_last)
    assert rel_norm(y.cpu(), ref) <= FP16_REL_NORM
    # Every output channel was written: no slice left as uninitialised memory.
    assert torch.isfinite(y).all()


def test_cutlass90_tile_is_128_channels_unless_it_pads_more_or_starves_the_gpu():
    """The Hopper kernels' channel tile (host code, every build): 128 channels where it
    pads no more than 64 does and its grid still covers the SMs, else 64; 128 pixels and
    64 of K per step either way; an override of 64 or 128 replaces the choice."""
    tile = lambda m, cout, sms=132, t=0: _C.igemm90_tile(m, cout, sms, t)["n"]  # noqa: E731
    big = 256 * 12 * 12   # L3's pixels at batch 256: a grid far larger than the GPU
    assert [tile(big, c) for c in (32, 48, 64, 96, 128, 192, 256, 512)] == [64, 64, 64, 128, 128, 64, 128, 128]
    # Batch 1 of L3 as one window launch (144 pixels, 256 channels): 2 blocks of 128 channels
    # would leave 130 SMs idle where 64 gives 4; and a 16-SM GPU takes the same.
    assert tile(144, 256) == 64 and tile(144, 256, 16) == 64 and tile(144 * 64, 256, 16) == 128
    assert _C.igemm90_tile(big, 512, 132)["m"] == 128 and _C.igemm90_tile(big, 512, 132)["k"] == 64
    assert tile(big, 32, t=128) == 128 and tile(big, 512, t=64) == 64
    for bad in ((big, 0, 132, 0), (big, 64, 132, 96), (0, 64, 132, 0)):
        with pytest.raises(ValueError):
            _C.igemm90_tile(*bad)


@requires_cuda
@requires_cutlass
@pytest.mark.parametrize("tile_n", [64, 128])
@pytest.mark.parametrize("kernel", ["cutlass90", "cutlass90_window"])
def test_cutlass90_each_tile_matches_the_reference(kernel, tile_n):
    """Both Hopper channel tiles on every launch of a layer (L3 at batch 3: 64-, 96- and
    256-channel launches, odd tile counts), whatever the rule would pick."""
    _needs_sm80(kernel)
    from fer_edge.dispatch import KERNELS
    from fer_edge.kernels import make_pack, pack_kind

    case = (3, 128, 12, 64, 96, 96)
    x, w1, b1, w3, b3, w5, b5 = _cutlass_inputs(case)
    n, c, h, w = x.shape
    wp = make_pack(pack_kind(kernel), w1, b1, w3, b3, w5, b5)
    out = torch.empty(n, 256, h, w, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)

    def launch(tile):
        _C.msconv_cuda(x.data_ptr(), out.data_ptr(), w1.data_ptr(), b1.data_ptr(), w3.data_ptr(), b3.data_ptr(),
                       w5.data_ptr(), b5.data_ptr(), n, c, h, w, 64, 96, 96, 1, True, 1,
                       torch.cuda.current_stream().cuda_stream, wp.data_ptr(), KERNELS[kernel], cutlass90_tile_n=tile)

    launch(tile_n)
    assert rel_norm(out.cpu(), _cutlass_reference(case, True)) <= FP16_REL_NORM
    with pytest.raises(ValueError, match="tile_n must be 0, 64 or 128"):
        launch(96)


@requires_cuda
@requires_cutlass
@pytest.mark.parametrize("kernel", ["cutlass", "cutlass_window"])
def test_cutlass_split_k_keeps_partial_sums_and_its_semaphores(kernel):
    """Batch 1 of MACNN's L4 splits each launch's 256 input channels into slices
    whose partial sums meet in the output: ReLU only on the total (negative
    partial sums must survive), and the semaphores, cleared by every call,
    serve a graph replayed many times."""
    _needs_sm80()
    from fer_edge.kernels import kernel_buffers, make_pack, pack_kind

    args = make_inputs(1, 256, 6, 6, 128, 192, 192, nhwc=True, device="cuda", dtype=torch.float16, seed=3)
    assert _C.igemm_splits(36, 192 if kernel == "cutlass" else 512, 256, _C.sm_count(0)) > 1
    ref = fused_ms_conv_reference(*[t.cpu().double() for t in args])
    wp = make_pack(pack_kind(kernel), *args[1:])
    bufs = kernel_buffers(kernel, args[0], 128, 192, 192)
    assert bufs[1].numel() >= 1
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fused_ms_conv(*args, kernel=kernel, wp=wp, buffers=bufs)
    for _ in range(5):
        graph.replay()
        torch.cuda.synchronize()
        assert rel_norm(y.cpu(), ref) <= FP16_REL_NORM
    assert int(bufs[1].abs().sum()) == 0, "the last slice leaves every semaphore at zero"
    with pytest.raises(ValueError, match="cutlass_buffers"):
        fused_ms_conv(*args, kernel=kernel, wp=wp, buffers=(bufs[0], bufs[1][:0]))


@requires_cuda
@requires_cutlass
@pytest.mark.parametrize("kernel", ALL_CUTLASS)
def test_cutlass_in_a_cuda_graph_and_on_the_current_stream(kernel):
    _needs_sm80(kernel)
    from fer_edge.kernels import make_pack, pack_kind

    args = make_inputs(32, 64, 24, 24, 32, 48, 48, nhwc=True, device="cuda", dtype=torch.float16)
    wp = make_pack(pack_kind(kernel), *args[1:])
    ref = fused_ms_conv(*args, kernel=kernel, wp=wp)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y = fused_ms_conv(*args, kernel=kernel, wp=wp)
    stream.synchronize()
    torch.testing.assert_close(y, ref, atol=0, rtol=0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        yg = fused_ms_conv(*args, kernel=kernel, wp=wp)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(yg, ref, atol=0, rtol=0)


@requires_cuda
@pytest.mark.parametrize("kernel", ["cutlass", "mma"])
def test_igemm_kernels_refuse_what_they_cannot_run_and_a_module_falls_back(kernel):
    """Named, the cutlass and mma kernels say why they cannot run a layer (one
    ValueError, never a launch); chosen by the dispatch table, a layer they
    cannot run (here a misaligned view) runs cuDNN instead."""
    if kernel == "cutlass" and not _C.build_info().get("cutlass"):
        pytest.skip("fer_edge._C was built without CUTLASS's headers (no cutlass kernel)")
    _needs_mma()
    from fer_edge.models.layers import FusedMultiScaleConv

    args = make_inputs(2, 64, 12, 12, 32, 48, 48, nhwc=True, device="cuda", dtype=torch.float16)
    if kernel == "cutlass":   # (mma computes float32 too)
        with pytest.raises(ValueError, match="the cutlass kernel cannot run this layer: it computes float16 only"):
            fused_ms_conv(*[t.float() for t in args], kernel=kernel)
    with pytest.raises(ValueError, match="channels_last"):
        fused_ms_conv(args[0].contiguous(), *args[1:], kernel=kernel)
    odd = make_inputs(2, 12, 12, 12, 8, 8, 8, nhwc=True, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="multiples of 8"):
        fused_ms_conv(*odd, kernel=kernel)
    big = torch.randn(2 * 64 * 12 * 12 + 4, device="cuda", dtype=torch.float16)
    shifted = big[4:].view(2, 12, 12, 64).permute(0, 3, 1, 2)   # channels_last, 8 bytes off
    assert shifted.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="16-byte aligned"):
        fused_ms_conv(shifted, *args[1:], kernel=kernel)
    m = FusedMultiScaleConv(*args[1:]).eval()
    m._choices[(shifted.device, tuple(shifted.shape), shifted.dtype)] = kernel   # as a table row would say
    with torch.no_grad():
        y = m(shifted)
    ref = fused_ms_conv_reference(*[t.cpu().double() for t in (shifted, *args[1:])])
    assert rel_norm(y.cpu(), ref) <= FP16_REL_NORM


@requires_cuda
@requires_cutlass
def test_cuda_module_keeps_one_pack_per_weight_layout():
    """A merged layer that runs the small-batch kernel at batch 1 and cutlass at
    batch 64 keeps both packs, each refreshed in place when the weights change."""
    _needs_sm80()
    from fer_edge.models.layers import FusedMultiScaleConv

    x, *ws = make_inputs(64, 64, 12, 12, 32, 48, 48, nhwc=True, device="cuda", dtype=torch.float16)
    m = FusedMultiScaleConv(*ws).eval()
    with torch.no_grad():
        m.cuda_kernel = "cutlass"
        a = m(x)
        m.cuda_kernel = "splitk"
        b = m(x[:1])
        krsc, tap = m._wp_krsc, m._wp
        assert krsc.shape == (64 * (32 + 9 * 48 + 25 * 48),) and tap.shape == (25, 64, 128)
        m.w3.mul_(-1.0)
        m.cuda_kernel = "cutlass"
        c = m(x)
        assert m._wp_krsc.data_ptr() == krsc.data_ptr()
        ref = fused_ms_conv_reference(*[u.cpu().double() for u in (x, m.w1, m.b1, m.w3, m.b3, m.w5, m.b5)])
        m.cuda_kernel = "cutlass_window"
        d = m(x)
        window = m._wp_window
        m.b5.add_(1.0)   # a bias: only the window pack holds one, and it must follow
        e = m(x)
        assert m._wp_window.data_ptr() == window.data_ptr()
    assert rel_norm(c.cpu(), ref) <= FP16_REL_NORM and rel_norm(d.cpu(), ref) <= FP16_REL_NORM
    assert rel_norm(a[:1].cpu(), b.cpu().double()) <= FP16_REL_NORM
    moved = fused_ms_conv_reference(*[u.cpu().double() for u in (x, m.w1, m.b1, m.w3, m.b3, m.w5, m.b5)])
    assert rel_norm(e.cpu(), moved) <= FP16_REL_NORM
    assert not {"_wp_krsc", "_wp_window"} & set(m.state_dict())


# Host side of the cutlass kernel: runs in every build.
@pytest.mark.parametrize("m,cout,sms", [(256 * 576, 48, 132), (256 * 576, 192, 132), (256 * 9, 192, 132),
                                        (576, 48, 132), (64 * 144, 96, 16), (1, 8, 1), (10**7, 512, 132)])
def test_igemm_tile_keeps_the_gpu_busy_without_wasted_columns(m, cout, sms):
    """The tile the cutlass kernel picks per branch is one of its compiled tiles,
    and no other of them would do more useful multiply-adds per wave, counting
    the wasted columns, the idle SMs of a partial last wave, and a smaller
    tile's slower rate (square root of its arithmetic intensity)."""
    tiles = [(128, 128, 32), (128, 64, 32), (64, 64, 32)]

    def score(t):
        mt, nt = -(-m // t[0]), -(-cout // t[1])
        waves = -(-(mt * nt) // sms)
        rate = ((t[0] * t[1] / (t[0] + t[1])) / 64) ** 0.5
        return (m * cout) / (mt * t[0] * nt * t[1]) * (mt * nt) / (waves * sms) * rate

    got = tuple(_C.igemm_tile(m, cout, sms))
    assert got in tiles
    assert score(got) >= max(score(t) for t in tiles) / 1.0001
    if cout <= 64:
        assert got[1] == 64, "a branch of 64 channels or fewer never runs a 128-wide tile"
    if m >= 10**6 and cout % 128 == 0:
        assert got == (128, 128, 32), "many waves of a 128-multiple branch: the largest tile"
    with pytest.raises(ValueError, match=">= 1"):
        _C.igemm_tile(0, cout, sms)


@pytest.mark.parametrize("n,c,hw,c1,c3,c5", [(1, 64, 24, 32, 48, 48), (1, 256, 6, 128, 192, 192),
                                            (1, 512, 3, 128, 192, 192), (8, 128, 12, 64, 96, 96),
                                            (256, 64, 24, 32, 48, 48), (1, 8, 7, 8, 16, 8)])
def test_igemm_splits_small_grids_in_whole_steps(n, c, hw, c1, c3, c5):
    """Small batches split a branch's input channels (serial split-K) only where
    its grid would leave most SMs idle, into at most 4 slices of whole 32-channel
    steps; the semaphores cover the largest split branch's tiles."""
    sms, m = 132, n * hw * hw
    sems = 0
    for cout in (c1, c3, c5):
        tm, tn, tk = _C.igemm_tile(m, cout, sms)
        blocks = -(-m // tm) * -(-cout // tn)
        s = _C.igemm_splits(m, cout, c, sms)
        assert 1 <= s <= min(4, -(-c // tk))
        if 2 * blocks >= sms:
            assert s == 1
        elif c >= 2 * tk:
            assert s > 1, "a GPU-starving branch with channels to split is split"
        if s > 1:
            sems = max(sems, blocks)
    assert _C.igemm_semaphores(n, c, hw, hw, c1, c3, c5, sms) == sems
    if n == 256:
        assert sems == 0, "a large batch fills the GPU without splitting"


def test_igemm_input_rules():
    """What the cutlass kernel takes, in the extension's own words: float16,
    channels_last, channels in multiples of 8, 16-byte aligned pointers
    (an empty branch's null bias included)."""
    ok = [256, 512, 1024, 2048, 0, 4096]
    assert _C.igemm_unsupported(64, 32, 48, 48, 1, 1, ok) == ""
    assert _C.igemm_unsupported(64, 0, 64, 0, 1, 1, ok) == ""
    assert "float16" in _C.igemm_unsupported(64, 32, 48, 48, 1, 0, ok)
    assert "channels_last" in _C.igemm_unsupported(64, 32, 48, 48, 0, 1, ok)
    for bad in ((12, 32, 48, 48), (64, 4, 48, 48), (64, 32, 44, 48), (64, 32, 48, 52)):
        assert "multiples of 8" in _C.igemm_unsupported(*bad, 1, 1, ok)
    for i in range(6):
        ptrs = list(ok)
        ptrs[i] += 8
        assert "16-byte aligned" in _C.igemm_unsupported(64, 32, 48, 48, 1, 1, ptrs)
    assert _C.igemm_unsupported(64, 0, 64, 0, 1, 1, [256, 512, 1024, 8, 2048, 8]) == ""   # empty branches' biases


@pytest.mark.parametrize("c", [1, 8, 64])
def test_pack_krsc_weights_is_each_branch_channels_last(c):
    from fer_edge.kernels import check_packed_weights, pack_krsc_weights

    x, w1, _, w3, _, w5, _ = make_inputs(1, c, 5, 5, 8, 16, 24)
    wp = pack_krsc_weights(w1, w3, w5)
    sizes = [w.numel() for w in (w1, w3, w5)]
    assert wp.shape == (sum(sizes),) == (c * (8 + 9 * 16 + 25 * 24),)
    for part, w in zip(wp.split(sizes), (w1, w3, w5)):
        # KRSC: output channel, row, column, then input channel fastest
        torch.testing.assert_close(part.view(w.shape[0], w.shape[2], w.shape[3], c), w.permute(0, 2, 3, 1),
                                   atol=0, rtol=0)
    check_packed_weights(wp, x, 8, 16, 24, "krsc")
    with pytest.raises(ValueError, match="pack_krsc_weights"):
        check_packed_weights(wp[1:], x, 8, 16, 24, "krsc")


@pytest.mark.parametrize("c,c1,c3,c5", [(1, 8, 16, 24), (8, 8, 16, 24), (64, 0, 64, 0), (16, 8, 0, 8)])
def test_pack_window_weights_is_the_layer_as_one_5x5_convolution(c, c1, c3, c5):
    """The window kernels' pack, read as they read it: one (ctot, 5, 5, C) KRSC
    kernel, then the ctot biases.  As a plain 5x5 convolution (padding 2) it is
    the layer itself, in float64; the pack keeps the weights' dtype."""
    from fer_edge.kernels import check_packed_weights, make_pack, pack_window_weights

    x, *ws = make_inputs(2, c, 7, 6, c1, c3, c5, dtype=torch.float64, seed=c)
    ctot = c1 + c3 + c5
    wp = pack_window_weights(*ws)
    assert wp.shape == (ctot * (25 * c + 1),) and wp.dtype == torch.float64
    kernel = wp[:ctot * 25 * c].view(ctot, 5, 5, c).permute(0, 3, 1, 2)   # KRSC back to OIHW
    bias = wp[ctot * 25 * c:]
    y = torch.nn.functional.conv2d(x, kernel, bias, padding=2)
    torch.testing.assert_close(torch.relu(y), fused_ms_conv_reference(x, *ws), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(make_pack("window", *ws), wp, rtol=0, atol=0)
    check_packed_weights(wp, x, c1, c3, c5, "window")
    with pytest.raises(ValueError, match="pack_window_weights"):
        check_packed_weights(wp[:-1], x, c1, c3, c5, "window")
    half = pack_window_weights(*(t.half() for t in ws))
    assert half.dtype == torch.float16 and half.shape == wp.shape


def test_igemm_window_form_is_one_launch_with_the_biases_in_its_pack():
    """The window form runs the layer as one launch: its split-K semaphores are
    those of one launch over every channel, and it never reads b1/b3/b5 (its
    biases are in the pack), so their alignment does not matter to it."""
    sms = 132
    for n, c, hw, c1, c3, c5 in ((1, 256, 6, 128, 192, 192), (1, 64, 24, 32, 48, 48), (256, 64, 24, 32, 48, 48)):
        m, ctot = n * hw * hw, c1 + c3 + c5
        tm, tn, _ = _C.igemm_tile(m, ctot, sms)
        blocks = -(-m // tm) * -(-ctot // tn)
        split = _C.igemm_splits(m, ctot, c, sms) > 1
        assert _C.igemm_semaphores(n, c, hw, hw, c1, c3, c5, sms, window=True) == (blocks if split else 0)
    ok = [256, 512, 1024, 2048, 0, 4096]
    odd_biases = [256, 512, 1024, 8, 24, 40]
    assert _C.igemm_unsupported(64, 32, 48, 48, 1, 1, odd_biases, window=True) == ""
    assert "16-byte aligned" in _C.igemm_unsupported(64, 32, 48, 48, 1, 1, odd_biases)
    for i in range(3):   # x, out and the pack still must be aligned
        ptrs = list(ok)
        ptrs[i] += 8
        assert "16-byte aligned" in _C.igemm_unsupported(64, 32, 48, 48, 1, 1, ptrs, window=True)
    assert "multiples of 8" in _C.igemm_unsupported(64, 4, 48, 48, 1, 1, ok, window=True)


def test_kernel_unsupported_names_what_each_kernel_takes():
    from fer_edge.kernels import CUTLASS_KERNELS, IGEMM_KERNELS, KERNEL_PACKS, kernel_unsupported, pack_kind

    args = make_inputs(1, 8, 4, 4, 8, 8, 8, nhwc=True)
    with pytest.raises(ValueError, match="unknown CUDA kernel 'fast'"):
        kernel_unsupported(*args, kernel="fast")
    assert kernel_unsupported(*args, kernel="splitk") == kernel_unsupported(*args, kernel="simt") == ""
    assert "at most 4 input channels" in kernel_unsupported(*args, kernel="stem")
    assert kernel_unsupported(*make_inputs(1, 4, 4, 4, 8, 8, 8), kernel="stem") == ""
    assert {k: pack_kind(k) for k in IGEMM_KERNELS} == KERNEL_PACKS == {
        "mma": "krsc", "cutlass": "krsc", "cutlass90": "krsc", "cutlass_window": "window", "cutlass90_window": "window"}
    assert set(IGEMM_KERNELS) == {"mma", *CUTLASS_KERNELS}
    assert pack_kind("splitk") == pack_kind(None) == "tap"


def test_kernel_unsupported_says_when_the_build_has_no_cutlass():
    from fer_edge.kernels import kernel_unsupported

    args = make_inputs(1, 8, 4, 4, 8, 8, 8, nhwc=True)
    why = kernel_unsupported(*args, kernel="cutlass")
    if _C.build_info().get("cutlass"):
        assert "float16 only" in why   # a CPU float32 tensor: its next reason
    else:
        assert "no cutlass kernel" in why
    assert kernel_unsupported(*args, kernel="mma") == ""   # our own code, float32 too: in every build


# ------------------------------------------------- small batches on tensor cores: the mma kernel
# MACNN's merged layers L2-L5 at batch 1 (the kernel's purpose) and 2, 8 (its range), two that
# split nothing (every K in one chunk: the output written from registers), a narrow layer with
# an odd spatial size, layers with an empty branch, and the single-branch case.
MMA_CASES = [(n, cin, hw, c1, c3, c5) for n in (1, 2) for cin, hw, c1, c3, c5 in
             ((64, 24, 32, 48, 48), (128, 12, 64, 96, 96), (256, 6, 128, 192, 192), (512, 3, 128, 192, 192))]
MMA_CASES += [(8, 256, 6, 128, 192, 192), (64, 64, 24, 32, 48, 48), (1, 8, 5, 8, 8, 8), (3, 8, 7, 8, 16, 8),
              (1, 40, 9, 0, 24, 16), (2, 16, 6, 8, 16, 0), (1, 512, 3, 0, 512, 0), (1, 64, 48, 0, 64, 0)]


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("case", MMA_CASES, ids=[f"n{c[0]}-c{c[1]}-{c[2]}px-{c[3]}.{c[4]}.{c[5]}" for c in MMA_CASES])
def test_mma_matches_the_reference(case, relu, dtype):
    """fp16, and fp32 as 3xTF32 (float32's precision, the fp32 tolerance), against
    the float64 reference, twice with the same buffers: the chunks' sums meet in
    the workspace, the ReLU applies to the total only (negative partial sums
    survive), and the workspace and counters are left at zero for the next call."""
    _needs_mma()
    from fer_edge.kernels import mma_buffers

    n, cin, hw, c1, c3, c5 = case
    args = make_inputs(n, cin, hw, hw, c1, c3, c5, nhwc=True, device="cuda", dtype=dtype, seed=n + cin)
    ref = fused_ms_conv_reference(*[t.cpu().double() for t in args], relu=relu)
    bufs = mma_buffers(args[0], c1, c3, c5)
    for _ in range(2):
        y = fused_ms_conv(*args, relu=relu, kernel="mma", buffers=bufs)
        assert y.shape == ref.shape and y.is_contiguous(memory_format=torch.channels_last)
        assert torch.isfinite(y).all(), "every output channel written"
        assert rel_norm(y.cpu(), ref) <= (FP16_REL_NORM if dtype == torch.float16 else 1e-5)
    assert not bufs[0].any() and not bufs[1].any(), "the last chunk of each tile clears its sums and counter"


@requires_cuda
def test_mma_in_a_cuda_graph_and_on_the_current_stream():
    """Batch 1 of L4 (its 5x5 and 3x3 tiles split into chunks), on another
    stream and replayed in a graph: the same answer each time, to fp16's
    rounding (the order in which chunks arrive may change the float32 sums'
    last bits)."""
    _needs_mma()
    from fer_edge.kernels import kernel_buffers, make_pack

    args = make_inputs(1, 256, 6, 6, 128, 192, 192, nhwc=True, device="cuda", dtype=torch.float16, seed=3)
    plan = _C.mma_plan(1, 256, 6, 6, 128, 192, 192, _C.sm_count(0))
    assert plan["counters"] > 0 and all(b["chunks"] > 1 for b in plan["branches"][:2])
    ref = fused_ms_conv_reference(*[t.cpu().double() for t in args])
    wp = make_pack("krsc", *args[1:])
    bufs = kernel_buffers("mma", args[0], 128, 192, 192)
    first = fused_ms_conv(*args, kernel="mma", wp=wp, buffers=bufs)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        other = fused_ms_conv(*args, kernel="mma", wp=wp, buffers=bufs)
    stream.synchronize()
    assert rel_norm(other.cpu(), first.cpu().double()) <= 1e-3
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fused_ms_conv(*args, kernel="mma", wp=wp, buffers=bufs)
    for _ in range(5):
        graph.replay()
        torch.cuda.synchronize()
        assert rel_norm(y.cpu(), ref) <= FP16_REL_NORM
    assert not bufs[0].any() and not bufs[1].any()


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_mma_chain_in_a_graph_reads_each_layer_after_it_is_written(dtype):
    """Six mma layers in a row, each reading the one before it, with one pair of
    buffers shared by every call, eagerly and replayed in a CUDA graph: the
    reference chain each time.  On 9.0+ each launch is a programmatic dependent
    of the one before, which lets it launch as it starts: without waiting for
    it, a layer would read its input (and the shared buffers) while they are
    being written."""
    _needs_mma()
    from fer_edge.kernels import kernel_buffers, make_pack

    layers = [make_inputs(1, 64, 9, 9, 16, 24, 24, nhwc=True, device="cuda", dtype=dtype, seed=s)[1:]
              for s in range(6)]
    x0 = make_inputs(1, 64, 9, 9, 16, 24, 24, nhwc=True, device="cuda", dtype=dtype, seed=9)[0]
    packs = [make_pack("krsc", *w) for w in layers]
    bufs = kernel_buffers("mma", x0, 16, 24, 24)
    assert _C.mma_plan(1, 64, 9, 9, 16, 24, 24, _C.sm_count(0))["counters"] > 0, "chunks meet in the workspace"

    def chain(x):
        for w, wp in zip(layers, packs):
            x = fused_ms_conv(x, *w, kernel="mma", wp=wp, buffers=bufs, relu=False)
        return x

    ref = x0.cpu().double()
    for w in layers:
        ref = fused_ms_conv_reference(ref, *[t.cpu().double() for t in w], relu=False)
    tol = 1e-2 if dtype == torch.float16 else 1e-5
    assert rel_norm(chain(x0).cpu(), ref) <= tol
    static = x0.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = chain(static)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert rel_norm(y.cpu(), ref) <= tol
    assert not bufs[0].any() and not bufs[1].any()


# The merged MACNN layers (batch 1, 2, 8 and a large one), narrow and single-branch ones,
# on GPUs of 132 SMs (H100/H200) and 16 (a Jetson Orin has 16).
@pytest.mark.parametrize("sms", [132, 16])
@pytest.mark.parametrize("n,c,hw,c1,c3,c5", [
    (1, 64, 24, 32, 48, 48), (1, 128, 12, 64, 96, 96), (1, 256, 6, 128, 192, 192), (1, 512, 3, 128, 192, 192),
    (2, 256, 6, 128, 192, 192), (8, 128, 12, 64, 96, 96), (256, 64, 24, 32, 48, 48), (1, 8, 5, 8, 8, 8),
    (1, 512, 3, 0, 512, 0), (3, 8, 7, 8, 16, 8), (1, 40, 9, 0, 24, 16), (2, 16, 6, 8, 16, 0)])
def test_mma_plan_covers_every_k_once(n, c, hw, c1, c3, c5, sms):
    """The mma kernel's blocks (its own host code, in every build): each
    non-empty branch (5x5, 3x3, 1x1) gets its K = taps x input channels in
    chunks that cover it exactly once; 16-row pixel tiles while those, unsplit,
    would not fill the GPU's resident blocks, else the fewest padded rows; the
    smallest chunk whose blocks all fit at once where K allows (a block's
    shared memory: 4 stages of its pixel and 64 weight rows, 80 bytes each, out
    of 164 KB per SM); one counter per split tile, and a workspace of one
    float per output value exactly when something is split."""
    p = _C.mma_plan(n, c, hw, hw, c1, c3, c5, sms)
    m, ctot = n * hw * hw, c1 + c3 + c5
    assert p["tile_n"] == 64 and p["tile_k"] == 32
    assert p["tile_m"] in (16, 32, 48, 64)
    assert p["smem_bytes"] == 4 * (p["tile_m"] + 64) * 80
    # A block's share of an SM: its shared memory and flag in 128-byte units, plus the 1 KB
    # the driver reserves; 164 KB per SM (A100, Orin): 6, 5, 4, 3 blocks of 16, 32, 48, 64 rows.
    per_sm = {16: 6, 32: 5, 48: 4, 64: 3}
    assert all(164 * 1024 // (-(-(4 * (bm + 64) * 80 + 4) // 128) * 128 + 1024) == k for bm, k in per_sm.items())
    assert p["resident_blocks"] == per_sm[p["tile_m"]]
    resident = lambda bm: per_sm[bm] * sms  # noqa: E731
    tiles16 = -(-m // 16) * sum(-(-cout // 64) for cout in (c1, c3, c5))
    padded = lambda bm: -(-m // bm) * bm  # noqa: E731
    if tiles16 <= resident(16):
        assert p["tile_m"] == 16
    else:
        assert padded(p["tile_m"]) == min(padded(bm) for bm in (16, 32, 48, 64))
    assert p["kchunk"] >= 128 and p["kchunk"] % 32 == 0
    expect = [(k, cout, off, woff) for k, cout, off, woff in
              ((5, c5, c1 + c3, c * (c1 + 9 * c3)), (3, c3, c1, c * c1), (1, c1, 0, 0)) if cout]
    assert [(b["k"], b["cout"], b["offset"], b["weights"]) for b in p["branches"]] == expect
    units = counters = 0
    for b in p["branches"]:
        assert b["kdim"] == b["k"] ** 2 * c
        assert (b["chunks"] - 1) * p["kchunk"] < b["kdim"] <= b["chunks"] * p["kchunk"]
        assert b["m_tiles"] == -(-m // p["tile_m"]) and b["n_tiles"] == -(-b["cout"] // 64)
        assert b["first_unit"] == units
        units += b["m_tiles"] * b["n_tiles"] * b["chunks"]
        if b["chunks"] > 1:
            assert b["first_counter"] == counters
            counters += b["m_tiles"] * b["n_tiles"]
    assert p["units"] == units and p["counters"] == counters
    assert p["workspace_floats"] == (m * ctot if counters else 0)
    kmax = max(b["kdim"] for b in p["branches"])
    assert units <= resident(p["tile_m"]) or p["kchunk"] >= kmax, "a second wave only when nothing is left to merge"
    if p["kchunk"] > 128:   # the chunk is no longer than it must be
        half = sum(b["m_tiles"] * b["n_tiles"] * -(-b["kdim"] // (p["kchunk"] // 2)) for b in p["branches"])
        assert half > resident(p["tile_m"])
    with pytest.raises(ValueError, match=">= 1"):
        _C.mma_plan(n, c, hw, hw, 0, 0, 0, sms)


def test_mma_plan_picks_what_the_batch_1_sweep_measured_fastest():
    """On an H200 (132 SMs) at batch 1 the fastest of every pixel tile x K chunk
    was 16 rows x 128-deep chunks on each of MACNN's L2-L5 (docs/results.md)."""
    for c, hw, c1, c3, c5 in ((64, 24, 32, 48, 48), (128, 12, 64, 96, 96), (256, 6, 128, 192, 192),
                              (512, 3, 128, 192, 192)):
        p = _C.mma_plan(1, c, hw, hw, c1, c3, c5, 132)
        assert (p["tile_m"], p["kchunk"]) == (16, 128)


def test_mma_plan_takes_the_tile_sweeps_tiles():
    """bm / kchunk replace the plan's choice (benchmarks/sweep_mma.py measures them all):
    the same arithmetic with those tiles; anything the kernel has no code for is refused."""
    p = _C.mma_plan(1, 256, 6, 6, 128, 192, 192, 132, bm=16, kchunk=96)
    assert p["tile_m"] == 16 and p["kchunk"] == 96
    assert [b["chunks"] for b in p["branches"]] == [-(-k * k * 256 // 96) for k in (5, 3, 1)]
    assert p["units"] == sum(3 * b["n_tiles"] * b["chunks"] for b in p["branches"])   # 36 pixels: 3 tiles of 16
    for bad in ({"bm": 8}, {"bm": 80}, {"kchunk": 48}, {"kchunk": 16}):
        with pytest.raises(ValueError, match="bm must be 16, 32, 48 or 64"):
            _C.mma_plan(1, 256, 6, 6, 128, 192, 192, 132, **bad)


# ------------------------------------------------- the first layer: the stem kernel
STEM_CASES = [(1, 1, 48, 48, 16, 24, 24), (256, 1, 48, 48, 16, 24, 24), (2, 1, 48, 48, 4, 6, 6),
              (3, 3, 17, 23, 5, 70, 9), (1, 4, 5, 3, 0, 8, 0), (2, 2, 1, 1, 8, 16, 40), (1, 1, 33, 16, 8, 8, 8)]


@requires_cuda
@requires_cuda_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("nhwc", [True, False])
@pytest.mark.parametrize("case", STEM_CASES, ids=[f"n{c[0]}-cin{c[1]}-{c[2]}x{c[3]}-{c[4]}.{c[5]}.{c[6]}"
                                                  for c in STEM_CASES])
def test_stem_matches_the_reference(case, nhwc, dtype):
    """At most 4 input channels (MACNN's gray first layer at full and quarter
    width, odd sizes, a partial last tile, more than one block of channels,
    a single branch), both layouts, against the float64 reference."""
    n, cin, h, w, c1, c3, c5 = case
    args = make_inputs(n, cin, h, w, c1, c3, c5, nhwc=nhwc, device="cuda", dtype=dtype, seed=n + c3)
    for relu in (True, False):
        y = fused_ms_conv(*args, relu=relu, kernel="stem")
        ref = fused_ms_conv_reference(*[t.cpu().double() for t in args], relu=relu)
        if dtype == torch.float16:
            assert rel_norm(y.cpu(), ref) <= FP16_REL_NORM
        else:
            torch.testing.assert_close(y.cpu().double(), ref, **FP32_TOL)
        assert_same_layout(y, fused_ms_conv_reference(*args, relu=relu))


@requires_cuda
@requires_cuda_kernel
def test_stem_refuses_more_than_four_input_channels():
    args = make_inputs(1, 5, 8, 8, 8, 8, 8, device="cuda")
    with pytest.raises(ValueError, match="at most 4 input channels"):
        fused_ms_conv(*args, kernel="stem")


# ------------------------------------------------- every kernel in one process
@requires_cuda
@requires_cuda_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("case", [(1, 256, 6, 128, 192, 192), (1, 512, 3, 128, 192, 192)], ids=["L4", "L5"])
def test_every_kernel_in_one_process_leaves_the_others_buffers_alone(case, dtype):
    """Every kernel of ours that takes the layer, one after another in one process
    as the layer benchmark runs them (buffers and packs made once, three warm-up
    calls on a side stream, 20 calls captured in one CUDA graph): each gives the
    reference eagerly and on every replay, and after each kernel's turn every
    kernel's kept buffers that must stay zero between calls are still zero."""
    from fer_edge.dispatch import KERNELS
    from fer_edge.kernels import PACKS, kernel_buffers, kernel_unsupported, make_pack, pack_kind, zero_state

    n, cin, hw, c1, c3, c5 = case
    args = make_inputs(n, cin, hw, hw, c1, c3, c5, nhwc=True, device="cuda", dtype=dtype, seed=4)
    ref = fused_ms_conv_reference(*[t.cpu().double() for t in args])
    tol = FP16_REL_NORM if dtype == torch.float16 else 1e-5
    packs = {kind: make_pack(kind, *args[1:]) for kind in PACKS}
    kernels = [k for k in KERNELS if not kernel_unsupported(*args, kernel=k)
               and (k != "wmma" or dtype == torch.float16)]
    kernels.sort(key=lambda k: k not in ("splitk", "mma"))  # the kernels with zero-state buffers first
    assert {"simt", "splitk"} <= set(kernels)
    kept, graphs = {}, {}
    for k in kernels:
        bufs = kept[k] = kernel_buffers(k, args[0], c1, c3, c5)
        def call(x, k=k, bufs=bufs):
            return fused_ms_conv(x, *args[1:], wp=packs[pack_kind(k)], kernel=k, buffers=bufs)

        static = args[0].clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                y = call(static)
        torch.cuda.current_stream().wait_stream(side)
        assert rel_norm(y.cpu(), ref) <= tol, f"{k} eagerly"
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(20):
                y = call(static)
        graph.replay()
        torch.cuda.synchronize()
        graphs[k] = (graph, y, static)   # a graph keeps no tensor it uses alive: its input neither
        assert rel_norm(y.cpu(), ref) <= tol, f"{k} in a graph"
        dirty = [f"{owner}'s {name}" for owner, b in kept.items() for name, t in zero_state(owner, b) if t.any()]
        assert not dirty, f"after {k}'s turn: {', '.join(dirty)} not zero"
    for k, (graph, y, _) in graphs.items():   # replayed again after every other kernel ran
        graph.replay()
        torch.cuda.synchronize()
        assert rel_norm(y.cpu(), ref) <= tol, f"{k}'s graph replayed after the others"


def test_zero_state_names_the_buffers_each_kernel_needs_at_zero():
    ws, counters = torch.zeros(4), torch.zeros(2, dtype=torch.int32)
    from fer_edge.kernels import zero_state

    assert [name for name, _ in zero_state("splitk", (ws, counters))] == ["counters"]
    assert [(name, t is ws) for name, t in zero_state("mma", (ws, counters))] == [("counters", False),
                                                                                   ("workspace", True)]
    assert zero_state("cutlass", (ws, counters)) == [] and zero_state("simt", None) == []
