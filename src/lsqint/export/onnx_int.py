"""Integer-only ONNX export of an IntProgram; ONNX Runtime reproduces the reference bit for bit.

Every op maps to integer ONNX operators; no float tensor exists between the uint8 input and the
int32 logits:

    codes         int8 / uint8 tensors (sub-8-bit codes in 8-bit containers)
    conv2d        Pad(zero point) -> ConvInteger(uint8, uint8, zero points 128) -> + bias (int32)
    linear        MatMulInteger(uint8, uint8, zero points) -> + bias (int32)
    requantize    int64: acc * m + 2^(t-1), then an exact floor shift (below), Clip, Cast
    add           int64: a * m_a + b * m_b + 2^(t-1), floor shift, Clip, Cast
    input         int64: p * a_c + b_c + 2^(t-1), floor shift, Clip, Cast
    maxpool2d     MaxPool on int8/uint8 codes (padding never wins)
    avgpool2d     window sum: ReduceSum (global) or a depthwise ConvInteger with a ones kernel
    flatten       Flatten

Signed codes enter ConvInteger/MatMulInteger as ``code + 128`` (uint8) with zero point 128, so
``(x_u - 128) * (w_u - 128) == x_q * w_q`` exactly; ONNX Runtime implements these kernels for
uint8 x uint8 on every CPU.

Two faster forms keep the bit-exactness by proof instead of by integer operators:

    int-float     each rounding step as float32/float64 Cast, Mul, Add, Floor, Clip where
                  ``intprog.exact_float`` proves it (the torch runtime's arithmetic)
    qlinear       each conv2d + requantize as one QLinearConv (ONNX Runtime's int8 kernels, as a
                  QDQ model runs) and each rounding step as DequantizeLinear, Add, QuantizeLinear,
                  Clip, where ``intprog.exact_float.qlinear_layer_plan`` / the ``rne`` plans prove
                  them; signed codes travel as uint8 code + 128 between such ops

The qlinear proofs model ONNX Runtime's x86-64 CPU kernels (MLAS): the int32 accumulator, no
int16 saturation (``PAIR_SUM_LIMIT``; uint8 weights otherwise), ``fl(fl(acc + bias) * scale)``
rounded half to even, + zero point, saturate. Every runtime test checks the result against the
reference; on another CPU or execution provider, check it the same way before relying on it.

Floor shift. ONNX's BitShift takes unsigned types only (a logical shift), and integer Div
truncates toward zero; neither is floor division of a negative int64. With the accumulator bound
B that verify() recorded, ``v = acc * m + 2^(t-1) + K * 2^t`` with
``K = ceil(B * max(m) / 2^t) + 1`` is positive and below 2^63, so
``floor(v / 2^t) = (uint64(v) >> t)`` and the result is that minus K.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import ExportError
from ..intprog.exact_float import add_plans, channel_plans, qlinear_layer_plan
from ..intprog.fixedpoint import half
from ..intprog.ops import Unsupported, adaptive_pool_matrix
from ..intprog.program import IntProgram, Node

OPSET = 17


def _require_onnx():
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:  # pragma: no cover - exercised only without the extra
        raise ExportError(
            "ONNX export needs the onnx package: pip install 'lsqint[onnx]'"
        ) from None
    return onnx, TensorProto, helper, numpy_helper


class _Graph:
    def __init__(
        self, program: IntProgram, exact_float: bool = False, qlinear: bool = False, threads=0
    ):
        self.onnx, self.TP, self.helper, self.numpy_helper = _require_onnx()
        self.program = program
        self.exact_float = exact_float  # rounding steps as proven-exact float ops (see _float_step)
        self.qlinear = qlinear  # conv + requantize as one proven-exact QLinearConv (see below)
        # qlinear: signed codes travel as uint8 code + 128 (QLinearConv's and QuantizeLinear's
        # output type); the int8 form is made only for a reader that needs it (``codes``).
        self.shifted: dict[str, str] = {}  # program tensor -> ONNX name of its code + 128
        self.only_shifted: set[str] = set()  # ... that has no int8 form yet
        self.nodes = []
        self.inits = []
        self.count = 0
        self.bounds: dict[str, int] = {}  # tensor name -> |value| bound (for the floor shift)

    def t(self, tensor: str) -> str:
        """The ONNX name of a program tensor (prefixed, so it never clashes with 'logits')."""
        return "input" if tensor == "input" else f"v_{tensor}"

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}__{self.count}"

    def const(self, value: np.ndarray, hint: str) -> str:
        name = self.name(hint)
        self.inits.append(self.numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(
        self, op_type: str, inputs: list[str], hint: str, output: str | None = None, **attrs
    ) -> str:
        out = output or self.name(hint)
        self.nodes.append(
            self.helper.make_node(op_type, inputs, [out], name=self.name(op_type), **attrs)
        )
        return out

    def finish(self, name: str, logits_type: int):
        """uint8 images (N, C, H, W) in, logits of ``logits_type`` out; checked model."""
        c, h, w = self.program.input_spec.shape
        helper = self.helper
        graph = helper.make_graph(
            self.nodes,
            name,
            [helper.make_tensor_value_info("input", self.TP.UINT8, ["N", c, h, w])],
            [
                helper.make_tensor_value_info(
                    "logits", logits_type, ["N", self.program.num_classes()]
                )
            ],
            initializer=self.inits,
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="lsqint"
        )
        model.ir_version = min(model.ir_version, 9)  # readable by ONNX Runtime since 1.16
        self.onnx.checker.check_model(model, full_check=True)
        return model

    def cast(self, x: str, to: str, output: str | None = None) -> str:
        return self.op("Cast", [x], "cast", output, to=getattr(self.TP, to.upper()))

    # -- building blocks ------------------------------------------------------------------------
    def codes(self, tensor: str) -> None:
        """Make the int8 form of a signed tensor that exists only as code + 128."""
        if tensor in self.only_shifted:
            c128 = self.const(np.array(128, np.int16), "c128")
            unshifted = self.op("Sub", [self.cast(self.shifted[tensor], "int16"), c128], "unshift")
            self.cast(unshifted, "int8", self.t(tensor))
            self.only_shifted.discard(tensor)

    def uint8_form(self, tensor: str) -> tuple[str, int]:
        """(ONNX name, zero point) of a code tensor as uint8: itself, or code + 128 (cached)."""
        if self.program.tensors[tensor].dtype == "uint8" or tensor == "input":
            return self.t(tensor), 0
        if tensor not in self.shifted:
            self.shifted[tensor] = self.to_uint8_with_zero_point(self.t(tensor), "int8")[0]
        return self.shifted[tensor], 128

    def to_uint8_with_zero_point(self, x: str, dtype: str) -> tuple[str, str]:
        """Codes -> (uint8 tensor, its zero point): signed codes are shifted by 128."""
        if dtype == "uint8":
            return x, self.const(np.array(0, np.uint8), "zp0")
        shifted = self.op(
            "Add", [self.cast(x, "int16"), self.const(np.array(128, np.int16), "c128")], "shift"
        )
        return self.cast(shifted, "uint8"), self.const(np.array(128, np.uint8), "zp128")

    def floor_shift(
        self,
        value: str,
        t: np.ndarray,
        bound: int,
        m_max: int,
        channel_shape,
        lo: int,
        hi: int,
        addend=0,
    ) -> str:
        """clamp(floor((value + addend) / 2^t), lo, hi) for int64 ``value`` with
        |value + addend| <= bound * m_max + 2^(t-1): the offset trick in the module docstring.
        ``addend`` (the rounding half, a bias) is folded into the offset: one Add, not two."""
        t = np.asarray(t, np.int64)
        k = (int(bound) * int(m_max) + (1 << int(t.min()))) // (1 << int(t.min())) + 1
        if (2 * k + 2) * (1 << int(t.max())) >= 1 << 63:
            raise ExportError(f"floor shift offset overflows int64 (bound {bound}, m {m_max})")
        offset = (np.int64(k) << t).reshape(channel_shape) + np.asarray(addend, np.int64)
        positive = self.op("Add", [value, self.const(offset, "offset")], "pos")
        shifted = self.op(
            "BitShift",
            [
                self.cast(positive, "uint64"),
                self.const(t.astype(np.uint64).reshape(channel_shape), "t"),
            ],
            "shr",
            direction="RIGHT",
        )
        result = self.op(
            "Sub", [self.cast(shifted, "int64"), self.const(np.array(k, np.int64), "k")], "unoffset"
        )
        return self.op(
            "Clip",
            [
                result,
                self.const(np.array(lo, np.int64), "lo"),
                self.const(np.array(hi, np.int64), "hi"),
            ],
            "clip",
        )


def _float_step(g: _Graph, values: list[tuple[str, np.ndarray]], C, lo, hi, dtype, out, code):
    """clamp(floor(sum(fl(x * M)) + C), lo, hi) in float32/float64, cast to the code type: the
    torch runtime's proven-exact replacement of the int64 rounding chain (``exact_float``), as
    separate ONNX ops (IEEE rounding after each, as the proof assumes)."""
    kind = "float" if dtype is np.float32 else "double"
    terms = [g.op("Mul", [g.cast(x, kind), g.const(M.astype(dtype), "M")], "xm") for x, M in values]
    y = terms[0] if len(terms) == 1 else g.op("Add", terms, "sum")
    y = g.op("Floor", [g.op("Add", [y, g.const(np.asarray(C, dtype), "C")], "plus_c")], "floor")
    bounds = [g.const(np.array(v, dtype), name) for v, name in ((lo, "lo"), (hi, "hi"))]
    g.cast(g.op("Clip", [y, *bounds], "clip"), code, out)


def _float_affine(g: _Graph, x, ms, bs, ts, lo, hi, x_range, cs, out, code) -> bool:
    """``_float_step`` of clamp((x*m[c] + b[c] + 2^(t-1)) >> t[c], lo, hi) when exact_float is on
    and ``channel_plans`` proves it for every x in ``x_range``; False leaves the int64 chain."""
    plan = g.exact_float and channel_plans(ms, bs, ts, lo, hi, *x_range)
    if not plan:
        return False
    M, C = (v.reshape(cs) if cs else v.reshape(()) for v in plan[:2])
    _float_step(g, [(x, M)], C, lo, hi, plan[2], out, code)
    return True


def _channel_shape(ndim: int, channels: int) -> tuple[int, ...]:
    return (1, channels, *([1] * (ndim - 2))) if channels > 1 else ()


# Largest |x1*w1 + x2*w2| that ONNX Runtime's u8 x s8 kernels on AVX2 CPUs without VNNI hold:
# they add products pairwise into int16 with saturation (vpmaddubsw).
PAIR_SUM_LIMIT = (1 << 15) - 1


def _qlinear_conv(g: _Graph, conv: Node, req: Node) -> bool:
    """conv2d followed by its only reader, a requantize, as one QLinearConv (x and y scales 1,
    w_scale the per-channel float32 multiplier, the integer offset of ``qlinear_plan`` in the int32
    bias) when that plan is proven for every channel; False leaves the two ops to ``_lower``.

    Exactness rests on: (1) the int32 accumulation, which no ONNX Runtime kernel saturates when
    weights are uint8 (u8 x u8 kernels widen to 16 bits first) or when every pair of int8-weight
    products fits int16 (checked here from the codes' range and the layer's actual weights); (2)
    the float requantize, proven per channel in ``intprog.exact_float``."""
    p, a = g.program, conv.attrs
    x_spec, out_spec = p.tensors[conv.inputs[0]], p.tensors[req.output]
    m, t = req.params["m"], req.params["shift"]
    lo, hi, bound = req.attrs["lo"], req.attrs["hi"], int(a["acc_bound"])
    signed_out = out_spec.dtype == "int8"
    out_min, out_max = (-128, 127) if signed_out else (0, 255)
    plan = qlinear_layer_plan(m, t, lo, hi, -bound, bound, out_min, out_max)
    if plan is None:
        return False
    xu, x_zero = g.uint8_form(conv.inputs[0])
    xz = g.const(np.array(x_zero, np.uint8), "xz")
    x_max = 255 if x_spec.dtype == "int8" else x_spec.qmax
    weight = conv.params["weight"].astype(np.int64)
    if 2 * x_max * int(np.abs(weight).max()) <= PAIR_SUM_LIMIT:
        w, wz = weight.astype(np.int8), np.array(0, np.int8)
    else:  # uint8 weights with zero point 128: ONNX Runtime's exact u8 x u8 path
        w, wz = (weight + 128).astype(np.uint8), np.array(128, np.uint8)
    scale, offsets, z = plan
    bias = conv.params["bias"].astype(np.int64) + offsets
    z += 128 if signed_out else 0  # signed codes travel as code + 128 in QLinearConv's uint8
    one = g.const(np.array(1.0, np.float32), "one")
    ph, pw = a["padding"]
    kh, kw = weight.shape[2:]
    out = _uint8_output(g, req.output)
    clip = (lo, hi) != (out_min, out_max)
    y = g.op(
        "QLinearConv",
        [
            *(xu, one, xz),
            *(g.const(w, "w"), g.const(scale, "w_scale"), g.const(wz, "wz")),
            *(one, g.const(np.array(z, np.uint8), "yz")),
            g.const(bias.astype(np.int32), "bias"),
        ],
        "qconv",
        out if not clip else None,
        strides=a["stride"],
        pads=[ph, pw, ph, pw],
        dilations=a["dilation"],
        group=a["groups"],
        kernel_shape=[kh, kw],
    )
    if clip:
        _clip_uint8(g, y, lo, hi, signed_out, out)
    return True


def _uint8_output(g: _Graph, tensor: str) -> str:
    """The ONNX name a qlinear op writes ``tensor``'s codes to: the tensor itself (uint8), or a
    new name for code + 128 (int8 codes, made on demand by ``_Graph.codes``)."""
    if g.program.tensors[tensor].dtype == "uint8":
        return g.t(tensor)
    g.shifted[tensor] = g.name("shifted")
    g.only_shifted.add(tensor)
    return g.shifted[tensor]


def _clip_uint8(g: _Graph, y: str, lo: int, hi: int, signed: bool, out: str) -> None:
    """uint8 ``y`` (codes, + 128 when ``signed``) clamped to [lo, hi] into ``out``."""
    shift = 128 if signed else 0
    limits = [g.const(np.array(v + shift, np.uint8), "lim") for v in (lo, hi)]
    g.op("Clip", [y, *limits], "clip", out)


def _dq_step(g: _Graph, terms, C, lo: int, hi: int, out: str) -> None:
    """A float32 rounding step (a proven ``rne`` plan of ``intprog.exact_float``) as ONNX
    Runtime's own quantization ops: DequantizeLinear gives fl((x - zero point) * M) per input
    (one rounding, as the proof assumes), then Add, Add C, QuantizeLinear (scale 1: round half to
    even, saturate) and Clip. ``terms``: (program tensor, M) pairs, M a scalar or per channel."""
    values = []
    for tensor, M in terms:
        if g.program.tensors[tensor].dtype == "int32":
            x, zero, dtype = g.t(tensor), 0, np.int32
        else:
            (x, zero), dtype = g.uint8_form(tensor), np.uint8
        M = np.asarray(M, np.float32)
        zeros = g.const(np.full(M.shape, zero, dtype), "zp")
        attrs = {"axis": 1} if M.ndim else {}
        values.append(g.op("DequantizeLinear", [x, g.const(M, "M"), zeros], "dq", **attrs))
    y = values[0] if len(values) == 1 else g.op("Add", values, "sum")
    y = g.op("Add", [y, g.const(np.asarray(C, np.float32), "C")], "plus_c")
    signed = g.program.tensors[out].dtype == "int8"
    zero_out = g.const(np.array(128 if signed else 0, np.uint8), "zq")
    q = g.op("QuantizeLinear", [y, g.const(np.array(1.0, np.float32), "one"), zero_out], "q")
    _clip_uint8(g, q, lo, hi, signed, _uint8_output(g, out))


def _per_channel(plan, ndim: int):
    """(M, C) of a ``channel_plans`` result: scalars when one plan covers every channel."""
    M, C = plan[:2]
    if len(M) == 1:
        return M[0], C[0]
    return M, C.reshape(_channel_shape(ndim, len(C)))


def _qlinear_add(g: _Graph, node: Node) -> bool:
    p, a = g.program, node.attrs
    ranges = [(p.tensors[n].qmin, p.tensors[n].qmax) for n in node.inputs]
    plan = add_plans(a["m_a"], a["m_b"], a["shift"], a["lo"], a["hi"], *ranges, **_RNE)
    if plan:
        terms = list(zip(node.inputs, plan[:2], strict=True))
        _dq_step(g, terms, plan[2], a["lo"], a["hi"], node.output)
    return bool(plan)


def _qlinear_requantize(g: _Graph, node: Node) -> bool:
    p, a, x = g.program, node.attrs, node.inputs[0]
    if x not in g.bounds:
        return False
    m, t, bound = node.params["m"], node.params["shift"], g.bounds[x]
    plan = channel_plans(m, np.zeros_like(m), t, a["lo"], a["hi"], -bound, bound, **_RNE)
    if plan:
        M, C = _per_channel(plan, len(p.tensors[node.output].shape) + 1)
        _dq_step(g, [(x, M)], C, a["lo"], a["hi"], node.output)
    return bool(plan)


def _qlinear_affine(g: _Graph, node: Node) -> bool:
    """The input op (pixels) and the affine op (codes): one rule."""
    p, a, x = g.program, node.attrs, node.inputs[0]
    ca, cb, xs = node.params["a"], node.params["b"], p.tensors[x]
    ts = [a["shift"]] * len(ca)
    plan = channel_plans(ca, cb, ts, a["lo"], a["hi"], xs.qmin, xs.qmax, **_RNE)
    if plan:
        M, C = _per_channel(plan, len(p.tensors[node.output].shape) + 1)
        _dq_step(g, [(x, M)], C, a["lo"], a["hi"], node.output)
    return bool(plan)


_RNE = {"dtypes": (np.float32,), "rounding": "rne"}

# The qlinear export's own lowerings: each returns False where no float32 ``rne`` plan is
# proven, leaving the node to LOWERINGS. Ops not listed always take LOWERINGS' lowering.
QLINEAR_STEPS: dict[str, Callable[[_Graph, Node], bool]] = {
    "add": _qlinear_add,
    "requantize": _qlinear_requantize,
    "input": _qlinear_affine,
    "affine": _qlinear_affine,
}


def _qlinear_step(g: _Graph, node: Node) -> bool:
    step = QLINEAR_STEPS.get(node.op)
    return step is not None and step(g, node)


def _io(g: _Graph, node: Node):
    """What a lowering reads: the program, the output's spec, the attributes, and the ONNX
    names of the first input and of the output."""
    p = g.program
    return p, p.tensors.get(node.output), node.attrs, g.t(node.inputs[0]), g.t(node.output)


def _onnx_layer(g: _Graph, node: Node) -> None:
    p, spec, a, x, out = _io(g, node)
    x_name = node.inputs[0]
    if node.op == "conv2d" and g.qlinear:
        # ConvInteger on the cached uint8 form of the input, its own padding (with the input's
        # zero point, i.e. code 0), uint8 weights (its int8-weight path measured 5x slower)
        xu, x_zero = g.uint8_form(x_name)
        xz = g.const(np.array(x_zero, np.uint8), "xz")
        weight = node.params["weight"].astype(np.int64)
        w, wz = (weight + 128).astype(np.uint8), np.array(128, np.uint8)
        ph, pw = a["padding"]
        acc = g.op(
            "ConvInteger",
            [xu, g.const(w, "w"), xz, g.const(wz, "wz")],
            "conv",
            strides=a["stride"],
            pads=[ph, pw, ph, pw],
            dilations=a["dilation"],
            group=a["groups"],
            kernel_shape=list(weight.shape[2:]),
        )
        bias = node.params["bias"].astype(np.int32).reshape(1, -1, 1, 1)
        g.op("Add", [acc, g.const(bias, "bias")], "acc", out)
        g.bounds[node.output] = int(a["acc_bound"])
        return
    xu, xz = g.to_uint8_with_zero_point(x, p.tensors[x_name].dtype)
    wu = (node.params["weight"].astype(np.int16) + 128).astype(np.uint8)
    wz = g.const(np.array(128, np.uint8), "wz")
    bias = node.params["bias"].astype(np.int32)
    if node.op == "conv2d":
        ph, pw = a["padding"]
        if ph or pw:
            pads = g.const(np.array([0, 0, ph, pw, 0, 0, ph, pw], np.int64), "pads")
            xu = g.op("Pad", [xu, pads, xz], "pad", mode="constant")
        kh, kw = node.params["weight"].shape[2:]
        acc = g.op(
            "ConvInteger",
            [xu, g.const(wu, "w"), xz, wz],
            "conv",
            strides=a["stride"],
            dilations=a["dilation"],
            group=a["groups"],
            kernel_shape=[kh, kw],
        )
        bias = bias.reshape(1, -1, 1, 1)
    else:
        acc = g.op(
            "MatMulInteger", [xu, g.const(np.ascontiguousarray(wu.T), "w"), xz, wz], "matmul"
        )
        bias = bias.reshape(1, -1)
    g.op("Add", [acc, g.const(bias, "bias")], "acc", out)
    g.bounds[node.output] = int(a["acc_bound"])


def _onnx_requantize(g: _Graph, node: Node) -> None:
    p, spec, a, x, out = _io(g, node)
    x_name = node.inputs[0]
    m, t = node.params["m"], node.params["shift"]
    ndim = len(p.tensors[x_name].shape) + 1
    cs = _channel_shape(ndim, len(m))
    bound = g.bounds[x_name]
    zeros, lo, hi = np.zeros_like(m), a["lo"], a["hi"]
    if _float_affine(g, x, m, zeros, t, lo, hi, (-bound, bound), cs, out, spec.dtype):
        return
    v = g.op(
        "Mul", [g.cast(x, "int64"), g.const(m.reshape(cs) if cs else m.reshape(()), "m")], "am"
    )
    addend = half(t).reshape(cs) if cs else np.int64(half(int(t[0])))
    y = g.floor_shift(v, t, g.bounds[x_name], int(m.max()), cs, a["lo"], a["hi"], addend)
    g.cast(y, spec.dtype, out)


def _onnx_add(g: _Graph, node: Node) -> None:
    p, spec, a, x, out = _io(g, node)
    t = a["shift"]
    ranges = [(p.tensors[n].qmin, p.tensors[n].qmax) for n in node.inputs]
    plan = g.exact_float and add_plans(a["m_a"], a["m_b"], t, a["lo"], a["hi"], *ranges)
    if plan:
        Ma, Mb, C, dtype = plan
        terms = [(g.t(n), np.asarray(M)) for n, M in zip(node.inputs, (Ma, Mb), strict=True)]
        _float_step(g, terms, C, a["lo"], a["hi"], dtype, out, spec.dtype)
        return
    va = g.op(
        "Mul",
        [g.cast(g.t(node.inputs[0]), "int64"), g.const(np.array(a["m_a"], np.int64), "ma")],
        "ama",
    )
    vb = g.op(
        "Mul",
        [g.cast(g.t(node.inputs[1]), "int64"), g.const(np.array(a["m_b"], np.int64), "mb")],
        "bmb",
    )
    v = g.op("Add", [va, vb], "sum")
    bound = 255 * (abs(a["m_a"]) + abs(a["m_b"])) + half(t)
    y = g.floor_shift(v, np.array([t]), bound, 1, (), a["lo"], a["hi"], half(t))
    g.cast(y, spec.dtype, out)


def _onnx_concat(g: _Graph, node: Node) -> None:
    p, spec, a, x, out = _io(g, node)
    t = a["shift"]
    parts = []
    for name, m in zip(node.inputs, a["m"], strict=True):
        v = g.op("Mul", [g.cast(g.t(name), "int64"), g.const(np.array(m, np.int64), "m")], "xm")
        bound = 255 * abs(m) + half(t)
        parts.append(g.floor_shift(v, np.array([t]), bound, 1, (), a["lo"], a["hi"], half(t)))
    g.cast(g.op("Concat", parts, "concat", axis=1), spec.dtype, out)


def _onnx_maxpool(g: _Graph, node: Node) -> None:
    p, spec, a, x, out = _io(g, node)
    ph, pw = a["padding"]
    g.op(
        "MaxPool",
        [x],
        "maxpool",
        out,
        kernel_shape=a["kernel"],
        strides=a["stride"],
        pads=[ph, pw, ph, pw],
        dilations=a["dilation"],
        ceil_mode=int(a["ceil_mode"]),
    )


def _onnx_avgpool(g: _Graph, node: Node) -> None:
    p, spec, a, x, out = _io(g, node)
    x_name = node.inputs[0]
    in_shape = p.tensors[x_name].shape
    kernel, stride, (ph, pw) = a["kernel"], a["stride"], a["padding"]
    if list(kernel) == list(in_shape[1:]) and not (ph or pw):
        g.op(
            "ReduceSum",
            [g.cast(x, "int32"), g.const(np.array([2, 3], np.int64), "axes")],
            "sum",
            out,
            keepdims=1,
        )
    else:
        xu, xz = g.to_uint8_with_zero_point(x, p.tensors[x_name].dtype)
        if ph or pw:
            pads = g.const(np.array([0, 0, ph, pw, 0, 0, ph, pw], np.int64), "pads")
            xu = g.op("Pad", [xu, pads, xz], "pad", mode="constant")
        channels = in_shape[0]
        ones = np.ones((channels, 1, *kernel), np.uint8)
        g.op(
            "ConvInteger",
            [xu, g.const(ones, "ones"), xz, g.const(np.array(0, np.uint8), "zp0")],
            "poolsum",
            out,
            strides=stride,
            group=channels,
            kernel_shape=kernel,
        )
    g.bounds[node.output] = int(a["acc_bound"])


def _onnx_mul(g: _Graph, node: Node) -> None:
    p, spec, a, x, out = _io(g, node)
    t = a["shift"]
    product = g.op(
        "Mul",
        [g.cast(g.t(node.inputs[0]), "int64"), g.cast(g.t(node.inputs[1]), "int64")],
        "ab",
    )
    v = g.op("Mul", [product, g.const(np.array(a["m"], np.int64), "m")], "abm")
    absmax = [max(abs(p.tensors[n].qmin), abs(p.tensors[n].qmax)) for n in node.inputs]
    bound = absmax[0] * absmax[1] * a["m"] + half(t)
    y = g.floor_shift(v, np.array([t]), bound, 1, (), a["lo"], a["hi"], half(t))
    g.cast(y, spec.dtype, out)


def _onnx_affine(g: _Graph, node: Node) -> None:
    """The input op (pixels) and the affine op (codes): one rule, x*a[c] + b[c] >> shift."""
    p, spec, a, x, out = _io(g, node)
    x_name = node.inputs[0]
    t = a["shift"]
    ca, cb, xs = node.params["a"], node.params["b"], p.tensors[x_name]
    cs = _channel_shape(4, len(ca))
    ts, lo, hi = [t] * len(ca), a["lo"], a["hi"]
    if _float_affine(g, x, ca, cb, ts, lo, hi, (xs.qmin, xs.qmax), cs, out, spec.dtype):
        return
    acc = g.op("Mul", [g.cast(x, "int64"), g.const(ca.reshape(cs), "a")], "xa")
    x_max = max(abs(xs.qmin), abs(xs.qmax))
    bound = x_max * int(np.abs(ca).max()) + int(np.abs(cb).max()) + half(t)
    addend = (cb + half(t)).reshape(cs)
    y = g.floor_shift(acc, np.array([t]), bound, 1, (), lo, hi, addend)
    g.cast(y, spec.dtype, out)


def _onnx_lut(g: _Graph, node: Node) -> None:
    p, spec, a, x, out = _io(g, node)
    index = g.op(
        "Sub",
        [g.cast(x, "int64"), g.const(np.array(a["offset"], np.int64), "offset")],
        "index",
    )
    table = g.const(node.params["table"].astype(np.int64), "table")
    g.cast(g.op("Gather", [table, index], "lookup", axis=0), spec.dtype, out)


def _onnx_adaptive_avgpool(g: _Graph, node: Node) -> None:
    p, spec, a, x, out = _io(g, node)
    x_name = node.inputs[0]
    channels, h, w = p.tensors[x_name].shape
    oh, ow = a["out_size"]
    matrix = adaptive_pool_matrix((h, w), (oh, ow), a["lcm"])
    flat = g.op(
        "Reshape", [g.cast(x, "int64"), g.const(np.array([0, channels, h * w]), "hw")], "flat"
    )
    sums = g.op("MatMul", [flat, g.const(matrix, "pool")], "poolsum")
    total = g.op("Reshape", [sums, g.const(np.array([0, channels, oh, ow]), "chw")], "pooled")
    g.cast(total, "int32", out)
    g.bounds[node.output] = int(a["acc_bound"])


def _onnx_reshape(g: _Graph, node: Node) -> None:
    p, spec, a, x, out = _io(g, node)
    g.op("Reshape", [x, g.const(np.array([0, *a["shape"]], np.int64), "shape")], "reshape", out)


def _onnx_transpose(g: _Graph, node: Node) -> None:
    p, spec, a, x, out = _io(g, node)
    g.op("Transpose", [x], "transpose", out, perm=[0, *(q + 1 for q in a["perm"])])


def _onnx_slice(g: _Graph, node: Node) -> None:
    p, spec, a, x, out = _io(g, node)
    g.op(
        "Slice",
        [
            x,
            g.const(np.array([a["start"]], np.int64), "starts"),
            g.const(np.array([a["end"]], np.int64), "ends"),
            g.const(np.array([a["axis"] + 1], np.int64), "axes"),
        ],
        "slice",
        out,
    )


def _onnx_flatten(g: _Graph, node: Node) -> None:
    g.op("Flatten", [g.t(node.inputs[0])], "flatten", g.t(node.output), axis=1)


# The integer ONNX lowering of each op of the registry (intprog.ops), or Unsupported with the
# reason. ``qlinear`` exports first try ``_qlinear_conv`` / ``QLINEAR_STEPS`` and fall back here.
LOWERINGS: dict[str, Callable | Unsupported] = {
    "input": _onnx_affine,  # the affine rule on pixels
    "affine": _onnx_affine,
    "conv2d": _onnx_layer,
    "linear": _onnx_layer,
    "requantize": _onnx_requantize,
    "add": _onnx_add,
    "concat": _onnx_concat,
    "mul": _onnx_mul,
    "lut": _onnx_lut,
    "maxpool2d": _onnx_maxpool,
    "avgpool2d": _onnx_avgpool,
    "adaptive_avgpool2d": _onnx_adaptive_avgpool,
    "flatten": _onnx_flatten,
    "reshape": _onnx_reshape,
    "transpose": _onnx_transpose,
    "slice": _onnx_slice,
    "output": Unsupported("lowered by to_onnx_model itself: a Cast of the logits to int32"),
}


def _lower(g: _Graph, node: Node) -> None:
    lower = LOWERINGS.get(node.op)
    if not callable(lower):
        why = lower.reason if isinstance(lower, Unsupported) else "not in its table"
        raise ExportError(f"node '{node.name}' ({node.op}): no integer ONNX lowering ({why})")
    lower(g, node)


def to_onnx_model(program: IntProgram, exact_float: bool = False, qlinear: bool = False):
    """The program as an onnx.ModelProto (checked with onnx.checker). ``exact_float``: the
    rounding steps (requantize, add, input, affine) as float32/float64 Mul, Add, Floor, Clip
    wherever ``intprog.exact_float`` proves them equal to the integer rule, as the torch runtime
    runs them; else (default) integer operators only. ``qlinear`` (implies ``exact_float``): each
    conv2d whose only reader is a requantize becomes one ONNX Runtime QLinearConv where
    ``_qlinear_conv`` proves it exact (ONNX Runtime's int8 kernels, as a QDQ model runs)."""
    g = _Graph(program, exact_float or qlinear, qlinear)
    readers: dict[str, list[Node]] = {}
    for node in program.nodes:
        for name in node.inputs:
            readers.setdefault(name, []).append(node)
    fused: set[str] = set()  # requantize nodes already lowered inside a QLinearConv
    for node in program.nodes:
        if node.op == "output":
            g.codes(node.inputs[0])
            g.cast(g.t(node.inputs[0]), "int32", "logits")
            continue
        if node.name in fused:
            continue
        after = readers.get(node.output, [])
        if (
            qlinear
            and node.op == "conv2d"
            and len(after) == 1
            and after[0].op == "requantize"
            and _qlinear_conv(g, node, after[0])
        ):
            fused.add(after[0].name)
            continue
        if qlinear and _qlinear_step(g, node):
            continue
        for name in node.inputs:
            g.codes(name)
        _lower(g, node)
    return g.finish("lsqint_intprogram", g.TP.INT32)


def write_model(model, path) -> int:
    """Serialize ``model`` to ``path`` atomically; returns the file size in bytes."""
    import os
    from pathlib import Path

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(model.SerializeToString())
    os.replace(tmp, path)
    return path.stat().st_size


def export_onnx(program: IntProgram, path, exact_float: bool = False, qlinear: bool = False) -> int:
    """Write the ONNX model (integer operators only unless ``exact_float`` or ``qlinear``);
    returns its size."""
    return write_model(to_onnx_model(program, exact_float, qlinear), path)


class OnnxSession:
    """An ONNX Runtime session (CPU) for a program, reusable across batches."""

    def __init__(
        self, program: IntProgram, exact_float: bool = False, qlinear: bool = False, threads=0
    ):
        try:
            import onnxruntime as ort
        except ImportError:  # pragma: no cover
            raise ExportError(
                "the onnx runtime needs onnxruntime: pip install 'lsqint[onnx]'"
            ) from None
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads  # 0: ONNX Runtime's default (one per core)
        # The qlinear format's DequantizeLinear -> Add -> QuantizeLinear steps are proven as
        # written; ONNX Runtime must not fuse them into its own QLinearAdd-style kernels.
        options.add_session_config_entry("session.disable_quant_qdq", "1")
        self.session = ort.InferenceSession(
            to_onnx_model(program, exact_float, qlinear).SerializeToString(),
            options,
            providers=["CPUExecutionProvider"],
        )

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(["logits"], {"input": np.ascontiguousarray(images)})[0]


def run_onnx(
    program: IntProgram, images: np.ndarray, exact_float: bool = False, qlinear: bool = False
) -> np.ndarray:
    return OnnxSession(program, exact_float, qlinear)(images)
