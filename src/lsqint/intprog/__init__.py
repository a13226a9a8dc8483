"""IntProgram IR, fixed-point rules (all in fixedpoint.py), convert, verify, save/load."""

from .convert import convert
from .program import IntProgram, Node, TensorSpec, format_program
from .verify import ProgramError, verify

__all__ = [
    "IntProgram",
    "Node",
    "ProgramError",
    "TensorSpec",
    "convert",
    "format_program",
    "verify",
]
