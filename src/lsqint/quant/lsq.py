"""LSQ fake quantization (Esser et al., ICLR 2020): the autograd function and the quantizer module.

Forward:   x_fq = clamp(round(x / s), qmin, qmax) * s
Backward (v = x / s, the paper's masks, which test v itself and not round(v)):
    dL/dx = dL/dx_fq                            if qmin <= v <= qmax, else 0   (straight-through)
    dL/ds = sum(dL/dx_fq * ds_elem) * grad_scale, where (paper eq. 3, strict interior)
            ds_elem = round(v) - v   if qmin < v < qmax,
                    = qmin           if v <= qmin,   = qmax   if v >= qmax.
Note ``clamp(round(v)) - v * strictly_inside`` gives all three cases of ``ds_elem`` in one
expression.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import UsageError
from .ranges import check_bits, code_range

# Smallest step size we ever use: keeps the scale positive whatever the optimizer does.
MIN_SCALE = 1e-8
# A trained step size never falls below this fraction of its initial value (clamp_scale_): a step
# 1/32 of the least-error one already saturates nearly every value it quantizes.
SCALE_FLOOR = 1.0 / 32


def _channel_view(scale: Tensor, x: Tensor) -> Tensor:
    """A per-channel scale (C,) viewed as (C, 1, 1, ...) to broadcast along dim 0 of x."""
    if scale.dim() == 0:
        return scale
    return scale.view(-1, *([1] * (x.dim() - 1)))


class _LSQFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, qmin: int, qmax: int, grad_scale: float) -> Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()  # under AMP: round(x / s) needs float32 resolution
        s = _channel_view(scale, x).to(x.dtype)
        v = x / s
        x_fq = torch.round(v).clamp_(qmin, qmax).mul_(s)
        ctx.save_for_backward(x, scale)
        ctx.qrange = (qmin, qmax)
        ctx.grad_scale = grad_scale
        return x_fq

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, scale = ctx.saved_tensors
        qmin, qmax = ctx.qrange
        s = _channel_view(scale, x).to(x.dtype)
        v = x / s  # recomputed: cheaper than keeping a second activation-sized tensor alive
        # hardtanh_backward(g, v, lo, hi) = g where lo < v < hi, else 0: one fused pass, much
        # faster than multiplying by a bool mask. With lo/hi one ulp outside [qmin, qmax] the
        # strict test is exactly the paper's qmin <= v <= qmax (v and the bounds share a dtype).
        lo, hi = _open_bounds(qmin, qmax, x.dtype)
        g = grad_out.to(x.dtype)
        grad_x = torch.ops.aten.hardtanh_backward(g, v, lo, hi)  # g * inside
        grad_scale_t = None
        if ctx.needs_input_grad[1]:
            if scale.dim() == 0:
                # sum(g * (clamp(round(v)) - v * strictly_inside)) = sum(g * code) -
                # sum(g * strictly_inside * v): dot products, and v is rounded in place (fresh
                # activation-sized buffers cost page faults on every step).
                strict = torch.ops.aten.hardtanh_backward(g, v, float(qmin), float(qmax))
                total_inside = _dot(strict, v)
                del strict
                code = v.round_().clamp_(qmin, qmax)
                grad_scale_t = _dot(g, code) - total_inside
            else:
                ds_elem = torch.round(v).clamp_(qmin, qmax)
                ds_elem.sub_(torch.ops.aten.hardtanh_backward(v, v, float(qmin), float(qmax)))
                grad_scale_t = (g * ds_elem).flatten(1).sum(1)
            grad_scale_t = (grad_scale_t * ctx.grad_scale).to(scale.dtype)
        if not ctx.needs_input_grad[0]:
            grad_x = None
        return grad_x, grad_scale_t, None, None, None


def _dot(a: Tensor, b: Tensor) -> Tensor:
    if a.is_contiguous() and b.is_contiguous():
        return torch.dot(a.view(-1), b.view(-1))
    return (a * b).sum()


def _open_bounds(qmin: int, qmax: int, dtype: torch.dtype) -> tuple[float, float]:
    """qmin's neighbour below and qmax's above in ``dtype``: lo < v < hi <=> qmin <= v <= qmax."""
    lo = torch.nextafter(
        torch.tensor(float(qmin), dtype=dtype), torch.tensor(-math.inf, dtype=dtype)
    )
    hi = torch.nextafter(
        torch.tensor(float(qmax), dtype=dtype), torch.tensor(math.inf, dtype=dtype)
    )
    return lo.item(), hi.item()


def lsq_fake_quant(x: Tensor, scale: Tensor, qmin: int, qmax: int, grad_scale: float) -> Tensor:
    """LSQ fake quantization with the paper's gradients.

    ``scale`` is a 0-d tensor or one value per channel along dim 0 of ``x``.

    >>> x = torch.tensor([-1.0, 0.26, 0.74, 9.0])
    >>> lsq_fake_quant(x, torch.tensor(0.5), -4, 3, 1.0)
    tensor([-1.0000,  0.5000,  0.5000,  1.5000])
    """
    return _LSQFakeQuant.apply(x, scale, int(qmin), int(qmax), float(grad_scale))


SCALE_INITS = ("mse", "lsq")

# MSE initialization: candidate step sizes and the most elements per step size it looks at.
_MSE_CANDIDATES = 100
_MSE_MAX_ELEMENTS = 1 << 18


def init_scale(x: Tensor, qmin: int, qmax: int, per_channel: bool, method: str = "mse") -> Tensor:
    """Initial step size(s) for codes in [qmin, qmax] (per channel along dim 0 when asked).

    ``"lsq"``: the paper's ``2 * mean|x| / sqrt(qmax)``. ``"mse"`` (default): the step size, among
    100 evenly spaced candidates up to ``max|x| / qmax``, whose fake quantization of ``x`` has the
    smallest mean squared error. The paper's formula assumes a bell-shaped tensor; a ReLU output
    that is 90 % zeros has a tiny mean, so at 2 bits every non-zero value lands above qmax, the
    straight-through gradient is zero for all of them, and nothing below that quantizer ever trains
    (the W2A2 CIFAR-10 resnet20 collapse: its last ReLU quantizer clipped 100 % of its non-zero
    inputs). The MSE step size cannot clip everything: a larger candidate always does better.
    """
    if method not in SCALE_INITS:
        raise UsageError(f"scale init {method!r} is unknown; use one of {SCALE_INITS}")
    x = x.detach().float()
    rows = x.flatten(1) if per_channel else x.reshape(1, -1)
    if method == "lsq":
        scale = 2.0 * rows.abs().mean(1) / math.sqrt(qmax)
    else:
        scale = _mse_scale(rows, qmin, qmax)
    scale = scale.clamp_min(MIN_SCALE)
    return scale if per_channel else scale.reshape(())


def _mse_scale(rows: Tensor, qmin: int, qmax: int) -> Tensor:
    """Per row: the candidate step size with the smallest ``mean((fq(x) - x)^2)``."""
    if rows.shape[1] > _MSE_MAX_ELEMENTS:  # an evenly strided subsample: deterministic
        stride = -(-rows.shape[1] // _MSE_MAX_ELEMENTS)
        rows = rows[:, ::stride]
    # Largest useful step: the one at which the farthest value is just representable.
    reach = rows.amax(1).clamp_min(0) / qmax
    if qmin < 0:
        reach = torch.maximum(reach, rows.amin(1).clamp_max(0) / qmin)
    reach = reach.clamp_min(MIN_SCALE).unsqueeze(1)
    best_err = torch.full_like(reach, math.inf)
    best = reach.clone()
    for k in range(1, _MSE_CANDIDATES + 1):
        s = reach * (k / _MSE_CANDIDATES)
        err = (torch.round(rows / s).clamp_(qmin, qmax).mul_(s).sub_(rows)).square_().mean(1, True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s, best)
    return best.squeeze(1)


class LSQQuantizer(nn.Module):
    """A learnable-step-size quantizer for one tensor (weights or activations).

    Everything needed to rebuild it (bits, signedness, per-channel flag, gradient scale, whether the
    step size was initialized) lives in buffers, so it survives ``state_dict`` save and load.
    Activation quantizers initialize their scale from the first training-mode batch; weight
    quantizers are initialized by ``init_from_(weight)`` at prepare time.
    """

    def __init__(
        self,
        bits: int,
        signed: bool,
        per_channel: bool = False,
        num_channels: int = 1,
        scale_init: str = "mse",
    ) -> None:
        super().__init__()
        check_bits(bits)
        if scale_init not in SCALE_INITS:
            raise UsageError(f"scale_init {scale_init!r} is unknown; use one of {SCALE_INITS}")
        self.scale_init = scale_init  # how init_from_ sets the step size (not needed after it)
        shape = (num_channels,) if per_channel else ()
        self.scale = nn.Parameter(torch.ones(shape))
        self.register_buffer("bits", torch.tensor(bits, dtype=torch.int64))
        self.register_buffer("signed", torch.tensor(bool(signed)))
        self.register_buffer("per_channel", torch.tensor(bool(per_channel)))
        self.register_buffer("grad_scale", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("initialized", torch.tensor(False))
        # Lower bound on the step size, set at initialization (see ``clamp_scale_``).
        self.register_buffer("scale_floor", torch.zeros(shape))

    # -- ranges -------------------------------------------------------------------------------
    @property
    def qrange(self) -> tuple[int, int]:
        return code_range(int(self.bits), bool(self.signed))

    @property
    def qmin(self) -> int:
        return self.qrange[0]

    @property
    def qmax(self) -> int:
        return self.qrange[1]

    def effective_scale(self) -> Tensor:
        """The step size actually used: the learnable scale, kept positive."""
        return self.scale.clamp(min=MIN_SCALE)

    # -- initialization -------------------------------------------------------------------------
    @torch.no_grad()
    def init_from_(self, x: Tensor, elements_per_scale: int | None = None) -> None:
        """Set the step size from data (``init_scale``) and the gradient scale ``1/sqrt(N*qmax)``.

        N is the number of elements one step size serves: per channel, the elements of that
        channel; for activations, the elements of one sample.
        """
        qmin, qmax = self.qrange
        scale = init_scale(x, qmin, qmax, bool(self.per_channel), self.scale_init)
        self.scale.copy_(scale.to(self.scale))
        self.scale_floor.copy_(scale.to(self.scale_floor) * SCALE_FLOOR)
        if elements_per_scale is None:
            elements_per_scale = x[0].numel() if bool(self.per_channel) else x.numel()
        self.grad_scale.fill_(1.0 / math.sqrt(elements_per_scale * qmax))
        self.initialized.fill_(True)

    @torch.no_grad()
    def clamp_scale_(self) -> None:
        """Keep the step size at least ``SCALE_FLOOR`` x its initial value (call after each
        optimizer step). LSQ's step-size gradient is noisy where one step size serves few
        values: CIFAR-10 resnet20's 8-bit first layer (27 weights per channel) drove a channel's
        step size from 0.0012 below zero within one epoch at lr 0.001; clamped at ~0 every
        weight of that channel saturates and the program cannot represent its multiplier."""
        if bool(self.initialized):
            torch.maximum(self.scale, self.scale_floor, out=self.scale)

    def forward(self, x: Tensor) -> Tensor:
        if not bool(self.initialized):
            if not self.training:
                raise UsageError(
                    "LSQQuantizer used in eval mode before its step size was initialized; "
                    "run one training-mode forward pass (calibration) first"
                )
            # Activations: N = elements of one sample.
            self.init_from_(x, elements_per_scale=x[0].numel())
            _sync_scale_across_ranks_(self)
        qmin, qmax = self.qrange
        return lsq_fake_quant(x, self.effective_scale(), qmin, qmax, float(self.grad_scale))

    def extra_repr(self) -> str:
        kind = "signed" if bool(self.signed) else "unsigned"
        per = "per-channel" if bool(self.per_channel) else "per-tensor"
        return f"bits={int(self.bits)}, {kind}, {per}"


def _sync_scale_across_ranks_(quantizer: LSQQuantizer) -> None:
    """Average a data-initialized step size over all ranks so every replica starts identical."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        with torch.no_grad():
            dist.all_reduce(quantizer.scale.data, op=dist.ReduceOp.SUM)
            quantizer.scale.data /= dist.get_world_size()
