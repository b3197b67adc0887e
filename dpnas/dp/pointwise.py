"""1x1 convolutions as matrix products on the CPU, while dpnas's per-sample path runs a model's backward pass.

During :meth:`dpnas.dp.per_sample.PerSampleClipper.backward` no parameter requires a gradient: the weight
gradients are formed from the captured inputs and output gradients instead. A convolution there needs only
its input's gradient. For a 1x1, stride-1, unpadded convolution (a DenseNet / SmoothNet transition, which
every quickstart point has), oneDNN reorders the NCHW input into 16-channel blocks and back on each call, forward
and backward (``ONEDNN_VERBOSE=1`` shows the reorders). One matrix product per sample, ``W @ x_n``, and
``W^T @ g_n`` for the input's gradient, is the same arithmetic without them: dpnas's forward and backward of the
quickstart's points up to 2.2 ms (16 %) faster on 2 CPU cores, of its throughput grid's 1.8-2.5 ms, SmoothNet's
at batch 32 1 % (benchmarks/step_breakdown.py --stock-pointwise; RESULTS.md, issue 17's ninth pass). The values are
the convolution's to float32 rounding (the sums run in another order).

Elsewhere the convolution stays. With a weight that requires a gradient (a non-private step, Opacus's hooks) the
weight gradient as a batched product summed over the batch was slower than oneDNN's (benchmarks/pointwise_conv.py).
Without any gradient the product alone was faster in isolation, but the quickstart points' evaluation passes were
not (-6 to +14 %, in one process, in turn). On CUDA cuDNN's kernels take NCHW as it is (not measured here).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class _PointwiseProduct(torch.autograd.Function):
    """``conv2d(x, weight)`` for a 1x1, stride-1, unpadded `weight` as one product per sample; the gradient
    flows to `x` only (the caller guarantees that `weight` needs none)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        n, c, h, w = x.shape
        return torch.matmul(weight.view(-1, c), x.view(n, c, h * w)).view(n, -1, h, w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (weight,) = ctx.saved_tensors
        n, o, h, w = grad.shape
        # reshape: the gradient arrives channels-last behind dpnas's smoothing max pool
        return torch.matmul(weight.view(o, -1).t(), grad.reshape(n, o, h * w)).view(n, -1, h, w), None


def pointwise_geometry(conv: nn.Conv2d) -> bool:
    """A 1x1, stride-1, unpadded convolution (numeric padding): its patches are its input, each output position one
    input position."""
    return (*conv.kernel_size, *conv.stride, *conv.padding) == (1, 1, 1, 1, 0, 0)


def is_pointwise(conv: nn.Module) -> bool:
    """A plain convolution of :func:`pointwise_geometry`, ungrouped, zero-padded (a weight-standardised one keeps its
    own forward)."""
    return (type(conv) is nn.Conv2d and conv.groups == 1 and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str) and pointwise_geometry(conv))


def _takes_product(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether this call only needs the input's gradient, in float32 NCHW on the CPU."""
    return (x.device.type == "cpu" and x.requires_grad and torch.is_grad_enabled()
            and not conv.weight.requires_grad and x.dtype == conv.weight.dtype == torch.float32
            and x.is_contiguous() and not torch.is_autocast_enabled("cpu"))


def _forward(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    if not _takes_product(conv, x):
        return nn.Conv2d.forward(conv, x)
    y = _PointwiseProduct.apply(x, conv.weight)
    return y if conv.bias is None else y + conv.bias.view(1, -1, 1, 1)


@contextlib.contextmanager
def pointwise_as_products(convs: list[nn.Conv2d]) -> Iterator[None]:
    """Within the block, each of `convs` (see :func:`is_pointwise`) runs as products where only its input's
    gradient is needed (see the module's docstring); the modules, their hooks and their weights are untouched."""
    for conv in convs:
        conv.forward = _forward.__get__(conv)  # an instance attribute: nn.Module.__call__ runs it, hooks and all
    try:
        yield
    finally:
        for conv in convs:
            del conv.forward
