"""Ops for any CNN (torch.cat along channels, spatial means, adaptive pooling with uneven windows,
elementwise functions as lookup tables, squeeze-excitation products): QAT -> program -> every
runtime, == reference."""

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from conftest import assert_runtimes_agree, quantize, randomize_bn_
from lsqint import QuantConfig, prepare_qat
from lsqint.intprog import ProgramError, verify
from lsqint.intprog.artifact import load, save
from lsqint.intprog.ops import adaptive_windows
from lsqint.models import Normalize
from lsqint.qat import UnsupportedOpError
from lsqint.runtime import run

try:
    import onnxruntime  # noqa: F401

    RUNTIMES = ("reference", "torch", "c", "onnx")
except ImportError:  # the onnx extra is not installed
    RUNTIMES = ("reference", "torch", "c")


class FireAndMeans(nn.Module):
    """SqueezeNet's fire module (two ReLU branches joined), a signed branch joined too, a
    squeeze-excitation style mean with keepdim into a 1x1 conv, and MnasNet's closing mean
    without it."""

    def __init__(self):
        super().__init__()
        self.normalize = Normalize((0.5, 0.4, 0.3), (0.25, 0.2, 0.3))
        self.squeeze = nn.Conv2d(3, 4, 1)
        self.expand1 = nn.Conv2d(4, 6, 1)
        self.expand3 = nn.Conv2d(4, 5, 3, padding=1)
        self.signed = nn.Conv2d(3, 2, 3, padding=1)
        self.pointwise = nn.Conv2d(13, 8, 1)
        self.gate = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.normalize(x)
        s = torch.relu(self.squeeze(x))
        y = torch.cat([torch.relu(self.expand1(s)), torch.relu(self.expand3(s)), self.signed(x)], 1)
        y = torch.relu(self.pointwise(y))
        g = torch.relu(self.gate(y.mean((2, 3), keepdim=True)))  # (N, 8, 1, 1)
        return self.fc(torch.mean(g, [-1, -2]))


def _program(bits, seed=0, size=(7, 9)):
    torch.manual_seed(seed)
    model = FireAndMeans().eval()
    images = torch.randint(0, 256, (4, 3, *size), dtype=torch.uint8)
    qat, program = quantize(model, QuantConfig(*bits), images)
    return qat, program, images


@pytest.mark.parametrize("bits", [(2, 2), (3, 5), (4, 4), (8, 8)])
def test_cat_and_mean_equal_reference_on_every_runtime(bits, tmp_path):
    qat, program, images = _program(bits, seed=bits[0])
    ops = [n.op for n in program.nodes]
    assert "concat" in ops and ops.count("avgpool2d") == 2
    concat = next(n for n in program.nodes if n.op == "concat")
    assert program.tensors[concat.output].dtype == "int8"  # one input is signed
    fresh = np.random.default_rng(bits[1]).integers(0, 256, (6, 3, 7, 9), dtype=np.uint8)
    for batch in (images.numpy(), fresh):
        assert_runtimes_agree(program, batch, runtimes=RUNTIMES)
    save(program, tmp_path / "p.intprog.safetensors")
    again = load(tmp_path / "p.intprog.safetensors")
    assert_runtimes_agree(again, fresh, runtimes=("reference",))
    qat.eval()
    with torch.no_grad():
        fq = qat(images).numpy()
    logits = assert_runtimes_agree(program, images.numpy(), runtimes=("reference",))
    assert np.abs(logits * program.output_scale - fq).max() <= 0.05 * np.abs(fq).max() + 1e-6


def test_concat_of_unsigned_codes_stays_unsigned():
    class TwoRelu(nn.Module):
        def __init__(self):
            super().__init__()
            self.normalize = Normalize((0.5,), (0.5,))
            self.a, self.b = nn.Conv2d(1, 3, 1), nn.Conv2d(1, 2, 3, padding=1)
            self.fc = nn.Linear(5 * 4 * 4, 3)

        def forward(self, x):
            x = self.normalize(x)
            y = torch.cat((torch.relu(self.a(x)), torch.relu(self.b(x))), dim=1)
            return self.fc(y.flatten(1))

    images = torch.randint(0, 256, (2, 1, 4, 4), dtype=torch.uint8)
    qat, program = quantize(TwoRelu().eval(), QuantConfig(4, 4, first_last_bits=None), images)
    concat = next(n for n in program.nodes if n.op == "concat")
    assert (program.tensors[concat.output].qmin, program.tensors[concat.output].qmax) == (0, 15)
    assert_runtimes_agree(program, images.numpy(), runtimes=RUNTIMES)


