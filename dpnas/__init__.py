"""dpnas: neural architecture search for differentially private deep learning."""

from dpnas.models import build_model, count_parameters
from dpnas.registry import MODELS, get_arch
from dpnas.space import ArchConfig, ConfigError, load_arch_file

__all__ = ["ArchConfig", "ConfigError", "MODELS", "build_model", "count_parameters", "get_arch", "load_arch_file"]
__version__ = "0.1.0"
