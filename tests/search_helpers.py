"""A tiny study on the bundled digits: each trial takes a few seconds on CPU."""

import re
from pathlib import Path

TINY_STUDY = """
[study]
name = "tiny"
n_trials = {n_trials}
sampler = "{sampler}"
pruner = "{pruner}"
seed = 0
{extra}

[data]
dataset = "digits"
val_fraction = 0.2

[privacy]
epsilon = 4.0
delta = 1e-5

[train]
recipe = "quick"
epochs = {epochs}
batch_size = 256
physical_batch_size = 256

[arch]
base = "tiny"

[search]
activation = ["selu", "relu", "mish"]
width = {{ low = 0.5, high = 1.0, step = 0.5 }}
"""


def write_study(directory: Path, *, n_trials=3, sampler="tpe", pruner="none", epochs=1, extra="", name="tiny.toml") -> Path:
    path = directory / name
    text = TINY_STUDY.format(n_trials=n_trials, sampler=sampler, pruner=pruner, epochs=epochs, extra=extra)
    if "trial_count" in extra or sampler == "ablation":  # K drawn at random; an ablation's points x repeats
        text = text.replace(f"n_trials = {n_trials}\n", "")
    path.write_text(text)
    return path


def unfix(text: str, *keys: str) -> str:
    """A study file's text without the fixed `key = value` lines of fields a test searches instead (a field both
    fixed and searched is refused, outside an ablation)."""
    fixed, searched = text.split("[search]\n", 1)
    for key in keys:
        fixed, n = re.subn(rf"^{key} = .*\n", "", fixed, flags=re.M)
        assert n, f"no fixed {key} in the study text"
    return fixed + "[search]\n" + searched
