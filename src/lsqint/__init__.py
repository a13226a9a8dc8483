"""lsqint: LSQ quantization-aware training at 2-8 bits and integer-only inference for CNNs.

float nn.Module --prepare_qat--> QAT model --convert--> IntProgram --run/save/export_onnx-->
"""

from . import data, models  # noqa: F401  (public subpackages)
from .intprog import IntProgram, convert, verify
from .intprog.artifact import load, save
from .qat import QuantConfig, prepare_qat
from .runtime import compile_program as compile  # noqa: A004  (lsqint.compile, not the builtin)
from .runtime import run

__version__ = "0.1.0"


def export_onnx(program, path, **kwargs):
    """Write ``program`` as an integer-only ONNX model (needs the ``onnx`` extra)."""
    from .export.onnx_int import export_onnx as _export

    return _export(program, path, **kwargs)


__all__ = [
    "IntProgram",
    "QuantConfig",
    "__version__",
    "compile",
    "convert",
    "export_onnx",
    "load",
    "models",
    "prepare_qat",
    "run",
    "save",
    "verify",
]
