"""Differential tests: every runtime returns the reference runtime's integers (==)."""

import numpy as np
import pytest
import torch

import lsqint.errors
from conftest import DEFAULT_RUNTIMES, assert_runtimes_agree, random_qat_program
from lsqint import QuantConfig
from lsqint.intprog import format_program
from lsqint.runtime import RUNTIMES, run

BITS = [2, 3, 4, 5, 8]
MODELS = ["resnet20", "tiny_vgg", "digits_cnn"]  # + mlperf_resnet8 below


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("per_channel", [True, False], ids=["per_channel", "per_tensor"])
def test_reference_torch_and_c_agree(name, bits, per_channel):
    config = QuantConfig(weight_bits=bits, act_bits=bits, per_channel=per_channel)
    for seed in range(2):
        _, program, images = random_qat_program(name, config, seed=seed * 100 + bits)
        fresh = np.random.default_rng(seed).integers(0, 256, images.shape, dtype=np.uint8)
        assert_runtimes_agree(program, images.numpy())
        logits = assert_runtimes_agree(program, fresh)
        assert logits.shape == (images.shape[0], 10)


def test_mixed_bits_first_last_at_full_width_agree():
    config = QuantConfig(
        weight_bits=3,
        act_bits=5,
        first_last_bits=None,
        input_bits=6,
        overrides={"layers.0.*": {"weight_bits": 2, "act_bits": 2}},
    )
    _, program, images = random_qat_program("resnet20", config, seed=7)
    assert_runtimes_agree(program, images.numpy())


def test_integer_program_tracks_fake_quant_model():
    """On a random model, the integer logits and the QAT model's logits agree closely."""
    qat, program, images = random_qat_program("resnet20", QuantConfig(), seed=3, batch=4)
    qat.eval()
    with torch.no_grad():
        fq = qat(images).numpy()
    logits = run(program, images.numpy()) * program.output_scale
    assert np.abs(logits - fq).max() <= 0.05 * np.abs(fq).max() + 1e-6


def test_program_takes_only_uint8_images():
    _, program, images = random_qat_program("digits_cnn", QuantConfig(), seed=0)
    with pytest.raises(lsqint.errors.UsageError, match="uint8"):
        run(program, images.float().numpy())
    with pytest.raises(ValueError, match="shape"):
        run(program, images.numpy()[:, :, :4])
    with pytest.raises(ValueError, match="unknown runtime"):
        run(program, images.numpy(), runtime="tvm")


def test_printer_is_stable_and_lists_every_node():
    _, program, _ = random_qat_program("digits_cnn", QuantConfig(), seed=0)
    _, again, _ = random_qat_program("digits_cnn", QuantConfig(), seed=0)
    text = format_program(program)
    assert text == format_program(again)  # the same program prints the same text
    assert text.count("\n") == len(program.nodes)
    for op in ("input", "conv2d", "requantize", "maxpool2d", "avgpool2d", "flatten", "linear"):
        assert f"= {op}" in text


@pytest.mark.parametrize("bits", [(8, 8), (4, 4), (2, 2)])
def test_mlperf_tiny_resnet8_converts_and_every_runtime_agrees(bits):
    """MLPerf Tiny's ResNet-8 (the zoo's mlperf_resnet8): its 1x1 shortcut convs carry a bias
    and no BatchNorm; 12,501,632 MACs per image, as the benchmark counts them."""
    from lsqint.export.mcu import program_macs

    _, program, images = random_qat_program("mlperf_resnet8", QuantConfig(*bits), seed=1)
    assert program_macs(program) == 12_501_632
    assert_runtimes_agree(program, images.numpy())


@pytest.mark.parametrize("batch", [1, 15, 16, 17, 33])
def test_torch_runtime_exact_whatever_convolution_backend(batch):
    """With oneDNN off PyTorch picks NNPACK (Winograd/FFT, not exact) at batch >= 16; the
    runtime turns NNPACK off, so every batch size stays == the reference."""
    _, program, _ = random_qat_program("resnet20", QuantConfig(4, 4), seed=5, image_size=8)
    images = np.random.default_rng(batch).integers(0, 256, (batch, 3, 8, 8), dtype=np.uint8)
    expected = run(program, images, runtime="reference")
    for mkldnn in (False, True):
        with torch.backends.mkldnn.flags(enabled=mkldnn):
            assert np.array_equal(run(program, images, runtime="torch"), expected), mkldnn


def test_empty_batch_and_any_numpy_layout():
    _, program, images = random_qat_program("digits_cnn", QuantConfig(), seed=2, batch=4)
    names = list(DEFAULT_RUNTIMES) + (["onnx"] if _has_onnxruntime() else [])
    for name in names:
        got = run(program, images.numpy()[:0], runtime=name)
        assert got.shape == (0, 10) and got.dtype == np.int32
    flipped = images.numpy()[::-1, :, ::-1]  # negative strides
    assert_runtimes_agree(program, flipped, runtimes=names)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("bits", BITS)
