"""egnn: SO(2)-equivariant graph neural network for DFT Hamiltonians, distributed over many GPUs."""
from .errors import ConfigError, DistributedError, EgnnError, InputError, KernelError, TrainingError

__version__ = "0.1.0"
__all__ = ["EgnnError", "InputError", "ConfigError", "DistributedError", "KernelError", "TrainingError", "__version__"]

from . import ops as _ops  # noqa: E402,F401  registers the egnn:: ops; logs once if egnn._C is missing
