import io

import pytest
import torch
from torch import fx, nn

from conftest import assert_runtimes_agree, quantize, random_qat_program, randomize_bn_
from lsqint import QuantConfig, prepare_qat
from lsqint.models import MODELS, create_model
from lsqint.qat import (
    QuantConv2d,
    QuantLinear,
    UnsupportedOpError,
    calibrate_,
    node_kind,
    quantizers,
)
from lsqint.qat.convert import convert
from lsqint.qat.graph import trace
from lsqint.qat.prepare import fold_batchnorm_, quantizer_feeding
from lsqint.quant import LSQQuantizer

SIZES = {"resnet18": 64, "resnet34": 64, "digits_cnn": 8}


@pytest.mark.parametrize("name", sorted(MODELS) + ["torchvision:mobilenet_v2"])
def test_bn_folding_leaves_eval_output_unchanged(name):
    torch.manual_seed(0)
    size = SIZES.get(name, 32)
    model = randomize_bn_(create_model(name, 10, size)).eval()
    channels = 1 if name == "digits_cnn" else 3
    x = torch.randint(0, 256, (2, channels, size, size), dtype=torch.uint8)
    gm = trace(model)
    fold_batchnorm_(gm)
    gm.recompile()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-4)


DEFAULT = QuantConfig()


def _prepared(name, config=DEFAULT, size=32):
    model = randomize_bn_(create_model(name, 10, size)).eval()
    channels = 1 if name == "digits_cnn" else 3
    x = torch.randint(0, 256, (2, channels, size, size), dtype=torch.uint8)
    return prepare_qat(model, config, x), x


def _quantizer_of(gm, node):
    q = quantizer_feeding(gm, node)
    return gm.get_submodule(q.target)


def test_no_batchnorm_remains_after_prepare():
    gm, _ = _prepared("resnet20")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())
    kinds = [node_kind(gm, n) for n in gm.graph.nodes]
    assert "batchnorm" not in kinds


def test_resnet_quantizer_placement_and_signedness():
    gm, x = _prepared("resnet20")
    nodes = {n.name: n for n in gm.graph.nodes}
    # Network input: 8-bit signed, right after normalization.
    first_q = next(n for n in gm.graph.nodes if node_kind(gm, n) == "quantizer")
    assert node_kind(gm, first_q.args[0]) == "normalize"
    q_in = gm.get_submodule(first_q.target)
    assert (int(q_in.bits), bool(q_in.signed)) == (8, True)
    for node in gm.graph.nodes:
        kind = node_kind(gm, node)
        if kind in ("conv", "linear"):
            assert quantizer_feeding(gm, node.args[0]) is not None, node.name
        if kind == "add":
            for arg in node.args[:2]:
                assert node_kind(gm, arg) == "quantizer"
            # residual add + ReLU: one unsigned quantizer after the ReLU
            (relu,) = node.users
            assert node_kind(gm, relu) == "relu"
            (q,) = relu.users
            assert not bool(gm.get_submodule(q.target).signed)
    # conv1 of a block is followed by ReLU -> unsigned; conv2 (before the add) -> signed.
    block = "layers_1_0"
    relu_q = next(iter(nodes[f"{block}_relu1"].users))
    assert not bool(gm.get_submodule(relu_q.target).signed)
    conv2_q = next(iter(nodes[f"{block}_conv2"].users))
    assert bool(gm.get_submodule(conv2_q.target).signed)
    # The downsample shortcut conv (1x1, stride 2) is quantized, its output signed.
    ds = nodes[f"{block}_downsample_0"]
    assert isinstance(gm.get_submodule(ds.target), QuantConv2d)
    ds_q = gm.get_submodule(next(iter(ds.users)).target)
    assert bool(ds_q.signed) and int(ds_q.bits) == 4
    # First and last layers: 8-bit weights; the last layer's input: 8 bits (unsigned avg pool).
    assert int(gm.get_submodule("conv1").weight_quantizer.bits) == 8
    assert int(gm.get_submodule("fc").weight_quantizer.bits) == 8
    assert int(gm.get_submodule("layers.1.0.conv1").weight_quantizer.bits) == 4
    fc_in = _quantizer_of(gm, nodes["fc"].args[0])
    assert (int(fc_in.bits), bool(fc_in.signed)) == (8, False)
    # The logits are not quantized to a narrow code.
    out = next(n for n in gm.graph.nodes if n.op == "output")
    assert out.args[0].name == "fc"
    # Weight quantizers are per channel and initialized; activations wait for data.
    wq = gm.get_submodule("layers.2.0.conv2").weight_quantizer
    assert wq.scale.shape == (64,) and bool(wq.initialized)
    assert not bool(q_in.initialized)


