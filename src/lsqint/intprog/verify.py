"""verify(program): the checks between stages. Errors name the node, the op and what failed.

verify trusts nothing a file records that it can compute. One forward pass of shape and range
inference re-derives every tensor's shape, dtype and code range from the node attributes, the
integer parameters and the declared input shape, and refuses any recorded figure that differs
(tensor specs, accumulator bounds). Attribute types and sizes are validated first, so a malformed
graph cannot reach a runtime or make one allocate more than the input shape implies. Runtimes
rely on the recorded bounds only because verify has recomputed them.
"""

from __future__ import annotations

import math
from numbers import Real

import numpy as np

from .fixedpoint import INT32_MAX, INT32_MIN, M_MAX, M_MIN, SHIFT_MAX, SHIFT_MIN
from .program import (
    CODE_DTYPES,
    OPS,
    TENSOR_DTYPES,
    IntProgram,
    Node,
    TensorSpec,
    adaptive_lcm,
)

_DTYPE_RANGE = {"uint8": (0, 255), "int8": (-128, 127), "int32": (INT32_MIN, INT32_MAX)}
ACC_LIMIT = 1 << 31  # |acc| must stay below 2^31 (int32)
MAX_DIM = 1 << 16  # no tensor dimension (channels, height, width) beyond this
MAX_ELEMENTS = 1 << 28  # elements of one image's tensor
MAX_CONCAT = 1024  # inputs of one concat


class ProgramError(ValueError):
    """An integer program that is malformed or could overflow."""


def _fail(node: Node, msg: str) -> None:
    raise ProgramError(f"node '{node.name}' ({node.op}): {msg}")


def conv_acc_bound(weight_q: np.ndarray, bias_q: np.ndarray, input_absmax: int) -> np.ndarray:
    """Per output channel: sum|w_q| * max|x_q| + |bias_q| (DESIGN section 4), in int64."""
    w_abs = np.abs(weight_q.astype(np.int64)).reshape(weight_q.shape[0], -1).sum(axis=1)
    return w_abs * int(input_absmax) + np.abs(bias_q.astype(np.int64))


# -- attribute schema ---------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool | np.bool_)


