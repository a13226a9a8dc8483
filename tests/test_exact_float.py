"""The torch runtime's float fast paths: each plan is proven exact; check them independently."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lsqint.intprog.exact_float import add_plan, affine_step_plan, qlinear_layer_plan, qlinear_plan
from lsqint.intprog.fixedpoint import quantize_multiplier


def exact(x, m, b, t, lo, hi):
    return np.clip([(int(v) * m + b + (1 << (t - 1))) >> t for v in x], lo, hi)


def emulate(x, M, C, lo, hi, rounding=np.floor):
    dtype = type(M)
    return np.clip(
        rounding(np.add(np.multiply(x.astype(dtype), M, dtype=dtype), C, dtype=dtype)), lo, hi
    ).astype(np.int64)


def emulate_qlinearconv(x, scale, c, z, lo, hi, out_min, out_max):
    """ONNX Runtime's x86 QLinearConv requantize, written out independently: int32 add of the
    bias, cvtdq2ps, mulps, cvtps2dq (half to even), + zero point, saturate, then our Clip."""
    acc = (x + c).astype(np.int32)
    v = np.float32(acc.astype(np.float32) * np.float32(scale))
    q = np.clip(np.rint(v).astype(np.int64) + z, out_min, out_max)
    return np.clip(q, lo, hi)


def code_range(bits, signed):
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def dense_or_sampled(bound):
    if bound <= 20_000:
        return np.arange(-bound, bound + 1)
    rng = np.random.default_rng(0)
    return np.unique(np.concatenate([rng.integers(-bound, bound + 1, 40_000), [-bound, bound]]))


@settings(max_examples=60, deadline=None)
@given(
    real=st.floats(1e-5, 4.0),
    bits=st.sampled_from([2, 4, 8]),
    signed=st.booleans(),
    bound=st.integers(10, 200_000),
    dtype=st.sampled_from([np.float32, np.float64]),
)
def test_affine_plan_matches_exact_requantize_everywhere_it_claims(
    real, bits, signed, bound, dtype
):
    m, t = quantize_multiplier(real)
    lo, hi = code_range(bits, signed)
    plan = affine_step_plan(m, 0, t, lo, hi, -bound, bound, dtype)
    if plan is None:
        return  # the runtime falls back to int64; nothing is claimed
    # Every integer in the range (dense below 20k, sampled above) agrees.
    xs = dense_or_sampled(bound)
    assert np.array_equal(emulate(xs, *plan, lo, hi), exact(xs, m, 0, t, lo, hi))


def test_near_tie_8bit_requantize_is_refused_in_float32_and_proven_in_float64():
    # Regression: a W8A8 resnet20 layer whose steps sit within float32's rounding error of a half.
    m, t, lo, hi, bound = 1522463215, 38, -128, 127, 207_918
    assert affine_step_plan(m, 0, t, lo, hi, -bound, bound, np.float32) is None
    plan = affine_step_plan(m, 0, t, lo, hi, -bound, bound, np.float64)
    assert plan is not None
    xs = np.arange(-bound, bound + 1)
    assert np.array_equal(emulate(xs, *plan, lo, hi), exact(xs, m, 0, t, lo, hi))


@settings(max_examples=40, deadline=None)
@given(ra=st.floats(0.05, 3.0), rb=st.floats(0.05, 3.0), bits=st.sampled_from([4, 8]))
def test_add_plan_matches_exact_add_on_every_code_pair(ra, rb, bits):
    _, t = quantize_multiplier(max(ra, rb))
    m_a, m_b = round(ra * 2**t), round(rb * 2**t)
    rng = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
    for dtype in (np.float32, np.float64):
        plan = add_plan(m_a, m_b, t, 0, (1 << bits) - 1, rng, rng, dtype)
        if dtype is np.float64:
            assert plan is not None  # float64 always holds (integers below 2^41)
        if plan is None:
            continue
        Ma, Mb, C = plan
        a, b = np.meshgrid(np.arange(rng[0], rng[1] + 1), np.arange(rng[0], rng[1] + 1))
        got = np.clip(
            np.floor(
                np.add(
                    np.add(
                        np.multiply(a.astype(dtype), Ma, dtype=dtype),
                        np.multiply(b.astype(dtype), Mb, dtype=dtype),
                        dtype=dtype,
                    ),
                    C,
                    dtype=dtype,
                )
            ),
            0,
            (1 << bits) - 1,
        )
        want = np.clip((a * m_a + b * m_b + (1 << (t - 1))) >> t, 0, (1 << bits) - 1)
        assert np.array_equal(got.astype(np.int64), want)


@pytest.mark.parametrize("bits", [4, 8])
def test_torch_runtime_reports_its_paths(bits):
    from conftest import random_qat_program
    from lsqint import QuantConfig
    from lsqint.runtime import CompiledProgram

    _, program, _ = random_qat_program("resnet20", QuantConfig(weight_bits=bits, act_bits=bits), 0)
    # The float paths (the CPU fast path's are tested in test_native.py).
    paths = CompiledProgram(program, cpu_kernels=False).paths
    assert set(paths.values()) <= {"float32", "float64", "float32+float64", "int64"}
    convs = [n.name for n in program.nodes if n.op == "conv2d"]
    assert all(paths[c] in ("float32", "float64") for c in convs)


@settings(max_examples=40, deadline=None)
@given(
    real=st.floats(1e-4, 1.0),
    bits=st.sampled_from([2, 3, 4]),
    signed=st.booleans(),
    bound=st.integers(10, 60_000),
)
def test_rne_plan_matches_exact_requantize_everywhere_it_claims(real, bits, signed, bound):
    # The qlinear export's QuantizeLinear rounds half to even; its plans are proven for that.
    m, t = quantize_multiplier(real)
    lo, hi = code_range(bits, signed)
    plan = affine_step_plan(m, 0, t, lo, hi, -bound, bound, np.float32, "rne")
    if plan is None:
        return
    xs = dense_or_sampled(bound)
    assert np.array_equal(emulate(xs, *plan, lo, hi, np.rint), exact(xs, m, 0, t, lo, hi))


@settings(max_examples=40, deadline=None)
@given(
    real=st.floats(1e-4, 0.5),
    bits=st.sampled_from([2, 3, 4]),
    signed=st.booleans(),
    bound=st.integers(10, 100_000),
    z=st.integers(0, 255),
)
def test_qlinear_plan_matches_exact_requantize_everywhere_it_claims(real, bits, signed, bound, z):
    m, t = quantize_multiplier(real)
    lo, hi = code_range(bits, signed)
    out_min, out_max = (-128, 127) if signed else (0, 255)
    z = z - 128 if signed else z
    plan = qlinear_plan(m, t, lo, hi, -bound, bound, z, out_min, out_max)
    if plan is None:
        return
    xs = dense_or_sampled(bound)
    got = emulate_qlinearconv(xs, *plan, z, lo, hi, out_min, out_max)
    assert np.array_equal(got, exact(xs, m, 0, t, lo, hi))


def test_one_zero_point_serves_every_channel_of_a_4_bit_layer():
    # ONNX Runtime takes one output zero point per QLinearConv; a far one (255 for unsigned
    # codes) tilts the per-channel (scale, c) enough that all 64 channels here are proven.
    rng = np.random.default_rng(3)
    ms, ts = zip(*(quantize_multiplier(r) for r in rng.uniform(2e-4, 3e-3, 64)), strict=True)
    bound = 23_000
    plan = qlinear_layer_plan(ms, ts, 0, 15, -bound, bound, 0, 255)
    assert plan is not None
    scales, offsets, z = plan
    assert z >= 224
    xs = np.arange(-bound, bound + 1)
    for m, t, scale, c in zip(ms, ts, scales, offsets, strict=True):
        got = emulate_qlinearconv(xs, scale, int(c), z, 0, 15, 0, 255)
        assert np.array_equal(got, exact(xs, m, 0, t, 0, 15))
