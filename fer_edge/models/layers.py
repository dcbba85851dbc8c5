"""Building blocks: train-time forms and the deploy forms they merge into."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fer_edge import reparam
from fer_edge.layout import io_nhwc, weights_nhwc


class ConvAct(nn.Module):
    """Deploy form of ConvBNAct: one convolution with bias, then ReLU (or nothing).

    A plain 3x3 convolution + ReLU is the fused layer's single-branch case
    (c1 = c5 = 0): with use_kernel, on CUDA, it runs fer_edge's kernel where
    the measured dispatch table says one beats cuDNN for its shape (through a
    FusedMultiScaleConv over the same parameters, kept out of the state dict);
    everywhere else, and for any other convolution, the convolution itself.
    ``cuda_kernel`` forces a choice, as FusedMultiScaleConv's does.
    """

    def __init__(self, conv: nn.Conv2d, act: bool = True, use_kernel: bool = True):
        super().__init__()
        self.conv = conv
        self.act = nn.ReLU(inplace=True) if act else nn.Identity()
        self.use_kernel = use_kernel
        self.cuda_kernel: str | None = None
        self._fused = None  # (key of the parameters it was made from, FusedMultiScaleConv)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fused"] = None  # a cache over this module's own parameters: never copied
        return state

    def _load_from_state_dict(self, *args, **kwargs):
        self._fused = None  # new weights (inference tensors have no version counter to say so)
        return super()._load_from_state_dict(*args, **kwargs)

    def _single_branch(self) -> bool:
        c = self.conv
        return (isinstance(self.act, nn.ReLU) and c.kernel_size == (3, 3) and c.stride == (1, 1)
                and c.padding == (1, 1) and c.dilation == (1, 1) and c.groups == 1 and c.bias is not None
                and c.padding_mode == "zeros")

    def _fused_layer(self):
        """The FusedMultiScaleConv computing this layer (c1 = c5 = 0), remade when
        the parameters are replaced or changed (.to(), .half(), load_state_dict)."""
        from fer_edge.kernels import tensor_version

        w, b = self.conv.weight, self.conv.bias
        key = (id(w), id(b), w.data_ptr(), b.data_ptr(), w.dtype, w.device, tensor_version(w), tensor_version(b))
        if self._fused is None or self._fused[0] != key:
            cin = w.shape[1]
            fused = FusedMultiScaleConv(w.new_empty((0, cin, 1, 1)), b.new_empty(0), w, b,
                                        w.new_empty((0, cin, 5, 5)), b.new_empty(0))
            self._fused = (key, fused)
        fused = self._fused[1]
        fused.cuda_kernel = self.cuda_kernel
        return fused

    def forward(self, x):
        # Under torch.compile the convolution is what gets compiled (no module is made while tracing).
        if (self.use_kernel and x.device.type == "cuda" and self._single_branch()
                and not torch.compiler.is_compiling()):
            fused = self._fused_layer()
            if fused._kernel_for(x) is not None:
                return fused(x)
        return self.act(self.conv(x))


class ConvBNAct(nn.Module):
    """Conv (no bias) + BatchNorm + ReLU; merges into ConvAct."""

    def __init__(self, cin, cout, kernel_size=3, stride=1, padding=None, dilation=1, act=True, bn_eps=1e-5):
        super().__init__()
        if padding is None:
            padding = dilation * (kernel_size // 2)
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, padding, dilation, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=bn_eps)
        self.act = nn.ReLU(inplace=True) if act else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))

    def merged(self, use_kernel: bool = True) -> ConvAct:
        return ConvAct(reparam.fold_conv_bn(self.conv, self.bn), act=isinstance(self.act, nn.ReLU),
                       use_kernel=use_kernel)


class ACBlock(nn.Module):
    """ACNet's asymmetric convolution block (MACNN Fig. 5, Eq. 11-12).

    Parallel d x d, d x 1 and 1 x d convolutions, each followed by BatchNorm,
    summed.  The thin kernels get padding (d//2, 0) and (0, d//2) so that all
    three outputs are aligned with the square one (same size, same centre);
    after training they add into the centre column and row of the square kernel.
    """

    def __init__(self, cin, cout, d):
        super().__init__()
        if d % 2 != 1 or d < 3:
            raise ValueError(f"ACBlock needs an odd kernel size >= 3, got {d}")
        self.d = d
        p = d // 2
        self.square = nn.Conv2d(cin, cout, (d, d), padding=(p, p), bias=False)
        self.square_bn = nn.BatchNorm2d(cout)
        self.ver = nn.Conv2d(cin, cout, (d, 1), padding=(p, 0), bias=False)
        self.ver_bn = nn.BatchNorm2d(cout)
        self.hor = nn.Conv2d(cin, cout, (1, d), padding=(0, p), bias=False)
        self.hor_bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.square_bn(self.square(x)) + self.ver_bn(self.ver(x)) + self.hor_bn(self.hor(x))

    def merged_kernel(self):
        """(kernel d x d, bias) equal to this block in eval mode."""
        return reparam.acblock_kernel(
            self.square.weight, self.square_bn, self.ver.weight, self.ver_bn, self.hor.weight, self.hor_bn
        )


# The channel split of an MAConv between its 1x1, 3x3 and 5x5 branches: our
# choice (the MACNN paper gives no split).
DEFAULT_SPLIT = (0.25, 0.375, 0.375)


def split_channels(cout: int, split=DEFAULT_SPLIT) -> tuple[int, int, int]:
    """Output channels of the 1x1, 3x3 and 5x5 branches (default 1/4 : 3/8 : 3/8)."""
    if len(split) != 3 or min(split) <= 0:
        raise ValueError(f"split must be three positive fractions, got {split}")
    total = sum(split)
    c1 = max(1, round(cout * split[0] / total))
    c3 = max(1, round(cout * split[1] / total))
    c5 = cout - c1 - c3
    if c5 < 1:
        raise ValueError(f"{cout} channels cannot be split {split}")
    return c1, c3, c5


class MAConv(nn.Module):
    """Multi-scale asymmetric convolution (MACNN Fig. 4, Eq. 1-10), train form.

    branch 1: 1x1 conv + BN + ReLU; branch 2: ACBlock(3) + ReLU;
    branch 3: ACBlock(5) + ReLU; outputs concatenated (c1 | c3 | c5).
    Merges into FusedMultiScaleConv: three square kernels with bias.
    """

    def __init__(self, cin, cout, split=DEFAULT_SPLIT):
        super().__init__()
        self.c1, self.c3, self.c5 = split_channels(cout, split)
        self.branch1 = nn.Conv2d(cin, self.c1, 1, bias=False)
        self.branch1_bn = nn.BatchNorm2d(self.c1)
        self.branch3 = ACBlock(cin, self.c3, 3)
        self.branch5 = ACBlock(cin, self.c5, 5)

    def forward(self, x):
        return torch.cat(
            [F.relu(self.branch1_bn(self.branch1(x))), F.relu(self.branch3(x)), F.relu(self.branch5(x))], dim=1
        )

    def merged_kernels(self):
        """(w1, b1, w3, b3, w5, b5): the three square kernels of the deploy form."""
        w1, b1 = reparam.fuse_bn(self.branch1.weight, self.branch1_bn)
        w3, b3 = self.branch3.merged_kernel()
        w5, b5 = self.branch5.merged_kernel()
        return w1, b1, w3, b3, w5, b5

    def merged(self, use_kernel: bool = True) -> "FusedMultiScaleConv":
        return FusedMultiScaleConv(*(t.detach().clone() for t in self.merged_kernels()), use_kernel=use_kernel)


class FusedMultiScaleConv(nn.Module):
    """Deploy form of MAConv: relu(conv1x1+b1) | relu(conv3x3+b3) | relu(conv5x5+b5).

    use_kernel=True runs fer_edge's fused kernel (one pass) on the CPU, and on
    CUDA where the measured dispatch table (fer_edge/dispatch.py) says one of
    our kernels beats cuDNN for this shape, dtype and batch; elsewhere, and
    with use_kernel=False, three plain convolutions + cat, which every
    exporter and runtime understands.  ``cuda_kernel`` (None: the table)
    names the choice for every call instead: "cudnn" or a name in fer_edge.dispatch.KERNELS.
    The split-K kernels' scratch buffers are kept per input shape: run one
    module on one CUDA stream at a time (another stream: a copy of the model).
    """

    def __init__(self, w1, b1, w3, b3, w5, b5, use_kernel: bool = True):
        super().__init__()
        for name, t in zip(("w1", "b1", "w3", "b3", "w5", "b5"), (w1, b1, w3, b3, w5, b5)):
            self.register_parameter(name, nn.Parameter(t))
        self.use_kernel = use_kernel
        self.cuda_kernel: str | None = None
        self._cpu_pack = None  # CpuPackedMsConv, built on first CPU inference
        self._splitk = {}  # (input shape, device, kind) -> a kernel's buffers (see _kernel_buffers)
        self._choices = {}  # (device, shape, dtype) -> the dispatch table's answer (see _kernel_for)
        self._wp_keys = {}  # pack kind -> what its buffer was made from (see _cuda_packed)

    def __getstate__(self):
        # The packed copy is a cache of compiled-extension memory: never copied
        # or pickled (deepcopy in merge(), torch.save), rebuilt on demand.
        state = self.__dict__.copy()
        state["_cpu_pack"] = None
        state["_splitk"] = {}
        state["_choices"] = {}
        state["_wp_keys"] = {}  # a copy's weights start new version counters: its packs are remade
        return state

    @property
    def channels(self):
        return self.w1.shape[0], self.w3.shape[0], self.w5.shape[0]

    @staticmethod
    def _takes(kernel: str, x, ws) -> bool:
        """Whether a kernel picked by shape can run this very input
        (kernels.kernel_unsupported).  The table keys shapes, so a view may
        still be misaligned for a CUTLASS or mma kernel, and the override names
        one kernel for every layer, the stem one for a first layer only.  Under
        torch.compile the extension checks when it runs (nothing is read here)
        but for the stem's channel count."""
        if kernel == "cpu" or (torch.compiler.is_compiling() and kernel != "stem"):
            return True
        from fer_edge.kernels import kernel_unsupported

        return not kernel_unsupported(x, *ws, kernel=kernel)

    def _kernel_for(self, x) -> str | None:
        """Which compiled kernel this call runs: "cpu", a CUDA kernel's name,
        or None for the plain path.  The kernels cover float32 (CPU, CUDA)
        and float16 (CUDA); anything else (bf16, other devices) runs plain."""
        if x.device.type == "cpu":
            return "cpu" if x.dtype == torch.float32 else None
        if x.device.type != "cuda" or x.dtype not in (torch.float32, torch.float16):
            return None
        choice = self.cuda_kernel
        if choice is None:
            key = (x.device, tuple(x.shape), x.dtype)
            choice = self._choices.get(key)
            if choice is None:
                choice = self._choices[key] = self._table_choice(x)
        return None if choice == "cudnn" else choice

    def _table_choice(self, x) -> str:
        """The dispatch table's choice for this input (looked up once per shape: see _kernel_for)."""
        from fer_edge.dispatch import choice_for

        c1, c3, c5 = self.channels
        n, c, h, w = x.shape
        return choice_for(torch.cuda.get_device_capability(x.device), c, c1, c3, c5, n, h, w,
                          "fp16" if x.dtype == torch.float16 else "fp32")

    def _kernel_buffers(self, x, kernel: str):
        """A kernel's buffers for this input shape (the small-batch kernels'
        workspace and counters, the cutlass kernel's split-K semaphores), made
        once (outside any CUDA graph capture) and kept; None lets the op
        allocate per call (under torch.compile tracing, or in a capture)."""
        from fer_edge.kernels import BUFFERED_KERNELS, kernel_buffers

        kind = BUFFERED_KERNELS[kernel]
        key = (tuple(x.shape), x.device, kind)
        if key not in self._splitk:
            if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
                return None

            self._splitk[key] = kernel_buffers(kind, x, *self.channels)
        return self._splitk[key]

    @staticmethod
    def _use_cpu_pack(x, ws) -> bool:
        # Plain eager CPU inference only: under torch.compile/export (fake or
        # proxy tensors) or when gradients are needed, the custom op runs.
        return (
            type(x) is torch.Tensor
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in ws)))
        )

    # The non-persistent buffer holding each weight layout (fer_edge.kernels.PACKS).
    _PACK_BUFFERS = {"tap": "_wp", "krsc": "_wp_krsc", "window": "_wp_window"}

    def _cuda_packed(self, x, kernel: str | None = None):
        """The weights packed for a CUDA kernel (kernels.pack_kind: "krsc" or
        "window" for the CUTLASS ones, "tap" for the others), kept as a non-persistent buffer
        (``_wp``, ``_wp_krsc``, ``_wp_window``: ``.half()``/``.to()`` convert it with the weights
        and it is never saved) and refreshed in place when they change (in-place
        version counters, optimizer steps), so that its address stays valid for
        CUDA graphs captured earlier.  A captured graph reads the pack as of its
        last refresh: after changing weights, run the module once eagerly
        before replaying.  None (the op packs per call) under torch.compile
        tracing, under autocast (weights cast per call), and while a CUDA
        graph is being captured with no current pack (never allocate in a capture)."""
        if (x.device.type != "cuda" or type(x) is not torch.Tensor or torch.compiler.is_compiling()
                or self.w1.dtype != x.dtype):
            return None
        from fer_edge.kernels import WITH_BIASES, make_pack, pack_kind, tensor_version, watch_optimizer_steps

        kind = pack_kind(kernel)
        name = self._PACK_BUFFERS[kind]
        params = (self.w1, self.b1, self.w3, self.b3, self.w5, self.b5)
        packed = params if kind in WITH_BIASES else params[::2]   # what this pack is made of
        # Which tensors (a parameter replaced by another of the same shape), their in-place
        # versions, and the optimizer steps taken (fused optimizers bump no version).
        key = (tuple((p.data_ptr(), tensor_version(p)) for p in packed), watch_optimizer_steps())
        pack = self._buffers.get(name)
        same = pack is not None and pack.device == x.device and pack.dtype == x.dtype
        if same and self._wp_keys.get(kind) == key:
            return pack
        if torch.cuda.is_current_stream_capturing():
            return None
        with torch.no_grad():
            fresh = make_pack(kind, *(p.detach() for p in params))
            if same and pack.shape == fresh.shape:
                pack.copy_(fresh)
            else:
                self.register_buffer(name, fresh, persistent=False)
        self._wp_keys[kind] = key
        return self._buffers[name]

    def _load_from_state_dict(self, *args, **kwargs):
        # New weights: both packs are stale.  Version counters would say so too,
        # except for inference tensors (made under torch.inference_mode), which have none.
        self._cpu_pack = None
        self._wp_keys = {}
        return super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        # The CPU pack holds references to the old weights: drop it when they move or change dtype.
        self._cpu_pack = None
        return super()._apply(fn, recurse)

    def forward(self, x):
        ws = (self.w1, self.b1, self.w3, self.b3, self.w5, self.b5)
        if ws[0].dtype != x.dtype:  # autocast / half inputs: compute in the input's dtype
            ws = tuple(t.to(x.dtype) for t in ws)
        w1, b1, w3, b3, w5, b5 = ws
        kernel = self._kernel_for(x) if self.use_kernel else None
        if kernel is not None and self.cuda_kernel is None and not self._takes(kernel, x, ws):
            kernel = None  # the table's (or the override's) choice cannot run this input: cuDNN
        if kernel is not None:
            # The kernels read NCHW or NHWC; any other strides become NCHW.
            if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
                x = x.contiguous()
            if self._use_cpu_pack(x, ws):
                from fer_edge.kernels import CpuPackedMsConv

                if self._cpu_pack is None or not self._cpu_pack.is_current(*ws):
                    self._cpu_pack = CpuPackedMsConv(*ws)
                return self._cpu_pack(x)
            from fer_edge.kernels import BUFFERED_KERNELS, fused_ms_conv

            buffers = self._kernel_buffers(x, kernel) if kernel in BUFFERED_KERNELS else None
            return fused_ms_conv(x, *ws, wp=self._cuda_packed(x, kernel), kernel=None if kernel == "cpu" else kernel,
                                 buffers=buffers)
        # An empty branch (the single-branch case, c1 = c5 = 0) is left out: PyTorch's
        # convolutions refuse one.
        parts = [F.relu(F.conv2d(x, w, b, padding=w.shape[-1] // 2))
                 for w, b in ((w1, b1), (w3, b3), (w5, b5)) if w.shape[0] > 0]
        if len(parts) == 1:
            return parts[0]
        # torch.cat gives NCHW when its parts' layouts differ, as a one-channel input's 1x1
        # branch (NCHW) and its 3x3/5x5 ones (channels_last) do at a channels_last model's
        # stem: keep the layout the kernels would write, so later layers stay channels_last
        # (only that small part is copied).
        if io_nhwc(x, weights_nhwc(w3, w5)):
            parts = [p.contiguous(memory_format=torch.channels_last) for p in parts]
        return torch.cat(parts, dim=1)

    def extra_repr(self):
        c1, c3, c5 = self.channels
        return f"{self.w1.shape[1]}, c1={c1}, c3={c3}, c5={c5}, use_kernel={self.use_kernel}"
