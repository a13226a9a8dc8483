"""The ops that round: each computes an int64 sum of products and brings it onto 8-bit codes
with ``fixedpoint.rounding_shift`` (round half up) and a clamp. Their verify rules prove the
int64 sum cannot overflow."""

from __future__ import annotations

import numpy as np

from ..fixedpoint import M_MAX, M_MIN, SHIFT_MAX, SHIFT_MIN, half, requantize, rounding_shift
from .base import (
    CODE_DTYPES,
    INT32_MAX,
    INT32_MIN,
    Op,
    absmax,
    channel,
    code_range,
    fail,
    int_attr,
    is_int,
    out_range,
)


def _round_clamp(node, acc: np.ndarray) -> np.ndarray:
    """clamp(floor((acc + 2^(shift-1)) / 2^shift), lo, hi): the rounding every op here ends in."""
    a = node.attrs
    return np.clip(rounding_shift(acc, a["shift"]), a["lo"], a["hi"])


def _check_int64(node, worst: int, what: str) -> None:
    """Refuse a node whose int64 sum (before the shift) could reach 2^63."""
    if worst >= 1 << 63:
        fail(node, f"{what} can reach {worst}, overflowing int64")


class Affine(Op):
    """A per-channel affine map of codes (a BatchNorm with no conv before it, the residual
    stream's narrow quantizer): clamp((x*a[c] + b[c] + 2^(shift-1)) >> shift, lo, hi)."""

    name = "affine"
    params = ("a", "b")
    attrs = ("shift", "lo", "hi")

    @classmethod
    def check_reads(cls, node, x) -> None:
        if x.dtype not in CODE_DTYPES or len(x.shape) != 3:
            fail(node, f"affine reads (C, H, W) 8-bit codes, got {x.dtype}{x.shape}")

    @classmethod
    def infer(cls, node, ins):
        (x,) = ins
        cls.check_reads(node, x)
        a, b = node.params["a"], node.params["b"]
        t = int_attr(node, "shift", SHIFT_MIN, SHIFT_MAX)
        if (
            a.dtype != np.int64
            or b.dtype != np.int64
            or a.shape != b.shape
            or a.shape != (x.shape[0],)
        ):
            fail(node, "a, b must be int64 with one value per input channel")
        worst = absmax(x) * int(np.abs(a).max()) + int(np.abs(b).max()) + half(t)
        _check_int64(node, worst, "x * a + b")
        dtype, lo, hi = out_range(node)
        return dtype, x.shape, lo, hi

    @classmethod
    def reference(cls, node, xs):
        p = node.params
        return _round_clamp(node, xs[0].astype(np.int64) * channel(p["a"], 4) + channel(p["b"], 4))


class Input(Affine):
    """The program's first op: the affine rule on uint8 pixels (normalization and the first
    quantizer folded into one multiplier per channel)."""

    name = "input"

    @classmethod
    def check_reads(cls, node, x) -> None:
        pass  # uint8 pixels (C, H, W), checked by verify before any node


class Requantize(Op):
    """clamp((acc * m[c] + 2^(shift[c]-1)) >> shift[c], lo, hi): an int32 accumulator onto
    codes (or, with lo/hi the int32 range, onto logits of one scale). ``m``, ``shift``: one value
    per channel, or one for all."""

    name = "requantize"
    params = ("m", "shift")
    attrs = ("lo", "hi")

    @classmethod
    def infer(cls, node, ins):
        (acc,) = ins
        m, t = node.params["m"], node.params["shift"]
        if m.dtype != np.int64 or t.dtype != np.int64 or m.shape != t.shape or m.ndim != 1:
            fail(node, "m and shift must be 1-D int64 arrays of the same length")
        if acc.dtype != "int32" or not acc.shape:
            fail(node, f"input '{acc.name}' must be an int32 accumulator")
        if m.shape[0] not in (1, acc.shape[0]):
            fail(node, f"{m.shape[0]} multipliers for {acc.shape[0]} channels")
        if m.min() < M_MIN or m.max() > M_MAX:
            fail(node, f"multiplier outside [2^30, 2^31): {m.min()}..{m.max()}")
        if t.min() < SHIFT_MIN or t.max() > SHIFT_MAX:
            fail(node, f"shift outside [{SHIFT_MIN}, {SHIFT_MAX}]")
        lo, hi = int_attr(node, "lo"), int_attr(node, "hi")
        if (lo, hi) == (INT32_MIN, INT32_MAX):
            return "int32", acc.shape, lo, hi  # logits on one scale
        dtype, lo, hi = code_range(node, lo, hi)
        return dtype, acc.shape, lo, hi

    @classmethod
    def reference(cls, node, xs):
        (acc,) = xs
        p = node.params
        m, t = channel(p["m"], acc.ndim), channel(p["shift"], acc.ndim)
        return requantize(acc, m, t, node.attrs["lo"], node.attrs["hi"])


