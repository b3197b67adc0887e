"""Layer factories: every component of the search space is chosen here, by name.

One table per component.  BatchNorm is deliberately absent: it mixes samples within a
batch, so a model that uses it has no per-sample gradient and no DP guarantee.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dpnas.arch.space import ACTIVATIONS, ArchConfig, ConfigError


class TemperedSigmoid(nn.Module):
    """``scale * sigmoid(temperature * x) - offset`` (Papernot et al. 2021); defaults equal tanh."""

    def __init__(self, scale: float = 2.0, temperature: float = 2.0, offset: float = 1.0) -> None:
        super().__init__()
        self.scale, self.temperature, self.offset = scale, temperature, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.sigmoid(self.temperature * x) - self.offset

    def extra_repr(self) -> str:
        return f"scale={self.scale}, temperature={self.temperature}, offset={self.offset}"


class WSConv2d(nn.Conv2d):
    """Weight-standardised convolution (Qiao et al. 2019; used by De et al. 2022).

    Each output filter is standardised to zero mean and unit variance before use, so the
    update noise of DP-SGD cannot change a filter's scale.  Opacus has no dedicated grad
    sampler for it and computes its per-sample gradients with torch.func, which is exact.
    """

    eps = 1e-5

    def standardized_weight(self) -> torch.Tensor:
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return (w - mean) * torch.rsqrt(var + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)


class ChannelPad(nn.Module):
    """Identity shortcut that matches a wider output by appending zero channels."""

    def __init__(self, extra_channels: int) -> None:
        super().__init__()
        self.extra_channels = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))


_ACTIVATIONS: dict[str, Callable[[ArchConfig], nn.Module]] = {
    "relu": lambda a: nn.ReLU(),
    "leaky_relu": lambda a: nn.LeakyReLU(0.01),
    "elu": lambda a: nn.ELU(),
    "selu": lambda a: nn.SELU(),
    "gelu": lambda a: nn.GELU(),
    "silu": lambda a: nn.SiLU(),
    "mish": lambda a: nn.Mish(),
    "tanh": lambda a: nn.Tanh(),
    "tempered_sigmoid": lambda a: TemperedSigmoid(a.ts_scale, a.ts_temperature, a.ts_offset),
}
assert set(_ACTIVATIONS) == set(ACTIVATIONS), "the activation table and ArchConfig disagree"


def _lookup(table: dict, component: str, name: str):
    try:
        return table[name]
    except KeyError:
        raise ConfigError(
            f"unknown {component} {name!r}; expected one of: {', '.join(table)}"
        ) from None


def make_activation(arch: ArchConfig) -> nn.Module:
    # No in-place activations: Opacus's hooks read the layer inputs after the forward pass.
    return _lookup(_ACTIVATIONS, "activation", arch.activation)(arch)


def make_norm(arch: ArchConfig, channels: int) -> nn.Module:
    """The configured normalisation over `channels`; every kind is a GroupNorm (per-sample)."""
    groups = arch.norm_groups(channels)
    if groups == 0:
        return nn.Identity()
    return nn.GroupNorm(groups, channels, affine=True)


class SmoothingMaxPool(nn.MaxPool2d):
    """``nn.MaxPool2d(3, stride=1, padding=1)``, computed in channels-last layout on the CPU.

    PyTorch's NCHW CPU kernel for this pool is slow: forward + backward in NHWC, conversions included, is 1.5-2x
    faster from 32 channels up, and a whole non-private step of the quickstart's points 1.3-1.4x
    (benchmarks/pool_smoothing.py); from 8 channels (one AVX2 vector) NHWC is 1.2-1.6x faster at batch 256, below
    8 NCHW is faster (0.5-0.9x) and is kept.  The NHWC kernel takes the same maximum over the same window, and its
    gradient goes to the same element, so values and gradients are bit-identical (tests/test_smoothing_pool.py);
    the result comes back in the input's own layout.  CUDA keeps the default kernel, fast in either layout.

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
        y = F.max_pool2d(x.contiguous(memory_format=torch.channels_last), 3, stride=1, padding=1)
        return y.contiguous()


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


_SMOOTHING_POOLS: dict[str, Callable[[], nn.Module]] = {
    "max_smooth": SmoothingMaxPool,
    "avg_smooth": lambda: nn.AvgPool2d(3, stride=1, padding=1),
    "none": nn.Identity,
}


def make_smoothing_pool(arch: ArchConfig) -> nn.Module:
    """3x3 stride-1 pooling after a block's conv; smooths activations without downsampling."""
    return _lookup(_SMOOTHING_POOLS, "pool", arch.pool)()


_DOWNSAMPLING_POOLS: dict[str, Callable[[], nn.Module]] = {
    "avg": lambda: nn.AvgPool2d(2, stride=2),
    "max": lambda: nn.MaxPool2d(2, stride=2),
    # a strided conv downsamples by itself; the pool slot stays empty
    "conv": nn.Identity,
}


def make_downsampling_pool(arch: ArchConfig) -> nn.Module:
    return _lookup(_DOWNSAMPLING_POOLS, "downsample", arch.downsample)()


def downsampling_stride(arch: ArchConfig) -> int:
    return 2 if arch.downsample == "conv" else 1


_HEAD_POOLS: dict[str, Callable[[int], nn.Module]] = {
    "avg": nn.AdaptiveAvgPool2d,
    "max": nn.AdaptiveMaxPool2d,
}


def make_head_pool(arch: ArchConfig) -> nn.Module:
    return _lookup(_HEAD_POOLS, "head_pool", arch.head_pool)(arch.head_pool_size)


def make_conv(
    arch: ArchConfig, c_in: int, c_out: int, *, kernel_size: int = 3, stride: int = 1
) -> nn.Conv2d:
    conv_type = WSConv2d if arch.weight_std else nn.Conv2d
    return conv_type(
        c_in, c_out, kernel_size, stride=stride, padding=kernel_size // 2, bias=arch.conv_bias
    )


def initialise(model: nn.Module, arch: ArchConfig) -> None:
    """Initialise every conv and linear weight as `arch.init` says (biases start at zero)."""
    if arch.init == "default":
        return
    for module in model.modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        if arch.init == "selu_xavier":
            # SmoothNet's benchmark runs: Xavier-uniform with SELU's gain, whatever the activation.
            nn.init.xavier_uniform_(module.weight, gain=nn.init.calculate_gain("selu"))
        elif arch.init == "xavier":
            nn.init.xavier_uniform_(module.weight, gain=_activation_gain(arch.activation))
        elif arch.init == "kaiming":
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        else:  # pragma: no cover - ArchConfig refuses other names
            raise ConfigError(f"unknown init {arch.init!r}")
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _activation_gain(activation: str) -> float:
    known = {"relu", "leaky_relu", "selu", "tanh"}
    return nn.init.calculate_gain(activation) if activation in known else 1.0
