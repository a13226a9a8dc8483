"""lsqint: LSQ quantization-aware training at 2-8 bits and integer-only inference for CNNs.

float nn.Module --prepare_qat--> QAT model --convert--> IntProgram --run/save/export_onnx-->

Names are loaded on first use: ``lsqint.load`` and ``lsqint.run(..., runtime="reference")``
need numpy only; the training side (``prepare_qat``, ``convert``, ``models``) imports torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> (module, attribute); attribute None: the module itself
_LAZY: dict[str, tuple[str, str | None]] = {
    "IntProgram": ("lsqint.intprog.program", "IntProgram"),
    "verify": ("lsqint.intprog.verify", "verify"),
    "load": ("lsqint.intprog.artifact", "load"),
    "save": ("lsqint.intprog.artifact", "save"),
    "run": ("lsqint.runtime", "run"),
    "compile": ("lsqint.runtime", "compile_program"),
    "LsqintError": ("lsqint.errors", "LsqintError"),
    "errors": ("lsqint.errors", None),
    "QuantConfig": ("lsqint.qat.config", "QuantConfig"),
    "prepare_qat": ("lsqint.qat.prepare", "prepare_qat"),
    "convert": ("lsqint.qat.convert", "convert"),
    "models": ("lsqint.models", None),
    "data": ("lsqint.data", None),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'lsqint' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = importlib.import_module(module)
    if attr is not None:
        value = getattr(value, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


def export_onnx(program, path, **kwargs):
    """Write ``program`` as an integer-only ONNX model (needs the ``onnx`` extra)."""
    from .export.onnx_int import export_onnx as _export

    return _export(program, path, **kwargs)


__all__ = sorted([*_LAZY, "__version__", "export_onnx"])