def test_cat_along_another_dim_is_refused_by_name():
    class WidthCat(nn.Module):
        def __init__(self):
            super().__init__()
            self.normalize = Normalize((0.5,), (0.5,))
            self.conv = nn.Conv2d(1, 2, 1)

        def forward(self, x):
            y = self.conv(self.normalize(x))
            return torch.cat([y, y], dim=3).flatten(1)

    with pytest.raises(UnsupportedOpError, match="cat"):
        prepare_qat(WidthCat().eval(), QuantConfig(), torch.zeros(1, 1, 4, 4))


def test_verify_refuses_a_concat_with_the_wrong_multipliers():
    _, program, _ = _program((4, 4))
    bad = copy.deepcopy(program)
    concat = next(n for n in bad.nodes if n.op == "concat")
    concat.attrs["m"] = concat.attrs["m"][:-1]
    with pytest.raises(ProgramError, match="one integer per input"):
        verify(bad)
    bad = copy.deepcopy(program)
    concat = next(n for n in bad.nodes if n.op == "concat")
    concat.inputs = concat.inputs[:-1]
    with pytest.raises(ProgramError):
        verify(bad)


class AdaptivePool(nn.Module):
    def __init__(self, out_size):
        super().__init__()
        self.normalize = Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        self.conv = nn.Conv2d(3, 4, 3)
        self.pool = nn.AdaptiveAvgPool2d(out_size)
        self.fc = nn.Linear(4 * out_size[0] * out_size[1], 3)

    def forward(self, x):
        x = torch.relu(self.conv(self.normalize(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


@pytest.mark.parametrize(
    "size,out_size",
    [((4, 4), (7, 7)), ((9, 7), (4, 3)), ((5, 3), (3, 2))],
    ids=["vgg-at-small-size", "overlapping", "unequal-areas"],
)
def test_adaptive_pooling_with_uneven_windows_is_exact(size, out_size):
    """VGG/AlexNet at small inputs: 4x4 -> 7x7 repeats inputs (window areas 1, 2 and 4); 9 -> 4
    overlaps windows; 5x3 -> 3x2 has areas 4 and 6."""
    torch.manual_seed(0)
    model = AdaptivePool(out_size).eval()
    images = torch.randint(0, 256, (3, 3, size[0] + 2, size[1] + 2), dtype=torch.uint8)
    qat, program = quantize(model, QuantConfig(4, 4), images)
    pool = next(n for n in program.nodes if n.op == "adaptive_avgpool2d")
    rows = {e - s for s, e in adaptive_windows(size[0], out_size[0])}
    cols = {e - s for s, e in adaptive_windows(size[1], out_size[1])}
    areas = {r * c for r in rows for c in cols}
    # Overlapping or unequal windows: no avgpool2d (one kernel, one stride) computes them.
    assert size[0] % out_size[0] or size[1] % out_size[1]
    assert all(pool.attrs["lcm"] % area == 0 for area in areas)
    assert_runtimes_agree(program, images.numpy(), runtimes=RUNTIMES)
    qat.eval()
    with torch.no_grad():
        fq = qat(images).numpy()
    logits = run(program, images.numpy())
    assert np.abs(logits * program.output_scale - fq).max() <= 0.05 * np.abs(fq).max()


class Nonlinear(nn.Module):
    """Every lookup-table function, as modules, functions and tensor methods, with a
    squeeze-excitation gate (mean -> 1x1 convs -> Hardsigmoid/Sigmoid -> x * gate)."""

    def __init__(self):
        super().__init__()
        self.normalize = Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.hardswish = nn.Hardswish()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.squeeze = nn.Conv2d(8, 4, 1)
        self.excite = nn.Conv2d(4, 8, 1)
        self.gate = nn.Hardsigmoid()
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.elu = nn.ELU()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.hardswish(self.conv1(self.normalize(x)))
        x = F.silu(self.conv2(x))
        g = self.gate(self.excite(torch.relu(self.squeeze(x.mean((2, 3), keepdim=True)))))
        x = x * g
        s = torch.sigmoid(self.excite(F.gelu(self.squeeze(x.mean((2, 3), keepdim=True)))))
        x = torch.mul(x, s)
        x = F.leaky_relu(self.conv3(x), 0.1).tanh()
        return self.fc(self.elu(x).mean((2, 3)))


@pytest.mark.parametrize("bits", [(2, 2), (4, 4), (8, 8), (3, 6)])
def test_lookup_tables_and_gates_equal_reference_and_the_qat_model(bits, tmp_path):
    torch.manual_seed(bits[1])
    model = Nonlinear().eval()
    images = torch.randint(0, 256, (3, 3, 6, 5), dtype=torch.uint8)
    qat, program = quantize(model, QuantConfig(*bits), images)
    ops = [n.op for n in program.nodes]
    assert ops.count("lut") == 8 and ops.count("mul") == 2
    save(program, tmp_path / "p.intprog.safetensors")  # tables survive the file format
    assert np.array_equal(
        run(load(tmp_path / "p.intprog.safetensors"), images.numpy()), run(program, images.numpy())
    )
    gates = [
        n for n in program.nodes if n.op == "lut" and program.tensors[n.output].shape == (8, 1, 1)
    ]
    assert len(gates) == 2  # Hardsigmoid and Sigmoid: non-negative functions, unsigned codes
    assert all(program.tensors[g.output].qmin == 0 for g in gates)
    fresh = np.random.default_rng(0).integers(0, 256, (5, 3, 6, 5), dtype=np.uint8)
    for batch in (images.numpy(), fresh):
        assert_runtimes_agree(program, batch, runtimes=RUNTIMES)
    # The tables are the QAT model's own float32 arithmetic; a code can still flip at a rounding
    # tie in the QAT model's float32 convolutions and means (see evaluation.compare).
    qat.eval()
    with torch.no_grad():
        fq = qat(torch.as_tensor(fresh)).numpy()
    logits = run(program, fresh)
    assert np.abs(logits * program.output_scale - fq).max() <= 0.01 * np.abs(fq).max()


def test_lookup_table_of_a_tampered_program_is_refused():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 6, 5), dtype=torch.uint8)
    qat, program = quantize(Nonlinear().eval(), QuantConfig(4, 4), images)
    bad = copy.deepcopy(program)
    lut = next(n for n in bad.nodes if n.op == "lut")
    lut.params["table"] = lut.params["table"][:-1]
    with pytest.raises(ProgramError, match="entries"):
        verify(bad)
    bad = copy.deepcopy(program)
    lut = next(n for n in bad.nodes if n.op == "lut")
    lut.params["table"] = lut.params["table"] + 1000
    with pytest.raises(ProgramError, match="outside"):
        verify(bad)


def channel_shuffle(x, groups: int):
    n, c, h, w = x.size()
    x = x.view(n, groups, c // groups, h, w)
    return torch.transpose(x, 1, 2).contiguous().view(n, c, h, w)


class ShuffleBlock(nn.Module):
    """ShuffleNetV2's unit (chunk -> branch -> cat -> channel shuffle written with sizes), a
    split into unequal pieces and a permute there and back."""

    def __init__(self):
        super().__init__()
        self.normalize = Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.branch = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.mix = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6 * 5 * 4, 3)

    def forward(self, x):
        x = torch.relu(self.stem(self.normalize(x)))
        x1, x2 = x.chunk(2, dim=1)
        x = channel_shuffle(torch.cat((x1, torch.relu(self.branch(x2))), dim=1), 2)
        a, b, c = torch.split(x, [3, 1, 4], dim=1)
        x = torch.cat([c, a, b], 1).permute(0, 2, 3, 1).permute(0, 3, 1, 2)
        return self.fc(torch.relu(self.mix(x)).reshape(x.shape[0], -1))


@pytest.mark.parametrize("bits", [(2, 2), (4, 4), (8, 8)])
def test_data_movement_equals_reference_on_every_runtime(bits, tmp_path):
    torch.manual_seed(bits[0])
    model = ShuffleBlock().eval()
    images = torch.randint(0, 256, (3, 3, 5, 4), dtype=torch.uint8)
    qat, program = quantize(model, QuantConfig(*bits), images)
    save(program, tmp_path / "p.intprog.safetensors")
    program = load(tmp_path / "p.intprog.safetensors")  # shapes, perms and ranges survive the file
    ops = [n.op for n in program.nodes]
    assert ops.count("slice") == 5 and ops.count("transpose") == 3 and ops.count("reshape") >= 3
    fresh = np.random.default_rng(1).integers(0, 256, (4, 3, 5, 4), dtype=np.uint8)
    for batch in (images.numpy(), fresh):
        logits = assert_runtimes_agree(program, batch, runtimes=RUNTIMES)
        assert len(np.unique(logits)) > 3  # not a constant output
    qat.eval()
    with torch.no_grad():
        fq = qat(torch.as_tensor(fresh)).numpy()
    assert np.abs(run(program, fresh) * program.output_scale - fq).max() <= 0.05 * np.abs(fq).max()


def test_transpose_that_moves_the_batch_is_refused():
    class BatchMover(nn.Module):
        def __init__(self):
            super().__init__()
            self.normalize = Normalize((0.5,), (0.5,))
            self.conv = nn.Conv2d(1, 2, 1)

        def forward(self, x):
            return self.conv(self.normalize(x)).transpose(0, 1).flatten(1)

    with pytest.raises(UnsupportedOpError, match="transpose"):
        prepare_qat(BatchMover().eval(), QuantConfig(), torch.zeros(2, 1, 4, 4))


class DenseLayer(nn.Module):
    """DenseNet's pre-activation order: BatchNorm -> ReLU -> conv on a concatenation, where no
    conv precedes the BatchNorm to fold it into (one channel's gamma negative)."""

    def __init__(self):
        super().__init__()
        self.normalize = Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        self.conv0 = nn.Conv2d(3, 6, 3, padding=1)
        self.norm1 = nn.BatchNorm2d(6)
        self.conv1 = nn.Conv2d(6, 4, 3, padding=1)
        self.norm2 = nn.BatchNorm2d(10)
        self.fc = nn.Linear(10, 3)

    def forward(self, x):
        x = self.conv0(self.normalize(x))
        y = self.conv1(torch.relu(self.norm1(x)))
        z = torch.relu(self.norm2(torch.cat([x, y], 1)))
        return self.fc(z.mean((2, 3)))


@pytest.mark.parametrize("bits", [(2, 2), (4, 4), (8, 8)])
def test_batchnorm_without_a_conv_before_it_is_an_exact_affine(bits):
    torch.manual_seed(0)
    model = randomize_bn_(DenseLayer()).eval()
    with torch.no_grad():
        model.norm1.weight[0] = -0.7
    images = torch.randint(0, 256, (3, 3, 6, 5), dtype=torch.uint8)
    qat, program = quantize(model, QuantConfig(*bits), images)
    assert [n.op for n in program.nodes].count("affine") == 2
    fresh = np.random.default_rng(2).integers(0, 256, (4, 3, 6, 5), dtype=np.uint8)
    for batch in (images.numpy(), fresh):
        assert_runtimes_agree(program, batch, runtimes=RUNTIMES)
    qat.eval()
    with torch.no_grad():
        fq = qat(torch.as_tensor(fresh)).numpy()
        reference_float = model(torch.as_tensor(fresh).float()).numpy()
    assert np.abs(run(program, fresh) * program.output_scale - fq).max() <= 0.05 * np.abs(fq).max()
    if bits == (8, 8):  # the frozen affine is the BN's eval map: close to the float model
        assert np.abs(fq - reference_float).max() <= 0.1 * np.abs(reference_float).max()


def test_model_ending_in_pooling_gives_8_bit_code_logits():
    """SqueezeNet's end: conv -> ReLU -> global average pool -> flatten; the logits are the
    pool's codes, at the last layer's 8 bits, widened to int32 by the output."""
    model = nn.Sequential(
        Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
        nn.Conv2d(3, 5, 3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    ).eval()
    torch.manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 6, 6), dtype=torch.uint8)
    qat, program = quantize(model, QuantConfig(2, 2), images)
    assert program.output_spec.dtype == "uint8" and program.output_spec.qmax == 255
    logits = assert_runtimes_agree(program, images.numpy(), runtimes=RUNTIMES)
    assert logits.dtype == np.int32 and logits.shape == (4, 5)


def test_functional_pooling_with_keywords_converts():
    """Inception writes F.avg_pool2d(x, kernel_size=3, stride=1, padding=1) and F.max_pool2d
    likewise: a C builtin and a dispatch wrapper whose signatures inspect cannot read."""

    class Pool(nn.Module):
        def __init__(self):
            super().__init__()
            self.normalize = Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4 * 6 * 6, 3)

        def forward(self, x):
            x = torch.relu(self.conv(self.normalize(x)))
            x = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
            return self.fc(torch.flatten(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1), 1))

    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    qat, program = quantize(Pool().eval(), QuantConfig(), images)
    pool = next(n for n in program.nodes if n.op == "avgpool2d")
    assert (pool.attrs["kernel"], pool.attrs["stride"], pool.attrs["padding"]) == (
        [3, 3],
        [1, 1],
        [1, 1],
    )
    assert_runtimes_agree(program, images.numpy(), runtimes=RUNTIMES)
