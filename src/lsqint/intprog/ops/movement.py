"""Pure data movement of codes, per image (the batch dim stays first), and the output marker."""

from __future__ import annotations

import numpy as np

from .base import MAX_ELEMENTS, Op, fail, int_attr, int_list_attr


class Flatten(Op):
    """(C, ...) -> (C*...,) in C order."""

    name = "flatten"

    @classmethod
    def infer(cls, node, ins):
        (x,) = ins
        return x.dtype, (int(np.prod(x.shape, dtype=np.int64)),), x.qmin, x.qmax

    @classmethod
    def reference(cls, node, xs):
        return xs[0].reshape(xs[0].shape[0], -1)


class Reshape(Op):
    """A new per-image shape in C order."""

    name = "reshape"
    attrs = ("shape",)

    @classmethod
    def infer(cls, node, ins):
        (x,) = ins
        shape = int_list_attr(node, "shape", 1, MAX_ELEMENTS)
        elements = int(np.prod(x.shape, dtype=np.int64))
        if len(shape) > 6 or int(np.prod(shape, dtype=np.int64)) != elements:
            fail(node, f"shape {shape} does not hold the {elements} elements of {list(x.shape)}")
        return x.dtype, tuple(shape), x.qmin, x.qmax

    @classmethod
    def reference(cls, node, xs):
        return xs[0].reshape(xs[0].shape[0], *node.attrs["shape"])


class Transpose(Op):
    """A permutation of the per-image dims."""

    name = "transpose"
    attrs = ("perm",)

    @classmethod
    def infer(cls, node, ins):
        (x,) = ins
        perm = int_list_attr(node, "perm", 0, len(x.shape) - 1)
        if sorted(perm) != list(range(len(x.shape))):
            fail(node, f"perm {perm} is not a permutation of the {len(x.shape)} per-image dims")
        return x.dtype, tuple(x.shape[p] for p in perm), x.qmin, x.qmax

    @classmethod
    def reference(cls, node, xs):
        return np.transpose(xs[0], (0, *(p + 1 for p in node.attrs["perm"])))


class Slice(Op):
    """The [start, end) range of one per-image axis."""

    name = "slice"
    attrs = ("axis", "start", "end")

    @classmethod
    def infer(cls, node, ins):
        (x,) = ins
        axis = int_attr(node, "axis", 0, len(x.shape) - 1)
        start = int_attr(node, "start", 0, x.shape[axis] - 1)
        end = int_attr(node, "end", start + 1, x.shape[axis])
        shape = list(x.shape)
        shape[axis] = end - start
        return x.dtype, tuple(shape), x.qmin, x.qmax

    @classmethod
    def reference(cls, node, xs):
        a = node.attrs
        index = [slice(None)] * xs[0].ndim
        index[a["axis"] + 1] = slice(a["start"], a["end"])
        return xs[0][tuple(index)]


class Output(Op):
    """The last node: its input is the logits, widened to int32 (verify checks where they come
    from); it computes nothing."""

    name = "output"

    @classmethod
    def reference(cls, node, xs):
        return xs[0].astype(np.int32)
