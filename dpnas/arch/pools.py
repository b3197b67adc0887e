"""Pooling layers with faster exact CPU formulations: the same values and gradients as PyTorch's modules.

A search trains hundreds of small networks whose steps are dominated by cheap per-pixel layers, and PyTorch's
NCHW CPU kernels for some pools are slow at those sizes.  Each class here subclasses the module it replaces
(so ``isinstance`` checks, ``repr`` and the state dict are unchanged) and takes a faster route only where it
gives the same bits: on the CPU, for fp32 / fp64 tensors in NCHW order; anything else (CUDA, channels-last,
other dtypes, odd sizes) runs PyTorch's kernel.  ``tests/test_pools.py`` and ``tests/test_smoothing_pool.py``
check values and gradients bit for bit against the kernels; ``benchmarks/pool_smoothing.py`` measures them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# The dtypes whose sums PyTorch's CPU average-pool kernels accumulate in the dtype itself: the order of the
# additions below is the kernels', so the rounding is too.  (bf16 / fp16 accumulate in fp32 and round once.)
_EXACT_DTYPES = (torch.float32, torch.float64)


def _plain_cpu(x: torch.Tensor) -> bool:
    """An fp32 / fp64 CPU tensor in NCHW order, contiguous or a view of one (a dense block's last channels, which
    the MLP head pools, are a channel slice): where the formulations below equal the kernels bit for bit, and
    their results come out contiguous, as the kernels' do."""
    strides = x.stride()
    return (x.device.type == "cpu" and x.dim() == 4 and x.dtype in _EXACT_DTYPES
            and all(a >= b for a, b in zip(strides, strides[1:])))


class SmoothingMaxPool(nn.MaxPool2d):
    """``nn.MaxPool2d(3, stride=1, padding=1)``, computed in channels-last layout on the CPU.

    PyTorch's NCHW CPU kernel for this pool is slow: forward + backward in NHWC, conversions included, is 1.5-2x
    faster from 32 channels up, and a whole non-private step of the quickstart's points 1.3-1.4x
    (benchmarks/pool_smoothing.py); from 8 channels (one AVX2 vector) NHWC is 1.2-1.6x faster at batch 256, below
    8 NCHW is faster (0.5-0.9x) and is kept.  The NHWC kernel takes the same maximum over the same window, and its
    gradient goes to the same element, so values and gradients are bit-identical (tests/test_smoothing_pool.py);
    the result comes back in the input's own layout.  CUDA keeps the default kernel, fast in either layout.
    For fp32 / fp64 the backward pass is a scatter of the gradient in NCHW (:class:`_ChannelsLastMax3x3`), which
    saves the two layout conversions of the gradient.

    Where no gradient is wanted (a validation or test pass) an NCHW pool is the maximum of shifted views instead:
    about 10x faster than the NCHW kernel below 8 channels, 2-4x faster than the NHWC one at 8-16 and 1.2x at 32
    (both kernels also compute the argmax indices that only a backward pass needs), with the same values: a
    maximum does not depend on the order it is taken in.  With a gradient, a backward pass through shifted views
    that sends it where the kernel would was 3-9x slower than the kernels, so training keeps them.
    """

    MIN_CHANNELS = 8

    def __init__(self) -> None:
        super().__init__(3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dim() != 4 or x.is_contiguous(memory_format=torch.channels_last):
            return super().forward(x)
        if not (torch.is_grad_enabled() and x.requires_grad):
            return shifted_max3(x)
        if x.shape[1] < self.MIN_CHANNELS:
            return super().forward(x)
        if x.dtype in _EXACT_DTYPES:
            return _ChannelsLastMax3x3.apply(x)
        y = F.max_pool2d(x.contiguous(memory_format=torch.channels_last), 3, stride=1, padding=1)
        return y.contiguous()


class _ChannelsLastMax3x3(torch.autograd.Function):
    """The 3 x 3 stride-1 max pool of an NCHW tensor by PyTorch's channels-last kernel, with an NCHW backward.

    The kernel's argmax indices are positions within each channel's plane (h * W + w), whatever the layout, and a
    channels-last index tensor views as N x C x (H W) without a copy.  Both of PyTorch's backward kernels add each
    output's gradient to its argmax in the outputs' scan order; ``scatter_add_`` along the plane on the CPU adds
    in the index order, which is that order, so the gradient is the same bits (tests/test_smoothing_pool.py), and
    it arrives in NCHW: the channels-last backward needed the gradient converted in and its result converted
    out.  Forward + backward 1.2-2.5x faster than converting both ways (benchmarks/pool_smoothing.py).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y, indices = torch.ops.aten.max_pool2d_with_indices(x.contiguous(memory_format=torch.channels_last),
                                                            [3, 3], [1, 1], [1, 1])
        ctx.save_for_backward(indices)
        return y.contiguous()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
        (indices,) = ctx.saved_tensors
        n, c, h, w = indices.shape
        grad_in = torch.zeros((n, c, h * w), dtype=grad_out.dtype, device=grad_out.device)
        grad_in.scatter_add_(2, indices.view(n, c, h * w), grad_out.contiguous().view(n, c, h * w))
        return grad_in.view(n, c, h, w)


def shifted_max3(x: torch.Tensor) -> torch.Tensor:
    """``max_pool2d(x, 3, stride=1, padding=1)`` of an N x C x H x W tensor as the maximum of its shifted views:
    along the rows, then the columns (the padding is -inf, as the pool's; NaN propagates, as in the pool)."""
    height, width = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), value=float("-inf"))
    # each direction's second maximum writes into the first one's fresh result: 1.2-1.6x faster a no-gradient
    # pool than a third tensor (benchmarks/pool_smoothing.py)
    rows = torch.maximum(padded[..., 0:width], padded[..., 1:width + 1])
    torch.maximum(rows, padded[..., 2:width + 2], out=rows)
    out = torch.maximum(rows[..., 0:height, :], rows[..., 1:height + 1, :])
    return torch.maximum(out, rows[..., 2:height + 2, :], out=out)


