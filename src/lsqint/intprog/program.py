"""The integer program IR (DESIGN section 4): nodes in topological order over named integer tensors.

A program holds no float tensor. Scales are recorded as metadata (``TensorSpec.scale``) so a caller
can dequantize; the integer semantics never read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# op -> (param names it carries, attribute names it carries). The reference runtime implements
# each of these; verify() refuses anything else.
OPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "input": (("a", "b"), ("shift", "qmin", "qmax")),
    "conv2d": (
        ("weight", "bias"),
        ("stride", "padding", "dilation", "groups", "weight_bits", "acc_bound"),
    ),
    "linear": (("weight", "bias"), ("weight_bits", "acc_bound")),
    "requantize": (("m", "t"), ("lo", "hi")),
    "add": ((), ("m_a", "m_b", "shift", "lo", "hi")),
    # Code tensors joined along channels (dim 1 of N, C, ...), each brought onto the output scale
    # with its own multiplier m[i] and the shared shift: clamp((x_i*m[i] + 2^(t-1)) >> t).
    "concat": ((), ("m", "shift", "lo", "hi")),
    # Elementwise product of two code tensors (the second may be (C, 1, 1) against (C, H, W):
    # squeeze-excitation's x * gate): clamp((a*b*m + 2^(t-1)) >> t).
    "mul": ((), ("m", "shift", "lo", "hi")),
    # An elementwise function of one code: y = table[x - offset] (table: one entry per code of
    # the input's range, values in [lo, hi]).
    "lut": (("table",), ("offset", "lo", "hi")),
    # A per-channel affine map of codes (a BatchNorm with no conv before it):
    # clamp((x*a[c] + b[c] + 2^(t-1)) >> t), the input op's rule on codes.
    "affine": (("a", "b"), ("shift", "lo", "hi")),
    "maxpool2d": ((), ("kernel", "stride", "padding", "dilation", "ceil_mode")),
    "avgpool2d": ((), ("kernel", "stride", "padding", "acc_bound")),
    # Adaptive average pooling with windows of unequal size (PyTorch's rule: rows
    # floor(i*H/OH) .. ceil((i+1)*H/OH)): each window sum times lcm // area, so that every output
    # is on the one scale s_x / lcm (lcm: the least common multiple of the window areas).
    "adaptive_avgpool2d": ((), ("out_size", "lcm", "acc_bound")),
    "flatten": ((), ()),
    # Pure data movement of codes, per image (the batch dim stays first): a new shape in C order,
    # a permutation of the per-image dims, and the [start, end) range of one per-image axis.
    "reshape": ((), ("shape",)),
    "transpose": ((), ("perm",)),
    "slice": ((), ("axis", "start", "end")),
    "output": ((), ()),
}


def adaptive_windows(size: int, out: int) -> list[tuple[int, int]]:
    """[start, end) of each of ``out`` adaptive-pooling windows over ``size`` (PyTorch's rule)."""
    return [(i * size // out, -(-(i + 1) * size // out)) for i in range(out)]


def adaptive_lcm(shape, out_size) -> int:
    """The least common multiple of the window areas of adaptive pooling ``shape`` -> out_size."""
    import math

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


CODE_DTYPES = ("uint8", "int8")
TENSOR_DTYPES = ("uint8", "int8", "int32")


@dataclass
class TensorSpec:
    """An integer tensor: dtype, shape without the batch dim, code range and (metadata) scale."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    qmin: int
    qmax: int
    scale: list[float] | None = None  # one value, or one per channel (dim 1); None for pixels
    bits: int | None = None  # codes: the quantizer's bit width (qmin/qmax may be tighter: ReLU6)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "qmin": self.qmin,
            "qmax": self.qmax,
            "scale": self.scale,
            "bits": self.bits,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TensorSpec:
        # No conversions: verify() checks every field's type, so "35" or 1.5 is refused there.
        shape = d["shape"]
        return cls(
            d["name"],
            d["dtype"],
            tuple(shape) if isinstance(shape, list) else shape,
            d["qmin"],
            d["qmax"],
            d["scale"],
            d.get("bits"),
        )


@dataclass
class Node:
    """One op: reads ``inputs`` (tensor names), writes ``output``; ``params`` are integer arrays."""

    op: str
    name: str
    inputs: list[str]
    output: str
    attrs: dict[str, Any] = field(default_factory=dict)
    params: dict[str, np.ndarray] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "name": self.name,
            "inputs": list(self.inputs),
            "output": self.output,
            "attrs": self.attrs,
            "params": sorted(self.params),
        }


@dataclass
class IntProgram:
    """An integer-only classifier: uint8 images (N, C, H, W) -> int32 logits (N, classes)."""

    nodes: list[Node]
    tensors: dict[str, TensorSpec]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def input_spec(self) -> TensorSpec:
        return self.tensors[self.nodes[0].inputs[0]]

    @property
    def output_spec(self) -> TensorSpec:
        return self.tensors[self.nodes[-1].inputs[0]]

    @property
    def output_scale(self) -> float:
        """Real value of one logit unit: dequantized logits = output_scale * logits."""
        scale = self.output_spec.scale
        return float(scale[0]) if scale else 1.0

    def num_classes(self) -> int:
        return int(self.output_spec.shape[-1])

    def __getstate__(self) -> dict[str, Any]:
        # The torch runtime's compiled form (``runtime.compile_program``) is a cache, not data.
        return {k: v for k, v in self.__dict__.items() if k != "_compiled"}

    def __str__(self) -> str:
        return format_program(self)


def _fmt_attr(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "(" + ",".join(_fmt_attr(v) for v in value) + ")"
    return str(value)


def format_program(program: IntProgram) -> str:
    """A stable, line-per-node text listing for debugging and diffs."""
    lines = [f"IntProgram ({len(program.nodes)} nodes)"]
    for node in program.nodes:
        out = program.tensors.get(node.output)
        sig = f"{out.dtype}{list(out.shape)}[{out.qmin},{out.qmax}]" if out else "-"
        attrs = " ".join(f"{k}={_fmt_attr(v)}" for k, v in sorted(node.attrs.items()))
        params = " ".join(f"{k}:{p.dtype}{list(p.shape)}" for k, p in sorted(node.params.items()))
        lines.append(
            f"  {node.output:<28} = {node.op:<10} ({', '.join(node.inputs)}) -> {sig}"
            + (f"  {attrs}" if attrs else "")
            + (f"  [{params}]" if params else "")
        )
    return "\n".join(lines)
