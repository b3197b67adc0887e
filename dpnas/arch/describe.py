"""What a config builds into: parameters, output shape, Opacus compatibility."""

from __future__ import annotations

from typing import Any

import torch

from dpnas.arch.compat import dp_problems
from dpnas.arch.models import build_model, count_parameters
from dpnas.arch.space import ArchConfig


def describe(arch: ArchConfig, *, num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> dict[str, Any]:
    model = build_model(arch, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    with torch.no_grad():
        output = model(torch.zeros(2, in_channels, image_size, image_size))
    problems = dp_problems(model)
    return {
        "config": arch.to_dict(),
        "params": count_parameters(model),
        "num_classes": num_classes,
        "input_shape": [in_channels, image_size, image_size],
        "output_shape": list(output.shape[1:]),
        "stage_widths": list(arch.stage_widths),
        "stage_depths": list(arch.stage_depths),
        "dp_compatible": not problems,
        "dp_problems": problems,
    }


def format_description(info: dict[str, Any], *, name: str | None = None) -> str:
    lines = [f"architecture: {name}"] if name else []
    lines.append("config:")
    width = max(len(k) for k in info["config"])
    lines += [f"  {key:<{width}} = {value}" for key, value in info["config"].items()]
    lines += [
        f"stage widths: {info['stage_widths']}, blocks per stage: {info['stage_depths']}",
        f"parameters: {info['params']:,} ({info['num_classes']} classes)",
        f"input {tuple(info['input_shape'])} -> output {tuple(info['output_shape'])}",
        "opacus: " + ("compatible" if info["dp_compatible"] else "NOT compatible"),
    ]
    lines += [f"  - {problem}" for problem in info["dp_problems"]]
    return "\n".join(lines)
