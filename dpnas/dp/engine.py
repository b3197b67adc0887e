"""One logical DP-SGD step over a Poisson batch, in physical chunks that fit in memory.

Built from Opacus's own parts: ``GradSampleModule`` computes per-sample gradients and
``DPOptimizer`` clips them, sums them, adds one Gaussian draw of std sigma * C per
logical batch and divides by the expected batch size; each noisy step is reported to the
accountant through the optimizer's step hook, as Opacus's PrivacyEngine does.  What dpnas
adds: the batch stays on the device (no DataLoader), empty Poisson batches still take a
noise-only step, and augmentation multiplicity averages each sample's K per-augmentation
gradients before clipping (De et al. 2022).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.accountants import IAccountant
from opacus.optimizers import DPOptimizer
from torch import nn

from dpnas.arch.compat import dp_problems
from dpnas.arch.space import ConfigError
from dpnas.dp.config import PER_SAMPLE_MODES
from dpnas.dp.host_memory import keep_freed_host_memory
from dpnas.dp.per_sample import PerSampleClipper, supports
from dpnas.dp.privacy import PrivacyPlan

Transform = Callable[[torch.Tensor], torch.Tensor]

# Opacus's hooks on the first layer fire for output gradients only (the images need none);
# PyTorch warns about that on every backward pass, which is expected here.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect to module outputs")


class DPSGDEngine:
    """Takes logical steps; ``private=False`` runs the same loop without clipping or noise."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        plan: PrivacyPlan,
        max_grad_norm: float,
        private: bool,
        accountant: IAccountant | None,
        physical_batch_size: int,
        aug_multiplicity: int = 1,
        noise_generator: torch.Generator | None = None,
        autocast: bool = False,
        channels_last: bool = False,
        per_sample: str = "auto",
        per_sample_method: str = "auto",
    ) -> None:
        keep_freed_host_memory()  # no page faults for the tensors every step allocates and frees again
        self.model = model
        self.plan = plan
        self.private = private
        self.physical_batch_size = physical_batch_size
        self.aug_multiplicity = aug_multiplicity
        self.autocast = autocast
        self.channels_last = channels_last
        if channels_last:
            # NHWC weights (and inputs, see _augmented): convolutions take their NHWC kernels, which are
            # the tensor-core ones on GPU; the per-sample arithmetic accepts either layout
            model.to(memory_format=torch.channels_last)
        if private:
            problems = dp_problems(model)
            if problems:
                raise ConfigError("Opacus cannot train this model privately:\n  " + "\n  ".join(problems))
            if per_sample not in PER_SAMPLE_MODES:
                raise ConfigError(f"per_sample: unknown value {per_sample!r}; expected one of: {', '.join(PER_SAMPLE_MODES)}")
            # dpnas's own path where it covers every layer; Opacus's hooks otherwise
            # per_sample_method fixes one convolution method (benchmarks and tests); "auto" times them per layer
            use_dpnas = per_sample != "opacus" and supports(model)
            self.clipper = PerSampleClipper(model, method=per_sample_method) if use_dpnas else None
            if per_sample == "dpnas" and self.clipper is None:
                raise ConfigError("per_sample: 'dpnas' does not cover every layer of this model; use 'auto' or 'opacus'")
            if channels_last and self.clipper is None:
                # Opacus's conv grad sampler builds patches with as_strided from NCHW strides: on NHWC tensors
                # its per-sample gradients are silently wrong (tests/test_precision.py shows it)
                raise ConfigError("channels_last: needs dpnas's per-sample path, and this model runs on Opacus's hooks")
            if autocast and self.clipper is None:
                # Opacus's hooks compute per-sample gradients and their norms in bf16 under autocast: a clipped
                # contribution can then exceed C (by 0.4 % in tests/test_precision.py); dpnas's path works in fp32
                raise ConfigError("amp: needs dpnas's per-sample path, and this model runs on Opacus's hooks")
            self.module: nn.Module = model if self.clipper else GradSampleModule(model, loss_reduction="mean")
            self.optimizer: torch.optim.Optimizer = DPOptimizer(
                optimizer,
                noise_multiplier=plan.noise_multiplier,
                max_grad_norm=max_grad_norm,
                expected_batch_size=plan.expected_batch_size,
                loss_reduction="mean",
                generator=noise_generator,
            )
            if accountant is not None:
                self.optimizer.attach_step_hook(
                    lambda _: accountant.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)
                )
        else:
            self.clipper = None
            self.module = model
            self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.base_optimizer = optimizer
        self._empty: list[torch.Tensor] | None = None

    @property
    def per_sample_path(self) -> str:
        """Which per-sample gradients this engine computes: dpnas, opacus, or none (non-private)."""
        if not self.private:
            return "none"
        return "dpnas" if self.clipper is not None else "opacus"

    def step(self, images: torch.Tensor, labels: torch.Tensor, *, augment: Transform | None = None) -> torch.Tensor:
        """One optimiser step on a whole logical batch; returns the summed training loss.

        The loss stays a device tensor, so a step never waits for the host.
        """
        if not all(m.training for m in self.module.modules()):  # 30 us; train() itself takes 120 us every step
            self.module.train()
        n = len(labels)
        total_loss = torch.zeros((), device=labels.device)
        if n == 0:
            self._empty_step()
            return total_loss
        chunks = range(0, n, self.physical_batch_size)
        for i, start in enumerate(chunks):
            last = i == len(chunks) - 1
            x = images[start : start + self.physical_batch_size]
            y = labels[start : start + self.physical_batch_size]
            if self.clipper is not None:
                total_loss += self._clipped_backward(x, y, augment)
                if last:
                    self._noisy_step()
                continue
            total_loss += self._backward(x, y, augment)
            if self.private:
                # Only the last chunk adds noise and steps; the others just clip and accumulate.
                self.optimizer.signal_skip_step(do_skip=not last)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        if not self.private:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return total_loss

    def _augmented(self, x: torch.Tensor, y: torch.Tensor, augment: Transform | None) -> tuple[torch.Tensor, torch.Tensor]:
        """K copies of each sample, next to each other, each augmented on its own."""
        k = self.aug_multiplicity
        if k > 1:
            x, y = x.repeat_interleave(k, dim=0), y.repeat_interleave(k, dim=0)
        if augment is not None:
            x = augment(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model's logits; only the forward pass runs under autocast, as PyTorch recommends."""
        with self._autocast(x.device):
            return self.module(x)

    def _backward(self, x: torch.Tensor, y: torch.Tensor, augment: Transform | None) -> torch.Tensor:
        k = self.aug_multiplicity
        x, y = self._augmented(x, y, augment)
        logits = self._forward(x)
        per_row = F.cross_entropy(logits.float(), y, reduction="none")
        if self.private:
            # mean over the chunk: GradSampleModule rescales so each row gets its own gradient
            per_row.mean().backward()
            if k > 1:
                self._average_augmentations(k)
        else:
            # the same normalisation as DPOptimizer: a sum divided by the expected batch size
            (per_row.sum() / (k * self.plan.expected_batch_size)).backward()
        return per_row.detach().sum() / k

    def _clipped_backward(self, x: torch.Tensor, y: torch.Tensor, augment: Transform | None) -> torch.Tensor:
        """dpnas's path: clipped per-sample gradients added straight into DPOptimizer's running sum."""
        k = self.aug_multiplicity
        x, y = self._augmented(x, y, augment)
        loss = self.clipper.backward(self._forward, x, y)
        for p, clipped in self.clipper.clipped_sum(self.max_grad_norm, aug_multiplicity=k).items():
            p.summed_grad = clipped if getattr(p, "summed_grad", None) is None else p.summed_grad + clipped
        return loss / k

    def _noisy_step(self) -> None:
        # The clipped sum is already in p.summed_grad. DPOptimizer.step() would first clip and add the per-sample
        # gradients it holds: none here, yet about 25 small operations per parameter on empty tensors (0.3-0.4 ms
        # of a quickstart step on 2 CPU cores, benchmarks/RESULTS.md). What it does next is called here in its
        # order (DPOptimizer.pre_step, then step): Opacus's noise (one draw per parameter from the noise
        # generator), its division by the expected batch size, the accountant's hook, the optimizer's step.
        optimizer = self.optimizer
        for p, empty in zip(optimizer.params, self._empty_grad_samples()):
            p.grad_sample = empty  # scale_grad counts accumulated batches from these: one
        optimizer.add_noise()
        optimizer.scale_grad()
        if optimizer.step_hook:
            optimizer.step_hook(optimizer)
        optimizer.original_optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def _empty_grad_samples(self) -> list[torch.Tensor]:
        """One empty per-sample gradient per parameter, made once (nothing ever writes into them)."""
        if self._empty is None:
            self._empty = [torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype) for p in self.optimizer.params]
        return self._empty

    def _average_augmentations(self, k: int) -> None:
        for p in self.optimizer.params:
            g = p.grad_sample
            p.grad_sample = g.view(g.shape[0] // k, k, *g.shape[1:]).mean(dim=1)

    def _empty_step(self) -> None:
        """An empty Poisson batch still releases noise: skipping the step would reveal it was empty."""
        if not self.private:
            return
        for p in self.optimizer.params:
            p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _autocast(self, device: torch.device):
        # bf16 on CPU as well: slower there unless the CPU has bf16 instructions, but the same arithmetic
        # (and the same code path) as on the GPU
        if self.autocast:
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()
