"""The integer program IR (docs/design.md, section 4): nodes in topological order over named
integer tensors. The ops themselves (schema, verify rule, semantics) live in ``intprog.ops``.

A program holds no float tensor. Scales are recorded as metadata (``TensorSpec.scale``) so a caller
can dequantize; the integer semantics never read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

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
