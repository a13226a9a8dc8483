"""The torch runtime's CPU fast path (runtime/native.py): the C rounding kernels against the
reference's int64 arithmetic, oneDNN's int8 convolution against the reference on every layer
shape it takes, the per-layer probe, and the fallbacks."""

import numpy as np
import pytest
import torch
from torch import nn

from conftest import assert_runtimes_agree, quantize, random_qat_program
from lsqint import QuantConfig
from lsqint.intprog.fixedpoint import requantize, rounding_shift
from lsqint.models.common import Normalize
from lsqint.runtime import CompiledProgram, native, run_reference

kernels = native.kernels()
needs_kernels = pytest.mark.skipif(kernels is None, reason="no C compiler for the native kernels")
needs_onednn = pytest.mark.skipif(
    not native.onednn_int8_available(), reason="oneDNN int8 convolution needs a VNNI CPU"
)


def _channels_last(x: np.ndarray) -> torch.Tensor:
    t = torch.as_tensor(x)
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


@needs_kernels
@pytest.mark.parametrize(
    "shape,lo,hi,out",
    [
        ((3, 16, 5, 7), 0, 255, torch.uint8),  # 8-bit codes, few pixels: one thread
        ((64, 24, 16, 16), 0, 15, torch.uint8),  # past the OpenMP threshold, 24 channels
        ((2, 2000, 3, 3), -128, 127, torch.float32),  # more channels than one parameter tile
        ((5, 10), -(2**23), 2**23 - 1, torch.float32),  # (N, C) logits-like, wide range
    ],
)
@pytest.mark.parametrize("per_channel", [True, False])
def test_requantize_kernel_is_the_reference(shape, lo, hi, out, per_channel):
    rng = np.random.default_rng(sum(shape))
    c = shape[1]
    acc = rng.integers(-(2**24) + 1, 2**24, shape)
    acc.flat[:4] = [2**24 - 1, -(2**24) + 1, 0, -1]  # the float32-exact ends
    n = c if per_channel else 1
    m = rng.integers(1, 2**31, n)
    t = rng.integers(1, 40, n)
    t[0] = 1  # the smallest shift: half = 1
    fn = native.Requantize(kernels, np.broadcast_to(m, c), np.broadcast_to(t, c), lo, hi, out)
    got = fn(_channels_last(acc.astype(np.float32)))
    view = (1, -1) + (1,) * (len(shape) - 2)
    expected = requantize(acc, m.reshape(view), t.reshape(view), lo, hi)
    assert got.dtype == out and got.shape == shape
    assert np.array_equal(got.to(torch.int64).numpy(), expected)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_affine_kernel_is_the_reference(dtype):
    """The affine op on codes: x * a[c] + b[c], shifted, with uint8 or float32 codes in."""
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (4, 8, 6, 6))
    a = rng.integers(-(2**20), 2**20, 8)
    b = rng.integers(-(2**30), 2**30, 8)
    t = 20
    fn = native.Requantize(kernels, a, np.full(8, t), -7, 8, torch.float32, b=b)
    got = fn(_channels_last(x).to(dtype))
    expected = np.clip(
        rounding_shift(x * a.reshape(1, -1, 1, 1) + b.reshape(1, -1, 1, 1), t), -7, 8
    )
    assert np.array_equal(got.to(torch.int64).numpy(), expected)


@needs_kernels
@pytest.mark.parametrize("types", [("f32", "f32", "u8"), ("u8", "f32", "f32"), ("u8", "u8", "u8")])
def test_add_kernel_is_the_reference(types):
    rng = np.random.default_rng(2)
    dtypes = {"f32": torch.float32, "u8": torch.uint8}
    a = rng.integers(0, 256, (32, 16, 9, 9))
    b = rng.integers(0, 256, (32, 16, 9, 9))
    m_a, m_b, t = 1_234_567, -987_654, 22
    lo, hi = (0, 255) if types[2] == "u8" else (-300, 300)
    fn = native.Add(kernels, m_a, m_b, t, lo, hi, dtypes[types[2]])
    got = fn(_channels_last(a).to(dtypes[types[0]]), _channels_last(b).to(dtypes[types[1]]))
    expected = np.clip(rounding_shift(a * m_a + b * m_b, t), lo, hi)
    assert got.dtype == dtypes[types[2]]
    assert np.array_equal(got.to(torch.int64).numpy(), expected)