def _window_sums_3x3(x: torch.Tensor) -> torch.Tensor:
    """Each pixel's 3 x 3 window sum over a zero border, added in scan order to a zero, as PyTorch's kernels do.

    The kernels skip the border's pixels; adding them here adds +0.0 to a sum that is never -0.0 (it started
    from +0.0), which changes no bit.
    """
    height, width = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1))
    total = padded[..., 0:height, 0:width] + 0.0
    for dy, dx in [(dy, dx) for dy in range(3) for dx in range(3)][1:]:
        total += padded[..., dy:dy + height, dx:dx + width]
    return total


class _SmoothingMean3x3(torch.autograd.Function):
    """``F.avg_pool2d(x, 3, stride=1, padding=1)`` (the border counts: every window divides by 9) as nine
    shifted additions over the whole tensor, forward and backward.

    The kernel's forward adds each window's pixels in scan order, then divides by 9; its backward adds each
    output's ninth to its window's inputs, outputs in scan order, which for one input is the scan order of
    the shifted windows of the gradient: the same sums in the same order both ways.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return _window_sums_3x3(x).div_(9)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
        return _window_sums_3x3(grad_out / 9)


class SmoothingAvgPool(nn.AvgPool2d):
    """``nn.AvgPool2d(3, stride=1, padding=1)``, the average smoothing pool.

    PyTorch's NCHW CPU kernel walks each window separately; nine shifted additions over the whole tensor
    (:class:`_SmoothingMean3x3`) are 1.9-3.8x faster forward + backward at SmoothNet's and the quickstart's shapes
    (benchmarks/pool_smoothing.py), with the same bits.
    """

    def __init__(self) -> None:
        super().__init__(3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _plain_cpu(x):
            return _SmoothingMean3x3.apply(x)
        return super().forward(x)


class _WindowMean2x2(torch.autograd.Function):
    """``F.avg_pool2d(x, 2, stride=2)`` of an even-sized NCHW tensor as the sum of its four strided views.

    PyTorch's CPU kernel adds each window's elements to a zero in scan order and divides by 4; the same
    additions in the same order give the same bits.  Starting from zero only matters for the sign of a zero
    (0 + -0 = +0), hence the ``+ 0.0``.  Its backward gives each input a quarter of its window's gradient, added
    to a zero: the quarter is formed once per window and written to the four inputs by four strided copies
    (4x faster than the kernel at the quickstart's shapes; one copy from an expanded view was no faster than it).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.input_shape = x.shape
        window_sum = x[..., 0::2, 0::2] + x[..., 0::2, 1::2]
        window_sum += x[..., 1::2, 0::2]
        window_sum += x[..., 1::2, 1::2]
        return window_sum.add_(0.0).div_(4)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
        n, c, h, w = ctx.input_shape
        quarter = (grad_out / 4).add_(0.0)
        grad_in = torch.empty((n, c, h, w), dtype=grad_out.dtype, device=grad_out.device)
        for row in (0, 1):
            for column in (0, 1):
                grad_in[..., row::2, column::2] = quarter
        return grad_in


class HalvingAvgPool(nn.AvgPool2d):
    """``nn.AvgPool2d(2, stride=2)``: the downsampling between stages and before the head.

    On the CPU PyTorch's kernel walks each window separately; four strided additions over the whole tensor are
    2.1-2.6x faster forward and 2.0-2.1x forward + backward at the quickstart's shapes, 0.86x / 0.97x at
    SmoothNet W80D50's largest, where both are bound by memory (benchmarks/pool_smoothing.py), with the same bits
    (:class:`_WindowMean2x2`).
    """

    def __init__(self) -> None:
        super().__init__(2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _plain_cpu(x) and x.shape[-2] % 2 == 0 and x.shape[-1] % 2 == 0:
            return _WindowMean2x2.apply(x)
        return super().forward(x)


class _PlusZero(torch.autograd.Function):
    """``x + 0`` both ways: what an average pool over 1 x 1 windows computes, forward and backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x + 0.0

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
        return grad_out + 0.0


class HeadAvgPool(nn.AdaptiveAvgPool2d):
    """``nn.AdaptiveAvgPool2d(size)``, the head's pool to a fixed grid.

    Where the features already have that size (the quickstart's networks at 16 px reach the head at 4 x 4),
    every window is one pixel and the pool is an identity, which the kernel still computes window by window
    (0.6 ms forward and again backward at batch 256): here it is one addition of zero, the kernel's own
    arithmetic, so the bits are the same.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = self.output_size if isinstance(self.output_size, tuple) else (self.output_size,) * 2
        if _plain_cpu(x) and all(s is None or s == d for s, d in zip(size, x.shape[-2:])):
            return _PlusZero.apply(x)
        return super().forward(x)
