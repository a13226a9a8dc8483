"""lsqint's errors: everything bad input can cause derives from ``LsqintError``.

The command line prints an ``LsqintError`` (and a missing file) as one line and exits with 2;
any other exception is a bug in lsqint or in a library below it, reported as an internal error
(exit 1; ``LSQINT_DEBUG=1`` shows the traceback). Each class also derives from the builtin its
callers caught before it existed (ValueError or RuntimeError), so ``except ValueError`` still
works. This module imports nothing: every layer may raise these.
"""

from __future__ import annotations


class LsqintError(Exception):
    """Base of the errors that bad input (flags, files, data, models) causes."""


class UsageError(LsqintError, ValueError):
    """An argument, flag or configuration value that lsqint cannot use."""


class DatasetError(LsqintError, ValueError):
    """A dataset that is missing, malformed, or too small for the command."""


class CheckpointError(LsqintError, ValueError):
    """A checkpoint that is missing, corrupted, foreign or does not fit the model."""


class ProgramError(LsqintError, ValueError):
    """An integer program that is malformed or could overflow."""


class ArtifactError(LsqintError, ValueError):
    """A program file that is missing, truncated, corrupted, foreign or of another version."""


class FixedPointError(LsqintError, ValueError):
    """A real multiplier that 31-bit fixed point with shift 1..62 cannot represent."""


class UnsupportedOpError(LsqintError, ValueError):
    """A model layer or function that lsqint cannot quantize or convert."""


class ExportError(LsqintError, ValueError):
    """A program that an export format cannot express."""


class TrainingError(LsqintError, RuntimeError):
    """Training cannot continue (e.g. the loss became NaN); saved checkpoints are left intact."""


class ToolError(LsqintError, RuntimeError):
    """An external tool lsqint drives (C compiler, Arm toolchain, qemu) is missing or failed."""


class UsageTypeError(UsageError, TypeError):
    """An argument of the wrong type (also a TypeError, as Python reports those)."""