class Convs(nn.Module):
    """Every convolution form oneDNN takes here: 7x7 stride 2 (signed input codes, zero point
    128), 3x3 padded, dilated, grouped and depthwise, 1x1 strided, and a residual add."""

    def __init__(self):
        super().__init__()
        self.normalize = Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        self.stem = nn.Conv2d(3, 8, 7, stride=2, padding=3)
        self.dilated = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.down = nn.Conv2d(8, 16, 1, stride=2)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.stem(self.normalize(x)))
        x = torch.relu(self.dilated(x)) + x
        x = torch.relu(self.depthwise(torch.relu(self.grouped(x))))
        x = torch.relu(self.down(x))
        return self.fc(x.mean((2, 3)))


def _convs_program(bits: int, seed: int = 0):
    torch.manual_seed(seed)
    model = Convs().eval()
    images = torch.randint(0, 256, (6, 3, 20, 20), dtype=torch.uint8)
    _, program = quantize(model, QuantConfig(bits, bits), images)
    return program, images.numpy()


@needs_onednn
@needs_kernels
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_onednn_convolutions_are_exact(bits):
    program, images = _convs_program(bits)
    compiled = CompiledProgram(program)
    convs = [n.name for n in program.nodes if n.op == "conv2d"]
    assert all(compiled.paths[name] == "onednn-int8" for name in convs), compiled.paths
    assert np.array_equal(compiled(images), run_reference(program, images))
    assert_runtimes_agree(
        program, np.random.default_rng(bits).integers(0, 256, images.shape, np.uint8)
    )


