"""Build any point of the search space into an Opacus-compatible PyTorch model.

One builder serves every architecture: SmoothNet, ResNet-9 (with or without ScaleNorm)
and De et al.'s WRN are all ArchConfig points (see :mod:`dpnas.arch.registry`).  The builder
never sees an Optuna trial; it only reads the config.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from dpnas.arch.layers import (
    ChannelPad,
    downsampling_stride,
    initialise,
    make_activation,
    make_conv,
    make_downsampling_pool,
    make_head_pool,
    make_norm,
    make_smoothing_pool,
)
from dpnas.arch.pools import HalvingAvgPool
from dpnas.arch.space import ArchConfig, ConfigError


def conv_unit(
    arch: ArchConfig,
    c_in: int,
    c_out: int,
    *,
    stride: int = 1,
    kernel_size: int = 3,
    smoothing: bool = True,
    activation: bool = True,
) -> nn.Sequential:
    """conv -> smoothing pool -> norm -> act, or act -> norm -> conv -> smoothing pool when preact."""
    conv = make_conv(arch, c_in, c_out, kernel_size=kernel_size, stride=stride)
    pool = make_smoothing_pool(arch) if smoothing else nn.Identity()
    if arch.preact:
        parts = [("act", make_activation(arch)), ("norm", make_norm(arch, c_in)), ("conv", conv), ("pool", pool)]
    else:
        parts = [("conv", conv), ("pool", pool), ("norm", make_norm(arch, c_out))]
        if activation:
            parts.append(("act", make_activation(arch)))
    return nn.Sequential(OrderedDict((name, m) for name, m in parts if not isinstance(m, nn.Identity)))


class PlainBlock(nn.Module):
    """`block_convs` conv units, no skip connection."""

    def __init__(self, arch: ArchConfig, c_in: int, c_out: int, *, stride: int = 1) -> None:
        super().__init__()
        self.body = _body(arch, c_in, c_out, stride=stride)
        self.out_channels = c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class ResidualBlock(nn.Module):
    """body(x) + shortcut(x), with ScaleNorm after the addition when configured."""

    def __init__(self, arch: ArchConfig, c_in: int, c_out: int, *, stride: int = 1) -> None:
        super().__init__()
        # torchvision style: the block's last activation comes after the addition (and the norm).
        act_after_add = arch.scalenorm == "before_act"
        self.body = _body(arch, c_in, c_out, stride=stride, last_activation=not act_after_add)
        self.shortcut = _shortcut(arch, c_in, c_out, stride=stride)
        self.scalenorm = make_norm(arch, c_out) if arch.scalenorm != "none" else nn.Identity()
        self.act = make_activation(arch) if act_after_add else nn.Identity()
        self.out_channels = c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.scalenorm(self.body(x) + self.shortcut(x)))


class DenseBlock(nn.Module):
    """cat(x, body(x)): the new features are appended, so a stage's last block is x[:, -growth:]."""

    def __init__(self, arch: ArchConfig, c_in: int, growth: int) -> None:
        super().__init__()
        self.body = _body(arch, c_in, growth)
        self.out_channels = c_in + growth
        self.scalenorm = (
            make_norm(arch, self.out_channels) if arch.scalenorm == "after_add" else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scalenorm(torch.cat((x, self.body(x)), dim=1))


class LastChannels(nn.Module):
    """Keep the last `n` channels: in a dense stage, the output of its last block only."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, -self.n :]

    def extra_repr(self) -> str:
        return f"n={self.n}"


def _body(
    arch: ArchConfig, c_in: int, c_out: int, *, stride: int = 1, last_activation: bool = True
) -> nn.Sequential:
    units = []
    for i in range(arch.block_convs):
        last = i == arch.block_convs - 1
        units.append(
            conv_unit(
                arch,
                c_in if i == 0 else c_out,
                c_out,
                stride=stride if i == 0 else 1,
                activation=last_activation or not last,
            )
        )
    return nn.Sequential(*units)


def _shortcut(arch: ArchConfig, c_in: int, c_out: int, *, stride: int) -> nn.Module:
    if c_in == c_out and stride == 1:
        return nn.Identity()
    if arch.shortcut == "conv":
        return make_conv(arch, c_in, c_out, kernel_size=1, stride=stride)
    if c_out < c_in:
        raise ConfigError(
            f"shortcut: zero-padding cannot map {c_in} to {c_out} channels; use shortcut='conv'"
        )
    layers: list[nn.Module] = []
    if stride > 1:
        layers.append(HalvingAvgPool() if stride == 2 else nn.AvgPool2d(stride, stride))
    if c_out > c_in:
        layers.append(ChannelPad(c_out - c_in))
    return nn.Sequential(*layers)


def _transition(arch: ArchConfig, c_in: int, width: int) -> tuple[nn.Sequential, int]:
    stride = downsampling_stride(arch)
    if arch.transition == "compress":
        # DenseNet/SmoothNet: a 1x1 conv halves the channels, with no norm or activation.
        c_out = max(1, c_in // 2)
        layers = [("conv", make_conv(arch, c_in, c_out, kernel_size=1, stride=stride))]
    else:
        c_out = width
        layers = list(conv_unit(arch, c_in, c_out, stride=stride, smoothing=False).named_children())
    pool = make_downsampling_pool(arch)
    if not isinstance(pool, nn.Identity):
        layers.append(("downsample", pool))
    return nn.Sequential(OrderedDict(layers)), c_out


class DPNASNet(nn.Module):
    """features (stem, stages, transitions) followed by a head; `arch` is the config it was built from."""

    def __init__(self, arch: ArchConfig, *, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.arch = arch
        features: list[tuple[str, nn.Module]] = []
        c = in_channels
        if arch.stem_channels:
            stem = make_conv(arch, c, arch.stem_channels)
            if not arch.preact:
                stem = nn.Sequential(
                    OrderedDict(conv=stem, norm=make_norm(arch, arch.stem_channels), act=make_activation(arch))
                )
            features.append(("stem", stem))
            c = arch.stem_channels
        for s, (width, depth) in enumerate(zip(arch.stage_widths, arch.stage_depths)):
            first_stride = 1
            if arch.transition == "block":
                first_stride = downsampling_stride(arch) if s > 0 else 1
            elif s > 0 or arch.stem_channels:
                transition, c = _transition(arch, c, width)
                features.append((f"transition{s}", transition))
            blocks = []
            for i in range(depth):
                block = _block(arch, c, width, stride=first_stride if i == 0 else 1)
                blocks.append(block)
                c = block.out_channels
            if blocks:
                features.append((f"stage{s}", nn.Sequential(*blocks)))
        if arch.preact:
            # pre-activation blocks leave their output un-normalised; finish it before the head
            features.append(("final", nn.Sequential(OrderedDict(act=make_activation(arch), norm=make_norm(arch, c)))))
        self.features = nn.Sequential(OrderedDict(features))
        self.head = _head(arch, c, num_classes)
        self.feature_channels = c
        initialise(self, arch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _block(arch: ArchConfig, c_in: int, width: int, *, stride: int) -> nn.Module:
    if arch.skip == "dense":
        return DenseBlock(arch, c_in, width)
    if arch.skip == "residual":
        return ResidualBlock(arch, c_in, width, stride=stride)
    return PlainBlock(arch, c_in, width, stride=stride)


def _head(arch: ArchConfig, c: int, num_classes: int) -> nn.Sequential:
    layers: list[tuple[str, nn.Module]] = []
    if arch.head == "mlp":
        # SmoothNet's head: one more 2x downsampling, then only the last dense block's features.
        layers.append(("downsample", HalvingAvgPool()))
        last_width = arch.stage_widths[-1]
        if arch.skip == "dense" and arch.stage_depths[-1] > 0 and last_width < c:
            layers.append(("last_block", LastChannels(last_width)))
            c = last_width
    layers += [("pool", make_head_pool(arch)), ("flatten", nn.Flatten())]
    features = c * arch.head_pool_size**2
    if arch.head == "mlp":
        for i, hidden in enumerate(arch.head_hidden):
            layers += [(f"fc{i + 1}", nn.Linear(features, hidden)), (f"act{i + 1}", make_activation(arch))]
            features = hidden
        layers.append((f"fc{len(arch.head_hidden) + 1}", nn.Linear(features, num_classes)))
    else:
        layers.append(("fc", nn.Linear(features, num_classes)))
    return nn.Sequential(OrderedDict(layers))


def downsamplings(arch: ArchConfig) -> int:
    """How many times the network halves the resolution before its adaptive head pool."""
    stages = arch.stages
    if arch.transition == "block":
        count = stages - 1
    else:
        count = stages - 1 + (1 if arch.stem_channels else 0)
    return count + (1 if arch.head == "mlp" else 0)


def build_model(
    arch: ArchConfig, *, num_classes: int, in_channels: int = 3, image_size: int | None = None
) -> DPNASNet:
    """Build `arch` for `num_classes` outputs; with `image_size`, refuse inputs it would shrink to nothing."""
    if not isinstance(arch, ArchConfig):
        raise TypeError(f"build_model expects an ArchConfig, got {type(arch).__name__}")
    if num_classes < 1:
        raise ConfigError(f"num_classes: must be >= 1, got {num_classes}")
    if in_channels < 1:
        raise ConfigError(f"in_channels: must be >= 1, got {in_channels}")
    if image_size is not None:
        check_image_size(arch, image_size)
    return DPNASNet(arch, num_classes=num_classes, in_channels=in_channels)


def check_image_size(arch: ArchConfig, image_size: int) -> None:
    """Refuse (ConfigError) an input that `arch`'s downsamplings would shrink below one pixel."""
    halvings = downsamplings(arch)
    if image_size < 2**halvings:
        raise ConfigError(
            f"image_size: {image_size}px is too small for {halvings} downsamplings "
            f"(needs at least {2**halvings}px); use fewer stages or larger images"
        )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
