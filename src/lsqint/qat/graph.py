"""What each fx node of a (prepared) model means to lsqint: one classification used by prepare and
convert, so the two never disagree about which ops exist."""

from __future__ import annotations

import operator

import torch
from torch import fx, nn
from torch.nn import functional as F
from torchvision.ops import StochasticDepth

from ..errors import UnsupportedOpError
from ..models.common import Normalize
from ..quant import LSQQuantizer
from .modules import ChannelAffine, QuantConv2d, QuantLinear


class LsqintTracer(fx.Tracer):
    """torch.fx tracer that keeps lsqint's own modules as single (leaf) nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        leaves = (
            Normalize | LSQQuantizer | QuantConv2d | QuantLinear | ChannelAffine | StochasticDepth
        )
        if isinstance(m, leaves):
            return True
        return super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    try:
        graph = LsqintTracer().trace(model)
    except Exception as err:  # fx raises many types; give one clear message
        raise UnsupportedOpError(
            f"torch.fx could not trace {type(model).__name__}: {err}. lsqint needs an "
            "fx-traceable model (no data-dependent control flow in forward)"
        ) from err
    name = type(model).__name__
    return fx.GraphModule(model, graph, name)


# Node kinds. Producers create a new integer tensor (an activation quantizer follows them);
# pass-through ops move codes without changing their scale.
PRODUCERS = {"normalize", "conv", "linear", "add", "mul", "cat", "avgpool", "lut", "affine"}
ACTIVATIONS = {"relu", "relu6"}
PASS_THROUGH = {
    "maxpool",
    "flatten",
    "dropout",
    "identity",
    "reshape",
    "transpose",
    "split",
    "slice",
}
# Data movement (reshape/view, transpose/permute, chunk/split and their pieces) keeps codes and
# scales; "shape" nodes compute Python ints from sizes (x.size(0) // 2) and hold no tensor.

_MODULE_KINDS: list[tuple[type, str]] = [
    (Normalize, "normalize"),
    (LSQQuantizer, "quantizer"),
    (QuantConv2d, "conv"),
    (QuantLinear, "linear"),
    (ChannelAffine, "affine"),
    (nn.Conv2d, "conv"),
    (nn.Linear, "linear"),
    (nn.BatchNorm2d, "batchnorm"),
    (nn.ReLU, "relu"),
    (nn.ReLU6, "relu6"),
    (nn.MaxPool2d, "maxpool"),
    (nn.AvgPool2d, "avgpool"),
    (nn.AdaptiveAvgPool2d, "avgpool"),
    (nn.Flatten, "flatten"),
    (nn.Dropout, "dropout"),
    (nn.Identity, "identity"),
    (StochasticDepth, "dropout"),  # torchvision's residual dropout: identity in eval
    (nn.Hardswish, "lut"),
    (nn.Hardsigmoid, "lut"),
    (nn.SiLU, "lut"),
    (nn.Sigmoid, "lut"),
    (nn.Tanh, "lut"),
    (nn.GELU, "lut"),
    (nn.LeakyReLU, "lut"),
    (nn.ELU, "lut"),
]

# Elementwise functions of one code (at most 8 bits): an integer lookup table in the program,
# built at convert time from the QAT model's own float32 arithmetic (so program == fake-quant).
# The ones whose output is never negative get an unsigned output quantizer.
NON_NEGATIVE_MODULES = (nn.Hardsigmoid, nn.Sigmoid)
NON_NEGATIVE_FUNCTIONS = {F.hardsigmoid, F.sigmoid, torch.sigmoid, "sigmoid"}

_FUNCTION_KINDS = {
    operator.add: "add",
    torch.add: "add",
    torch.cat: "cat",
    operator.mul: "mul",
    torch.mul: "mul",
    torch.relu: "relu",
    F.relu: "relu",
    F.relu6: "relu6",
    torch.flatten: "flatten",
    F.max_pool2d: "maxpool",
    F.avg_pool2d: "avgpool",
    F.adaptive_avg_pool2d: "avgpool",
    F.dropout: "dropout",
    F.hardswish: "lut",
    F.hardsigmoid: "lut",
    F.silu: "lut",
    F.sigmoid: "lut",
    torch.sigmoid: "lut",
    F.tanh: "lut",
    torch.tanh: "lut",
    F.gelu: "lut",
    F.leaky_relu: "lut",
    F.elu: "lut",
}

_METHOD_KINDS = {
    "relu": "relu",
    "flatten": "flatten",
    "contiguous": "identity",
    "sigmoid": "lut",
    "tanh": "lut",
}


def node_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The lsqint kind of ``node``, or None when lsqint does not support it."""
    if node.op in ("placeholder", "output", "get_attr"):
        return node.op
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, nn.Hardtanh) and not isinstance(module, nn.ReLU6):
            return "relu6" if (module.min_val, module.max_val) == (0.0, 6.0) else None
        for cls, kind in _MODULE_KINDS:
            if isinstance(module, cls):
                return kind
        return None
    if node.op == "call_function":
        if node.target is getattr and node.args[1:] == ("shape",):
            return "shape"  # x.shape, read by x.shape[0]
        if node.target in _SHAPE_ARITHMETIC:
            return _shape_or_piece(gm, node)
        if node.target in (torch.reshape,):
            return "reshape"
        if node.target in (torch.transpose, torch.permute):
            return "transpose" if _keeps_batch_first(node) else None
        if node.target in (torch.chunk, torch.split):
            return "split" if _split_dim(node) == 1 else None
        if node.target is F.hardtanh:
            lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
            hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0)
            return "relu6" if (lo, hi) == (0.0, 6.0) else None
        if node.target is input_scale_of:
            return "scale"
        kind = _FUNCTION_KINDS.get(node.target)
        if kind in ("add", "mul") and not all(isinstance(a, fx.Node) for a in node.args[:2]):
            return None  # adding or scaling by a constant has no integer op
        if kind in ("add", "mul") and (len(node.args) > 2 or node.kwargs):
            return None  # torch.add(..., alpha=...)
        if node.target is torch.cat:
            return "cat" if _channel_cat(node) else None
        if node.target is torch.mean:
            return "avgpool" if _spatial_mean(node) else None
        return kind
    if node.op == "call_method":
        if node.target == "mean":
            return "avgpool" if _spatial_mean(node) else None
        if node.target == "size":
            return "shape"
        if node.target in ("view", "reshape"):
            return "reshape"
        if node.target in ("transpose", "permute"):
            return "transpose" if _keeps_batch_first(node) else None
        if node.target in ("chunk", "split"):
            return "split" if _split_dim(node) == 1 else None
        return _METHOD_KINDS.get(node.target)
    return None


