"""Quantized conv/linear modules used inside a prepared QAT graph.

Each holds the (BN-folded) float weight and bias, and a weight quantizer. The bias is
fake-quantized onto the accumulator scale ``input_scale * weight_scale`` exactly as the integer
program stores it (``bias_q = round(bias / (s_x * s_w))``), so training sees what is deployed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..quant import LSQQuantizer


def _bias_fake_quant(bias: Tensor, acc_scale: Tensor) -> Tensor:
    """round(bias / acc_scale) * acc_scale with a straight-through gradient for the bias."""
    acc_scale = acc_scale.detach()
    bias_fq = (bias / acc_scale).round() * acc_scale
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
            raise ValueError(
                f"conv padding_mode={conv.padding_mode!r} is not supported (zeros only)"
            )
        self.weight.data.copy_(conv.weight.data)
        if conv.bias is not None:
            self.bias.data.copy_(conv.bias.data)
        self.weight_quantizer = weight_quantizer

    def forward(self, x: Tensor, input_scale: Tensor | None = None) -> Tensor:
        w_fq = self.weight_quantizer(self.weight)
        bias = self.bias
        if bias is not None and input_scale is not None:
            bias = _bias_fake_quant(bias, input_scale * self.weight_quantizer.effective_scale())
        return F.conv2d(x, w_fq, bias, self.stride, self.padding, self.dilation, self.groups)


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
