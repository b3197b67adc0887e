"""Data augmentation on the device, vectorised over the batch (no per-sample Python work)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop_flip(images: torch.Tensor, *, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crop after zero-padding by `padding` pixels, and a random horizontal flip (CIFAR standard)."""
    b, c, h, w = images.shape
    if b == 0:
        return images
    device = images.device
    padded = F.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=device)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=device)
    rows = (dy[:, None] + torch.arange(h, device=device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=device))[:, None, None, :]
    batch = torch.arange(b, device=device)[:, None, None, None]
    channel = torch.arange(c, device=device)[None, :, None, None]
    cropped = padded[batch, channel, rows, cols]
    flip = torch.rand(b, generator=generator, device=device) < 0.5
    return torch.where(flip[:, None, None, None], cropped.flip(3), cropped)
