import json

import numpy as np
import pytest
from PIL import Image

from lsqint.app import sweep as sweep_module
from lsqint.app.sweep import parse_pairs, sweep
from lsqint.app.workflow import digits_args

ARGS = digits_args()


def test_sweep_resumes_without_redoing_finished_pairs(tmp_path, monkeypatch, digits_runs):
    calls = []
    real_train_qat = sweep_module.train_qat

    def flaky_train_qat(args, *rest):
        calls.append((args.w_num_bits, args.a_num_bits))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the run is interrupted during the second pair
        return real_train_qat(args, *rest)

    monkeypatch.setattr(sweep_module, "train_qat", flaky_train_qat)
    pairs = parse_pairs("4,4 3,3")
    kwargs = dict(
        float_epochs=0,
        qat_overrides=dict(epochs=2, lr=0.01),
        float_lr=0.05,
        out=tmp_path,
        float_checkpoint=digits_runs["float"]["checkpoint"],
        progressive=True,
    )
    with pytest.raises(KeyboardInterrupt):
        sweep(ARGS, pairs, **kwargs)
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["pair"] for r in saved["rows"]] == ["W4A4"]
    rows = sweep(ARGS, pairs, **kwargs)
    assert calls == [(4, 4), (3, 3), (3, 3)]  # W4A4 was not trained again
    assert [r["pair"] for r in rows] == ["W4A4", "W3A3"]
    # progressive: W3A3 started from W4A4's QAT checkpoint, W4A4 from the float model
    assert rows[0]["init"] == digits_runs["float"]["checkpoint"]
    assert rows[1]["init"].endswith("w4a4/best.pt")
    assert rows[0] == saved["rows"][0]
    for r in rows:
        assert 0.5 < r["int_acc"] <= 1 and r["agreement"] >= 0.99
        assert r["artifact_bytes"] < r["float_bytes"]
    table = (tmp_path / "sweep.md").read_text()
    assert "| W4A4 |" in table and "| W3A3 |" in table
    # the recipe for 3 bits with the overrides on top
    assert rows[1]["qat_recipe"] == dict(
        epochs=2, lr=0.01, weight_decay=5e-5, grad_clip=1.0, residual_bits=8
    )


def test_plot_is_a_png_with_the_expected_series(tmp_path):
    rows = [
        {
            "pair": p,
            "w_bits": w,
            "a_bits": a,
            "float_acc": 0.95,
            "fakequant_acc": acc,
            "int_acc": acc,
            "agreement": 1.0,
            "artifact_bytes": size,
            "float_bytes": 57000,
        }
        for p, w, a, acc, size in (("W8A8", 8, 8, 0.95, 30000), ("W2A2", 2, 2, 0.8, 9000))
    ]
    path = tmp_path / "plot.png"
    sweep_module.plot(rows, path, "test")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 600 and im.size[1] > 300
        assert im.text["Description"] == "series: float, fake-quant, integer"
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
        assert len(np.unique(pixels, axis=0)) > 20  # something was drawn


def test_bad_pairs_are_refused():
    with pytest.raises(ValueError, match="bad W,A pair"):
        parse_pairs("4-4")
