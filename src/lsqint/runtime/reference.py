"""The reference runtime: numpy, int64, written for clarity. It IS the definition of the semantics.

Every op computes in int64 and stores its result in the tensor's declared dtype; a value that
does not fit the declared dtype is a bug in convert/verify and raises here.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..intprog.fixedpoint import requantize, rounding_shift
from ..intprog.program import IntProgram, Node, adaptive_windows


def _store(value: np.ndarray, dtype: str) -> np.ndarray:
    out = value.astype(dtype)
    if not np.array_equal(out.astype(np.int64), value):
        raise OverflowError(f"value does not fit {dtype}: range {value.min()}..{value.max()}")
    return out


def _pad(x: np.ndarray, padding, value) -> np.ndarray:
    ph, pw = padding
    return np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=value)


def _windows(x: np.ndarray, kernel, stride, dilation) -> np.ndarray:
    """(N, C, H, W) -> (N, C, OH, OW, KH, KW): every window, strided and dilated."""
    kh, kw = kernel
    dh, dw = dilation
    win = sliding_window_view(x, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
    return win[:, :, :: stride[0], :: stride[1], ::dh, ::dw]


def conv2d(
    x: np.ndarray, weight: np.ndarray, bias: np.ndarray, stride, padding, dilation, groups: int
) -> np.ndarray:
    """acc[n, o, i, j] = bias[o] + sum_{c,u,v} x_pad[n, c, i*s + u*d, j*s + v*d] * w[o, c, u, v]."""
    x = _pad(x.astype(np.int64), padding, 0)  # zero padding pads code 0
    w = weight.astype(np.int64)
    cout, cin_g, kh, kw = w.shape
    cout_g = cout // groups
    outs = []
    for g in range(groups):
        xg = _windows(x[:, g * cin_g : (g + 1) * cin_g], (kh, kw), stride, dilation)
        wg = w[g * cout_g : (g + 1) * cout_g]
        # (N, C, OH, OW, KH, KW) x (O, C, KH, KW) -> (N, O, OH, OW)
        outs.append(np.einsum("ncijuv,ocuv->noij", xg, wg, optimize=True))
    acc = np.concatenate(outs, axis=1)
    return acc + bias.astype(np.int64).reshape(1, -1, 1, 1)


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return x.astype(np.int64) @ weight.astype(np.int64).T + bias.astype(np.int64)


def _pool_pad_for_ceil(x, kernel, stride, padding, dilation, ceil_mode):
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


def maxpool2d(x, kernel, stride, padding, dilation, ceil_mode) -> np.ndarray:
    low = np.iinfo(np.int64).min  # padding never wins
    xp = _pad(x.astype(np.int64), padding, low)
    eh, ew = _pool_pad_for_ceil(x, kernel, stride, padding, dilation, ceil_mode)
    xp = np.pad(xp, ((0, 0), (0, 0), (0, eh), (0, ew)), constant_values=low)
    return _windows(xp, kernel, stride, dilation).max(axis=(4, 5))


def avgpool2d_sum(x, kernel, stride, padding) -> np.ndarray:
    """The window sum (zero padding); the requantize that follows divides by the window size."""
    xp = _pad(x.astype(np.int64), padding, 0)
    return _windows(xp, kernel, stride, (1, 1)).sum(axis=(4, 5))


def adaptive_avgpool_sum(x, out_size, lcm) -> np.ndarray:
    """Each adaptive window's sum times lcm // its area (one common scale for all outputs)."""
    rows = adaptive_windows(x.shape[2], out_size[0])
    cols = adaptive_windows(x.shape[3], out_size[1])
    x = x.astype(np.int64)
    out = np.empty((*x.shape[:2], len(rows), len(cols)), np.int64)
    for i, (r0, r1) in enumerate(rows):
        for j, (c0, c1) in enumerate(cols):
            window = x[:, :, r0:r1, c0:c1].sum(axis=(2, 3))
            out[:, :, i, j] = window * (lcm // ((r1 - r0) * (c1 - c0)))
    return out


def _channel(p: np.ndarray, ndim: int) -> np.ndarray:
    """Per-channel parameter (C,) -> broadcastable along dim 1 of an (N, C, ...) tensor."""
    return p.reshape(1, -1, *([1] * (ndim - 2)))


def run_node(node: Node, inputs: list[np.ndarray]) -> np.ndarray:
    a = node.attrs
    p = node.params
    if node.op in ("input", "affine"):  # the same rule on pixels and on codes
        acc = inputs[0].astype(np.int64) * _channel(p["a"], 4) + _channel(p["b"], 4)
        lo, hi = (a["qmin"], a["qmax"]) if node.op == "input" else (a["lo"], a["hi"])
        return np.clip(rounding_shift(acc, a["shift"]), lo, hi)
    if node.op == "conv2d":
        return conv2d(
            inputs[0], p["weight"], p["bias"], a["stride"], a["padding"], a["dilation"], a["groups"]
        )
    if node.op == "linear":
        return linear(inputs[0], p["weight"], p["bias"])
    if node.op == "requantize":
        acc = inputs[0]
        return requantize(
            acc, _channel(p["m"], acc.ndim), _channel(p["t"], acc.ndim), a["lo"], a["hi"]
        )
    if node.op == "add":
        x_a, x_b = (v.astype(np.int64) for v in inputs)
        acc = x_a * np.int64(a["m_a"]) + x_b * np.int64(a["m_b"])
        return np.clip(rounding_shift(acc, a["shift"]), a["lo"], a["hi"])
    if node.op == "concat":
        parts = [
            np.clip(rounding_shift(x.astype(np.int64) * np.int64(m), a["shift"]), a["lo"], a["hi"])
            for x, m in zip(inputs, a["m"], strict=True)
        ]
        return np.concatenate(parts, axis=1)
    if node.op == "maxpool2d":
        return maxpool2d(
            inputs[0], a["kernel"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"]
        )
    if node.op == "avgpool2d":
        return avgpool2d_sum(inputs[0], a["kernel"], a["stride"], a["padding"])
    if node.op == "mul":
        x_a, x_b = (v.astype(np.int64) for v in inputs)
        acc = x_a * x_b * np.int64(a["m"])
        return np.clip(rounding_shift(acc, a["shift"]), a["lo"], a["hi"])
    if node.op == "lut":
        return p["table"][inputs[0].astype(np.int64) - a["offset"]]
    if node.op == "adaptive_avgpool2d":
        return adaptive_avgpool_sum(inputs[0], a["out_size"], a["lcm"])
    if node.op == "reshape":
        return inputs[0].reshape(inputs[0].shape[0], *a["shape"])
    if node.op == "transpose":
        return np.transpose(inputs[0], (0, *(p + 1 for p in a["perm"])))
    if node.op == "slice":
        index = [slice(None)] * inputs[0].ndim
        index[a["axis"] + 1] = slice(a["start"], a["end"])
        return inputs[0][tuple(index)]
    if node.op == "flatten":
        return inputs[0].reshape(inputs[0].shape[0], -1)
    raise NotImplementedError(f"reference runtime has no op {node.op!r}")


def run_reference(program: IntProgram, images: np.ndarray) -> np.ndarray:
    """Run ``program`` on uint8 images (N, C, H, W); returns int32 logits (N, classes)."""
    env: dict[str, np.ndarray] = {"input": images}
    for node in program.nodes:
        if node.op == "output":
            return env[node.inputs[0]].astype(np.int32)
        value = run_node(node, [env[name] for name in node.inputs])
        env[node.output] = _store(value, program.tensors[node.output].dtype)
    raise ValueError("program has no output node")
