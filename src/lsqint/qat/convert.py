"""convert(qat_model) -> IntProgram: lower a trained QAT graph to integer ops
(docs/design.md, section 4).

The walk follows the QAT graph in order and tracks, for each fx node, what integer value it holds:

    Pixels      the raw uint8 input
    Normalized  pixels after the float normalization, waiting for the input quantizer
    Codes       narrow integer codes at one scale (after an activation quantizer)
    Acc         an int32 accumulator with one scale per channel (conv/linear/pool sum), waiting
                for a requantize; carries a fused ReLU/ReLU6
    PendingAdd  two code tensors to add, waiting for the quantizer that fixes the output scale
    PendingCat  code tensors to join along channels, waiting for that quantizer too

Each activation quantizer in the QAT graph becomes exactly one integer op (input, requantize or
add) that produces codes with the quantizer's range, so codes in the program are the codes the
training model's quantizers produce (up to rounding ties, measured by ``lsqint infer``).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn import functional as F

from ..errors import UsageError, UsageTypeError
from ..intprog.fixedpoint import (
    INT32_MAX,
    INT32_MIN,
    input_affine,
    input_shift,
    multiplier_for_shift,
    quantize_multiplier,
    quantize_multipliers,
)
from ..intprog.ops import adaptive_lcm, conv_acc_bound
from ..intprog.program import IntProgram, Node, TensorSpec
from ..intprog.verify import verify
from ..models.common import Normalize
from ..quant import LSQQuantizer
from .graph import (
    UnsupportedOpError,
    apply_lut_function,
    cat_inputs,
    describe,
    mean_keepdim,
    movement_dims,
    node_kind,
)
from .modules import QuantConvBn2d
from .prepare import freeze_batchnorm_, quantizers


@dataclass
class Pixels:
    tensor: str


@dataclass
class Normalized:
    mean: list[float]
    std: list[float]


@dataclass
class Codes:
    tensor: str
    scale: float


@dataclass
class Acc:
    tensor: str
    scale: np.ndarray  # float64, one per channel (or one)
    act: str | None = None
    layer: Node | None = None  # the conv/linear that made it; its bias is finalized by the reader


@dataclass
class PendingAdd:
    a: Codes
    b: Codes
    act: str | None = None


@dataclass
class PendingLut:
    x: Codes
    node: fx.Node  # the elementwise function, applied to every code at convert time
    act: str | None = None


@dataclass
class PendingMul:
    a: Codes
    b: Codes
    act: str | None = None


@dataclass
class Pieces:
    """A chunk/split of codes along a per-image axis, waiting for getitem to pick a piece."""

    x: Codes
    axis: int  # per-image axis (batch excluded)
    bounds: list[tuple[int, int]]


@dataclass
class PendingAffine:
    x: Codes
    weight: np.ndarray  # float64 per channel: the frozen BN's gamma / sigma
    bias: np.ndarray  # float64 per channel: beta - mean * gamma / sigma
    act: str | None = None


@dataclass
class PendingCat:
    parts: list[Codes]
    act: str | None = None


class _Builder:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.nodes: list[Node] = []
        self.tensors: dict[str, TensorSpec] = {}

    def shape(self, node: fx.Node) -> tuple[int, ...]:
        return tuple(node.meta["tensor_meta"].shape[1:])

    def emit(self, op, name, inputs, spec: TensorSpec, attrs=None, params=None) -> str:
        self.tensors[spec.name] = spec
        self.nodes.append(Node(op, name, list(inputs), spec.name, attrs or {}, params or {}))
        return spec.name


def _code_dtype(qmin: int) -> str:
    return "int8" if qmin < 0 else "uint8"


def _weight_codes(layer, quantizer: LSQQuantizer) -> np.ndarray:
    # Exactly the fake-quant forward: round(w / s) clamped, s broadcast along dim 0.
    w = layer.weight.detach().float()
    s = quantizer.effective_scale().detach().float()
    s = s.view(-1, *([1] * (w.dim() - 1))) if s.dim() else s
    return torch.round(w / s).clamp(quantizer.qmin, quantizer.qmax).to(torch.int8).numpy()


@torch.no_grad()
def convert(qat_model: fx.GraphModule) -> IntProgram:
    """Lower a trained QAT model (from ``prepare_qat``) to a verified integer program."""
    if not isinstance(qat_model, fx.GraphModule) or not hasattr(qat_model, "lsqint_input_shape"):
        raise UsageTypeError("convert() takes the fx.GraphModule returned by lsqint.prepare_qat")
    missing = [name for name, q in quantizers(qat_model).items() if not bool(q.initialized)]
    if missing:
        raise UsageError(
            f"the QAT model's step sizes were never initialized ({len(missing)} quantizers, e.g. "
            f"'{missing[0]}'): run a training-mode forward pass (lsqint.qat.calibrate_) or train it"
        )
    for name, p in qat_model.named_parameters():
        if not torch.isfinite(p).all():
            raise UsageError(
                f"parameter '{name}' holds NaN or inf: the QAT model is broken; "
                "retrain from the last good checkpoint"
            )
    gm = qat_model
    if any(isinstance(m, QuantConvBn2d) for m in gm.modules()):
        # BN-aware QAT model: its eval-mode output is the folded model's (QuantConvBn2d).
        gm = copy.deepcopy(gm)  # fx drops attributes it does not know of; put ours back
        gm.lsqint_input_shape = qat_model.lsqint_input_shape
        gm.lsqint_config = qat_model.lsqint_config
        freeze_batchnorm_(gm)
    was_training = gm.training
    device = next(gm.parameters()).device
    gm.cpu().eval()
    try:
        example = torch.zeros((1, *gm.lsqint_input_shape))
        ShapeProp(gm).propagate(example)
        program = _lower(gm)
    finally:
        gm.to(device).train(was_training)
    return verify(program)


def _lower(gm: fx.GraphModule) -> IntProgram:
    b = _Builder(gm)
    values: dict[fx.Node, object] = {}
    for node in gm.graph.nodes:
        kind = node_kind(gm, node)
        args = [values.get(a) for a in node.args if isinstance(a, fx.Node)]
        if kind == "placeholder":
            spec = TensorSpec("input", "uint8", b.shape(node), 0, 255, None)
            b.tensors["input"] = spec
            values[node] = Pixels("input")
        elif kind in ("get_attr", "scale"):
            values[node] = None
        elif kind == "normalize":
            if not isinstance(args[0], Pixels):
                raise UnsupportedOpError(f"{describe(gm, node)} must read the network input")
            module: Normalize = gm.get_submodule(node.target)
            values[node] = Normalized(module.mean.tolist(), module.std.tolist())
        elif kind == "quantizer":
            values[node] = _lower_quantizer(b, node, args[0])
        elif kind in ("conv", "linear"):
            values[node] = _lower_layer(b, node, kind, args[0])
        elif kind in ("relu", "relu6"):
            src = args[0]
            pending = Acc | PendingAdd | PendingMul | PendingCat | PendingLut | PendingAffine
            if not isinstance(src, pending) or src.act is not None:
                raise UnsupportedOpError(f"{describe(gm, node)}: activation not fused into a layer")
            src.act = kind
            values[node] = src
        elif kind == "add":
            a, c = args
            if not (isinstance(a, Codes) and isinstance(c, Codes)):
                raise UnsupportedOpError(f"{describe(gm, node)} must add two quantized tensors")
            values[node] = PendingAdd(a, c)
        elif kind == "mul":
            a, c = args
            if not (isinstance(a, Codes) and isinstance(c, Codes)):
                raise UnsupportedOpError(f"{describe(gm, node)} must multiply quantized tensors")
            values[node] = PendingMul(a, c)
        elif kind == "affine":
            module = gm.get_submodule(node.target)
            values[node] = PendingAffine(
                _codes(gm, node, args[0]),
                module.weight.detach().double().numpy(),
                module.bias.detach().double().numpy(),
            )
        elif kind == "lut":
            values[node] = PendingLut(_codes(gm, node, args[0]), node)
        elif kind == "cat":
            parts = [values.get(a) for a in cat_inputs(node)]
            if not all(isinstance(part, Codes) for part in parts):
                raise UnsupportedOpError(f"{describe(gm, node)} must join quantized tensors")
            values[node] = PendingCat(parts)
        elif kind == "maxpool":
            values[node] = _lower_maxpool(b, node, _codes(gm, node, args[0]))
        elif kind == "avgpool":
            values[node] = _lower_avgpool(b, node, _codes(gm, node, args[0]))
        elif kind == "flatten":
            x = _codes(gm, node, args[0])
            spec = b.tensors[x.tensor]
            out = TensorSpec(
                node.name, spec.dtype, b.shape(node), spec.qmin, spec.qmax, [x.scale], spec.bits
            )
            values[node] = Codes(b.emit("flatten", node.name, [x.tensor], out), x.scale)
        elif kind in ("dropout", "identity"):
            values[node] = args[0]
        elif kind == "shape":
            values[node] = None  # Python ints from sizes; ShapeProp already knows every shape
        elif kind in ("reshape", "transpose"):
            values[node] = _lower_movement(b, node, kind, _codes(gm, node, args[0]))
        elif kind == "split":
            values[node] = _split_pieces(b, node, _codes(gm, node, args[0]))
        elif kind == "slice":
            pieces = args[0]
            start, end = pieces.bounds[node.args[1]]
            spec = b.tensors[pieces.x.tensor]
            out = dataclasses.replace(spec, name=node.name, shape=b.shape(node))
            attrs = {"axis": pieces.axis, "start": start, "end": end}
            values[node] = Codes(
                b.emit("slice", node.name, [pieces.x.tensor], out, attrs), pieces.x.scale
            )
        elif kind == "output":
            _lower_output(b, node, args[0])
        else:
            raise UnsupportedOpError(f"cannot convert {describe(gm, node)}")
    return IntProgram(b.nodes, b.tensors, {"input_shape": list(gm.lsqint_input_shape)})


def _codes(gm, node, value) -> Codes:
    if not isinstance(value, Codes):
        raise UnsupportedOpError(f"{describe(gm, node)} must read quantized codes")
    return value


def _lower_quantizer(b: _Builder, node: fx.Node, src) -> Codes:
    q: LSQQuantizer = b.gm.get_submodule(node.target)
    s_out = float(q.effective_scale())
    qmin, qmax = q.qrange
    lo, hi = qmin, qmax
    act = getattr(src, "act", None)
    if act in ("relu", "relu6"):
        lo = max(lo, 0)
    if act == "relu6":
        # Same float32 arithmetic as the fake-quant model: round(6 / s) (round is monotonic).
        six_code = int(torch.round(torch.tensor(6.0) / q.effective_scale().detach().float()))
        hi = min(hi, six_code)
    out = TensorSpec(node.name, _code_dtype(qmin), b.shape(node), lo, hi, [s_out], int(q.bits))
    if isinstance(src, Codes):
        # A quantizer reading codes (the residual stream requantized for the convs that read
        # it, see prepare.insert_act_quantizers_): the affine op with a = s_x / s_out, b = 0.
        channels = b.tensors[src.tensor].shape[0]
        src = PendingAffine(src, np.ones(channels), np.zeros(channels))
    if isinstance(src, Normalized):
        t = input_shift(src.std, s_out)
        ab = [input_affine(mu, sd, s_out, t) for mu, sd in zip(src.mean, src.std, strict=True)]
        params = {
            "a": np.array([p[0] for p in ab], np.int64),
            "b": np.array([p[1] for p in ab], np.int64),
        }
        attrs = {"shift": t, "lo": lo, "hi": hi}
        return Codes(b.emit("input", node.name, ["input"], out, attrs, params), s_out)
    if isinstance(src, Acc):
        m, t = quantize_multipliers(src.scale / s_out)
        if src.layer is not None:
            _finalize_bias(b, src.layer, m, t, lo, hi)
        attrs = {"lo": lo, "hi": hi}
        acc_shape = b.tensors[src.tensor].shape
        if acc_shape == out.shape:
            return Codes(
                b.emit("requantize", node.name, [src.tensor], out, attrs, {"m": m, "shift": t}),
                s_out,
            )
        # A mean over (H, W) without keepdim: requantize the (C, 1, 1) sum, then flatten.
        full = dataclasses.replace(out, name=f"{node.name}_chw", shape=acc_shape)
        codes = b.emit("requantize", full.name, [src.tensor], full, attrs, {"m": m, "shift": t})
        return Codes(b.emit("flatten", node.name, [codes], out), s_out)
    if isinstance(src, PendingAdd):
        real_a, real_b = src.a.scale / s_out, src.b.scale / s_out
        _, t = quantize_multiplier(max(real_a, real_b))  # one shared shift, set by the larger
        attrs = {
            "m_a": multiplier_for_shift(real_a, t),
            "m_b": multiplier_for_shift(real_b, t),
            "shift": t,
            "lo": lo,
            "hi": hi,
        }
        return Codes(b.emit("add", node.name, [src.a.tensor, src.b.tensor], out, attrs), s_out)
    if isinstance(src, PendingMul):
        m, t = quantize_multiplier(src.a.scale * src.b.scale / s_out)
        attrs = {"m": m, "shift": t, "lo": lo, "hi": hi}
        inputs = [src.a.tensor, src.b.tensor]
        if b.tensors[inputs[0]].shape != out.shape:  # gate * x: the full tensor goes first
            inputs.reverse()
        return Codes(b.emit("mul", node.name, inputs, out, attrs), s_out)
    if isinstance(src, PendingAffine):
        # y = x * (w * s_x / s_out) + b / s_out, on one shift like the input op.
        real_a = src.weight * src.x.scale / s_out
        real_b = src.bias / s_out
        _, t = quantize_multiplier(float(np.abs(real_a).max()))
        params = {
            "a": np.round(real_a * 2.0**t).astype(np.int64),
            "b": np.round(real_b * 2.0**t).astype(np.int64),
        }
        attrs = {"shift": t, "lo": lo, "hi": hi}
        return Codes(b.emit("affine", node.name, [src.x.tensor], out, attrs, params), s_out)
    if isinstance(src, PendingLut):
        return _lower_lut(b, node, src, q, out)
    if isinstance(src, PendingCat):
        # Each input onto the output scale, as add does: one shift shared by all inputs.
        reals = [part.scale / s_out for part in src.parts]
        _, t = quantize_multiplier(max(reals))
        attrs = {"m": [multiplier_for_shift(r, t) for r in reals], "shift": t, "lo": lo, "hi": hi}
        inputs = [part.tensor for part in src.parts]
        return Codes(b.emit("concat", node.name, inputs, out, attrs), s_out)
    raise UnsupportedOpError(f"{describe(b.gm, node)}: nothing quantizable feeds this quantizer")


def _lower_movement(b: _Builder, node: fx.Node, kind: str, x: Codes) -> Codes:
    """view/reshape and transpose/permute of codes: per image, the batch dim stays first."""
    spec = b.tensors[x.tensor]
    out = dataclasses.replace(spec, name=node.name, shape=b.shape(node))
    if kind == "reshape":
        return Codes(
            b.emit("reshape", node.name, [x.tensor], out, {"shape": list(out.shape)}), x.scale
        )
    rank = len(spec.shape) + 1
    dims = movement_dims(node)
    if node.target in ("permute", torch.permute):
        perm = [d % rank for d in dims]
    else:
        perm = list(range(rank))
        d0, d1 = (d % rank for d in dims)
        perm[d0], perm[d1] = perm[d1], perm[d0]
    attrs = {"perm": [p - 1 for p in perm[1:]]}
    return Codes(b.emit("transpose", node.name, [x.tensor], out, attrs), x.scale)


def _split_pieces(b: _Builder, node: fx.Node, x: Codes) -> Pieces:
    """torch.chunk / torch.split along channels: the [start, end) of every piece."""
    channels = b.tensors[x.tensor].shape[0]
    how = (
        node.args[1]
        if len(node.args) > 1
        else node.kwargs.get("chunks", node.kwargs.get("split_size_or_sections"))
    )
    probe = torch.zeros(channels)
    chunk = node.target in ("chunk", torch.chunk)
    lengths = [len(p) for p in (probe.chunk(how) if chunk else probe.split(how))]
    starts = np.cumsum([0, *lengths]).tolist()
    return Pieces(x, 0, [(starts[i], starts[i + 1]) for i in range(len(lengths))])


def _lower_lut(b: _Builder, node: fx.Node, src: PendingLut, q: LSQQuantizer, out) -> Codes:
    """A table with one output code per input code, computed exactly as the QAT model computes
    it in eval mode: dequantize the code (float32, code * s_in), apply the function (and a fused
    ReLU), fake-quantize with the output quantizer, read the code back."""
    spec = b.tensors[src.x.tensor]
    codes = torch.arange(spec.qmin, spec.qmax + 1, dtype=torch.float32)
    s_in = torch.tensor(src.x.scale, dtype=torch.float32)
    y = apply_lut_function(b.gm, src.node, codes * s_in)
    if src.act == "relu":
        y = torch.relu(y)
    elif src.act == "relu6":
        y = torch.clamp(y, 0.0, 6.0)
    q.eval()
    s_out = q.effective_scale().detach().float()
    table = torch.round(q(y).detach() / s_out).to(torch.int64).numpy()
    table = np.clip(table, out.qmin, out.qmax)  # a fused ReLU6 narrows the range further
    attrs = {"offset": spec.qmin, "lo": out.qmin, "hi": out.qmax}
    return Codes(
        b.emit("lut", node.name, [src.x.tensor], out, attrs, {"table": table}), float(s_out)
    )


def _lower_layer(b: _Builder, node: fx.Node, kind: str, x) -> Acc:
    gm = b.gm
    x = _codes(gm, node, x)
    layer = gm.get_submodule(node.target)
    wq: LSQQuantizer = layer.weight_quantizer
    w_q = _weight_codes(layer, wq)
    s_w = wq.effective_scale().detach().float()
    s_x = torch.tensor(x.scale, dtype=torch.float32)
    channels = w_q.shape[0]
    if layer.bias is not None:
        # Same arithmetic as QuantConv2d's bias fake quant: round(bias / (s_x * s_w)).
        # Kept as float64 integers until the reader knows the output range (_finalize_bias).
        bias_q = torch.round(layer.bias.detach().float() / (s_x * s_w)).double().numpy()
    else:
        bias_q = np.zeros(channels, np.float64)
    bound = 0  # set by _finalize_bias
    acc_scale = np.broadcast_to(
        np.float64(x.scale) * s_w.double().numpy().reshape(-1), (channels,)
    ).copy()
    out = TensorSpec(node.name, "int32", b.shape(node), INT32_MIN, INT32_MAX, acc_scale.tolist())
    attrs = {"weight_bits": int(wq.bits), "acc_bound": bound}
    if kind == "conv":
        attrs.update(
            stride=list(layer.stride),
            padding=list(layer.padding),
            dilation=list(layer.dilation),
            groups=layer.groups,
        )
        op = "conv2d"
    else:
        op = "linear"
    # Named after the module; a module called twice (a shared layer) gets the fx node's unique
    # name the second time, since the program file keys parameters by node name.
    taken = {n.name for n in b.nodes}
    label = node.target if node.target not in taken else node.name
    name = b.emit(op, label, [x.tensor], out, attrs, {"weight": w_q, "bias": bias_q})
    return Acc(name, acc_scale, layer=b.nodes[-1])


def _finalize_bias(b: _Builder, layer: Node, m=None, t=None, lo=None, hi=None) -> None:
    """Store the layer's bias as int32 and record its accumulator bound.

    When a requantize with range [lo, hi] reads the accumulator, a bias beyond
    ``L_c = D_c + R_c`` (D_c = sum|w_q[c]| * max|x_q|, R_c * m_c / 2^t_c >= max(|lo|, |hi|) + 1)
    saturates the output whatever the input: |acc| >= R_c drives it past lo or hi. Clipping
    the bias to +-L_c therefore changes no output, and keeps channels whose weight step size is
    tiny next to their bias (nearly dead filters after BN folding) inside int32.

    Where even the clipped bias overflows int32 (the multiplier is tiny), the channel's output
    may still be provably constant: the same code k for the smallest and the largest
    accumulator it can reach. Such a channel is lowered as weights 0, bias k, multiplier 1
    (m = 2^30, t = 30), which gives k for every input, exactly like the original.
    """
    weight = layer.params["weight"]
    absmax = _input_absmax(b, layer)
    bias = layer.params["bias"].astype(np.float64)
    if m is not None:
        dot = conv_acc_bound(weight, np.zeros(len(bias), np.int64), absmax)
        reach = max(abs(lo), abs(hi)) + 1
        m_c = np.broadcast_to(m, bias.shape)
        t_c = np.broadcast_to(t, bias.shape)
        limit = np.array(
            [
                int(d) + -((-reach << int(tc)) // int(mc)) + 1
                for d, mc, tc in zip(dot, m_c, t_c, strict=True)
            ],
            np.float64,
        )
        bias = np.clip(bias, -limit, limit)
        for c in np.flatnonzero(np.abs(bias) > INT32_MAX):
            ends = [
                min(
                    max(
                        (
                            (int(bias[c]) + sign * int(dot[c])) * int(m_c[c])
                            + (1 << (int(t_c[c]) - 1))
                        )
                        >> int(t_c[c]),
                        lo,
                    ),
                    hi,
                )
                for sign in (-1, 1)
            ]
            if ends[0] == ends[1] and m.shape == bias.shape:  # constant channel
                weight[c] = 0
                bias[c] = ends[0]
                m[c], t[c] = 1 << 30, 30
    if np.abs(bias).max(initial=0) > INT32_MAX:
        c = int(np.abs(bias).argmax())
        raise UnsupportedOpError(
            f"layer '{layer.name}': quantized bias of channel {c} ({bias[c]:.3g}) exceeds int32: "
            "its weight step size is tiny next to its bias; retrain, or use per-tensor weights"
        )
    layer.params["bias"] = bias.astype(np.int64).astype(np.int32)
    layer.attrs["acc_bound"] = int(conv_acc_bound(weight, layer.params["bias"], absmax).max())


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(i) for i in v]


def _avg_pool2d_signature(
    input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
    divisor_override=None,
):  # fmt: skip
    """F.avg_pool2d's documented parameters: a C builtin, so inspect cannot read them."""


