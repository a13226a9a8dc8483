"""Quantized conv/linear modules used inside a prepared QAT graph.

Each holds the (BN-folded) float weight and bias, and a weight quantizer. The bias is
fake-quantized onto the accumulator scale ``input_scale * weight_scale`` exactly as the integer
program stores it (``bias_q = round(bias / (s_x * s_w))``), so training sees what is deployed.
"""

from __future__ import annotations

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
