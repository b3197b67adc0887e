"""A preflight: one DP-SGD step of a configuration on random data of the dataset's shape, before anything real.

A search whose every trial would fail (an unusable device, an engine flag combination the model cannot take,
a model too big for the memory) should fail once, in a second, with one line, instead of trial after trial,
some of them after training fully and spending their ε. The preflight builds the model, the optimiser and the
DP-SGD engine exactly as :func:`dpnas.dp.train.train` does, and takes one private step on one physical chunk of
random images: no record of the user's data is read and no privacy is spent (its accountant is thrown away).
"""

from __future__ import annotations

import torch

from dpnas.arch.models import build_model
from dpnas.arch.space import ArchConfig, ConfigError
from dpnas.data.augment import random_crop_flip
from dpnas.data.datasets import normalise
from dpnas.dp.config import PrivacyConfig, TrainConfig
from dpnas.dp.engine import DPSGDEngine
from dpnas.dp.privacy import PrivacyPlan, make_accountant
from dpnas.dp.train import check_device


def preflight(arch: ArchConfig, train_cfg: TrainConfig, privacy: PrivacyConfig, *, num_classes: int,
              in_channels: int, image_size: int, device: str | torch.device | None) -> None:
    """Raise ConfigError (one line) if this configuration cannot take a DP-SGD step on this device."""
    target = check_device(device)
    batch = train_cfg.physical_batch_size
    try:
        model = build_model(arch, num_classes=num_classes, in_channels=in_channels, image_size=image_size).to(target)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.0)  # lr 0: the throwaway model is never used
        plan = PrivacyPlan(sample_rate=0.5, steps=1, noise_multiplier=1.0 if privacy.private else 0.0,
                           expected_batch_size=batch, dataset_size=2 * batch)
        engine = DPSGDEngine(model, optimizer, plan=plan, max_grad_norm=privacy.max_grad_norm,
                             private=privacy.private, accountant=make_accountant(privacy),
                             physical_batch_size=batch, aug_multiplicity=train_cfg.aug_multiplicity,
                             noise_generator=torch.Generator(target).manual_seed(0), autocast=train_cfg.amp,
                             channels_last=train_cfg.channels_last, per_sample=train_cfg.per_sample)
        generator = torch.Generator(target).manual_seed(0)
        images = torch.randint(0, 256, (batch, in_channels, image_size, image_size), dtype=torch.uint8,
                               device=target, generator=generator)
        labels = torch.randint(0, num_classes, (batch,), device=target, generator=generator)
        augment = (lambda x: random_crop_flip(x, generator=generator)) if train_cfg.augment else None
        loss = engine.step(normalise(images, (0.5,) * in_channels, (0.25,) * in_channels), labels, augment=augment)
        if not torch.isfinite(loss):
            raise ConfigError(f"the loss of one step on random data is {float(loss)}")
    except ConfigError as err:
        raise ConfigError(f"preflight (one DP-SGD step on random {in_channels}x{image_size}x{image_size} images, "
                          f"batch {batch}, on {target}; no data read, no epsilon spent): {err}") from err
    except (RuntimeError, MemoryError) as err:  # out of memory, a kernel the device lacks, a shape mismatch
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"preflight (one DP-SGD step on random {in_channels}x{image_size}x{image_size} images, "
                          f"batch {batch}, on {target}; no data read, no epsilon spent) failed: "
                          f"{type(err).__name__}: {message}") from err
    finally:
        if target.type == "cuda":
            torch.cuda.empty_cache()
