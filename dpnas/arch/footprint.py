"""How big a config's model is, without allocating it: parameters, activations per sample, output shape.

The model is built on PyTorch's ``meta`` device (modules and shapes, no storage), so its parameter count is
exact whatever the width.  Activations are counted by walking the module tree with shapes alone, not by a
meta-device forward pass: the meta kernels of convolutions and GroupNorm load PyTorch's Python decompositions on
first use, which takes seconds, and a memory check that runs before every ``dpnas train`` must not.  The walk
knows every module the builder makes and refuses any other, so a new layer type cannot be miscounted silently
(tests compare it with the hooks of a real forward pass).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from dpnas.arch.layers import ChannelPad, TemperedSigmoid
from dpnas.arch.models import DenseBlock, DPNASNet, LastChannels, PlainBlock, ResidualBlock, build_model
from dpnas.arch.space import ArchConfig, ConfigError

# Modules whose output has their input's shape.
_ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, TemperedSigmoid,
                nn.GroupNorm)


@dataclass(frozen=True)
class Footprint:
    params: int
    """Trainable parameters (exact)."""
    activations: int
    """Floats one sample's forward pass produces: the input and every layer's output (what autograd keeps for the
    backward pass, roughly; a lower bound of it)."""
    output_shape: tuple[int, ...]
    """One sample's output (num_classes,)."""


def meta_model(arch: ArchConfig, *, num_classes: int, in_channels: int, image_size: int | None = None) -> DPNASNet:
    """The model of `arch` with shapes but no storage (refusing what build_model refuses); its weights are not
    initialised as `arch.init` says (the meta kernel of normal_ takes seconds to load, and a meta tensor has no
    values to initialise)."""
    try:
        with torch.device("meta"):
            return build_model(arch.replace(init="default"), num_classes=num_classes, in_channels=in_channels,
                               image_size=image_size)
    except (RuntimeError, TypeError) as err:  # a tensor size past 64 bits: torch's own words are a C++ trace
        if "overflow" not in str(err).lower():
            raise
        raise ConfigError(f"a layer's size overflows 64 bits (stage widths {list(arch.stage_widths)}, stem_channels "
                          f"{arch.stem_channels}, head_pool_size {arch.head_pool_size}); use smaller values") from None


def norm_channels(arch: ArchConfig) -> frozenset[int]:
    """The channel counts of the normalisation layers `arch` builds (or would, with a norm) for 1- and 3-channel
    inputs (every dataset's): where a group count acts, whatever the norm."""
    # only the topology decides them: one cached build serves every norm, activation and pool of a structure
    return _norm_channels(arch.replace(norm="instance", groups=1, activation="selu", pool="none",
                                       init="default", conv_bias=False, weight_std=False))


@functools.lru_cache(maxsize=1024)
def _norm_channels(arch: ArchConfig) -> frozenset[int]:
    return frozenset(module.num_channels for in_channels in (1, 3)
                     for module in meta_model(arch, num_classes=10, in_channels=in_channels).modules()
                     if isinstance(module, nn.GroupNorm))


def footprint(arch: ArchConfig, *, num_classes: int, in_channels: int, image_size: int) -> Footprint:
    model = meta_model(arch, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    shape, activations = _walk(model, (in_channels, image_size, image_size))
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Footprint(params=params, activations=in_channels * image_size**2 + activations, output_shape=shape)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _window(shape: tuple[int, ...], channels: int, kernel, stride, padding) -> tuple[int, ...]:
    (kh, kw), (sh, sw), (ph, pw) = _pair(kernel), _pair(stride), _pair(padding)
    h, w = shape[-2:]
    return channels, (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1


def _walk(module: nn.Module, shape: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    """(output shape, floats produced inside) of `module` on one sample of `shape` (no batch dimension)."""
    if isinstance(module, nn.Identity):
        return shape, 0
    if isinstance(module, nn.Sequential):
        total = 0
        for child in module:
            shape, inside = _walk(child, shape)
            total += inside
        return shape, total
    if isinstance(module, DPNASNet):
        shape, a = _walk(module.features, shape)
        shape, b = _walk(module.head, shape)
        return shape, a + b
    if isinstance(module, PlainBlock):
        return _walk(module.body, shape)
    if isinstance(module, ResidualBlock):
        out, body = _walk(module.body, shape)
        _, shortcut = _walk(module.shortcut, shape)
        _, norm = _walk(module.scalenorm, out)
        _, act = _walk(module.act, out)
        return out, body + shortcut + _numel(out) + norm + act  # the sum is a tensor too
    if isinstance(module, DenseBlock):
        grown, body = _walk(module.body, shape)
        out = (shape[0] + grown[0], *shape[1:])
        _, norm = _walk(module.scalenorm, out)
        return out, body + _numel(out) + norm  # the concatenation is a new tensor
    out = _leaf_shape(module, shape)
    return out, _numel(out)


def _leaf_shape(module: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...]:
    if isinstance(module, nn.Conv2d):  # WSConv2d too
        return _window(shape, module.out_channels, module.kernel_size, module.stride, module.padding)
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        if getattr(module, "ceil_mode", False) or getattr(module, "dilation", 1) not in (1, (1, 1)):
            raise TypeError(f"footprint: no shape rule for {module!r}")
        return _window(shape, shape[0], module.kernel_size, module.stride, module.padding)
    if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        return (shape[0], *_pair(module.output_size))
    if isinstance(module, _ELEMENTWISE):
        return shape
    if isinstance(module, nn.Flatten):
        return (_numel(shape),)
    if isinstance(module, nn.Linear):
        return (*shape[:-1], module.out_features)
    if isinstance(module, ChannelPad):
        return (shape[0] + module.extra_channels, *shape[1:])
    if isinstance(module, LastChannels):
        return (module.n, *shape[1:])
    raise TypeError(f"footprint: no shape rule for {type(module).__name__}; add one with the layer")
