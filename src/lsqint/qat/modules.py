"""Quantized conv/linear modules used inside a prepared QAT graph.

Each holds the (BN-folded) float weight and bias, and a weight quantizer. The bias is
fake-quantized onto the accumulator scale ``input_scale * weight_scale`` exactly as the integer
program stores it (``bias_q = round(bias / (s_x * s_w))``), so training sees what is deployed.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..errors import UsageError
from ..quant import LSQQuantizer


def _bias_fake_quant(bias: Tensor, acc_scale: Tensor) -> Tensor:
    """round(bias / acc_scale) * acc_scale with a straight-through gradient for the bias.

    The integer bias is computed in float32 whatever the model's dtype, as ``convert`` computes
    it: a float64 copy of the model (the exact-arithmetic evaluation) would otherwise round a
    quotient within float32's error of a half (46196.5028 in float64, below .5 in float32) to the
    other integer and differ from the deployed program by one accumulator unit."""
    acc_scale = acc_scale.detach()
    bias_q = (bias.float() / acc_scale.float()).round().to(bias.dtype)
    bias_fq = bias_q * acc_scale
    return bias + (bias_fq - bias).detach()


class QuantConv2d(nn.Conv2d):
    """nn.Conv2d whose weight (and bias) pass through LSQ fake quantization."""

    def __init__(self, conv: nn.Conv2d, weight_quantizer: LSQQuantizer) -> None:
        super().__init__(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        if conv.padding_mode != "zeros":
            raise UsageError(
                f"conv padding_mode={conv.padding_mode!r} is not supported (zeros only)"
            )
        self.weight.data.copy_(conv.weight.data)
        if conv.bias is not None:
            self.bias.data.copy_(conv.bias.data)
        self.weight_quantizer = weight_quantizer

    def forward(self, x: Tensor, input_scale: Tensor | None = None) -> Tensor:
        return _folded_conv(self, x, self.weight, self.bias, input_scale)


class QuantLinear(nn.Linear):
    """nn.Linear whose weight (and bias) pass through LSQ fake quantization."""

    def __init__(self, linear: nn.Linear, weight_quantizer: LSQQuantizer) -> None:
        super().__init__(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        self.weight.data.copy_(linear.weight.data)
        if linear.bias is not None:
            self.bias.data.copy_(linear.bias.data)
        self.weight_quantizer = weight_quantizer

    def forward(self, x: Tensor, input_scale: Tensor | None = None) -> Tensor:
        w_fq = self.weight_quantizer(self.weight)
        bias = self.bias
        if bias is not None and input_scale is not None:
            bias = _bias_fake_quant(bias, input_scale * self.weight_quantizer.effective_scale())
        return F.linear(x, w_fq, bias)


class ChannelAffine(nn.Module):
    """A BatchNorm that follows no conv (DenseNet's BN -> ReLU -> conv on a concatenation),
    frozen to its eval-mode map ``x * weight[c] + bias[c]`` at prepare time (as a folded BN is);
    weight and bias keep training. The program runs it as the ``affine`` op on codes."""

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        inv_std = (bn.running_var.detach() + bn.eps).rsqrt()
        gamma = bn.weight.detach() if bn.affine else torch.ones_like(inv_std)
        beta = bn.bias.detach() if bn.affine else torch.zeros_like(inv_std)
        self.weight = nn.Parameter((gamma * inv_std).clone())
        self.bias = nn.Parameter((beta - bn.running_mean.detach() * gamma * inv_std).clone())

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.weight.view(shape) + self.bias.view(shape)


class QuantConvBn2d(QuantConv2d):
    """A conv and the BatchNorm after it, for BN-aware QAT (Jacob et al. 2018, section 3.2;
    torch.ao's ConvBn2d): the weight quantizer sees the folded weight
    ``w * gamma / sqrt(running_var + eps)``, so its step sizes are already the deployed ones.

    Training mode: the conv of the quantized folded weight is divided back by that factor and
    normalized with the batch's statistics, which keep updating the running ones. Eval mode: the
    folded conv, computed by the same code as ``freeze()``'s QuantConv2d, so that an eval-mode
    QuantConvBn2d and its frozen conv give equal outputs (the deployed model is the frozen one).
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, weight_quantizer: LSQQuantizer):
        super().__init__(conv, weight_quantizer)
        self.bn = copy.deepcopy(bn)
        # Set by start_from_folded_(): the folded bias of a QAT checkpoint, which the next
        # training-mode forward turns into BN statistics (see there).
        self._folded_bias: Tensor | None = None

    def _factor(self) -> Tensor:
        inv_std = torch.rsqrt(self.bn.running_var + self.bn.eps)
        return inv_std * self.bn.weight if self.bn.affine else inv_std

    def folded(self) -> tuple[Tensor, Tensor]:
        """The weight and bias of the conv this layer equals in eval mode."""
        factor = self._factor()
        weight = self.weight * factor.view(-1, 1, 1, 1)
        bias = self.bias if self.bias is not None else torch.zeros_like(factor)
        bias = (bias - self.bn.running_mean) * factor
        if self.bn.affine:
            bias = bias + self.bn.bias
        return weight, bias

    def forward(self, x: Tensor, input_scale: Tensor | None = None) -> Tensor:
        if not self.training:
            weight, bias = self.folded()
            return _folded_conv(self, x, weight, bias, input_scale)
        factor = self._factor()
        w_fq = self.weight_quantizer(self.weight * factor.view(-1, 1, 1, 1))
        y = F.conv2d(x, w_fq, None, self.stride, self.padding, self.dilation, self.groups)
        y = y / factor.view(1, -1, 1, 1)
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        if self._folded_bias is not None:
            self._take_statistics_(y)
        return self.bn(y)

    def start_from_folded_(self, weight: Tensor, bias: Tensor | None) -> None:
        """Start from a BN-folded conv (a QAT checkpoint's): the next training-mode forward
        sets the BN so that this layer equals that conv: running mean/var = the batch's
        per-channel mean/var m, v of the conv output, gamma = sqrt(v + eps) (folding factor 1),
        beta = m + the folded bias."""
        with torch.no_grad():
            self.weight.copy_(weight)
            if self.bias is not None:
                self.bias.zero_()
            # Folding factor ~1 until then, so that the quantizer already sees ``weight``.
            self.bn.running_mean.zero_()
            self.bn.running_var.fill_(1.0)
            if self.bn.affine:
                self.bn.weight.fill_(1.0)
                self.bn.bias.zero_()
        self._folded_bias = (
            bias.detach().clone() if bias is not None else torch.zeros(self.out_channels)
        ).to(self.weight.device)

    @torch.no_grad()
    def _take_statistics_(self, y: Tensor) -> None:
        # Unbiased, as BatchNorm's running_var: this forward's momentum update then keeps it.
        mean = y.mean((0, 2, 3))
        var = y.var((0, 2, 3), unbiased=True)
        self.bn.running_mean.copy_(mean)
        self.bn.running_var.copy_(var)
        if self.bn.affine:
            self.bn.weight.copy_((var + self.bn.eps).sqrt())
            self.bn.bias.copy_(mean + self._folded_bias)
        self._folded_bias = None

    def freeze(self) -> QuantConv2d:
        """The plain QuantConv2d this layer equals in eval mode, sharing its weight quantizer."""
        frozen = QuantConv2d(self, self.weight_quantizer)  # this geometry and quantizer
        with torch.no_grad():
            weight, bias = self.folded()
            frozen.weight.copy_(weight)
        frozen.bias = nn.Parameter(bias)  # a folded conv always has a bias
        if self.weight.is_contiguous(memory_format=torch.channels_last):  # as QAT runs (speed)
            frozen.weight.data = frozen.weight.data.contiguous(memory_format=torch.channels_last)
        return frozen.train(self.training)


def _folded_conv(
    layer: QuantConv2d, x: Tensor, weight: Tensor, bias: Tensor | None, input_scale: Tensor | None
) -> Tensor:
    """QuantConv2d's forward for the given (float) weight and bias."""
    w_fq = layer.weight_quantizer(weight)
    if bias is not None and input_scale is not None:
        bias = _bias_fake_quant(bias, input_scale * layer.weight_quantizer.effective_scale())
    return F.conv2d(x, w_fq, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
