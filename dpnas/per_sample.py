"""dpnas's own per-sample gradients: clipped sums without the batch gradient Opacus computes and discards.

Opacus's GradSampleModule lets autograd compute every parameter's ordinary ``.grad`` and then
builds per-sample gradients from hooks; DP-SGD never uses that ``.grad``.  Here the parameters
stop requiring gradients during the backward pass (the images require one instead, so autograd
still carries gradients through every layer), and hooks capture each layer's input and output
gradient.  The per-sample gradients are then built once, their norms taken, and the clipped sum
formed in the same pass.  On CPU the skipped batch gradient is about 40 % of a non-private
backward pass for SmoothNet (benchmarks/RESULTS.md).

Supported layers: Conv2d (groups = 1) and its weight-standardised variant, Linear on flat inputs,
GroupNorm.  :func:`supports` says whether a model is covered; otherwise use Opacus's path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dpnas.layers import WSConv2d

_SUPPORTED = (nn.Conv2d, nn.Linear, nn.GroupNorm)


def _trainable_leaves(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]


def supports(model: nn.Module) -> bool:
    """True when every trainable layer is one this module computes per-sample gradients for."""
    for module in _trainable_leaves(model):
        if type(module) not in (nn.Conv2d, WSConv2d, nn.Linear, nn.GroupNorm):
            return False
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            return False
    return True


class PerSampleClipper:
    """Hooks on a model that turn one backward pass into clipped, summed per-sample gradients."""

    def __init__(self, model: nn.Module) -> None:
        if not supports(model):
            raise ValueError("model has layers without a dpnas per-sample gradient; use Opacus's path")
        self.model = model
        self.layers = _trainable_leaves(model)
        self.params = [p for m in self.layers for p in m.parameters(recurse=False) if p.requires_grad]
        self._inputs: dict[nn.Module, torch.Tensor] = {}
        self._grads: dict[nn.Module, torch.Tensor] = {}
        self._handles = []
        for layer in self.layers:
            self._handles.append(layer.register_forward_hook(self._save_input))
            self._handles.append(layer.register_full_backward_hook(self._save_grad))
        self._capturing = False

    def _save_input(self, module, inputs, output) -> None:
        if self._capturing:
            self._inputs[module] = inputs[0].detach()

    def _save_grad(self, module, grad_input, grad_output) -> None:
        if self._capturing:
            self._grads[module] = grad_output[0].detach()

    def backward(self, logits_fn, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Forward and backward without parameter gradients; returns the summed per-row loss."""
        for p in self.params:
            p.requires_grad_(False)
        self._capturing = True
        try:
            x = images.detach().requires_grad_(True)  # carries autograd through every layer
            per_row = F.cross_entropy(logits_fn(x).float(), labels, reduction="none")
            per_row.sum().backward()  # summed: each sample's output gradient is its own
        finally:
            self._capturing = False
            for p in self.params:
                p.requires_grad_(True)
        return per_row.detach().sum()

    def clipped_sum(self, max_grad_norm: float, *, aug_multiplicity: int = 1) -> dict[nn.Parameter, torch.Tensor]:
        """Per-sample gradients (averaged over augmentations), clipped to `max_grad_norm`, summed."""
        per_sample: list[tuple[nn.Parameter, torch.Tensor]] = []
        for layer in self.layers:
            for param, grad in _layer_grads(layer, self._inputs.pop(layer), self._grads.pop(layer)):
                if aug_multiplicity > 1:
                    grad = grad.view(grad.shape[0] // aug_multiplicity, aug_multiplicity, *grad.shape[1:]).mean(1)
                per_sample.append((param, grad))
        squared = torch.stack([g.flatten(1).pow(2).sum(1) for _, g in per_sample], dim=1).sum(1)
        # the same clip factor as Opacus's DPOptimizer, so both paths agree to rounding
        factor = (max_grad_norm / (squared.sqrt() + 1e-6)).clamp(max=1.0)
        return {p: torch.einsum("i,i...->...", factor, g) for p, g in per_sample}

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def _layer_grads(layer: nn.Module, a: torch.Tensor, g: torch.Tensor) -> list[tuple[nn.Parameter, torch.Tensor]]:
    if isinstance(layer, nn.Conv2d):
        return _conv_grads(layer, a, g)
    if isinstance(layer, nn.Linear):
        out = [(layer.weight, torch.einsum("bo,bi->boi", g, a))]
        if layer.bias is not None:
            out.append((layer.bias, g))
        return out
    # GroupNorm: y = x_hat * weight + bias, per channel
    x_hat = F.group_norm(a, layer.num_groups, eps=layer.eps)
    out = []
    if layer.weight is not None:
        out.append((layer.weight, (x_hat * g).flatten(2).sum(2)))
    if layer.bias is not None:
        out.append((layer.bias, g.flatten(2).sum(2)))
    return out


def _conv_grads(conv: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> list[tuple[nn.Parameter, torch.Tensor]]:
    b = a.shape[0]
    cols = F.unfold(a, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    grad_out = g.flatten(2)  # (B, C_out, positions)
    weight_grad = torch.bmm(grad_out, cols.transpose(1, 2))  # (B, C_out, C_in * k * k)
    if isinstance(conv, WSConv2d):
        weight_grad = _through_standardisation(conv, weight_grad)
    out = [(conv.weight, weight_grad.view(b, *conv.weight.shape))]
    if conv.bias is not None:
        out.append((conv.bias, grad_out.sum(2)))
    return out


def _through_standardisation(conv: WSConv2d, grad_std: torch.Tensor) -> torch.Tensor:
    """Chain rule through w_hat = (w - mean) / sqrt(var + eps), per output filter, for each sample."""
    w = conv.weight.detach().flatten(1)
    std = (w.var(dim=1, unbiased=False, keepdim=True) + conv.eps).sqrt()
    w_hat = (w - w.mean(dim=1, keepdim=True)) / std
    mean_g = grad_std.mean(dim=2, keepdim=True)
    mean_gw = (grad_std * w_hat).mean(dim=2, keepdim=True)
    return (grad_std - mean_g - w_hat * mean_gw) / std
