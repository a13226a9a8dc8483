"""Integer code ranges for symmetric, zero-point-free quantization (docs/design.md, section 3)."""

from __future__ import annotations

from ..errors import UsageError

MIN_BITS = 2
MAX_BITS = 8


def check_bits(bits: int, what: str = "bits") -> int:
    """Return ``bits`` if it is an int in [2, 8]; raise a one-line ValueError otherwise."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise UsageError(
            f"{what}={bits!r} is out of range: lsqint quantizes to {MIN_BITS}..{MAX_BITS} bits; "
            f"pass an integer between {MIN_BITS} and {MAX_BITS}"
        )
    return bits


def code_range(bits: int, signed: bool) -> tuple[int, int]:
    """(qmin, qmax) of b-bit codes.

    >>> code_range(4, signed=True)
    (-8, 7)
    >>> code_range(4, signed=False)
    (0, 15)
    """
    check_bits(bits)
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1
