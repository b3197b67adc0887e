"""The papers' training recipes as presets (REFERENCE §5), and field overrides across configs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from dpnas.arch.space import ArchConfig, ConfigError, parse_assignment
from dpnas.dp.config import PrivacyConfig, TrainConfig


@dataclass(frozen=True)
class Recipe:
    name: str
    train: TrainConfig
    privacy: PrivacyConfig
    description: str


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            "quick",
            # Poisson batches of mean 256 (sd 14-16) exceed 256 in about half the steps, and each such step took a
            # second pass of ~11 rows: 1.03-1.14x a step on the digits points (benchmarks/poisson_chunks.py). At
            # 320 (4 sd) every batch is one pass; on the CPU this recipe is for, 320 rows are no memory concern.
            TrainConfig(epochs=40, batch_size=256, physical_batch_size=320, optimizer="nadam", lr=2e-3,
                        schedule="constant", val_fraction=0.2),
            PrivacyConfig(epsilon=8.0, delta=1e-5, max_grad_norm=1.0),
            "a short run for small data on CPU (digits in a minute or two)",
        ),
        Recipe(
            "smoothnet",
            TrainConfig(epochs=90, batch_size=256, physical_batch_size=64, optimizer="sgd", lr=2e-3,
                        momentum=0.9, weight_decay=2e-4, schedule="step", step_size=5, gamma=0.9,
                        val_fraction=0.2),
            PrivacyConfig(epsilon=7.0, delta=1e-5, max_grad_norm=6.83),
            "SmoothNet (Remerscheid et al. 2022): SGD 2e-3, StepLR(5, 0.9), B=256, C=6.83, eps=7",
        ),
        Recipe(
            "resnet9-scalenorm",
            TrainConfig(epochs=25, batch_size=1024, physical_batch_size=256, optimizer="nadam", lr=1e-3,
                        momentum=0.0, schedule="plateau", plateau_factor=0.5, plateau_patience=3,
                        val_fraction=0.1),
            PrivacyConfig(epsilon=8.0, delta=1e-5, max_grad_norm=1.5),
            "ResNet-9 ScaleNorm (Klause et al. 2022): NAdam 1e-3, ReduceLROnPlateau(0.5, 3), B=1024, C=1.5, eps=8",
        ),
        Recipe(
            "de-wrn",
            TrainConfig(epochs=90, batch_size=4096, physical_batch_size=256, optimizer="sgd", lr=4.0,
                        momentum=0.0, weight_decay=0.0, schedule="cosine", augment=True,
                        aug_multiplicity=16, ema_decay=0.9999, val_fraction=0.1),
            PrivacyConfig(epsilon=8.0, delta=1e-5, max_grad_norm=1.0),
            "De et al. 2022: SGD lr 4, B=4096, augmentation multiplicity 16, EMA 0.9999, C=1, eps=8",
        ),
    )
}

DEFAULT_RECIPE = "quick"

_ARCH_FIELDS = {f.name for f in dataclasses.fields(ArchConfig)}
_TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
_PRIVACY_FIELDS = {f.name for f in dataclasses.fields(PrivacyConfig)}
assert not (_ARCH_FIELDS & _TRAIN_FIELDS or _ARCH_FIELDS & _PRIVACY_FIELDS or _TRAIN_FIELDS & _PRIVACY_FIELDS), (
    "config field names must be unique across ArchConfig, TrainConfig and PrivacyConfig"
)


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ConfigError(f"unknown recipe {name!r}; expected one of: {', '.join(RECIPES)}") from None


def split_overrides(assignments: list[str]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Route ``field=value`` strings to ArchConfig, TrainConfig or PrivacyConfig by field name."""
    arch, train, privacy = {}, {}, {}
    for text in assignments:
        name, value = parse_assignment(text, fields=_ARCH_FIELDS | _TRAIN_FIELDS | _PRIVACY_FIELDS)
        target = arch if name in _ARCH_FIELDS else train if name in _TRAIN_FIELDS else privacy
        target[name] = value
    return arch, train, privacy
