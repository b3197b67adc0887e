"""dpnas: neural architecture search for differentially private deep learning."""

import importlib.metadata

from dpnas.arch.registry import MODELS, get_arch
from dpnas.arch.space import ArchConfig, ConfigError, load_arch_file

__all__ = ["ArchConfig", "ConfigError", "MODELS", "build_model", "count_parameters", "get_arch", "load_arch_file"]
__version__ = importlib.metadata.version("dpnas")


def __getattr__(name: str):
    # torch is imported on first use, not with the package: the `dpnas` command (dpnas.__main__.run) can then
    # take a Ctrl-C during its imports as a clean stop
    if name in ("build_model", "count_parameters"):
        from dpnas.arch import models

        return getattr(models, name)
    raise AttributeError(f"module 'dpnas' has no attribute {name!r}")