def test_tiny_vgg_placement():
    gm, _ = _prepared("tiny_vgg")
    qs = [gm.get_submodule(n.target) for n in gm.graph.nodes if node_kind(gm, n) == "quantizer"]
    # input + 8 conv-ReLU6 + 2 linear-ReLU6; the last linear's output stays unquantized
    assert len(qs) == 11
    assert bool(qs[0].signed) and all(not bool(q.signed) for q in qs[1:])
    linears = [m for m in gm.modules() if isinstance(m, QuantLinear)]
    assert [int(m.weight_quantizer.bits) for m in linears] == [4, 4, 8]
    assert int(qs[-1].bits) == 8  # feeds the last layer
    assert any(node_kind(gm, n) == "dropout" for n in gm.graph.nodes)


def test_config_bits_and_overrides_apply():
    cfg = QuantConfig(
        weight_bits=3,
        act_bits=5,
        per_channel=False,
        first_last_bits=None,
        overrides={"layers.2.*": {"weight_bits": 2, "act_bits": 6}},
    )
    gm, _ = _prepared("resnet20", cfg)
    assert int(gm.get_submodule("conv1").weight_quantizer.bits) == 3
    assert int(gm.get_submodule("layers.2.1.conv1").weight_quantizer.bits) == 2
    assert gm.get_submodule("layers.2.1.conv1").weight_quantizer.scale.shape == ()
    nodes = {n.name: n for n in gm.graph.nodes}
    q = gm.get_submodule(next(iter(nodes["layers_2_1_relu1"].users)).target)
    assert int(q.bits) == 6
    q = gm.get_submodule(next(iter(nodes["layers_1_1_relu1"].users)).target)
    assert int(q.bits) == 5


def test_gradient_scale_survives_save_and_load():
    gm, x = _prepared("resnet20")
    gm.train()
    gm(x)
    buf = io.BytesIO()
    torch.save(gm.state_dict(), buf)
    buf.seek(0)
    fresh, _ = _prepared("resnet20")
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    for (name, a), (_, b) in zip(quantizers(gm).items(), quantizers(fresh).items(), strict=True):
        assert a.grad_scale.item() == b.grad_scale.item() > 0, name
        assert bool(b.initialized)
        assert torch.equal(a.scale, b.scale)


def test_qat_model_trains():
    gm, x = _prepared("digits_cnn", size=8)
    gm.train()
    loss = gm(x).logsumexp(1).mean()
    loss.backward()
    for name, p in gm.named_parameters():
        assert p.grad is not None, name
    assert any(p.grad.abs().sum() > 0 for n, p in gm.named_parameters() if n.endswith("scale"))


class CumulativeSum(nn.Module):
    def __init__(self):
        super().__init__()
        self.normalize = create_model("digits_cnn").normalize
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x):
        return torch.cumsum(self.conv(self.normalize(x)), 2).flatten(1)


def test_unsupported_function_names_the_node():
    x = torch.zeros(1, 1, 8, 8)
    with pytest.raises(UnsupportedOpError, match=r"node 'cumsum' \(call_function cumsum\)"):
        prepare_qat(CumulativeSum(), QuantConfig(), x)


def test_unsupported_module_names_the_node():
    norm = nn.LayerNorm([2, 6, 6])
    model = nn.Sequential(create_model("digits_cnn").normalize, nn.Conv2d(1, 2, 3), norm)
    with pytest.raises(UnsupportedOpError, match=r"LayerNorm '2'"):
        prepare_qat(model, QuantConfig(), torch.zeros(1, 1, 8, 8))


def test_untraceable_model_gets_clear_error():
    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(UnsupportedOpError, match="fx-traceable"):
        prepare_qat(Branchy(), QuantConfig(), torch.zeros(1, 1, 2, 2))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"weight_bits": 9}, "weight_bits=9 is out of range"),
        ({"act_bits": 1}, "act_bits=1"),
        ({"first_last_bits": 0}, "first_last_bits"),
        ({"overrides": {"fc": {"weight_bit": 3}}}, "did you mean 'weight_bits'"),
        ({"overrides": {"fc": {"act_bits": 12}}}, "out of range"),
    ],
)
def test_quant_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig(**kwargs)


def test_quant_config_round_trips_through_dict():
    cfg = QuantConfig(weight_bits=2, overrides={"a.*": {"act_bits": 3}})
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(TypeError):
        cfg.overrides["b"] = {}  # frozen all the way down
    with pytest.raises(AttributeError):
        cfg.weight_bits = 3


def test_quant_config_copies_and_pickles():
    import copy
    import pickle

    cfg = QuantConfig(weight_bits=3, overrides={"fc": {"weight_bits": 8}})
    assert copy.deepcopy(cfg) is cfg
    assert pickle.loads(pickle.dumps(cfg)) == cfg


