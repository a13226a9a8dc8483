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

import numpy as np

from ..intprog.program import IntProgram
from .onnx_int import ExportError, _Graph, write_model


def _full_range(dtype: str) -> tuple[int, int]:
    return (-128, 127) if dtype == "int8" else (0, 255)


def to_qdq_model(program: IntProgram):
    g = _Graph(program)
    TP = g.TP
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
    scales = {name: spec.scale for name, spec in program.tensors.items()}
    real = {}  # program tensor -> ONNX float tensor holding its real value
    output_name = program.nodes[-1].inputs[0]

    def f32(value):
        return np.asarray(value, np.float32)

    def dequant(name: str) -> str:
        if name not in real:
            real[name] = g.op(
                "DequantizeLinear", [g.t(name), g.const(f32(scales[name][0]), "s")], "dq"
            )
        return real[name]

    def quant(value: str, node) -> None:
        spec = program.tensors[node.output]
        s_out = float(spec.scale[0])
        lo, hi = _full_range(spec.dtype)
        if (spec.qmin, spec.qmax) != (lo, hi):  # fused ReLU6-style clamps
            value = g.op(
                "Clip",
                [
                    value,
                    g.const(f32(spec.qmin * s_out), "lo"),
                    g.const(f32(spec.qmax * s_out), "hi"),
                ],
                "clip",
            )
        zp = np.array(0, np.int8 if spec.dtype == "int8" else np.uint8)
        g.op(
            "QuantizeLinear",
            [value, g.const(f32(s_out), "s"), g.const(zp, "zp")],
            "q",
            g.t(node.output),
        )

    for node in program.nodes:
        a = node.attrs
        if node.op == "input":
            t = a["shift"]
            ca = (node.params["a"] / 2.0**t).reshape(1, -1, 1, 1)
            cb = (node.params["b"] / 2.0**t).reshape(1, -1, 1, 1)
            pixels = g.cast("input", "float")
            codes = g.op(
                "Add",
                [g.op("Mul", [pixels, g.const(f32(ca), "a")], "pa"), g.const(f32(cb), "b")],
                "code_real",
            )
            zp = np.array(0, np.int8 if program.tensors[node.output].dtype == "int8" else np.uint8)
            g.op(
                "QuantizeLinear",
                [codes, g.const(f32(1.0), "one"), g.const(zp, "zp")],
                "q",
                g.t(node.output),
            )
        elif node.op in ("conv2d", "linear"):
            x = node.inputs[0]
            s_x = float(scales[x][0])
            s_w = np.asarray(scales[node.output], np.float64) / s_x
            w = g.op(
                "DequantizeLinear",
                [
                    g.const(node.params["weight"], "w"),
                    g.const(f32(s_w), "sw"),
                    g.const(np.zeros(len(s_w), np.int8), "wz"),
                ],
                "dqw",
                axis=0,
            )
            bias = g.const(f32(node.params["bias"] * s_x * s_w), "bias")
            if node.op == "conv2d":
                ph, pw = a["padding"]
                real[node.output] = g.op(
                    "Conv",
                    [dequant(x), w, bias],
                    "conv",
                    strides=a["stride"],
                    pads=[ph, pw, ph, pw],
                    dilations=a["dilation"],
                    group=a["groups"],
                )
            else:
                real[node.output] = g.op("Gemm", [dequant(x), w, bias], "gemm", transB=1)
        elif node.op == "avgpool2d":
            ph, pw = a["padding"]
            if list(a["kernel"]) == list(program.tensors[node.inputs[0]].shape[1:]) and not (
                ph or pw
            ):
                real[node.output] = g.op("GlobalAveragePool", [dequant(node.inputs[0])], "gap")
            else:
                real[node.output] = g.op(
                    "AveragePool",
                    [dequant(node.inputs[0])],
                    "avgpool",
                    kernel_shape=a["kernel"],
                    strides=a["stride"],
                    pads=[ph, pw, ph, pw],
                    count_include_pad=1,
                )
        elif node.op == "requantize":
            if node.output == output_name:
                real[node.output] = real[node.inputs[0]]  # logits stay float
            else:
                quant(real[node.inputs[0]], node)
        elif node.op == "add":
            quant(g.op("Add", [dequant(node.inputs[0]), dequant(node.inputs[1])], "add"), node)
        elif node.op == "maxpool2d":
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
        elif node.op == "flatten":
            g.op("Flatten", [g.t(node.inputs[0])], "flatten", g.t(node.output), axis=1)
        elif node.op == "output":
            src = node.inputs[0]
            value = real[src] if src in real else dequant(src)
            g.op("Identity", [value], "out", "logits")
        else:
            raise ExportError(f"node '{node.name}' ({node.op}): no QDQ lowering")
    return g.finish("lsqint_qdq", TP.FLOAT)


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
