"""ONNX export: ONNX Runtime returns the reference runtime's integers (==); no float anywhere."""

import numpy as np
import pytest

from conftest import assert_runtimes_agree, random_qat_program
from lsqint import QuantConfig, load

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from lsqint.export.onnx_int import export_onnx, to_onnx_model  # noqa: E402

pytestmark = pytest.mark.onnx

INTEGER_TYPES = {
    onnx.TensorProto.UINT8,
    onnx.TensorProto.INT8,
    onnx.TensorProto.INT16,
    onnx.TensorProto.INT32,
    onnx.TensorProto.INT64,
    onnx.TensorProto.UINT64,
}


# The default tier exports every model at a few (bits, layout) pairs (every op of these models in
# every ONNX flavour; test_ops_any_cnn covers the other ops); the whole grid is `-m slow`
# (ONNX Runtime builds a session per export: 10-40 s each for resnet20 on 2 cores).
DEFAULT_GRID = {
    ("resnet20", 2, True),
    ("resnet20", 4, False),
    ("tiny_vgg", 8, True),
    ("tiny_vgg", 3, False),
}
GRID = [
    pytest.param(
        name,
        bits,
        per_channel,
        id=f"{'per_channel' if per_channel else 'per_tensor'}-{bits}-{name}",
        marks=()
        if name == "digits_cnn" or (name, bits, per_channel) in DEFAULT_GRID
        else pytest.mark.slow,
    )
    for name in ("resnet20", "tiny_vgg", "digits_cnn")
    for bits in (2, 3, 4, 5, 8)
    for per_channel in (True, False)
]


@pytest.mark.parametrize(("name", "bits", "per_channel"), GRID)
def test_onnx_runtime_equals_reference(name, bits, per_channel):
    config = QuantConfig(weight_bits=bits, act_bits=bits, per_channel=per_channel)
    _, program, images = random_qat_program(name, config, seed=bits + 11, batch=3)
    fresh = np.random.default_rng(bits).integers(0, 256, images.shape, dtype=np.uint8)
    assert_runtimes_agree(program, images.numpy(), runtimes=("onnx",))
    assert_runtimes_agree(program, fresh, runtimes=("onnx",))
    if per_channel:  # the same program with its rounding steps as proven-exact float ops
        assert_runtimes_agree(program, fresh, runtimes=("onnx",), onnx={"exact_float": True})
        # ... and with ONNX Runtime's QLinearConv / QuantizeLinear where proven exact
        assert_runtimes_agree(program, fresh, runtimes=("onnx",), onnx={"qlinear": True})


@pytest.mark.parametrize("bits", [pytest.param(4, marks=pytest.mark.slow), 8])
def test_int_float_export_replaces_the_int64_rounding_chains(bits):
    config = QuantConfig(weight_bits=bits, act_bits=bits, residual_bits=8 if bits < 8 else None)
    _, program, images = random_qat_program("resnet20", config, seed=5, batch=4)
    integer = [n.op_type for n in to_onnx_model(program).graph.node]
    fast = [n.op_type for n in to_onnx_model(program, exact_float=True).graph.node]
    rounding = sum(n.op in ("requantize", "add", "input", "affine") for n in program.nodes)
    assert integer.count("BitShift") == rounding and "Floor" not in integer
    # Every rounding step that a float plan proves exact loses its int64 chain.
    assert fast.count("Floor") + fast.count("BitShift") == rounding
    assert fast.count("Floor") >= rounding // 2
    assert len(fast) < len(integer)
    assert_runtimes_agree(program, images.numpy(), runtimes=("onnx",), onnx={"exact_float": True})


