"""IntProgram IR, fixed-point rules (fixedpoint.py holds ALL of them), convert, verify, save/load."""

from .convert import convert
from .program import IntProgram, Node, TensorSpec, format_program
from .verify import ProgramError, verify

__all__ = ["IntProgram", "Node", "ProgramError", "TensorSpec", "convert", "format_program", "verify"]
