"""The QAT recipe: what `lsqint qat` and `lsqint sweep` use when the command line does not say,
progressive initialization's choice of a starting pair, and distillation on by default."""

import pytest

from lsqint.app import cli
from lsqint.qat.recipe import progressive_source, recipe_for


def _parsed(*argv):
    ns = cli.build_parser().parse_args(list(argv))
    return ns, cli._run_args(ns)


PAIRS = [(8, 8), (6, 6), (6, 4), (4, 6), (4, 4), (4, 3), (3, 3), (8, 2), (2, 2)]


@pytest.mark.parametrize("bits", PAIRS)
def test_qat_takes_the_recipe_for_its_bits(bits):
    """What the command line passes on is the recipe's row for the bits, field by field."""
    w, a = bits
    _, args = _parsed("qat", "-w", str(w), "-a", str(a))
    got = (args.epochs, args.lr, args.weight_decay, args.grad_clip, args.residual_bits)
    assert got == tuple(vars(recipe_for(w, a)).values())
    assert args.distill is None  # on when a float teacher is found


def test_fewer_bits_never_get_a_shorter_or_unclipped_recipe():
    """The recipe's shape (docs/guide.md): below 8 bits training is clipped and keeps an 8-bit
    residual stream, and fewer bits on either side never mean fewer epochs."""
    rows = {pair: recipe_for(*pair) for pair in PAIRS}
    for (w, a), row in rows.items():
        if min(w, a) < 6:
            assert row.grad_clip is not None and row.residual_bits == 8, (w, a)
        for (w2, a2), other in rows.items():
            if w2 <= w and a2 <= a:
                assert other.epochs >= row.epochs, ((w, a), (w2, a2))


def test_flags_given_override_the_recipe_and_none_is_kept():
    _, args = _parsed(
        "qat", "-w", "2", "-a", "2", "--lr", "0.05", "--grad-clip", "none", "--no-distill"
    )
    assert (args.lr, args.grad_clip, args.distill) == (0.05, None, False)
    assert (args.epochs, args.weight_decay, args.residual_bits) == (15, 1e-4, 8)  # the recipe's
    _, args = _parsed(
        "qat", "-w", "2", "-a", "2", "-e", "1", "--wd", "0", "--residual-bits", "none"
    )
    assert (args.epochs, args.weight_decay, args.residual_bits) == (1, 0.0, None)


def test_sweep_keeps_lr_and_wd_for_the_float_baseline_and_passes_only_given_qat_flags():
    ns, args = _parsed("sweep")
    assert (args.lr, args.weight_decay, args.grad_clip, args.residual_bits) == (
        0.1,
        5e-4,
        None,
        None,
    )
    assert cli._recipe_overrides(ns) == {} and ns.progressive is True
    ns, _ = _parsed(
        "sweep", "--qat-epochs", "4", "--qat-lr", "0.02", "--grad-clip", "none", "--no-progressive"
    )
    assert cli._recipe_overrides(ns) == dict(epochs=4, lr=0.02, grad_clip=None)
    assert ns.progressive is False


def test_progressive_steps_down_one_bit_at_a_time():
    done = [(8, 8), (6, 4), (4, 6), (4, 4), (3, 3)]
    assert progressive_source((8, 8), []) is None
    assert progressive_source((4, 4), done[:3]) is None  # two bits below W6A4/W4A6: from float
    assert progressive_source((3, 3), done[:4]) == (4, 4)
    assert progressive_source((2, 2), done) == (3, 3)
    assert progressive_source((3, 2), done) == (3, 3)
    assert progressive_source((2, 2), done[:4]) is None


def test_distillation_is_on_when_a_float_teacher_is_found(tmp_path, digits_runs, capsys):
    from lsqint.app.workflow import digits_args, train_qat
    from lsqint.train import load_checkpoint

    fast = dict(epochs=1, lr=0.0, save_program=False, max_steps_per_epoch=2, distill=None)
    # from the float checkpoint: it is the teacher
    result = train_qat(
        digits_args(**fast, log_dir=str(tmp_path / "a"), init=digits_runs["float"]["checkpoint"])
    )
    meta = load_checkpoint(result["checkpoint"])["meta"]
    assert meta["distill"]["teacher"] == digits_runs["float"]["checkpoint"]
    # from a QAT checkpoint, with no float run under --log-dir: no teacher, no distillation
    result = train_qat(
        digits_args(
            **fast,
            w_num_bits=3,
            a_num_bits=3,
            log_dir=str(tmp_path / "b"),
            init=digits_runs["qat"]["checkpoint"],
        )
    )
    assert "distill" not in load_checkpoint(result["checkpoint"])["meta"]
    assert "no float teacher" in capsys.readouterr().out
