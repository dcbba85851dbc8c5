"""Which memory layout a 4-D tensor is in, and which one a fused layer writes.

torch only, no compiled code: the plain (cuDNN) path of the merged layers
uses these rules as the kernels do, in builds without the kernels too.
"""
from __future__ import annotations

import torch


def is_nhwc(x: torch.Tensor) -> bool:
    """Whether x is laid out channels_last (NHWC) rather than NCHW.

    For C == 1 (or H == W == 1) both contiguity checks hold; the strides then
    say which format the tensor was made in, as torch's own convolutions do.
    """
    if not x.is_contiguous(memory_format=torch.channels_last):
        return False
    if not x.is_contiguous():
        return True
    return x.stride(1) == 1 and x.stride(3) == x.shape[1]


def weights_nhwc(w3: torch.Tensor, w5: torch.Tensor) -> bool:
    """Whether the 3x3/5x5 weights are channels_last (the 1x1's strides can be
    the same in both layouts, so they say nothing)."""
    return is_nhwc(w3) or is_nhwc(w5)


def io_nhwc(x: torch.Tensor, weights_nhwc: bool) -> bool:
    """The layout the kernel reads x in and writes the output in.

    An input that is both contiguous and channels_last (one channel, as at
    the stem, or 1x1 maps) is the same memory either way; like torch's own
    convolutions it then takes the layout of the weights, so a channels_last
    model stays channels_last after its one-channel stem instead of turning
    every later layer NCHW.
    """
    if is_nhwc(x):
        return True
    return weights_nhwc and x.is_contiguous(memory_format=torch.channels_last)
