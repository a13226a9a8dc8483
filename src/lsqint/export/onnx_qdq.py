"""QDQ ONNX export of an 8-bit IntProgram: QuantizeLinear/DequantizeLinear around float operators.

This is the form TensorRT and ONNX Runtime's quantization tooling consume. It is NOT bit-exact by
nature: the float conv sums in another order, and QuantizeLinear rounds half to even where the
integer program rounds half up with a 31-bit fixed-point multiplier. ``lsqint`` measures its top-1
against the integer program instead (tests/test_onnx.py). Sub-8-bit programs are refused:
QuantizeLinear saturates to the full int8/uint8 range, so their codes have no QDQ form before
opset 21's int4 (and none at 2 or 3 bits).

    codes (int8/uint8) --DequantizeLinear(s)--> float --Conv/Gemm/AveragePool/Add--> float
        --[Clip for ReLU6-style ranges]--> QuantizeLinear(s_out) --> codes
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import ExportError
from ..intprog.ops import Unsupported
from ..intprog.program import IntProgram, Node
from .onnx_int import _Graph, write_model


def _full_range(dtype: str) -> tuple[int, int]:
    return (-128, 127) if dtype == "int8" else (0, 255)


def _f32(value):
    return np.asarray(value, np.float32)


class _Qdq:
    """The QDQ graph being built: each program tensor's ONNX float value once dequantized."""

    def __init__(self, program: IntProgram) -> None:
        self.program = program
        self.g = _Graph(program)
        self.scales = {name: spec.scale for name, spec in program.tensors.items()}
        self.real: dict[str, str] = {}  # program tensor -> ONNX float tensor of its real value
        self.output_name = program.nodes[-1].inputs[0]

    def dequant(self, name: str) -> str:
        if name not in self.real:
            scale = self.g.const(_f32(self.scales[name][0]), "s")
            self.real[name] = self.g.op("DequantizeLinear", [self.g.t(name), scale], "dq")
        return self.real[name]

    def quant(self, value: str, node: Node) -> None:
        g, spec = self.g, self.program.tensors[node.output]
        s_out = float(spec.scale[0])
        lo, hi = _full_range(spec.dtype)
        if (spec.qmin, spec.qmax) != (lo, hi):  # fused ReLU6-style clamps
            bounds = [
                g.const(_f32(spec.qmin * s_out), "lo"),
                g.const(_f32(spec.qmax * s_out), "hi"),
            ]
            value = g.op("Clip", [value, *bounds], "clip")
        zp = np.array(0, np.int8 if spec.dtype == "int8" else np.uint8)
        g.op(
            "QuantizeLinear",
            [value, g.const(_f32(s_out), "s"), g.const(zp, "zp")],
            "q",
            g.t(node.output),
        )


def _qdq_input(q: _Qdq, node: Node) -> None:
    g, t = q.g, node.attrs["shift"]
    ca = (node.params["a"] / 2.0**t).reshape(1, -1, 1, 1)
    cb = (node.params["b"] / 2.0**t).reshape(1, -1, 1, 1)
    pixels = g.cast("input", "float")
    codes = g.op(
        "Add",
        [g.op("Mul", [pixels, g.const(_f32(ca), "a")], "pa"), g.const(_f32(cb), "b")],
        "code_real",
    )
    zp = np.array(0, np.int8 if q.program.tensors[node.output].dtype == "int8" else np.uint8)
    g.op(
        "QuantizeLinear",
        [codes, g.const(_f32(1.0), "one"), g.const(zp, "zp")],
        "q",
        g.t(node.output),
    )


def _qdq_layer(q: _Qdq, node: Node) -> None:
    g, a, x = q.g, node.attrs, node.inputs[0]
    s_x = float(q.scales[x][0])
    s_w = np.asarray(q.scales[node.output], np.float64) / s_x
    w = g.op(
        "DequantizeLinear",
        [
            g.const(node.params["weight"], "w"),
            g.const(_f32(s_w), "sw"),
            g.const(np.zeros(len(s_w), np.int8), "wz"),
        ],
        "dqw",
        axis=0,
    )
    bias = g.const(_f32(node.params["bias"] * s_x * s_w), "bias")
    if node.op == "conv2d":
        ph, pw = a["padding"]
        q.real[node.output] = g.op(
            "Conv",
            [q.dequant(x), w, bias],
            "conv",
            strides=a["stride"],
            pads=[ph, pw, ph, pw],
            dilations=a["dilation"],
            group=a["groups"],
        )
    else:
        q.real[node.output] = g.op("Gemm", [q.dequant(x), w, bias], "gemm", transB=1)


