"""verify(program): the checks between stages. Errors name the node, the op and what failed."""

from __future__ import annotations

import numpy as np

from .fixedpoint import INT32_MAX, INT32_MIN, M_MAX, M_MIN, SHIFT_MAX, SHIFT_MIN
from .program import CODE_DTYPES, OPS, TENSOR_DTYPES, IntProgram, Node

_DTYPE_RANGE = {"uint8": (0, 255), "int8": (-128, 127), "int32": (INT32_MIN, INT32_MAX)}
ACC_LIMIT = 1 << 31  # |acc| must stay below 2^31 (int32)


class ProgramError(ValueError):
    """An integer program that is malformed or could overflow."""


def _fail(node: Node, msg: str) -> None:
    raise ProgramError(f"node '{node.name}' ({node.op}): {msg}")


def conv_acc_bound(weight_q: np.ndarray, bias_q: np.ndarray, input_absmax: int) -> np.ndarray:
    """Per output channel: sum|w_q| * max|x_q| + |bias_q| (DESIGN section 4), in int64."""
    w_abs = np.abs(weight_q.astype(np.int64)).reshape(weight_q.shape[0], -1).sum(axis=1)
    return w_abs * int(input_absmax) + np.abs(bias_q.astype(np.int64))


def verify(program: IntProgram) -> IntProgram:
    """Check dtypes, shapes, ranges, fixed-point parameters and int32 accumulator bounds."""
    if not program.nodes:
        raise ProgramError("empty program")
    first, last = program.nodes[0], program.nodes[-1]
    if first.op != "input" or last.op != "output":
        raise ProgramError("a program starts with an 'input' node and ends with an 'output' node")
    for spec in program.tensors.values():
        if spec.dtype not in TENSOR_DTYPES:
            raise ProgramError(
                f"tensor '{spec.name}': dtype {spec.dtype!r} is not an integer dtype"
            )
        lo, hi = _DTYPE_RANGE[spec.dtype]
        if not lo <= spec.qmin <= spec.qmax <= hi:
            raise ProgramError(
                f"tensor '{spec.name}': range [{spec.qmin}, {spec.qmax}] does not fit {spec.dtype}"
            )
    defined = {first.inputs[0]}
    if program.tensors[first.inputs[0]].dtype != "uint8":
        raise ProgramError("the program input must be uint8 pixels")
    for node in program.nodes:
        if node.op not in OPS:
            _fail(node, f"unknown op; known ops are {sorted(OPS)}")
        param_names, attr_names = OPS[node.op]
        if set(node.params) != set(param_names):
            _fail(node, f"params {sorted(node.params)} != expected {sorted(param_names)}")
        missing = set(attr_names) - set(node.attrs)
        if missing:
            _fail(node, f"missing attributes {sorted(missing)}")
        for name in node.inputs:
            if name not in defined:
                _fail(node, f"reads '{name}' before it is defined (not topological)")
        if node.op == "output":
            continue
        if node.output in defined:
            _fail(node, f"writes '{node.output}' twice")
        if node.output not in program.tensors:
            _fail(node, f"output tensor '{node.output}' has no TensorSpec")
        _CHECKS[node.op](program, node)
        defined.add(node.output)
    out = program.tensors[last.inputs[0]]
    if len(out.shape) != 1:
        _fail(last, f"logits must have shape (classes,), got {out.shape}")
    return program


def _spec(program, name):
    return program.tensors[name]


def _absmax(spec) -> int:
    return max(abs(spec.qmin), abs(spec.qmax))


def _check_input(program, node):
    a, b = node.params["a"], node.params["b"]
    t = node.attrs["shift"]
    out = _spec(program, node.output)
    x = _spec(program, node.inputs[0])
    if a.dtype != np.int64 or b.dtype != np.int64 or a.shape != b.shape or a.shape != (x.shape[0],):
        _fail(node, "a, b must be int64 with one value per input channel")
    if out.dtype not in CODE_DTYPES or (out.qmin, out.qmax) != (
        node.attrs["qmin"],
        node.attrs["qmax"],
    ):
        _fail(node, "output must be 8-bit codes with the op's [qmin, qmax]")
    if not SHIFT_MIN <= t <= SHIFT_MAX:
        _fail(node, f"shift {t} outside [{SHIFT_MIN}, {SHIFT_MAX}]")
    worst = 255 * int(np.abs(a).max()) + int(np.abs(b).max()) + (1 << (t - 1))
    if worst >= 1 << 63:
        _fail(node, f"p * a + b can reach {worst}, overflowing int64")


