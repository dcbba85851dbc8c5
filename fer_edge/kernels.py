"""The fused multi-scale convolution as a torch custom op.

``fused_ms_conv(x, w1, b1, w3, b3, w5, b5, relu=True)`` computes the merged
MACNN layer

    concat_c(act(conv1x1(x) + b1), act(conv3x3(x, pad=1) + b3), act(conv5x5(x, pad=2) + b5))

in one pass through the compiled kernels in ``fer_edge._C`` (C++/OpenMP on the
CPU, CUDA on the GPU).  The extension is not built against PyTorch: this module
checks every tensor, then hands raw pointers, shapes, layout and the current
CUDA stream to it.  ``fused_ms_conv_reference`` is the plain-PyTorch definition
used by the tests and as the fallback when the extension was built without
CUDA (a warning is issued once; it never happens silently).
"""
from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

# The compiled extension's numbers of fer_edge's CUDA kernels (csrc/msconv.h, Variant), and
# the one place that reads FER_EDGE_CUDA_KERNEL (fer_edge.dispatch).
from fer_edge.dispatch import KERNELS as KERNEL_CODES
from fer_edge.dispatch import direct_kernel
from fer_edge.layout import io_nhwc, weights_nhwc

try:
    from fer_edge import _C
except ImportError as exc:  # pragma: no cover - a device install (no kernels) or the source folder
    raise ImportError(
        "fer_edge._C (the compiled kernels) is missing: this fer-edge was installed without them "
        "(FER_EDGE_KERNELS=0, the device install: fer_edge.targets needs none) or is imported from the "
        "source folder; `pip install .` builds them"
    ) from exc

__all__ = ["fused_ms_conv", "fused_ms_conv_reference", "check_ms_conv_inputs", "build_info",
           "cuda_kernels_available", "kernel_unsupported", "CpuPackedMsConv", "pack_ms_weights",
           "pack_krsc_weights", "pack_window_weights", "make_pack", "splitk_buffers", "mma_buffers", "cutlass_buffers",
           "kernel_buffers", "zero_state", "tensor_version", "watch_optimizer_steps"]

_LAYOUT_NCHW, _LAYOUT_NHWC = 0, 1
_KERNEL_NAMES = {code: name for name, code in KERNEL_CODES.items()}  # the op takes the code

# Fused optimizers (SGD/Adam(W) with fused=True) update parameters in place
# without bumping their version counters, so a packed-weight cache
# (CpuPackedMsConv, FusedMultiScaleConv's CUDA pack) also compares a count of
# optimizer steps.  Counting needs a process-wide torch.optim hook: it is
# registered by the first cache that asks (watch_optimizer_steps), never on
# import, so importing this module leaves torch.optim alone.
_optimizer_steps = 0
_step_hook = None


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


def watch_optimizer_steps() -> int:
    """Start counting optimizer steps (once per process) and return the count so far;
    a cache records it when built and compares ``optimizer_steps()`` later."""
    global _step_hook
    if _step_hook is None:
        _step_hook = register_optimizer_step_post_hook(_count_optimizer_step)
    return _optimizer_steps


def optimizer_steps() -> int:
    """Optimizer steps taken since the first ``watch_optimizer_steps()`` (any optimizer)."""
    return _optimizer_steps


def tensor_version(t: torch.Tensor) -> int:
    """t's in-place version counter, or -1 for an inference tensor (made under
    torch.inference_mode), which has none: such weights can only change in
    place inside inference mode, and the module that owns them drops its
    packs on load_state_dict (FusedMultiScaleConv._load_from_state_dict)."""
    return -1 if t.is_inference() else t._version


_CUDA_DTYPES = {torch.float32: 0, torch.float16: 1}
_warned_fallback = False


def build_info() -> dict:
    """What the compiled extension contains: cpu, openmp, cuda, cuda_archs."""
    return dict(_C.build_info())


def cuda_kernels_available() -> bool:
    """True when the CUDA kernel was compiled in and a CUDA device is visible."""
    return hasattr(_C, "msconv_cuda") and _C.cuda_device_count() > 0


