"""Named architectures: the papers' networks as points of the search space.

Each entry is only an ArchConfig, built by the same :func:`dpnas.arch.models.build_model` as
every search trial, so a reference network and a searched one differ only in their data.
"""

from __future__ import annotations

from dataclasses import dataclass

from dpnas.arch.space import ArchConfig, ConfigError


@dataclass(frozen=True)
class NamedArch:
    name: str
    arch: ArchConfig
    source: str
    """Where the architecture comes from, and the parameter count it must have (10 classes)."""


_SMOOTHNET = ArchConfig()  # the defaults are SmoothNet W80D50

_RESNET9 = ArchConfig(
    norm="group",
    groups=32,
    activation="mish",
    pool="none",
    downsample="max",
    skip="residual",
    stages=3,
    width=16.0,
    depth=1.0,
    width_bases=(8, 16, 16),  # 128, 256, 256 channels
    depth_bases=(1, 0, 1),  # res1 after conv2, none after conv3, res2 after conv4
    block_convs=2,
    stem_channels=64,
    transition="conv",
    head="linear",
    head_pool="max",
    head_pool_size=2,
    init="default",
)

_WRN16_4 = ArchConfig(
    norm="group",
    groups=16,
    activation="relu",
    pool="none",
    downsample="conv",
    skip="residual",
    stages=3,
    width=8.0,  # 16 * k channels with k = 4: 64, 128, 256
    depth=2.0,  # (16 - 4) / 6 blocks per stage
    block_convs=2,
    preact=True,
    stem_channels=16,
    transition="block",
    shortcut="conv",
    head="linear",
    head_pool="avg",
    head_pool_size=1,
    weight_std=True,
    init="kaiming",
)

MODELS: dict[str, NamedArch] = {
    entry.name: entry
    for entry in (
        NamedArch("smoothnet", _SMOOTHNET, "SmoothNet W80D50 (Remerscheid et al. 2022); 3,391,853 params"),
        NamedArch("smoothnet_w80d10", _SMOOTHNET.replace(depth=1.0), "SmoothNet W80D10; about 601 K params"),
        NamedArch("smoothnet_w80d80", _SMOOTHNET.replace(depth=8.0), "SmoothNet W80D80; about 8.2 M params"),
        NamedArch("resnet9", _RESNET9, "ResNet-9, GroupNorm(32) + Mish (Klause et al. 2022); 2,447,946 params"),
        NamedArch(
            "resnet9_scalenorm",
            _RESNET9.replace(scalenorm="after_add"),
            "ResNet-9 with ScaleNorm after each residual addition; 2,448,714 params",
        ),
        NamedArch(
            "wrn16_4",
            _WRN16_4,
            "WRN-16-4, pre-activation, GroupNorm(16), weight-standardised convs (De et al. 2022)",
        ),
        NamedArch(
            "tiny",
            ArchConfig(width=1.0, depth=1.0, head_hidden=(32,)),
            "a 2-stage SmoothNet-style network for quick CPU runs and tests",
        ),
    )
}


def get_arch(name: str) -> ArchConfig:
    try:
        return MODELS[name].arch
    except KeyError:
        raise ConfigError(
            f"unknown architecture {name!r}; expected one of: {', '.join(MODELS)} "
            "(or the path of a .json/.toml ArchConfig file)"
        ) from None
