import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lsqint.errors import UsageError
from lsqint.quant import LSQQuantizer, code_range, init_scale, lsq_fake_quant


def paper_reference(x, s, qmin, qmax, g):
    """LSQ paper formulas written out directly (float64): eq. 3's strict interior for s."""
    s_b = s.view(-1, *([1] * (x.dim() - 1))) if s.dim() else s
    v = x / s_b
    out = torch.clamp(torch.round(v), qmin, qmax) * s_b
    inside = (v >= qmin) & (v <= qmax)
    ds = torch.where(
        v <= qmin,
        torch.full_like(v, qmin),
        torch.where(v >= qmax, torch.full_like(v, qmax), torch.round(v) - v),
    )
    return out, inside.to(x.dtype), ds * g


CASES = [
    (bits, signed, per_channel)
    for bits in (2, 3, 4, 8)
    for signed in (True, False)
    for per_channel in (False, True)
]


def _inputs(seed, per_channel, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 5, 4, 4, generator=g, dtype=dtype) * 2
    s = torch.rand(6 if per_channel else (), generator=g, dtype=dtype) * 0.3 + 0.05
    return x, s


@pytest.mark.parametrize("bits,signed,per_channel", CASES)
def test_forward_equals_formula(bits, signed, per_channel):
    qmin, qmax = code_range(bits, signed)
    for dtype in (torch.float32, torch.float64):
        x, s = _inputs(bits, per_channel, dtype)
        s_b = s.view(-1, 1, 1, 1) if per_channel else s
        expected = torch.clamp(torch.round(x / s_b), qmin, qmax) * s_b
        assert torch.equal(lsq_fake_quant(x, s, qmin, qmax, 0.1), expected)


@pytest.mark.parametrize("bits,signed,per_channel", CASES)
def test_gradients_equal_paper_formulas(bits, signed, per_channel):
    qmin, qmax = code_range(bits, signed)
    x, s = _inputs(10 + bits, per_channel)
    x.requires_grad_(True)
    s.requires_grad_(True)
    g = 0.37
    upstream = torch.randn_like(x)
    lsq_fake_quant(x, s, qmin, qmax, g).backward(upstream)
    _, dx, ds = paper_reference(x.detach(), s.detach(), qmin, qmax, g)
    assert torch.equal(x.grad, upstream * dx)
    ds_total = (upstream * ds).flatten(1).sum(1) if per_channel else (upstream * ds).sum()
    torch.testing.assert_close(s.grad, ds_total, rtol=1e-12, atol=1e-12)


def _band(v, qmin, qmax):
    """Half a step just outside the range: PyTorch masks on round(v), the paper on v."""
    return ((v < qmin) & (v >= qmin - 0.5)) | ((v > qmax) & (v < qmax + 0.5))


