"""fused_ms_conv on the CPU (the C++ kernel) and as a torch custom op against
the plain-PyTorch reference: shapes and memory layouts, NaN, opcheck, fake
tensors, torch.compile and export, gradients, and the checks on bad inputs.
The inputs and cases built here are shared with the CUDA and packed-weight
kernel tests."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fer_edge import _C
from fer_edge.kernels import check_ms_conv_inputs, fused_ms_conv, fused_ms_conv_reference

# fp32: the kernel sums the same products as cuDNN/oneDNN in another order.
FP32_TOL = dict(atol=1e-4, rtol=1e-4)


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


@pytest.mark.parametrize("use_kernel", [True, False], ids=["kernel", "plain"])
def test_channels_last_merged_macnn_stays_channels_last(use_kernel):
    """The merged model's fused stem must not turn a channels_last network NCHW
    (every later layer would then run, and convert, in the slower layout, and a
    kernel that reads channels_last only would refuse them), on the kernel and on
    the plain path alike: there the stem's one-channel 1x1 branch comes out of
    conv2d NCHW and its 3x3/5x5 branches channels_last, which torch.cat turns NCHW."""
    from fer_edge import models
    from fer_edge.models.layers import ConvAct
    from fer_edge.reparam import merge

    torch.manual_seed(0)
    m = merge(models.create("macnn", width=0.125).eval(), use_kernel=use_kernel)
    m = m.to(memory_format=torch.channels_last)
    seen = []
    for mod in m.modules():
        if type(mod).__name__ == "FusedMultiScaleConv" or isinstance(mod, ConvAct):
            mod.register_forward_hook(lambda mod, inp, out: seen.append((type(mod).__name__, inp[0], out)))
    x = torch.randn(2, 1, 48, 48).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        m(x)
    assert [name for name, _, _ in seen].count("FusedMultiScaleConv") == 5 and len(seen) == 13
    for i, (name, inp, out) in enumerate(seen):
        assert out.is_contiguous(memory_format=torch.channels_last), f"layer {i} ({name}) wrote NCHW"
        if i:
            assert inp.is_contiguous(memory_format=torch.channels_last), f"layer {i} ({name}) got NCHW"


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