def test_cuda_runtime_equals_reference(name, bits):
    for per_channel in (True, False):
        config = QuantConfig(weight_bits=bits, act_bits=bits, per_channel=per_channel)
        _, program, images = random_qat_program(name, config, seed=bits, batch=8)
        assert_runtimes_agree(
            program, images.numpy(), runtimes=("torch",), torch={"device": "cuda"}
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_cuda_int8_gemm_equals_reference(name, bits):
    """cuBLASLt's int8 GEMM (torch._int_mm) behind every ungrouped conv: == reference."""
    config = QuantConfig(weight_bits=bits, act_bits=bits)
    _, program, images = random_qat_program(name, config, seed=40 + bits, batch=8)
    assert_runtimes_agree(
        program, images.numpy(), runtimes=("torch-int8",), **{"torch-int8": {"device": "cuda"}}
    )


def test_runtime_registry_lists_reference_torch_and_c():
    assert {"reference", "torch", "c"} <= set(RUNTIMES)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_many_seeds_all_runtimes_agree(name):
    """The differential suite over many more seeds and mixed bit widths (minutes)."""
    runtimes = list(DEFAULT_RUNTIMES)
    runtimes += ["onnx"] if "onnx" in RUNTIMES and _has_onnxruntime() else []
    rng = np.random.default_rng(0)
    for seed in range(20):
        w, a = (int(b) for b in rng.integers(2, 9, 2))
        config = QuantConfig(weight_bits=w, act_bits=a, per_channel=bool(seed % 2))
        _, program, images = random_qat_program(name, config, seed=1000 + seed, batch=4)
        assert_runtimes_agree(program, images.numpy(), runtimes=runtimes)


def _has_onnxruntime() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def test_torch_runtime_compiles_once_per_program_and_device():
    import pickle

    import lsqint

    _, program, images = random_qat_program("digits_cnn", QuantConfig(), seed=4)
    first = lsqint.compile(program)
    assert lsqint.compile(program, "cpu") is first
    expected = run(program, images.numpy())
    assert np.array_equal(run(program, images.numpy(), runtime="torch"), expected)
    assert lsqint.compile(program) is first  # run() used the cached compiled program
    restored = pickle.loads(pickle.dumps(program))  # the cache is not part of the program
    assert "_compiled" not in restored.__dict__
    assert np.array_equal(run(restored, images.numpy(), runtime="torch"), expected)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("bits", [2, 4])
def test_int8_gemm_path_equals_reference(name, bits):
    """Convolutions as im2col + torch._int_mm (the CUDA tensor-core path; slow but exact on CPU):
    every ungrouped conv/linear whose codes fit int8 takes it, and the logits are the reference's.
    The first and last layers (8-bit weights by default) cover uint8 pixels shifted by 128 and
    full-range int8 weights; all-0 and all-255 images the extremes of that shift."""
    from lsqint.runtime import compile_program

    config = QuantConfig(weight_bits=bits, act_bits=bits)
    _, program, images = random_qat_program(name, config, seed=31 + bits, batch=3)
    compiled = compile_program(program, "cpu", int8_gemm=True)
    accumulating = [n.name for n in program.nodes if n.op in ("conv2d", "linear")]
    assert [compiled.paths[n] for n in accumulating] == ["int8-gemm"] * len(accumulating)
    extremes = np.stack(
        [np.zeros(images.shape[1:], np.uint8), np.full(images.shape[1:], 255, np.uint8)]
    )
    for batch in (images.numpy(), extremes):
        assert_runtimes_agree(program, batch, runtimes=("torch",), torch={"int8_gemm": True})


def test_int8_gemm_keeps_the_float_path_where_int8_cannot_hold_the_codes():
    """A weight code outside int8 (as a hand-edited program could carry) keeps that conv on the
    float path; the other convs stay int8 and the logits stay the reference's."""
    from lsqint.intprog.verify import conv_acc_bound
    from lsqint.runtime import compile_program
    from lsqint.runtime.torch_runtime import _int_mm_is_exact

    assert _int_mm_is_exact(torch.device("cpu"), 576)  # this CPU's kernel passes the probe
    _, program, images = random_qat_program("digits_cnn", QuantConfig(), seed=5)
    convs = [n for n in program.nodes if n.op == "conv2d"]
    edited = convs[-1]
    weight = np.array(edited.params["weight"], dtype=np.int64)
    weight.flat[0] = 300
    edited.params["weight"] = weight.astype(np.int32)
    spec = program.tensors[edited.inputs[0]]
    absmax = max(abs(spec.qmin), abs(spec.qmax))
    edited.attrs["acc_bound"] = int(conv_acc_bound(weight, edited.params["bias"], absmax).max())
    compiled = compile_program(program, "cpu", int8_gemm=True)
    assert compiled.paths[edited.name] != "int8-gemm"
    assert compiled.paths[convs[0].name] == "int8-gemm"
    assert_runtimes_agree(program, images.numpy(), runtimes=("torch",), torch={"int8_gemm": True})
