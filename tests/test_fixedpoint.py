from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lsqint.intprog.fixedpoint import (
    M_MAX,
    M_MIN,
    FixedPointError,
    quantize_multiplier,
    requantize,
    rounding_shift,
)

multipliers = st.floats(min_value=2.0**-29, max_value=2.0**20, allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(real=multipliers)
def test_multiplier_round_trip_error_is_below_2_pow_minus_31(real):
    m, t = quantize_multiplier(real)
    assert M_MIN <= m <= M_MAX and 1 <= t <= 62
    approx = Fraction(m, 2**t)
    assert abs(approx - Fraction(real)) <= Fraction(real) * Fraction(1, 2**31)


@settings(max_examples=300, deadline=None)
@given(x=st.integers(-(2**61), 2**61), t=st.integers(1, 62))
def test_rounding_shift_rounds_half_up(x, t):
    got = int(rounding_shift(np.array([x], dtype=np.int64), t)[0])
    # floor(x / 2^t + 1/2) with exact rationals: half goes up, for either sign
    q = Fraction(x, 2**t) + Fraction(1, 2)
    assert got == q.numerator // q.denominator


def test_requantize_rounds_half_up_at_ties():
    m, t = quantize_multiplier(0.5)  # exactly representable: ties are exact
    acc = np.array([-3, -1, 1, 3, 5], dtype=np.int64)
    assert requantize(acc, m, t, -100, 100).tolist() == [-1, 0, 1, 2, 3]


@settings(max_examples=300, deadline=None)
@given(
    acc=st.integers(-(2**31), 2**31 - 1),
    real=multipliers,
    lo=st.integers(-128, 0),
    width=st.integers(1, 255),
)
def test_requantize_is_exact_and_never_overflows_int64(acc, real, lo, width):
    m, t = quantize_multiplier(real)
    hi = lo + width
    got = int(requantize(np.array([acc], dtype=np.int64), m, t, lo, hi)[0])
    q = Fraction(acc * m, 2**t) + Fraction(1, 2)  # Python ints: no overflow possible
    expected = min(max(q.numerator // q.denominator, lo), hi)
    assert got == expected
    assert abs(acc * m) + 2 ** (t - 1) < 2**63


def test_requantize_clamps():
    m, t = quantize_multiplier(1.0)
    assert requantize(np.array([-5, 3, 99]), m, t, 0, 15).tolist() == [0, 3, 15]


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), 2.0**40, 2.0**-40])
def test_unrepresentable_multipliers_are_refused(bad):
    with pytest.raises(FixedPointError):
        quantize_multiplier(bad)
