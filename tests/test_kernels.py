"""fused_ms_conv (C++ and CUDA kernels) against the plain-PyTorch reference."""
from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fer_edge import _C
from fer_edge.kernels import check_ms_conv_inputs, fused_ms_conv, fused_ms_conv_reference

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible on this machine")
requires_cuda_kernel = pytest.mark.skipif(
    not hasattr(_C, "msconv_cuda"), reason="fer_edge._C was built without CUDA"
)

# fp32: the kernel sums the same products as cuDNN/oneDNN in another order.
FP32_TOL = dict(atol=1e-4, rtol=1e-4)
# fp16 inputs, fp32 accumulation, fp16 output: compared with the fp32 reference
# on the same (fp16-representable) inputs, the only error left is the final
# rounding to fp16 (relative 2^-11 per element) -> relative norm well under 2e-3.
FP16_REL_NORM = 2e-3


def make_inputs(n, cin, h, w, c1, c3, c5, *, nhwc=False, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    x = rnd(n, cin, h, w)
    if nhwc:
        x = x.contiguous(memory_format=torch.channels_last)
    params = []
    for c, k in ((c1, 1), (c3, 3), (c5, 5)):
        # He-like scale keeps outputs O(1) whatever cin is, so atol means the same everywhere.
        params += [rnd(c, cin, k, k, scale=1 / math.sqrt(cin * k * k)), rnd(c, scale=0.5)]
    return (x, *params)


def assert_same_layout(y, ref):
    """The output keeps the input's memory format, as torch's own convolutions do."""
    for fmt in (torch.contiguous_format, torch.channels_last):
        assert y.is_contiguous(memory_format=fmt) == ref.is_contiguous(memory_format=fmt), (
            f"layout differs from torch's: strides {y.stride()} vs {ref.stride()}"
        )


def rel_norm(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


SPATIAL = [(1, 1), (2, 3), (3, 5), (5, 7), (7, 2), (48, 48)]
CHANNELS = [(5, 3, 17), (1, 1, 1), (16, 24, 24), (7, 33, 2)]
CASES = [
    (n, cin, h, w, *CHANNELS[i % len(CHANNELS)], nhwc, relu)
    for i, (n, cin, (h, w), nhwc, relu) in enumerate(
        itertools.product([1, 3], [1, 3, 64, 130], SPATIAL, [False, True], [True, False])
    )
]


def _id(case):
    n, cin, h, w, c1, c3, c5, nhwc, relu = case
    return f"n{n}-cin{cin}-{h}x{w}-{c1}.{c3}.{c5}-{'nhwc' if nhwc else 'nchw'}-{'relu' if relu else 'lin'}"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_cpu_matches_reference(case):
    n, cin, h, w, c1, c3, c5, nhwc, relu = case
    args = make_inputs(n, cin, h, w, c1, c3, c5, nhwc=nhwc, seed=hash(case) % 2**31)
    y = fused_ms_conv(*args, relu=relu)
    ref = fused_ms_conv_reference(*args, relu=relu)
    assert y.shape == (n, c1 + c3 + c5, h, w)
    torch.testing.assert_close(y, ref, **FP32_TOL)
    assert_same_layout(y, ref)


def test_cpu_layouts_agree_and_threads_are_deterministic():
    args = make_inputs(2, 64, 12, 12, 16, 24, 24, seed=1)
    nhwc = (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
    a = fused_ms_conv(*args)
    b = fused_ms_conv(*nhwc)
    torch.testing.assert_close(a, b.contiguous(), atol=0, rtol=0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        c = fused_ms_conv(*args)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(a, c, atol=0, rtol=0)


def test_nan_input_is_never_hidden():
    # ReLU must not turn NaN into 0.  The fused kernel may mark *more* outputs
    # NaN than torch (a zero tap of a narrower branch times NaN is NaN), never fewer.
    args = list(make_inputs(1, 3, 9, 9, 2, 2, 2, seed=2))
    args[0][0, 0, 4, 4] = float("nan")
    y = fused_ms_conv(*args)
    ref = fused_ms_conv_reference(*args)
    assert torch.isnan(ref).any()
    assert torch.isnan(y[torch.isnan(ref)]).all()
    finite = ~torch.isnan(y)
    torch.testing.assert_close(y[finite], ref[finite], **FP32_TOL)
    assert finite[:, :, 0, 0].all(), "pixels outside the 5x5 window stay finite"


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 3),
    cin=st.integers(1, 40),
    h=st.integers(1, 20),
    w=st.integers(1, 20),
    c1=st.integers(1, 20),
    c3=st.integers(1, 40),
    c5=st.integers(1, 40),
    nhwc=st.booleans(),
    relu=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_cpu_fuzz_shapes(n, cin, h, w, c1, c3, c5, nhwc, relu, seed):
    args = make_inputs(n, cin, h, w, c1, c3, c5, nhwc=nhwc, seed=seed)
    torch.testing.assert_close(fused_ms_conv(*args, relu=relu), fused_ms_conv_reference(*args, relu=relu), **FP32_TOL)


def test_custom_op_passes_opcheck():
    # Schema, fake (meta) implementation, autograd registration, aot dispatch.
    args = make_inputs(2, 3, 6, 5, 2, 3, 4, seed=3)
    torch.library.opcheck(torch.ops.fer_edge.fused_ms_conv.default, (*args, True))
    nhwc = (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
    torch.library.opcheck(torch.ops.fer_edge.fused_ms_conv.default, (*nhwc, False))


def test_fake_tensor_shape_and_layout():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        args = make_inputs(4, 8, 9, 7, 3, 5, 6, nhwc=True)
        y = fused_ms_conv(*args)
    assert y.shape == (4, 14, 9, 7)
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_one_channel_input_takes_the_weights_layout_like_torch_conv():
    """A one-channel input is both NCHW- and NHWC-contiguous; as torch's conv2d
    does, the output then follows the weights: channels_last weights (a model
    after .to(memory_format=torch.channels_last)) give a channels_last output,
    through the op, its fake implementation and the packed CPU module alike."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fer_edge.kernels import CpuPackedMsConv

    x, w1, b1, w3, b3, w5, b5 = make_inputs(2, 1, 9, 7, 3, 5, 6)
    assert x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    cl = [t.to(memory_format=torch.channels_last) for t in (w1, w3, w5)]  # as Module.to does
    assert cl[1].stride(1) == 1  # .to() gives one-channel weights channels_last strides
    conv = torch.nn.functional.conv2d(x, cl[1], b3, padding=1)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    ref = fused_ms_conv_reference(x, w1, b1, w3, b3, w5, b5)
    for weights, want_nhwc in (((w1, w3, w5), False), (cl, True)):
        wa, wb, wc = weights
        for y in (fused_ms_conv(x, wa, b1, wb, b3, wc, b5), CpuPackedMsConv(wa, b1, wb, b3, wc, b5)(x)):
            assert y.is_contiguous(memory_format=torch.channels_last) == want_nhwc
            assert y.is_contiguous() != want_nhwc
            torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
        mode = FakeTensorMode()
        fake = [mode.from_tensor(t) for t in (x, wa, b1, wb, b3, wc, b5)]  # same strides, no data
        with mode:
            fy = fused_ms_conv(*fake)
        assert fy.is_contiguous(memory_format=torch.channels_last) == want_nhwc


def test_channels_last_merged_macnn_stays_channels_last():
    """The merged model's fused stem must not turn a channels_last network NCHW
    (every later layer would then run, and convert, in the slower layout)."""
    from fer_edge import models
    from fer_edge.reparam import merge

    torch.manual_seed(0)
    m = merge(models.create("macnn", width=0.125).eval()).to(memory_format=torch.channels_last)
    seen = []
    for mod in m.modules():
        if type(mod).__name__ == "FusedMultiScaleConv":
            mod.register_forward_hook(lambda mod, inp, out: seen.append((inp[0], out)))
    x = torch.randn(2, 1, 48, 48).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        m(x)
    assert len(seen) == 5
    for i, (inp, out) in enumerate(seen):
        assert out.is_contiguous(memory_format=torch.channels_last), f"fused layer {i} wrote NCHW"
        if i:
            assert inp.is_contiguous(memory_format=torch.channels_last), f"fused layer {i} got NCHW"


class _Layer(torch.nn.Module):
    # Named attributes, not a ParameterList: torch 2.11's dynamo cannot unpack
    # `*ParameterList` (InternalTorchDynamoError, seen on the H100 machine).
    NAMES = ("w1", "b1", "w3", "b3", "w5", "b5")

    def __init__(self, args):
        super().__init__()
        for name, t in zip(self.NAMES, args):
            self.register_parameter(name, torch.nn.Parameter(t, requires_grad=False))

    def forward(self, x):
        return fused_ms_conv(x, self.w1, self.b1, self.w3, self.b3, self.w5, self.b5) * 2.0


def test_torch_compile_and_export_trace_the_op():
    args = make_inputs(2, 4, 8, 8, 2, 3, 5, seed=4)
    layer = _Layer(args[1:]).eval()
    ref = fused_ms_conv_reference(*args) * 2.0
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(args[0]), ref, **FP32_TOL)
    exported = torch.export.export(layer, (args[0],))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert "fer_edge.fused_ms_conv.default" in targets
    torch.testing.assert_close(exported.module()(args[0]), ref, **FP32_TOL)


def test_gradients_match_reference():
    args = [t.clone().requires_grad_(True) for t in make_inputs(2, 3, 6, 6, 2, 3, 4, seed=5)]
    fused_ms_conv(*args).square().sum().backward()
    got = [t.grad.clone() for t in args]
    for t in args:
        t.grad = None
    fused_ms_conv_reference(*args).square().sum().backward()
    for g, t in zip(got, args):
        torch.testing.assert_close(g, t.grad, **FP32_TOL)


# ---------------------------------------------------------------- validation
def _bad(**change):
    args = dict(zip(("x", "w1", "b1", "w3", "b3", "w5", "b5"), make_inputs(1, 4, 6, 6, 2, 3, 4)))
    args.update(change)
    return args


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(x=torch.randn(4, 6, 6)), "must be 4-D"),
        (dict(x=torch.randn(0, 4, 6, 6)), "empty"),
        (dict(x=torch.randn(1, 4, 0, 6)), "empty"),
        (dict(x=torch.randn(1, 5, 6, 6)), r"w1 must have shape \(c_out, 5, 1, 1\)"),
        (dict(w3=torch.randn(3, 4, 3, 1)), r"w3 must have shape"),
        (dict(w5=torch.randn(4, 4, 3, 3)), r"w5 must have shape"),
        (dict(b3=torch.randn(2)), r"b3 must have shape \(3,\)"),
        (dict(w1=torch.randn(0, 4, 1, 1), b1=torch.randn(0)), "no output channels"),
        (dict(x=torch.randn(1, 4, 6, 6, dtype=torch.float64)), "has dtype torch.float32 but x has torch.float64"),
        (dict(w5=torch.randn(4, 4, 5, 5, dtype=torch.float16)), "w5 has dtype"),
        (dict(x=torch.randn(1, 4, 12, 6)[:, :, ::2]), "contiguous"),
        (dict(b1=[0.0, 0.0]), "must be a torch.Tensor"),
        (dict(x=torch.randn(1, 4, 6, 6, device="meta")), "is on cpu but x is on meta"),
    ],
)
def test_bad_inputs_raise_value_error(change, message):
    with pytest.raises(ValueError, match=message):
        fused_ms_conv(**_bad(**change))


def test_cpu_rejects_half():
    args = [t.half() for t in make_inputs(1, 2, 4, 4, 1, 1, 1)]
    with pytest.raises(ValueError, match="CPU kernel computes float32 only"):
        fused_ms_conv(*args)


def test_cpp_side_checks_raw_arguments():
    x, w1, b1, w3, b3, w5, b5 = make_inputs(1, 2, 4, 4, 1, 1, 1)
    out = torch.empty(1, 3, 4, 4)
    ptrs = [t.data_ptr() for t in (x, out, w1, b1, w3, b3, w5, b5)]
    with pytest.raises(ValueError, match="null data pointer"):
        _C.msconv_cpu(0, *ptrs[1:], 1, 2, 4, 4, 1, 1, 1, 0, True)
    with pytest.raises(ValueError, match="non-empty"):
        _C.msconv_cpu(*ptrs, 1, 2, 0, 4, 1, 1, 1, 0, True)
    with pytest.raises(ValueError, match="c1, c3 and c5"):
        _C.msconv_cpu(*ptrs, 1, 2, 4, 4, 1, 0, 1, 0, True)
    with pytest.raises(ValueError, match="layout"):
        _C.msconv_cpu(*ptrs, 1, 2, 4, 4, 1, 1, 1, 7, True)
    with pytest.raises(ValueError, match="too large"):
        _C.msconv_cpu(*ptrs, 1 << 20, 1 << 10, 1 << 10, 4, 1, 1, 1, 0, True)
    _C.msconv_cpu(*ptrs, 1, 2, 4, 4, 1, 1, 1, 0, True)  # the same call, valid, runs
    torch.testing.assert_close(out, fused_ms_conv_reference(x, w1, b1, w3, b3, w5, b5), **FP32_TOL)


def test_build_info_reports_kernels():
    info = _C.build_info()
    assert info["cpu"] is True
    # What the build says it has is what the module exports.
    assert info["cuda"] is hasattr(_C, "msconv_cuda")
    assert bool(info["cuda_archs"]) is info["cuda"], "a CUDA build lists its architectures, a CPU build none"


def test_check_returns_split_and_layout():
    args = make_inputs(1, 3, 5, 5, 2, 3, 4, nhwc=True)
    assert check_ms_conv_inputs(*args) == (2, 3, 4, True)


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
    """Every fp16 kernel: SIMT, tensor-core (WMMA) and small-batch split-K."""
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

    assert [cuda_kernel_code(k) for k in ("simt", "wmma", "splitk")] == [0, 1, 2]
    with pytest.raises(ValueError, match="unknown CUDA kernel 'fast'"):
        cuda_kernel_code("fast")


@pytest.mark.parametrize("n,c,hw,ctot,sms", [(1, 1, 48, 64, 132), (1, 64, 24, 128, 132), (1, 256, 6, 512, 132),
                                             (1, 512, 3, 512, 132), (8, 256, 6, 512, 132), (1, 512, 3, 512, 16),
                                             (256, 64, 24, 128, 132), (1, 6, 5, 9, 132)])
def test_splitk_plan_covers_every_input_channel_once(n, c, hw, ctot, sms):
    """The small-batch kernel's launch plan (its own host code, built in every
    variant of the extension): the slices tile the input channels exactly, in
    multiples of the staging width; enough blocks to fill the GPU when the
    channels allow; a workspace exactly as large as the partial sums."""
    p = _C.splitk_plan(n, c, hw, hw, ctot, sms)
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
@pytest.mark.parametrize("seed", range(6))
def test_every_dispatch_choice_matches_the_reference(seed):
    """Random layers and batches, each run by every choice the dispatch table
    can make (through the merged module, as a model runs it, and twice, so the
    split-K counters are shown to reset), against fused_ms_conv_reference in float64."""
    from fer_edge.dispatch import CHOICES
    from fer_edge.models.layers import FusedMultiScaleConv

    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    n, cin, hw = r(1, 9), r(1, 70), r(3, 30)
    c1, c3, c5 = r(1, 40), r(1, 70), r(1, 70)
    for dtype in (torch.float32, torch.float16):
        x, *ws = make_inputs(n, cin, hw, hw, c1, c3, c5, nhwc=bool(seed % 2), device="cuda", dtype=dtype,
                             seed=seed)
        ref = fused_ms_conv_reference(*[t.cpu().double() for t in (x, *ws)])
        m = FusedMultiScaleConv(*ws).eval()
        for choice in CHOICES:
            if choice == "wmma" and dtype != torch.float16:
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