def fused_ms_conv_reference(x, w1, b1, w3, b3, w5, b5, relu: bool = True) -> torch.Tensor:
    """Plain-PyTorch definition of the fused layer (three convs, ReLU, cat); an
    empty branch (no output channels: a plain 3x3 convolution) is left out,
    since PyTorch's convolutions refuse one."""
    y = torch.cat([F.conv2d(x, w, b, padding=w.shape[-1] // 2) for w, b in ((w1, b1), (w3, b3), (w5, b5))
                   if w.shape[0] > 0], dim=1)
    return F.relu(y) if relu else y


def pack_ms_weights(w1: torch.Tensor, w3: torch.Tensor, w5: torch.Tensor) -> torch.Tensor:
    """The CUDA kernels' weight layout: (25, C, c5 + c3 + c1), tap-major
    (tap = ky * 5 + kx), output channels in the kernels' combined order
    [c5 | c3 | c1], the 3x3 and 1x1 kernels at the centre of a zero 5x5 window.
    Output channels are the fastest index, so a block's threads stage its
    weights with coalesced loads.  Same dtype and device as the weights."""
    k = torch.cat([w5, F.pad(w3, (1, 1, 1, 1)), F.pad(w1, (2, 2, 2, 2))])  # (ctot, C, 5, 5)
    return k.permute(2, 3, 1, 0).reshape(25, k.shape[1], k.shape[0]).contiguous()


def pack_krsc_weights(w1: torch.Tensor, w3: torch.Tensor, w5: torch.Tensor) -> torch.Tensor:
    """The "mma" and "cutlass" kernels' weight layout: each branch's kernel as KRSC
    (output channel, row, column, input channel: channels_last of OIHW), the
    three one after another in one flat tensor [w1 | w3 | w5].  Same dtype and
    device as the weights."""
    return torch.cat([w.permute(0, 2, 3, 1).reshape(-1) for w in (w1, w3, w5)])


def pack_window_weights(w1, b1, w3, b3, w5, b5) -> torch.Tensor:
    """The window CUTLASS kernels' layout (cutlass_window, cutlass90_window):
    the layer as one KRSC kernel (ctot, 5, 5, C), output channels in the
    layer's order [c1 | c3 | c5], the 1x1 and 3x3 kernels at the centre of a
    zero 5x5 window, followed by the ctot biases [b1 | b3 | b5] (the epilogue
    reads them as one vector), in one flat tensor of the weights' dtype and device."""
    k = torch.cat([F.pad(w1, (2, 2, 2, 2)), F.pad(w3, (1, 1, 1, 1)), w5])
    return torch.cat([k.permute(0, 2, 3, 1).reshape(-1), torch.cat([b1, b3, b5]).to(k.dtype)])


# Which weight layout each CUDA kernel reads (one pack per layout); the packs in
# WITH_BIASES hold the biases too.
PACKS = {"tap": pack_ms_weights, "krsc": pack_krsc_weights, "window": pack_window_weights}
WITH_BIASES = frozenset({"window"})


def make_pack(kind: str, w1, b1, w3, b3, w5, b5) -> torch.Tensor:
    """PACKS[kind] of one layer's weights (and biases, for a pack that holds them)."""
    return PACKS[kind](w1, b1, w3, b3, w5, b5) if kind in WITH_BIASES else PACKS[kind](w1, w3, w5)


# The CUDA kernels that read another pack than "tap", and which.
KERNEL_PACKS = {"mma": "krsc", "cutlass": "krsc", "cutlass90": "krsc", "cutlass_window": "window",
                "cutlass90_window": "window"}
# The kernels built on CUTLASS (a build that found its headers).  They and "mma" take the
# same inputs (the compiled extension's igemm rules: float16 channels_last, aligned).
CUTLASS_KERNELS = ("cutlass", "cutlass90", "cutlass_window", "cutlass90_window")
IGEMM_KERNELS = ("mma", *CUTLASS_KERNELS)


def pack_kind(kernel: str | None) -> str:
    """The PACKS entry a CUDA kernel reads: KERNEL_PACKS's, "tap" for the others."""
    return KERNEL_PACKS.get(kernel, "tap")


def packed_shape(kind: str, c: int, c1: int, c3: int, c5: int) -> tuple[int, ...]:
    """The shape of PACKS[kind]'s result for a layer with c input channels."""
    ctot = c1 + c3 + c5
    if kind == "tap":
        return (25, c, ctot)
    return (c * (c1 + 9 * c3 + 25 * c5),) if kind == "krsc" else (ctot * (25 * c + 1),)


def check_packed_weights(wp, x: torch.Tensor, c1: int, c3: int, c5: int, kind: str = "tap") -> None:
    """``wp`` must be what PACKS[kind] returns for this layer (shape, dtype, device, contiguity)."""
    if not isinstance(wp, torch.Tensor):
        raise ValueError(f"fused_ms_conv: wp must be a torch.Tensor, got {type(wp).__name__}")
    expect = packed_shape(kind, x.shape[1], c1, c3, c5)
    if tuple(wp.shape) != expect:
        raise ValueError(f"fused_ms_conv: wp must have shape {expect} ({PACKS[kind].__name__}), "
                         f"got {tuple(wp.shape)}")
    if wp.dtype != x.dtype or wp.device != x.device:
        raise ValueError(f"fused_ms_conv: wp is {wp.dtype} on {wp.device}, x is {x.dtype} on {x.device}")
    if not wp.is_contiguous():
        raise ValueError("fused_ms_conv: wp must be contiguous")


def check_ms_conv_inputs(x, w1, b1, w3, b3, w5, b5) -> tuple[int, int, int, bool]:
    """Validate the inputs of fused_ms_conv; return (c1, c3, c5, nhwc).

    Raises ValueError with a plain message for anything the kernels could not
    handle, so no bad pointer ever reaches C++.
    """
    names = ("x", "w1", "b1", "w3", "b3", "w5", "b5")
    tensors = (x, w1, b1, w3, b3, w5, b5)
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"fused_ms_conv: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 4:
        raise ValueError(f"fused_ms_conv: x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    if n == 0 or c == 0 or h == 0 or w == 0:
        raise ValueError(f"fused_ms_conv: x is empty, shape {tuple(x.shape)}")
    for name, t in zip(names[1:], tensors[1:]):
        if t.device != x.device:
            raise ValueError(f"fused_ms_conv: {name} is on {t.device} but x is on {x.device}")
        if t.dtype != x.dtype:
            raise ValueError(f"fused_ms_conv: {name} has dtype {t.dtype} but x has {x.dtype}")
    counts = []
    for wname, bname, wt, bt, k in (("w1", "b1", w1, b1, 1), ("w3", "b3", w3, b3, 3), ("w5", "b5", w5, b5, 5)):
        if wt.dim() != 4 or wt.shape[1] != c or wt.shape[2] != k or wt.shape[3] != k:
            raise ValueError(
                f"fused_ms_conv: {wname} must have shape (c_out, {c}, {k}, {k}) for x with {c} channels, "
                f"got {tuple(wt.shape)}"
            )
        if wt.shape[0] < 1 and (k == 3 or x.device.type != "cuda"):
            # CUDA runs a layer without 1x1 or 5x5 channels (a plain 3x3 convolution: c1 = c5 = 0).
            raise ValueError(f"fused_ms_conv: {wname} has no output channels"
                             + ("" if k == 3 else " (only the CUDA kernels take an empty 1x1 or 5x5 branch)"))
        if bt.dim() != 1 or bt.shape[0] != wt.shape[0]:
            raise ValueError(f"fused_ms_conv: {bname} must have shape ({wt.shape[0]},), got {tuple(bt.shape)}")
        counts.append(int(wt.shape[0]))
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        raise ValueError(
            "fused_ms_conv: x must be contiguous (NCHW) or channels_last (NHWC); call .contiguous() first"
        )
    if x.dtype not in (torch.float32, torch.float16):
        raise ValueError(f"fused_ms_conv: dtype {x.dtype} is not supported (float32, or float16 on CUDA)")
    if x.device.type == "cpu" and x.dtype != torch.float32:
        raise ValueError(f"fused_ms_conv: the CPU kernel computes float32 only, got {x.dtype}")
    if x.device.type not in ("cpu", "cuda"):
        raise ValueError(f"fused_ms_conv: device {x.device} is not supported (cpu or cuda)")
    return counts[0], counts[1], counts[2], io_nhwc(x, weights_nhwc(w3, w5))


def _empty_output(x: torch.Tensor, ctot: int, nhwc: bool) -> torch.Tensor:
    fmt = torch.channels_last if nhwc else torch.contiguous_format
    n, _, h, w = x.shape
    return torch.empty((n, ctot, h, w), dtype=x.dtype, device=x.device, memory_format=fmt)


def _warn_fallback_once(reason: str) -> None:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            f"fer_edge.kernels.fused_ms_conv: {reason}; using the plain PyTorch reference "
            "(three convolutions + cat) instead of the fused CUDA kernel",
            RuntimeWarning,
            stacklevel=3,
        )


def splitk_buffers(x: torch.Tensor, ctot: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The small-batch kernel's float32 workspace and int32 tile counters for
    input x (CUDA) and ctot output channels, sized by the kernel's own launch
    plan.  The counters start at zero and every call leaves them at zero, so a
    module keeps one pair per shape (and a CUDA graph can replay it)."""
    n, c, h, w = x.shape
    plan = _C.splitk_plan(n, c, h, w, ctot, _C.sm_count(x.device.index or 0))
    ws = torch.empty(max(1, plan["workspace_floats"]), dtype=torch.float32, device=x.device)
    counters = torch.zeros(max(1, plan["counters"]), dtype=torch.int32, device=x.device)
    return ws, counters


def check_splitk_buffers(ws, counters, x: torch.Tensor, ctot: int) -> None:
    """Caller-kept buffers must be what splitk_buffers makes for this input: the
    kernel writes ws and the counters with no bounds of its own."""
    n, c, h, w = x.shape
    plan = _C.splitk_plan(n, c, h, w, ctot, _C.sm_count(x.device.index or 0))
    _check_buffers(((ws, "workspace", torch.float32, plan["workspace_floats"]),
                    (counters, "counters", torch.int32, plan["counters"])), x, "splitk_buffers(x, ctot)")


def _mma_plan(x: torch.Tensor, c1: int, c3: int, c5: int) -> dict:
    n, c, h, w = x.shape
    return _C.mma_plan(n, c, h, w, c1, c3, c5, _C.sm_count(x.device.index or 0))


def mma_buffers(x: torch.Tensor, c1: int, c3: int, c5: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The "mma" kernel's float32 workspace (one sum per output value) and int32
    tile counters for input x (CUDA) and branches of c1, c3, c5 channels, sized
    by its plan; both start at zero and every call leaves them at zero (the
    chunks of a tile add into the workspace, the last one clears it).  So a
    pair serves one call at a time: never two streams at once, and never a
    workspace that is not zero (its contents would be added to the output)."""
    plan = _mma_plan(x, c1, c3, c5)
    return (torch.zeros(max(1, plan["workspace_floats"]), dtype=torch.float32, device=x.device),
            torch.zeros(max(1, plan["counters"]), dtype=torch.int32, device=x.device))


def check_mma_buffers(ws, counters, x: torch.Tensor, c1: int, c3: int, c5: int) -> None:
    plan = _mma_plan(x, c1, c3, c5)
    _check_buffers(((ws, "workspace", torch.float32, plan["workspace_floats"]),
                    (counters, "counters", torch.int32, plan["counters"])), x, "mma_buffers(x, c1, c3, c5)")


# The kernels that keep scratch buffers between calls, and whose buffers they are
# (the SM80 CUTLASS kernels keep their split-K semaphores).
BUFFERED_KERNELS = {"splitk": "splitk", "mma": "mma", "cutlass": "cutlass", "cutlass_window": "cutlass_window"}


def zero_state(kernel: str, buffers) -> list[tuple[str, torch.Tensor]]:
    """The kept buffers of kernel_buffers(kernel, ...) that every call leaves at
    zero and the next one needs at zero, by name: the split-K kernels' tile
    counters, and the mma kernel's workspace (its chunks add into it).  Anything
    else writing them makes those kernels wrong from then on."""
    if buffers is None or BUFFERED_KERNELS.get(kernel) not in ("splitk", "mma"):
        return []
    ws, counters = buffers
    return [("counters", counters)] + ([("workspace", ws)] if BUFFERED_KERNELS[kernel] == "mma" else [])


def kernel_buffers(kernel: str, x: torch.Tensor, c1: int, c3: int, c5: int):
    """The buffers a CUDA kernel keeps between calls for input x (splitk_buffers,
    mma_buffers or cutlass_buffers), or None for a kernel that needs none."""
    owner = BUFFERED_KERNELS.get(kernel)
    if owner is None:
        return None
    if owner == "splitk":
        return splitk_buffers(x, c1 + c3 + c5)
    if owner == "mma":
        return mma_buffers(x, c1, c3, c5)
    return cutlass_buffers(x, c1, c3, c5, window=owner == "cutlass_window")


def check_kernel_buffers(kernel: str, ws, counters, x: torch.Tensor, c1: int, c3: int, c5: int) -> None:
    """Caller-kept buffers must be what kernel_buffers makes for this input."""
    owner = BUFFERED_KERNELS[kernel]
    if owner == "splitk":
        check_splitk_buffers(ws, counters, x, c1 + c3 + c5)
    elif owner == "mma":
        check_mma_buffers(ws, counters, x, c1, c3, c5)
    else:
        check_cutlass_buffers(ws, counters, x, c1, c3, c5, window=owner == "cutlass_window")


def _cutlass_semaphores(x: torch.Tensor, c1: int, c3: int, c5: int, window: bool) -> int:
    n, c, h, w = x.shape
    return _C.igemm_semaphores(n, c, h, w, c1, c3, c5, _C.sm_count(x.device.index or 0), window)


def cutlass_buffers(x: torch.Tensor, c1: int, c3: int, c5: int,
                    window: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The "cutlass" kernel's buffers (window=True: "cutlass_window"'s) for input
    x (CUDA) and branches of c1, c3, c5 channels: an unused float32 workspace
    and the int32 split-K semaphores of its small-batch launches (the kernel
    clears them itself), as a pair like splitk_buffers'."""
    sems = _cutlass_semaphores(x, c1, c3, c5, window)
    return (torch.empty(1, dtype=torch.float32, device=x.device),
            torch.zeros(max(1, sems), dtype=torch.int32, device=x.device))


def check_cutlass_buffers(ws, counters, x: torch.Tensor, c1: int, c3: int, c5: int, window: bool = False) -> None:
    sems = _cutlass_semaphores(x, c1, c3, c5, window)
    _check_buffers(((ws, "workspace", torch.float32, 0), (counters, "semaphores", torch.int32, sems)), x,
                   f"cutlass_buffers(x, c1, c3, c5{', window=True' if window else ''})")


def _check_buffers(expected, x: torch.Tensor, maker: str) -> None:
    for t, name, dtype, size in expected:
        if (not isinstance(t, torch.Tensor) or t.dtype != dtype or t.device != x.device or not t.is_contiguous()
                or t.numel() < size):
            raise ValueError(f"fused_ms_conv: buffers' {name} must be {maker}'s for this input "
                             f"({dtype}, contiguous, on {x.device}, at least {size} elements)")


# ws and counters are scratch: the split-K kernel writes partial sums to ws and
# leaves every counter at zero, as it found it, so no caller can observe a
# change.  Declared functional, which keeps the op differentiable (PyTorch
# refuses autograd formulas for mutating ops).
@torch.library.custom_op("fer_edge::fused_ms_conv", mutates_args=())
def _fused_ms_conv_op(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w3: torch.Tensor,
    b3: torch.Tensor,
    w5: torch.Tensor,
    b5: torch.Tensor,
    relu: bool,
    wp: torch.Tensor | None = None,
    kernel: int = 0,
    ws: torch.Tensor | None = None,
    counters: torch.Tensor | None = None,
) -> torch.Tensor:
    c1, c3, c5, nhwc = check_ms_conv_inputs(x, w1, b1, w3, b3, w5, b5)
    if x.device.type == "cuda" and not cuda_kernels_available():
        why = ("fer_edge was built without CUDA" if not hasattr(_C, "msconv_cuda")
               else "the CUDA kernel sees no device")
        _warn_fallback_once(why)
        y = fused_ms_conv_reference(x, w1, b1, w3, b3, w5, b5, relu)
        return y.contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)
    out = _empty_output(x, c1 + c3 + c5, nhwc)
    n, c, h, w = x.shape
    layout = _LAYOUT_NHWC if nhwc else _LAYOUT_NCHW
    # Biases are read as plain vectors by both kernels; small, so made contiguous here
    # rather than rejecting views.
    b1, b3, b5 = (t.contiguous() for t in (b1, b3, b5))
    if x.device.type == "cpu":
        # The CPU kernel packs OIHW weights itself: any other strides (channels_last) become OIHW.
        w1, w3, w5 = (t.contiguous() for t in (w1, w3, w5))
        ptrs = [t.data_ptr() for t in (x, out, w1, b1, w3, b3, w5, b5)]
        _C.msconv_cpu(*ptrs, n, c, h, w, c1, c3, c5, layout, bool(relu), torch.get_num_threads())
    else:
        name = _KERNEL_NAMES.get(kernel)
        kind = pack_kind(name)
        if wp is None:  # a caller without a cached pack (FusedMultiScaleConv keeps one) packs per call
            wp = make_pack(kind, w1, b1, w3, b3, w5, b5)
        check_packed_weights(wp, x, c1, c3, c5, kind)
        if name in BUFFERED_KERNELS:
            if ws is None or counters is None:
                ws, counters = kernel_buffers(name, x, c1, c3, c5)
            else:
                check_kernel_buffers(name, ws, counters, x, c1, c3, c5)
        # The CUDA kernels read only wp (and the biases); w1/w3/w5 pass for the argument checks.
        ptrs = [t.data_ptr() for t in (x, out, w1, b1, w3, b3, w5, b5)]
        stream = torch.cuda.current_stream(x.device).cuda_stream
        _C.msconv_cuda(*ptrs, n, c, h, w, c1, c3, c5, layout, bool(relu), _CUDA_DTYPES[x.dtype], stream,
                       wp.data_ptr(), kernel, ws.data_ptr() if ws is not None else 0,
                       counters.data_ptr() if counters is not None else 0)
    return out


@_fused_ms_conv_op.register_fake
def _(x, w1, b1, w3, b3, w5, b5, relu, wp=None, kernel=0, ws=None, counters=None):
    c1, c3, c5, nhwc = check_ms_conv_inputs(x, w1, b1, w3, b3, w5, b5)
    return _empty_output(x, c1 + c3 + c5, nhwc)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:7])
    ctx.relu = inputs[7]