_SHAPE_ARITHMETIC = {
    operator.getitem,
    operator.floordiv,
    operator.mul,
    operator.add,
    operator.sub,
}


def _shape_or_piece(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """getitem/arithmetic: on sizes it is shape arithmetic; getitem of a chunk/split is one of
    its pieces; ``add``/``mul`` of tensors are the integer ops."""
    sources = [a for a in node.args if isinstance(a, fx.Node)]
    kinds = [node_kind(gm, a) for a in sources]
    if sources and all(k == "shape" for k in kinds):
        return "shape"
    if node.target is operator.getitem and kinds == ["split"]:
        return "slice"
    if node.target is operator.add and len(sources) == 2 and not node.kwargs:
        return "add"
    if node.target is operator.mul and len(sources) == 2 and not node.kwargs:
        return "mul"
    return None


def movement_dims(node: fx.Node) -> list[int]:
    """The dims a transpose (two) or permute (all, in their new order) names, as written."""
    if node.target in ("permute", torch.permute) and len(node.args) == 2:
        if isinstance(node.args[1], list | tuple):
            return list(node.args[1])  # x.permute((0, 2, 3, 1)) / torch.permute(x, dims)
    return [d for d in node.args[1:] if isinstance(d, int)]


def _keeps_batch_first(node: fx.Node) -> bool:
    """transpose/permute that leaves dim 0 (the batch) where it is."""
    dims = movement_dims(node)
    if node.target in ("permute", torch.permute):
        return bool(dims) and dims[0] == 0
    return len(dims) == 2 and 0 not in dims


def _split_dim(node: fx.Node) -> int | None:
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    return dim if isinstance(dim, int) else None


def mean_keepdim(node: fx.Node) -> bool | None:
    """For ``x.mean(dims)`` / ``torch.mean(x, dims)``: its keepdim; None for other nodes."""
    is_mean = (node.op == "call_method" and node.target == "mean") or (
        node.op == "call_function" and node.target is torch.mean
    )
    if not is_mean:
        return None
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    return bool(keepdim)


def _spatial_mean(node: fx.Node) -> bool:
    """A mean over exactly the two spatial dims of an (N, C, H, W) tensor (global average
    pooling as MnasNet and EfficientNet write it), with no dtype argument."""
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if isinstance(dims, int) or dims is None or "dtype" in node.kwargs:
        return False
    if not isinstance(node.args[2] if len(node.args) > 2 else True, bool):
        return False
    return sorted(d % 4 if isinstance(d, int) else d for d in dims) == [2, 3]


def lut_is_non_negative(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), NON_NEGATIVE_MODULES)
    return node.target in NON_NEGATIVE_FUNCTIONS


def apply_lut_function(gm: fx.GraphModule, node: fx.Node, x: torch.Tensor) -> torch.Tensor:
    """The float function of a ``lut`` node applied to ``x`` (its constant arguments kept)."""
    rest = tuple(node.args[1:])
    if node.op == "call_module":
        return gm.get_submodule(node.target)(x)
    if node.op == "call_method":
        return getattr(x, node.target)(*rest, **node.kwargs)
    return node.target(x, *rest, **node.kwargs)


def cat_inputs(node: fx.Node) -> list[fx.Node]:
    """The tensors a ``torch.cat`` node joins."""
    return list(node.args[0] if node.args else node.kwargs["tensors"])


def _channel_cat(node: fx.Node) -> bool:
    """torch.cat of graph tensors along dim 1 (channels), the only concatenation lsqint runs:
    every input (N, C_i, ...) keeps its layout and the output is their channel blocks in order."""
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not isinstance(tensors, list | tuple) or not tensors:
        return False
    return dim == 1 and all(isinstance(t, fx.Node) for t in tensors)


def describe(gm: fx.GraphModule, node: fx.Node) -> str:
    """'node <name> (<op> <target>)' for error messages."""
    if node.op == "call_module":
        target = f"{type(gm.get_submodule(node.target)).__name__} '{node.target}'"
    elif node.op == "call_function":
        target = getattr(node.target, "__name__", str(node.target))
    else:
        target = str(node.target)
    return f"node '{node.name}' ({node.op} {target})"


def input_scale_of(scale: torch.Tensor) -> torch.Tensor:
    """Graph helper: the positive step size of an activation quantizer, fed to the next layer."""
    from ..quant import MIN_SCALE

    return scale.clamp(min=MIN_SCALE)
