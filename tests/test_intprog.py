import json
import struct

import numpy as np
import pytest
import torch
from torch import nn

import lsqint
from conftest import assert_runtimes_agree, quantize, random_qat_program
from lsqint import QuantConfig, convert, load, prepare_qat, save
from lsqint.app.evaluation import compare, images_and_labels
from lsqint.app.runs import load_qat_model
from lsqint.intprog import ProgramError, verify
from lsqint.intprog.artifact import ArtifactError, pack_bits, unpack_bits
from lsqint.models import Normalize
from lsqint.qat import calibrate_


def test_convert_refuses_uninitialized_step_sizes():
    model = lsqint.models.create_model("digits_cnn").eval()
    qat = prepare_qat(model, QuantConfig(), torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="never initialized"):
        convert(qat)


def test_convert_refuses_nan_parameters():
    qat, _, images = random_qat_program("digits_cnn", QuantConfig(), seed=0)
    with torch.no_grad():
        qat.get_submodule("conv2").weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        convert(qat)


def test_program_that_could_overflow_int32_is_refused_naming_the_layer():
    # 2 x 256 x 256 inputs of 8-bit signed codes into 8-bit weights at -128:
    # |acc| <= 131072 * 128 * 128 = 2^31, which int32 cannot hold.
    model = nn.Sequential(Normalize((0.5, 0.5), (0.5, 0.5)), nn.Flatten(1), nn.Linear(131072, 2))
    with torch.no_grad():
        model[2].weight.fill_(-1.0)
        model[2].bias.zero_()
    images = torch.randint(0, 256, (2, 2, 256, 256), dtype=torch.uint8)
    qat = prepare_qat(model.eval(), QuantConfig(), images)
    calibrate_(qat, images)
    qat.get_submodule("2").weight_quantizer.scale.data.fill_(1 / 256)  # every code saturates
    with pytest.raises(
        ProgramError, match=r"node '2' \(linear\): int32 accumulator could overflow"
    ):
        convert(qat)


def test_verify_catches_a_tampered_bound():
    _, program, _ = random_qat_program("digits_cnn", QuantConfig(), seed=0)
    conv = next(n for n in program.nodes if n.op == "conv2d")
    conv.attrs["acc_bound"] -= 1
    with pytest.raises(ProgramError, match="acc_bound"):
        verify(program)


def test_pack_bits_is_dense_and_round_trips():
    for bits in range(2, 8):
        codes = np.random.default_rng(bits).integers(-(2 ** (bits - 1)), 2 ** (bits - 1), 999)
        packed = pack_bits(codes.astype(np.int8), bits)
        assert packed.size == (999 * bits + 7) // 8
        assert np.array_equal(unpack_bits(packed, bits, 999), codes.astype(np.int8))
    assert pack_bits(np.array([-8, 7], np.int8), 4).tolist() == [0xF0]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_save_load_round_trip_is_exact(tmp_path, bits):
    config = QuantConfig(weight_bits=bits, act_bits=bits, first_last_bits=None)
    _, program, images = random_qat_program("resnet20", config, seed=bits)
    path = tmp_path / "p.safetensors"
    size = save(program, path)
    loaded = load(path)
    assert str(loaded) == str(program)
    for a, b in zip(program.nodes, loaded.nodes, strict=True):
        assert a.attrs == b.attrs
        for key in a.params:
            assert a.params[key].dtype == b.params[key].dtype
            assert np.array_equal(a.params[key], b.params[key])
    assert np.array_equal(lsqint.run(program, images), lsqint.run(loaded, images))
    from safetensors.numpy import load_file

    stored = load_file(str(path))
    for node in program.nodes:
        if "weight" in node.params:
            w = stored[f"{node.name}/weight"]
            expected = (node.params["weight"].size * bits + 7) // 8 if bits < 8 else None
            if expected is None:
                assert w.dtype == np.int8 and w.size == node.params["weight"].size
            else:
                assert w.dtype == np.uint8 and w.size == expected  # dense b-bit stream
    assert size == path.stat().st_size


def _saved(tmp_path):
    _, program, _ = random_qat_program("digits_cnn", QuantConfig(), seed=1)
    path = tmp_path / "p.safetensors"
    save(program, path)
    return path


def test_truncated_file_is_refused(tmp_path):
    path = _saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ArtifactError, match="corrupted or truncated"):
        load(path)


def test_corrupted_weight_bytes_are_refused(tmp_path):
    path = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum"):
        load(path)