def test_torchvision_resnet_prepares():
    model = randomize_bn_(create_model("torchvision:resnet18", 10, 64)).eval()
    gm = prepare_qat(model, QuantConfig(), torch.zeros(1, 3, 64, 64))
    assert isinstance(gm, fx.GraphModule)
    assert sum(isinstance(m, LSQQuantizer) for m in gm.modules()) > 20


def test_residual_bits_widen_what_residual_adds_read_and_convs_read_narrow_codes():
    """residual_bits=8 at W2A2: the pre-add outputs (a block's last conv and its shortcut) get
    8 bits, and so does the residual stream (block outputs that the next block's convs and its
    add both read): the add reads the 8-bit codes, the convs a 2-bit requantization of them.
    Every conv/linear input keeps 2 bits (or the 8 of the first/last layer)."""
    config = QuantConfig(2, 2, residual_bits=8)
    qat, program, images = random_qat_program("resnet20", config, seed=9)
    widened, streams = 0, 0
    for node in qat.graph.nodes:
        if node_kind(qat, node) != "quantizer":
            continue
        readers = {node_kind(qat, user) for user in node.users}
        if readers == {"add"}:
            assert int(qat.get_submodule(node.target).bits) == 8, node.name
            widened += 1
        elif readers == {"add", "quantizer"}:
            assert int(qat.get_submodule(node.target).bits) == 8, node.name
            (narrow,) = (user for user in node.users if node_kind(qat, user) == "quantizer")
            assert int(qat.get_submodule(narrow.target).bits) == 2
            assert {node_kind(qat, user) for user in narrow.users} == {"conv"}
            streams += 1
    assert widened == 9 + 2  # conv2 of the 9 blocks and the 2 shortcut convs
    # The stem's output and the outputs of the 6 blocks whose successor adds its input (the
    # other 2 feed a block with a shortcut conv; the last feeds the pool).
    assert streams == 7
    assert sum(n.op == "affine" for n in program.nodes) == 7
    layer_inputs = [
        program.tensors[n.inputs[0]] for n in program.nodes if n.op in ("conv2d", "linear")
    ]
    assert sorted({t.bits for t in layer_inputs}) == [2, 8]
    assert sum(t.bits == 8 for t in layer_inputs) == 2  # the network input and the fc input
    assert sum(t.bits == 8 for t in program.tensors.values() if t.bits) > 2
    assert_runtimes_agree(program, images.numpy())
    with pytest.raises(ValueError, match="residual_bits"):
        QuantConfig(2, 2, residual_bits=9)


class _LinearBottleneckNet(nn.Module):
    """MobileNetV2's residual pattern at toy size: no ReLU after the add, so the residual
    stream is signed."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(8, 16, 1),
                nn.BatchNorm2d(16),
                nn.ReLU(),
                nn.Conv2d(16, 8, 3, padding=1),
                nn.BatchNorm2d(8),
            )  # fmt: skip
            for _ in range(2)
        )
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x.mean((2, 3)))


def test_a_signed_residual_stream_is_requantized_exactly_for_the_convs_that_read_it():
    torch.manual_seed(4)
    model = randomize_bn_(_LinearBottleneckNet(), seed=4).eval()
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    qat, program = quantize(
        model, QuantConfig(2, 2, residual_bits=8), images, normalize=([0.5] * 3, [0.25] * 3)
    )
    streams = [n for n in program.nodes if n.op == "affine"]
    assert len(streams) == 2  # the stem's output and the first block's sum
    for node in streams:
        wide, narrow = program.tensors[node.inputs[0]], program.tensors[node.output]
        assert (wide.dtype, wide.bits, narrow.dtype, narrow.bits) == ("int8", 8, "int8", 2)
    assert_runtimes_agree(program, images.numpy(), runtimes=("torch", "onnx"))


def test_model_without_normalize_takes_raw_pixels_when_told_the_normalization():
    """A plain torchvision-style model reads normalized tensors; prepare_qat(normalize=...)
    prepends that normalization, so QAT and the program take uint8 pixels."""
    torch.manual_seed(0)
    plain = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    ).eval()
    randomize_bn_(plain)
    pixels = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    with pytest.raises(UnsupportedOpError, match="normalize=\\(mean, std\\)"):
        prepare_qat(plain, QuantConfig(), pixels)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    qat = prepare_qat(plain, QuantConfig(8, 8), pixels, normalize=(mean, std))
    calibrate_(qat, pixels)
    qat.eval()
    normalized = (pixels.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(
        std
    ).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = plain(normalized)
        got = qat(pixels)
    assert torch.allclose(got, expected, atol=0.05 * expected.abs().max().item())  # W8A8 error
    program = convert(qat)
    assert program.input_spec.dtype == "uint8"
    assert_runtimes_agree(program, pixels.numpy())
