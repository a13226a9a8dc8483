r"""Proven-exact float32 replacements for the integer rounding steps, used by the torch runtime.

The reference computes, per channel, the step function

    f(x) = clamp(floor((x * m + b + 2^(t-1)) / 2^t), lo, hi)        x an integer in [x_min, x_max]

(requantize: b = 0; the input op: x = pixel, m = a_c, b = b_c). The torch runtime wants

    g(x) = clamp(floor(fl(fl(x * M) + C)), lo, hi)                   two float32 ops, then floor

with float32 per-channel constants M and C, because int64 multiplies are slow on CPUs (no vector
instruction) and float32 ones are not. We choose M = fl(m / 2^t) and pick C, then PROVE g == f:

* f and g are both non-decreasing in x (m > 0, M > 0; IEEE rounding and floor are monotonic), so
  each is determined by where it steps. f reaches k at the threshold
  ``T_k = ceil((k * 2^t - 2^(t-1) - b) / m)`` (exact integer arithmetic);
* g == f on [x_min, x_max] iff for every k in (lo, hi]: g(T_k) >= k and g(T_k - 1) <= k - 1 (where
  those points lie in the range), evaluated with numpy float32 — the same IEEE operations that torch
  runs as two separate kernels (separate kernels cannot be contracted into an FMA);
* C is chosen in the middle of the window [max_k(k - T_k M), min_k(k - (T_k - 1) M)), which is
  about M wide, far wider than float32's rounding error for small codes; the check above is what
  makes it safe, not the choice.

If any check fails the caller keeps the int64 path, which is the reference's arithmetic verbatim.
The add op uses the same idea over its whole (small) input grid, checked exhaustively.
"""

from __future__ import annotations

import numpy as np

F32_EXACT_INT = 1 << 24  # every integer of magnitude below 2^24 is exact in float32


def _f_exact(x: int, m: int, b: int, t: int) -> int:
    return (x * m + b + (1 << (t - 1))) >> t  # Python ints: exact


def _g_float(x, M, C) -> np.ndarray:
    dtype = type(M)
    prod = np.multiply(np.asarray(x, dtype=dtype), M, dtype=dtype)
    return np.floor(np.add(prod, C, dtype=dtype))


def affine_step_plan(
    m: int, b: int, t: int, lo: int, hi: int, x_min: int, x_max: int, dtype=np.float32
) -> tuple[np.floating, np.floating] | None:
    """(M, C) of ``dtype`` (float32 or float64) with g == f on [x_min, x_max], proven as in the
    module docstring, or None. float32 leaves too little room between the steps of 8-bit outputs
    (its rounding error near 128 is 2^-17 while steps can sit closer than that to a half), so
    callers try float32 first and float64 next."""
    exact_limit = F32_EXACT_INT if dtype is np.float32 else 1 << 53
    if m <= 0 or max(abs(x_min), abs(x_max)) >= exact_limit or hi - lo > 1 << 16:
        return None
    M = dtype(m / 2.0**t)
    if not np.isfinite(M) or M <= 0:
        return None
    thresholds = []
    for k in range(lo + 1, hi + 1):
        num = k * (1 << t) - (1 << (t - 1)) - b
        thresholds.append((k, -((-num) // m)))  # ceil(num / m)
    window_lo, window_hi = -np.inf, np.inf
    for k, T in thresholds:
        if x_min < T <= x_max:  # both T - 1 and T lie in the range: this step is observable
            window_lo = max(window_lo, k - T * float(M))
            window_hi = min(window_hi, k - (T - 1) * float(M))
    if window_lo == -np.inf:  # no step inside the range: f is constant there; aim at its middle
        C = dtype(_f_exact(x_min, m, b, t) + 0.5 - x_min * float(M))
    else:
        if not window_lo < window_hi:
            return None
        C = dtype((window_lo + window_hi) / 2)
    # The proof: every observable step of f is reproduced by g, and the ends agree after clamping.
    points = [x_min, x_max]
    for _, T in thresholds:
        points += [T - 1, T]
    xs = np.array([p for p in points if x_min <= p <= x_max], dtype=np.int64)
    exact = np.clip([_f_exact(int(x), m, b, t) for x in xs], lo, hi)
    approx = np.clip(_g_float(xs, M, C), lo, hi)
    if not np.array_equal(exact, approx.astype(np.int64)):
        return None
    # Monotonicity makes the checked points sufficient; make sure g is monotone here too
    # (it is by IEEE semantics; this guards against a surprising M or C).
    if not np.all(np.diff(approx[np.argsort(xs)]) >= 0):
        return None
    return M, C


def channel_plans(ms, bs, ts, lo: int, hi: int, x_min: int, x_max: int):
    """Per-channel ``affine_step_plan``s of the first float dtype (float32, then float64) that is
    proven exact for every channel: ``(M, C, dtype)`` with M, C numpy arrays, or None."""
    for dtype in (np.float32, np.float64):
        plans = [
            affine_step_plan(int(m), int(b), int(t), lo, hi, x_min, x_max, dtype)
            for m, b, t in zip(ms, bs, ts, strict=True)
        ]
        if all(p is not None for p in plans):
            M = np.array([p[0] for p in plans], dtype)
            C = np.array([p[1] for p in plans], dtype)
            return M, C, dtype
    return None


def add_plan(
    m_a: int,
    m_b: int,
    t: int,
    lo: int,
    hi: int,
    a_range: tuple[int, int],
    b_range: tuple[int, int],
    dtype=np.float32,
) -> tuple | None:
    """(Ma, Mb, C) of ``dtype`` with clamp(floor(fl(fl(fl(a Ma) + fl(b Mb)) + C))) == the add op
    for every code pair in the ranges, checked exhaustively (at most 256 x 256 pairs), or None.
    In float64 it always holds: a * m_a and b * m_b are integers below 2^40 scaled by 2^-t, so
    every intermediate is exact; the exhaustive check confirms it anyway."""
    a = np.arange(a_range[0], a_range[1] + 1, dtype=np.int64)
    b = np.arange(b_range[0], b_range[1] + 1, dtype=np.int64)
    if a.size * b.size > 1 << 17:
        return None
    A, B = np.meshgrid(a, b, indexing="ij")
    exact = np.clip((A * m_a + B * m_b + (1 << (t - 1))) >> t, lo, hi)
    Ma, Mb = dtype(m_a / 2.0**t), dtype(m_b / 2.0**t)
    fa = np.multiply(A.astype(dtype), Ma, dtype=dtype)
    fb = np.multiply(B.astype(dtype), Mb, dtype=dtype)
    s = np.add(fa, fb, dtype=dtype)
    for C in (dtype(0.5), dtype(0.5 + 2.0**-12), dtype(0.5 - 2.0**-12)):
        approx = np.clip(np.floor(np.add(s, C, dtype=dtype)), lo, hi).astype(np.int64)
        if np.array_equal(approx, exact):
            return Ma, Mb, C
    return None


def add_plans(m_a: int, m_b: int, t: int, lo: int, hi: int, a_range, b_range):
    """``add_plan`` of the first float dtype (float32, then float64) that holds:
    ``(Ma, Mb, C, dtype)``, or None."""
    for dtype in (np.float32, np.float64):
        plan = add_plan(m_a, m_b, t, lo, hi, a_range, b_range, dtype=dtype)
        if plan is not None:
            return (*plan, dtype)
    return None
