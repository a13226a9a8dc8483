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

from .fixedpoint import half

F32_EXACT_INT = 1 << 24  # every integer of magnitude below 2^24 is exact in float32


def _f_exact(x: int, m: int, b: int, t: int) -> int:
    return (x * m + b + half(t)) >> t  # Python ints: exact


def _g_float(x, M, C, rounding: str = "floor") -> np.ndarray:
    dtype = type(M)
    prod = np.multiply(np.asarray(x, dtype=dtype), M, dtype=dtype)
    return _ROUND[rounding](np.add(prod, C, dtype=dtype))


# "floor": Floor then Clip (the torch runtime, the int-float export). "rne": round half to even,
# as ONNX QuantizeLinear does (it saturates to its type, then Clip): the same step function with
# C lowered by 1/2, except where a value lands exactly on a half, which the proof covers.
_ROUND = {"floor": np.floor, "rne": np.rint}


def affine_step_plan(
    m: int,
    b: int,
    t: int,
    lo: int,
    hi: int,
    x_min: int,
    x_max: int,
    dtype=np.float32,
    rounding: str = "floor",
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
        num = k * (1 << t) - half(t) - b
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
    if rounding == "rne":
        C = dtype(float(C) - 0.5)
    # The proof: every observable step of f is reproduced by g, and the ends agree after clamping.
    points = [x_min, x_max]
    for _, T in thresholds:
        points += [T - 1, T]
    xs = np.array([p for p in points if x_min <= p <= x_max], dtype=np.int64)
    exact = np.clip([_f_exact(int(x), m, b, t) for x in xs], lo, hi)
    approx = np.clip(_g_float(xs, M, C, rounding), lo, hi)
    if not np.array_equal(exact, approx.astype(np.int64)):
        return None
    # Monotonicity makes the checked points sufficient; make sure g is monotone here too
    # (it is by IEEE semantics; this guards against a surprising M or C).
    if not np.all(np.diff(approx[np.argsort(xs)]) >= 0):
        return None
    return M, C


def channel_plans(
    ms,
    bs,
    ts,
    lo: int,
    hi: int,
    x_min: int,
    x_max: int,
    dtypes=(np.float32, np.float64),
    rounding: str = "floor",
):
    """Per-channel ``affine_step_plan``s of the first float dtype (float32, then float64) that is
    proven exact for every channel: ``(M, C, dtype)`` with M, C numpy arrays, or None."""
    for dtype in dtypes:
        plans = [
            affine_step_plan(int(m), int(b), int(t), lo, hi, x_min, x_max, dtype, rounding)
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
    rounding: str = "floor",
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
    exact = np.clip((A * m_a + B * m_b + half(t)) >> t, lo, hi)
    Ma, Mb = dtype(m_a / 2.0**t), dtype(m_b / 2.0**t)
    fa = np.multiply(A.astype(dtype), Ma, dtype=dtype)
    fb = np.multiply(B.astype(dtype), Mb, dtype=dtype)
    s = np.add(fa, fb, dtype=dtype)
    c0 = 0.5 if rounding == "floor" else 0.0
    for C in (dtype(c0), dtype(c0 + 2.0**-12), dtype(c0 - 2.0**-12)):
        approx = np.clip(_ROUND[rounding](np.add(s, C, dtype=dtype)), lo, hi).astype(np.int64)
        if np.array_equal(approx, exact):
            return Ma, Mb, C
    return None


def add_plans(
    m_a: int,
    m_b: int,
    t: int,
    lo: int,
    hi: int,
    a_range,
    b_range,
    dtypes=(np.float32, np.float64),
    rounding: str = "floor",
):
    """``add_plan`` of the first float dtype (float32, then float64) that holds:
    ``(Ma, Mb, C, dtype)``, or None."""
    for dtype in dtypes:
        plan = add_plan(m_a, m_b, t, lo, hi, a_range, b_range, dtype, rounding)
        if plan is not None:
            return (*plan, dtype)
    return None


# -- ONNX Runtime's QLinearConv requantize ------------------------------------------------------
# ONNX Runtime's CPU QLinearConv (MLAS, x86-64) ends every convolution with
#
#     q(acc) = saturate(rne(fl(fl(acc + bias) * scale)) + zero_point)
#
# (int32 add, int32 -> float32 conversion, float32 multiply, round half to even as cvtps2dq does
# under the default MXCSR, then the zero point and the output type's saturation), where
# scale = fl(x_scale * w_scale[c] / y_scale) is exactly w_scale[c] when x_scale = y_scale = 1. With
# acc the program's accumulator, an integer offset c folded into the int32 bias and an output zero
# point z, q is non-decreasing in acc like the requantize step f, so the threshold proof above
# applies unchanged: q(T_k) >= k and q(T_k - 1) < k at every step of f, evaluated with numpy's
# float32 (the same IEEE operations), plus the two ends of the range.


def _qlinear_eval(x: np.ndarray, c: int, s: np.float32, z: int, qmin: int, qmax: int):
    """The MLAS requantize above on int64 accumulators ``x`` (numpy float32 semantics)."""
    v = np.multiply((x + c).astype(np.int32).astype(np.float32), s, dtype=np.float32)
    return np.clip(np.rint(v).astype(np.int64) + z, qmin, qmax)  # np.rint: half to even


def qlinear_plan(
    m: int, t: int, lo: int, hi: int, x_min: int, x_max: int, z: int, out_min: int, out_max: int
) -> tuple[np.float32, int] | None:
    """(scale, c) such that clamp(q(x), lo, hi) == clamp(floor((x*m + 2^(t-1)) / 2^t), lo, hi)
    for every integer x in [x_min, x_max], with the output zero point ``z`` given (ONNX Runtime
    takes one per layer), proven as above; or None. ``out_min``/``out_max``: the range of the
    output type (0..255 or -128..127), which must hold [lo, hi].

    The search. q steps to k where the line (x + c) * scale crosses k - z - 1/2, so the real line
    L(x) = x * scale + u (u = c * scale + z) must satisfy L(T_k - 1) < k - 1/2 < L(T_k) at every
    step: half-planes in (scale, u), a thin polygon around (m / 2^t, ~0). Rays u = c * scale + z
    of integer slope c cross it; a large |z| (far from the codes) tilts them most per unit of
    scale, which is what lets one layer-wide z serve every channel. For each c whose ray crosses
    the polygon (found by sampling scale across it), the exact scale interval follows from the
    half-planes; its float32 middle is then checked by the proof, which alone decides."""
    # More than 64 output codes leave a layer-wide zero point no room (see qlinear_layer_plan).
    if m <= 0 or not out_min <= lo <= hi <= out_max or hi - lo >= 64:
        return None
    s0 = m / 2.0**t
    thresholds = [(k, -((-(k * (1 << t) - half(t))) // m)) for k in range(lo + 1, hi + 1)]
    inside = [(k, T) for k, T in thresholds if x_min < T <= x_max]
    points = [x_min, x_max] + [p for _, T in thresholds for p in (T - 1, T)]
    xs = np.array(sorted({p for p in points if x_min <= p <= x_max}), dtype=np.int64)
    exact = np.clip([_f_exact(int(x), m, 0, t) for x in xs], lo, hi)

    def proven(scale: np.float32, c: int) -> bool:
        if not (np.isfinite(scale) and scale > 0) or abs(c) + max(-x_min, x_max) >= 1 << 31:
            return False
        q = np.clip(_qlinear_eval(xs, c, scale, z, out_min, out_max), lo, hi)
        return bool(np.array_equal(q, exact))

    if not inside:  # f is constant on the range: any line through its value's cell will do
        c = round((_f_exact(x_min, m, 0, t) - z - x_min * s0) / s0)
        return (np.float32(s0), c) if proven(np.float32(s0), c) else None
    Ts = np.array([T for _, T in inside], dtype=np.float64)
    ks = np.array([k for k, _ in inside], dtype=np.float64) - 0.5

    def u_window(scale: float) -> tuple[float, float]:
        return float(np.max(ks - Ts * scale)), float(np.min(ks - (Ts - 1) * scale))

    # The slopes for which some line passes every step: L(T_i) > k_i - 1/2 and
    # L(T_j - 1) < k_j - 1/2 for all pairs i, j, i.e. (T_j - 1 - T_i) * scale < k_j - k_i.
    d = (Ts[None, :] - 1 - Ts[:, None]).ravel()
    r = (ks[None, :] - ks[:, None]).ravel()
    if np.any((d == 0) & (r <= 0)):
        return None
    # (With one step inside, any slope passes; search within a factor of 2 of the exact one.)
    s_low = max(s0 / 2, float(np.max(r[d < 0] / d[d < 0], initial=0.0)))
    s_high = min(2 * s0, float(np.min(r[d > 0] / d[d > 0], initial=np.inf)))
    if not s_low < s_high:
        return None
    candidates: set[int] = set()
    for scale in np.linspace(s_low, s_high, 65)[1:-1]:
        a, b = u_window(scale)
        first, last = int(np.floor((a - z) / scale)), int(np.ceil((b - z) / scale))
        if last - first > 4096:  # a loose polygon: its middle is enough
            middle = (first + last) // 2
            first, last = middle - 2048, middle + 2048
        candidates.update(range(first, last + 1))
    lo_u, hi_u = u_window(s0)
    if not candidates:
        return None
    cs = np.array(sorted(candidates), dtype=np.float64)
    # For each c: (T + c) * scale > k - 1/2 - z and (T - 1 + c) * scale < k - 1/2 - z at every
    # step, i.e. bounds on scale whose direction depends on the coefficient's sign.
    r = (ks - z)[None, :]
    low = np.zeros(len(cs))
    high = np.full(len(cs), np.inf)
    feasible = np.ones(len(cs), bool)
    for coef, above in ((Ts[None, :] + cs[:, None], True), (Ts[None, :] - 1 + cs[:, None], False)):
        with np.errstate(divide="ignore", invalid="ignore"):
            bound = r / coef
        is_low = (coef > 0) if above else (coef < 0)
        is_high = (coef < 0) if above else (coef > 0)
        low = np.maximum(low, np.max(np.where(is_low, bound, 0.0), axis=1))
        high = np.minimum(high, np.min(np.where(is_high, bound, np.inf), axis=1))
        # a zero coefficient leaves 0 > r (above) or 0 < r (below) to hold by itself
        zero_ok = (0 > r) if above else (0 < r)
        feasible &= np.all((coef != 0) | zero_ok, axis=1)
    order = np.argsort(np.abs(cs * s0 + z - (lo_u + hi_u) / 2))
    for i in order:
        if not (feasible[i] and low[i] < high[i]):
            continue
        scale = np.float32((low[i] + high[i]) / 2 if np.isfinite(high[i]) else 2 * low[i])
        if proven(scale, int(cs[i])):
            return scale, int(cs[i])
    return None


def qlinear_layer_plan(
    ms, ts, lo: int, hi: int, x_min: int, x_max: int, out_min: int, out_max: int
):
    """One output zero point z for all channels and each channel's (scale, c) of
    ``qlinear_plan``: ``(scales float32 array, c int64 array, z)``, or None. z is tried from the
    end of the output range farthest from the codes inward (most leverage, see qlinear_plan).

    How much leverage is needed: a channel whose steps' phases spread over all but W of a step
    has a polygon about W wide in u and W / levels in scale, so the rays of one z reach about
    (1 + |z| / levels) * W / scale integer slopes; with W near scale / levels that is at least
    one when |z| >= levels^2. Codes of 4 bits or fewer (16 levels, |z| up to 255) fit; 8-bit
    outputs (256 levels) do not, and those layers keep ConvInteger plus a separate step."""
    far_end = out_max if (out_max - hi) >= (lo - out_min) else out_min
    step = -1 if far_end == out_max else 1
    for z in range(far_end, far_end + step * 32, step):
        plans = []
        for m, t in zip(ms, ts, strict=True):
            plan = qlinear_plan(int(m), int(t), lo, hi, x_min, x_max, z, out_min, out_max)
            if plan is None:
                break
            plans.append(plan)
        else:
            scales = np.array([p[0] for p in plans], np.float32)
            return scales, np.array([p[1] for p in plans], np.int64), z
    return None
