"""verify(program): the checks between stages. Errors name the node, the op and what failed.

verify trusts nothing a file records that it can compute. One forward pass of shape and range
inference re-derives every tensor's shape, dtype and code range from the node attributes, the
integer parameters and the declared input shape, and refuses any recorded figure that differs
(tensor specs, accumulator bounds). Attribute types and sizes are validated first, so a malformed
graph cannot reach a runtime or make one allocate more than the input shape implies. Runtimes
rely on the recorded bounds only because verify has recomputed them. Each op's own rule is its
``infer`` in ``intprog.ops``; this module checks the graph around them.
"""

from __future__ import annotations

import math
from numbers import Real

import numpy as np

from ..errors import ProgramError
from .ops import OPS, conv_acc_bound
from .ops.base import ACC_LIMIT, MAX_CONCAT, MAX_DIM, MAX_ELEMENTS, fail, is_int
from .program import TENSOR_DTYPES, IntProgram, TensorSpec

__all__ = ["ACC_LIMIT", "ProgramError", "conv_acc_bound", "verify"]


def _check_spec_fields(spec: TensorSpec) -> None:
    where = f"tensor '{spec.name}'"
    if spec.dtype not in TENSOR_DTYPES:
        raise ProgramError(f"{where}: dtype {spec.dtype!r} is not an integer dtype")
    if not isinstance(spec.shape, tuple) or not all(is_int(d) for d in spec.shape):
        raise ProgramError(f"{where}: shape {spec.shape!r} is not a tuple of integers")
    if not all(is_int(v) for v in (spec.qmin, spec.qmax)):
        raise ProgramError(f"{where}: code range must be integers")
    if spec.bits is not None and (not is_int(spec.bits) or not 2 <= spec.bits <= 8):
        raise ProgramError(f"{where}: bits {spec.bits!r} is not 2..8")
    if spec.scale is not None:
        if not isinstance(spec.scale, list) or not spec.scale:
            raise ProgramError(f"{where}: scale must be a non-empty list of numbers")
        for s in spec.scale:
            if not isinstance(s, Real) or isinstance(s, bool) or not math.isfinite(s) or s <= 0:
                raise ProgramError(f"{where}: scale {s!r} is not a positive finite number")


# -- the inference pass -------------------------------------------------------------------------
def verify(program: IntProgram) -> IntProgram:
    """Check attribute types, then re-derive every tensor's dtype, shape, code range and every
    accumulator bound and refuse any recorded figure that differs; check fixed-point parameters
    and int32/int64 safety."""
    if not program.nodes:
        raise ProgramError("empty program")
    first, last = program.nodes[0], program.nodes[-1]
    if first.op != "input" or last.op != "output":
        raise ProgramError("a program starts with an 'input' node and ends with an 'output' node")
    for name, spec in program.tensors.items():
        if not isinstance(spec, TensorSpec) or spec.name != name:
            raise ProgramError(f"tensor table entry '{name}' does not describe '{name}'")
        _check_spec_fields(spec)
    pixels = first.inputs[0] if len(first.inputs) == 1 else None
    if pixels not in program.tensors:
        raise ProgramError("the input node must read one declared pixel tensor")
    inferred: dict[str, TensorSpec] = {pixels: _check_pixels(program.tensors[pixels])}
    names: set[str] = set()
    for i, node in enumerate(program.nodes):
        if node.op not in OPS:
            fail(node, f"unknown op; known ops are {sorted(OPS)}")
        if not isinstance(node.name, str) or node.name in names:
            fail(node, "node names must be distinct strings (the file keys parameters by them)")
        names.add(node.name)
        if node.op == "output" and i != len(program.nodes) - 1:
            fail(node, "only the last node may be the output")
        op = OPS[node.op]
        param_names, attr_names = op.params, op.attrs
        if set(node.params) != set(param_names):
            fail(node, f"params {sorted(node.params)} != expected {sorted(param_names)}")
        for key, arr in node.params.items():
            if not isinstance(arr, np.ndarray):
                fail(node, f"param '{key}' is not an array")
        if set(node.attrs) != set(attr_names):
            fail(node, f"attributes {sorted(node.attrs)} != expected {sorted(attr_names)}")
        if not isinstance(node.inputs, list) or not all(isinstance(n, str) for n in node.inputs):
            fail(node, "inputs must be a list of tensor names")
        arity = op.arity
        if arity is None and 1 <= len(node.inputs) <= MAX_CONCAT:
            arity = len(node.inputs)
        if len(node.inputs) != arity:
            fail(node, f"reads {len(node.inputs)} tensors, expected {arity}")
        for name in node.inputs:
            if name not in inferred:
                fail(node, f"reads '{name}' before it is defined (not topological)")
        if node.op == "output":
            continue
        if not isinstance(node.output, str) or node.output in inferred:
            fail(node, f"writes '{node.output}' twice (or an invalid name)")
        if node.output not in program.tensors:
            fail(node, f"output tensor '{node.output}' has no TensorSpec")
        ins = [inferred[n] for n in node.inputs]
        dtype, shape, qmin, qmax = op.infer(node, ins)
        recorded = program.tensors[node.output]
        if (recorded.dtype, recorded.shape, recorded.qmin, recorded.qmax) != (
            dtype,
            shape,
            qmin,
            qmax,
        ):
            fail(
                node,
                f"recorded output {recorded.dtype}{list(recorded.shape)}[{recorded.qmin}, "
                f"{recorded.qmax}] != computed {dtype}{list(shape)}[{qmin}, {qmax}]",
            )
        if int(np.prod(shape, dtype=np.int64)) > MAX_ELEMENTS:
            fail(node, f"output shape {list(shape)} is too large")
        inferred[node.output] = recorded
    out = inferred[last.inputs[0]]
    if len(out.shape) != 1:
        fail(last, f"logits must have shape (classes,), got {out.dtype}{out.shape}")
    producers = {n.output: n for n in program.nodes if n.op != "output"}
    producer = producers[last.inputs[0]]
    if out.dtype == "int32":
        if producer.op not in ("linear", "requantize", "conv2d"):
            fail(last, f"logits must come from a layer or its requantize, not {producer.op!r}")
    else:
        # Codes as logits: a model that ends in pooling after its last conv (SqueezeNet's
        # conv -> ReLU -> global average pool); the output widens them to int32.
        source = producers.get(producer.inputs[0]) if producer.op == "flatten" else producer
        if source is None or source.op != "requantize":
            fail(last, "8-bit logits must be a requantize's codes (optionally flattened)")
    if out.scale is None or len(out.scale) != 1:
        fail(last, "logits must carry one positive scale")
    return program


def _check_pixels(spec: TensorSpec) -> TensorSpec:
    if spec.dtype != "uint8" or (spec.qmin, spec.qmax) != (0, 255):
        raise ProgramError("the program input must be uint8 pixels in [0, 255]")
    if len(spec.shape) != 3 or not all(1 <= d <= MAX_DIM for d in spec.shape):
        raise ProgramError(f"the program input shape {list(spec.shape)} is not (C, H, W)")
    if int(np.prod(spec.shape, dtype=np.int64)) > MAX_ELEMENTS:
        raise ProgramError(f"the program input shape {list(spec.shape)} is too large")
    return spec