def test_foreign_safetensors_file_is_refused(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "other.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, str(path))
    with pytest.raises(ArtifactError, match="not an lsqint integer program"):
        load(path)


def test_random_bytes_and_missing_files_are_refused(tmp_path):
    path = tmp_path / "junk.bin"
    path.write_bytes(b"\x00" * 3)
    with pytest.raises(ArtifactError, match="too short"):
        load(path)
    path.write_bytes(struct.pack("<Q", 20) + b"not json at all!!!!!")
    with pytest.raises(ArtifactError, match="not a safetensors file"):
        load(path)
    with pytest.raises(ArtifactError, match="no such program file"):
        load(tmp_path / "missing.safetensors")


def test_future_format_version_is_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    path = _saved(tmp_path)
    with safe_open(str(path), "np") as f:
        meta = f.metadata()
    meta["format_version"] = "99"
    save_file(load_file(str(path)), str(path), metadata=meta)
    with pytest.raises(ArtifactError, match="version 99"):
        load(path)


def test_format_version_2_files_load_under_version_3_names(tmp_path):
    """The committed programs were written as version 2 (input op qmin/qmax, requantize t);
    they load with version 3's names (lo/hi, shift) and run to the same integers as the same
    program written again as version 3."""
    from pathlib import Path

    from safetensors import safe_open

    from lsqint.intprog.artifact import FORMAT_VERSION

    path = (
        Path(__file__).parents[1] / "docs/results/cifar10_resnet20_recipe/w4a4.intprog.safetensors"
    )
    with safe_open(str(path), "np") as f:
        assert f.metadata()["format_version"] == "2"
    old = load(path)
    first = old.nodes[0]
    assert first.op == "input" and {"lo", "hi"} <= set(first.attrs)
    assert not {"qmin", "qmax"} & set(first.attrs)
    requantize = next(n for n in old.nodes if n.op == "requantize")
    assert set(requantize.params) == {"m", "shift"}
    save(old, tmp_path / "v3.intprog.safetensors")
    with safe_open(str(tmp_path / "v3.intprog.safetensors"), "np") as f:
        assert f.metadata()["format_version"] == str(FORMAT_VERSION) == "3"
    new = load(tmp_path / "v3.intprog.safetensors")
    images = np.random.default_rng(0).integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
    assert np.array_equal(lsqint.run(old, images), lsqint.run(new, images))


def _edit_graph(path, edit, resign: bool) -> None:
    """Rewrite a program file's graph JSON; ``resign`` recomputes the digest as an adversary
    would, so only verify() stands between the edit and a runtime."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    from lsqint.intprog.artifact import _digest

    with safe_open(str(path), "np") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    graph = json.loads(meta["graph"])
    edit(graph)
    meta["graph"] = json.dumps(graph)
    if resign:
        meta["sha256"] = _digest(tensors, meta["graph"])
    save_file(tensors, str(path), metadata=meta)


def test_graph_edit_breaks_the_checksum(tmp_path):
    path = _saved(tmp_path)
    _edit_graph(path, lambda g: g["nodes"][0]["attrs"].update(shift=34), resign=False)
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        load(path)


def test_malformed_graph_is_refused(tmp_path):
    path = _saved(tmp_path)
    _edit_graph(path, lambda g: g["nodes"][2].update(inputs=["does_not_exist"]), resign=True)
    with pytest.raises(ArtifactError, match="before it is defined"):
        load(path)


def test_digits_qat_model_and_integer_program_agree(digits_runs):
    """docs/design.md section 5 target: accuracy within 0.1 points, >= 99.9 % identical labels."""
    qat_model, meta = load_qat_model(digits_runs["qat"]["checkpoint"])
    program = load(digits_runs["qat"]["program"])
    data = lsqint.data.load_data("digits")
    images, labels = images_and_labels(data.val)
    row = compare(program, qat_model, images, labels, runtime="reference")
    assert row["fakequant_acc"] > 0.9
    assert abs(row["int_acc"] - row["fakequant_acc"]) <= 0.001
    assert row["agreement"] >= 0.999  # vs the QAT model evaluated in float64
    assert row["agreement_f32"] >= 0.999  # vs its float32 evaluation
    assert_runtimes_agree(program, images.numpy())


def test_bias_of_a_nearly_dead_channel_is_clipped_exactly():
    """Regression: a W8A8 CIFAR run died in convert with 'quantized bias exceeds int32' because a
    channel's weights (and so its step size) were ~0 while its folded BN bias was not."""
    torch.manual_seed(0)
    model = lsqint.models.create_model("digits_cnn").eval()
    with torch.no_grad():
        model.conv2.weight[0].mul_(1e-7)
        model.bn2.bias[0] = 0.8
    images = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
    qat, program = quantize(model, QuantConfig(weight_bits=8, act_bits=8), images)  # used to raise
    conv2 = next(n for n in program.nodes if n.name == "conv2")
    assert conv2.params["bias"].dtype == np.int32
    assert int(conv2.params["bias"][0]) < 2**31 - 1
    requant = next(n for n in program.nodes if n.inputs == ["conv2"])
    assert requant.op == "requantize"
    # Channel 0's output is provably constant: lowered as weights 0, bias k, multiplier 1.
    assert not conv2.params["weight"][0].any()
    assert (int(requant.params["m"][0]), int(requant.params["shift"][0])) == (2**30, 30)
    assert conv2.params["weight"][1:].any()
    logits = assert_runtimes_agree(program, images.numpy())
    with torch.no_grad():
        fq = qat(images).numpy()
    assert np.array_equal(logits.argmax(1), fq.argmax(1))


@pytest.mark.parametrize("shrink", [1e-3, 1e-5, 1e-7])
def test_clipped_or_constant_bias_channel_gives_the_fake_quant_codes(shrink):
    from lsqint.runtime.reference import run_node

    torch.manual_seed(1)
    model = lsqint.models.create_model("digits_cnn").eval()
    with torch.no_grad():
        model.conv2.weight[0].mul_(shrink)
        model.bn2.bias[0] = 0.8
    images = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
    qat, program = quantize(model, QuantConfig(weight_bits=8, act_bits=8), images)
    env = {"input": images.numpy()}
    for node in program.nodes[:-1]:
        env[node.output] = run_node(node, [env[n] for n in node.inputs])
    requant = next(n for n in program.nodes if n.inputs == ["conv2"])
    quantizer = qat.get_submodule(requant.name)
    captured = {}
    handle = quantizer.register_forward_hook(lambda m, i, o: captured.setdefault("x", o))
    qat.eval()
    with torch.no_grad():
        qat(images)
    handle.remove()
    fq_codes = torch.round(captured["x"] / quantizer.effective_scale()).detach().numpy()
    assert np.array_equal(env[requant.output][:, 0], fq_codes[:, 0])  # the shrunk channel