def _check_layer(program, node):
    w, bias = node.params["weight"], node.params["bias"]
    x = _spec(program, node.inputs[0])
    out = _spec(program, node.output)
    bits = node.attrs["weight_bits"]
    wmin, wmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if w.dtype != np.int8 or bias.dtype != np.int32:
        _fail(node, f"weight must be int8 codes and bias int32, got {w.dtype} and {bias.dtype}")
    if w.size and (w.min() < wmin or w.max() > wmax):
        _fail(node, f"weight codes outside the {bits}-bit range [{wmin}, {wmax}]")
    if bias.shape != (w.shape[0],):
        _fail(node, f"bias shape {bias.shape} != ({w.shape[0]},)")
    if x.dtype not in CODE_DTYPES:
        _fail(node, f"input '{x.name}' must be 8-bit codes, got {x.dtype}")
    if out.dtype != "int32":
        _fail(node, "accumulator output must be int32")
    if node.op == "conv2d":
        groups = node.attrs["groups"]
        if w.ndim != 4 or x.shape[0] != w.shape[1] * groups or w.shape[0] % groups:
            _fail(
                node,
                f"weight {w.shape} does not match input channels {x.shape[0]}, groups {groups}",
            )
    elif w.ndim != 2 or x.shape != (w.shape[1],):
        _fail(node, f"weight {w.shape} does not match input features {x.shape}")
    bound = int(conv_acc_bound(w, bias, _absmax(x)).max())
    if bound != node.attrs["acc_bound"]:
        _fail(node, f"recorded acc_bound {node.attrs['acc_bound']} != computed {bound}")
    if bound >= ACC_LIMIT:
        _fail(
            node,
            f"int32 accumulator could overflow: |acc| <= {bound} >= 2^31 "
            f"(input range [{x.qmin}, {x.qmax}], {bits}-bit weights); lower the bits",
        )


def _check_requantize(program, node):
    m, t = node.params["m"], node.params["t"]
    acc = _spec(program, node.inputs[0])
    out = _spec(program, node.output)
    if m.dtype != np.int64 or t.dtype != np.int64 or m.shape != t.shape or m.ndim != 1:
        _fail(node, "m and t must be 1-D int64 arrays of the same length")
    channels = acc.shape[0]
    if m.shape[0] not in (1, channels):
        _fail(node, f"{m.shape[0]} multipliers for {channels} channels")
    if m.min() < M_MIN or m.max() > M_MAX:
        _fail(node, f"multiplier outside [2^30, 2^31): {m.min()}..{m.max()}")
    if t.min() < SHIFT_MIN or t.max() > SHIFT_MAX:
        _fail(node, f"shift outside [{SHIFT_MIN}, {SHIFT_MAX}]")
    if acc.dtype != "int32":
        _fail(node, f"input '{acc.name}' must be an int32 accumulator")
    if not out.qmin <= node.attrs["lo"] <= node.attrs["hi"] <= out.qmax:
        _fail(node, "clamp [lo, hi] lies outside the output range")
    if acc.shape != out.shape:
        _fail(node, f"shape changes from {acc.shape} to {out.shape}")


def _check_add(program, node):
    a, b = (_spec(program, n) for n in node.inputs)
    out = _spec(program, node.output)
    if a.shape != b.shape or a.shape != out.shape:
        _fail(node, f"shapes differ: {a.shape} + {b.shape} -> {out.shape}")
    if a.dtype not in CODE_DTYPES or b.dtype not in CODE_DTYPES:
        _fail(node, "add reads 8-bit codes")
    t = node.attrs["shift"]
    if not SHIFT_MIN <= t <= SHIFT_MAX:
        _fail(node, f"shift {t} outside [{SHIFT_MIN}, {SHIFT_MAX}]")
    worst = (
        _absmax(a) * abs(node.attrs["m_a"]) + _absmax(b) * abs(node.attrs["m_b"]) + (1 << (t - 1))
    )
    if worst >= 1 << 63:
        _fail(node, f"a * m_a + b * m_b can reach {worst}, overflowing int64")


def _check_pool(program, node):
    x = _spec(program, node.inputs[0])
    if x.dtype not in CODE_DTYPES or len(x.shape) != 3:
        _fail(node, f"pooling reads (C, H, W) 8-bit codes, got {x.dtype}{x.shape}")
    if node.op == "avgpool2d":
        kh, kw = node.attrs["kernel"]
        bound = kh * kw * _absmax(x)
        if bound != node.attrs["acc_bound"] or bound >= ACC_LIMIT:
            _fail(node, f"window-sum bound {bound} is wrong or overflows int32")


def _check_flatten(program, node):
    x, out = _spec(program, node.inputs[0]), _spec(program, node.output)
    if int(np.prod(x.shape)) != int(np.prod(out.shape)) or len(out.shape) != 1:
        _fail(node, f"flatten {x.shape} -> {out.shape}")


_CHECKS = {
    "input": _check_input,
    "conv2d": _check_layer,
    "linear": _check_layer,
    "requantize": _check_requantize,
    "add": _check_add,
    "maxpool2d": _check_pool,
    "avgpool2d": _check_pool,
    "flatten": _check_flatten,
}
