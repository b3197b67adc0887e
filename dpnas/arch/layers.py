"""Layer factories: every component of the search space is chosen here, by name.

One table per component.  BatchNorm is deliberately absent: it mixes samples within a
batch, so a model that uses it has no per-sample gradient and no DP guarantee.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dpnas.arch.pools import HalvingAvgPool, HeadAvgPool, SmoothingAvgPool, SmoothingMaxPool
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


_SMOOTHING_POOLS: dict[str, Callable[[], nn.Module]] = {
    "max_smooth": SmoothingMaxPool,
    "avg_smooth": SmoothingAvgPool,
    "none": nn.Identity,
}


def make_smoothing_pool(arch: ArchConfig) -> nn.Module:
    """3x3 stride-1 pooling after a block's conv; smooths activations without downsampling."""
    return _lookup(_SMOOTHING_POOLS, "pool", arch.pool)()


_DOWNSAMPLING_POOLS: dict[str, Callable[[], nn.Module]] = {
    "avg": HalvingAvgPool,
    "max": lambda: nn.MaxPool2d(2, stride=2),
    # a strided conv downsamples by itself; the pool slot stays empty
    "conv": nn.Identity,
}


def make_downsampling_pool(arch: ArchConfig) -> nn.Module:
    return _lookup(_DOWNSAMPLING_POOLS, "downsample", arch.downsample)()


def downsampling_stride(arch: ArchConfig) -> int:
    return 2 if arch.downsample == "conv" else 1


_HEAD_POOLS: dict[str, Callable[[int], nn.Module]] = {
    "avg": HeadAvgPool,
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
