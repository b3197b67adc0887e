"""Will a training run fit in memory?  Estimated from shapes before any data is loaded or model built.

The estimate is a lower bound of what DP-SGD holds at once, so a run it refuses could not have run:

* the dataset's uint8 images, which training keeps on the device (:func:`dpnas.data.datasets.dataset_bytes`);
* the weights, their summed gradient, the optimiser's state (SGD momentum: one copy, Adam and NAdam: two) and the
  EMA copy, in float32;
* one physical chunk's activations (``min(physical_batch_size, batch_size) x aug_multiplicity`` samples, every
  layer's output, :mod:`dpnas.arch.footprint`), which autograd keeps for the backward pass; 2 bytes each under
  bf16 autocast.

Per-sample gradients, kernel workspaces and the allocator's slack come on top, so a run just under the limit may
still run out of memory; one far over it (``--image-size 100000``, ``depth=1e3`` at full width) is refused in
one line instead of after minutes of loading.  The limit is this machine's physical memory on CPU and the free
memory of the GPU (``torch.cuda.mem_get_info``) on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dpnas.arch.footprint import footprint
from dpnas.arch.space import ArchConfig, ConfigError
from dpnas.data.datasets import (
    DATASET_CHANNELS,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_SYNTHETIC_SIZE,
    NUM_CLASSES,
    dataset_bytes,
    dataset_key,
    format_bytes,
    host_memory_bytes,
)
from dpnas.dp.config import TrainConfig

_FLOAT = 4


@dataclass(frozen=True)
class MemoryEstimate:
    params: int
    activations_per_sample: int
    dataset_bytes: int
    model_bytes: int
    """Weights, gradient, optimiser state and EMA copy."""
    activation_bytes: int
    """One physical chunk's activations."""

    @property
    def total(self) -> int:
        return self.dataset_bytes + self.model_bytes + self.activation_bytes


def estimate_training_memory(arch: ArchConfig, train_cfg: TrainConfig, *, num_classes: int, in_channels: int,
                             image_size: int, dataset_bytes: int = 0) -> MemoryEstimate:
    size = footprint(arch, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    optimiser_copies = {"sgd": 1 if train_cfg.momentum else 0, "adam": 2, "nadam": 2}[train_cfg.optimizer]
    copies = 2 + optimiser_copies + (1 if train_cfg.ema_decay else 0)  # weights and gradient, then the rest
    chunk = min(train_cfg.physical_batch_size, train_cfg.batch_size) * train_cfg.aug_multiplicity
    return MemoryEstimate(
        params=size.params,
        activations_per_sample=size.activations,
        dataset_bytes=dataset_bytes,
        model_bytes=copies * size.params * _FLOAT,
        activation_bytes=chunk * size.activations * (2 if train_cfg.amp else _FLOAT),
    )


def available_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what they are) that a run on `device` can use at most."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"{device} has {format_bytes(free)} free"
    return host_memory_bytes(), f"this machine has {format_bytes(host_memory_bytes())} of memory"


def check_training_fits(arch: ArchConfig, train_cfg: TrainConfig, *, dataset: str, image_size: int | None,
                        device: torch.device, synthetic_size: int = DEFAULT_SYNTHETIC_SIZE) -> MemoryEstimate:
    """Refuse (ConfigError) a run whose estimated memory exceeds what `device` has; return the estimate."""
    dataset = dataset_key(dataset)
    size = image_size or DEFAULT_IMAGE_SIZE[dataset]
    estimate = estimate_training_memory(
        arch, train_cfg, num_classes=NUM_CLASSES, in_channels=DATASET_CHANNELS[dataset], image_size=size,
        dataset_bytes=dataset_bytes(dataset, image_size=size, synthetic_size=synthetic_size))
    have, where = available_memory(device)
    if estimate.total > have:
        parts = (f"{format_bytes(estimate.dataset_bytes)} of {dataset} images at {size} px, "
                 f"{format_bytes(estimate.model_bytes)} for {estimate.params:,} parameters with their gradient and "
                 f"optimiser state, {format_bytes(estimate.activation_bytes)} of activations for a chunk of "
                 f"{min(train_cfg.physical_batch_size, train_cfg.batch_size) * train_cfg.aug_multiplicity} samples "
                 f"({estimate.activations_per_sample:,} floats each)")
        raise ConfigError(f"this run needs at least {format_bytes(estimate.total)} ({parts}), but {where}; use a "
                          "smaller image size, width, depth or physical_batch_size")
    return estimate
