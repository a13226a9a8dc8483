"""lsqint: LSQ quantization-aware training at 2-8 bits and integer-only inference for CNNs."""

from . import models
from .qat import QuantConfig, prepare_qat

__version__ = "0.1.0"

__all__ = ["QuantConfig", "__version__", "models", "prepare_qat"]