@needs_onednn
def test_onednn_int8_convolution_is_exact_on_random_geometries():
    """The arithmetic argument's premise, checked broadly on this machine's oneDNN: 80 random
    convolutions (channels 1-96, kernels 1-7, strides, dilations, padding, groups and depthwise,
    zero points 0 and 128, full-range int8 weights, batch 1-64, all-255 inputs) give exactly the
    float64 convolution."""
    import random

    from torch.nn import functional as F

    rng = random.Random(0)
    torch.manual_seed(0)
    checked = 0
    while checked < 80:
        cin = rng.choice([1, 3, 8, 16, 24, 32, 64, 96])
        groups = rng.choice([1, 1, 2, cin]) if cin % 2 == 0 else 1
        cout = cin * rng.choice([1, 2]) if groups == cin else rng.choice([4, 8, 16, 32, 64])
        k, s, d = rng.choice([1, 3, 5, 7]), rng.choice([1, 2]), rng.choice([1, 2])
        p, h = rng.choice([0, k // 2 * d]), rng.choice([5, 8, 16, 32])
        if h + 2 * p - d * (k - 1) - 1 < 0:
            continue
        zp, n = rng.choice([0, 128]), rng.choice([1, 7, 64])
        w = torch.randint(-128, 128, (cout, cin // groups, k, k), dtype=torch.int8)
        b = torch.randint(-1000, 1000, (cout,)).float()
        ones, zeros = torch.ones(cout), torch.zeros(cout, dtype=torch.int64)
        geometry = ([s, s], [p, p], [d, d], groups)
        packed = torch.ops.onednn.qconv_prepack(w, ones, 1.0, zp, *geometry, None)
        x = torch.randint(0, 256, (n, cin, h, h), dtype=torch.uint8)
        if rng.random() < 0.3:
            x.fill_(255)
        x = x.contiguous(memory_format=torch.channels_last)
        got = torch.ops.onednn.qconv2d_pointwise(
            x, 1.0, zp, packed, ones, zeros, b, *geometry, 1.0, 0, torch.float32, "none", [], ""
        )
        # Padding pads the zero point: code 0 of x - zp.
        exact = F.conv2d(x.double() - zp, w.double(), b.double(), s, p, d, groups)
        if exact.abs().max() >= 2**24:  # beyond float32's exact integers: not a case we run
            continue
        assert torch.equal(got.double(), exact), (cin, cout, k, s, d, p, groups, h, zp, n)
        checked += 1


@needs_onednn
def test_probe_refuses_a_convolution_that_is_not_exact():
    program, _ = _convs_program(8)
    compiled = CompiledProgram(program)
    node = next(n for n in program.nodes if n.op == "conv2d")
    exact = compiled.steps[[n for n, _ in compiled.steps].index(node)][1]
    assert compiled._probe_conv(node, exact)

    def off_by_one(x):  # what a saturating or weight-halving kernel would give: one value off
        acc = exact(x).clone()
        acc.view(-1)[-1] += 1
        return acc

    assert not compiled._probe_conv(node, off_by_one)


@pytest.mark.parametrize("bits", [4, 8])
def test_without_cpu_kernels_the_float_paths_run_and_agree(bits):
    _, program, images = random_qat_program("resnet20", QuantConfig(bits, bits), seed=bits)
    plain = CompiledProgram(program, cpu_kernels=False)
    assert not {"native", "onednn-int8"} & set(plain.paths.values())
    fast = CompiledProgram(program)
    x = np.random.default_rng(0).integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    assert np.array_equal(plain(x), fast(x))


@needs_kernels
def test_batches_run_in_chunks_with_the_same_integers():
    _, program, images = random_qat_program("resnet20", QuantConfig(4, 4), seed=11)
    compiled = CompiledProgram(program)
    # The chunk is the most images whose largest activation (as float32) fits the cache budget.
    largest = 4 * max(int(np.prod(spec.shape)) for spec in program.tensors.values())
    assert compiled.chunk * largest <= 4 << 20 < (compiled.chunk + 1) * largest
    x = np.random.default_rng(3).integers(0, 256, (7, 3, 32, 32), dtype=np.uint8)
    compiled.chunk = 3  # 3 + 3 + 1 images
    assert np.array_equal(compiled(x), run_reference(program, x))


def test_no_vnni_no_compiler_means_the_float_paths(monkeypatch, tmp_path):
    """A CPU without VNNI keeps float convolutions; a machine without a C compiler keeps the
    torch rounding paths; both still give the reference's integers."""
    monkeypatch.setattr(native, "cpu_flags", lambda: {"avx2", "fma"})
    assert not native.has_vnni() and not native.onednn_int8_available()
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    native.kernels.cache_clear()
    try:
        assert native.kernels() is None
        _, program, images = random_qat_program("digits_cnn", QuantConfig(8, 8), seed=5)
        compiled = CompiledProgram(program)
        assert not {"native", "onednn-int8"} & set(compiled.paths.values())
        assert np.array_equal(compiled(images.numpy()), run_reference(program, images.numpy()))
    finally:
        native.kernels.cache_clear()


def test_vnni_is_read_from_the_cpu_and_a_onednn_isa_cap(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(native.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(native, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_vnni"})
    assert native.has_vnni()
    for cap, vnni in [("AVX2", False), ("AVX512_CORE", False), ("AVX512_CORE_VNNI", True)]:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert native.has_vnni() == vnni, cap
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2_VNNI")
    monkeypatch.setattr(native, "cpu_flags", lambda: {"avx2", "fma"})
    assert not native.has_vnni()  # no VNNI in the CPU, whatever the cap says
    monkeypatch.setattr(native.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(native, "cpu_flags", lambda: {"avx512_vnni"})
    assert not native.has_vnni()


_CAPPED = """
import sys
import numpy as np
sys.path.insert(0, {tests!r})
from test_native import _convs_program
from lsqint.runtime import CompiledProgram, run_reference
program, images = _convs_program(4)
compiled = CompiledProgram(program)
assert "onednn-int8" not in compiled.paths.values(), compiled.paths
x = np.random.default_rng(0).integers(0, 256, (32, 3, 20, 20), dtype=np.uint8)
assert np.array_equal(compiled(x), run_reference(program, x))
"""


@needs_onednn
def test_onednn_capped_below_vnni_keeps_the_float_convolutions(tmp_path):
    """oneDNN capped to AVX2 (its int8 kernels then add product pairs in int16, and gave wrong
    sums on this file's 1x1 stride-2 layer even where no pair can saturate): float paths. In a
    subprocess, as oneDNN reads the cap once."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "capped.py"
    script.write_text(_CAPPED.format(tests=str(Path(__file__).parent)))
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