def _max_pool2d_signature(
    input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
    return_indices=False,
):  # fmt: skip
    """F.max_pool2d's documented parameters: a dispatch wrapper taking (*args, **kwargs)."""


_SIGNATURES = {F.avg_pool2d: _avg_pool2d_signature, F.max_pool2d: _max_pool2d_signature}


def _call_args(fn, node: fx.Node) -> dict:
    bound = inspect.signature(_SIGNATURES.get(fn, fn)).bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _lower_maxpool(b: _Builder, node: fx.Node, x: Codes) -> Codes:
    if node.op == "call_module":
        p: nn.MaxPool2d = b.gm.get_submodule(node.target)
        kernel, stride, padding, dilation, ceil = (
            p.kernel_size,
            p.stride,
            p.padding,
            p.dilation,
            p.ceil_mode,
        )
        if p.return_indices:
            raise UnsupportedOpError(f"{describe(b.gm, node)}: return_indices is not supported")
    else:
        a = _call_args(F.max_pool2d, node)
        kernel, stride, padding = a["kernel_size"], a["stride"] or a["kernel_size"], a["padding"]
        dilation, ceil = a["dilation"], a["ceil_mode"]
    spec = b.tensors[x.tensor]
    out = TensorSpec(
        node.name, spec.dtype, b.shape(node), spec.qmin, spec.qmax, [x.scale], spec.bits
    )
    attrs = {
        "kernel": _pair(kernel),
        "stride": _pair(stride),
        "padding": _pair(padding),
        "dilation": _pair(dilation),
        "ceil_mode": bool(ceil),
    }
    return Codes(b.emit("maxpool2d", node.name, [x.tensor], out, attrs), x.scale)


