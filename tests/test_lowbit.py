"""Low-bit training: the W2A2 collapse (step-size initialization), distillation, progressive
initialization."""

import pytest
import torch
from torch import nn

from conftest import randomize_bn_
from lsqint import QuantConfig, prepare_qat
from lsqint.models import create_model
from lsqint.qat import calibrate_
from lsqint.quant import LSQQuantizer, code_range, init_scale, lsq_fake_quant
from lsqint.train.distill import distill_loss


def _sparse_relu_output(seed=0, zeros=0.93, n=50_000):
    """Like resnet20's last ReLU on CIFAR-10 (measured: 93.5 % zeros): a ReLU after a strongly
    negative bias, so the values that pass are few and well away from zero."""
    g = torch.Generator().manual_seed(seed)
    x = 1.0 + 2.0 * torch.rand(n, generator=g)
    x[torch.rand(n, generator=g) < zeros] = 0.0
    return x


def _clipped_share(x, scale, qmax):
    positive = x > 0
    return float((x[positive] / scale > qmax + 0.5).float().mean())


def test_lsq_init_clips_every_nonzero_value_of_a_sparse_relu_at_2_bits_mse_does_not():
    x = _sparse_relu_output()
    qmin, qmax = code_range(2, signed=False)
    lsq = init_scale(x, qmin, qmax, per_channel=False, method="lsq")
    mse = init_scale(x, qmin, qmax, per_channel=False, method="mse")
    # The paper's formula: 2 * mean|x| / sqrt(3) ~ 0.16 here: every non-zero value saturates.
    assert _clipped_share(x, lsq, qmax) > 0.95
    assert _clipped_share(x, mse, qmax) < 0.2


@pytest.mark.parametrize("bits,signed", [(2, True), (2, False), (3, True), (4, False), (8, True)])
def test_mse_init_has_no_larger_error_than_lsq_init(bits, signed):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(16, 200, generator=g) * torch.rand(16, 1, generator=g)
    if not signed:
        x = x.clamp_min(0)
    qmin, qmax = code_range(bits, signed)
    for per_channel in (True, False):
        errs = {}
        for method in ("lsq", "mse"):
            s = init_scale(x, qmin, qmax, per_channel, method)
            xq = lsq_fake_quant(x, s, qmin, qmax, 1.0)
            err = (xq - x).square()
            errs[method] = err.flatten(1).mean(1) if per_channel else err.mean()
        # Per step size: the search picks the best of 100 candidates; allow the grid's resolution.
        assert (errs["mse"] <= errs["lsq"] * 1.02 + 1e-12).all()


def _gradient_through_2bit_relu_quantizer(scale_init: str) -> float:
    """Share of the non-zero (ReLU-passed) inputs of a 2-bit quantizer that get a gradient."""
    x = _sparse_relu_output().view(10, -1).requires_grad_(True)
    q = LSQQuantizer(2, signed=False, scale_init=scale_init).train()
    q(x).sum().backward()
    positive = x.detach() > 0
    return float((x.grad[positive] != 0).float().mean())


def test_the_collapse_the_lsq_init_zeroes_every_gradient_below_a_sparse_relu():
    """The W2A2 CIFAR-10 collapse in one quantizer: with the paper's init no value that passed
    the ReLU gets a gradient (the ReLU blocks the rest), so nothing below it trains."""
    assert _gradient_through_2bit_relu_quantizer("lsq") == 0.0
    assert _gradient_through_2bit_relu_quantizer("mse") > 0.8


def test_w2a2_resnet_gradient_reaches_every_layer():
    torch.manual_seed(0)
    model = randomize_bn_(create_model("resnet20", 10, 16), 0).eval()
    images = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8)
    qat = prepare_qat(model, QuantConfig(weight_bits=2, act_bits=2), images)
    calibrate_(qat, images)
    qat.train()
    nn.functional.cross_entropy(qat(images), torch.arange(16) % 10).backward()
    dead = [n for n, p in qat.named_parameters() if p.grad is None or not p.grad.any()]
    assert dead == []


def test_quantizer_uses_its_configured_init():
    x = _sparse_relu_output(n=4000).view(4, 1000)
    for method in ("lsq", "mse"):
        q = LSQQuantizer(2, signed=False, scale_init=method).train()
        q(x)
        assert torch.equal(q.scale.data, init_scale(x, 0, 3, False, method))
    with pytest.raises(ValueError, match="scale"):
        LSQQuantizer(2, signed=False, scale_init="max")
    with pytest.raises(ValueError, match="scale_init"):
        QuantConfig(scale_init="max")