@pytest.mark.parametrize("bits,signed,per_channel", CASES)
def test_matches_pytorch_learnable_fake_quant_outside_band(bits, signed, per_channel):
    qmin, qmax = code_range(bits, signed)
    x, s = _inputs(20 + bits, per_channel, torch.float32)
    s_b = s.view(-1, 1, 1, 1) if per_channel else s
    x = x * s_b * max(qmax, -qmin) * 0.6  # spread over the range and past both ends
    g = 0.5
    xa, sa = x.clone().requires_grad_(True), s.clone().requires_grad_(True)
    xb, sb = x.clone().requires_grad_(True), s.clone().requires_grad_(True)
    upstream = torch.randn_like(x)
    ours = lsq_fake_quant(xa, sa, qmin, qmax, g)
    if per_channel:
        zp = torch.zeros(6)
        theirs = torch._fake_quantize_learnable_per_channel_affine(xb, sb, zp, 0, qmin, qmax, g)
    else:
        zp = torch.zeros(1)
        theirs = torch._fake_quantize_learnable_per_tensor_affine(
            xb, sb.reshape(1), zp, qmin, qmax, g
        )
    v = x / s_b
    band = _band(v, qmin, qmax)
    # PyTorch multiplies by 1/s where we divide by s: exclude the (rare) exact-tie neighbourhood.
    tie = ((v - v.floor()) - 0.5).abs() < 1e-4
    keep = ~band & ~tie
    assert keep.float().mean() > 0.5
    torch.testing.assert_close(ours[keep], theirs[keep], rtol=0, atol=1e-6)
    mask = keep.float()
    (ours * upstream * mask).sum().backward()
    (theirs * upstream * mask).sum().backward()
    assert torch.equal(xa.grad[keep], xb.grad[keep])
    torch.testing.assert_close(sa.grad.reshape(-1), sb.grad.reshape(-1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("per_channel", [False, True])
def test_step_gradient_at_exactly_qmin_and_qmax_is_the_papers(per_channel):
    """Eq. 3: v == qmin gives qmin and v == qmax gives qmax (not round(v) - v = 0)."""
    qmin, qmax = code_range(3, True)  # -4 .. 3
    s = torch.tensor([0.5] if per_channel else 0.5, dtype=torch.float64, requires_grad=True)
    x = torch.tensor([[qmin * 0.5, qmax * 0.5, 0.5]], dtype=torch.float64, requires_grad=True)
    lsq_fake_quant(x, s, qmin, qmax, 1.0).sum().backward()
    assert s.grad.sum().item() == qmin + qmax + 0.0
    assert torch.equal(x.grad, torch.ones(1, 3, dtype=torch.float64))  # STE: inclusive range
    _, _, ds = paper_reference(x.detach(), s.detach(), qmin, qmax, 1.0)
    assert ds.sum().item() == s.grad.sum().item()


def test_trained_step_size_never_falls_below_its_floor():
    q = LSQQuantizer(8, signed=True, per_channel=True, num_channels=3)
    q.init_from_(torch.randn(3, 27))
    initial = q.scale.detach().clone()
    q.scale.data[0] = -1e-3  # what a noisy step-size gradient did to resnet20's first layer
    q.scale.data[1] = initial[1] / 2  # allowed: above the floor
    q.clamp_scale_()
    assert q.scale[0].item() == pytest.approx(initial[0].item() / 32)
    assert q.scale[1].item() == initial[1].item() / 2
    assert q.scale[2].item() == initial[2].item()


def test_band_just_outside_range_follows_the_paper():
    qmin, qmax = code_range(3, True)  # -4 .. 3
    s = torch.tensor(1.0)
    x = torch.tensor([-4.3, 3.2, 3.49, -4.49], requires_grad=True)  # inside the half-step band
    s.requires_grad_(True)
    lsq_fake_quant(x, s, qmin, qmax, 1.0).sum().backward()
    # Paper: v outside [qmin, qmax] -> no gradient to x, and qmin / qmax to s.
    assert torch.equal(x.grad, torch.zeros(4))
    assert s.grad.item() == pytest.approx(qmin + qmax + qmax + qmin)


def test_step_size_init_lsq_is_the_paper_formula():
    x = torch.randn(8, 3, 3, 3)
    q = LSQQuantizer(4, signed=True, per_channel=True, num_channels=8, scale_init="lsq")
    q.init_from_(x)
    expected = 2 * x.abs().flatten(1).mean(1) / (7**0.5)
    torch.testing.assert_close(q.scale.data, expected)
    assert q.grad_scale.item() == pytest.approx(1 / (27 * 7) ** 0.5)
    torch.testing.assert_close(init_scale(x, -8, 7, False, "lsq"), 2 * x.abs().mean() / 7**0.5)


def test_step_size_init_mse_is_the_best_candidate():
    x = torch.randn(4, 300, generator=torch.Generator().manual_seed(0))
    q = LSQQuantizer(3, signed=True, per_channel=True, num_channels=4)  # default: mse
    q.init_from_(x)
    qmin, qmax = -4, 3
    for c in range(4):
        reach = max(x[c].max().item() / qmax, x[c].min().item() / qmin)
        candidates = torch.tensor([reach * k / 100 for k in range(1, 101)])
        errs = torch.stack(
            [(lsq_fake_quant(x[c], s, qmin, qmax, 1.0) - x[c]).square().mean() for s in candidates]
        )
        chosen = (lsq_fake_quant(x[c], q.scale[c], qmin, qmax, 1.0) - x[c]).square().mean()
        # The chosen step is a candidate, and no candidate has a smaller error (up to float32
        # rounding, which may order two near-equal candidates either way).
        assert torch.isclose(candidates, q.scale[c], rtol=1e-5, atol=0).any()
        assert chosen <= errs.min() * (1 + 1e-5)


def test_quantizer_state_survives_save_and_load():
    q = LSQQuantizer(3, signed=False)
    q.train()
    q(torch.rand(4, 2, 5, 5))  # activation init: N = elements of one sample
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    fresh = LSQQuantizer(8, signed=True)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.qrange == (0, 7)
    assert bool(fresh.initialized)
    assert fresh.grad_scale.item() == pytest.approx(1 / (50 * 7) ** 0.5)
    assert fresh.grad_scale.item() == q.grad_scale.item()
    assert torch.equal(fresh.scale, q.scale)


def test_uninitialized_quantizer_refuses_eval():
    q = LSQQuantizer(4, signed=True).eval()
    with pytest.raises(UsageError, match="initialized"):
        q(torch.randn(2, 3))


def test_scale_stays_positive():
    q = LSQQuantizer(4, signed=True)
    q.init_from_(torch.randn(10))
    q.scale.data.fill_(-1.0)
    assert q.effective_scale().item() > 0
    assert torch.isfinite(q(torch.randn(10))).all()


@pytest.mark.parametrize("bits", [1, 9, 4.0, True])
def test_bad_bits_are_refused(bits):
    with pytest.raises(ValueError, match="bits"):
        LSQQuantizer(bits, signed=True)


@settings(max_examples=50, deadline=None)
@given(
    bits=st.integers(2, 8),
    signed=st.booleans(),
    values=st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=64),
    scale=st.floats(1e-3, 10.0),
)
def test_fake_quant_error_is_at_most_half_a_step_inside_the_range(bits, signed, values, scale):
    qmin, qmax = code_range(bits, signed)
    x = torch.tensor(values, dtype=torch.float64)
    s = torch.tensor(scale, dtype=torch.float64)
    out = lsq_fake_quant(x, s, qmin, qmax, 1.0)
    codes = (out / s).round()
    assert codes.min() >= qmin and codes.max() <= qmax
    inside = (x >= qmin * s) & (x <= qmax * s)
    assert ((out - x).abs()[inside] <= s / 2 * (1 + 1e-9)).all()
    assert (out[x > qmax * s] == qmax * s).all() and (out[x < qmin * s] == qmin * s).all()


def test_bias_fake_quant_of_a_float64_copy_rounds_like_convert():
    """The float64 evaluation copy of a QAT model must fake-quantize each bias to the integer that
    ``convert`` stores (round in float32), also where the float64 quotient lies within float32's
    error of a half; large quotients (1e4-1e6 accumulator units) make such cases common."""
    from lsqint.qat.modules import _bias_fake_quant

    g = torch.Generator().manual_seed(0)
    acc_scale = (torch.rand(20000, generator=g) * 1e-5 + 1e-7).float()
    bias = ((torch.rand(20000, generator=g) - 0.5) * 2.0 * acc_scale * 1e6).float()
    stored = torch.round(bias / acc_scale)  # convert's arithmetic (float32)
    q64 = _bias_fake_quant(bias.double(), acc_scale.double()) / acc_scale.double()
    assert torch.equal(torch.round(q64), stored.double())
    q32 = _bias_fake_quant(bias, acc_scale) / acc_scale
    assert torch.equal(torch.round(q32), stored)