def _qdq_avgpool(q: _Qdq, node: Node) -> None:
    g, a, x = q.g, node.attrs, node.inputs[0]
    ph, pw = a["padding"]
    if list(a["kernel"]) == list(q.program.tensors[x].shape[1:]) and not (ph or pw):
        q.real[node.output] = g.op("GlobalAveragePool", [q.dequant(x)], "gap")
    else:
        q.real[node.output] = g.op(
            "AveragePool",
            [q.dequant(x)],
            "avgpool",
            kernel_shape=a["kernel"],
            strides=a["stride"],
            pads=[ph, pw, ph, pw],
            count_include_pad=1,
        )


def _qdq_requantize(q: _Qdq, node: Node) -> None:
    if node.output == q.output_name:
        q.real[node.output] = q.real[node.inputs[0]]  # logits stay float
    else:
        q.quant(q.real[node.inputs[0]], node)


def _qdq_add(q: _Qdq, node: Node) -> None:
    q.quant(q.g.op("Add", [q.dequant(node.inputs[0]), q.dequant(node.inputs[1])], "add"), node)


def _qdq_maxpool(q: _Qdq, node: Node) -> None:
    g, a = q.g, node.attrs
    ph, pw = a["padding"]
    g.op(
        "MaxPool",
        [g.t(node.inputs[0])],
        "maxpool",
        g.t(node.output),
        kernel_shape=a["kernel"],
        strides=a["stride"],
        pads=[ph, pw, ph, pw],
        dilations=a["dilation"],
        ceil_mode=int(a["ceil_mode"]),
    )


def _qdq_flatten(q: _Qdq, node: Node) -> None:
    q.g.op("Flatten", [q.g.t(node.inputs[0])], "flatten", q.g.t(node.output), axis=1)


def _qdq_output(q: _Qdq, node: Node) -> None:
    src = node.inputs[0]
    value = q.real[src] if src in q.real else q.dequant(src)
    q.g.op("Identity", [value], "out", "logits")


_BEYOND = Unsupported(
    "the QDQ export covers the ResNet/VGG op set (conv, linear, pooling, add); "
    "use the integer format (--format int)"
)

# The QDQ lowering of each op of the registry (intprog.ops), or Unsupported with the reason.
LOWERINGS: dict[str, Callable | Unsupported] = {
    "input": _qdq_input,
    "affine": _BEYOND,
    "conv2d": _qdq_layer,
    "linear": _qdq_layer,
    "requantize": _qdq_requantize,
    "add": _qdq_add,
    "concat": _BEYOND,
    "mul": _BEYOND,
    "lut": _BEYOND,
    "maxpool2d": _qdq_maxpool,
    "avgpool2d": _qdq_avgpool,
    "adaptive_avgpool2d": _BEYOND,
    "flatten": _qdq_flatten,
    "reshape": _BEYOND,
    "transpose": _BEYOND,
    "slice": _BEYOND,
    "output": _qdq_output,
}


def to_qdq_model(program: IntProgram):
    for spec in program.tensors.values():
        if spec.dtype in ("int8", "uint8") and spec.name != "input" and spec.bits != 8:
            raise ExportError(
                f"tensor '{spec.name}' holds {spec.bits}-bit codes: QDQ export needs an 8-bit "
                "program (W8A8); use the integer format (--format int)"
            )
    for node in program.nodes:
        if node.attrs.get("weight_bits", 8) != 8:
            raise ExportError(
                f"layer '{node.name}' has {node.attrs['weight_bits']}-bit weights: "
                "QDQ export needs an 8-bit program (W8A8); use --format int"
            )
    q = _Qdq(program)
    for node in program.nodes:
        lower = LOWERINGS.get(node.op)
        if not callable(lower):
            why = lower.reason if isinstance(lower, Unsupported) else "not in its table"
            raise ExportError(f"node '{node.name}' ({node.op}): no QDQ lowering: {why}")
        lower(q, node)
    return q.g.finish("lsqint_qdq", q.g.TP.FLOAT)


def export_onnx(program: IntProgram, path) -> int:
    """Write the QDQ ONNX model of an 8-bit program; returns the file size in bytes."""
    return write_model(to_qdq_model(program), path)


def run_qdq(program: IntProgram, images: np.ndarray) -> np.ndarray:
    """Float logits of the QDQ model under ONNX Runtime (CPU)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        to_qdq_model(program).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(["logits"], {"input": np.ascontiguousarray(images)})[0]
