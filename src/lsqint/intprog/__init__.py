"""The integer program IR: the program, its ops (``ops``: schema, verify rule, reference
semantics), the fixed-point rules (``fixedpoint``), ``verify`` and the file format
(``artifact``). This package imports numpy (and safetensors for files) only; lowering a torch
model into it is ``lsqint.convert`` (``lsqint.qat.convert``)."""

from ..errors import ProgramError
from .program import IntProgram, Node, TensorSpec, format_program
from .verify import verify

__all__ = [
    "IntProgram",
    "Node",
    "ProgramError",
    "TensorSpec",
    "format_program",
    "verify",
]