def _int(node, key, lo=None, hi=None) -> int:
    v = node.attrs[key]
    if not _is_int(v):
        _fail(node, f"attribute '{key}' must be an integer, got {v!r}")
    v = int(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        _fail(node, f"attribute '{key}' = {v} outside [{lo}, {hi}]")
    return v


def _pair(node, key, lo, hi) -> tuple[int, int]:
    v = node.attrs[key]
    if not isinstance(v, list | tuple) or len(v) != 2 or not all(_is_int(x) for x in v):
        _fail(node, f"attribute '{key}' must be two integers, got {v!r}")
    if not all(lo <= int(x) <= hi for x in v):
        _fail(node, f"attribute '{key}' = {list(v)} outside [{lo}, {hi}]")
    return int(v[0]), int(v[1])


def _check_spec_fields(spec: TensorSpec) -> None:
    where = f"tensor '{spec.name}'"
    if spec.dtype not in TENSOR_DTYPES:
        raise ProgramError(f"{where}: dtype {spec.dtype!r} is not an integer dtype")
    if not isinstance(spec.shape, tuple) or not all(_is_int(d) for d in spec.shape):
        raise ProgramError(f"{where}: shape {spec.shape!r} is not a tuple of integers")
    if not all(_is_int(v) for v in (spec.qmin, spec.qmax)):
        raise ProgramError(f"{where}: code range must be integers")
    if spec.bits is not None and (not _is_int(spec.bits) or not 2 <= spec.bits <= 8):
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
            _fail(node, f"unknown op; known ops are {sorted(OPS)}")
        if not isinstance(node.name, str) or node.name in names:
            _fail(node, "node names must be distinct strings (the file keys parameters by them)")
        names.add(node.name)
        if node.op == "output" and i != len(program.nodes) - 1:
            _fail(node, "only the last node may be the output")
        param_names, attr_names = OPS[node.op]
        if set(node.params) != set(param_names):
            _fail(node, f"params {sorted(node.params)} != expected {sorted(param_names)}")
        for key, arr in node.params.items():
            if not isinstance(arr, np.ndarray):
                _fail(node, f"param '{key}' is not an array")
        if set(node.attrs) != set(attr_names):
            _fail(node, f"attributes {sorted(node.attrs)} != expected {sorted(attr_names)}")
        if not isinstance(node.inputs, list) or not all(isinstance(n, str) for n in node.inputs):
            _fail(node, "inputs must be a list of tensor names")
        arity = {"add": 2, "mul": 2}.get(node.op, 1)
        if node.op == "concat" and 1 <= len(node.inputs) <= MAX_CONCAT:
            arity = len(node.inputs)
        if len(node.inputs) != arity:
            _fail(node, f"reads {len(node.inputs)} tensors, expected {arity}")
        for name in node.inputs:
            if name not in inferred:
                _fail(node, f"reads '{name}' before it is defined (not topological)")
        if node.op == "output":
            continue
        if not isinstance(node.output, str) or node.output in inferred:
            _fail(node, f"writes '{node.output}' twice (or an invalid name)")
        if node.output not in program.tensors:
            _fail(node, f"output tensor '{node.output}' has no TensorSpec")
        ins = [inferred[n] for n in node.inputs]
        dtype, shape, qmin, qmax = _CHECKS[node.op](node, ins)
        recorded = program.tensors[node.output]
        if (recorded.dtype, recorded.shape, recorded.qmin, recorded.qmax) != (
            dtype,
            shape,
            qmin,
            qmax,
        ):
            _fail(
                node,
                f"recorded output {recorded.dtype}{list(recorded.shape)}[{recorded.qmin}, "
                f"{recorded.qmax}] != computed {dtype}{list(shape)}[{qmin}, {qmax}]",
            )
        if int(np.prod(shape, dtype=np.int64)) > MAX_ELEMENTS:
            _fail(node, f"output shape {list(shape)} is too large")
        inferred[node.output] = recorded
    out = inferred[last.inputs[0]]
    if len(out.shape) != 1:
        _fail(last, f"logits must have shape (classes,), got {out.dtype}{out.shape}")
    producers = {n.output: n for n in program.nodes if n.op != "output"}
    producer = producers[last.inputs[0]]
    if out.dtype == "int32":
        if producer.op not in ("linear", "requantize", "conv2d"):
            _fail(last, f"logits must come from a layer or its requantize, not {producer.op!r}")
    else:
        # Codes as logits: a model that ends in pooling after its last conv (SqueezeNet's
        # conv -> ReLU -> global average pool); the output widens them to int32.
        source = producers.get(producer.inputs[0]) if producer.op == "flatten" else producer
        if source is None or source.op != "requantize":
            _fail(last, "8-bit logits must be a requantize's codes (optionally flattened)")
    if out.scale is None or len(out.scale) != 1:
        _fail(last, "logits must carry one positive scale")
    return program


def _check_pixels(spec: TensorSpec) -> TensorSpec:
    if spec.dtype != "uint8" or (spec.qmin, spec.qmax) != (0, 255):
        raise ProgramError("the program input must be uint8 pixels in [0, 255]")
    if len(spec.shape) != 3 or not all(1 <= d <= MAX_DIM for d in spec.shape):
        raise ProgramError(f"the program input shape {list(spec.shape)} is not (C, H, W)")
    if int(np.prod(spec.shape, dtype=np.int64)) > MAX_ELEMENTS:
        raise ProgramError(f"the program input shape {list(spec.shape)} is too large")
    return spec


def _absmax(spec) -> int:
    return max(abs(spec.qmin), abs(spec.qmax))


def _code_range(node, lo: int, hi: int) -> tuple[str, int, int]:
    """dtype of a narrow code tensor in [lo, hi] (int8 when it can be negative)."""
    if not -128 <= lo <= hi <= 255 or (lo < 0 and hi > 127):
        _fail(node, f"code range [{lo}, {hi}] does not fit 8 bits")
    return ("int8" if lo < 0 else "uint8"), lo, hi


def _checked_affine(node, x, lo_key: str, hi_key: str):
    """clamp((x*a[c] + b[c] + 2^(t-1)) >> t, lo, hi): the input op on pixels, affine on codes."""
    a, b = node.params["a"], node.params["b"]
    t = _int(node, "shift", SHIFT_MIN, SHIFT_MAX)
    if a.dtype != np.int64 or b.dtype != np.int64 or a.shape != b.shape or a.shape != (x.shape[0],):
        _fail(node, "a, b must be int64 with one value per input channel")
    worst = _absmax(x) * int(np.abs(a).max()) + int(np.abs(b).max()) + (1 << (t - 1))
    if worst >= 1 << 63:
        _fail(node, f"x * a + b can reach {worst}, overflowing int64")
    dtype, lo, hi = _code_range(node, _int(node, lo_key), _int(node, hi_key))
    return dtype, x.shape, lo, hi


def _check_input(node, ins):
    (x,) = ins  # uint8 pixels, checked by _check_pixels
    return _checked_affine(node, x, "qmin", "qmax")


def _out_size(node, size, kernel, stride, padding, dilation, ceil_mode=False) -> int:
    span = dilation * (kernel - 1) + 1
    if node.op != "conv2d" and padding > span // 2:  # PyTorch's pooling rule
        _fail(node, f"padding {padding} exceeds half the window {span}")
    if padding >= span:
        _fail(node, f"padding {padding} is not smaller than the window {span}")
    room = size + 2 * padding - span
    if room < 0:
        _fail(node, f"window {span} larger than the padded input {size + 2 * padding}")
    if not ceil_mode:
        return room // stride + 1
    out = -(-room // stride) + 1
    if (out - 1) * stride >= size + padding:  # PyTorch: no window starts in the right padding
        out -= 1
    return out


def _check_layer(node, ins):
    (x,) = ins
    w, bias = node.params["weight"], node.params["bias"]
    bits = _int(node, "weight_bits", 2, 8)
    wmin, wmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if w.dtype != np.int8 or bias.dtype != np.int32:
        _fail(node, f"weight must be int8 codes and bias int32, got {w.dtype} and {bias.dtype}")
    if w.size == 0 or w.min() < wmin or w.max() > wmax:
        _fail(node, f"weight codes empty or outside the {bits}-bit range [{wmin}, {wmax}]")
    if bias.shape != (w.shape[0],):
        _fail(node, f"bias shape {bias.shape} != ({w.shape[0]},)")
    if x.dtype not in CODE_DTYPES:
        _fail(node, f"input '{x.name}' must be 8-bit codes, got {x.dtype}")
    if node.op == "conv2d":
        groups = _int(node, "groups", 1, MAX_DIM)
        stride = _pair(node, "stride", 1, MAX_DIM)
        padding = _pair(node, "padding", 0, MAX_DIM)
        dilation = _pair(node, "dilation", 1, MAX_DIM)
        if len(x.shape) != 3 or w.ndim != 4:
            _fail(node, f"conv reads (C, H, W) codes with a 4-D weight, got {x.shape}, {w.shape}")
        if x.shape[0] != w.shape[1] * groups or w.shape[0] % groups:
            _fail(
                node,
                f"weight {w.shape} does not match input channels {x.shape[0]}, groups {groups}",
            )
        shape = (w.shape[0],) + tuple(
            _out_size(node, x.shape[1 + d], w.shape[2 + d], stride[d], padding[d], dilation[d])
            for d in range(2)
        )
    else:
        if w.ndim != 2 or x.shape != (w.shape[1],):
            _fail(node, f"weight {w.shape} does not match input features {x.shape}")
        shape = (w.shape[0],)
    bound = int(conv_acc_bound(w, bias, _absmax(x)).max())
    if _int(node, "acc_bound") != bound:
        _fail(node, f"recorded acc_bound {node.attrs['acc_bound']} != computed {bound}")
    if bound >= ACC_LIMIT:
        _fail(
            node,
            f"int32 accumulator could overflow: |acc| <= {bound} >= 2^31 "
            f"(input range [{x.qmin}, {x.qmax}], {bits}-bit weights); lower the bits",
        )
    return "int32", shape, INT32_MIN, INT32_MAX


def _check_requantize(node, ins):
    (acc,) = ins
    m, t = node.params["m"], node.params["t"]
    if m.dtype != np.int64 or t.dtype != np.int64 or m.shape != t.shape or m.ndim != 1:
        _fail(node, "m and t must be 1-D int64 arrays of the same length")
    if acc.dtype != "int32" or not acc.shape:
        _fail(node, f"input '{acc.name}' must be an int32 accumulator")
    if m.shape[0] not in (1, acc.shape[0]):
        _fail(node, f"{m.shape[0]} multipliers for {acc.shape[0]} channels")
    if m.min() < M_MIN or m.max() > M_MAX:
        _fail(node, f"multiplier outside [2^30, 2^31): {m.min()}..{m.max()}")
    if t.min() < SHIFT_MIN or t.max() > SHIFT_MAX:
        _fail(node, f"shift outside [{SHIFT_MIN}, {SHIFT_MAX}]")
    lo, hi = _int(node, "lo"), _int(node, "hi")
    if (lo, hi) == (INT32_MIN, INT32_MAX):
        return "int32", acc.shape, lo, hi  # logits on one scale
    dtype, lo, hi = _code_range(node, lo, hi)
    return dtype, acc.shape, lo, hi


def _check_add(node, ins):
    a, b = ins
    if a.shape != b.shape:
        _fail(node, f"shapes differ: {a.shape} + {b.shape}")
    if a.dtype not in CODE_DTYPES or b.dtype not in CODE_DTYPES:
        _fail(node, "add reads 8-bit codes")
    t = _int(node, "shift", SHIFT_MIN, SHIFT_MAX)
    m_a, m_b = _int(node, "m_a"), _int(node, "m_b")
    worst = _absmax(a) * abs(m_a) + _absmax(b) * abs(m_b) + (1 << (t - 1))
    if worst >= 1 << 63:
        _fail(node, f"a * m_a + b * m_b can reach {worst}, overflowing int64")
    dtype, lo, hi = _code_range(node, _int(node, "lo"), _int(node, "hi"))
    return dtype, a.shape, lo, hi


def _check_concat(node, ins):
    if any(x.dtype not in CODE_DTYPES or len(x.shape) < 1 for x in ins):
        _fail(node, "concat reads 8-bit code tensors")
    rest = {x.shape[1:] for x in ins}
    if len(rest) != 1:
        _fail(node, f"inputs differ beyond the channel dim: {sorted(rest)}")
    t = _int(node, "shift", SHIFT_MIN, SHIFT_MAX)
    m = node.attrs["m"]
    if not isinstance(m, list) or len(m) != len(ins) or not all(_is_int(v) for v in m):
        _fail(node, f"attribute 'm' must list one integer per input ({len(ins)})")
    for x, mi in zip(ins, m, strict=True):
        if not 0 < mi < 1 << 40:
            _fail(node, f"multiplier {mi} outside (0, 2^40)")
        worst = _absmax(x) * mi + (1 << (t - 1))
        if worst >= 1 << 63:
            _fail(node, f"x * m + 2^(t-1) can reach {worst}, overflowing int64")
    dtype, lo, hi = _code_range(node, _int(node, "lo"), _int(node, "hi"))
    channels = sum(x.shape[0] for x in ins)
    return dtype, (channels, *ins[0].shape[1:]), lo, hi


def _pool_shape(node, x, dilation, ceil_mode):
    if x.dtype not in CODE_DTYPES or len(x.shape) != 3:
        _fail(node, f"pooling reads (C, H, W) 8-bit codes, got {x.dtype}{x.shape}")
    kernel = _pair(node, "kernel", 1, MAX_DIM)
    stride = _pair(node, "stride", 1, MAX_DIM)
    padding = _pair(node, "padding", 0, MAX_DIM)
    size = tuple(
        _out_size(node, x.shape[1 + d], kernel[d], stride[d], padding[d], dilation[d], ceil_mode)
        for d in range(2)
    )
    return kernel, (x.shape[0], *size)


def _check_maxpool(node, ins):
    (x,) = ins
    dilation = _pair(node, "dilation", 1, MAX_DIM)
    ceil_mode = node.attrs["ceil_mode"]
    if not isinstance(ceil_mode, bool):
        _fail(node, f"attribute 'ceil_mode' must be true or false, got {ceil_mode!r}")
    _, shape = _pool_shape(node, x, dilation, ceil_mode)
    return x.dtype, shape, x.qmin, x.qmax


def _check_avgpool(node, ins):
    (x,) = ins
    (kh, kw), shape = _pool_shape(node, x, (1, 1), False)
    bound = kh * kw * _absmax(x)
    if _int(node, "acc_bound") != bound or bound >= ACC_LIMIT:
        _fail(node, f"window-sum bound {node.attrs['acc_bound']} != computed {bound} or overflows")
    return "int32", shape, INT32_MIN, INT32_MAX


def _check_adaptive_avgpool(node, ins):
    (x,) = ins
    if x.dtype not in CODE_DTYPES or len(x.shape) != 3:
        _fail(node, f"pooling reads (C, H, W) 8-bit codes, got {x.dtype}{x.shape}")
    oh, ow = _pair(node, "out_size", 1, MAX_DIM)
    lcm = adaptive_lcm(x.shape[1:], (oh, ow))
    if _int(node, "lcm") != lcm:
        _fail(node, f"lcm {node.attrs['lcm']} != computed {lcm}")
    # The largest output: a window sum (area * absmax) times lcm // area = lcm * absmax.
    bound = lcm * _absmax(x)
    if _int(node, "acc_bound") != bound or bound >= ACC_LIMIT:
        _fail(node, f"bound {node.attrs['acc_bound']} != computed {bound} or overflows")
    return "int32", (x.shape[0], oh, ow), INT32_MIN, INT32_MAX


def _check_mul(node, ins):
    a, b = ins
    if a.dtype not in CODE_DTYPES or b.dtype not in CODE_DTYPES:
        _fail(node, "mul reads 8-bit codes")
    if len(b.shape) != len(a.shape) or any(
        db not in (1, da) for da, db in zip(a.shape, b.shape, strict=True)
    ):
        _fail(node, f"{list(b.shape)} does not broadcast onto {list(a.shape)}")
    t = _int(node, "shift", SHIFT_MIN, SHIFT_MAX)
    m = _int(node, "m", M_MIN, M_MAX)
    worst = _absmax(a) * _absmax(b) * m + (1 << (t - 1))
    if worst >= 1 << 63:
        _fail(node, f"a * b * m can reach {worst}, overflowing int64")
    dtype, lo, hi = _code_range(node, _int(node, "lo"), _int(node, "hi"))
    return dtype, a.shape, lo, hi


def _check_affine(node, ins):
    (x,) = ins
    if x.dtype not in CODE_DTYPES or len(x.shape) != 3:
        _fail(node, f"affine reads (C, H, W) 8-bit codes, got {x.dtype}{x.shape}")
    return _checked_affine(node, x, "lo", "hi")


def _check_lut(node, ins):
    (x,) = ins
    table = node.params["table"]
    if x.dtype not in CODE_DTYPES:
        _fail(node, "lut reads 8-bit codes")
    if _int(node, "offset") != x.qmin:
        _fail(node, f"offset {node.attrs['offset']} != the input's lowest code {x.qmin}")
    if table.dtype != np.int64 or table.shape != (x.qmax - x.qmin + 1,):
        _fail(node, f"table must be int64 with {x.qmax - x.qmin + 1} entries")
    dtype, lo, hi = _code_range(node, _int(node, "lo"), _int(node, "hi"))
    if table.min() < lo or table.max() > hi:
        _fail(node, f"table values {table.min()}..{table.max()} outside [{lo}, {hi}]")
    return dtype, x.shape, lo, hi


def _int_list(node, key, lo, hi) -> list[int]:
    value = node.attrs[key]
    if (
        not isinstance(value, list)
        or not value
        or not all(_is_int(v) and lo <= v <= hi for v in value)
    ):
        _fail(node, f"attribute '{key}' must be a list of integers in [{lo}, {hi}], got {value!r}")
    return value


def _check_reshape(node, ins):
    (x,) = ins
    shape = _int_list(node, "shape", 1, MAX_ELEMENTS)
    if len(shape) > 6 or int(np.prod(shape, dtype=np.int64)) != int(
        np.prod(x.shape, dtype=np.int64)
    ):
        _fail(
            node,
            f"shape {shape} does not hold the {int(np.prod(x.shape))} elements of {list(x.shape)}",
        )
    return x.dtype, tuple(shape), x.qmin, x.qmax


def _check_transpose(node, ins):
    (x,) = ins
    perm = _int_list(node, "perm", 0, len(x.shape) - 1)
    if sorted(perm) != list(range(len(x.shape))):
        _fail(node, f"perm {perm} is not a permutation of the {len(x.shape)} per-image dims")
    return x.dtype, tuple(x.shape[p] for p in perm), x.qmin, x.qmax


def _check_slice(node, ins):
    (x,) = ins
    axis = _int(node, "axis", 0, len(x.shape) - 1)
    start = _int(node, "start", 0, x.shape[axis] - 1)
    end = _int(node, "end", start + 1, x.shape[axis])
    shape = list(x.shape)
    shape[axis] = end - start
    return x.dtype, tuple(shape), x.qmin, x.qmax


def _check_flatten(node, ins):
    (x,) = ins
    return x.dtype, (int(np.prod(x.shape, dtype=np.int64)),), x.qmin, x.qmax


_CHECKS = {
    "input": _check_input,
    "conv2d": _check_layer,
    "linear": _check_layer,
    "requantize": _check_requantize,
    "add": _check_add,
    "concat": _check_concat,
    "lut": _check_lut,
    "affine": _check_affine,
    "reshape": _check_reshape,
    "transpose": _check_transpose,
    "slice": _check_slice,
    "mul": _check_mul,
    "maxpool2d": _check_maxpool,
    "avgpool2d": _check_avgpool,
    "adaptive_avgpool2d": _check_adaptive_avgpool,
    "flatten": _check_flatten,
}