@pytest.mark.parametrize("bits", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_qlinear_export_runs_every_low_bit_conv_as_qlinearconv(bits):
    # resnet20 at W4A4 / W2A2 with the 8-bit residual stream: every conv + requantize pair with
    # low-bit outputs is proven for ONNX Runtime's QLinearConv (the 8-bit stream's convs keep
    # ConvInteger: one zero point per layer cannot serve 256 output codes), every rounding step
    # for QuantizeLinear; the runtime equals the reference on random images and on extremes.
    config = QuantConfig(weight_bits=bits, act_bits=bits, residual_bits=8)
    _, program, images = random_qat_program("resnet20", config, seed=bits, batch=4)
    ops = [n.op_type for n in to_onnx_model(program, qlinear=True).graph.node]
    reader = {n.inputs[0]: n for n in program.nodes if n.op == "requantize"}
    levels = [
        program.tensors[reader[n.output].output].qmax
        - program.tensors[reader[n.output].output].qmin
        + 1
        for n in program.nodes
        if n.op == "conv2d"
    ]
    assert ops.count("QLinearConv") == sum(n <= 1 << bits for n in levels) >= 9
    assert ops.count("ConvInteger") == sum(n > 1 << bits for n in levels)
    # The other rounding steps: QuantizeLinear where a float32 plan is proven (most), else
    # float64 Floor (8-bit stream steps near a tie) or the int64 chain (the int32 logits).
    steps = sum(n.op in ("requantize", "add", "input", "affine") for n in program.nodes)
    assert ops.count("QuantizeLinear") + ops.count("QLinearConv") >= steps * 3 // 4
    rng = np.random.default_rng(bits)
    extremes = np.stack(
        [
            np.zeros(images.shape[1:], np.uint8),
            np.full(images.shape[1:], 255, np.uint8),
            (np.indices(images.shape[1:]).sum(0) % 2 * 255).astype(np.uint8),
            rng.choice(np.array([0, 255], np.uint8), images.shape[1:]),
        ]
    )
    batch = np.concatenate(
        [images.numpy(), extremes, rng.integers(0, 256, (8, *images.shape[1:]), dtype=np.uint8)]
    )
    assert_runtimes_agree(program, batch, runtimes=("onnx",), onnx={"qlinear": True})


def test_no_float_tensor_between_input_and_output():
    _, program, _ = random_qat_program("resnet20", QuantConfig(), seed=0)
    model = onnx.shape_inference.infer_shapes(to_onnx_model(program), strict_mode=True)
    graph = model.graph
    types = [v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input, *graph.output)]
    types += [init.data_type for init in graph.initializer]
    assert len(types) > 100
    assert set(types) <= INTEGER_TYPES
    ops = {n.op_type for n in graph.node}
    assert {"ConvInteger", "MatMulInteger", "BitShift"} <= ops
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.INT32


def test_digits_program_exports_and_runs_exactly(tmp_path, digits_runs):
    import lsqint

    program = load(digits_runs["qat"]["program"])
    path = tmp_path / "digits.onnx"
    assert export_onnx(program, path) == path.stat().st_size
    onnx.checker.check_model(str(path), full_check=True)
    images = lsqint.data.load_data("digits").val.images.numpy()
    assert_runtimes_agree(program, images, runtimes=("torch", "onnx"))


def test_export_cli_writes_a_checked_model(tmp_path, digits_runs):
    from lsqint.app.cli import main

    out = tmp_path / "m.onnx"
    assert main(["export", "--program", digits_runs["qat"]["program"], "--onnx", str(out)]) == 0
    onnx.checker.check_model(str(out))


def test_qdq_export_of_w8a8_digits_tracks_the_integer_program(tmp_path, digits_runs):
    import lsqint
    from lsqint.export.onnx_qdq import export_onnx as export_qdq
    from lsqint.export.onnx_qdq import run_qdq

    program = load(digits_runs["qat8"]["program"])
    data = lsqint.data.load_data("digits")
    images, labels = data.val.images.numpy(), data.val.labels.numpy()
    int_pred = lsqint.run(program, images).argmax(1)
    qdq_pred = run_qdq(program, images).argmax(1)
    assert (int_pred == labels).mean() > 0.9
    # QDQ is not exact by nature (float accumulation, round-half-even): on 360 images allow one
    # label to differ (0.28 points), which the W8A8 digits program trained here does.
    assert (qdq_pred != int_pred).sum() <= 1
    path = tmp_path / "qdq.onnx"
    export_qdq(program, path)
    model = onnx.load(str(path))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"} <= ops


def test_qdq_export_refuses_sub_8_bit_programs(digits_runs):
    from lsqint.export.onnx_int import ExportError
    from lsqint.export.onnx_qdq import to_qdq_model

    with pytest.raises(ExportError, match="needs an 8-bit program"):
        to_qdq_model(load(digits_runs["qat"]["program"]))


@pytest.mark.parametrize("runtime", ["onnx", "onnx-qlinear"])
def test_infer_runs_on_onnx_runtime(tmp_path, digits_runs, runtime):
    import json

    from lsqint.app.cli import main

    out = tmp_path / "r.json"
    args = [
        "infer",
        "--program",
        digits_runs["qat"]["program"],
        "--runtime",
        runtime,
        "--cuda",
        "-1",
        "--json",
        str(out),
    ]
    assert main(args) == 0
    row = json.loads(out.read_text())
    assert row["runtime"] == runtime and row["agreement"] >= 0.999