def test_distill_loss_mixes_label_and_teacher_terms():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(8, 10, generator=g)
    teacher = torch.randn(8, 10, generator=g)
    labels = torch.arange(8)
    ce = nn.functional.cross_entropy(student, labels)
    assert torch.equal(distill_loss(student, teacher, labels, 4.0, 0.0), ce)
    # A student that equals its teacher has zero KL: only the label term remains.
    assert distill_loss(teacher, teacher, labels, 4.0, 1.0).abs().item() < 1e-6
    t = 3.0
    p_t = torch.softmax(teacher / t, 1)
    kl = (p_t * (p_t.log() - torch.log_softmax(student / t, 1))).sum(1).mean()
    got = distill_loss(student, teacher, labels, t, 0.25)
    torch.testing.assert_close(got, 0.75 * ce + 0.25 * t * t * kl)


def test_qat_with_distillation_and_progressive_init(tmp_path, digits_runs):
    """--distill trains against the float teacher; a W2A2 run initialized from the W4A4 QAT
    checkpoint starts from its trained weights with step sizes set anew for 2 bits."""
    from lsqint.app.runs import load_qat_model
    from lsqint.app.workflow import digits_args, train_qat
    from lsqint.qat.modules import QuantConv2d
    from lsqint.train import load_checkpoint

    source = digits_runs["qat"]["checkpoint"]
    source_model, _ = load_qat_model(source)
    args = digits_args(
        epochs=1,
        lr=0.0,  # lr 0: the run keeps exactly the weights it started from
        momentum=0.0,
        w_num_bits=2,
        a_num_bits=2,
        seed=0,
        log_dir=str(tmp_path),
        init=source,
        distill=True,
        teacher=digits_runs["float"]["checkpoint"],
        save_program=False,
    )
    result = train_qat(args)
    model = result["model"]
    for name, m in model.named_modules():
        if isinstance(m, QuantConv2d):
            src = source_model.get_submodule(name)
            assert torch.equal(m.weight, src.weight)
            if src.weight_quantizer.qrange == (-8, 7):  # not the 8-bit first layer
                assert m.weight_quantizer.qrange == (-2, 1)
            assert not torch.equal(m.weight_quantizer.scale, src.weight_quantizer.scale)
    meta = load_checkpoint(result["checkpoint"])["meta"]
    assert meta["init"] == source
    assert meta["distill"]["teacher"] == digits_runs["float"]["checkpoint"]
    assert result["history"][0]["train_acc"] > 0.5  # the 4-bit weights carry over