def _lower_avgpool(b: _Builder, node: fx.Node, x: Codes) -> Acc:
    gm = b.gm
    in_shape = b.tensors[x.tensor].shape
    h, w = in_shape[1], in_shape[2]
    keepdim = mean_keepdim(node)
    if keepdim is not None:  # x.mean((2, 3)): global average pooling
        adaptive, out_size = True, (1, 1)
    elif node.op == "call_module":
        p = gm.get_submodule(node.target)
        if isinstance(p, nn.AdaptiveAvgPool2d):
            adaptive, out_size = True, p.output_size
        else:
            adaptive = False
            kernel, stride, padding = p.kernel_size, p.stride or p.kernel_size, p.padding
            ceil, include_pad, divisor = p.ceil_mode, p.count_include_pad, p.divisor_override
    elif node.target is F.adaptive_avg_pool2d:
        adaptive, out_size = True, _call_args(F.adaptive_avg_pool2d, node)["output_size"]
    else:
        a = _call_args(F.avg_pool2d, node)
        adaptive = False
        kernel, stride, padding = a["kernel_size"], a["stride"] or a["kernel_size"], a["padding"]
        ceil, include_pad, divisor = a["ceil_mode"], a["count_include_pad"], a["divisor_override"]
    if adaptive:
        oh, ow = _pair(out_size) if out_size is not None else (h, w)
        oh, ow = oh or h, ow or w
        if h % oh or w % ow:
            return _lower_adaptive_avgpool(b, node, x, (oh, ow))
        kernel, stride, padding = (h // oh, w // ow), (h // oh, w // ow), (0, 0)
    else:
        if ceil or divisor is not None or (any(_pair(padding)) and not include_pad):
            raise UnsupportedOpError(
                f"{describe(gm, node)}: only avg pooling with a constant window size is supported "
                "(ceil_mode=False, no divisor_override, count_include_pad=True when padded)"
            )
    kernel, stride, padding = _pair(kernel), _pair(stride), _pair(padding)
    area = kernel[0] * kernel[1]
    spec = b.tensors[x.tensor]
    absmax = max(abs(spec.qmin), abs(spec.qmax))
    scale = np.array([x.scale / area], dtype=np.float64)
    # Always (C, OH, OW); a mean without keepdim gets its (C,) shape from a flatten after the
    # requantize (see _lower_quantizer).
    shape = (
        in_shape[0],
        (h + 2 * padding[0] - kernel[0]) // stride[0] + 1,
        (w + 2 * padding[1] - kernel[1]) // stride[1] + 1,
    )
    out = TensorSpec(node.name, "int32", shape, INT32_MIN, INT32_MAX, scale.tolist())
    attrs = {"kernel": kernel, "stride": stride, "padding": padding, "acc_bound": area * absmax}
    return Acc(b.emit("avgpool2d", node.name, [x.tensor], out, attrs), scale)


def _lower_adaptive_avgpool(b: _Builder, node: fx.Node, x: Codes, out_size) -> Acc:
    """Windows of unequal size: sums scaled to one common scale (see the program op)."""
    spec = b.tensors[x.tensor]
    lcm = adaptive_lcm(spec.shape[1:], out_size)
    absmax = max(abs(spec.qmin), abs(spec.qmax))
    scale = np.array([x.scale / lcm], dtype=np.float64)
    shape = (spec.shape[0], *out_size)
    out = TensorSpec(node.name, "int32", shape, INT32_MIN, INT32_MAX, scale.tolist())
    attrs = {"out_size": list(out_size), "lcm": lcm, "acc_bound": lcm * absmax}
    return Acc(b.emit("adaptive_avgpool2d", node.name, [x.tensor], out, attrs), scale)


def _lower_output(b: _Builder, node: fx.Node, value) -> None:
    if isinstance(value, Codes):
        b.nodes.append(Node("output", "output", [value.tensor], ""))
        return
    if not isinstance(value, Acc) or value.act is not None:
        raise UnsupportedOpError("the model must end with a conv/linear layer (the logits)")
    spec = b.tensors[value.tensor]
    layer = next(n for n in b.nodes if n.output == value.tensor)
    _finalize_bias(b, layer)
    bound = conv_acc_bound(
        layer.params["weight"], layer.params["bias"], _input_absmax(b, layer)
    ).astype(np.float64)
    scale = value.scale
    if np.all(scale == scale[0]):
        # One scale already (per-tensor weights): the accumulator is the logits.
        spec.scale = [float(scale[0])]
        b.nodes.append(Node("output", "output", [value.tensor], ""))
        return
    # Per-channel: bring every channel onto one scale, as fine as int32 allows (2^-k of the
    # coarsest channel's scale, k <= 16), so argmax over integers is the prediction.
    coarsest = float(scale.max())
    k = 16
    while k > 0 and np.max(bound * scale / (coarsest / 2**k)) >= 2**31 - 1:
        k -= 1
    s_out = coarsest / 2**k
    m, t = quantize_multipliers(scale / s_out)
    out = TensorSpec("logits", "int32", spec.shape, INT32_MIN, INT32_MAX, [s_out])
    b.emit(
        "requantize",
        "logits",
        [value.tensor],
        out,
        {"lo": INT32_MIN, "hi": INT32_MAX},
        {"m": m, "shift": t},
    )
    b.nodes.append(Node("output", "output", ["logits"], ""))


def _input_absmax(b: _Builder, layer: Node) -> int:
    spec = b.tensors[layer.inputs[0]]
    return max(abs(spec.qmin), abs(spec.qmax))
