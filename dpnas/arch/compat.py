"""Is a model usable with Opacus DP-SGD?  Every problem at once, each with its submodule path."""

from __future__ import annotations

from opacus.validators import ModuleValidator
from torch import nn


def dp_problems(model: nn.Module) -> list[str]:
    """Return one line per reason Opacus would refuse `model` (empty when it is DP-compatible).

    Runs Opacus's own registered validators, as ``ModuleValidator.validate`` does, but
    reports the dotted path of each offending submodule, which Opacus leaves out.
    """
    problems = []
    if not model.training:
        problems.append("<model>: must be in training mode (call model.train())")
    for name, module in model.named_modules():
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        validator = ModuleValidator.VALIDATORS.get(type(module))
        if validator is not None:
            problems += [f"{name or '<model>'}: {error}" for error in validator(module)]
        if list(module.buffers(recurse=False)):
            # Layers without a dedicated grad sampler go through torch.func, which refuses buffers
            # (running statistics are shared across samples).
            problems.append(f"{name or '<model>'}: {type(module).__name__} keeps buffers (running statistics)")
    return problems


def is_dp_compatible(model: nn.Module) -> bool:
    return not dp_problems(model)
