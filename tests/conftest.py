"""Shared fixtures and the one differential helper every runtime test goes through."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lsqint import QuantConfig, prepare_qat
from lsqint.models import create_model
from lsqint.qat import calibrate_
from lsqint.qat.convert import convert
from lsqint.runtime import run
from lsqint.toolchain import c_compiler

# The runtimes every differential test checks: the generated C (compiled for this host) too,
# wherever a C compiler exists (CI's machines have one; without it the c runtime cannot run).
DEFAULT_RUNTIMES = ("reference", "torch") + (("c",) if c_compiler() else ())


def assert_runtimes_agree(program, images, runtimes=DEFAULT_RUNTIMES, **options) -> np.ndarray:
    """Every runtime returns the reference's integers, compared with ==."""
    expected = run(program, images, runtime="reference")
    for name in runtimes:
        got = run(program, images, runtime=name, **options.get(name, {}))
        assert got.dtype == expected.dtype
        assert np.array_equal(got, expected), f"runtime {name!r} differs from reference"
    return expected


def randomize_bn_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics, so folding and conversion are really tested."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.2)
    return model


def quantize(model, config: QuantConfig, images, **prepare_options):
    """prepare_qat -> calibrate on ``images`` -> convert: (QAT model, verified program)."""
    qat = prepare_qat(model, config, images, **prepare_options)
    calibrate_(qat, images)
    return qat, convert(qat)


def random_qat_program(
    name: str, config: QuantConfig, seed: int, batch: int = 2, image_size: int = 32
):
    """A randomly initialized model, prepared, calibrated on random pixels and converted."""
    torch.manual_seed(seed)
    in_channels = 1 if name == "digits_cnn" else 3
    size = 8 if name == "digits_cnn" else image_size
    model = randomize_bn_(create_model(name, 10, size), seed).eval()
    images = torch.randint(0, 256, (batch, in_channels, size, size), dtype=torch.uint8)
    qat, program = quantize(model, config, images)
    return qat, program, images


@pytest.fixture(scope="session")
def digits_runs(tmp_path_factory):
    """A float and a W4A4 QAT run on digits, trained once per test session (~10 s)."""
    from lsqint.app.workflow import digits_args, train_float, train_qat

    root = tmp_path_factory.mktemp("digits_runs")
    base = dict(seed=0, log_dir=str(root))
    float_result = train_float(digits_args(epochs=25, lr=0.05, **base))
    qat_result = train_qat(digits_args(epochs=10, lr=0.01, w_num_bits=4, a_num_bits=4, **base))
    qat8_result = train_qat(digits_args(epochs=5, lr=0.01, w_num_bits=8, a_num_bits=8, **base))
    return {
        "root": root,
        "float": float_result,
        "qat": qat_result,
        "qat8": qat8_result,
        "base": base,
    }
