"""Pooling over (C, H, W) codes: maxpool2d (codes), avgpool2d and adaptive_avgpool2d (int32
window sums; the requantize that follows divides by the window size)."""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..program import Node, TensorSpec
from .base import (
    ACC_LIMIT,
    CODE_DTYPES,
    INT32_MAX,
    INT32_MIN,
    MAX_DIM,
    Op,
    absmax,
    fail,
    int_attr,
    pair_attr,
)


def windows(x: np.ndarray, kernel, stride, dilation) -> np.ndarray:
    """(N, C, H, W) -> (N, C, OH, OW, KH, KW): every window, strided and dilated."""
    kh, kw = kernel
    dh, dw = dilation
    win = sliding_window_view(x, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
    return win[:, :, :: stride[0], :: stride[1], ::dh, ::dw]


def out_size(node: Node, size, kernel, stride, padding, dilation, ceil_mode=False) -> int:
    """Output length along one axis (PyTorch's rules), refusing windows that do not fit."""
    span = dilation * (kernel - 1) + 1
    if node.op != "conv2d" and padding > span // 2:  # PyTorch's pooling rule
        fail(node, f"padding {padding} exceeds half the window {span}")
    if padding >= span:
        fail(node, f"padding {padding} is not smaller than the window {span}")
    room = size + 2 * padding - span
    if room < 0:
        fail(node, f"window {span} larger than the padded input {size + 2 * padding}")
    if not ceil_mode:
        return room // stride + 1
    out = -(-room // stride) + 1
    if (out - 1) * stride >= size + padding:  # PyTorch: no window starts in the right padding
        out -= 1
    return out


def adaptive_windows(size: int, out: int) -> list[tuple[int, int]]:
    """[start, end) of each of ``out`` adaptive-pooling windows over ``size`` (PyTorch's rule)."""
    return [(i * size // out, -(-(i + 1) * size // out)) for i in range(out)]


def adaptive_lcm(shape, out_size) -> int:
    """The least common multiple of the window areas of adaptive pooling ``shape`` -> out_size."""
    rows = {e - s for s, e in adaptive_windows(shape[0], out_size[0])}
    cols = {e - s for s, e in adaptive_windows(shape[1], out_size[1])}
    return math.lcm(*(r * c for r in rows for c in cols))


def adaptive_pool_matrix(shape, out_size, lcm: int) -> np.ndarray:
    """int64 (H*W, OH*OW): x.reshape(C, H*W) @ it == the adaptive_avgpool2d op's output, for
    runtimes that do the op as one integer matrix product."""
    h, w = shape
    rows, cols = adaptive_windows(h, out_size[0]), adaptive_windows(w, out_size[1])
    matrix = np.zeros((h, w, len(rows), len(cols)), np.int64)
    for i, (r0, r1) in enumerate(rows):
        for j, (c0, c1) in enumerate(cols):
            matrix[r0:r1, c0:c1, i, j] = lcm // ((r1 - r0) * (c1 - c0))
    return matrix.reshape(h * w, len(rows) * len(cols))


def pad(x: np.ndarray, padding, value) -> np.ndarray:
    ph, pw = padding
    return np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=value)


def _pool_shape(node: Node, x: TensorSpec, dilation, ceil_mode):
    if x.dtype not in CODE_DTYPES or len(x.shape) != 3:
        fail(node, f"pooling reads (C, H, W) 8-bit codes, got {x.dtype}{x.shape}")
    kernel = pair_attr(node, "kernel", 1, MAX_DIM)
    stride = pair_attr(node, "stride", 1, MAX_DIM)
    padding = pair_attr(node, "padding", 0, MAX_DIM)
    size = tuple(
        out_size(node, x.shape[1 + d], kernel[d], stride[d], padding[d], dilation[d], ceil_mode)
        for d in range(2)
    )
    return kernel, (x.shape[0], *size)


def _pad_for_ceil(x, kernel, stride, padding, dilation, ceil_mode):
    """Extra bottom/right padding so windows that start inside the input are kept (ceil_mode)."""
    extra = [0, 0]
    if ceil_mode:
        for d in range(2):
            size = x.shape[2 + d] + 2 * padding[d]
            span = dilation[d] * (kernel[d] - 1) + 1
            out = -(-(size - span) // stride[d]) + 1
            # PyTorch drops a last window that would start in the right padding only.
            if (out - 1) * stride[d] >= x.shape[2 + d] + padding[d]:
                out -= 1
            extra[d] = max(0, (out - 1) * stride[d] + span - size)
    return extra


class MaxPool2d(Op):
    """The largest code of each window; padding never wins (codes pass through unchanged)."""

    name = "maxpool2d"
    attrs = ("kernel", "stride", "padding", "dilation", "ceil_mode")

    @classmethod
    def infer(cls, node, ins):
        (x,) = ins
        dilation = pair_attr(node, "dilation", 1, MAX_DIM)
        ceil_mode = node.attrs["ceil_mode"]
        if not isinstance(ceil_mode, bool):
            fail(node, f"attribute 'ceil_mode' must be true or false, got {ceil_mode!r}")
        _, shape = _pool_shape(node, x, dilation, ceil_mode)
        return x.dtype, shape, x.qmin, x.qmax

    @classmethod
    def reference(cls, node, xs):
        a = node.attrs
        (x,) = xs
        low = np.iinfo(np.int64).min
        xp = pad(x.astype(np.int64), a["padding"], low)
        eh, ew = _pad_for_ceil(
            x, a["kernel"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"]
        )
        xp = np.pad(xp, ((0, 0), (0, 0), (0, eh), (0, ew)), constant_values=low)
        return windows(xp, a["kernel"], a["stride"], a["dilation"]).max(axis=(4, 5))


class AvgPool2d(Op):
    """The window sum (zero padding) in int32; the requantize that follows divides."""

    name = "avgpool2d"
    attrs = ("kernel", "stride", "padding", "acc_bound")

    @classmethod
    def infer(cls, node, ins):
        (x,) = ins
        (kh, kw), shape = _pool_shape(node, x, (1, 1), False)
        bound = kh * kw * absmax(x)
        if int_attr(node, "acc_bound") != bound or bound >= ACC_LIMIT:
            fail(
                node, f"window-sum bound {node.attrs['acc_bound']} != computed {bound} or overflows"
            )
        return "int32", shape, INT32_MIN, INT32_MAX

    @classmethod
    def reference(cls, node, xs):
        a = node.attrs
        xp = pad(xs[0].astype(np.int64), a["padding"], 0)
        return windows(xp, a["kernel"], a["stride"], (1, 1)).sum(axis=(4, 5))


class AdaptiveAvgPool2d(Op):
    """Adaptive average pooling with windows of unequal size (PyTorch's rule: rows
    floor(i*H/OH) .. ceil((i+1)*H/OH)): each window sum times lcm // area, so that every output
    is on the one scale s_x / lcm (lcm: the least common multiple of the window areas)."""

    name = "adaptive_avgpool2d"
    attrs = ("out_size", "lcm", "acc_bound")

    @classmethod
    def infer(cls, node, ins):
        (x,) = ins
        if x.dtype not in CODE_DTYPES or len(x.shape) != 3:
            fail(node, f"pooling reads (C, H, W) 8-bit codes, got {x.dtype}{x.shape}")
        oh, ow = pair_attr(node, "out_size", 1, MAX_DIM)
        lcm = adaptive_lcm(x.shape[1:], (oh, ow))
        if int_attr(node, "lcm") != lcm:
            fail(node, f"lcm {node.attrs['lcm']} != computed {lcm}")
        # The largest output: a window sum (area * absmax) times lcm // area = lcm * absmax.
        bound = lcm * absmax(x)
        if int_attr(node, "acc_bound") != bound or bound >= ACC_LIMIT:
            fail(node, f"bound {node.attrs['acc_bound']} != computed {bound} or overflows")
        return "int32", (x.shape[0], oh, ow), INT32_MIN, INT32_MAX

    @classmethod
    def reference(cls, node, xs):
        out_size_, lcm = node.attrs["out_size"], node.attrs["lcm"]
        x = xs[0].astype(np.int64)
        rows = adaptive_windows(x.shape[2], out_size_[0])
        cols = adaptive_windows(x.shape[3], out_size_[1])
        out = np.empty((*x.shape[:2], len(rows), len(cols)), np.int64)
        for i, (r0, r1) in enumerate(rows):
            for j, (c0, c1) in enumerate(cols):
                window = x[:, :, r0:r1, c0:c1].sum(axis=(2, 3))
                out[:, :, i, j] = window * (lcm // ((r1 - r0) * (c1 - c0)))
        return out
