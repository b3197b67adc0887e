"""dpnas: neural architecture search for differentially private deep learning."""

import importlib.metadata

from dpnas.arch.models import build_model, count_parameters
from dpnas.arch.registry import MODELS, get_arch
from dpnas.arch.space import ArchConfig, ConfigError, load_arch_file

__all__ = ["ArchConfig", "ConfigError", "MODELS", "build_model", "count_parameters", "get_arch", "load_arch_file"]
__version__ = importlib.metadata.version("dpnas")
