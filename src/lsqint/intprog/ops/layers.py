"""conv2d and linear: int32 accumulators ``bias + sum(x * w)`` over 8-bit codes."""

from __future__ import annotations

import numpy as np

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
from .pooling import out_size, pad, windows


def conv_acc_bound(weight_q: np.ndarray, bias_q: np.ndarray, input_absmax: int) -> np.ndarray:
    """Per output channel: sum|w_q| * max|x_q| + |bias_q| (docs/design.md, section 4), int64."""
    w_abs = np.abs(weight_q.astype(np.int64)).reshape(weight_q.shape[0], -1).sum(axis=1)
    return w_abs * int(input_absmax) + np.abs(bias_q.astype(np.int64))


class _Layer(Op):
    params = ("weight", "bias")

    @classmethod
    def infer(cls, node: Node, ins: list[TensorSpec]):
        (x,) = ins
        w, bias = node.params["weight"], node.params["bias"]
        bits = int_attr(node, "weight_bits", 2, 8)
        wmin, wmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        if w.dtype != np.int8 or bias.dtype != np.int32:
            fail(node, f"weight must be int8 codes and bias int32, got {w.dtype} and {bias.dtype}")
        if w.size == 0 or w.min() < wmin or w.max() > wmax:
            fail(node, f"weight codes empty or outside the {bits}-bit range [{wmin}, {wmax}]")
        if bias.shape != (w.shape[0],):
            fail(node, f"bias shape {bias.shape} != ({w.shape[0]},)")
        if x.dtype not in CODE_DTYPES:
            fail(node, f"input '{x.name}' must be 8-bit codes, got {x.dtype}")
        shape = cls.output_shape(node, x, w)
        bound = int(conv_acc_bound(w, bias, absmax(x)).max())
        if int_attr(node, "acc_bound") != bound:
            fail(node, f"recorded acc_bound {node.attrs['acc_bound']} != computed {bound}")
        if bound >= ACC_LIMIT:
            fail(
                node,
                f"int32 accumulator could overflow: |acc| <= {bound} >= 2^31 "
                f"(input range [{x.qmin}, {x.qmax}], {bits}-bit weights); lower the bits",
            )
        return "int32", shape, INT32_MIN, INT32_MAX


class Conv2d(_Layer):
    """acc[n, o, i, j] = bias[o] + sum_{c,u,v} x_pad[n, c, i*s + u*d, j*s + v*d] * w[o, c, u, v]
    (zero padding pads code 0; grouped: each group of outputs reads its group of inputs)."""

    name = "conv2d"
    attrs = ("stride", "padding", "dilation", "groups", "weight_bits", "acc_bound")

    @classmethod
    def output_shape(cls, node, x, w):
        groups = int_attr(node, "groups", 1, MAX_DIM)
        stride = pair_attr(node, "stride", 1, MAX_DIM)
        padding = pair_attr(node, "padding", 0, MAX_DIM)
        dilation = pair_attr(node, "dilation", 1, MAX_DIM)
        if len(x.shape) != 3 or w.ndim != 4:
            fail(node, f"conv reads (C, H, W) codes with a 4-D weight, got {x.shape}, {w.shape}")
        if x.shape[0] != w.shape[1] * groups or w.shape[0] % groups:
            fail(
                node,
                f"weight {w.shape} does not match input channels {x.shape[0]}, groups {groups}",
            )
        return (w.shape[0],) + tuple(
            out_size(node, x.shape[1 + d], w.shape[2 + d], stride[d], padding[d], dilation[d])
            for d in range(2)
        )

    @classmethod
    def reference(cls, node, xs):
        a = node.attrs
        x = pad(xs[0].astype(np.int64), a["padding"], 0)
        w = node.params["weight"].astype(np.int64)
        cout, cin_g, kh, kw = w.shape
        groups = a["groups"]
        cout_g = cout // groups
        outs = []
        for g in range(groups):
            xg = windows(x[:, g * cin_g : (g + 1) * cin_g], (kh, kw), a["stride"], a["dilation"])
            wg = w[g * cout_g : (g + 1) * cout_g]
            # (N, C, OH, OW, KH, KW) x (O, C, KH, KW) -> (N, O, OH, OW)
            outs.append(np.einsum("ncijuv,ocuv->noij", xg, wg, optimize=True))
        acc = np.concatenate(outs, axis=1)
        return acc + node.params["bias"].astype(np.int64).reshape(1, -1, 1, 1)


class Linear(_Layer):
    """acc[n, o] = bias[o] + sum_i x[n, i] * w[o, i]."""

    name = "linear"
    attrs = ("weight_bits", "acc_bound")

    @classmethod
    def output_shape(cls, node, x, w):
        if w.ndim != 2 or x.shape != (w.shape[1],):
            fail(node, f"weight {w.shape} does not match input features {x.shape}")
        return (w.shape[0],)

    @classmethod
    def reference(cls, node, xs):
        w, bias = node.params["weight"], node.params["bias"]
        return xs[0].astype(np.int64) @ w.astype(np.int64).T + bias.astype(np.int64)