def _bn_aware_resnet(bits=3):
    from lsqint.qat import QuantConvBn2d

    model = randomize_bn_(create_model("resnet20", 10, 16, 3, (0.5,) * 3, (0.25,) * 3)).eval()
    images = torch.randint(0, 256, (8, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    qat = prepare_qat(model, QuantConfig(weight_bits=bits, act_bits=bits), images, bn_aware=True)
    layers = [m for m in qat.modules() if isinstance(m, QuantConvBn2d)]
    assert len(layers) == 21  # every conv of resnet20 has its BN
    return qat, layers, images.float()


def test_bn_aware_layers_normalize_with_batch_statistics_and_fold_exactly():
    """BN-aware QAT (issue 9, item 2): in training the BNs use and update batch statistics; in
    eval the model equals its folded form bit for bit, and so does the integer program."""
    from lsqint import convert, run
    from lsqint.qat import freeze_batchnorm_

    qat, layers, images = _bn_aware_resnet()
    calibrate_(qat, images)
    before = [m.bn.running_mean.clone() for m in layers]
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.01)
    for _ in range(2):
        loss = qat.train()(images).logsumexp(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(not torch.equal(b, m.bn.running_mean) for b, m in zip(before, layers, strict=True))
    assert all(m.bn.weight.grad is not None for m in layers)  # gamma trains through the fold
    # The conv output is normalized with this batch's statistics, not the running ones.
    first = layers[1]
    seen = {}
    hook = first.bn.register_forward_hook(lambda mod, i, o: seen.update(out=o.detach().clone()))
    qat.train()(images)
    hook.remove()
    mean = seen["out"].mean((0, 2, 3))
    torch.testing.assert_close(mean, first.bn.bias.detach(), atol=1e-4, rtol=0)

    expected = qat.eval()(images)
    program = convert(qat)  # folds a copy
    assert any(isinstance(m, type(first)) for m in qat.modules())  # the model is left as it was
    frozen = freeze_batchnorm_(qat)
    assert frozen == 21 and not any(isinstance(m, type(first)) for m in qat.modules())
    assert torch.equal(qat.eval()(images), expected)
    codes = images.to(torch.uint8)
    reference = torch.as_tensor(run(program, codes, runtime="reference"))
    assert torch.equal(reference, torch.as_tensor(run(program, codes, runtime="torch")))
    assert torch.equal(reference.argmax(1), expected.argmax(1))


def test_bn_aware_layer_starts_equal_to_a_folded_checkpoint():
    """Progressive init into a BN-aware model: the BN is set from the calibration batch so that
    the layer equals the folded conv it was given (folding factor 1, beta = mean + bias)."""
    qat, layers, images = _bn_aware_resnet()
    layer = layers[3]
    weight = torch.randn_like(layer.weight) * 0.1
    bias = torch.randn(layer.out_channels) * 0.1
    layer.start_from_folded_(weight, bias)
    calibrate_(qat, images)
    folded_weight, folded_bias = layer.folded()
    torch.testing.assert_close(folded_weight, weight, rtol=1e-5, atol=0)
    torch.testing.assert_close(folded_bias, bias, rtol=0, atol=1e-5)


def test_progressive_init_from_a_checkpoint_saved_before_the_fold(tmp_path, digits_runs):
    """A QAT checkpoint that still holds its BatchNorms (BN-aware, not yet folded) initializes a
    lower-bit run with its folded weights: what its program computes."""
    from lsqint.app.runs import holds_batchnorm, load_qat_model
    from lsqint.app.workflow import digits_args, train_qat
    from lsqint.qat import freeze_batchnorm_
    from lsqint.qat.modules import QuantConv2d
    from lsqint.train import load_checkpoint

    base = dict(seed=0, momentum=0.0, save_program=False)
    source = train_qat(
        digits_args(
            epochs=1,
            lr=0.01,
            bn_aware_epochs=1,  # never folds within the run
            init=digits_runs["float"]["checkpoint"],
            log_dir=str(tmp_path / "bn"),
            **base,
        )
    )["checkpoint"]
    assert holds_batchnorm(load_checkpoint(source)["model"])
    folded, _ = load_qat_model(source)
    assert freeze_batchnorm_(folded) > 0
    result = train_qat(
        digits_args(
            epochs=1,
            lr=0.0,
            w_num_bits=2,
            a_num_bits=2,
            init=source,
            log_dir=str(tmp_path / "w2a2"),
            **base,
        )  # fmt: skip
    )
    layers = [(n, m) for n, m in result["model"].named_modules() if isinstance(m, QuantConv2d)]
    assert layers
    for name, layer in layers:
        assert torch.equal(layer.weight, folded.get_submodule(name).weight), name
        assert torch.equal(layer.bias, folded.get_submodule(name).bias), name


def test_gradient_clipping_bounds_the_first_step_of_low_bit_qat(tmp_path):
    """The W2A2 collapse at lr 0.01: the first gradients of low-bit QAT are huge, and one
    unclipped step kills the last stage's ReLUs. With --grad-clip the step is bounded by
    lr * clip (plain SGD here), however large the gradient."""
    from lsqint.data.memory import ImageSet, TensorLoader
    from lsqint.train.loop import TrainConfig, Trainer

    torch.manual_seed(0)
    model = randomize_bn_(create_model("resnet20", 10, 16), seed=3)
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    labels = torch.randint(0, 10, (8,))
    qat = prepare_qat(model, QuantConfig(2, 2), images)
    calibrate_(qat, images)
    loss = nn.functional.cross_entropy(qat(images), labels)
    loss.backward()
    grads = [p.grad for p in qat.parameters() if p.grad is not None]
    unclipped = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
    qat.zero_grad(set_to_none=True)
    clip, lr = 0.05, 0.1
    assert unclipped > 10 * clip  # the clip really acts
    before = [p.detach().clone() for p in qat.parameters()]
    cfg = TrainConfig(
        epochs=1,
        lr=lr,
        momentum=0.0,
        weight_decay=0.0,
        grad_clip=clip,
        out_dir=str(tmp_path),
        progress=False,
    )
    # One batch, not augmented: the step sees exactly the gradient measured above.
    loader = TensorLoader(ImageSet(images, labels, [str(c) for c in range(10)]), 8, train=False)
    Trainer(qat, loader, loader, cfg, torch.device("cpu")).fit()
    moves = [(p.detach() - b).norm() for p, b in zip(qat.parameters(), before, strict=True)]
    step = float(torch.linalg.vector_norm(torch.stack(moves)))
    # Step sizes are clamped at their floor after the step (never raised above lr * grad).
    assert 0.5 * lr * clip < step <= lr * clip * (1 + 1e-4)