def _backward(ctx, grad):
    # Gradients through the reference definition (recomputed): the fused
    # kernel is for inference, but a merged model stays fine-tunable (e.g.
    # quantization-aware training) when it runs the op.
    inputs = ctx.saved_tensors
    with torch.enable_grad():
        _, vjp = torch.func.vjp(lambda *a: fused_ms_conv_reference(*a, relu=ctx.relu), *inputs)
        grads = vjp(grad)
    # relu, wp (a packed copy of the weights, and biases: their gradients cover it), kernel, ws, counters
    return (*grads, None, None, None, None, None)


_fused_ms_conv_op.register_autograd(_backward, setup_context=_setup_context)


class CpuPackedMsConv:
    """float32 CPU weights of one fused layer, packed once by the C++ kernel.

    At batch 1 re-packing the weights costs as much as the convolution, so a
    module whose weights do not change between calls keeps one of these.
    ``algo``: "direct" (tap by tap, float32 rounding ~1e-7), "winograd"
    (F(4x4, 5x5) with one input transform shared by the three branches, ~3x
    fewer multiplies, rounding ~1e-5 of the output's magnitude) or "auto"
    (default: Winograd where it is predicted faster, see ``algorithm_for``).
    ``is_current`` says whether it still matches the given tensors: it holds
    references to them (so their memory cannot be reused by other tensors),
    their in-place version counters (bumped by load_state_dict, ``copy_``,
    most optimizers) and the process's optimizer step count (fused optimizers
    update in place without bumping versions).  Writes through ``.data``
    bypass both: re-merge or call ``load_state_dict`` instead.
    """

    ALGORITHMS = {"auto": 0, "direct": 1, "winograd": 2}

    def __init__(self, w1, b1, w3, b3, w5, b5, algo: str = "auto"):
        if algo not in self.ALGORITHMS:
            raise ValueError(f"fused_ms_conv: unknown CPU algorithm {algo!r}; choose from {', '.join(self.ALGORITHMS)}")
        self.algo = algo
        self.c1, self.c3, self.c5 = (int(w.shape[0]) for w in (w1, w3, w5))
        self.c = int(w1.shape[1])
        self._tensors = (w1, b1, w3, b3, w5, b5)
        self._weights_nhwc = weights_nhwc(w3, w5)  # see io_nhwc
        self._versions = tuple(tensor_version(t) for t in self._tensors)
        self._steps = watch_optimizer_steps()
        ws = [t.detach().contiguous() for t in self._tensors]
        self._packed = _C.CpuPackedWeights(*(t.data_ptr() for t in ws), self.c, self.c1, self.c3, self.c5,
                                           torch.get_num_threads(), self.ALGORITHMS[algo])

    def algorithm_for(self, n: int, h: int, w: int) -> str:
        """'direct' or 'winograd': what a call on an n x c x h x w input runs ('auto' decides by shape)."""
        return self._packed.algorithm_for(n, h, w)

    def is_current(self, *tensors) -> bool:
        return all(a is b for a, b in zip(tensors, self._tensors)) and \
            all(tensor_version(t) == v for t, v in zip(tensors, self._versions)) and self._steps == _optimizer_steps

    def __call__(self, x: torch.Tensor, relu: bool = True) -> torch.Tensor:
        n, c, h, w = x.shape
        if c != self.c or x.dtype != torch.float32 or x.device.type != "cpu":
            raise ValueError(f"fused_ms_conv: packed CPU weights need float32 CPU input with {self.c} channels, "
                             f"got {x.dtype} on {x.device} with {c}")
        if n == 0 or h == 0 or w == 0:
            raise ValueError(f"fused_ms_conv: x is empty, shape {tuple(x.shape)}")
        if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            raise ValueError("fused_ms_conv: x must be contiguous (NCHW) or channels_last (NHWC)")
        nhwc = io_nhwc(x, self._weights_nhwc)
        out = _empty_output(x, self.c1 + self.c3 + self.c5, nhwc)
        self._packed.run(x.data_ptr(), out.data_ptr(), n, c, h, w, self.c1, self.c3, self.c5,
                         _LAYOUT_NHWC if nhwc else _LAYOUT_NCHW, bool(relu), torch.get_num_threads())
        return out


