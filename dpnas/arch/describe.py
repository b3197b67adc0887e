"""What a config builds into: parameters, output shape, activations, Opacus compatibility.

Everything is read from the meta-device model (:mod:`dpnas.arch.footprint`), so describing a config allocates
nothing: a 100000 px input or a very wide network is described, not run out of memory on.
"""

from __future__ import annotations

from typing import Any

from dpnas.arch.compat import dp_problems
from dpnas.arch.footprint import footprint, meta_model
from dpnas.arch.space import ArchConfig


def describe(arch: ArchConfig, *, num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> dict[str, Any]:
    model = meta_model(arch, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    size = footprint(arch, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    problems = dp_problems(model)
    return {
        "config": arch.to_dict(),
        "params": size.params,
        "num_classes": num_classes,
        "input_shape": [in_channels, image_size, image_size],
        "output_shape": list(size.output_shape),
        "activations_per_sample": size.activations,
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
        f"activations: {info['activations_per_sample']:,} floats per sample in a forward pass",
        "opacus: " + ("compatible" if info["dp_compatible"] else "NOT compatible"),
    ]
    lines += [f"  - {problem}" for problem in info["dp_problems"]]
    return "\n".join(lines)
