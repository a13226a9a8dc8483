r"""Every rounding and saturation rule of the integer program, in one place (docs/design.md,
section 4).

Derivation. A layer's real output is ``y = M * acc`` with a positive real multiplier ``M`` (for a
conv, ``M = s_x * s_w[c] / s_out``). We store ``M`` as a 31-bit integer ``m`` and a shift ``t``:

    (1)  M = f * 2^e,  f in [1/2, 1)                      (frexp)
    (2)  m = round(f * 2^31)  in [2^30, 2^31]; if m == 2^31 then m = 2^30, e = e + 1
    (3)  t = 31 - e,  so  M ~= m / 2^t  with relative error <= 2^-31

and compute the rounded product with one add and one arithmetic right shift:

    (4)  y = floor((acc * m + 2^(t-1)) / 2^t)  = floor(acc * m / 2^t + 1/2)   (round half up)
    (5)  y = clamp(y, lo, hi)

In int64, (4) cannot overflow when |acc| < 2^31 and m < 2^31 (|acc * m| < 2^62) and t <= 62
(2^(t-1) <= 2^61). This is gemmlowp's ``SaturatingRoundingDoublingHighMul`` +
``RoundingDivideByPOT`` folded into one shift, with half-up instead of half-away-from-zero
rounding: an arithmetic right shift (``>>`` on int64, SAR on x86) rounds toward -inf, so adding
half first rounds half up for either sign.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import FixedPointError

MULTIPLIER_BITS = 31
M_MIN = 1 << (MULTIPLIER_BITS - 1)  # 2^30: smallest stored multiplier
M_MAX = (1 << MULTIPLIER_BITS) - 1  # 2^31 - 1: largest
SHIFT_MIN = 1  # t >= 1 so that 2^(t-1) is an integer
SHIFT_MAX = 62  # 2^(t-1) <= 2^61 keeps (4) inside int64
INT32_MIN = -(1 << 31)
INT32_MAX = (1 << 31) - 1


def quantize_multiplier(real: float) -> tuple[int, int]:
    """(m, t) with m in [2^30, 2^31) and M ~= m / 2^t, per (1)-(3).

    >>> quantize_multiplier(0.5)
    (1073741824, 31)
    >>> quantize_multiplier(0.75)
    (1610612736, 31)
    """
    if not math.isfinite(real) or real <= 0:
        raise FixedPointError(f"multiplier must be a positive finite number, got {real!r}")
    f, e = math.frexp(real)
    m = round(f * (1 << MULTIPLIER_BITS))
    if m == 1 << MULTIPLIER_BITS:
        m, e = M_MIN, e + 1
    t = MULTIPLIER_BITS - e
    if not SHIFT_MIN <= t <= SHIFT_MAX:
        raise FixedPointError(
            f"multiplier {real:.6g} needs shift {t}, outside [{SHIFT_MIN}, {SHIFT_MAX}]; "
            "the layer's step sizes are degenerate (retrain or recalibrate)"
        )
    return m, t


def quantize_multipliers(reals) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel version of ``quantize_multiplier``: int64 arrays (m, t)."""
    pairs = [quantize_multiplier(float(r)) for r in np.asarray(reals, dtype=np.float64).ravel()]
    m = np.array([p[0] for p in pairs], dtype=np.int64)
    t = np.array([p[1] for p in pairs], dtype=np.int64)
    return m, t


def multiplier_for_shift(real: float, t: int) -> int:
    """round(M * 2^t): a multiplier on a shift chosen elsewhere (the add op shares one t)."""
    return round(real * (1 << t))


def half(t):
    """2^(t-1): the addend that makes a right shift by t round half up (eq. 4). A Python int
    for an integer t (exact at any size), int64 for an array of shifts.

    >>> half(3), half(np.array([1, 2]))
    (4, array([1, 2]))
    """
    if isinstance(t, int | np.integer):
        return 1 << (int(t) - 1)
    return np.int64(1) << (np.asarray(t, dtype=np.int64) - 1)


def shift_round(x, t):
    """Eq. (4) on values of any integer type with ``+`` and ``>>`` (Python ints, numpy or torch
    int64 tensors; ``t`` an int or a tensor of the same kind): floor((x + 2^(t-1)) / 2^t).
    Runtimes call this so the rule is written once."""
    return (x + (1 << (t - 1))) >> t


def rounding_shift(x: np.ndarray, t) -> np.ndarray:
    """floor((x + 2^(t-1)) / 2^t) on int64: divide by 2^t, rounding half up. Eq. (4).

    >>> rounding_shift(np.array([5, 6, -5, -6, 7], dtype=np.int64), 2)
    array([ 1,  2, -1, -1,  2])
    """
    return shift_round(np.asarray(x, dtype=np.int64), np.asarray(t, dtype=np.int64))


def requantize(acc: np.ndarray, m, t, lo: int, hi: int) -> np.ndarray:
    """clamp(floor((acc * m + 2^(t-1)) / 2^t), lo, hi) in int64. Eqs. (4), (5).

    ``m``, ``t`` broadcast against ``acc`` (per-channel: shape (C, 1, 1) for NCHW).

    >>> m, t = quantize_multiplier(0.25)
    >>> requantize(np.array([1, 2, 3, 6, 100]), m, t, 0, 15)
    array([ 0,  1,  1,  2, 15])
    """
    acc = np.asarray(acc, dtype=np.int64)
    y = rounding_shift(acc * np.asarray(m, dtype=np.int64), t)
    return np.clip(y, lo, hi)


def input_affine(mean: float, std: float, input_scale: float, shift: int) -> tuple[int, int]:
    """(a, b) with p * a + b ~= 2^t * ((p / 255 - mean) / std) / s_in, for the input op."""
    a = round((1 << shift) / (255.0 * std * input_scale))
    b = round(-(1 << shift) * mean / (std * input_scale))
    return a, b


def input_shift(stds, input_scale: float) -> int:
    """The shift that gives the largest input coefficient a 31-bit magnitude (as multipliers)."""
    largest = max(1.0 / (255.0 * s * input_scale) for s in stds)
    return quantize_multiplier(largest)[1]