@functools.lru_cache(maxsize=None)
def _built(flag: str) -> bool:
    return bool(_C.build_info().get(flag))


def kernel_unsupported(x: torch.Tensor, w1, b1, w3, b3, w5, b5, kernel: str) -> str:
    """Why one of fer_edge's CUDA kernels (dispatch.KERNELS) cannot run this layer
    on x ("" when it can).  "stem": at most 4 input channels.  "mma" and the
    CUTLASS kernels (IGEMM_KERNELS): float16 (mma: float32 too), channels_last,
    channel counts that are multiples of 8, 16-byte aligned data (the compiled
    extension's own rule; the output and the pack are fresh allocations, always
    aligned), a build with the kernel, a GPU it runs on.  The others take every
    layer."""
    if kernel not in KERNEL_CODES:
        raise ValueError(f"kernel_unsupported: unknown CUDA kernel {kernel!r}; choose {', '.join(KERNEL_CODES)}")
    if kernel == "stem":
        return "" if x.shape[1] <= 4 else "it takes at most 4 input channels"
    if kernel not in IGEMM_KERNELS:
        return ""
    cc = torch.cuda.get_device_capability(x.device) if x.device.type == "cuda" else None
    if kernel.startswith("cutlass90"):
        if not _built("cutlass_sm90"):
            return f"this build has no {kernel} kernel (no CUTLASS headers, or no sm_90 in its architectures)"
        if cc is not None and cc != (9, 0):
            return "it runs on compute capability 9.0 only (sm_90a: wgmma, TMA)"
    elif kernel in CUTLASS_KERNELS and not _built("cutlass"):
        return f"this build has no {kernel} kernel (CUTLASS's headers were not found when it was compiled)"
    elif cc is not None and cc < (8, 0):
        return "it needs compute capability 8.0+ (mma.sync, cp.async)"
    nhwc = io_nhwc(x, weights_nhwc(w3, w5))
    # The pointers the op passes (biases made contiguous).  A traced tensor (torch.compile)
    # has none: its alignment is the compiled extension's to check when it runs.
    traced = torch.compiler.is_compiling() or type(x) is not torch.Tensor
    ptrs = [0] * 6 if traced else [x.data_ptr(), 0, 0, *(b.contiguous().data_ptr() for b in (b1, b3, b5))]
    sizes = (x.shape[1], w1.shape[0], w3.shape[0], w5.shape[0], _LAYOUT_NHWC if nhwc else _LAYOUT_NCHW,
             _CUDA_DTYPES.get(x.dtype, -1), ptrs)
    if kernel == "mma":
        return _C.mma_unsupported(*sizes)
    return _C.igemm_unsupported(*sizes, KERNEL_PACKS[kernel] == "window")