class Add(Op):
    """clamp((a*m_a + b*m_b + 2^(shift-1)) >> shift, lo, hi): two code tensors of one shape."""

    name = "add"
    attrs = ("m_a", "m_b", "shift", "lo", "hi")
    arity = 2

    @classmethod
    def infer(cls, node, ins):
        a, b = ins
        if a.shape != b.shape:
            fail(node, f"shapes differ: {a.shape} + {b.shape}")
        if a.dtype not in CODE_DTYPES or b.dtype not in CODE_DTYPES:
            fail(node, "add reads 8-bit codes")
        t = int_attr(node, "shift", SHIFT_MIN, SHIFT_MAX)
        m_a, m_b = int_attr(node, "m_a"), int_attr(node, "m_b")
        worst = absmax(a) * abs(m_a) + absmax(b) * abs(m_b) + half(t)
        _check_int64(node, worst, "a * m_a + b * m_b")
        dtype, lo, hi = out_range(node)
        return dtype, a.shape, lo, hi

    @classmethod
    def reference(cls, node, xs):
        a = node.attrs
        x_a, x_b = (v.astype(np.int64) for v in xs)
        return _round_clamp(node, x_a * np.int64(a["m_a"]) + x_b * np.int64(a["m_b"]))


class Concat(Op):
    """Code tensors joined along channels (dim 1 of N, C, ...), each brought onto the output
    scale with its own multiplier m[i] and the shared shift: clamp((x_i*m[i] + 2^(t-1)) >> t)."""

    name = "concat"
    attrs = ("m", "shift", "lo", "hi")
    arity = None

    @classmethod
    def infer(cls, node, ins):
        if any(x.dtype not in CODE_DTYPES or len(x.shape) < 1 for x in ins):
            fail(node, "concat reads 8-bit code tensors")
        rest = {x.shape[1:] for x in ins}
        if len(rest) != 1:
            fail(node, f"inputs differ beyond the channel dim: {sorted(rest)}")
        t = int_attr(node, "shift", SHIFT_MIN, SHIFT_MAX)
        m = node.attrs["m"]
        if not isinstance(m, list) or len(m) != len(ins) or not all(is_int(v) for v in m):
            fail(node, f"attribute 'm' must list one integer per input ({len(ins)})")
        for x, mi in zip(ins, m, strict=True):
            if not 0 < mi < 1 << 40:
                fail(node, f"multiplier {mi} outside (0, 2^40)")
            _check_int64(node, absmax(x) * mi + half(t), "x * m + 2^(t-1)")
        dtype, lo, hi = out_range(node)
        channels = sum(x.shape[0] for x in ins)
        return dtype, (channels, *ins[0].shape[1:]), lo, hi

    @classmethod
    def reference(cls, node, xs):
        parts = [
            _round_clamp(node, x.astype(np.int64) * np.int64(m))
            for x, m in zip(xs, node.attrs["m"], strict=True)
        ]
        return np.concatenate(parts, axis=1)


class Mul(Op):
    """Elementwise product of two code tensors (the second may be (C, 1, 1) against (C, H, W):
    squeeze-excitation's x * gate): clamp((a*b*m + 2^(shift-1)) >> shift, lo, hi)."""

    name = "mul"
    attrs = ("m", "shift", "lo", "hi")
    arity = 2

    @classmethod
    def infer(cls, node, ins):
        a, b = ins
        if a.dtype not in CODE_DTYPES or b.dtype not in CODE_DTYPES:
            fail(node, "mul reads 8-bit codes")
        if len(b.shape) != len(a.shape) or any(
            db not in (1, da) for da, db in zip(a.shape, b.shape, strict=True)
        ):
            fail(node, f"{list(b.shape)} does not broadcast onto {list(a.shape)}")
        t = int_attr(node, "shift", SHIFT_MIN, SHIFT_MAX)
        m = int_attr(node, "m", M_MIN, M_MAX)
        _check_int64(node, absmax(a) * absmax(b) * m + half(t), "a * b * m")
        dtype, lo, hi = out_range(node)
        return dtype, a.shape, lo, hi

    @classmethod
    def reference(cls, node, xs):
        x_a, x_b = (v.astype(np.int64) for v in xs)
        return _round_clamp(node, x_a * x_b * np.int64(node.attrs["m"]))


class Lut(Op):
    """An elementwise function of one code: y = table[x - offset] (one entry per code of the
    input's range, values in [lo, hi]); built at convert time, so nothing here rounds."""

    name = "lut"
    params = ("table",)
    attrs = ("offset", "lo", "hi")

    @classmethod
    def infer(cls, node, ins):
        (x,) = ins
        table = node.params["table"]
        if x.dtype not in CODE_DTYPES:
            fail(node, "lut reads 8-bit codes")
        if int_attr(node, "offset") != x.qmin:
            fail(node, f"offset {node.attrs['offset']} != the input's lowest code {x.qmin}")
        if table.dtype != np.int64 or table.shape != (x.qmax - x.qmin + 1,):
            fail(node, f"table must be int64 with {x.qmax - x.qmin + 1} entries")
        dtype, lo, hi = out_range(node)
        if table.min() < lo or table.max() > hi:
            fail(node, f"table values {table.min()}..{table.max()} outside [{lo}, {hi}]")
        return dtype, x.shape, lo, hi

    @classmethod
    def reference(cls, node, xs):
        return node.params["table"][xs[0].astype(np.int64) - node.attrs["offset"]]
