"""prepare_qat: a plain float model -> an fx.GraphModule with BN folded and LSQ quantizers inserted.

Written as a list of small passes, each ``pass(gm, ...) -> None`` editing the graph in place:

    fold_batchnorm_           conv -> BN           becomes  conv' (weight and bias absorb BN)
                                                   (BN-aware QAT: kept, for a QuantConvBn2d)
    insert_weight_quantizers_ Conv2d / Linear      becomes  QuantConv2d / QuantLinear
    insert_act_quantizers_    producer [-> ReLU]   gets     -> LSQQuantizer after it
    connect_input_scales_     each quantized layer receives its input's step size (bias quant)
    check_quantized_inputs    every conv/linear/add/pool reads codes, or the model is refused

docs/design.md (section 4) places activation quantizers: the network input after normalization,
conv/linear outputs (after a fused ReLU/ReLU6), residual add outputs, channel concatenations and
average-pool outputs. Max-pool, flatten and dropout pass codes through. The last layer's output
(the logits) is not quantized to a narrow code: the integer program keeps it as an int32
accumulator on one common scale.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import fx, nn

from ..errors import UsageTypeError
from ..models.common import Normalize
from ..quant import LSQQuantizer
from .config import QuantConfig
from .graph import (
    ACTIVATIONS,
    PASS_THROUGH,
    PRODUCERS,
    UnsupportedOpError,
    cat_inputs,
    describe,
    input_scale_of,
    lut_is_non_negative,
    node_kind,
    trace,
)
from .modules import ChannelAffine, QuantConv2d, QuantConvBn2d, QuantLinear


def prepare_qat(
    model: nn.Module,
    config: QuantConfig,
    example_input: torch.Tensor,
    normalize: tuple[Sequence[float], Sequence[float]] | None = None,
    bn_aware: bool = False,
) -> fx.GraphModule:
    """Trace ``model``, fold its BatchNorms and insert LSQ quantizers; returns the QAT model.

    The input model is not modified. ``example_input`` (uint8 or 0..255 floats, shape (N, C, H, W))
    fixes the input shape recorded for conversion. Weight step sizes are initialized here;
    activation step sizes on the first training-mode forward pass (see ``calibrate_``).

    ``normalize=(mean, std)``: for a model that takes normalized float tensors (its data pipeline
    normalizes, as torchvision's ``Normalize(mean, std)`` after ``ToTensor`` does), prepend that
    normalization as a ``Normalize`` module, so the QAT model and the integer program take raw
    0..255 pixels. Models from ``lsqint.models`` carry their ``Normalize`` already.

    ``bn_aware=True``: a conv -> BN pair becomes a ``QuantConvBn2d`` (BN keeps normalizing with
    batch statistics in training, the quantizer sees the folded weight) instead of a folded conv;
    ``freeze_batchnorm_`` folds them for good. ``convert`` folds a copy itself.
    """
    if not isinstance(config, QuantConfig):
        raise UsageTypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    model = copy.deepcopy(model)
    if normalize is not None:
        mean, std = normalize
        model = nn.Sequential(Normalize(mean, std), model).train(model.training)
    gm = trace(model)
    check_supported(gm)
    kept = fold_batchnorm_(gm, keep=bn_aware)
    insert_weight_quantizers_(gm, config, kept)
    insert_act_quantizers_(gm, config)
    connect_input_scales_(gm)
    check_quantized_inputs(gm)
    gm.graph.lint()
    gm.recompile()
    gm.lsqint_input_shape = tuple(example_input.shape[1:])
    gm.lsqint_config = config
    gm.train(model.training)
    return gm


def check_supported(gm: fx.GraphModule) -> None:
    """Refuse the model at the first node lsqint has no integer semantics for."""
    for node in gm.graph.nodes:
        if node_kind(gm, node) is None:
            raise UnsupportedOpError(
                f"unsupported {describe(gm, node)}: lsqint converts Conv2d, Linear, BatchNorm2d, "
                "ReLU/ReLU6, add, mul, torch.cat along channels, max/avg pooling, means over H and "
                "W, elementwise Hardswish/Hardsigmoid/SiLU/Sigmoid/Tanh/GELU/LeakyReLU/ELU, and "
                "data movement that keeps the batch first (view/reshape/flatten, transpose/"
                "permute, chunk/split along channels, dropout); rewrite this part with those"
            )


# -- pass 1: BN folding ---------------------------------------------------------------------------
@torch.no_grad()
def fold_bn_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new conv equal (in eval mode) to bn(conv(x)):

    w' = w * gamma / sqrt(var + eps)           (per output channel)
    b' = (b - mean) * gamma / sqrt(var + eps) + beta
    """
    _check_running_stats(bn)
    folded = copy.deepcopy(conv)
    inv_std = torch.rsqrt(bn.running_var.double() + bn.eps)
    gamma = bn.weight.double() if bn.affine else torch.ones_like(inv_std)
    beta = bn.bias.double() if bn.affine else torch.zeros_like(inv_std)
    factor = gamma * inv_std
    weight = conv.weight.double() * factor.view(-1, 1, 1, 1)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(factor)
    bias = (bias - bn.running_mean.double()) * factor + beta
    folded.weight.data = weight.to(conv.weight.dtype)
    folded.bias = nn.Parameter(bias.to(conv.weight.dtype))
    return folded


def _check_running_stats(bn: nn.BatchNorm2d) -> None:
    if not bn.track_running_stats or bn.running_mean is None:
        raise UnsupportedOpError("BatchNorm without running statistics cannot be folded")


def fold_batchnorm_(gm: fx.GraphModule, keep: bool = False) -> dict[str, nn.BatchNorm2d]:
    """Fold every conv -> BN pair into the conv; with ``keep``, leave the conv unfolded and
    return its BN (conv target -> BN) for a QuantConvBn2d instead."""
    kept = {}
    for node in list(gm.graph.nodes):
        if node_kind(gm, node) != "batchnorm":
            continue
        src = node.args[0]
        if not (isinstance(src, fx.Node) and node_kind(gm, src) == "conv" and len(src.users) == 1):
            # Nothing to fold into (DenseNet's BN on a concatenation): a per-channel affine.
            _set_submodule(gm, node.target, ChannelAffine(gm.get_submodule(node.target)))
            continue
        bn = gm.get_submodule(node.target)
        if keep:
            _check_running_stats(bn)
            kept[src.target] = bn
        else:
            _set_submodule(gm, src.target, fold_bn_into_conv(gm.get_submodule(src.target), bn))
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        _set_submodule(gm, node.target, nn.Identity())  # keep names stable, drop the BN state
    gm.delete_all_unused_submodules()
    return kept


def freeze_batchnorm_(model: nn.Module) -> int:
    """Fold every QuantConvBn2d of a BN-aware QAT model into a QuantConv2d for good (BN
    statistics stop updating; weight quantizers and their step sizes are kept). The model's
    eval-mode output does not change. Returns how many layers were folded."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantConvBn2d)]
    for name, layer in layers:
        _set_submodule(model, name, layer.freeze())
    return len(layers)


def _set_submodule(gm: nn.Module, target: str, module: nn.Module) -> None:
    parent_name, _, leaf = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, leaf, module)


# -- pass 2: weight quantizers --------------------------------------------------------------------
def _layer_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if node_kind(gm, n) in ("conv", "linear")]


def _skip_pass_through(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """Walk back from node through pass-through ops and fused activations to its producer."""
    while node_kind(gm, node) in PASS_THROUGH | ACTIVATIONS | {"quantizer"}:
        node = node.args[0]
    return node


def last_layer(gm: fx.GraphModule) -> fx.Node | None:
    """The conv/linear whose output is the model output (the logits), if there is one."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    result = output.args[0]
    if not isinstance(result, fx.Node):
        raise UnsupportedOpError("the model must return one tensor of logits")
    producer = result
    while node_kind(gm, producer) in PASS_THROUGH:
        producer = producer.args[0]
    return producer if node_kind(gm, producer) in ("conv", "linear") else None


def insert_weight_quantizers_(
    gm: fx.GraphModule, config: QuantConfig, batchnorms: dict[str, nn.BatchNorm2d] | None = None
) -> None:
    """Conv/Linear -> QuantConv2d/QuantLinear; a conv with an entry in ``batchnorms`` (from
    ``fold_batchnorm_(keep=True)``) -> QuantConvBn2d, its quantizer set from the folded weight."""
    batchnorms = batchnorms or {}
    layers = _layer_nodes(gm)
    if not layers:
        raise UnsupportedOpError("the model has no Conv2d or Linear layer to quantize")
    edge = {layers[0].name}
    last = last_layer(gm)
    if last is not None:
        edge.add(last.name)
    for node in layers:
        layer = gm.get_submodule(node.target)
        bits = config.weight_bits
        if node.name in edge and config.first_last_bits is not None:
            bits = config.first_last_bits
        bits = config.override_for(node.target, "weight_bits") or bits
        channels = layer.weight.shape[0]
        quantizer = LSQQuantizer(
            bits,
            signed=True,
            per_channel=config.per_channel,
            num_channels=channels if config.per_channel else 1,
            scale_init=config.scale_init,
        )
        quantizer.to(layer.weight.device)
        if node.target in batchnorms:
            quant_layer = QuantConvBn2d(layer, batchnorms[node.target], quantizer)
            quantizer.init_from_(quant_layer.folded()[0].detach())
        else:
            quantizer.init_from_(layer.weight)
            cls = QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear
            quant_layer = cls(layer, quantizer)
        _set_submodule(gm, node.target, quant_layer)


# -- pass 3: activation quantizers ----------------------------------------------------------------
def _fused_end(gm: fx.GraphModule, producer: fx.Node) -> tuple[fx.Node, str | None]:
    """The node after which the quantizer goes: a ReLU/ReLU6 that alone reads the producer."""
    users = list(producer.users)
    if len(users) == 1 and node_kind(gm, users[0]) in ACTIVATIONS:
        return users[0], node_kind(gm, users[0])
    return producer, None


def _feeds_last_layer(gm: fx.GraphModule, node: fx.Node, last: fx.Node | None) -> bool:
    if last is None:
        return False
    return _skip_pass_through(gm, last.args[0]) is _skip_pass_through(gm, node)


def _is_model_output(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A producer whose (quantized) output is the model's output: the logits are codes (a model
    that pools after its last conv, as SqueezeNet does), so they get the last layer's bits."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    result = output.args[0]
    return isinstance(result, fx.Node) and _skip_pass_through(gm, result) is node


def _feeds_only_adds(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True when every reader of ``node`` (through pass-through ops) is a residual add."""
    readers = list(node.users)
    if not readers:
        return False
    while readers:
        user = readers.pop()
        kind = node_kind(gm, user)
        if kind in PASS_THROUGH:
            readers.extend(user.users)
        elif kind != "add":
            return False
    return True


def _feeds_adds_and_layers(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True when a residual add and something else (a conv, a pool...) read ``node`` directly."""
    kinds = {node_kind(gm, user) == "add" for user in node.users}
    return kinds == {True, False}


def insert_act_quantizers_(gm: fx.GraphModule, config: QuantConfig) -> None:
    last = last_layer(gm)
    count = 0
    for node in list(gm.graph.nodes):
        kind = node_kind(gm, node)
        if kind in ACTIVATIONS:
            producer = node.args[0]
            if node_kind(gm, producer) not in PRODUCERS or len(producer.users) != 1:
                raise UnsupportedOpError(
                    f"unsupported {describe(gm, node)}: ReLU/ReLU6 must directly follow the only "
                    "use of a conv, linear, add or average pool (it is fused into its quantizer)"
                )
            continue
        if kind not in PRODUCERS or node is last:
            continue
        end, act = _fused_end(gm, node)
        if kind == "normalize":
            bits = config.input_bits
        else:
            bits = config.act_bits
            edge = _feeds_last_layer(gm, end, last) or _is_model_output(gm, node)
            if edge and config.first_last_bits is not None:
                bits = config.first_last_bits
            elif config.residual_bits is not None and _feeds_only_adds(gm, end):
                bits = config.residual_bits
            name = node.target if node.op == "call_module" else node.name
            bits = config.override_for(name, "act_bits") or bits
        signed = act is None and not _non_negative(gm, node, kind)
        residual_stream = (
            kind != "normalize"
            and config.residual_bits is not None
            and config.residual_bits > bits
            and _feeds_adds_and_layers(gm, end)
        )
        wide_bits = config.residual_bits if residual_stream else bits
        qnode = _insert_quantizer(gm, end, f"act_quant_{count}", wide_bits, signed, config)
        count += 1
        if residual_stream:
            # A block output that the next block's convs and a residual add both read (the
            # residual stream): the add keeps residual_bits codes and the convs read them
            # requantized to their own bits (an `affine` op in the program), the integer form
            # of papers that keep the shortcut in float. A 2-bit residual stream loses most of
            # what the blocks add to it.
            narrow = _insert_quantizer(gm, qnode, f"act_quant_{count}", bits, signed, config)
            count += 1
            for user in list(narrow.users):
                if node_kind(gm, user) == "add":
                    user.replace_input_with(narrow, qnode)


def _insert_quantizer(gm, end: fx.Node, qname: str, bits: int, signed: bool, config) -> fx.Node:
    """An LSQQuantizer reading ``end``, which every other reader of ``end`` now reads instead."""
    gm.add_submodule(qname, LSQQuantizer(bits, signed=signed, scale_init=config.scale_init))
    with gm.graph.inserting_after(end):
        qnode = gm.graph.call_module(qname, (end,))
    end.replace_all_uses_with(qnode, delete_user_cb=lambda user, q=qnode: user is not q)
    return qnode


def _non_negative(gm: fx.GraphModule, node: fx.Node, kind: str) -> bool:
    """An average pool or a concatenation of unsigned codes is non-negative: quantize it unsigned
    too, so no code is spent on values that cannot occur (the reason ReLU outputs are unsigned)."""
    if kind == "lut":
        return lut_is_non_negative(gm, node)
    if kind == "mul":  # a product of two unsigned code tensors
        sources = node.args[:2]
        qnodes = [quantizer_feeding(gm, source) for source in sources]
        return all(q is not None and not bool(gm.get_submodule(q.target).signed) for q in qnodes)
    if kind not in ("avgpool", "cat"):
        return False
    sources = cat_inputs(node) if kind == "cat" else [node.args[0]]
    qnodes = [quantizer_feeding(gm, source) for source in sources]
    return all(q is not None and not bool(gm.get_submodule(q.target).signed) for q in qnodes)


# -- pass 4: input step sizes for bias quantization ------------------------------------------------
def quantizer_feeding(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The activation-quantizer node whose codes reach ``node`` (through pass-through ops)."""
    while node_kind(gm, node) in PASS_THROUGH:
        node = node.args[0]
    return node if node_kind(gm, node) == "quantizer" else None


def connect_input_scales_(gm: fx.GraphModule) -> None:
    for node in _layer_nodes(gm):
        qnode = quantizer_feeding(gm, node.args[0])
        if qnode is None:
            continue  # reported by check_quantized_inputs
        with gm.graph.inserting_before(node):
            param = gm.graph.get_attr(f"{qnode.target}.scale")
            scale = gm.graph.call_function(input_scale_of, (param,))
        node.args = (node.args[0], scale)


def check_quantized_inputs(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        kind = node_kind(gm, node)
        if kind in ("conv", "linear", "avgpool", "add", "mul", "cat", "lut", "affine"):
            if kind == "cat":
                args = cat_inputs(node)
            else:
                args = node.args[:2] if kind in ("add", "mul") else node.args[:1]
            for arg in args:
                if quantizer_feeding(gm, arg) is None:
                    hint = (
                        "; for a model that takes normalized tensors, pass "
                        "prepare_qat(..., normalize=(mean, std)) so it takes raw pixels"
                        if arg.op == "placeholder"
                        else ""
                    )
                    raise UnsupportedOpError(
                        f"{describe(gm, node)} reads '{arg.name}', which is not an integer tensor "
                        "(no activation quantizer reaches it); lsqint needs every layer input "
                        f"quantized{hint}"
                    )


def calibrate_(model: nn.Module, images: torch.Tensor) -> None:
    """Initialize every activation step size from one batch (a training-mode forward pass)."""
    was_training = model.training
    model.train()
    with torch.no_grad():
        model(images)
    model.train(was_training)


def quantizers(model: nn.Module) -> dict[str, LSQQuantizer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LSQQuantizer)}