def cuda_kernel_code(kernel: str) -> int:
    """The compiled extension's number for one of fer_edge's CUDA kernels."""
    if kernel not in KERNEL_CODES:
        raise ValueError(f"fused_ms_conv: unknown CUDA kernel {kernel!r}; choose {', '.join(KERNEL_CODES)}")
    return KERNEL_CODES[kernel]


def fused_ms_conv(x, w1, b1, w3, b3, w5, b5, relu: bool = True, wp=None, kernel: str | None = None,
                  buffers=None) -> torch.Tensor:
    """Fused 1x1/3x3/5x5 convolution + bias (+ ReLU) + concat, in one kernel.

    x: (N, C, H, W), contiguous NCHW or channels_last; float32 on the CPU,
    float32 or float16 (float32 accumulation) on CUDA.  w1/w3/w5: (c_k, C, k, k);
    b1/b3/b5: (c_k,).  Returns (N, c1 + c3 + c5, H, W) in the layout of x.
    wp: optional ``make_pack(pack_kind(kernel), w1, b1, w3, b3, w5, b5)``
    (``pack_ms_weights(w1, w3, w5)`` for most kernels), kept by callers whose
    weights do not change so a CUDA call does not re-pack them (the CPU
    kernel does not use it: see CpuPackedMsConv).
    kernel: on CUDA, which of fer_edge's kernels: "simt", "wmma" (float16,
    tensor cores), "splitk" (small batches), "mma" (small batches on tensor
    cores: float16, or float32 as 3xTF32, channels_last, sm_80+, see
    ``kernel_unsupported``; its ``wp`` is ``pack_krsc_weights``'s), "cutlass" (large batches: one implicit GEMM per
    branch, the same inputs and pack), "cutlass90" (the same on Hopper's wgmma and TMA,
    compute capability 9.0), "cutlass_window" and "cutlass90_window" (those
    two as one launch over the zero-padded 5x5 window; their ``wp`` is
    ``pack_window_weights``'s, and the biases they add are the ones packed
    in it, not b1/b3/b5) or "stem" (inputs of at most 4 channels);
    None = fer_edge.dispatch.direct_kernel()
    (simt unless FER_EDGE_CUDA_KERNEL names another).  buffers: kernel_buffers(kernel, x, c1, c3, c5)
    (splitk_buffers, mma_buffers or cutlass_buffers), kept by callers that run one shape
    repeatedly (else allocated per call).
    """
    c1, c3, c5, _ = check_ms_conv_inputs(x, w1, b1, w3, b3, w5, b5)
    if kernel is None and x.device.type == "cuda":
        kernel = direct_kernel()
    if wp is not None:
        check_packed_weights(wp, x, c1, c3, c5, pack_kind(kernel))
    code = 0 if kernel is None else cuda_kernel_code(kernel)   # the CPU kernel ignores it
    ws, counters = buffers if buffers is not None else (None, None)
    return torch.ops.fer_edge.fused_ms_conv(x, w1, b1, w3, b3, w5, b5, bool(relu), wp, code, ws, counters)
