"""The torch runtime: fast integer-exact execution on CPU and CUDA.

Codes travel between ops as float tensors holding small integers; accumulating ops run as float
convolutions only where exactness is proven from the bound ``verify`` recorded (DESIGN section 5):

* every product x_q * w_q and every partial sum of a conv/linear/pool is an integer of magnitude at
  most ``acc_bound``; float32 represents every integer below 2^24 and float64 below 2^53, so a
  direct or GEMM-based float convolution computes the exact sum in ANY summation order when
  ``acc_bound < 2^24`` (float32) or ``< 2^53`` (float64);
* on CUDA, cuDNN may pick transform-based algorithms (Winograd, FFT) whose rounding is not the
  exact-sum argument above; there we always compute in float64 (error ~1e-16 relative, far
  below the 0.5 that ``round`` absorbs) and round before casting; TF32 is switched off for the
  call and restored afterwards;
* requantize, add and the input op run in int64 exactly like the reference.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.nn import functional as F

from ..intprog.program import IntProgram, Node

F32_EXACT = 1 << 24
F64_EXACT = 1 << 53


def _float_dtype(bound: int, device: torch.device) -> torch.dtype:
    if device.type == "cpu" and bound < F32_EXACT:
        return torch.float32
    if bound < F64_EXACT:
        return torch.float64
    raise OverflowError(f"accumulator bound {bound} is beyond float64's exact range")


def _to_int(acc: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cpu":
        acc = torch.round(acc)
    return acc.to(torch.int64)


def _rounding_shift(acc: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # floor((acc + 2^(t-1)) / 2^t): >> on signed int64 is an arithmetic shift (rounds to -inf).
    return (acc + (1 << (t - 1))) >> t


class CompiledProgram:
    """A program with its parameters moved to ``device`` once, ready to run many batches."""

    def __init__(self, program: IntProgram, device: str | torch.device = "cpu") -> None:
        self.program = program
        self.device = torch.device(device)
        self.steps: list[tuple[Node, Callable]] = [
            (node, self._build(node)) for node in program.nodes if node.op != "output"
        ]
        self.output = program.nodes[-1].inputs[0]

    def _param(self, node: Node, key: str, dtype=torch.int64) -> torch.Tensor:
        return torch.as_tensor(np.asarray(node.params[key]), device=self.device).to(dtype)

    def _build(self, node: Node) -> Callable:
        a = node.attrs
        dev = self.device
        if node.op == "input":
            scale_a = self._param(node, "a").view(1, -1, 1, 1)
            bias_b = self._param(node, "b").view(1, -1, 1, 1)
            t = a["shift"]

            def run_input(x):
                acc = x.to(torch.int64) * scale_a + bias_b
                return _rounding_shift(acc, torch.tensor(t, device=dev)).clamp_(a["qmin"], a["qmax"])

            return run_input
        if node.op in ("conv2d", "linear"):
            dtype = _float_dtype(a["acc_bound"], dev)
            weight = self._param(node, "weight", dtype)
            bias = self._param(node, "bias", dtype)
            if node.op == "conv2d":
                stride, padding, dilation, groups = a["stride"], a["padding"], a["dilation"], a["groups"]

                def run_conv(x):
                    acc = F.conv2d(x.to(dtype), weight, bias, stride, padding, dilation, groups)
                    return _to_int(acc, dev)

                return run_conv

            def run_linear(x):
                return _to_int(F.linear(x.to(dtype), weight, bias), dev)

            return run_linear
        if node.op == "requantize":
            m = self._param(node, "m")
            t = self._param(node, "t")
            lo, hi = a["lo"], a["hi"]

            def run_requantize(acc):
                shape = (1, -1) + (1,) * (acc.dim() - 2)
                y = _rounding_shift(acc.to(torch.int64) * m.view(shape), t.view(shape))
                return y.clamp_(lo, hi)

            return run_requantize
        if node.op == "add":
            m_a, m_b, t = a["m_a"], a["m_b"], torch.tensor(a["shift"], device=dev)

            def run_add(x_a, x_b):
                acc = x_a.to(torch.int64) * m_a + x_b.to(torch.int64) * m_b
                return _rounding_shift(acc, t).clamp_(a["lo"], a["hi"])

            return run_add
        if node.op == "maxpool2d":
            def run_maxpool(x):
                # Max over codes is exact in float; F.max_pool2d pads with -inf (never wins).
                return F.max_pool2d(x.to(torch.float32), a["kernel"], a["stride"], a["padding"],
                                    a["dilation"], a["ceil_mode"])

            return run_maxpool
        if node.op == "avgpool2d":
            dtype = _float_dtype(a["acc_bound"], dev)

            def run_avgpool(x):
                total = F.avg_pool2d(x.to(dtype), a["kernel"], a["stride"], a["padding"],
                                     count_include_pad=True, divisor_override=1)
                return _to_int(total, dev)

            return run_avgpool
        if node.op == "flatten":
            return lambda x: x.reshape(x.shape[0], -1)
        raise NotImplementedError(f"torch runtime has no op {node.op!r}")

    @torch.no_grad()
    def __call__(self, images) -> np.ndarray:
        x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
        env = {"input": x.to(self.device)}
        tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        reduced = torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction
        try:
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
            for node, fn in self.steps:
                env[node.output] = fn(*(env[name] for name in node.inputs))
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = reduced
        return env[self.output].to(torch.int32).cpu().numpy()
